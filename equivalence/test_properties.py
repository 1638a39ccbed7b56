"""Determinism, batch invariance, unwritten memory and causality under non-finite inputs, for
both families: each property is written once (equivalence/properties.py) and run here on the
implementations of each family. The cases are small: none of these needs a long sequence, and
Triton's interpreter runs every call."""

from hypothesis import example, given, settings
from hypothesis import strategies as st

from . import cases as selective_cases
from . import ssd_cases
from .properties import (NONFINITE, SELECTIVE, SSD, check_batch_invariance, check_determinism,
                         check_nonfinite_causality, check_unwritten_memory)

CASES = selective_cases.cases(max_b=2, max_d=4, max_n=4, max_l=8)
# at most two chunks: an interpreted Triton kernel's cost grows with the chunks
SSD_CASES = ssd_cases.cases(max_b=2, max_l=8, max_h=2, max_p=3, max_n=4, chunk_sizes=(4, 17))
rows = st.integers(0, 2)
positions = st.integers(0, 8)   # folded to the case's length by the check
poisons = st.sampled_from(tuple(NONFINITE))
# A quarter of the profile's examples: a draw costs two to six calls, two of them with a backward,
# each about 0.4 s (forward) to 1.5 s (with the backward) for a Triton kernel in its interpreter
FEW = settings(max_examples=max(6, settings().max_examples // 4))


@FEW
@given(case=CASES)
def test_deterministic(deterministic_impl, case):
    check_determinism(SELECTIVE, deterministic_impl, case)


@FEW
@given(case=SSD_CASES)
def test_ssd_deterministic(ssd_deterministic_impl, case):
    check_determinism(SSD, ssd_deterministic_impl, case)


@FEW
@given(case=CASES, i=rows)
def test_batch_invariant(impl, case, i):
    check_batch_invariance(SELECTIVE, impl, case, i)


@FEW
@given(case=SSD_CASES, i=rows)
def test_ssd_batch_invariant(ssd_impl, case, i):
    check_batch_invariance(SSD, ssd_impl, case, i)


@FEW
@given(case=CASES)
def test_no_unwritten_memory(impl, case):
    check_unwritten_memory(SELECTIVE, impl, case)


@FEW
@given(case=SSD_CASES)
def test_ssd_no_unwritten_memory(ssd_impl, case):
    check_unwritten_memory(SSD, ssd_impl, case)


@FEW
@given(case=CASES, t=positions, poison=poisons)
def test_nonfinite_input_changes_no_earlier_output(impl, case, t, poison):
    check_nonfinite_causality(SELECTIVE, impl, case, t, poison)


# Measured on the Triton SSD kernel before its fix: a NaN in x or dt at token 9 moved tokens 0-8 of
# its chunk (one tile of the interpreter's 16 positions) by an ulp, where loop and chunked did not.
@example(case=ssd_cases.SSDCase(b=1, l=12, h=2, p=3, n=2, chunk_size=17), t=9, poison="nan")
@example(case=ssd_cases.SSDCase(b=1, l=12, h=2, p=3, n=2, chunk_size=17), t=9, poison="inf")
@FEW
@given(case=SSD_CASES, t=positions, poison=poisons)
def test_ssd_nonfinite_input_changes_no_earlier_output(ssd_impl, case, t, poison):
    check_nonfinite_causality(SSD, ssd_impl, case, t, poison)
