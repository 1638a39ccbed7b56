"""Mamba-3 MIMO test cases and the comparison with the float64 loop under the tolerance policy.

As equivalence/mamba3/cases.py, with the rank R and the MIMO arguments. Letters in
impls/mamba3/loop.py (MIMO section). A case's inputs are built from its seed alone.
"""

import dataclasses
import math

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from equivalence import tolerance
from equivalence.mamba3.cases import DTYPES, conditioning
from impls.mamba3 import loop

TIME_LAST, TIME_SECOND = ("ADT", "DT", "Trap"), ("Q", "K", "V", "Angles", "Z")


@dataclasses.dataclass(frozen=True)
class MimoCase:
    b: int = 2
    l: int = 5
    R: int = 2
    h_qk: int = 1
    groups: int = 2          # h = h_qk * groups
    p: int = 3
    n: int = 4
    n_ang: int = 2
    dtype: str = "f64"
    states: bool = True
    D: bool = True
    Z: bool = True
    norm: bool = False       # fuse_pregate_headwise_rms_norm, with a weight
    out_proj: bool = True    # MIMO_Out given (else the R outputs apart)
    seed: int = 0
    chunk_size: int = 4
    angle_rate: float = 2.0  # scale of the raw Angles (before tanh)

    @property
    def h(self):
        return self.h_qk * self.groups

    def id(self):
        return (f"b{self.b}-l{self.l}-R{self.R}-hqk{self.h_qk}-h{self.h}-p{self.p}-n{self.n}-ang{self.n_ang}"
                f"-T{self.chunk_size}-{self.dtype}{'-states' if self.states else ''}{'-norm' if self.norm else ''}"
                f"{'' if self.out_proj else '-per_rank'}")


def mimo_inputs(case, S=None):
    """mamba3_mimo's keyword arguments for ``case`` (the tensors, the norm flag and Input_States); S state rows."""
    g = torch.Generator().manual_seed(case.seed)
    b, l, R, h, p, n, na = case.b, case.l, case.R, case.h, case.p, case.n, case.n_ang
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    u = lambda lo, hi, *s: lo + (hi - lo) * torch.rand(*s, generator=g, dtype=torch.float64)
    DT = u(0.01, 0.6, b, h, l)
    args = dict(Q=r(b, l, R, case.h_qk, n), K=r(b, l, R, case.h_qk, n), V=r(b, l, h, p),
                ADT=-u(0.1, 3.0, b, h, l) * DT, DT=DT, Trap=2 * r(b, h, l), Q_bias=r(h, R, n), K_bias=r(h, R, n),
                MIMO_V=r(h, R, p), MIMO_Z=r(h, R, p), MIMO_Out=r(h, R, p) if case.out_proj else None,
                Angles=case.angle_rate * r(b, l, h, na), D=r(h) if case.D else None, Z=r(b, l, h, p) if case.Z else None,
                outproj_norm_weight=r(h, p) if case.norm else None)
    S = b if S is None else S
    states = (u(0, 2 * math.pi, S, h, na), r(S, h, p, n), r(S, R, h, n), r(S, h, p)) if case.states else None
    dt = DTYPES[case.dtype]
    args = {k: None if v is None else v.to(dt) for k, v in args.items()}
    args["Input_States"] = None if states is None else tuple(s.to(dt) for s in states)
    args["fuse_pregate_headwise_rms_norm"] = case.norm
    return args


def as_f64(args):
    f64 = lambda v: v.double() if isinstance(v, torch.Tensor) else v
    return {k: tuple(map(f64, v)) if isinstance(v, tuple) else f64(v) for k, v in args.items()}


def window(args, a, e, states=None):
    """mamba3_mimo's arguments for tokens a:e, starting from ``states`` (default: none given)."""
    cut = lambda k, v: (v if not isinstance(v, torch.Tensor) else v[..., a:e] if k in TIME_LAST
                        else v[:, a:e] if k in TIME_SECOND else v)
    return dict({k: cut(k, v) for k, v in args.items()}, Input_States=states)


def token(args, t):
    """The step's arguments for token t (no Input_States)."""
    pick = lambda k, v: (v if not isinstance(v, torch.Tensor) else v[..., t] if k in TIME_LAST
                         else v[:, t] if k in TIME_SECOND else v)
    return {k: pick(k, v) for k, v in args.items() if k != "Input_States"}


