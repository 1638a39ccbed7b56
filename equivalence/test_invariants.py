"""Invariants every implementation of every family must keep, whatever its algorithm.

Drawn tests first, then each family's pinned long and edge cases (its PINNED_INVARIANTS) as tests of
their own (see test_values.py)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from .properties import (NONFINITE, check_batch_independence, check_causality, check_chunk_size_invariance,
                         check_nan_propagation, check_nonfinite, check_prefill_then_decode, check_split)

positions = st.integers(0, 400)  # folded to the case's length by each check


def pinned(family, prop):
    """The family's pinned cases of ``prop`` (its PINNED_INVARIANTS); a family without any is
    skipped, saying so."""
    if not family.PINNED_INVARIANTS.get(prop):
        pytest.skip(f"{family.NAME}: no pinned {prop} cases")
    return family.PINNED_INVARIANTS[prop]


def drawn(data, family, strategy):
    return data.draw(family.STRATEGIES[strategy], label="case")


@given(data=st.data(), k=positions)
def test_split_then_continue(family, continuing_impl, data, k):
    check_split(family, continuing_impl, drawn(data, family, "split"), k)


@given(data=st.data(), k=positions)
def test_prefill_then_decode_equals_full_scan(family, stepping_impl, data, k):
    check_prefill_then_decode(family, stepping_impl, drawn(data, family, "decode"), k)


@given(data=st.data(), t=positions)
def test_causality(family, impl, data, t):
    check_causality(family, impl, drawn(data, family, "causality"), t)


@given(data=st.data(), j=st.integers(0, 2))
def test_batch_rows_are_independent(family, impl, data, j):
    check_batch_independence(family, impl, drawn(data, family, "batch"), j)


@given(data=st.data(), t=positions, poison=st.sampled_from(tuple(NONFINITE)))
def test_nonfinite_propagates_as_the_loops(family, nonfinite_impl, data, t, poison):
    """A NaN, inf or -inf at token t of one time input: non-finite outputs exactly where the loop's
    are, and a NaN stays in its own row and channel, from its token on."""
    arg = data.draw(st.sampled_from(family.TIME_ARGS), label="arg")
    check_nonfinite(family, nonfinite_impl, drawn(data, family, "nonfinite"), arg, t, poison)


@given(data=st.data(), t=positions)
def test_nan_propagates_and_stays_in_its_channel(family, impl, data, t):
    """Every implementation, the non-finite-inputs gap included: a NaN in one channel's input
    changes that channel from its token on and nothing else, bit for bit."""
    check_nan_propagation(family, impl, drawn(data, family, "nonfinite"), t)


@given(data=st.data())
def test_results_do_not_depend_on_chunk_size(family, impl, data):
    if family.CHUNK_SIZES is None:
        pytest.skip(f"{family.NAME}: no chunk size in the interface")
    # One of the family's chunk sizes per drawn case, drawn too: each size is compared with the
    # float64 loop, not with the others, so a case needs only one, and a failure names its size.
    # The pinned cases below run every size.
    case = drawn(data, family, "chunk_sizes")
    check_chunk_size_invariance(family, impl, case, (data.draw(st.sampled_from(family.CHUNK_SIZES), label="chunk_size"),))


def test_pinned_split(family, continuing_impl):
    for case, k in pinned(family, "split"):
        check_split(family, continuing_impl, case, k)


def test_pinned_prefill_then_steps(family, stepping_impl):
    for case, k in pinned(family, "decode"):
        check_prefill_then_decode(family, stepping_impl, case, k)


def test_pinned_causality(family, impl):
    for case, t in pinned(family, "causality"):
        check_causality(family, impl, case, t)


def test_pinned_nonfinite(family, nonfinite_impl):
    for case, arg, t, poison in pinned(family, "nonfinite"):
        check_nonfinite(family, nonfinite_impl, case, arg, t, poison)


def test_pinned_nan_propagation(family, impl):
    for case, t in pinned(family, "nan"):
        check_nan_propagation(family, impl, case, t)


def test_pinned_chunk_sizes(family, impl):
    if family.CHUNK_SIZES is None:
        pytest.skip(f"{family.NAME}: no chunk size in the interface")
    for case in pinned(family, "chunk_sizes"):
        check_chunk_size_invariance(family, impl, case, family.CHUNK_SIZES)
