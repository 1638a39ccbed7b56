"""Every implementation against the float64 loop, in values and last_state, on drawn cases.

These run first (conftest.py orders values, then invariants, then gradients), and the drawn tests
before the pinned edge cases: hypothesis shrinks a drawn failure to a case that cannot be made
smaller, which is the one a kernel author should see first. The pinned cases (long sequences,
bfloat16, strides) are tests of their own, so they never pre-empt a drawn, shrunk failure.
"""

import pytest
import torch
from hypothesis import example, given

import impls
from .cases import PINNED, SMALLEST, Case, cases, make_inputs
from .checks import check_prefill_then_decode, check_values


@example(case=SMALLEST)  # the plainest case there is: nothing to shrink
@given(case=cases())
def test_values_and_last_state(impl, case):
    check_values(impl, case)


@given(case=cases(max_d=12, max_n=8, max_l=40, poison=True))
def test_non_finite_inputs_give_the_loops_pattern(impl, case):
    """inf, -inf or NaN in one element of u, delta, B, C, z, D, delta_bias or initial_state: every
    output is NaN, +inf, -inf or finite exactly where the loop's is (and within the policy elsewhere).
    n = 3 or 5 with inf in u is where a kernel's padded state lanes (B loaded as 0) turn inf into NaN."""
    if not impls.get(impl).supports["nonfinite_inputs"]:
        pytest.skip(f"{impl}: declared gap: non-finite inputs")
    check_values(impl, case)


def test_mambapy_turns_an_inf_state_into_nan_where_decays_underflow():
    """The declared gap of mambapy, pinned: its pscan multiplies the decays of several steps (an
    underflow to 0 under strong decay) before applying them to an inf state, 0 x inf = NaN; the
    loop applies them one by one and stays inf."""
    if "mambapy" not in impls.names():
        pytest.skip("mambapy not installed")
    case = Case(b=1, d=1, n=1, l=7, regime="stress", D=False, z=False, delta_bias=False, softplus=False,
                seed=0, poison=("u", 0, "inf"))
    y, _ = impls.selective_scan(**make_inputs(case), return_last_state=True, impl="mambapy")
    y_loop, _ = impls.selective_scan(**make_inputs(case), return_last_state=True, impl="loop")
    assert torch.isinf(y_loop).all() and torch.isnan(y[0, 0, -1])


@pytest.mark.parametrize("case", PINNED, ids=lambda c: c.id)
def test_pinned_edge_case(impl, case):
    check_values(impl, case)


# inf in u where the loop's outputs are +-inf, not NaN (seeds chosen so: every B_j C_j of the
# channel has one sign), with n = 3 and 5: a kernel's padded state lanes (B loaded as 0) would
# compute inf * 0 = NaN and sum it into the readout. Drawn cases reach this only now and then.
PADDED_LANES = (
    Case(b=1, d=2, n=3, l=3, D=False, z=False, delta_bias=False, softplus=False, poison=("u", 0, "inf"), seed=7),
    Case(b=1, d=2, n=5, l=1, D=False, z=False, delta_bias=False, softplus=False, poison=("u", 0, "inf"), seed=10),
)


@pytest.mark.parametrize("case", PADDED_LANES, ids=lambda c: c.id)
def test_pinned_inf_input_stays_inf_at_odd_n(impl, case):
    check_values(impl, case)


@pytest.mark.parametrize("case", PADDED_LANES, ids=lambda c: c.id)
def test_pinned_inf_input_stays_inf_at_odd_n_by_steps(stepping_impl, case):
    """The same through the decoding step, one token at a time from the start."""
    check_prefill_then_decode(stepping_impl, case, 0)
