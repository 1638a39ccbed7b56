"""Mamba-3 (SISO) as the properties see it (equivalence/properties.py): its cases, inputs, calls,
tolerance terms and magnitudes, and the probes of a plain function's capabilities.

impls' Family value names this module (``Family.equivalence``); nothing here is imported by
``import impls``. Letters as in impls/mamba3/loop.py: out is (b, l, h, p); the state is the tuple
(angle (b, h, n_ang), ssm (b, h, p, n), k (b, h, n), v (b, h, p)), its parts named by STATE_PARTS.
ADT, DT and Trap are (b, h, l), time last, as the official kernel takes them (TIME_DIMS).
The oracle is the loop (impls/mamba3/loop.py) run in float64.

The functions below serve the MIMO family too (equivalence/mamba3/mimo.py, family "mamba3_mimo"):
each reads the interface from the case (Case.R None: SISO; a rank: MIMO), so the contract is written
once and the rank is a parameter of the case.

Packed sequences: PACKING (equivalence/mamba3/varlen.py), each sequence's state a row of each of
the four parts. Not here: the diagnosis of a failure's needs (OPTIONS, ...: Case has no field for
the SSD's group count, so a failure is reported undiagnosed).
"""

import dataclasses
import math
import sys

import torch
from hypothesis import strategies as st

import impls
from impls.frontdoor import compute_dtype
from impls.mamba3 import loop

from .. import properties
from ..tolerance import GATE_ULPS, TRANSCENDENTAL_ULPS
from . import cases as _cases
from . import planted_bugs, varlen_planted_bugs  # noqa: F401 (the shared planted-bug tests find them here)
from .cases import (ARGS, DTYPES, STATE_PARTS, TIME_ARGS, TIME_DIMS, Case, align_state, as_dtype, as_f64,  # noqa: F401
                    case_strategy, inputs)
from .varlen import PACKING, varlen_cases

NAME = "mamba3"
SCAN_ARGS = ARGS + ("Input_States",)
TIME_DIM = 1
STATE_ARG = "Input_States"                  # also the capability that continuing needs
CHANNEL_ARG = "V"                           # one element per output channel (the NaN-propagation check)
BATCH_ARGS = TIME_ARGS + (STATE_ARG,)
Y_AXES = ("b", "l", "h", "p")               # MIMO's outputs per rank add R last (scan, below)
CHUNK_SIZES = (1, 2, 5, 64)

# The tiny calls that probe a plain function's capabilities (equivalence/diagnose.py)
TINY = Case(b=1, l=3, h_qk=1, groups=1, p=2, n=2, n_ang=1, dtype="f32", states=False, chunk_size=2)
PROBES = dict(grouped=dataclasses.replace(TINY, groups=2),
              Input_States=dataclasses.replace(TINY, states=True))

PINNED = (
    Case(b=1, l=1, h_qk=1, groups=1, p=1, n=2, n_ang=1, dtype="f32", states=False, D=False, Z=False),
    Case(b=2, l=0, h_qk=1, groups=2, p=2, n=4, n_ang=2, dtype="f64", states=True),
    Case(b=2, l=100, h_qk=2, groups=3, p=3, n=6, n_ang=3, dtype="f32", states=True, chunk_size=64, seed=1),
    Case(b=1, l=67, h_qk=1, groups=2, p=2, n=8, n_ang=2, dtype="f64", states=True, chunk_size=17, seed=2,
         angle_rate=20.0),
)


def make_inputs(case, dtype=None):
    """The scan's keyword arguments for the case, rounded to its dtype (then cast to ``dtype``)."""
    x = inputs(case)
    return x if dtype is None else as_dtype(x, dtype)


def reference_inputs(case):
    return as_f64(inputs(case))


def supported(entry, case):
    s = entry.supports
    return (case.torch_dtype in s["dtypes"] and (s["grouped"] or case.groups == 1)
            and (s["Input_States"] or not case.states)
            and (case.R is None or ((s["pregate_norm"] or not case.norm) and (s["rank_outputs"] or not case.per_rank))))


def rank_last(out, case, rank_dim):
    """MIMO's outputs per rank (rank at ``rank_dim``) with the rank moved last: y's axes are then
    Y_AXES and a channel (h, p) indexes all its ranks. Other outputs are returned as they are."""
    return out.movedim(rank_dim, -1) if per_rank(case) else out


