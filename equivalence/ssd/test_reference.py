"""The SSD spec checked in float64 against two independent derivations:

- the Mamba-1 loop (impls/selective/loop.py) through the exact mapping d = h p (impls/ssd/mapped.py): each
  SSD head is p Mamba-1 channels sharing one A and one dt, B and C as g groups of channels;
- the closed form of the paper (Dao & Gu 2024, Section 3: y = M x with M = L o (C B^T), L the
  1-semiseparable matrix of cumulative decays), written here with einsum over the whole sequence:
  no recurrence and no chunks, every operation in another order.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given

import impls
from impls.ssd.mapped import to_selective

from ..reference import window_sums
from ..tolerance import assert_close, ssd_terms
from . import SSDCase, cases, reference_inputs, scales

pytestmark = pytest.mark.family("ssd")


def closed_form(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, dt_softplus=False,
                dt_limit=(0.0, float("inf"))):
    """Float64 SSD in its matrix ("attention") form. x: (b, l, h, p) ... as impls.ssd_scan.
    Returns (out (b, l, h, p), final_states (b, h, p, n))."""
    b, l, h, p = x.shape
    g = B.shape[2]
    dt = dt.double() + (dt_bias.double() if dt_bias is not None else 0)
    dt = (F.softplus(dt) if dt_softplus else dt).clamp(*dt_limit)              # (b, l, h)
    a = (dt * A.double()).transpose(1, 2)                                       # (b, h, l)
    causal = torch.tril(torch.ones(l, l, dtype=torch.bool))
    L = torch.where(causal, torch.exp(window_sums(a)), torch.zeros((), dtype=torch.float64))  # (b, h, t, s)
    Bh = B.double().repeat_interleave(h // g, dim=2)                            # (b, l, h, n)
    Ch = C.double().repeat_interleave(h // g, dim=2)
    M = L * torch.einsum("bthn,bshn->bhts", Ch, Bh)                             # (b, h, t, s)
    y = torch.einsum("bhts,bsh,bshp->bthp", M, dt, x.double())
    states = torch.einsum("bhs,bsh,bshp,bshn->bhpn", L[:, :, -1], dt, x.double(), Bh)
    if initial_states is not None:
        from_start = torch.exp(torch.cumsum(a, -1))                             # (b, h, t)
        y = y + torch.einsum("bht,bthn,bhpn->bthp", from_start, Ch, initial_states.double())
        states = states + from_start[:, :, -1, None, None] * initial_states.double()
    if D is not None:
        y = y + (D.double()[:, None] if D.dim() == 1 else D.double()) * x.double()
    if z is not None:
        y = y * F.silu(z.double())
    return y, states


def _loop(case):
    return impls.ssd_scan(**reference_inputs(case), chunk_size=1, return_final_states=True, impl="loop")


def _float64(case):
    return case.__class__(**{**case.__dict__, "dtype": "f64"})


@example(case=SSDCase(b=1, l=1, h=1, p=1, n=1, dtype="f64"))
@example(case=SSDCase(b=2, l=50, h=6, p=3, n=4, g=3, dtype="f64", D="hp", initial_states=True, extreme_dt=True))
@given(case=cases(dtypes=("f64",), max_l=60).map(_float64))
def test_loop_equals_mamba1_loop_through_the_mapping(case):
    x = reference_inputs(case)
    out, final = _loop(case)
    args = to_selective(x["x"], x["dt"], x["A"], x["B"], x["C"], x["D"], x["z"], x["dt_bias"],
                        x["initial_states"], x["dt_softplus"], x["dt_limit"])
    y1, last1 = impls.selective_scan(**args, return_last_state=True, impl="loop")
    b, l, h, p = x["x"].shape
    # the same arithmetic in the same order: equal to the last bit but for the readout's summation
    assert_close("out", out, y1.movedim(-1, 1).reshape(b, l, h, p), length=ssd_terms("out", l, case.n))
    assert_close("final_states", final, last1.reshape(b, h, p, -1), length=ssd_terms("final_states", l, case.n))


@example(case=SSDCase(b=1, l=1, h=1, p=1, n=1, dtype="f64"))
@example(case=SSDCase(b=2, l=64, h=4, p=2, n=3, g=2, dtype="f64", regime="slow", initial_states=True))
@given(case=cases(dtypes=("f64",), max_l=60).map(_float64))
def test_loop_equals_closed_form(case):
    x = reference_inputs(case)
    out, final = _loop(case)
    y2, last2 = closed_form(**x)
    so, ss = scales(case)[:2]   # sums of |terms| (its conditionings, the last two, are not needed here)
    assert_close("out", out, y2, length=ssd_terms("out", case.l, case.n), scale=so)
    assert_close("final_states", final, last2, length=ssd_terms("final_states", case.l, case.n), scale=ss)
