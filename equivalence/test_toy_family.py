"""A third family costs a folder and a registry line: a toy scalar recurrence h_t = a_t h_{t-1} + x_t,
y_t = h_t, with x, a (b, l) and the state (b,), registered for this module only; every shared
property runs on its parallel (log-space cumulative) implementation, and a planted bug in it is caught."""

import dataclasses
import sys

import pytest
import torch
from hypothesis import find, given, settings
from hypothesis import strategies as st

import impls
from impls.frontdoor import compute_dtype

from . import properties as P

DTYPES = {"f32": torch.float32, "f64": torch.float64}
NAME, TIME_ARGS, TIME_DIM, STATE_ARG, Y_AXES, SCAN_ARGS = "toy", ("x", "a"), 1, "initial_state", ("b", "l"), ("x", "a", "initial_state")
BATCH_ARGS, CHUNK_SIZES, PACKING = TIME_ARGS + (STATE_ARG,), None, None


@dataclasses.dataclass(frozen=True)
class Case:
    b: int
    l: int
    g: int = 0
    dtype: str = "f32"
    initial_state: bool = False
    seed: int = 0
    id = property(lambda c: f"b{c.b}-l{c.l}-{c.dtype}-h0{int(c.initial_state)}-s{c.seed}")
    torch_dtype = property(lambda c: DTYPES[c.dtype])
    within = lambda c, limits: c  # noqa: E731


def cases(min_b=1):
    return st.builds(Case, b=st.integers(min_b, 3), l=st.integers(1, 40), dtype=st.sampled_from(tuple(DTYPES)),
                     initial_state=st.booleans(), seed=st.integers(0, 2**32 - 1))


def make_inputs(case, dtype=None):
    gen = torch.Generator().manual_seed(case.seed)
    x = torch.randn(case.b, case.l, generator=gen, dtype=torch.float64)
    a = torch.rand(case.b, case.l, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    h0 = torch.randn(case.b, generator=gen, dtype=torch.float64) if case.initial_state else None
    return {k: None if v is None else v.to(case.torch_dtype).to(dtype or case.torch_dtype)
            for k, v in dict(x=x, a=a, initial_state=h0).items()}


def reference_inputs(case):
    return make_inputs(case, torch.float64)


def loop(x, a, initial_state=None):  # the spec: (y (b, l), last state (b,))
    h, ys = x.new_zeros(x.shape[0]) if initial_state is None else initial_state, []
    for t in range(x.shape[1]):
        h = a[:, t] * h + x[:, t]
        ys.append(h)
    return torch.stack(ys, 1) if ys else x, h


def parallel(x, a, initial_state=None, bug=False):  # h_t = P_t (h0 + sum_{s<=t} x_s / P_s), P_t = prod a
    if x.shape[1] == 0:
        return loop(x, a, initial_state)
    log_p = torch.log(a).cumsum(1) if not bug else torch.log(a).cumsum(1) - torch.log(a[:, :1])
    h = torch.exp(log_p) * ((0 if initial_state is None else initial_state[:, None]) + (x * torch.exp(-log_p)).cumsum(1))
    return h, h[:, -1]


def scan(name, case, x, chunk_size=None):
    return impls.get(name, NAME).scan(**x)


def step(name, state, x, t):
    y, state[:] = loop(x["x"][:, t:t + 1], x["a"][:, t:t + 1], state)
    return y[:, 0]


FAMILY, TINY, OPTIONS, UNGROUPED, GROUPED_AXIS, AXES, PLAIN = sys.modules[__name__], Case(1, 3), dict(initial_state=False), (0,), "b", ("b", "l"), dict(dtype="f32")
STRATEGIES = dict(values=cases(), split=cases(), causality=cases(), decode=cases(), batch=cases(min_b=2), nonfinite=cases(),
                  gradients=cases(), properties=cases(), magnitudes=cases())
state_shape, call = (lambda c: (c.b,)), (lambda name, c: f"scan({name!r}, {c!r})")
supported = lambda e, c: c.torch_dtype in e.supports["dtypes"]  # noqa: E731
terms = lambda c, output, arg=None: 2 * c.l + 2  # noqa: E731 (a sum of l products)
exact_kinds, conditionings = (lambda c: True), (lambda c: (0.0, 0.0, 0.0))


def magnitudes(c, weights=None):  # the loop on |inputs|; with weights, |gradients| of the weighted sum
    leaves = {k: v.abs().requires_grad_() for k, v in reference_inputs(c).items() if v is not None}
    y, h = loop(**leaves)
    if weights is None:
        return y.detach(), h.detach(), None
    grads = torch.autograd.grad((y * weights[0].abs()).sum() + (h * weights[1].abs()).sum(), list(leaves.values()))
    return y.detach(), h.detach(), {k: g.abs() for k, g in zip(leaves, grads)}


@pytest.fixture(autouse=True, scope="module")
def toy_family():
    impls.add_family(impls.Family(NAME, scan, step, dict(dtypes=tuple(DTYPES.values()), gradients=True, initial_state=True,
                                  deterministic=True, batch_invariant=False, case_limits=None, nonfinite_inputs=True),
                                  {}, "--toy-impl", "--toy-impl-step", __name__))
    impls.register("loop", lambda x, a, initial_state=None: loop(x, a, initial_state), step=loop, family=NAME, gradients=True)
    impls.register("parallel", parallel, family=NAME, gradients=False)  # log-space: its gradients are not the loop's accuracy
    yield
    impls.FAMILIES.pop(NAME)


@settings(max_examples=15)
@given(case=cases(), k=st.integers(0, 40), j=st.integers(0, 2))
def test_every_shared_property_holds(case, k, j):
    for name in ("loop", "parallel"):
        P.check_values(FAMILY, name, case), P.check_split(FAMILY, name, case, k), P.check_causality(FAMILY, name, case, k)
        P.check_batch_independence(FAMILY, name, case, j), P.check_gradients(FAMILY, name, case)
        P.check_determinism(FAMILY, name, case), P.check_nonfinite_causality(FAMILY, name, case, k, "nan")
    P.check_prefill_then_decode(FAMILY, "loop", case, k)


def test_a_planted_bug_in_parallel_is_caught():
    impls.register("buggy", lambda x, a, initial_state=None: parallel(x, a, initial_state, bug=True), family=NAME)
    case = find(cases(), lambda c: not_ok(lambda: P.check_values(FAMILY, "buggy", c)), settings=settings(database=None))
    assert case.l >= 1


def not_ok(check):
    try:
        check()
    except AssertionError:
        return True
    return False
