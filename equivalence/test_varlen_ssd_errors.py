"""The SSD front door for packed sequences: malformed cu_seqlens, seq_idx, initial_states and
state_batch_indices raise ValueError (TypeError for a non-tensor) naming the argument, before
anything runs; a refused step leaves the cache untouched; implementations without the capability
raise NotImplementedError naming it."""

import pytest
import torch

import impls

from .ssd.varlen import SSDVarlenCase, packed_inputs as ssd_packed_inputs

pytestmark = pytest.mark.family("ssd")

CASE = SSDVarlenCase(lengths=(3, 0, 5), h=2, p=3, n=4, chunk_size=4, seed=1)


def _x(**changes):
    return {**ssd_packed_inputs(CASE), **changes}


def i32(*v):
    return torch.tensor(v, dtype=torch.int32)


@pytest.mark.parametrize("cu_seqlens, says", [
    (i32(1, 3, 3, 8), "first offset"),
    (i32(0, 5, 3, 8), "non-decreasing"),
    (i32(0, 3, 3, 7), "last offset"),
    (torch.tensor([0, 3, 3, 8]), "int32"),
    (i32(0, 3, 3, 8)[None], "shape"),
])
def test_malformed_cu_seqlens(cu_seqlens, says):
    with pytest.raises(ValueError, match=f"cu_seqlens.*{says}"):
        impls.ssd_scan(**_x(cu_seqlens=cu_seqlens), return_final_states=True, impl="loop")


def test_cu_seqlens_needs_batch_one():
    x = _x()
    two = {k: (torch.cat([v, v]) if k in ("x", "dt", "B", "C", "z") and v is not None else v) for k, v in x.items()}
    with pytest.raises(ValueError, match="cu_seqlens.*b=1"):
        impls.ssd_scan(**two, impl="loop")


@pytest.mark.parametrize("seq_idx, error, says", [
    (torch.zeros(1, 8, dtype=torch.int64), ValueError, "seq_idx.*int32"),
    (torch.zeros(1, 7, dtype=torch.int32), ValueError, "seq_idx.*shape"),
    (torch.zeros(2, 8, dtype=torch.int32), ValueError, "seq_idx.*shape"),
    ([[0] * 8], TypeError, "seq_idx.*Tensor"),
    (i32(0, 0, 1, 1, 1, 1, 1, 1)[None], ValueError, "seq_idx.*boundaries of cu_seqlens"),    # 2 | 6, not 3 | 5
    (i32(0, 0, 0, 1, 1, 1, 1, 0)[None], ValueError, "seq_idx.*boundaries of cu_seqlens"),    # a third sequence
    (i32(0, 0, 0, 1, 1, 1, -1, -1)[None], ValueError, "seq_idx.*boundaries of cu_seqlens"),  # padding
])
def test_malformed_seq_idx_with_cu_seqlens(seq_idx, error, says):
    with pytest.raises(error, match=says):
        impls.ssd_scan(**_x(seq_idx=seq_idx), impl="loop")


def test_seq_idx_matching_cu_seqlens_is_accepted():
    out = impls.ssd_scan(**_x(seq_idx=i32(4, 4, 4, 2, 2, 2, 2, 2)[None]), impl="loop")
    assert torch.equal(out, impls.ssd_scan(**_x(), impl="loop"))


def test_varlen_states_need_cu_seqlens():
    x = _x(cu_seqlens=None, initial_states=None, seq_idx=torch.zeros(1, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="return_varlen_states.*cu_seqlens"):
        impls.ssd_scan(**x, return_varlen_states=True, impl="loop")


@pytest.mark.parametrize("shape", [(1, 2, 3, 4), (4, 2, 3, 4), (3, 2, 3)])
def test_initial_states_are_one_per_sequence(shape):
    with pytest.raises(ValueError, match="initial_states.*nseq"):
        impls.ssd_scan(**_x(initial_states=torch.zeros(shape)), impl="loop")


def test_initial_states_are_one_per_row_with_seq_idx_alone():
    x = _x(cu_seqlens=None, seq_idx=torch.zeros(1, 8, dtype=torch.int32), initial_states=torch.zeros(3, 2, 3, 4))
    with pytest.raises(ValueError, match="initial_states"):
        impls.ssd_scan(**x, impl="loop")


def test_an_implementation_without_varlen_says_so():
    name = "varlen-errors:recurrent without varlen"
    if name not in impls.names("ssd"):
        from impls.ssd import recurrent as ssd_recurrent

        impls.register(name, ssd_recurrent.ssd_scan, step=ssd_recurrent.ssd_state_update, family="ssd")
    with pytest.raises(NotImplementedError, match="varlen"):
        impls.ssd_scan(**_x(), impl=name)
    cache = torch.zeros(3, 2, 3, 4)
    with pytest.raises(NotImplementedError, match="state_batch_indices"):
        impls.ssd_state_update(cache, *_step_args(2), state_batch_indices=i32(0, 1), impl=name)


def _step_args(b):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(b, 2, 3, generator=gen), torch.rand(b, 2, generator=gen), -torch.rand(2, generator=gen),
            torch.randn(b, 1, 4, generator=gen), torch.randn(b, 1, 4, generator=gen))


@pytest.mark.parametrize("indices, error, says", [
    (i32(0, 3), ValueError, "state_batch_indices.*below the cache's 3"),
    (i32(1, 1), ValueError, "state_batch_indices.*at most once"),
    (torch.tensor([0, 1]), ValueError, "state_batch_indices.*int32"),
    (i32(0, 1, 2), ValueError, "state_batch_indices.*shape"),
    ([0, 1], TypeError, "state_batch_indices.*Tensor"),
])
def test_bad_state_batch_indices_leave_the_cache_untouched(indices, error, says):
    cache = torch.randn(3, 2, 3, 4)
    before = cache.clone()
    with pytest.raises(error, match=says):
        impls.ssd_state_update(cache, *_step_args(2), state_batch_indices=indices)
    assert torch.equal(cache, before)


def test_cache_of_the_wrong_shape():
    with pytest.raises(ValueError, match="state"):
        impls.ssd_state_update(torch.zeros(3, 2, 3, 5), *_step_args(2), state_batch_indices=i32(0, 1))


def test_padding_rows_output_zeros_and_touch_no_slot():
    cache = torch.randn(3, 2, 3, 4)
    before = cache.clone()
    y = impls.ssd_state_update(cache, *_step_args(2), state_batch_indices=i32(-1, 2))
    assert torch.equal(y[0], torch.zeros_like(y[0]))
    assert torch.equal(cache[:2], before[:2]) and not torch.equal(cache[2], before[2])
