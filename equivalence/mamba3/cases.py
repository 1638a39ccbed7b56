"""Mamba-3 test cases, SISO and MIMO, and the comparison with the float64 loop under the tolerance policy.

A Case is plain data; ``inputs(case)`` builds the scan's arguments from ``case.seed`` alone
(a seeded torch.Generator), so a failure reproduces from the case's repr. Letters as in
impls/mamba3/loop.py. Inputs are drawn in float64 and rounded to the case's dtype; the oracle is
the loop in float64 on the rounded values.

The rank axis: a case with R = None is a SISO case (``mamba3_scan``: Q, K (b, l, h_qk, n), Q_bias,
K_bias (h, n), the k state (S, h, n), interleaved pairs (2i, 2i + 1)); with R >= 1 a MIMO case
(``mamba3_mimo``: a rank axis after l in Q and K, after h in the biases and after S in the k state,
the projections MIMO_V, MIMO_Z, MIMO_Out (h, R, p), optionally the norm before the gate, pairs
(i, i + n/2)). SISO is the MIMO recurrence at R = 1 with every projection 1 and the interleaved
pairing (equivalence/mamba3/test_mimo.py pins the reduction), which is how the magnitudes below
are written once for both.
"""

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from equivalence import tolerance
from equivalence.inputs import chunk_size_within
from impls.mamba3 import loop

DTYPES = {"f32": torch.float32, "f64": torch.float64}
ARGS = ("Q", "K", "V", "ADT", "DT", "Trap", "Q_bias", "K_bias", "Angles", "D", "Z")
# The arguments with a time axis, V first (prefill-then-decode takes its empty slice as the empty
# output: same shape and dtype), and those whose time axis is not 1: ADT, DT and Trap are (b, h, l)
TIME_ARGS = ("V", "Q", "K", "Z", "Angles", "ADT", "DT", "Trap")
TIME_DIMS = dict(ADT=-1, DT=-1, Trap=-1)
STATE_PARTS = ("angle", "ssm", "k", "v")
MIMO_ARGS = ("Q", "K", "V", "ADT", "DT", "Trap", "Q_bias", "K_bias", "MIMO_V", "MIMO_Z", "MIMO_Out", "Angles", "D", "Z",
             "outproj_norm_weight")
TIME_LAST, TIME_SECOND = ("ADT", "DT", "Trap"), ("Q", "K", "V", "Angles", "Z")
# The MIMO ranks drawn (lo, hi), smallest first when shrunk
RANKS = (1, 3)


