"""The SSD's own packed-sequence interface: the official ``seq_idx`` semantics (a new sequence
wherever the label changes, negative labels padding) and ``return_varlen_states``, checked against
cu_seqlens and against each sequence scanned alone, and its errors at the front door. The packed
properties every family shares are in equivalence/test_varlen.py, their errors in
equivalence/test_varlen_errors.py."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import impls

from ..test_varlen import small_parallel_plan  # noqa: F401 (parallel on its small plan here too)
from .varlen import PACKING, PINNED, SSDVarlenCase, packed_inputs, varlen_cases

pytestmark = pytest.mark.family("ssd")


def seq_idx_of(case, gen):
    """seq_idx (1, l) marking the case's non-empty sequences, with labels drawn so that neighbours
    differ (the semantics is 'a new sequence wherever it changes', not sorted labels)."""
    labels, last = [], None
    for n in case.lengths:
        if n:
            v = int(torch.randint(0, 3, (1,), generator=gen))
            v = v if v != last else v + 3
            labels += [v] * n
            last = v
    return torch.tensor([labels], dtype=torch.int32).reshape(1, case.l)


@given(case=varlen_cases(max_total=60), seed=st.integers(0, 2**16))
def test_seq_idx_and_varlen_states_agree_with_cu_seqlens(ssd_varlen_impl, case, seed):
    """seq_idx marking the same boundaries gives the same out, bit for bit, as cu_seqlens; with it
    initial_states (b, h, p, n) reaches the row's first sequence only, and final_states is the state
    after the row's last sequence; return_varlen_states equals the per-sequence final states."""
    name = ssd_varlen_impl
    x = packed_inputs(case)
    out, final, varlen = impls.ssd_scan(**x, return_final_states=True, return_varlen_states=True, impl=name)
    ref, ref_final = impls.ssd_scan(**x, return_final_states=True, impl=name)
    assert torch.equal(out, ref) and torch.equal(final, ref_final) and torch.equal(varlen, ref_final)
    nonempty = [i for i, n in enumerate(case.lengths) if n]
    # the same call through seq_idx: initial states zero but for the first non-empty sequence
    h0 = x["initial_states"]
    first = nonempty[0] if nonempty else 0
    y = dict(x, cu_seqlens=None, seq_idx=seq_idx_of(case, torch.Generator().manual_seed(seed)),
             initial_states=None if h0 is None else h0[first:first + 1])
    x_zero = dict(x, initial_states=None if h0 is None else
                  torch.where(torch.arange(case.nseq)[:, None, None, None] == first, h0, torch.zeros_like(h0)))
    want, want_final = impls.ssd_scan(**x_zero, return_final_states=True, impl=name)
    got, got_final = impls.ssd_scan(**y, return_final_states=True, impl=name)
    assert torch.equal(got, want), "seq_idx and cu_seqlens disagree on out"
    row_last = want_final[nonempty[-1]] if nonempty else (h0[0] if h0 is not None else torch.zeros_like(got_final[0]))
    assert torch.equal(got_final[0], row_last), "seq_idx: final_states is not the row's last sequence's state"


@pytest.mark.parametrize("case", PINNED[:3], ids=lambda c: c.id)
def test_seq_idx_gradients_equal_those_through_cu_seqlens(ssd_varlen_gradient_impl, case):
    """The gradients of the seq_idx call (the same boundaries, the row's initial state on its first
    sequence) equal those of the cu_seqlens call with zeros for the others, bit for bit: both are
    the same arithmetic, and the cu_seqlens path is checked against the loop above."""
    name = ssd_varlen_gradient_impl
    x = packed_inputs(case)
    first = [i for i, n in enumerate(case.lengths) if n][0]
    h0 = x["initial_states"]
    by_idx = dict(x, cu_seqlens=None, seq_idx=seq_idx_of(case, torch.Generator().manual_seed(case.seed)),
                  initial_states=h0[first:first + 1])
    by_cu = dict(x, initial_states=torch.where(torch.arange(case.nseq)[:, None, None, None] == first, h0,
                                               torch.zeros_like(h0)))
    wrt = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")
    gen = torch.Generator().manual_seed(case.seed + 5)
    w = torch.randn(1, case.l, case.h, case.p, generator=gen, dtype=torch.float64)

    def grads(kw):   # the last sequence is non-empty in these cases: final_states[-1] is the row's
        leaves = {k: (v.detach().requires_grad_() if k in wrt and v is not None else v) for k, v in kw.items()}
        out, final = impls.ssd_scan(**leaves, return_final_states=True, impl=name)
        loss = (out.double() * w).sum() + final[-1].double().sum()
        return torch.autograd.grad(loss, [leaves[k] for k in wrt if leaves[k] is not None])

    for k, a, b in zip([k for k in wrt if x[k] is not None], grads(by_idx), grads(by_cu)):
        assert torch.equal(a, b), f"{name}: gradient of {k} through seq_idx differs from cu_seqlens'"


