"""A third family costs a folder and a registry line: a toy scalar recurrence h_t = a_t h_{t-1} + x_t,
y_t = h_t (x, a (b, l), the state (b,)), registered for this module only; every shared property runs
on its parallel implementation, gradients included, and a planted bug in it is caught."""

import dataclasses
import functools
import sys

import pytest
import torch
from hypothesis import find, given, settings, strategies as st

import impls

from . import properties as P
from .inputs import DTYPES, materialize
from .tolerance import conditioning, gradient_conditioning

NAME, SCAN_ARGS, TIME_ARGS, TIME_DIM, Y_AXES = "toy", ("x", "a", "initial_state"), ("x", "a"), 1, ("b", "l")
STATE_ARG, CHANNEL_ARG, BATCH_ARGS, CHUNK_SIZES, PACKING, PINNED = "initial_state", "x", SCAN_ARGS, None, None, ()


@dataclasses.dataclass(frozen=True)
class Case:
    b: int
    l: int
    dtype: str = "f32"
    initial_state: bool = False
    seed: int = 0
    g, within = 0, lambda c, limits: c   # ungrouped; no size limits
    id, torch_dtype = property(lambda c: f"b{c.b}-l{c.l}-{c.dtype}-s{c.seed}"), property(lambda c: DTYPES[c.dtype])


def cases(min_b=1):
    return st.builds(Case, b=st.integers(min_b, 3), l=st.integers(1, 40), dtype=st.sampled_from(("f32", "f64")),
                     initial_state=st.booleans(), seed=st.integers(0, 2**32 - 1))


def make_inputs(c, dtype=None):   # x (b, l), a (b, l) in [0.05, 0.95], initial_state (b,)
    r, f = torch.Generator().manual_seed(c.seed), c.torch_dtype
    x, a, h0 = (torch.randn(*s, generator=r, dtype=torch.float64) for s in ((c.b, c.l), (c.b, c.l), (c.b,)))
    a = 0.05 + 0.9 * torch.sigmoid(a)
    return materialize(dict(x=(x, f), a=(a, f), initial_state=(h0, f) if c.initial_state else None), dtype)


def loop(x, a, initial_state=None):  # the spec: y (b, l), last state (b,)
    hs = [x.new_zeros(x.shape[0]) if initial_state is None else initial_state]
    for t in range(x.shape[1]):
        hs.append(a[:, t] * hs[-1] + x[:, t])
    return torch.stack(hs[1:], 1) if x.shape[1] else x, hs[-1]


def parallel(x, a, initial_state=None, bug=False):  # Hillis-Steele: after stride s, X_t spans the 2s tokens to t
    h0 = x.new_zeros(x.shape[0]) if initial_state is None else initial_state
    X, A, s = torch.cat([x[:, :1] + a[:, :1] * h0[:, None], x[:, 1:]], 1), a, 1
    while s < x.shape[1]:   # the bug: where two spans join, the earlier one's decay A_{t-s} for A_t
        X, A, s = (torch.cat([X[:, :s], X[:, s:] + (A[:, :-s] if bug else A[:, s:]) * X[:, :-s]], 1),
                   torch.cat([A[:, :s], A[:, s:] * A[:, :-s]], 1), 2 * s)
    return X, X[:, -1] if x.shape[1] else h0


def conditionings(c, x=None):   # the policy's, with log a for dt A (an exact input)
    k = conditioning(torch.log((x or reference_inputs(c))["a"]), torch.zeros(()), TIME_DIM)
    return k, k[:, -1], gradient_conditioning(k[:, -1], gated=False)


def magnitudes(c, weights=None, x=None):  # sums of |terms|: the loop on |inputs|; with weights, |gradients| of their sum
    leaves = {k: v.abs().requires_grad_() for k, v in (x or reference_inputs(c)).items() if v is not None}
    y, h = loop(**leaves)
    loss = weights and (y * weights[0].abs()).sum() + (h * weights[1].abs()).sum()
    grads = weights and torch.autograd.grad(loss, list(leaves.values()))
    return y.detach(), h.detach(), grads and {k: g.abs() for k, g in zip(leaves, grads)}


reference_inputs, state_shape = (lambda c: make_inputs(c, torch.float64)), (lambda c: (c.b,))
scan = lambda name, c, x, chunk_size=None: impls.get(name, NAME).scan(**x)  # noqa: E731
call, supported = (lambda n, c: f"scan({n!r}, {c!r})"), (lambda e, c: c.torch_dtype in e.supports["dtypes"])
terms, exact_kinds = (lambda c, output, arg=None: 2 * c.l + 2), (lambda c: True)   # sums of l products
STRATEGIES = {k: cases(min_b=2 if k == "batch" else 1) for k in ("values", "batch", "gradients")}
FAMILY = sys.modules[__name__]


def step(name, state, x, t):  # token t through the implementation's step, advancing state: y (b,)
    y, h = impls.get(name, NAME).step(x["x"][:, t:t + 1], x["a"][:, t:t + 1], state)
    state.copy_(h)
    return y[:, 0]


@pytest.fixture(autouse=True, scope="module")
def toy_family():
    supports = dict(dtypes=(torch.float32, torch.float64), gradients=True, initial_state=True, deterministic=True,
                    batch_invariant=False, case_limits=None)
    impls.add_family(impls.Family(NAME, scan, step, supports, {}, "--toy-impl", "--toy-impl-step", __name__))
    for name, fn, stepper in (("loop", loop, loop), ("parallel", parallel, None),
                              ("buggy", functools.partial(parallel, bug=True), None)):
        impls.register(name, fn, step=stepper, family=NAME)
    yield
    impls.FAMILIES.pop(NAME)


@settings(max_examples=15)
@given(case=cases(), k=st.integers(0, 40), j=st.integers(0, 2), poison=st.sampled_from(tuple(P.NONFINITE)))
def test_every_shared_property_holds(case, k, j, poison):
    for check, *extra in ((P.check_values,), (P.check_split, k), (P.check_causality, k), (P.check_gradients,),
                          (P.check_batch_independence, j), (P.check_determinism,), (P.check_nan_propagation, k),
                          (P.check_nonfinite, "x", k, poison), (P.check_nonfinite_causality, k, poison)):
        check(FAMILY, "parallel", case, *extra)
    P.check_prefill_then_decode(FAMILY, "loop", case, k)


def test_a_planted_bug_in_parallel_is_caught():
    def caught(case):
        try:
            P.check_values(FAMILY, "buggy", case)
        except AssertionError:
            return True
    find(cases(), caught, settings=settings(database=None))