def per_rank(case):
    """Whether the case's outputs are MIMO's per rank; no case (packed inputs, taken from x alone): SISO."""
    return case is not None and case.R is not None and case.per_rank


def scan(name, case, x, chunk_size=None):
    """(out, (angle, ssm, k, v)) of impls.mamba3_scan, or impls.mamba3_mimo for a MIMO case (out per
    rank as (b, l, h, p, R)), on inputs x, at the case's chunk size or ``chunk_size``."""
    cs = chunk_size or case.chunk_size
    if case.R is None:
        out, *states = impls.mamba3_scan(**x, chunk_size=cs, return_final_states=True, impl=name)
    else:
        out, *states = impls.mamba3_mimo(**x, chunk_size=cs, return_state=True, impl=name)
    return rank_last(out, case, 2), tuple(states)


def token(x, t):
    """The step's arguments for token t of inputs x (without Input_States)."""
    pick = lambda k, v: None if v is None else v[..., t] if k in TIME_DIMS else v[:, t] if k in TIME_ARGS else v
    return {k: pick(k, v) for k, v in x.items() if k != STATE_ARG}


def step(name, state, x, t):
    """Token t of inputs x through impls.mamba3_state_update (impls.mamba3_mimo_state_update for a
    MIMO case), advancing ``state`` (a tuple of the four parts) in place: the public step returns new
    tensors. Returns y (b, h, p) (MIMO per rank: (b, h, p, R))."""
    mimo = "MIMO_V" in x
    update = impls.mamba3_mimo_state_update if mimo else impls.mamba3_state_update
    y, new = update(**token(x, t), Input_States=tuple(state), impl=name)
    for s, n in zip(state, new):
        s.copy_(n)
    return y.movedim(1, -1) if mimo and x["MIMO_Out"] is None else y


def state_shape(case):
    b, h, p, n = case.b, case.h, case.p, case.n
    return (b, h, case.n_ang), (b, h, p, n), (b, h, n) if case.R is None else (b, case.R, h, n), (b, h, p)


def call(name, case):
    """The public call on the case's inputs, as a Python expression (the reproduce line's)."""
    x = f"**equivalence.mamba3.make_inputs(equivalence.mamba3.{case!r}), chunk_size={case.chunk_size}"
    if case.R is None:
        return f"impls.mamba3_scan({x}, return_final_states=True, impl={name!r})"
    return f"impls.mamba3_mimo({x}, return_state=True, impl={name!r})"


def positional(x, chunk_size=2):
    """Inputs x as the positional arguments of a registered scan (SISO's or MIMO's), its final states on."""
    if "MIMO_V" not in x:
        return [x[k] for k in SCAN_ARGS] + [chunk_size, True, None]
    # mamba3_mimo(Q .. Z, chunk_size, rotary_dim_divisor, dtype, return_state, cu_seqlens, the norm, its
    # weight and eps, Input_States)
    return ([x[k] for k in _cases.MIMO_ARGS[:-1]] + [chunk_size, None, None, True, None]
            + [x["fuse_pregate_headwise_rms_norm"], x["outproj_norm_weight"], 1e-5, x[STATE_ARG]])


def scan_by_stepping(step):
    """A scan (the official signature) that runs ``step`` (mamba3_state_update's, without impl) token
    by token, from Input_States or zeros; packed sequences each alone, as the loop."""

    def scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None, chunk_size=64,
             return_final_states=False, cu_seqlens=None):
        if cu_seqlens is not None:
            return loop.each_sequence(scan, Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, Input_States,
                                      chunk_size, return_final_states, cu_seqlens)
        b, l, h, p = V.shape
        states = (loop.zero_states(b, h, p, Q.shape[-1], Angles.shape[-1], compute_dtype(V.dtype), V.device)
                  if Input_States is None else tuple(Input_States))
        ys = []
        for t in range(l):
            y, states = step(Q[:, t], K[:, t], V[:, t], ADT[..., t], DT[..., t], Trap[..., t], Q_bias, K_bias,
                             Angles[:, t], D, None if Z is None else Z[:, t], tuple(states))
            ys.append(y)
        out = torch.stack(ys, 1) if ys else V.new_zeros(b, 0, h, p)
        return (out, *states) if return_final_states else out

    return scan