def test_seq_idx_padding_contributes_nothing_and_outputs_zeros(ssd_varlen_impl):
    """b = 2 rows with padding (negative seq_idx) at the start, between and after sequences, and a
    label reused after a change (a new sequence): each sequence equals itself scanned alone (the
    float64 loop, under the tolerance policy) and NaN in the padding tokens reaches nothing."""
    name = ssd_varlen_impl
    case = SSDVarlenCase(lengths=(12, 12), h=2, p=3, n=4, initial_states=False, chunk_size=4, seed=9)
    x = packed_inputs(case)
    flat = {k: v for k, v in x.items() if k != "cu_seqlens"}
    rows = {k: (v.reshape(2, 12, *v.shape[2:]) if k in PACKING.time_args and v is not None else v) for k, v in flat.items()}
    seq_idx = torch.tensor([[-1, -1, 0, 0, 0, 1, 1, -1, 0, 0, 0, 0],
                            [5, 5, 5, 5, 5, 5, -1, -1, -1, 7, 7, -1]], dtype=torch.int32)
    runs = [[(2, 5), (5, 7), (8, 12)], [(0, 6), (9, 11)]]
    h0 = torch.randn(2, 2, 3, 4, generator=torch.Generator().manual_seed(1))
    out, final = impls.ssd_scan(**dict(rows, seq_idx=seq_idx, initial_states=h0), return_final_states=True, impl=name)
    poisoned = {k: (v.clone() if k in PACKING.time_args and v is not None else v) for k, v in rows.items()}
    pad = seq_idx < 0
    for k in PACKING.time_args:
        if poisoned[k] is not None:
            poisoned[k][pad] = float("nan")
    out2, final2 = impls.ssd_scan(**dict(poisoned, seq_idx=seq_idx, initial_states=h0), return_final_states=True,
                                  impl=name)
    assert torch.equal(out[pad], torch.zeros_like(out[pad])), "padding tokens' outputs are not zeros"
    assert torch.equal(out.nan_to_num(), out2.nan_to_num()) and not out2.isnan().any(), "padding reached an output"
    assert torch.equal(final, final2), "padding reached a final state"
    for r in range(2):
        for j, (a, e) in enumerate(runs[r]):
            alone = {k: (v[r:r + 1, a:e] if k in PACKING.time_args and v is not None else v) for k, v in rows.items()}
            alone["initial_states"] = h0[r:r + 1] if j == 0 else None
            want, want_final = impls.ssd_scan(**{k: (v.double() if isinstance(v, torch.Tensor) else v)
                                                 for k, v in alone.items()}, return_final_states=True, impl="loop")
            torch.testing.assert_close(out[r, a:e].double(), want[0], rtol=1e-5, atol=1e-6)
            if j == len(runs[r]) - 1:
                torch.testing.assert_close(final[r].double(), want_final[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ seq_idx at the front door

ERRORS_CASE = SSDVarlenCase(lengths=(3, 0, 5), h=2, p=3, n=4, chunk_size=4, seed=1)   # l = 8, nseq = 3


def _x(**changes):
    return {**packed_inputs(ERRORS_CASE), **changes}


def i32(*v):
    return torch.tensor(v, dtype=torch.int32)


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


def test_initial_states_are_one_per_row_with_seq_idx_alone():
    x = _x(cu_seqlens=None, seq_idx=torch.zeros(1, 8, dtype=torch.int32), initial_states=torch.zeros(3, 2, 3, 4))
    with pytest.raises(ValueError, match="initial_states"):
        impls.ssd_scan(**x, impl="loop")
