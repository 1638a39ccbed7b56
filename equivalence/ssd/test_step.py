"""The SSD decoding step's own call forms: the official "tied" form is the same step, and one that
varies is refused (the step against the scan is equivalence/test_invariants.py's, for every family)."""

import pytest
import torch

import impls

from . import SSDCase, make_inputs

pytestmark = pytest.mark.family("ssd")


def _step_args(case):
    x = make_inputs(case)
    return dict(x=x["x"][:, 0], dt=x["dt"][:, 0], A=x["A"], B=x["B"][:, 0], C=x["C"][:, 0], D=x["D"],
                z=x["z"][:, 0], dt_bias=x["dt_bias"], dt_softplus=True, dt_limit=x["dt_limit"]), x["initial_states"]


def test_tied_form_is_the_same_step(ssd_stepping_impl):
    """The official Mamba2.step's call: A (h, p, n), dt (b, h, p), dt_bias (h, p), broadcast with
    zero strides; the same output and state as the untied call."""
    case = SSDCase(b=2, l=1, h=4, p=3, n=5, g=2, D="hp", initial_states=True, seed=9)
    args, h0 = _step_args(case)
    b, h, p, n = h0.shape
    tied = dict(args, A=args["A"][:, None, None].expand(h, p, n), dt=args["dt"][..., None].expand(b, h, p),
                dt_bias=args["dt_bias"][:, None].expand(h, p))
    s1, s2 = h0.clone(), h0.clone()
    y1 = impls.ssd_state_update(s1, **args, impl=ssd_stepping_impl)
    y2 = impls.ssd_state_update(s2, **tied, impl=ssd_stepping_impl)
    assert torch.equal(y1, y2) and torch.equal(s1, s2)
    assert not torch.equal(s1, h0)  # the step did advance the state


def test_tied_form_that_varies_is_refused_and_state_untouched():
    case = SSDCase(b=2, l=1, h=4, p=3, n=5, initial_states=True, seed=9)
    args, h0 = _step_args(case)
    state = h0.clone()
    A = torch.randn(4, 3, 5).abs().neg()  # a genuinely per-channel A: not an SSD model
    with pytest.raises(ValueError, match="A.*tied form"):
        impls.ssd_state_update(state, **dict(args, A=A), impl="recurrent")
    assert torch.equal(state, h0)
