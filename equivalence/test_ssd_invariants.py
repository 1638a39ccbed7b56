"""Invariants every SSD implementation must keep, whatever its algorithm: split-then-continue,
chunk-size invariance, causality, batch independence, and NaN / inf propagation as the loop's."""

from hypothesis import example, given
from hypothesis import strategies as st

from .ssd_cases import CHUNK_SIZES, SSDCase, cases
from .ssd_checks import (POISONS, check_batch_independence, check_causality, check_chunk_size_invariance,
                         check_nonfinite_propagation, check_split)

positions = st.integers(0, 400)  # folded to the case's length by each check


@example(case=SSDCase(b=1, l=1, h=1, p=1, n=1), k=0)
@example(case=SSDCase(b=1, l=1, h=1, p=1, n=1), k=1)
@example(case=SSDCase(b=2, l=300, h=4, p=3, n=5, g=2, regime="slow", initial_states=True, chunk_size=64), k=129)
@example(case=SSDCase(b=1, l=100, h=2, p=2, n=3, dtype="bf16", D="hp", chunk_size=17), k=17)
@given(case=cases(), k=positions)
def test_split_then_continue(ssd_continuing_impl, case, k):
    check_split(ssd_continuing_impl, case, k)


@example(case=SSDCase(b=1, l=1, h=1, p=1, n=1))
@example(case=SSDCase(b=2, l=257, h=4, p=5, n=8, g=2, regime="stress", initial_states=True, seed=1))
@example(case=SSDCase(b=1, l=300, h=3, p=3, n=4, g=1, regime="slow", dtype="f64", seed=2))
@given(case=cases(max_l=300))
def test_results_do_not_depend_on_chunk_size(ssd_impl, case):
    check_chunk_size_invariance(ssd_impl, case, CHUNK_SIZES)


@example(case=SSDCase(b=1, l=1, h=1, p=1, n=1), t=0)
@example(case=SSDCase(b=1, l=300, h=3, p=2, n=2, regime="stress", chunk_size=64), t=257)
@example(case=SSDCase(b=1, l=64, h=2, p=2, n=2, chunk_size=64), t=33)
@given(case=cases(), t=positions)
def test_causality(ssd_impl, case, t):
    check_causality(ssd_impl, case, t)


@example(case=SSDCase(b=2, l=1, h=1, p=1, n=1), j=1)
@given(case=cases(min_b=2), j=st.integers(0, 2))
def test_batch_rows_are_independent(ssd_impl, case, j):
    check_batch_independence(ssd_impl, case, j)


@example(case=SSDCase(b=1, l=1, h=1, p=1, n=1), arg="x", t=0, poison="nan")
@example(case=SSDCase(b=1, l=40, h=2, p=3, n=2, chunk_size=17), arg="x", t=20, poison="nan")
@example(case=SSDCase(b=1, l=40, h=2, p=3, n=2, chunk_size=17), arg="x", t=20, poison="inf")
@example(case=SSDCase(b=1, l=40, h=2, p=3, n=2, chunk_size=17), arg="B", t=20, poison="nan")
@example(case=SSDCase(b=1, l=40, h=2, p=3, n=2, chunk_size=17), arg="dt", t=20, poison="nan")
@example(case=SSDCase(b=1, l=40, h=2, p=3, n=2, chunk_size=17, regime="stress"), arg="dt", t=3, poison="inf")
@example(case=SSDCase(b=1, l=40, h=2, p=3, n=2, chunk_size=17), arg="dt", t=3, poison="-inf")
@given(case=cases(max_l=120), arg=st.sampled_from(("x", "dt", "B", "C", "z")), t=positions,
       poison=st.sampled_from(tuple(POISONS)))
def test_nonfinite_propagates_as_the_loops(ssd_impl, case, arg, t, poison):
    check_nonfinite_propagation(ssd_impl, case, arg, t, poison)
