"""Mamba-2's SSD as the properties see it (equivalence/properties.py): its cases, inputs, calls,
tolerance terms and magnitudes, the options a failure is diagnosed over, and its packing.

impls' Family value names this module (``Family.equivalence``); nothing here is imported by
``import impls``. Letters as in impls/frontdoor.py: out is (b, l, h, p), the state (b, h, p, n).
The oracle is the SSD loop (impls/ssd/loop.py) run in float64.
"""

import sys

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

import impls
from impls.ssd.loop import effective_dt, per_head
from impls.ssd.recurrent import scan_by_stepping  # noqa: F401 (a step plugged in alone)

from .. import properties
from ..tolerance import GATE_ULPS, conditioning, dt_ulps, gradient_conditioning, ssd_terms
from . import planted_bugs, varlen_planted_bugs  # noqa: F401
from .cases import (CHUNK_SIZES, DT_LIMITS, DTYPES, PINNED, REGIMES, SCAN_ARGS, TIME_ARGS, SSDCase, cases,  # noqa: F401
                    make_inputs, reference_inputs)
from .varlen import PACKING, varlen_cases

NAME = "ssd"
Case = SSDCase
STATE_ARG = "initial_states"
Y_AXES = ("b", "l", "h", "p")

# What a failure is diagnosed over (equivalence/diagnose.py): each option with its "off" value,
# the group count that means ungrouped, the axis groups divide, the axes bisected, and the
# plainest dtype and regime.
OPTIONS = dict(D="none", z=False, dt_bias=False, softplus=False, dt_limit="default", extreme_dt=False,
               initial_states=False, strided=False)
UNGROUPED = (1,)
GROUPED_AXIS = "h"
AXES = ("b", "l", "h", "p", "n")
PLAIN = dict(dtype="f32", regime="mamba2")

# The tiny calls that probe a plain function's capabilities (equivalence/diagnose.py)
TINY = SSDCase(b=1, l=3, h=2, p=2, n=2, chunk_size=2)
PROBES = dict(grouped=SSDCase(b=1, l=3, h=4, p=2, n=2, g=2, chunk_size=2),
              initial_states=SSDCase(b=1, l=3, h=2, p=2, n=2, initial_states=True, chunk_size=2),
              D_hp=SSDCase(b=1, l=3, h=2, p=2, n=2, D="hp", chunk_size=2),
              dt_limit=SSDCase(b=1, l=3, h=2, p=2, n=2, dt_limit="tight", chunk_size=2))


def supported(entry, case):
    s = entry.supports
    return (case.torch_dtype in s["dtypes"] and (s["grouped"] or case.g == 1)
            and (s["initial_states"] or not case.initial_states) and (s["D_hp"] or case.D != "hp")
            and (s["dt_limit"] or case.dt_limit == "default"))


def scan(name, case, x, chunk_size=None):
    """(out, final_states) of impls.ssd_scan on inputs x, at the case's chunk size or ``chunk_size``."""
    return impls.ssd_scan(**x, chunk_size=chunk_size or case.chunk_size, return_final_states=True, impl=name)


def step(name, state, x, t):
    """Token t of inputs x through impls.ssd_state_update, advancing ``state``: y (b, h, p)."""
    return impls.ssd_state_update(
        state, x["x"][:, t], x["dt"][:, t], x["A"], x["B"][:, t], x["C"][:, t], x["D"],
        None if x["z"] is None else x["z"][:, t], x["dt_bias"], x["dt_softplus"], x["dt_limit"], impl=name)


def state_shape(case):
    return (case.b, case.h, case.p, case.n)


def call(name, case):
    """The public call on the case's inputs, as a Python expression (the reproduce line's)."""
    return (f"impls.ssd_scan(**equivalence.ssd.make_inputs(equivalence.ssd.{case!r}), "
            f"chunk_size={case.chunk_size}, return_final_states=True, impl={name!r})")


def positional(x, chunk_size=2):
    """Inputs x as the positional arguments of a registered scan (all sixteen, as ssd_scan passes
    them), return_final_states on."""
    return [x["x"], x["dt"], x["A"], x["B"], x["C"], chunk_size, x["D"], x["z"], x["dt_bias"], x["initial_states"],
            None, None, x["dt_softplus"], x["dt_limit"], True, False]


