"""The Mamba-1 spec itself: the float64 loop against an independent closed-form evaluation
(equivalence/reference.py). The SSD's is equivalence/ssd/test_reference.py."""

import pytest
import torch
from hypothesis import example, given

from impls import selective_scan

from ..reference import quadratic_form_scan
from ..tolerance import assert_close, terms
from . import Case, cases, reference_inputs

pytestmark = pytest.mark.family("selective")


@example(case=Case(b=1, d=1, n=1, l=1))
@example(case=Case(b=2, d=6, n=4, l=120, g=3, regime="stress", initial_state=True))
@given(case=cases(max_d=12, max_n=8, max_l=120))
def test_loop_matches_closed_form(case):
    x = reference_inputs(case)
    y, state = selective_scan(**x, return_last_state=True, impl="loop")
    y_ref, state_ref = quadratic_form_scan(**x)
    assert_close("loop y", y, y_ref, None, terms("y", case.l, case.n), repr(case))
    assert_close("loop last_state", state, state_ref, None, terms("last_state", case.l, case.n), repr(case))


def test_closed_form_on_a_hand_computed_case():
    # One channel, one state, A = -1, dt = 1 (no softplus), u = B = C = 1, h0 = 0:
    # h_1 = 1, h_2 = e^-1 + 1, y = h. Independent of any code in this project.
    ones = torch.ones(1, 1, 2, dtype=torch.float64)
    args = (ones, ones, -torch.ones(1, 1, dtype=torch.float64), ones, ones)
    expected = torch.tensor([[[1.0, 1.0 + torch.e ** -1]]], dtype=torch.float64)
    for y in (quadratic_form_scan(*args)[0], selective_scan(*args, impl="loop"),
              selective_scan(*args, impl="recurrent")):
        torch.testing.assert_close(y, expected, rtol=0, atol=1e-15)
