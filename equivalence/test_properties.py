"""Determinism, batch invariance, unwritten memory and causality under non-finite inputs, for every
family: each property is written once (equivalence/properties.py) and run here on the
implementations of each family. The cases are small: none of these needs a long sequence, and
Triton's interpreter runs every call."""

from hypothesis import given, settings
from hypothesis import strategies as st

from .properties import (NONFINITE, check_batch_invariance, check_determinism, check_nonfinite_causality,
                         check_unwritten_memory)

rows = st.integers(0, 2)
positions = st.integers(0, 8)   # folded to the case's length by the check
poisons = st.sampled_from(tuple(NONFINITE))
# A quarter of the profile's examples: a draw costs two to six calls, two of them with a backward,
# each about 0.4 s (forward) to 1.5 s (with the backward) for a Triton kernel in its interpreter
FEW = settings(max_examples=max(6, settings().max_examples // 4))


def small(data, family):
    return data.draw(family.STRATEGIES["properties"], label="case")


@FEW
@given(data=st.data())
def test_deterministic(family, deterministic_impl, data):
    check_determinism(family, deterministic_impl, small(data, family))


@FEW
@given(data=st.data(), i=rows)
def test_batch_invariant(family, impl, data, i):
    check_batch_invariance(family, impl, small(data, family), i)


@FEW
@given(data=st.data())
def test_no_unwritten_memory(family, impl, data):
    check_unwritten_memory(family, impl, small(data, family))


@FEW
@given(data=st.data(), t=positions, poison=poisons)
def test_nonfinite_input_changes_no_earlier_output(family, impl, data, t, poison):
    check_nonfinite_causality(family, impl, small(data, family), t, poison)


def test_pinned_nonfinite_input_changes_no_earlier_output(family, impl):
    for case, t, poison in family.PINNED_INVARIANTS.get("nonfinite_causality", ()):
        check_nonfinite_causality(family, impl, case, t, poison)