def mimo_case_strategy(dtypes=("f64", "f32"), max_l=10):
    return st.builds(MimoCase, b=st.integers(1, 2), l=st.integers(0, max_l), R=st.integers(1, 3),
                     h_qk=st.integers(1, 2), groups=st.integers(1, 2), p=st.integers(1, 3),
                     n=st.sampled_from([2, 4, 6, 8]), n_ang=st.integers(0, 4), dtype=st.sampled_from(dtypes),
                     states=st.booleans(), D=st.booleans(), Z=st.booleans(), norm=st.booleans(),
                     out_proj=st.booleans(), seed=st.integers(0, 2**31 - 1), chunk_size=st.integers(1, 5)).map(
        lambda c: dataclasses.replace(c, n_ang=min(c.n_ang, c.n // 2)))


# ---- the tolerance: magnitudes (each element's sum of |terms|) and conditioning --------------------

def mimo_magnitudes(args):
    """Each element's sum of |terms|, from the loop's recursion in float64 with every term made
    non-negative (a rotated pair (x_i, x_{i + n/2}) bounded by |x_i| + |x_{i + n/2}| in both places).
    The norm divides by the oracle's rms and mixes the p elements of a rank:
    d(y_i / rms) = dy_i / rms - (y_i / rms) sum_j y_j dy_j / (p rms^2), so its scale is
    Y_i / rms + |y^_i| sum_j |y^_j| Y_j / (p rms), with Y the sums of |terms| before it.
    Returns (out (b, l, [R,] h, p), ssm (S, h, p, n), k (S, R, h, n))."""
    a = as_f64(args)
    b, l, R, _, n = a["Q"].shape
    h, p = a["V"].shape[-2:]
    na = a["Angles"].shape[-1]
    half = n // 2

    def pair_bound(x):
        s = x[..., :na].abs() + x[..., half:half + na].abs()
        return torch.cat((s, x[..., na:half].abs(), s, x[..., half + na:].abs()), -1)

    Q = pair_bound(loop.per_head(a["Q"], h).abs() + a["Q_bias"].transpose(0, 1).abs())
    K = pair_bound(loop.per_head(a["K"], h).abs() + a["K_bias"].transpose(0, 1).abs())
    up = a["MIMO_V"].transpose(0, 1).abs()
    st_ = a["Input_States"]
    ssm = torch.zeros(b, h, p, n, dtype=torch.float64) if st_ is None else st_[1].abs()
    kp = torch.zeros(b, R, h, n, dtype=torch.float64) if st_ is None else st_[2].abs()
    vp = torch.zeros(b, h, p, dtype=torch.float64) if st_ is None else st_[3].abs()
    lam = torch.sigmoid(a["Trap"])
    ys = []
    for t in range(l):
        dt, alpha = a["DT"][:, :, t], torch.exp(a["ADT"][:, :, t])
        v = a["V"][:, t, None].abs() * up
        ssm = (alpha[..., None, None] * ssm
               + ((1 - lam[:, :, t]) * dt * alpha)[..., None, None] * ((vp[:, None] * up)[..., None] * kp[..., None, :]).sum(1)
               + (lam[:, :, t] * dt)[..., None, None] * (v[..., None] * K[:, t, ..., None, :]).sum(1))
        y = (ssm[:, None] * Q[:, t, ..., None, :]).sum(-1)                  # (b, R, h, p)
        if a["D"] is not None:
            y = y + a["D"].abs()[:, None] * v
        ys.append(y)
        kp, vp = K[:, t], a["V"][:, t].abs()
    Y = torch.stack(ys, 1) if ys else torch.zeros(b, 0, R, h, p, dtype=torch.float64)
    if a["fuse_pregate_headwise_rms_norm"]:
        y = loop.mamba3_mimo(**dict(a, Z=None, MIMO_Out=None, fuse_pregate_headwise_rms_norm=False,
                                    outproj_norm_weight=None))                 # y_{t,r} + D v~, the oracle's
        rms = torch.sqrt(y.square().mean(-1, keepdim=True) + a["outproj_norm_eps"])
        yn = (y / rms).abs()
        Y = Y / rms + yn * (yn * Y).sum(-1, keepdim=True) / (p * rms)
        if a["outproj_norm_weight"] is not None:
            Y = Y * a["outproj_norm_weight"].reshape(h, p).abs()
    if a["Z"] is not None:
        Y = Y * F.silu(a["Z"][:, :, None] * a["MIMO_Z"].transpose(0, 1)).abs()
    if a["MIMO_Out"] is not None:
        Y = (Y * a["MIMO_Out"].transpose(0, 1).abs()).sum(2)
    return Y, ssm, kp


def wrap_angle(actual, oracle):
    """The actual angle state moved by whole turns to the oracle's (0 and 2 pi are one angle); exact
    where no turn is needed."""
    turns = torch.round((oracle.to(actual.dtype) - actual) / (2 * math.pi))
    return torch.where(turns == 0, actual, actual + 2 * math.pi * turns)


def check_mimo(what, result, args, repro=""):
    """result: (out, angle, ssm, k, v) of a MIMO implementation on ``args`` (mimo_inputs' keys); compared
    with the float64 loop on the same (rounded) inputs under the tolerance policy, the same-dtype
    loop's own error included."""
    oracle = loop.mamba3_mimo(**as_f64(args), return_state=True)
    same = loop.mamba3_mimo(**args, return_state=True) if result[0].dtype != torch.float64 else None
    y_scale, ssm_scale, k_scale = mimo_magnitudes(dict(args, outproj_norm_eps=1e-5))
    cond, angle_cond = conditioning({k: args[k] for k in ("ADT", "DT", "Angles")})
    R, n, p = args["Q"].shape[2], args["Q"].shape[-1], args["V"].shape[-1]
    l = result[0].shape[1]
    per_rank = args["MIMO_Out"] is None
    # two more roundings before a transcendental: the products V * MIMO_V and Z * MIMO_Z
    out_cond = (cond[:, :, None] if per_rank else cond) + 2
    # rounded terms: the state (l), the readout (n), the norm's mean over p, the sum over the R ranks
    out_terms = l + n + (p if args["fuse_pregate_headwise_rms_norm"] else 0) + (0 if per_rank else R)
    last = lambda c: c[:, -1:].amax() if c.numel() else 0.0
    names = ("out", "angle", "ssm", "k", "v")
    scales = (y_scale, 1.0, ssm_scale, k_scale, None)
    conds = (out_cond, last(angle_cond), last(cond), last(cond), 0.0)
    lengths = (out_terms, max(l, 1), max(l, 1) + R, max(l, 1), 1)
    for i, (name, x, o, sc, c, length) in enumerate(zip(names, result, oracle, scales, conds, lengths)):
        lp = None if same is None else same[i]
        if name == "angle":
            x, lp = wrap_angle(x, o), None if lp is None else wrap_angle(lp, o)
        tolerance.assert_close(f"{what}: {name}", x, o, loop=lp, length=length, repro=repro, scale=sc, conditioning=c)
