"""SSD test cases: sizes, dtype, options and an input regime, drawn by hypothesis, built from a seed.

An SSDCase is plain data; ``make_inputs(case)`` turns it into ssd_scan's keyword arguments
deterministically (a torch.Generator seeded from ``case.seed``), so any failure reproduces from the
case's repr alone. Letters (b, l, h, p, n, g) as in impls/ssd/frontdoor.py.

Regimes (what each draws is the effective step size dt = clamp(softplus(dt + dt_bias)) before the
dt_limit clamp; the raw dt is derived from it, so the options do not change the regime):
    mamba2  Mamba-2's initialisation: A = -U(1, 16) per head, dt log-uniform in [1e-3, 0.1]
    stress  dt up to 2 and A down to -50: one token's decay reaches exp(-100), so decays underflow
            within a chunk
    slow    |dt A| around 1e-4: thousands of tokens of memory, the state grows large
Options beyond the regime:
    D          "none", "h" (one per head) or "hp" (per head and channel, the form official decode mishandled)
    dt_limit   "default" (0, inf) or "tight" (0.01, 0.05): the clamp bites in every regime
    extreme_dt one token in five gets a raw dt from EXTREME_RAW_DT: with softplus, dt + dt_bias
               crossing the softplus threshold 20 and past float32's exp overflow (88.7); without
               it, negative values the lower limit must turn into 0; and a fifth of the gate z
               below -100 (log-uniform down to -1e35, clipped to the input dtype's range)
"""

import dataclasses
import math

import torch
from hypothesis import strategies as st

from impls.frontdoor import compute_dtype

from ..inputs import DTYPES, chunk_size_within, materialize
REGIMES = ("mamba2", "stress", "slow")
DT_LIMITS = {"default": (0.0, float("inf")), "tight": (0.01, 0.05)}
EXTREME_RAW_DT = (-30.0, -0.5, 19.5, 20.5, 25.0, 100.0)
SCAN_ARGS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")
TIME_ARGS = ("x", "dt", "B", "C", "z")   # the arguments with a time axis (axis 1)


@dataclasses.dataclass(frozen=True)
class SSDCase:
    b: int
    l: int
    h: int
    p: int
    n: int
    g: int = 1
    dtype: str = "f32"
    regime: str = "mamba2"
    D: str = "h"                # "none", "h" or "hp"
    z: bool = True
    dt_bias: bool = True
    softplus: bool = True
    dt_limit: str = "default"   # "default" or "tight"
    extreme_dt: bool = False
    initial_states: bool = False
    strided: bool = False       # inputs are non-contiguous views
    chunk_size: int = 64
    seed: int = 0

    @property
    def id(self):
        opts = "".join(f"-{k}" for k in ("z", "dt_bias", "softplus", "extreme_dt", "initial_states", "strided")
                       if getattr(self, k))
        return (f"b{self.b}-l{self.l}-h{self.h}-p{self.p}-n{self.n}-g{self.g}-{self.dtype}-{self.regime}"
                f"-D{self.D}-lim{self.dt_limit}{opts}-cs{self.chunk_size}-s{self.seed}")

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    def within(self, limits):
        """The same case folded into an implementation's size limits (b, l, h, p, n), keeping g a
        divisor of h; folding by remainder keeps odd sizes odd-ish and spreads them. ``chunks``
        limits how many chunks the sequence spans, by raising chunk_size (an interpreter's time
        grows with the number of programs, one per chunk and head)."""
        if not limits:
            return self
        fold = {k: 1 + (getattr(self, k) - 1) % limits[k] for k in ("b", "l", "h", "p", "n") if k in limits}
        new = dataclasses.replace(self, **fold)
        return dataclasses.replace(new, g=math.gcd(self.g, new.h),
                                   chunk_size=chunk_size_within(new.chunk_size, new.l, limits))


