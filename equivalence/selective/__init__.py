"""Mamba-1's selective scan as the properties see it (equivalence/properties.py): its cases, inputs,
calls, tolerance terms and magnitudes, the options a failure is diagnosed over, and its packing.

impls' Family value names this module (``Family.equivalence``); nothing here is imported by
``import impls``. Letters as in impls/frontdoor.py: y is (b, d, l), the state (b, d, n).
"""

import sys

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

import impls
from impls.frontdoor import per_channel
from impls.selective.recurrent import scan_by_stepping  # noqa: F401 (a step plugged in alone)

from .. import properties
from ..varlen import abs_leaves, adjoints
from ..tolerance import GATE_ULPS, conditioning, dt_ulps, gradient_conditioning
from ..tolerance import terms as rounded_terms
from . import planted_bugs, varlen_planted_bugs  # noqa: F401
from .cases import (DTYPES, EDGE_REGIMES, NONFINITE, PINNED, REGIMES, SCAN_ARGS, SMALLEST, Case, cases,  # noqa: F401
                    make_inputs, reference_inputs)
from .varlen import PACKING, decay_sums, varlen_cases

NAME = "selective"
TIME_ARGS = ("u", "delta", "z", "B", "C")   # the arguments with a time axis (last)
TIME_DIM = -1
Y_AXES = ("b", "d", "l")

# What a failure is diagnosed over (equivalence/diagnose.py): each option with its "off" value,
# the group count(s) that mean ungrouped (0: B (b, n, l); 1: one group), the axis groups divide,
# the axes bisected, and the plainest dtype and regime.
OPTIONS = dict(D=False, z=False, delta_bias=False, softplus=False, initial_state=False, strided=False)
UNGROUPED = (0, 1)
GROUPED_AXIS = "d"
AXES = ("b", "d", "n", "l")
PLAIN = dict(dtype="f32", regime="mamba")

# The tiny calls that probe a plain function's capabilities (equivalence/diagnose.py)
TINY = Case(b=1, d=2, n=2, l=3)
PROBES = dict(grouped=Case(b=1, d=4, n=2, l=3, g=2), initial_state=Case(b=1, d=2, n=2, l=3, initial_state=True))


def supported(entry, case):
    s = entry.supports
    return case.torch_dtype in s["dtypes"] and (s["grouped"] or not case.g) and (s["initial_state"] or not case.initial_state)


def scan(name, case, x, **kw):
    """(y, last_state) of impls.selective_scan on inputs x."""
    return impls.selective_scan(**x, return_last_state=True, impl=name)


def step(name, state, x, t):
    """Token t of inputs x through impls.selective_state_update, advancing ``state``: y (b, d)."""
    return impls.selective_state_update(
        state, x["u"][..., t], x["delta"][..., t], x["A"], x["B"][..., t], x["C"][..., t], x["D"],
        None if x["z"] is None else x["z"][..., t], x["delta_bias"], x["delta_softplus"], impl=name)


def state_shape(case):
    return (case.b, case.d, case.n)


def call(name, case):
    """The public call on the case's inputs, as a Python expression (the reproduce line's)."""
    return (f"impls.selective_scan(**equivalence.selective.make_inputs(equivalence.selective.{case!r}), "
            f"return_last_state=True, impl={name!r})")


def positional(x):
    """Inputs x as the positional arguments of a registered scan, return_last_state on."""
    return [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "initial_state")] + [True]


