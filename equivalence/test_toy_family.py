"""A third family costs a folder and a registry line: a toy scalar recurrence h_t = a_t h_{t-1} + x_t,
y_t = h_t (x, a (b, l), the state (b,)), registered for this module only; every shared property runs
on its parallel implementation, gradients included, and a planted bug in it is caught."""

import dataclasses
import functools
import sys

import pytest
import torch
from hypothesis import find, given, settings
from hypothesis import strategies as st

import impls

from . import properties as P
from .tolerance import conditioning, gradient_conditioning

NAME, SCAN_ARGS, TIME_ARGS, TIME_DIM, Y_AXES = "toy", ("x", "a", "initial_state"), ("x", "a"), 1, ("b", "l")
STATE_ARG, CHANNEL_ARG, BATCH_ARGS, CHUNK_SIZES, PACKING, PINNED = "initial_state", "x", SCAN_ARGS, None, None, ()
DTYPES = {"f32": torch.float32, "f64": torch.float64}


@dataclasses.dataclass(frozen=True)
class Case:
    b: int
    l: int
    dtype: str = "f32"
    initial_state: bool = False
    seed: int = 0
    g, id, torch_dtype = 0, property(lambda c: f"b{c.b}-l{c.l}-{c.dtype}-s{c.seed}"), property(lambda c: DTYPES[c.dtype])
    within = lambda c, limits: c  # noqa: E731


def cases(min_b=1):
    return st.builds(Case, b=st.integers(min_b, 3), l=st.integers(1, 40), dtype=st.sampled_from(tuple(DTYPES)),
                     initial_state=st.booleans(), seed=st.integers(0, 2**32 - 1))


def make_inputs(c, dtype=None):
    gen = torch.Generator().manual_seed(c.seed)
    x, a = torch.randn(c.b, c.l, generator=gen, dtype=torch.float64), torch.rand(c.b, c.l, generator=gen, dtype=torch.float64)
    h0 = torch.randn(c.b, generator=gen, dtype=torch.float64) if c.initial_state else None
    return {k: v if v is None else v.to(c.torch_dtype).to(dtype or c.torch_dtype)
            for k, v in dict(x=x, a=0.9 * a + 0.05, initial_state=h0).items()}


def loop(x, a, initial_state=None):  # the spec: y (b, l), last state (b,)
    h, ys = x.new_zeros(x.shape[0]) if initial_state is None else initial_state, []
    for t in range(x.shape[1]):
        h = a[:, t] * h + x[:, t]
        ys.append(h)
    return torch.stack(ys, 1) if ys else x, h


def parallel(x, a, initial_state=None, bug=False):  # h_t = P_t (h0 + sum_{s<=t} x_s / P_s), log P = cumsum log a
    if x.shape[1] == 0:
        return loop(x, a, initial_state)
    log_p = torch.log(a).cumsum(1) - bug * torch.log(a[:, :1])
    h = torch.exp(log_p) * ((0 if initial_state is None else initial_state[:, None]) + (x * torch.exp(-log_p)).cumsum(1))
    return h, h[:, -1]


def conditionings(c):
    """exp of a cumulative log-sum rounds relative to the sum so far: the policy's conditioning() with
    log a in the place of dt A (an exact input, dt_rel 0); the gradients the whole sequence's."""
    k = conditioning(torch.log(reference_inputs(c)["a"]), torch.zeros(()), TIME_DIM)
    return k, k[:, -1], gradient_conditioning(k[:, -1], gated=False)


def magnitudes(c, weights=None):
    """The loop on |inputs|, and with weights |gradients| of the weighted sum; but d/da_t of the log
    form reaches every h_s (s >= t) through log P_s, in terms of size |h_s| that cancel to the loop's
    lambda_t h_{t-1}: 2 (1 / a_t) sum_{s>=t} |w_s| |h_s| summed, from each h_s's sum of |terms|."""
    x64 = reference_inputs(c)
    leaves = {k: v.abs().requires_grad_() for k, v in x64.items() if v is not None}
    y, h = loop(**leaves)
    if weights is None:
        return y.detach(), h.detach(), None
    w = weights[0].abs().clone()
    w[:, -1] += weights[1].abs()
    grads = torch.autograd.grad((y * weights[0].abs()).sum() + (h * weights[1].abs()).sum(), list(leaves.values()))
    sums = {k: g.abs() for k, g in zip(leaves, grads)}
    sums["a"] = sums["a"] + 2 * (w * y.detach()).flip(1).cumsum(1).flip(1) / x64["a"]
    return y.detach(), h.detach(), sums


reference_inputs, scan = (lambda c: make_inputs(c, torch.float64)), (lambda name, c, x, chunk_size=None: impls.get(name, NAME).scan(**x))
state_shape, call, supported = (lambda c: (c.b,)), (lambda n, c: f"scan({n!r}, {c!r})"), (lambda e, c: c.torch_dtype in e.supports["dtypes"])
terms, exact_kinds = (lambda c, output, arg=None: 2 * c.l + 2), (lambda c: True)   # sums of l products
STRATEGIES, FAMILY = {k: cases(min_b=2 if k == "batch" else 1) for k in ("values", "batch", "gradients")}, sys.modules[__name__]


def step(name, state, x, t):
    y, state[:] = loop(x["x"][:, t:t + 1], x["a"][:, t:t + 1], state)
    return y[:, 0]


@pytest.fixture(autouse=True, scope="module")
def toy_family():
    impls.add_family(impls.Family(NAME, scan, step, dict(dtypes=tuple(DTYPES.values()), gradients=True, initial_state=True,
                     deterministic=True, batch_invariant=False, case_limits=None), {}, "--toy-impl", "--toy-impl-step", __name__))
    impls.register("loop", loop, step=loop, family=NAME)
    impls.register("parallel", parallel, family=NAME)
    yield
    impls.FAMILIES.pop(NAME)


@settings(max_examples=15)
@given(case=cases(), k=st.integers(0, 40), j=st.integers(0, 2), poison=st.sampled_from(tuple(P.NONFINITE)))
def test_every_shared_property_holds(case, k, j, poison):
    for name in ("loop", "parallel"):
        for check, *extra in ((P.check_values,), (P.check_split, k), (P.check_causality, k), (P.check_batch_independence, j),
                              (P.check_gradients,), (P.check_determinism,), (P.check_nan_propagation, k),
                              (P.check_nonfinite, "x", k, poison), (P.check_nonfinite_causality, k, poison)):
            check(FAMILY, name, case, *extra)
    P.check_prefill_then_decode(FAMILY, "loop", case, k)


def caught(case):
    try:
        P.check_values(FAMILY, "buggy", case)
    except AssertionError:
        return True
    return False


def test_a_planted_bug_in_parallel_is_caught():
    impls.register("buggy", functools.partial(parallel, bug=True), family=NAME)   # every P_t divided by a_1
    find(cases(), caught, settings=settings(database=None))
