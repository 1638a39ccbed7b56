"""Mamba-1's own value tests: a non-finite value in any input (D, delta_bias and initial_state
included, as Case.poison), the padded state lanes a kernel may have, and mambapy's declared gap.
The values of every family are equivalence/test_values.py."""

import pytest
import torch
from hypothesis import given

import impls

from ..properties import check_prefill_then_decode, check_values
from . import Case, cases, make_inputs

pytestmark = pytest.mark.family("selective")


@given(case=cases(max_d=12, max_n=8, max_l=40, poison=True))
def test_non_finite_inputs_give_the_loops_pattern(family, nonfinite_impl, case):
    """inf, -inf or NaN in one element of u, delta, B, C, z, D, delta_bias or initial_state: every
    output is NaN, +inf, -inf or finite exactly where the loop's is (and within the policy elsewhere).
    n = 3 or 5 with inf in u is where a kernel's padded state lanes (B loaded as 0) turn inf into NaN."""
    check_values(family, nonfinite_impl, case)


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


# inf in u where the loop's outputs are +-inf, not NaN (seeds chosen so: every B_j C_j of the
# channel has one sign), with n = 3 and 5: a kernel's padded state lanes (B loaded as 0) would
# compute inf * 0 = NaN and sum it into the readout. Drawn cases reach this only now and then.
PADDED_LANES = (
    Case(b=1, d=2, n=3, l=3, D=False, z=False, delta_bias=False, softplus=False, poison=("u", 0, "inf"), seed=7),
    Case(b=1, d=2, n=5, l=1, D=False, z=False, delta_bias=False, softplus=False, poison=("u", 0, "inf"), seed=10),
)


@pytest.mark.parametrize("case", PADDED_LANES, ids=lambda c: c.id)
def test_pinned_inf_input_stays_inf_at_odd_n(family, impl, case):
    check_values(family, impl, case)


@pytest.mark.parametrize("case", PADDED_LANES, ids=lambda c: c.id)
def test_pinned_inf_input_stays_inf_at_odd_n_by_steps(family, stepping_impl, case):
    """The same through the decoding step, one token at a time from the start."""
    check_prefill_then_decode(family, stepping_impl, case, 0)