# ---- the tolerance ---------------------------------------------------------------------------------
# The same policy and the same derivation as equivalence/mamba3/cases.py (check): y and the ssm and
# k states scaled by their sums of |terms| and conditioned by the decays (exp of ADT), the angle's
# accumulation, sin, cos and the sigmoid of Trap and the gate; the v state is V's last token,
# copied (its own magnitude). The angle state is compared as an angle (align_state), with an
# absolute error: cases.check bounds it by eps (l + c) with c its accumulated ulps and scale 1. Here
# that bound is given as a scale, (l + c) / l, with conditioning 0, c each pair's own
# (cases.angle_ulps), so that a check reading only the scales (the packed ones' largest finite
# scale) gets it too: the same eps (l + c) everywhere. As c >= 2 pi l, that scale is above 2 pi, so
# above the angle itself, as a scale must be.

def _last(c):
    """The largest finite conditioning at the last token: one number for every element of a state
    part, so a pair or head made non-finite by a poisoned input (NaN there, and not compared) must
    not take the other elements' conditioning with it."""
    c = c[:, -1:]
    c = c[torch.isfinite(c)]
    return float(c.max()) if c.numel() else 0.0


def conditionings(case, x=None):
    """Ulps a rounding can grow to, for out (b, l, h, 1) ((b, l, h, 1, 1) for MIMO's outputs per rank),
    each state part (numbers), and every gradient element (a number: the whole sequence's, as the
    adjoint runs the decays backwards, plus the derivatives of the sigmoid, tanh, sin and cos, and of
    the gate, and with MIMO's norm the derivative of its square root); x: inputs to take instead of
    the case's (properties.py's contract)."""
    x = inputs(case) if x is None else x
    cond, _ = _cases.conditioning(x)
    last = _last(cond)
    gradient = (last + 4 * TRANSCENDENTAL_ULPS + (GATE_ULPS if x["Z"] is not None else 0)
                + (TRANSCENDENTAL_ULPS + norm_jacobian_ulps(x) if x.get("fuse_pregate_headwise_rms_norm") else 0))
    return (cond[..., None] if per_rank(case) else cond), (0.0, last, last, 0.0), gradient


def norm_jacobian_ulps(x):
    """The backward through MIMO's pre-gate norm reads its Jacobian, (I - y^ y^T / p) / rms, at the
    forward's own y, and an error e in y changes that Jacobian by up to 3 |e| / rms relative to its
    entries (y^ and rms each move by |e| / rms). Near the norm's epsilon the change is not small: a
    y of 2 sqrt(eps) that cancels from terms a hundred times larger gives a float64 gradient 1e-11
    off. In ulps: 3 x y's rounded terms x the largest sums of |terms| of y over its row's rms."""
    a = as_f64(dict(x, Z=None, MIMO_Out=None, fuse_pregate_headwise_rms_norm=False, outproj_norm_weight=None))
    y = loop.mamba3_mimo(**a)                                                        # (b, l, R, h, p)
    if not y.numel():
        return 0.0
    rms = torch.sqrt(y.square().mean(-1, keepdim=True) + x.get("outproj_norm_eps", 1e-5))
    b, l, R, h, p = y.shape
    ratio = (_cases.magnitudes(a)[0] / rms).amax().item()
    return 3 * _cases.y_terms(l, x["Q"].shape[-1], p, R, per_rank=True) * ratio


# Each summand of a gradient element is a product of up to about sixteen rounded factors (the
# biased and rotated q~ and k~ with their cos and sin, beta's three products, alpha, v, the adjoint,
# the gate): half an ulp each, 8 eps in all. MIMO adds up to six (MIMO_V in v~ and in the previous
# v~, MIMO_Z in the gate, MIMO_Out, the norm's 1 / rms and weight): 3 eps more.
GRADIENT_TERM_ROUNDINGS = 8
MIMO_GRADIENT_TERM_ROUNDINGS = 3


