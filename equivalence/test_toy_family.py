"""A third family costs a folder and a registry line: a toy h_t = a_t h_{t-1} + x_t, y_t = h_t (x, a (b, l),
state (b,)), registered for this module only, writes only what is its own (equivalence/properties.py
fills in the rest); every shared property runs on its parallel scan, and a planted bug there is caught."""

import dataclasses
import functools

import pytest
import torch
from hypothesis import given, settings, strategies as st

import impls
from . import properties as P
from .inputs import DTYPES, materialize
from .tolerance import conditioning, gradient_conditioning, polynomial_magnitudes

NAME, TIME_ARGS, Y_AXES = "toy", ("x", "a"), ("b", "l")


@dataclasses.dataclass(frozen=True)
class Case:
    b: int
    l: int
    dtype: str = "f32"
    initial_state: bool = False
    seed: int = 0
    id, torch_dtype = property(lambda c: f"b{c.b}-l{c.l}-{c.dtype}-s{c.seed}"), property(lambda c: DTYPES[c.dtype])


cases = functools.partial(st.builds, Case, b=st.integers(1, 3), l=st.integers(1, 40), initial_state=st.booleans(),
                          dtype=st.sampled_from(("f32", "f64")), seed=st.integers(0, 2**32 - 1))


def make_inputs(c, dtype=None):   # x (b, l), a (b, l) in [0.05, 0.95], initial_state (b,)
    r, f = torch.Generator().manual_seed(c.seed), c.torch_dtype
    x, a, h0 = (torch.randn(*s, generator=r, dtype=torch.float64) for s in ((c.b, c.l), (c.b, c.l), (c.b,)))
    return materialize(dict(x=(x, f), a=(0.05 + 0.9 * torch.sigmoid(a), f),
                            initial_state=(h0, f) if c.initial_state else None), dtype)


def loop(x, a, initial_state=None):  # the spec: y (b, l), last state (b,)
    hs = [x.new_zeros(x.shape[0]) if initial_state is None else initial_state]
    for t in range(x.shape[1]):
        hs.append(a[:, t] * hs[-1] + x[:, t])
    return torch.stack(hs[1:], 1) if x.shape[1] else x, hs[-1]


def parallel(x, a, initial_state=None, bug=False):  # Hillis-Steele from h0 as token 0: X_t spans 2s tokens to t
    X = torch.cat([x.new_zeros(x.shape[0], 1) if initial_state is None else initial_state[:, None], x], 1)
    A, s = torch.cat([torch.zeros_like(X[:, :1]), a], 1), 1
    while s < X.shape[1]:   # the bug: where two spans join, the earlier one's decay A_{t-s} for A_t
        X, A, s = (torch.cat([X[:, :s], X[:, s:] + (A[:, :-s] if bug else A[:, s:]) * X[:, :-s]], 1),
                   torch.cat([A[:, :s], A[:, s:] * A[:, :-s]], 1), 2 * s)
    return X[:, 1:], X[:, -1].clone()   # a state of its own: the step advances it in place


def conditionings(c, x=None):   # the policy's, with log a for dt A (an exact input)
    k = conditioning(torch.log((x or make_inputs(c, torch.float64))["a"]), torch.zeros(()), 1)
    return k, k[:, -1], gradient_conditioning(k[:, -1], gated=False)


# the loop on |inputs| (its outputs are sums of products); rounded terms per element: sums of l products
magnitudes = lambda c, weights=None, x=None: polynomial_magnitudes(loop, x or make_inputs(c, torch.float64), weights)  # noqa: E731
terms = lambda c, output, arg=None: 2 * c.l + 2  # noqa: E731


@pytest.fixture(autouse=True, scope="module")
def toy_family():   # its public scan and step dispatch on impl=; its step advances the state (b,) in place
    public = lambda what: lambda *args, impl, **kw: getattr(impls.get(impl, NAME), what)(*args, **kw)  # noqa: E731
    impls.add_family(impls.Family(NAME, public("scan"), public("step"), dict(
        dtypes=(torch.float32, torch.float64), gradients=True, initial_state=True, deterministic=True,
        batch_invariant=False, case_limits=None), {}, "--toy-impl", "--toy-impl-step", __name__))
    for name, scan in (("loop", loop), ("parallel", parallel), ("buggy", functools.partial(parallel, bug=True))):
        impls.register(name, scan, step=lambda state, x, a: state.mul_(a).add_(x).clone(), family=NAME)
    yield
    impls.FAMILIES.pop(NAME)


@settings(max_examples=15)
@given(case=cases(), t=st.integers(0, 40), poison=st.sampled_from(tuple(P.NONFINITE)))
def test_every_shared_property_holds(case, t, poison):
    for check in P.every_check(P.family(NAME), "parallel", case, t, poison).values():
        check()


def test_a_planted_bug_in_parallel_is_caught():
    with pytest.raises(AssertionError, match="buggy: y"):
        P.check_values(P.family(NAME), "buggy", Case(b=1, l=2))
