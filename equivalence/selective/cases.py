"""Test cases: sizes, dtype, options and an input regime, drawn by hypothesis, built from a seed.

A Case is plain data; ``make_inputs(case)`` turns it into tensors deterministically (a
torch.Generator seeded from ``case.seed``: hypothesis seeds random and numpy, not torch), so any
failure reproduces from the Case's repr alone.

Regimes (the effective step size dt = softplus(delta + delta_bias) is what each regime draws; the
raw delta is derived from it so that the options do not change the regime):
    mamba     Mamba's initialisation: A = -(1..n) per channel, dt log-uniform in [1e-3, 0.1]
    official  the official test distribution: A = -0.5 U(0,1), delta = 0.5 U(0,1), delta_bias = 0.5 U(0,1)
    stress    dt up to 2 and A down to -50: one step's decay reaches exp(-100), cumulative decay underflows
    slow      |dt A| around 1e-4: thousands of steps of memory, the state grows large

Edge regime, drawn by the property tests beside those four (EDGE_REGIMES; the benchmarks' accuracy
sweep keeps to the four above):
    extreme   every documented rule at once: delta + delta_bias per element from 0 through the
              softplus threshold (20) to past float32's exp overflow (about 88.7); delta exactly 0
              at about a fifth of the positions; |A| log-uniform in [1e-4, 1e3], so dt A runs from
              about -1e-10 (a decay of 1 in float32) to -1e5 (a decay of exactly 0); z below -100
              (log-uniform down to -1e35, past float32's exp overflow: silu(z) = -0) at about a fifth
              of the positions, clipped to the input dtype's range

Non-finite inputs: ``Case.poison = (argument, flat index, "inf" | "-inf" | "nan")`` writes that value
into one element of the argument (the index is taken modulo its size), so a failure on a poisoned
input reproduces from the Case's repr like any other.
"""

import dataclasses
import math

import torch
from hypothesis import strategies as st

from impls.frontdoor import compute_dtype

from ..inputs import DTYPES, materialize
REGIMES = ("mamba", "official", "stress", "slow")
EDGE_REGIMES = ("extreme",)
# the arguments a non-finite value can be written into (A excepted: it is a parameter, not data)
POISONABLE = ("u", "delta", "B", "C", "z", "D", "delta_bias", "initial_state")
NONFINITE = ("inf", "-inf", "nan")
SCAN_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


@dataclasses.dataclass(frozen=True)
class Case:
    b: int
    d: int
    n: int
    l: int
    g: int = 0              # 0: B, C are (b, n, l); g >= 1: (b, g, n, l)
    dtype: str = "f32"
    regime: str = "mamba"
    D: bool = True
    z: bool = True
    delta_bias: bool = True
    softplus: bool = True
    initial_state: bool = False
    strided: bool = False   # inputs are non-contiguous views
    seed: int = 0
    poison: tuple = ()      # (argument, flat index, "inf" | "-inf" | "nan"): one non-finite input

    @property
    def id(self):
        opts = "".join(f"-{k}" for k in ("D", "z", "delta_bias", "softplus", "initial_state", "strided") if getattr(self, k))
        poison = f"-{self.poison[0]}[{self.poison[1]}]={self.poison[2]}" if self.poison else ""
        return f"b{self.b}-d{self.d}-n{self.n}-l{self.l}-g{self.g}-{self.dtype}-{self.regime}{opts}{poison}-s{self.seed}"

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    def within(self, limits):
        """The same case folded into an implementation's size limits (for slow implementations,
        such as a kernel run by Triton's interpreter). Folding by remainder keeps odd sizes odd-ish
        and spreads them, where clamping would pile every case onto the limit."""
        if not limits:
            return self
        fold = {k: 1 + (getattr(self, k) - 1) % limits[k] for k in ("b", "d", "n", "l") if k in limits}
        new = dataclasses.replace(self, **fold)
        return dataclasses.replace(new, g=math.gcd(self.g, new.d)) if self.g else new