def gradient_terms(case, arg):
    """Rounded terms accumulated into one element of the gradient of ``arg``: over the tokens its
    adjoint runs through (l), what it is read against (n, p, a group's heads) and, for a parameter
    shared by every token and row, b l of those. MIMO adds the sum over the R ranks wherever the
    state's adjoint or v~ is read (R), and with the norm its sum over p in each readout's adjoint."""
    b, l, p, n, hg = case.b, case.l, case.p, case.n, case.groups
    R = case.R or 0
    norm = p if case.norm else 0
    y = l + n + norm            # an output's own terms, read by the gradients of the gate and projections
    summed = {"Q": p * hg + 2 + norm, "K": l + p * hg + 2 + R + norm, "V": l + n + 2 * R + norm,
              "Z": l + n + R + norm, "ADT": l + p * n + R + norm, "DT": l + p * n + n + R + norm,
              "Trap": l + p * n + R + norm, "Angles": l + p * n + R + norm, "Q_bias": b * l * (p + 2 + norm),
              "K_bias": b * l * (l + p + 2 + R + norm), "D": b * l * (p + R + norm),
              "MIMO_V": b * l * (l + n + 2 + norm), "MIMO_Z": b * l + y, "MIMO_Out": b * l + y,
              "outproj_norm_weight": b * l * (R + 1) + y,
              "Input_States.angle": l + p * n + R + norm, "Input_States.ssm": l + n + R + norm,
              "Input_States.k": l + p + R + norm, "Input_States.v": l + n + R + norm}[arg]
    return summed + GRADIENT_TERM_ROUNDINGS + (MIMO_GRADIENT_TERM_ROUNDINGS if case.R is not None else 0)


def terms(case, output, arg=None):
    """Rounded terms per element of "y" (cases.y_terms), each "state" part (cases.state_terms), or the
    "gradient" of arg."""
    if output == "gradient":
        return gradient_terms(case, arg)
    if output == "y":
        return _cases.y_terms(case.l, case.n, case.p, case.R, case.norm, case.per_rank)
    return _cases.state_terms(case.l, case.R)


def exact_kinds(case):
    return True


def magnitudes(case, weights=None, x=None):
    """Sums of |terms| of each element of out and of each state part (the scale of the policy's floor),
    and with the loss weights (as out, and one per state part), {argument: sums of |summands| of each
    element of its gradient}: cases.magnitudes, with MIMO's outputs per rank as scan gives them
    (rank last), and the angle's scale (the comment above). x: float64 inputs to take instead of the
    case's. Returns (out, (angle, ssm, k, v), that dict or None).
    """
    a = reference_inputs(case) if x is None else x
    if weights is not None and per_rank(case):
        weights = (weights[0].movedim(-1, 2), weights[1])              # y's weights as out per rank: (b, l, R, h, p)
    y, (ssm, k, v), sums = _cases.magnitudes(a, weights)
    b, l, h = a["V"].shape[:3]
    L = max(l, 1)
    # each pair's own accumulated ulps (cases.angle_ulps): a NaN or inf in one pair's Angles or DT
    # makes only its own scale non-finite, and the policy drops it there, where the angle is not
    # finite either. At l = 0 the angle is the input's, below 2 pi (the bound eps 2 pi is an ulp of it)
    c = _cases.angle_ulps(a).sum(1) if l else torch.zeros(b, h, a["Angles"].shape[-1], dtype=torch.float64)
    angle = ((L + c) / L).clamp_min(2 * math.pi)
    return rank_last(y, case, 2), (angle, ssm, k, v), sums


