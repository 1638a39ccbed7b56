"""What is specific to impls/selective/parallel.py: long sequences and its chunk and segment boundaries.

The shared suite checks `parallel` like every implementation, but on its default plan most drawn
cases (l <= 300) fit in one segment. Here the plan is shrunk so that small cases cross many chunk
and segment boundaries, with lengths on and around them, and long sequences check that nothing
overflows where the float64 loop stays finite, in every input regime.
"""

import contextlib

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import impls
from impls.selective import parallel

from . import selective
from .properties import repro
from .selective import REGIMES, Case, cases, make_inputs
from .selective import (check_causality, check_gradients, check_nan_propagation, check_split, check_values,
                        oracle)
from .tolerance import assert_close

# A plan this small makes a (b=2, d=3, n=4) case, 24 elements per step, run 3 chunks of 8
# tokens side by side, in segments of 24 tokens (see parallel.Plan).
SMALL_PLAN = dict(STEP_ELEMENTS=72, SEGMENT_ELEMENTS=600, MIN_CHUNK=3)
CHUNK, SEGMENT = 8, 24
BOUNDARY_LENGTHS = sorted({m * unit + k for unit in (CHUNK, SEGMENT) for m in (1, 2, 3) for k in (-1, 0, 1)})


@contextlib.contextmanager
def small_plan():
    saved = {k: getattr(parallel, k) for k in SMALL_PLAN}
    for k, v in SMALL_PLAN.items():
        setattr(parallel, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(parallel, k, v)


# collected only when parallel is under test (conftest.py deselects it otherwise: no skip line per test)
pytestmark = pytest.mark.only_for("parallel")


def _plan(case):
    x = make_inputs(case)
    return parallel.Plan(x["u"], x["A"], x["B"], x["C"])


def test_the_small_plan_crosses_chunk_and_segment_boundaries():
    """The examples below mean what they say: with SMALL_PLAN, a (2, 3, 4) case has chunks of
    CHUNK tokens in segments of SEGMENT tokens, and lengths off a multiple are padded."""
    with small_plan():
        p = _plan(Case(b=2, d=3, n=4, l=3 * SEGMENT))
        assert (p.K, p.T, len(p.segments)) == (SEGMENT // CHUNK, CHUNK, 3)
        for l in BOUNDARY_LENGTHS:
            p = _plan(Case(b=2, d=3, n=4, l=l))
            assert p.K * p.T * len(p.segments) >= l > p.K * p.T * (len(p.segments) - 1)
            if l >= 2 * CHUNK:
                assert p.K > 1, l


def chunked_cases(**kwargs):
    """Drawn cases long enough to be cut into chunks under SMALL_PLAN (shorter ones run as one
    chunk, which the shared suite covers)."""
    return cases(max_b=2, max_d=6, max_n=4, max_l=80, **kwargs).filter(lambda c: c.l > CHUNK)


def boundary_examples(**extra):
    """@example for each length in BOUNDARY_LENGTHS, cycling through groupings, regimes and options."""
    def decorate(test):
        for i, l in enumerate(BOUNDARY_LENGTHS):
            case = Case(b=2, d=3, n=4, l=l, g=[0, 1, 3][i % 3], regime=REGIMES[i % 4], initial_state=i % 2 == 0,
                        strided=i % 3 == 1, seed=100 + i)
            test = example(case=case, **extra)(test)
        return test
    return decorate


@boundary_examples()
@given(case=chunked_cases())
def test_values_across_chunk_boundaries(case):
    with small_plan():
        check_values("parallel", case)


@boundary_examples()
@given(case=chunked_cases(dtypes=("f32", "f64")))
def test_gradients_across_chunk_boundaries(case):
    with small_plan():
        check_gradients("parallel", case)


@boundary_examples(k=SEGMENT)
@boundary_examples(k=CHUNK + 1)
@given(case=chunked_cases(), k=st.integers(0, 80))
def test_split_across_chunk_boundaries(case, k):
    with small_plan():
        check_split("parallel", case, k)


@boundary_examples(t=CHUNK)
@boundary_examples(t=SEGMENT + 1)
@given(case=chunked_cases(), t=st.integers(0, 80))
def test_causality_and_nan_across_chunk_boundaries(case, t):
    """A change at token t (or a NaN there) reaches no earlier token, in its own chunk or an
    earlier one, and no other channel, whichever chunk and segment t falls in."""
    with small_plan():
        check_causality("parallel", case, t)
        check_nan_propagation("parallel", case, t)


@pytest.mark.parametrize("regime", REGIMES)
def test_finite_wherever_the_loop_is_at_65536_tokens(regime):
    """At l = 65,536, in every regime (stress: each step's decay down to exp(-100), cumulative
    decays underflow; slow: thousands of steps of memory), the scan is finite wherever the
    float64 loop is, and within the tolerance policy, for y and last_state."""
    case = Case(b=2, d=3, n=4, l=65536, regime=regime, initial_state=True, seed=7)
    y, state = impls.selective_scan(**make_inputs(case), return_last_state=True, impl="parallel")
    ref, same = oracle(case)
    for name, got, want in (("y", y, ref[0]), ("last_state", state, ref[1])):
        finite = torch.isfinite(want)
        assert finite.any()
        assert torch.isfinite(got[finite]).all(), f"{name}: non-finite where the float64 loop is finite\n  {repro(selective, 'parallel', case)}"
    assert_close("parallel: y", y, ref[0], same[0], case.l, repro(selective, "parallel", case))
    assert_close("parallel: last_state", state, ref[1], same[1], case.l, repro(selective, "parallel", case))


def test_results_do_not_alias_the_reused_workspace():
    """Segment buffers are kept between calls; what a call returns must not change with the next one."""
    first = make_inputs(Case(b=2, d=5, n=3, l=50, initial_state=True, seed=1))
    y, state = impls.selective_scan(**first, return_last_state=True, impl="parallel")
    y_copy, state_copy = y.clone(), state.clone()
    impls.selective_scan(**make_inputs(Case(b=2, d=5, n=3, l=50, initial_state=True, seed=2)),
                         return_last_state=True, impl="parallel")
    assert torch.equal(y, y_copy) and torch.equal(state, state_copy)
