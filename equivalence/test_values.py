"""Every implementation against the float64 loop, in values and last_state, on drawn cases.

These run first (conftest.py orders values, then invariants, then gradients), and the drawn tests
before the pinned edge cases: hypothesis shrinks a drawn failure to a case that cannot be made
smaller, which is the one a kernel author should see first. The pinned cases (long sequences,
bfloat16, strides) are tests of their own, so they never pre-empt a drawn, shrunk failure.
"""

import pytest
from hypothesis import example, given

from .cases import PINNED, Case, cases
from .checks import check_values


@example(case=Case(b=1, d=1, n=1, l=1))  # the smallest case there is: nothing to shrink
@given(case=cases())
def test_values_and_last_state(impl, case):
    check_values(impl, case)


@given(case=cases(max_d=12, max_n=8, max_l=40, poison=True))
def test_non_finite_inputs_give_the_loops_pattern(impl, case):
    """inf, -inf or NaN in one element of u, delta, B, C, z, D, delta_bias or initial_state: every
    output is NaN, +inf, -inf or finite exactly where the loop's is (and within the policy elsewhere).
    n = 3 or 5 with inf in u is where a kernel's padded state lanes (B loaded as 0) turn inf into NaN."""
    check_values(impl, case)


@pytest.mark.parametrize("case", PINNED, ids=lambda c: c.id)
def test_pinned_edge_case(impl, case):
    check_values(impl, case)