# What each property test draws (equivalence/test_*.py), smallest first when shrunk
STRATEGIES = dict(
    values=case_strategy(), split=case_strategy(min_l=1), causality=case_strategy(min_l=1),
    decode=case_strategy(min_l=1), batch=case_strategy(min_l=1, min_b=2, max_b=3),
    nonfinite=case_strategy(min_l=1), gradients=case_strategy(min_l=1, max_l=10),
    chunk_sizes=case_strategy(max_l=40),
    properties=case_strategy(min_l=1, max_l=8, chunk_sizes=(2, 5)),
    magnitudes=case_strategy(dtypes=("f64",), min_l=1, max_l=10),   # at l = 0 y has no autograd graph
    planted=case_strategy(min_l=1, max_l=14), planted_positions=st.integers(0, 14),
    packed=varlen_cases(), packed_gradients=varlen_cases(max_total=40), packed_decoding=varlen_cases(max_total=40),
    packed_planted=varlen_cases(chunk=varlen_planted_bugs.CHUNK, max_p=2, max_seqs=4, max_total=40),
)
# The long and edge cases of the invariants, each in a test of its own (an @example is never shrunk)
PINNED_INVARIANTS = dict(
    split=[(Case(b=2, l=70, h_qk=2, groups=2, p=3, n=6, n_ang=3, dtype="f32", chunk_size=16, seed=1), 33),
           (Case(b=1, l=20, h_qk=1, groups=3, p=2, n=4, n_ang=1, dtype="f64", chunk_size=7, seed=2), 7)],
    decode=[(Case(b=2, l=30, h_qk=2, groups=2, p=3, n=4, n_ang=2, dtype="f32", seed=1), 17),
            (Case(b=1, l=12, h_qk=1, groups=2, p=2, n=6, n_ang=1, dtype="f64", states=False, seed=2), 0)],
    causality=[(Case(b=1, l=80, h_qk=1, groups=2, p=2, n=4, n_ang=2, dtype="f32", chunk_size=64), 65),
               (Case(b=1, l=64, h_qk=1, groups=1, p=2, n=2, n_ang=1, dtype="f32", chunk_size=64), 33)],
    nonfinite=[(Case(b=1, l=20, p=2, n=4, chunk_size=8, dtype="f32"), "V", 10, "nan"),
               (Case(b=1, l=20, p=2, n=4, chunk_size=8, dtype="f32"), "Angles", 10, "nan"),
               (Case(b=1, l=20, p=2, n=4, chunk_size=8, dtype="f32"), "ADT", 10, "nan"),
               (Case(b=1, l=20, p=2, n=4, chunk_size=8, dtype="f32"), "DT", 10, "inf"),
               (Case(b=1, l=20, p=2, n=4, chunk_size=8, dtype="f32"), "ADT", 3, "-inf"),
               # sigmoid(inf) = 1 puts the whole of DT V K in the state, five times the drawn Trap's share:
               # the recurrent step's last ulp of it failed a bound scaled by the unpoisoned inputs
               (Case(b=1, l=1, groups=1, p=2, n=2, n_ang=0, dtype="f64", states=False, D=False, Z=False, seed=0,
                     chunk_size=1), "Trap", 0, "inf"),
               # a NaN angle makes its pair NaN, not the other pair: its conditioning, taken with the
               # NaN into one number for the whole state, was dropped for every element, and the
               # chunked scan's last ulp of the other pair failed the bare floor
               (Case(b=1, l=1, h_qk=1, groups=2, p=3, n=4, n_ang=2, dtype="f64", states=False, D=False, Z=False,
                     seed=0, chunk_size=1), "Angles", 0, "nan")],
    nan=[(Case(b=1, l=1, groups=1, p=1, n=2, n_ang=1), 0), (Case(b=1, l=20, p=2, n=4, chunk_size=8), 10)],
    gradients=[Case(b=2, l=30, h_qk=2, groups=2, p=3, n=4, n_ang=2, dtype="f64", chunk_size=7, seed=7),
               Case(b=1, l=20, h_qk=1, groups=1, p=2, n=6, n_ang=3, dtype="f32", states=False, chunk_size=4, seed=8)],
    chunk_sizes=[Case(b=2, l=130, h_qk=2, groups=2, p=3, n=6, n_ang=3, dtype="f32", seed=1),
                 Case(b=1, l=70, h_qk=1, groups=3, p=2, n=4, n_ang=1, dtype="f64", states=False, seed=2)],
    nonfinite_causality=[(Case(b=1, l=12, p=2, n=4, chunk_size=5, dtype="f32"), 9, "nan"),
                         (Case(b=1, l=12, p=2, n=4, chunk_size=5, dtype="f32"), 9, "inf")],
)
# What a failure needs (equivalence/diagnose.py): each option off in turn, float64, then each size
# bisected; the heads sharing Q and K (groups = h / h_qk) are a size like the others. n is not one:
# it must stay even and at least 2 n_ang, so a rotation's need shows as n_ang (off: 0).
OPTIONS = dict(states=False, D=False, Z=False, n_ang=0)
UNGROUPED = ()
GROUPED_AXIS = None
AXES = ("b", "l", "h_qk", "groups", "p")
PLAIN = dict(dtype="f64")
UNREDUCED = ("n",)   # named where nothing else is found

# The size the planted-bug search folds each drawn case to for the five properties of properties.py
PLANTED_SMALL = dict(b=2, l=8, p=3, n=6)


# The properties with this family bound: check_values(name, case), oracle(case), ...
FAMILY = sys.modules[__name__]
globals().update(properties.bound(FAMILY))