# Each summand of a gradient element is itself a product of up to eight rounded factors (dt, A,
# exp(dt A), the adjoint, a state, x, B or C, silu(z)'s derivative), formed in another order by
# another implementation: up to half an ulp each, 4 eps relative in all. Measured: the mapped
# `parallel`'s float64 dL/dA at l = n = p = 1, a single summand, one ulp from the loop's.
GRADIENT_TERM_ROUNDINGS = 4


def gradient_terms(case, arg):
    """Rounded terms accumulated into one element of the gradient of ``arg``: over the tokens whose
    adjoint reaches it (l) and what its element is shared by (the readout's n, a group's heads and
    channels, or every token and state of a head for A and dt_bias), plus the roundings inside each
    summand (GRADIENT_TERM_ROUNDINGS)."""
    b, l, p, n, hg = case.b, case.l, case.p, case.n, case.h // case.g
    summed = {"x": l + n, "z": l + n, "initial_states": l + n, "B": l + hg * p, "C": l + hg * p,
              "dt": l + p * n, "A": b * l * p * n, "dt_bias": b * l * p * n,
              "D": b * l * (p if case.D == "h" else 1)}[arg]
    return summed + GRADIENT_TERM_ROUNDINGS


def terms(case, output, arg=None):
    """Rounded terms per element (equivalence/tolerance.py) of "y", "state" or the "gradient" of arg."""
    if output == "gradient":
        return gradient_terms(case, arg)
    return ssd_terms("out" if output == "y" else "final_states", case.l, case.n)


def magnitudes(case, weights=None, x=None):
    """Sums of |terms| of each element of (out, final_states): the scale that a sound rounding error
    is relative to where the oracle's sums cancel (equivalence/tolerance.py).

    The recursion in float64 with every term made non-negative: h_t = exp(dt_t A) h_{t-1} +
    |dt_t x_t (x) B_t| from |initial_states|, y_t = <|C_t|, h_t> + |D x_t|, times |silu(z_t)|.

    weights: the (b, l, h, p) and (b, h, p, n) weights of the loss sum(w_out out) + sum(w_s
    final_states) whose gradients the check compares; with them, also {argument: sums of |summands|
    of each element of its gradient}: x, B, C, D, initial_states and z by autograd (the outputs are
    linear in each, with non-negative coefficients); A and dt from each token's decay term
    exp(dt_t A) lambda_t h_{t-1} (>= 0) and input term lambda_t x_t B_t by the chain rule with |A|
    and |dt|, so that no sign cancels; dt_bias the sum over b and l of dt's. lambda is the adjoint
    of the state. x: float64 inputs to take instead of the case's (then case may be None where no
    weights are given). Returns (out, final_states, that dict or None).
    """
    x = reference_inputs(case) if x is None else x
    (b, l, h, p), n, grad = x["x"].shape, x["B"].shape[-1], weights is not None
    raw = x["dt"] + (x["dt_bias"] if x["dt_bias"] is not None else 0)
    dt = effective_dt(x["dt"], x["dt_bias"], x["dt_softplus"], x["dt_limit"], torch.float64)   # (b, l, h)
    decay = torch.exp(dt * x["A"])
    leaves = {k: x[k].abs().requires_grad_(grad) for k in ("x", "B", "C", "D", "initial_states") if x[k] is not None}
    if x["z"] is not None:
        leaves["z"] = x["z"].clone().requires_grad_(grad)
    B, C = per_head(leaves["B"], h), per_head(leaves["C"], h)                                 # (b, l, h, n)
    inp = (dt.abs()[..., None] * leaves["x"])[..., None] * B[:, :, :, None, :]                 # (b, l, h, p, n)
    h0 = leaves.get("initial_states", torch.zeros(b, h, p, n, dtype=torch.float64))
    state, states = h0, []
    for t in range(l):
        state = decay[:, t, :, None, None] * state + inp[:, t]
        states.append(state)
    H = torch.stack(states, 1)                                                                 # (b, l, h, p, n)
    y = (H * C[:, :, :, None, :]).sum(-1)
    if "D" in leaves:
        y = y + (leaves["D"][:, None] if leaves["D"].dim() == 1 else leaves["D"]) * leaves["x"]
    if "z" in leaves:
        y = y * F.silu(leaves["z"]).abs()
    if not grad:
        return y, state, None
    loss = (y * weights[0].abs()).sum() + (H[:, -1] * weights[1].abs()).sum()
    grads = torch.autograd.grad(loss, [inp, *leaves.values()])
    lam = grads[0]                                                                             # dL/dh_t
    sums = {k: g.abs() for k, g in zip(leaves, grads[1:])}
    previous = torch.cat([h0[:, None], H[:, :-1]], 1).detach()                                 # h_{t-1}
    decay_terms = (decay[..., None, None] * lam * previous).sum((-1, -2))                      # (b, l, h)
    input_terms = ((lam * B[:, :, :, None, :].detach()).sum(-1) * x["x"].abs()).sum(-1)        # (b, l, h)
    sums["A"] = (dt.abs() * decay_terms).sum((0, 1))
    # softplus' derivative, 1 above its threshold (20) where softplus is the identity
    dsoftplus = torch.where(raw > 20, 1.0, torch.sigmoid(raw)) if x["dt_softplus"] else torch.ones_like(raw)
    sums["dt"] = dsoftplus * (x["A"].abs() * decay_terms + input_terms)
    # Chunked kernels take A's and dt's gradients through the cumulative sums cs of dt A: dL/d(dt_t A)
    # = sum_{s >= t} dL/dcs_s, a reverse cumulative sum. Each dL/dcs_s is a signed sum of the pair terms
    # (output or final state u, input v) that end at s (P_s) or start there (N_s), so its rounding is
    # relative to M_t = sum_{s >= t} (P_s + N_s): pairs that lie after t cancel there exactly, but
    # their roundings do not, where the loop's formula sums only the pairs that cross t. The reverse
    # sum and each summand's roundings give eps (l + GRADIENT_TERM_ROUNDINGS) M_t, folded into the
    # scale so that the policy's eps (terms + conditioning) scale carries it. Measured: the Triton
    # kernel's float64 dA with dt up to 100, 45 000 ulps from the loop's, under 1e-3 of this term.
    gate = F.silu(x["z"]).abs() if x["z"] is not None else 1.0
    ends = ((H * C[:, :, :, None, :]).sum(-1).detach() * weights[0].abs() * gate).sum(-1)        # P (b, l, h)
    ends[:, -1] += (H[:, -1].detach() * weights[1].abs()).sum((-1, -2))
    M = (ends + dt.abs() * input_terms).flip(1).cumsum(1).flip(1)                              # (b, l, h)
    g = conditionings(case, x)[2]
    fold = {k: (l + GRADIENT_TERM_ROUNDINGS) / (gradient_terms(case, k) + g) for k in ("A", "dt")}
    sums["A"] = sums["A"] + fold["A"] * (dt.abs() * M).sum((0, 1))
    sums["dt"] = sums["dt"] + fold["dt"] * dsoftplus * x["A"].abs() * M
    if x["dt_bias"] is not None:
        sums["dt_bias"] = sums["dt"].sum((0, 1))
    return y.detach(), H[:, -1].detach(), sums


