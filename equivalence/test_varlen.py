"""Packed variable-length sequences (Mamba-1): the properties of equivalence/varlen.py, drawn
by hypothesis, for every implementation under test that declares ``varlen``; the others appear as
skipped with the declared gap. Pinned packings run in tests of their own (hypothesis does not
shrink an @example), and a test checks that they cover every boundary geometry on parallel's plan.

parallel runs here on a plan shrunk so that an 80-token packing is cut into chunks of 3 to 8
tokens in one to four segments: drawn sequences start and end anywhere in a chunk.
"""

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

import impls
from impls.selective import parallel

from .selective.varlen import PACKING, VarlenCase, chunk_starts, varlen_cases
from .varlen import (CATEGORIES, check_alone, check_alone_gradients, check_decoding, check_no_crossing,
                     check_prefill, covered)

SMALL_PLAN = dict(STEP_ELEMENTS=72, SEGMENT_ELEMENTS=600, MIN_CHUNK=3)


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


@pytest.fixture(autouse=True, scope="module")
def _small_parallel_plan():
    with small_plan():
        yield


# Fixtures over the implementations under test; those without what a test needs are skipped
# with the declared gap as the reason (visible, never silently passed).
VARLEN = (lambda e: e.supports["varlen"], "varlen")
VARLEN_FIXTURES = {   # fixture: what the implementation must have, as (capability, gap's name) pairs
    "varlen_impl": (VARLEN,),
    "varlen_gradient_impl": (VARLEN, (lambda e: e.supports["gradients"], "gradients")),
    "varlen_stepping_impl": ((lambda e: e.supports["state_batch_indices"], "state_batch_indices"),
                             (lambda e: e.step is not None, "no step function")),
}


def pytest_generate_tests(metafunc):
    for fixture, needs in VARLEN_FIXTURES.items():
        if fixture in metafunc.fixturenames:
            params = []
            for n in metafunc.config.selected_impls:
                gaps = [gap for has, gap in needs if not has(impls.get(n))]
                params.append(pytest.param(n, marks=pytest.mark.skip(reason=f"{n}: declared gap: {', '.join(gaps)}"))
                              if gaps else n)
            metafunc.parametrize(fixture, params)


# Pinned packings (d = 3, n = 4: on the small plan, chunks of 4 to 8 tokens); together they cover
# every geometry in CATEGORIES, as the test below checks.
PINNED = (
    VarlenCase(lengths=(0, 1, 5, 7, 14, 0, 3), d=3, n=4, seed=1),
    VarlenCase(lengths=(5, 5, 3, 12), d=3, n=4, g=3, regime="stress", seed=2),
    VarlenCase(lengths=(3, 4, 1, 16, 9), d=3, n=4, dtype="f64", regime="slow", seed=3),
    VarlenCase(lengths=(40, 33, 2), d=3, n=4, g=1, regime="official", initial_state=False, seed=4),
    VarlenCase(lengths=(2,) * 10, d=3, n=4, dtype="bf16", seed=5),
    VarlenCase(lengths=(0,), d=3, n=4, seed=6),
    VarlenCase(lengths=(1,), d=3, n=4, dtype="f16", z=False, D=False, seed=7),
)


def test_pinned_packings_cover_every_boundary_geometry():
    found = set()
    for case in PINNED:
        found |= covered(case.offsets, chunk_starts("parallel", case))
    assert found == set(CATEGORIES), sorted(set(CATEGORIES) - found)


@pytest.mark.parametrize("case", PINNED, ids=lambda c: c.id)
def test_pinned_packing(varlen_impl, case):
    check_alone(PACKING, varlen_impl, case)
    for i in range(case.nseq):
        check_no_crossing(PACKING, varlen_impl, case, i)
    check_prefill(PACKING, varlen_impl, case, case.lengths.index(max(case.lengths)), max(case.lengths) // 2)


@pytest.mark.parametrize("case", [c for c in PINNED if c.dtype in ("f32", "f64")], ids=lambda c: c.id)
def test_pinned_packing_gradients(varlen_gradient_impl, case):
    check_alone_gradients(PACKING, varlen_gradient_impl, case)


@given(case=varlen_cases())
def test_packed_equals_each_sequence_alone(varlen_impl, case):
    check_alone(PACKING, varlen_impl, case)


@given(case=varlen_cases(dtypes=("f32", "f64"), max_total=48))
def test_packed_gradients_equal_each_sequence_alone(varlen_gradient_impl, case):
    check_alone_gradients(PACKING, varlen_gradient_impl, case)


@given(case=varlen_cases(), i=st.integers(0, 7), value=st.sampled_from([None, "nan", "inf"]))
def test_nothing_crosses_a_boundary(varlen_impl, case, i, value):
    check_no_crossing(PACKING, varlen_impl, case, i, value)


@given(case=varlen_cases(), i=st.integers(0, 7), k=st.integers(0, 30))
def test_chunked_prefill_split_anywhere_equals_one_call(varlen_impl, case, i, k):
    check_prefill(PACKING, varlen_impl, case, i, k)


@given(case=varlen_cases(max_total=40), order_seed=st.integers(0, 2**16), padding=st.integers(0, 2))
def test_decoding_through_state_batch_indices(varlen_stepping_impl, case, order_seed, padding):
    check_decoding(PACKING, varlen_stepping_impl, case, order_seed, padding)
