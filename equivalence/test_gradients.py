"""Gradients for every tensor input against float64 autograd through the loop."""

import dataclasses

from hypothesis import example, given

from .cases import SMALLEST, Case, cases
from .checks import check_gradients


@example(case=dataclasses.replace(SMALLEST, dtype="f64"))
@given(case=cases(dtypes=("f32", "f64"), max_d=12, max_n=8, max_l=64))
def test_gradients_match_float64_loop(gradient_impl, case):
    check_gradients(gradient_impl, case)


def test_pinned_gradients_grouped_stress_70(gradient_impl):
    """A long grouped case from an initial state, as a test of its own (never pre-empting a drawn one)."""
    check_gradients(gradient_impl, Case(b=2, d=6, n=3, l=70, g=3, regime="stress", initial_state=True, seed=7))