@dataclasses.dataclass(frozen=True)
class Case:
    b: int = 2
    l: int = 5
    h_qk: int = 1
    groups: int = 2          # h = h_qk * groups
    p: int = 3
    n: int = 4
    n_ang: int = 2
    dtype: str = "f64"
    states: bool = True
    D: bool = True
    Z: bool = True
    seed: int = 0
    chunk_size: int = 4
    angle_rate: float = 2.0  # scale of the raw Angles (before tanh)
    R: Optional[int] = None  # the MIMO rank; None: a SISO case (no rank axis)
    norm: bool = False       # MIMO: fuse_pregate_headwise_rms_norm, with a weight
    per_rank: bool = False   # MIMO: MIMO_Out = None, the R outputs returned apart

    @property
    def h(self):
        return self.h_qk * self.groups

    @property
    def g(self):
        """Q and K's head count, as the SSD's B and C groups (diagnosis and test ids read it)."""
        return self.h_qk

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    @property
    def id(self):
        rank = ("" if self.R is None else
                f"-R{self.R}{'-norm' if self.norm else ''}{'-per_rank' if self.per_rank else ''}")
        return (f"b{self.b}-l{self.l}-hqk{self.h_qk}-h{self.h}-p{self.p}-n{self.n}-ang{self.n_ang}-T{self.chunk_size}"
                f"-{self.dtype}{'-states' if self.states else ''}{rank}")

    def within(self, limits):
        """The case with b, l, p, n and h at most ``limits``' (a dict, or None for no limits); n
        stays even and n_ang at most n / 2, h is lowered through groups, then h_qk; ``chunks``
        limits how many chunks the sequence spans, by raising chunk_size (an interpreter's time
        grows with the number of programs, one per chunk and head)."""
        if not limits:
            return self
        c = dataclasses.replace(self, **{k: min(getattr(self, k), v) for k, v in limits.items()
                                         if k in ("b", "l", "p", "n")})
        n = max(2, c.n - c.n % 2)
        h_qk = min(c.h_qk, limits.get("h", c.h))
        groups = max(1, min(c.groups, limits.get("h", c.h) // h_qk))
        return dataclasses.replace(c, n=n, n_ang=min(c.n_ang, n // 2), h_qk=h_qk, groups=groups,
                                   chunk_size=chunk_size_within(c.chunk_size, c.l, limits))


def inputs(case, S=None):
    """The scan's keyword arguments for ``case``: ARGS plus Input_States (SISO), or MIMO_ARGS plus
    fuse_pregate_headwise_rms_norm and Input_States (MIMO); S state rows (default b). MIMO_Z is given
    only with Z (it projects the gate), the norm weight only with the norm."""
    g = torch.Generator().manual_seed(case.seed)
    b, l, h, p, n, na, R = case.b, case.l, case.h, case.p, case.n, case.n_ang, case.R
    ranks = () if R is None else (R,)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    u = lambda lo, hi, *s: lo + (hi - lo) * torch.rand(*s, generator=g, dtype=torch.float64)
    DT = u(0.01, 0.6, b, h, l)
    args = dict(Q=r(b, l, *ranks, case.h_qk, n), K=r(b, l, *ranks, case.h_qk, n), V=r(b, l, h, p),
                ADT=-u(0.1, 3.0, b, h, l) * DT, DT=DT, Trap=2 * r(b, h, l),
                Q_bias=r(h, *ranks, n), K_bias=r(h, *ranks, n))
    if R is not None:
        up, gate = r(h, R, p), r(h, R, p)   # MIMO_Z drawn without Z too: the later draws do not depend on Z
        args.update(MIMO_V=up, MIMO_Z=gate if case.Z else None, MIMO_Out=None if case.per_rank else r(h, R, p))
    args.update(Angles=case.angle_rate * r(b, l, h, na), D=r(h) if case.D else None,
                Z=r(b, l, h, p) if case.Z else None)
    if R is not None:
        args["outproj_norm_weight"] = r(h, p) if case.norm else None
    S = b if S is None else S
    states = (u(0, 2 * math.pi, S, h, na), r(S, h, p, n), r(S, *ranks, h, n), r(S, h, p)) if case.states else None
    dt = DTYPES[case.dtype]
    args = {k: None if v is None else v.to(dt) for k, v in args.items()}
    args["Input_States"] = None if states is None else tuple(s.to(dt) for s in states)
    if R is not None:
        args["fuse_pregate_headwise_rms_norm"] = case.norm
    return args


def as_dtype(args, dtype):
    """The scan's tensor arguments (the states' parts too) cast to ``dtype``; anything else as it is."""
    cast = lambda v: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
    return {k: (tuple(map(cast, v)) if isinstance(v, tuple) else cast(v)) for k, v in args.items()}


def as_f64(args):
    return as_dtype(args, torch.float64)


def is_mimo(args):
    """Whether ``args`` are the MIMO scan's (they have MIMO_V)."""
    return "MIMO_V" in args


def window(args, a, e, states=None):
    """The scan's arguments for tokens a:e, starting from ``states`` (default: none given)."""
    cut = lambda k, v: (v if not isinstance(v, torch.Tensor) else v[..., a:e] if k in TIME_LAST
                        else v[:, a:e] if k in TIME_SECOND else v)
    return dict({k: cut(k, v) for k, v in args.items()}, Input_States=states)


def token(args, t):
    """The step's arguments for token t (no Input_States)."""
    pick = lambda k, v: (v if not isinstance(v, torch.Tensor) else v[..., t] if k in TIME_LAST
                         else v[:, t] if k in TIME_SECOND else v)
    return {k: pick(k, v) for k, v in args.items() if k != "Input_States"}


def run(scan, args, chunk_size=4, **kw):
    """(out, angle, ssm, k, v) of a scan with the SISO or the MIMO signature (by the arguments)."""
    return scan(**args, chunk_size=chunk_size, **{"return_state" if is_mimo(args) else "return_final_states": True},
                **kw)


def tight(actual, expected, angle=False):
    """float64 agreement up to rounding: 1e-12 of the larger of 1 and the expected magnitude (the
    cases' values are O(1) and their sequences short: a few hundred roundings at most). Angles are
    compared as angles (0 and 2 pi are one)."""
    if angle:
        actual = wrap_angle(actual, expected)
    big = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12 * (1 + big))


def case_strategy(dtypes=("f64", "f32"), max_l=12, min_l=0, min_b=1, max_b=2, max_p=3, chunk_sizes=(1, 6), ranks=None):
    """Cases smallest first when shrunk. ranks: None for SISO cases, whose n_ang is 0 or n / 2 (every
    pair rotated); or (lo, hi) for MIMO cases with R in it, the norm and per-rank outputs drawn, and
    any n_ang <= n / 2 (the official rotary_dim_divisor 4 rotates a quarter of the dimensions)."""
    common = dict(b=st.integers(min_b, max_b), l=st.integers(min_l, max_l), h_qk=st.integers(1, 2),
                  groups=st.integers(1, 2), p=st.integers(1, max_p), dtype=st.sampled_from(dtypes),
                  states=st.booleans(), D=st.booleans(), Z=st.booleans(), seed=st.integers(0, 2**31 - 1),
                  chunk_size=st.integers(*chunk_sizes))
    if ranks is None:
        return st.builds(Case, **common, n=st.sampled_from([2, 4, 6]), n_ang=st.integers(0, 1)).map(
            lambda c: dataclasses.replace(c, n_ang=c.n_ang * (c.n // 2)) if c.n_ang else c)
    return st.builds(Case, **common, n=st.sampled_from([2, 4, 6, 8]), n_ang=st.integers(0, 4), R=st.integers(*ranks),
                     norm=st.booleans(), per_rank=st.booleans()).map(
        lambda c: dataclasses.replace(c, n_ang=min(c.n_ang, c.n // 2)))


# ---- the tolerance: magnitudes (each element's sum of |terms|), conditioning, terms ----------------

def pair_indices(n, n_ang, halves):
    """The two entries of each rotated pair (index tensors (n_ang,)): MIMO's (i, i + n/2), or SISO's
    interleaved (2i, 2i + 1)."""
    i = torch.arange(n_ang)
    return (i, i + n // 2) if halves else (2 * i, 2 * i + 1)


def pair_bound(x, first, second):
    """|x| with both entries of each rotated pair replaced by |x_first| + |x_second| (a rotation's bound in both)."""
    s = x[..., first].abs() + x[..., second].abs()
    return x.abs().index_copy(-1, first, s).index_copy(-1, second, s)


def magnitudes(args, weights=None):
    """Sums of |terms| of each element of out and of the ssm, k and v states (the scale of the policy's
    floor), and with loss weights, of each element of every argument's gradient.

    The loop's recursion in float64 with every term non-negative, written once with the rank axis
    (SISO: R = 1, projections 1): a rotated pair bounded by |x0| + |x1| in both places; D, V, the
    projections by |.|. The norm divides by the oracle's rms and mixes the p elements of a rank:
    d(y_i / rms) = dy_i / rms - (y_i / rms) sum_j y_j dy_j / (p rms^2), so it is replaced by the linear
    map Y_i / rms + |y^_i| sum_j |y^_j| Y_j / (p rms) (y^ = y / rms, the oracle's), whose coefficients
    bound the Jacobian's |entries|. The gate by |silu(u)| with u = Z (* MIMO_Z), whose derivative is
    taken as |silu'(u)| on |Z| (and |MIMO_Z|): one linear term around the oracle's u.
    With ``weights`` (w_out like out, (w_angle, w_ssm, w_k, w_v)), the adjoint of that recursion on
    the |weights|, by autograd, gives the sums for every argument but the angle's: Trap's sigmoid
    enters gamma as lambda and beta as 1 - lambda, opposite signs, so each use is a leaf of its own
    and their sums add; ADT through alpha = exp(ADT) > 0. A rotation does not change the bound, so the
    angle's sums come from the rotation's derivative, bounded by the same pair bound: the direct sum at
    token s is, over each pair's two entries and the ranks, (adjoint of q~_s) |q~_s| + (adjoint of
    k~_s) |k~_s|, and theta_t reaches every later theta_s, so dL/dtheta_t sums the direct sums of
    s >= t and the final angle's weight (Theta_t). Then Angles: pi tanh'(.) DT Theta; DT: its beta
    and gamma terms plus pi |tanh(.)| Theta summed over the pairs; the input angle: Theta_0.

    args: either scan's arguments (any dtype; taken in float64).
    Returns (out (b, l, [R,] h, p), (ssm, k, v) states, {argument: sums} or None without weights);
    the state parts' arguments are named "Input_States.<part>".
    """
    a = as_f64(args)
    mimo, grad = is_mimo(a), weights is not None
    b, l, h, p = a["V"].shape
    n, na = a["Q"].shape[-1], a["Angles"].shape[-1]
    R = a["Q"].shape[2] if mimo else 1
    ranked = (lambda t, dim: t) if mimo else (lambda t, dim: t.unsqueeze(dim))   # SISO: a rank axis of 1
    first, second = pair_indices(n, na, halves=mimo)
    leaf = lambda t: t.abs().requires_grad_(grad)
    leaves = {k: leaf(a[k]) for k in ("Q", "K", "V", "Q_bias", "K_bias", "D", "MIMO_V", "MIMO_Out",
                                      "outproj_norm_weight", "Z", "MIMO_Z") if a.get(k) is not None}
    st_ = a["Input_States"]
    shapes = dict(ssm=(b, h, p, n), k=(b, R, h, n) if mimo else (b, h, n), v=(b, h, p))
    for i, part in enumerate(("ssm", "k", "v"), 1):
        leaves[f"Input_States.{part}"] = (leaf(st_[i]) if st_ is not None
                                          else torch.zeros(shapes[part], dtype=torch.float64))
    leaves["ADT"] = a["ADT"].clone().requires_grad_(grad)
    leaves["DT"] = a["DT"].abs().requires_grad_(grad)
    trap_gamma, trap_beta = a["Trap"].clone().requires_grad_(grad), a["Trap"].clone().requires_grad_(grad)
    biased = lambda x, bias: loop.per_head(ranked(x, 2), h) + ranked(bias, 1).transpose(0, 1)   # (b, l, R, h, n)
    QP = pair_bound(biased(leaves["Q"], leaves["Q_bias"]), first, second)
    KP = pair_bound(biased(leaves["K"], leaves["K_bias"]), first, second)
    up = leaves["MIMO_V"].transpose(0, 1) if mimo else torch.ones(1, h, p, dtype=torch.float64)   # (R, h, p)
    ssm, kp, vp = leaves["Input_States.ssm"], ranked(leaves["Input_States.k"], 1), leaves["Input_States.v"]
    dt, alpha = leaves["DT"], torch.exp(leaves["ADT"])
    gamma, beta = torch.sigmoid(trap_gamma) * dt, (1 - torch.sigmoid(trap_beta)) * dt * alpha   # (b, h, l)
    ys = []
    for t in range(l):
        v = leaves["V"][:, t, None] * up                                                  # (b, R, h, p)
        prev = ((vp[:, None] * up)[..., None] * kp[..., None, :]).sum(1)
        curr = (v[..., None] * KP[:, t, ..., None, :]).sum(1)
        ssm = alpha[:, :, t, None, None] * ssm + beta[:, :, t, None, None] * prev + gamma[:, :, t, None, None] * curr
        y = (ssm[:, None] * QP[:, t, ..., None, :]).sum(-1)                               # (b, R, h, p)
        ys.append(y + leaves["D"][:, None] * v if "D" in leaves else y)
        kp, vp = KP[:, t], leaves["V"][:, t]
    Y = torch.stack(ys, 1) if ys else torch.zeros(b, 0, R, h, p, dtype=torch.float64)
    if a.get("fuse_pregate_headwise_rms_norm"):
        pre = loop.mamba3_mimo(**dict(a, Z=None, MIMO_Out=None, fuse_pregate_headwise_rms_norm=False,
                                      outproj_norm_weight=None))                 # y_{t,r} + D v~, the oracle's
        rms = torch.sqrt(pre.square().mean(-1, keepdim=True) + a.get("outproj_norm_eps", 1e-5))
        yn = (pre / rms).abs()
        Y = Y / rms + yn * (yn * Y).sum(-1, keepdim=True) / (p * rms)
        if "outproj_norm_weight" in leaves:
            Y = Y * leaves["outproj_norm_weight"].reshape(h, p)
    if "Z" in leaves:
        u0 = a["Z"][:, :, None] * (a["MIMO_Z"].transpose(0, 1) if mimo else 1)
        U = leaves["Z"][:, :, None] * (leaves["MIMO_Z"].transpose(0, 1) if mimo else 1)
        sig = torch.sigmoid(u0)
        Y = Y * (F.silu(u0).abs() + (sig * (1 + u0 * (1 - sig))).abs() * (U - U.detach()))
    if mimo:
        out = Y if a["MIMO_Out"] is None else (Y * leaves["MIMO_Out"].transpose(0, 1)).sum(2)
    else:
        out, kp = Y[:, :, 0], kp[:, 0]
    states = (ssm, kp, vp)
    if not grad:
        return out.detach(), tuple(s.detach() for s in states), None
    w_out, (w_angle, *w_states) = weights
    loss = (out * w_out.abs()).sum() + sum((s * w.abs()).sum() for s, w in zip(states, w_states))
    wrt = {k: v for k, v in leaves.items() if v.requires_grad}
    # at l = 0 without input states nothing reaches the loss: a zero term keeps the graph (zero sums)
    loss = loss + sum(0 * v.sum() for v in (QP, KP, trap_gamma, trap_beta, *wrt.values()))
    got = torch.autograd.grad(loss, [QP, KP, trap_gamma, trap_beta, *wrt.values()], allow_unused=True)
    zero = lambda t: torch.zeros_like(t)
    g_qp, g_kp, g_tg, g_tb = (zero(t) if g is None else g for g, t in zip(got[:4], (QP, KP, trap_gamma, trap_beta)))
    sums = {k: (zero(v) if g is None else g.abs()) for (k, v), g in zip(wrt.items(), got[4:])}
    sums["Trap"] = g_tg.abs() + g_tb.abs()
    direct = (g_qp * QP + g_kp * KP).detach()                                        # (b, l, R, h, n)
    direct = (direct[..., first] + direct[..., second]).sum(2)                       # (b, l, h, n_ang)
    theta = direct.flip(1).cumsum(1).flip(1) + w_angle.abs()[:, None]                # Theta_t
    tanh = torch.tanh(a["Angles"])
    sums["Angles"] = math.pi * (1 - tanh ** 2) * a["DT"].abs().transpose(1, 2)[..., None] * theta
    sums["DT"] = sums["DT"] + (math.pi * tanh.abs() * theta).sum(-1).transpose(1, 2)
    if st_ is not None:
        sums["Input_States.angle"] = theta[:, 0] if l else w_angle.abs()
    return out.detach(), tuple(s.detach() for s in states), sums


def conditioning(args):
    """Ulps a rounding can grow to by token t, (b, l, h, 1), for out (its last token's for states), and
    the angle's own part (the angle state's absolute error, in eps, is its last token's).
    The decays as the policy counts them (tolerance.conditioning on ADT, which is exact); the angle
    adds, per token, its own rounding relative to |theta| < 2 pi plus the increment's (pi tanh(.) DT:
    three roundings and a tanh), accumulated over the sequence because each token's angle inherits
    the previous one's error; sin, cos and the sigmoid of Trap add TRANSCENDENTAL_ULPS each. MIMO adds
    the two products before a transcendental or a state, V * MIMO_V and Z * MIMO_Z, and with the norm
    its square root."""
    a = as_f64(args)
    adt = a["ADT"].transpose(1, 2)[..., None]                           # (b, l, h, 1)
    decay = tolerance.conditioning(adt, torch.zeros(()), 1)
    per_pair = angle_ulps(a)
    # a pair whose angle is not finite is NaN in every output it reaches (not compared): the others
    # keep their own conditioning
    per_pair = torch.where(torch.isfinite(per_pair), per_pair, torch.zeros((), dtype=per_pair.dtype))
    per_token = per_pair.amax(-1, keepdim=True) if per_pair.shape[-1] else 0 * adt
    angle = torch.as_tensor(per_token).cumsum(1)
    mimo = (2 + (tolerance.TRANSCENDENTAL_ULPS if a.get("fuse_pregate_headwise_rms_norm") else 0)) if is_mimo(a) else 0
    return decay + angle + 3 * tolerance.TRANSCENDENTAL_ULPS + tolerance.GATE_ULPS + mimo, angle


def y_terms(l, n, p, R=None, norm=False, per_rank=False):
    """Rounded terms accumulated into one element of out: the state (l), the readout (n), and for MIMO
    the norm's mean over p and the sum over the R ranks."""
    return l + n + (p if norm else 0) + (R if R is not None and not per_rank else 0)


def state_terms(l, R=None):
    """Rounded terms of each state part (angle, ssm, k, v): l, and for MIMO the ssm's sum over the R ranks."""
    L = max(l, 1)
    return L, L + (R or 0), L, L


def angle_ulps(args):
    """Ulps each rotated pair's angle gains at token t, (b, l, h, n_ang): its own rounding relative to
    |theta| < 2 pi plus its increment's (pi tanh(.) DT: three roundings and a tanh). A pair's angle
    inherits only its own earlier errors, so its error by token t is eps times the sum up to t."""
    inc = (math.pi * torch.tanh(args["Angles"]) * args["DT"].transpose(1, 2)[..., None]).abs()
    return 2 * math.pi + inc * (3 + tolerance.TRANSCENDENTAL_ULPS)


def align_state(part, actual, oracle):
    """The angle moved by whole turns to within pi of the oracle's (0 and 2 pi are one angle)."""
    return wrap_angle(actual, oracle) if part == "angle" else actual


def wrap_angle(actual, oracle):
    """The actual angle state moved by whole turns to lie within pi of the oracle's (0 and 2 pi are one angle)."""
    o = oracle.to(actual.dtype)
    d = actual - o
    # wrapped only where more than half a turn apart: o + ((d + pi) mod 2 pi) - pi rounds o + pi - pi by
    # an ulp even where actual equals the oracle exactly
    return o + torch.where(d.abs() > math.pi, torch.remainder(d + math.pi, 2 * math.pi) - math.pi, d)


def check(what, result, args, repro=""):
    """result: (out, angle, ssm, k, v) of an implementation on ``args`` (either scan's); compared with
    the float64 loop on the same (rounded) inputs under the tolerance policy, the loop's own error
    in the result's dtype included."""
    mimo = is_mimo(args)
    spec = loop.mamba3_mimo if mimo else loop.mamba3_scan
    oracle = run(spec, as_f64(args))
    same = run(spec, args) if result[0].dtype != torch.float64 else None
    y_scale, (ssm_scale, k_scale, v_scale), _ = magnitudes(args)
    cond, angle_cond = conditioning(args)
    per_rank = mimo and args["MIMO_Out"] is None
    R = args["Q"].shape[2] if mimo else None
    l, n, p = result[0].shape[1], args["Q"].shape[-1], args["V"].shape[-1]
    last = lambda c: c[:, -1:].amax() if c.numel() else 0.0
    names = ("out", "angle", "ssm", "k", "v")
    # the angle state's error is absolute (scale 1) and owes nothing to the decays
    scales = (y_scale, 1.0, ssm_scale, k_scale, v_scale)
    conds = (cond[:, :, None] if per_rank else cond, last(angle_cond), last(cond), last(cond), 0.0)
    lengths = (y_terms(l, n, p, R, args.get("fuse_pregate_headwise_rms_norm", False), per_rank), *state_terms(l, R))
    for i, (name, x, o, sc, c, length) in enumerate(zip(names, result, oracle, scales, conds, lengths)):
        lp = None if same is None else same[i]
        if name == "angle":
            x, lp = wrap_angle(x, o), None if lp is None else wrap_angle(lp, o)
        tolerance.assert_close(f"{what}: {name}", x, o, loop=lp, length=length, repro=repro, scale=sc, conditioning=c)