def terms(case, output, arg=None):
    """Rounded terms per element (equivalence/tolerance.py) of "y", "state" or a "gradient": the
    most a gradient element accumulates is over batch, time and channels or states."""
    if output == "gradient":
        return case.b * case.l * (case.d // max(case.g, 1) + case.n)
    return rounded_terms("y" if output == "y" else "last_state", case.l, case.n)


def exact_kinds(case):
    """Whether NaN, +inf and -inf must match the loop's kind for kind: not where the case's poison
    makes a step's dt -inf, so its decay exp(dt A) is +inf (A < 0): which non-finite value that
    gives is order-dependent."""
    infinite_decay = (bool(case.poison) and case.poison[0] in ("delta", "delta_bias") and case.poison[2] == "-inf"
                      and not case.softplus)
    return not infinite_decay


def magnitudes(case, weights=None, x=None):
    """Sums of |terms|: the scale a sound rounding error is relative to where the oracle's sums
    cancel (equivalence/tolerance.py).

    The scan's recursion in float64 with every term made non-negative: h_t = Ā_t h_{t-1} + |dt_t B_t u_t|
    from |initial_state| (the decays Ā = exp(dt A) are positive already), y_t = <|C_t|, h_t> + |D u_t|,
    times |silu(z_t)|: each element of (y, last_state) is the sum of the |terms| that the oracle's
    element sums. Written out here rather than run through the loop because the gradients need its
    states and adjoints, not only its outputs.

    weights: the (b, d, l) and (b, d, n) weights of the loss sum(w_y y) + sum(w_s last_state) whose
    gradients the check compares; with them, also {argument: sum of |summands| of its gradient},
    from this run's adjoint lambda (with |weights|): u, B, C, D, initial_state, z by autograd (the
    outputs are linear in each, with non-negative coefficients); A and delta from each step's decay
    term Ā_t lambda_t h_{t-1} (>= 0) by the chain rule, with |A| and |dt| so that no sign cancels;
    delta_bias the sum over b and l of delta's. x: float64 inputs to take instead of the case's.
    Returns (y, last_state, that dict or None).
    """
    x = reference_inputs(case) if x is None else x
    d = x["u"].shape[1]
    raw = x["delta"] if x["delta_bias"] is None else x["delta"] + x["delta_bias"][:, None]
    dt = F.softplus(raw) if x["delta_softplus"] else raw                         # (b, d, l)

    def time_last(X):  # B, C (b, n, l) or (b, g, n, l) -> (b, d or 1, l, n)
        return (per_channel(X, d) if X.dim() == 4 else X[:, None]).transpose(-1, -2)

    leaves = abs_leaves(x, ("u", "B", "C", "D", "initial_state"), weights is not None)
    decay = torch.exp(dt[..., None] * x["A"][:, None, :])                         # (b, d, l, n)
    B = time_last(leaves["B"])
    X = (dt.abs() * leaves["u"])[..., None] * B                                  # |dt B u|
    h = h0 = leaves.get("initial_state", torch.zeros_like(decay[:, :, 0]))
    states = []
    for t in range(decay.shape[2]):
        h = decay[:, :, t] * h + X[:, :, t]
        states.append(h)
    H = torch.stack(states, 2)                                                    # (b, d, l, n)
    y = (H * time_last(leaves["C"])).sum(-1)
    if "D" in leaves:
        y = y + leaves["D"][:, None] * leaves["u"]
    if "z" in leaves:
        y = y * F.silu(leaves["z"]).abs()
    last = H[:, :, -1]
    if weights is None:
        return y, last, None

    lam, sums = adjoints(y, last, weights, X, leaves)                     # lambda: dL/dh_t (b, d, l, n)
    previous = torch.cat([h0[:, :, None], H[:, :, :-1]], 2)                      # h_{t-1}
    sums.update(decay_sums(x, raw, dt, decay, lam, previous, B))
    return y.detach(), last.detach(), sums


def conditionings(case, x=None):
    """Ulps a rounding can grow to (equivalence/tolerance.py: conditioning) for each element of
    y (b, d, l) and last_state (b, d, n), and for every gradient element (a number: the whole
    sequence's, forwards and through the adjoint); x as in magnitudes."""
    x = reference_inputs(case) if x is None else x
    raw = x["delta"] if x["delta_bias"] is None else x["delta"] + x["delta_bias"][:, None]
    dt = F.softplus(raw) if x["delta_softplus"] else raw                          # (b, d, l)
    dt_rel = dt_ulps(raw, x["delta_softplus"], x["delta_bias"] is not None)[..., None]
    cum = conditioning(dt[..., None] * x["A"][:, None, :], dt_rel, 2)             # (b, d, l, n)
    gate = GATE_ULPS if x["z"] is not None else 0
    last = cum[:, :, -1]
    return cum.amax(-1) + gate, last, gradient_conditioning(last, x["z"] is not None)


# What each property test draws (equivalence/test_*.py), smallest first when shrunk
STRATEGIES = dict(
    values=cases(), split=cases(), causality=cases(), decode=cases(max_l=120), batch=cases(min_b=2),
    nonfinite=cases(max_l=120), gradients=cases(dtypes=("f32", "f64"), max_d=12, max_n=8, max_l=64),
    properties=cases(max_b=2, max_d=4, max_n=4, max_l=8), magnitudes=cases(dtypes=("f64",), max_d=4, max_n=4, max_l=30),
    planted=st.one_of(cases(), cases(poison=True)), planted_positions=st.integers(0, 300),
    packed=varlen_cases(), packed_gradients=varlen_cases(dtypes=("f32", "f64"), max_total=48),
    packed_decoding=varlen_cases(max_total=40),
    packed_planted=varlen_cases(chunk=varlen_planted_bugs.CHUNK, dtypes=("f32", "f64"), max_d=4, max_n=3, max_seqs=4,
                                max_total=40),
)
# The long and edge cases of the invariants, each family's in a test of its own (an @example is
# never shrunk, so it must not pre-empt a drawn failure)
PINNED_INVARIANTS = dict(
    split=[(Case(b=2, d=6, n=3, l=300, g=2, regime="slow", initial_state=True), 129)],
    decode=[(Case(b=2, d=4, n=2, l=90, g=4, dtype="bf16", initial_state=True), 70)],
    causality=[(Case(b=1, d=3, n=2, l=300, regime="stress"), 257)],
    nonfinite=[(Case(b=1, d=2, n=2, l=200, regime="stress", dtype="f32"), "u", 3, "nan")],
    nan=[(SMALLEST, 0), (Case(b=1, d=2, n=2, l=200, regime="stress", dtype="f32"), 3)],
    gradients=[Case(b=2, d=6, n=3, l=70, g=3, regime="stress", initial_state=True, seed=7)],
)
# The size the planted-bug search folds each drawn case to for the four properties of properties.py
PLANTED_SMALL = dict(b=3, d=8, n=6, l=24)



# The properties with this family bound, for the tests of one implementation or one adapter:
# check_values(name, case), oracle(case), ... (equivalence/properties.py has them over any family)
FAMILY = properties.complete(sys.modules[__name__])
globals().update(properties.bound(FAMILY))
