"""Invariants every implementation must keep, whatever its algorithm.

Drawn tests first, the pinned long cases after them as tests of their own (see test_values.py)."""

import dataclasses

from hypothesis import example, given
from hypothesis import strategies as st

from .cases import SMALLEST, Case, cases
from .checks import (check_batch_independence, check_causality, check_nan_propagation,
                     check_prefill_then_decode, check_split)

positions = st.integers(0, 400)  # folded to the case's length by each check


@example(case=SMALLEST, k=0)
@example(case=SMALLEST, k=1)
@given(case=cases(), k=positions)
def test_split_then_continue(continuing_impl, case, k):
    check_split(continuing_impl, case, k)


@example(case=SMALLEST, k=0)
@given(case=cases(max_l=120), k=positions)
def test_prefill_then_decode_equals_full_scan(stepping_impl, case, k):
    check_prefill_then_decode(stepping_impl, case, k)


@example(case=SMALLEST, t=0)
@given(case=cases(), t=positions)
def test_causality(impl, case, t):
    check_causality(impl, case, t)


@example(case=dataclasses.replace(SMALLEST, b=2), j=1)
@given(case=cases(min_b=2), j=st.integers(0, 2))
def test_batch_rows_are_independent(impl, case, j):
    check_batch_independence(impl, case, j)


@example(case=SMALLEST, t=0)
@given(case=cases(), t=positions)
def test_nan_propagates_and_stays_in_its_channel(impl, case, t):
    check_nan_propagation(impl, case, t)


# The long cases, each a test of its own: an @example is never shrunk, so it must not pre-empt a drawn failure.

def test_pinned_split_at_129_of_300(continuing_impl):
    check_split(continuing_impl, Case(b=2, d=6, n=3, l=300, g=2, regime="slow", initial_state=True), 129)


def test_pinned_prefill_70_then_20_steps(stepping_impl):
    check_prefill_then_decode(stepping_impl, Case(b=2, d=4, n=2, l=90, g=4, dtype="bf16", initial_state=True), 70)


def test_pinned_causality_at_257_of_300(impl):
    check_causality(impl, Case(b=1, d=3, n=2, l=300, regime="stress"), 257)


def test_pinned_nan_at_3_of_200(impl):
    check_nan_propagation(impl, Case(b=1, d=2, n=2, l=200, regime="stress", dtype="f32"), 3)