def make_inputs(case, dtype=None):
    """Keyword arguments for selective_scan for ``case``.

    Inputs u, delta, z, B, C are in the case's dtype, parameters and state in its compute dtype.
    With ``dtype=torch.float64`` the very same values come back in float64: the oracle's inputs
    (values are rounded to the case's dtype first, so the oracle sees what the implementation sees).
    """
    gen = torch.Generator().manual_seed(case.seed)
    b, d, n, l = case.b, case.d, case.n, case.l

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    bc_shape = (b, case.g, n, l) if case.g else (b, n, l)
    u, B, C, z, D, h0 = randn(b, d, l), randn(*bc_shape), randn(*bc_shape), randn(b, d, l), randn(d), randn(b, d, n)
    if case.regime == "official":
        A = -0.5 * rand(d, n)
        delta = 0.5 * rand(b, d, l)
        bias = 0.5 * rand(d)
    else:
        if case.regime == "mamba":
            A = -torch.arange(1, n + 1, dtype=torch.float64).expand(d, n).clone()
            dt = torch.exp(math.log(1e-3) + (math.log(0.1) - math.log(1e-3)) * rand(b, d, l))
        elif case.regime == "stress":
            A = -(1 + 49 * rand(d, n))
            dt = 2 * rand(b, d, l)
        elif case.regime == "slow":
            A = -(0.5 + rand(d, n))
            dt = 1e-4 * (0.5 + rand(b, d, l)) / A.abs().mean(-1)[:, None]
        elif case.regime != "extreme":
            raise ValueError(f"unknown regime {case.regime!r}; known: {REGIMES + EDGE_REGIMES}")
        if case.regime == "extreme":
            A = -torch.pow(10.0, -4 + 7 * rand(d, n))
            # delta + delta_bias itself is drawn (softplus or not): a mix of 0, tiny, ordinary, around
            # the threshold 20 and past exp's float32 overflow at 88.7
            bands = torch.tensor([[0, 0], [0, 1e-6], [0, 1], [15, 25], [85, 100]], dtype=torch.float64)
            pick = bands[torch.randint(0, len(bands), (b, d, l), generator=gen)]
            raw = pick[..., 0] + (pick[..., 1] - pick[..., 0]) * rand(b, d, l)
            bias = 0.1 * randn(d).abs()   # >= 0: without softplus, dt = bias where delta is 0 must not grow h
            delta = raw - (bias[:, None] if case.delta_bias else 0)
            delta[rand(b, d, l) < 0.2] = 0.0
            z = torch.where(rand(b, d, l) < 0.2, -torch.pow(10.0, 2 + 33 * rand(b, d, l)), z)
        else:
            bias = 0.1 * randn(d)
            raw = torch.log(torch.expm1(dt)) if case.softplus else dt  # inverse of softplus (dt > 0)
            delta = raw - (bias[:, None] if case.delta_bias else 0)

    in_dtype = case.torch_dtype
    f = compute_dtype(in_dtype)
    z = z.clamp(min=-torch.finfo(in_dtype).max)
    values = dict(u=(u, in_dtype), delta=(delta, in_dtype), A=(A, f), B=(B, in_dtype), C=(C, in_dtype),
                  D=(D, f) if case.D else None, z=(z, in_dtype) if case.z else None,
                  delta_bias=(bias, f) if case.delta_bias else None,
                  initial_state=(h0, f) if case.initial_state else None)
    if case.poison:
        arg, index, value = case.poison
        if values.get(arg) is None:
            raise ValueError(f"Case.poison names {arg!r}, which this case does not pass")
        v = values[arg][0].clone()
        v.view(-1)[index % v.numel()] = float(value)
        values[arg] = (v, values[arg][1])
    out = materialize(values, dtype, case.strided)
    out["delta_softplus"] = case.softplus
    return out


def reference_inputs(case):
    """make_inputs in float64: the inputs of the oracle run."""
    return make_inputs(case, dtype=torch.float64)


# What hypothesis shrinks towards comes first in each list: float32, then float64, then the halves.
SHRINK_ORDER = ("f32", "f64", "bf16", "f16")


@st.composite
def cases(draw, dtypes=SHRINK_ORDER, regimes=REGIMES + EDGE_REGIMES, max_b=3, max_d=40, max_n=16, max_l=300,
          min_b=1, poison=False):
    """Cases over every option: b, d, n, l, grouping, dtype, regime, each optional argument, strides.
    Every draw shrinks towards the simplest case (b = d = n = l = 1, ungrouped, float32, Mamba's
    regime, every option off): a shrunk failure is as small as the bug allows.
    poison=True: also one non-finite value (inf, -inf or NaN) in one input that the case passes."""
    d = draw(st.integers(1, max_d))
    divisors = [g for g in range(1, d + 1) if d % g == 0]
    dtypes = sorted(dtypes, key=lambda k: SHRINK_ORDER.index(k) if k in SHRINK_ORDER else len(SHRINK_ORDER))
    case = Case(
        b=draw(st.integers(min_b, max_b)), d=d, n=draw(st.integers(1, max_n)), l=draw(st.integers(1, max_l)),
        g=draw(st.sampled_from([0] + divisors)), dtype=draw(st.sampled_from(dtypes)),
        regime=draw(st.sampled_from(regimes)), D=draw(st.booleans()), z=draw(st.booleans()),
        delta_bias=draw(st.booleans()), softplus=draw(st.booleans()), initial_state=draw(st.booleans()),
        strided=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)),
    )
    if poison:
        present = [a for a in POISONABLE if a in ("u", "delta", "B", "C") or getattr(case, a)]
        case = dataclasses.replace(case, poison=(draw(st.sampled_from(present)), draw(st.integers(0, 10**6)),
                                                 draw(st.sampled_from(NONFINITE))))
    return case


# The plainest case, the one hypothesis shrinks towards: every size 1, every option off. Pinned with
# @example in the drawn tests (it is as small as a failure can be, so it pre-empts nothing smaller).
SMALLEST = Case(b=1, d=1, n=1, l=1, D=False, z=False, delta_bias=False, softplus=False)

# Known edge cases, each run by a test of its own (test_values.py: test_pinned_edge_case), never as
# an @example of a drawn test: hypothesis does not shrink an @example, so a failing one would
# pre-empt the smaller, shrunk failure. Single token, single channel, single state, long sequences
# past 256 and not a power of two, and grouping with several channels per group: first on the
# smallest geometry where the channel-to-group mapping shows (g = 2, d/g = 2), which the drawn cases
# miss in a few runs in a hundred.
PINNED = (
    Case(b=1, d=1, n=1, l=1),
    Case(b=1, d=4, n=2, l=5, g=2, seed=5),
    Case(b=2, d=1, n=3, l=7, g=1, dtype="bf16", initial_state=True),
    Case(b=1, d=5, n=1, l=33, dtype="f16", regime="official"),
    Case(b=2, d=37, n=5, l=300, g=37, dtype="f32", regime="stress", initial_state=True, seed=1),
    Case(b=1, d=12, n=16, l=1000, g=3, dtype="f32", regime="slow", initial_state=True, seed=2),
    Case(b=2, d=8, n=4, l=777, g=2, dtype="bf16", regime="mamba", strided=True, seed=3),
    Case(b=1, d=6, n=4, l=523, g=0, dtype="f64", regime="stress", initial_state=True, seed=4),
)