def conditionings(case, x=None):
    """Ulps a rounding can grow to (equivalence/tolerance.py: conditioning) for each element of
    out (b, l, h, p) and final_states (b, h, p, n), and for every gradient element (a number);
    x as in magnitudes."""
    x = reference_inputs(case) if x is None else x
    raw = x["dt"] + (x["dt_bias"] if x["dt_bias"] is not None else 0)
    dt = effective_dt(x["dt"], x["dt_bias"], x["dt_softplus"], x["dt_limit"], torch.float64)   # (b, l, h)
    cum = conditioning(dt * x["A"], dt_ulps(raw, x["dt_softplus"], x["dt_bias"] is not None), 1)
    gate = GATE_ULPS if x["z"] is not None else 0
    last = cum[:, -1]
    out = (cum + gate)[..., None].expand(case.b, case.l, case.h, case.p)
    return (out, last[:, :, None, None].expand(case.b, case.h, case.p, case.n),
            gradient_conditioning(last, x["z"] is not None))


# What each property test draws (equivalence/test_*.py), smallest first when shrunk
STRATEGIES = dict(
    values=cases(), split=cases(), causality=cases(), decode=cases(max_l=80), batch=cases(min_b=2),
    nonfinite=cases(max_l=120), gradients=cases(dtypes=("f32", "f64"), max_h=6, max_p=8, max_n=8, max_l=64),
    chunk_sizes=cases(max_l=300),
    # at most two chunks: an interpreted Triton kernel's cost grows with the chunks
    properties=cases(max_b=2, max_l=8, max_h=2, max_p=3, max_n=4, chunk_sizes=(4, 17)),
    magnitudes=cases(dtypes=("f64",), max_h=4, max_p=4, max_n=4, max_l=30),
    # smaller than the suite's (the planted scan is a Python loop over chunks): still every option,
    # several chunks of the chunk sizes 1, 2 and 17, and l not a multiple of them
    planted=cases(max_b=2, max_l=80, max_h=6, max_p=4, max_n=8), planted_positions=st.integers(0, 80),
    packed=varlen_cases(), packed_gradients=varlen_cases(dtypes=("f32", "f64"), max_total=40),
    packed_decoding=varlen_cases(max_total=40),
    packed_planted=varlen_cases(chunk=varlen_planted_bugs.CHUNK, dtypes=("f32", "f64"), max_h=2, max_p=3, max_n=3,
                                max_seqs=4, max_total=40),
)
# The long and edge cases of the invariants, each family's in a test of its own (an @example is
# never shrunk, so it must not pre-empt a drawn failure)
PINNED_INVARIANTS = dict(
    split=[(SSDCase(b=2, l=300, h=4, p=3, n=5, g=2, regime="slow", initial_states=True, chunk_size=64), 129),
           (SSDCase(b=1, l=100, h=2, p=2, n=3, dtype="bf16", D="hp", chunk_size=17), 17)],
    decode=[(SSDCase(b=2, l=40, h=4, p=3, n=5, g=2, dtype="bf16", D="hp", initial_states=True, seed=1), 17),
            (SSDCase(b=1, l=30, h=2, p=4, n=3, dt_limit="tight", extreme_dt=True, seed=2), 0)],
    causality=[(SSDCase(b=1, l=300, h=3, p=2, n=2, regime="stress", chunk_size=64), 257),
               (SSDCase(b=1, l=64, h=2, p=2, n=2, chunk_size=64), 33)],
    nonfinite=[(SSDCase(b=1, l=40, h=2, p=3, n=2, chunk_size=17), "x", 20, "nan"),
               (SSDCase(b=1, l=40, h=2, p=3, n=2, chunk_size=17), "x", 20, "inf"),
               (SSDCase(b=1, l=40, h=2, p=3, n=2, chunk_size=17), "B", 20, "nan"),
               (SSDCase(b=1, l=40, h=2, p=3, n=2, chunk_size=17), "dt", 20, "nan"),
               (SSDCase(b=1, l=40, h=2, p=3, n=2, chunk_size=17, regime="stress"), "dt", 3, "inf"),
               (SSDCase(b=1, l=40, h=2, p=3, n=2, chunk_size=17), "dt", 3, "-inf")],
    nan=[(SSDCase(b=1, l=1, h=1, p=1, n=1), 0), (SSDCase(b=1, l=40, h=2, p=3, n=2, chunk_size=17), 20)],
    gradients=[SSDCase(b=2, l=70, h=4, p=3, n=5, g=2, regime="stress", D="hp", initial_states=True, chunk_size=17, seed=7),
               SSDCase(b=1, l=40, h=2, p=2, n=3, dt_limit="tight", extreme_dt=True, chunk_size=2, seed=8)],
    chunk_sizes=[SSDCase(b=2, l=257, h=4, p=5, n=8, g=2, regime="stress", initial_states=True, seed=1),
                 SSDCase(b=1, l=300, h=3, p=3, n=4, g=1, regime="slow", dtype="f64", seed=2)],
    # measured on the Triton SSD kernel before its fix: a NaN in x or dt at token 9 moved tokens 0-8
    # of its chunk (one tile of the interpreter's 16 positions) by an ulp, where loop and chunked did not
    nonfinite_causality=[(SSDCase(b=1, l=12, h=2, p=3, n=2, chunk_size=17), 9, "nan"),
                         (SSDCase(b=1, l=12, h=2, p=3, n=2, chunk_size=17), 9, "inf")],
)
# The size the planted-bug search folds each drawn case to for the four properties of properties.py
PLANTED_SMALL = dict(b=2, l=24, h=4, p=4, n=6)



# The properties with this family bound, for the tests of one implementation or one adapter:
# check_values(name, case), oracle(case), ... (equivalence/properties.py has them over any family)
FAMILY = properties.complete(sys.modules[__name__])
globals().update(properties.bound(FAMILY))
check_step_equals_scan = check_prefill_then_decode  # noqa: F821 (bound just above)
