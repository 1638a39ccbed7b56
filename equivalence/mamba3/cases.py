"""Mamba-3 test cases and the comparison with the float64 loop under the tolerance policy.

A Case is plain data; ``inputs(case)`` builds the scan's arguments from ``case.seed`` alone
(a seeded torch.Generator), so a failure reproduces from the case's repr. Letters as in
impls/mamba3/loop.py. Inputs are drawn in float64 and rounded to the case's dtype; the oracle is
the loop in float64 on the rounded values.
"""

import dataclasses
import math

import torch
from hypothesis import strategies as st

from equivalence import tolerance
from impls.mamba3 import loop

DTYPES = {"f32": torch.float32, "f64": torch.float64}
ARGS = ("Q", "K", "V", "ADT", "DT", "Trap", "Q_bias", "K_bias", "Angles", "D", "Z")
# The arguments with a time axis, V first (prefill-then-decode takes its empty slice as the empty
# output: same shape and dtype), and those whose time axis is not 1: ADT, DT and Trap are (b, h, l)
TIME_ARGS = ("V", "Q", "K", "Z", "Angles", "ADT", "DT", "Trap")
TIME_DIMS = dict(ADT=-1, DT=-1, Trap=-1)
STATE_PARTS = ("angle", "ssm", "k", "v")


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
        return (f"b{self.b}-l{self.l}-hqk{self.h_qk}-h{self.h}-p{self.p}-n{self.n}-ang{self.n_ang}-T{self.chunk_size}"
                f"-{self.dtype}{'-states' if self.states else ''}")

    def within(self, limits):
        """The case with b, l, p and n at most ``limits``' (a dict, or None for no limits); n stays
        even and n_ang at most n / 2."""
        if not limits:
            return self
        c = dataclasses.replace(self, **{k: min(getattr(self, k), v) for k, v in limits.items()
                                         if k in ("b", "l", "p", "n")})
        n = max(2, c.n - c.n % 2)
        return dataclasses.replace(c, n=n, n_ang=min(c.n_ang, n // 2))


def inputs(case, S=None):
    """The scan's arguments (dict, ARGS plus Input_States) for ``case``; S state rows (default b)."""
    g = torch.Generator().manual_seed(case.seed)
    b, l, h, p, n, na = case.b, case.l, case.h, case.p, case.n, case.n_ang
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    u = lambda lo, hi, *s: lo + (hi - lo) * torch.rand(*s, generator=g, dtype=torch.float64)
    DT = u(0.01, 0.6, b, h, l)
    args = dict(Q=r(b, l, case.h_qk, n), K=r(b, l, case.h_qk, n), V=r(b, l, h, p),
                ADT=-u(0.1, 3.0, b, h, l) * DT, DT=DT, Trap=2 * r(b, h, l),
                Q_bias=r(h, n), K_bias=r(h, n), Angles=case.angle_rate * r(b, l, h, na),
                D=r(h) if case.D else None, Z=r(b, l, h, p) if case.Z else None)
    S = b if S is None else S
    states = (u(0, 2 * math.pi, S, h, na), r(S, h, p, n), r(S, h, n), r(S, h, p)) if case.states else None
    dt = DTYPES[case.dtype]
    args = {k: None if v is None else v.to(dt) for k, v in args.items()}
    args["Input_States"] = None if states is None else tuple(s.to(dt) for s in states)
    return args


def as_dtype(args, dtype):
    """The scan's tensor arguments (the states' parts too) cast to ``dtype``; anything else as it is."""
    cast = lambda v: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
    return {k: (tuple(map(cast, v)) if isinstance(v, tuple) else cast(v)) for k, v in args.items()}


def as_f64(args):
    return as_dtype(args, torch.float64)


def case_strategy(dtypes=("f64", "f32"), max_l=12, min_l=0, min_b=1, max_b=2, max_p=3, chunk_sizes=(1, 6)):
    """Cases smallest first when shrunk: n_ang is 0 or n / 2 (every pair rotated)."""
    return st.builds(Case, b=st.integers(min_b, max_b), l=st.integers(min_l, max_l), h_qk=st.integers(1, 2),
                     groups=st.integers(1, 2), p=st.integers(1, max_p), n=st.sampled_from([2, 4, 6]),
                     n_ang=st.integers(0, 1), dtype=st.sampled_from(dtypes), states=st.booleans(),
                     D=st.booleans(), Z=st.booleans(), seed=st.integers(0, 2**31 - 1),
                     chunk_size=st.integers(*chunk_sizes)).map(
        lambda c: dataclasses.replace(c, n_ang=c.n_ang * (c.n // 2)) if c.n_ang else c)


# ---- the tolerance: magnitudes (each element's sum of |terms|) and conditioning --------------------

def magnitudes(args):
    """Each output element's sum of |terms|, from the loop's recursion in float64 with every term made
    non-negative (a rotated pair bounded by |x0| + |x1| in both places; D, V, Z's gate by |.|).
    Returns (out (b, l, h, p), ssm (S, h, p, n), k (S, h, n)): the scale of the float rounding."""
    a = as_f64(args)
    b, l, h, p = a["V"].shape
    n = a["Q"].shape[-1]
    m = 2 * a["Angles"].shape[-1]

    def pair_bound(x):
        s = x[..., 0:m:2].abs() + x[..., 1:m:2].abs()
        return torch.cat((torch.stack((s, s), -1).flatten(-2), x[..., m:].abs()), -1)

    Q = loop.per_head(a["Q"], h).abs() + a["Q_bias"].abs()
    K = loop.per_head(a["K"], h).abs() + a["K_bias"].abs()
    st_ = a["Input_States"]
    ssm = torch.zeros(b, h, p, n, dtype=torch.float64) if st_ is None else st_[1].abs()
    kp = torch.zeros(b, h, n, dtype=torch.float64) if st_ is None else st_[2].abs()
    vp = torch.zeros(b, h, p, dtype=torch.float64) if st_ is None else st_[3].abs()
    lam = torch.sigmoid(a["Trap"])
    ys = []
    for t in range(l):
        dt = a["DT"][:, :, t]
        alpha = torch.exp(a["ADT"][:, :, t])
        k = pair_bound(K[:, t])
        ssm = (alpha[..., None, None] * ssm + ((1 - lam[:, :, t]) * dt * alpha)[..., None, None] * vp[..., None] * kp[..., None, :]
               + (lam[:, :, t] * dt)[..., None, None] * a["V"][:, t].abs()[..., None] * k[..., None, :])
        ys.append((ssm * pair_bound(Q[:, t])[..., None, :]).sum(-1))
        kp, vp = k, a["V"][:, t].abs()
    y = torch.stack(ys, 1) if ys else torch.zeros(b, 0, h, p, dtype=torch.float64)
    if a["D"] is not None:
        y = y + a["D"].abs()[:, None] * a["V"].abs()
    if a["Z"] is not None:
        y = y * torch.nn.functional.silu(a["Z"]).abs()
    return y, ssm, kp


def conditioning(args):
    """Ulps a rounding can grow to by token t, (b, l, h, 1), for out (its last token's for states), and
    the angle's own part (the angle state's absolute error, in eps, is its last token's).
    The decays as the policy counts them (tolerance.conditioning on ADT, which is exact); the angle
    adds, per token, its own rounding relative to |theta| < 2 pi plus the increment's (pi tanh(.) DT:
    three roundings and a tanh), accumulated over the sequence because each token's angle inherits
    the previous one's error; sin, cos and the sigmoid of Trap add TRANSCENDENTAL_ULPS each."""
    a = as_f64({k: args[k] for k in ("ADT", "DT", "Angles")})
    adt = a["ADT"].transpose(1, 2)[..., None]                           # (b, l, h, 1)
    decay = tolerance.conditioning(adt, torch.zeros(()), 1)
    per_pair = angle_ulps(a)
    per_token = per_pair.amax(-1, keepdim=True) if per_pair.shape[-1] else 0 * adt
    angle = torch.as_tensor(per_token).cumsum(1)
    return decay + angle + 3 * tolerance.TRANSCENDENTAL_ULPS + tolerance.GATE_ULPS, angle


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
    """result: (out, angle, ssm, k, v) of an implementation on ``args``; compared with the float64 loop
    on the same (rounded) inputs under the tolerance policy, the float32 loop's own error included."""
    oracle = loop.mamba3_scan(**as_f64(args), return_final_states=True)
    same = loop.mamba3_scan(**args, return_final_states=True) if result[0].dtype != torch.float64 else None
    y_scale, ssm_scale, k_scale = magnitudes(args)
    cond, angle_cond = conditioning(args)
    l, n = result[0].shape[1], args["Q"].shape[-1]
    last = lambda c: c[:, -1:].amax() if c.numel() else 0.0
    names = ("out", "angle", "ssm", "k", "v")
    # the angle state's error is absolute (scale 1) and owes nothing to the decays
    scales = (y_scale, 1.0, ssm_scale, k_scale, None)
    conds = (cond, last(angle_cond), last(cond), last(cond), 0.0)
    for i, (name, x, o, sc, c) in enumerate(zip(names, result, oracle, scales, conds)):
        lp = None if same is None else same[i]
        if name == "angle":
            x, lp = wrap_angle(x, o), None if lp is None else wrap_angle(lp, o)
        tolerance.assert_close(f"{what}: {name}", x, o, loop=lp, length=l + n if name == "out" else max(l, 1),
                               repro=repro, scale=sc, conditioning=c)