def make_inputs(case, dtype=None):
    """Keyword arguments for impls.ssd_scan for ``case`` (all but chunk_size).

    x, dt, z, B, C are in the case's dtype; A, D, dt_bias and initial_states in its compute dtype.
    With ``dtype=torch.float64`` the very same values come back in float64: the oracle's inputs
    (values are rounded to the case's dtype first, so the oracle sees what the implementation sees).
    """
    gen = torch.Generator().manual_seed(case.seed)
    b, l, h, p, n, g = case.b, case.l, case.h, case.p, case.n, case.g

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    x, z, h0 = randn(b, l, h, p), randn(b, l, h, p), randn(b, h, p, n)
    B, C = randn(b, l, g, n), randn(b, l, g, n)
    D = randn(h) if case.D == "h" else randn(h, p)
    if case.regime == "mamba2":
        A = -(1 + 15 * rand(h))
        dt = torch.exp(math.log(1e-3) + (math.log(0.1) - math.log(1e-3)) * rand(b, l, h))
    elif case.regime == "stress":
        A = -(1 + 49 * rand(h))
        dt = 2 * rand(b, l, h)
    elif case.regime == "slow":
        A = -(0.5 + rand(h))
        dt = 1e-4 * (0.5 + rand(b, l, h)) / A.abs()
    else:
        raise ValueError(f"unknown regime {case.regime!r}; known: {REGIMES}")
    bias = 0.1 * randn(h)
    raw = torch.log(torch.expm1(dt)) if case.softplus else dt  # inverse of softplus (dt > 0)
    if case.extreme_dt:
        pick = torch.randint(len(EXTREME_RAW_DT), (b, l, h), generator=gen)
        every_fifth = torch.rand(b, l, h, generator=gen, dtype=torch.float64) < 0.2
        raw = torch.where(every_fifth, torch.tensor(EXTREME_RAW_DT, dtype=torch.float64)[pick], raw)
        # the gate too: far below where exp(-z) overflows (silu(z) = -0), down to -1e35
        z = torch.where(rand(b, l, h, p) < 0.2, -torch.pow(10.0, 2 + 33 * rand(b, l, h, p)), z)
    dt_raw = raw - (bias if case.dt_bias else 0)

    in_dtype = case.torch_dtype
    f = compute_dtype(in_dtype)
    z = z.clamp(min=-torch.finfo(in_dtype).max)
    values = dict(x=(x, in_dtype), dt=(dt_raw, in_dtype), A=(A, f), B=(B, in_dtype), C=(C, in_dtype),
                  D=None if case.D == "none" else (D, f), z=(z, in_dtype) if case.z else None,
                  dt_bias=(bias, f) if case.dt_bias else None,
                  initial_states=(h0, f) if case.initial_states else None)
    out = materialize(values, dtype, case.strided)
    out["dt_softplus"] = case.softplus
    out["dt_limit"] = DT_LIMITS[case.dt_limit]
    return out


def reference_inputs(case):
    """make_inputs in float64: the inputs of the oracle run."""
    return make_inputs(case, dtype=torch.float64)


CHUNK_SIZES = (1, 2, 17, 64, 256)


@st.composite
def cases(draw, dtypes=tuple(DTYPES), regimes=REGIMES, max_b=3, max_l=300, max_h=8, max_p=16, max_n=32,
          min_b=1, chunk_sizes=CHUNK_SIZES):
    """Cases over every option: sizes, grouping, dtype, regime, each optional argument, strides,
    and the chunk size (the property that results do not depend on it is tested on its own)."""
    h = draw(st.integers(1, max_h))
    return SSDCase(
        b=draw(st.integers(min_b, max_b)), l=draw(st.integers(1, max_l)), h=h,
        p=draw(st.integers(1, max_p)), n=draw(st.integers(1, max_n)),
        g=draw(st.sampled_from([g for g in range(1, h + 1) if h % g == 0])),
        dtype=draw(st.sampled_from(dtypes)), regime=draw(st.sampled_from(regimes)),
        D=draw(st.sampled_from(("none", "h", "hp"))), z=draw(st.booleans()), dt_bias=draw(st.booleans()),
        softplus=draw(st.booleans()), dt_limit=draw(st.sampled_from(tuple(DT_LIMITS))),
        extreme_dt=draw(st.booleans()), initial_states=draw(st.booleans()), strided=draw(st.booleans()),
        chunk_size=draw(st.sampled_from(chunk_sizes)), seed=draw(st.integers(0, 2**32 - 1)),
    )


# Known edge cases, pinned with @example: one token, one of everything, a chunk boundary crossed by
# one token, grouping with several heads per group, odd sizes, the half dtypes.
PINNED = (
    SSDCase(b=1, l=1, h=1, p=1, n=1),
    SSDCase(b=2, l=65, h=4, p=3, n=5, g=2, dtype="bf16", D="hp", initial_states=True, seed=1),
    SSDCase(b=1, l=33, h=3, p=7, n=2, g=3, dtype="f16", regime="stress", chunk_size=17, seed=2),
    SSDCase(b=2, l=300, h=8, p=5, n=9, g=2, regime="stress", extreme_dt=True, initial_states=True, chunk_size=256, seed=3),
    SSDCase(b=1, l=129, h=2, p=16, n=32, g=1, regime="slow", dt_limit="tight", softplus=False, strided=True, seed=4),
    SSDCase(b=3, l=100, h=6, p=2, n=4, g=6, dtype="f64", D="none", z=False, dt_bias=False, extreme_dt=True,
            softplus=False, chunk_size=2, seed=5),
    # decays of exp(-1000) early in a chunk, then decays near 1: a segment sum taken as the difference
    # of two prefix sums of size 1000 loses 1e-4 of each later decay (found here, at l = 64, where
    # the policy's floor is tight; hidden by the floor at l = 300)
    SSDCase(b=1, l=64, h=2, p=4, n=4, extreme_dt=True, chunk_size=64, seed=4),
)
