"""Packed variable-length sequences: the properties of equivalence/varlen.py, drawn by hypothesis,
for every family with a packing (its PACKING) and every implementation under test that declares
``varlen``; the others appear as skipped with the declared gap. Pinned packings run in tests of
their own (hypothesis does not shrink an @example), and a test checks that they cover every
boundary geometry on the chunks their family lays (Packing.chunk_starts).

Mamba-1's parallel (and the SSD's, which maps onto it) runs here on a plan shrunk so that an
80-token packing is cut into chunks of 3 to 8 tokens in one to four segments: drawn sequences
start and end anywhere in a chunk.
"""

import contextlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from impls.selective import parallel

from .varlen import (CATEGORIES, check_alone, check_alone_gradients, check_decoding, check_no_crossing,
                     check_prefill, covered, scan_alone)

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
def small_parallel_plan():
    with small_plan():
        yield


def packing(family):
    if family.PACKING is None:
        pytest.skip(f"{family.NAME}: no packed sequences in the interface")
    return family.PACKING


def test_pinned_packings_cover_every_boundary_geometry(family):
    found = set()
    for case in packing(family).pinned:
        found |= covered(case.offsets, family.PACKING.chunk_starts(case))
    assert found == set(CATEGORIES), sorted(set(CATEGORIES) - found)


def test_scan_alone_is_what_the_loop_defines(family):
    """The oracle of these tests, each sequence cut out and scanned alone by the loop, is the loop's
    own packed path: one definition, not two."""
    pack = packing(family)
    y, s = pack.scan("loop", pack.inputs(pack.pinned[0], torch.float64))
    y0, s0 = scan_alone(pack, "loop", pack.inputs(pack.pinned[0], torch.float64))
    assert torch.equal(y, y0) and pack.equal(s, s0)


@pytest.mark.parametrize("i", range(7), ids=lambda i: f"pinned{i}")
def test_pinned_packing(family, varlen_impl, i):
    pack = packing(family)
    case = pack.pinned[i]
    check_alone(pack, varlen_impl, case)
    for j in range(case.nseq):
        check_no_crossing(pack, varlen_impl, case, j)
    check_prefill(pack, varlen_impl, case, case.lengths.index(max(case.lengths)), max(case.lengths) // 2)


@pytest.mark.parametrize("i", range(7), ids=lambda i: f"pinned{i}")
def test_pinned_packing_gradients(family, varlen_gradient_impl, i):
    case = packing(family).pinned[i]
    if case.dtype not in ("f32", "f64"):
        pytest.skip(f"{case.dtype}: gradients are checked in float32 and float64")
    check_alone_gradients(family.PACKING, varlen_gradient_impl, case)


@pytest.mark.parametrize("i", range(3), ids=lambda i: f"pinned{i}")
def test_pinned_decoding(family, varlen_stepping_impl, i):
    case = packing(family).pinned[i]
    check_decoding(family.PACKING, varlen_stepping_impl, case, order_seed=case.seed, padding=2)


def drawn(data, family, strategy):
    packing(family)
    return data.draw(family.STRATEGIES[strategy], label="case")


@given(data=st.data())
def test_packed_equals_each_sequence_alone(family, varlen_impl, data):
    check_alone(family.PACKING, varlen_impl, drawn(data, family, "packed"))


@given(data=st.data())
def test_packed_gradients_equal_each_sequence_alone(family, varlen_gradient_impl, data):
    check_alone_gradients(family.PACKING, varlen_gradient_impl, drawn(data, family, "packed_gradients"))


@given(data=st.data(), i=st.integers(0, 7), value=st.sampled_from([None, "nan", "inf"]))
def test_nothing_crosses_a_boundary(family, varlen_impl, data, i, value):
    check_no_crossing(family.PACKING, varlen_impl, drawn(data, family, "packed"), i, value)


@given(data=st.data(), i=st.integers(0, 7), k=st.integers(0, 30))
def test_chunked_prefill_split_anywhere_equals_one_call(family, varlen_impl, data, i, k):
    check_prefill(family.PACKING, varlen_impl, drawn(data, family, "packed"), i, k)


@given(data=st.data(), order_seed=st.integers(0, 2**16), padding=st.integers(0, 2))
def test_decoding_through_state_batch_indices(family, varlen_stepping_impl, data, order_seed, padding):
    check_decoding(family.PACKING, varlen_stepping_impl, drawn(data, family, "packed_decoding"), order_seed, padding)
