"""Packed variable-length sequences (Mamba-2 SSD): the properties of equivalence/varlen.py,
run for the SSD family (equivalence/ssd/varlen.py), drawn by hypothesis, for every SSD implementation under
test that declares ``varlen``; the others are skipped with the declared gap as the reason. Pinned
packings run in tests of their own and cover every boundary geometry on a chunk grid laid over
the packed sequence. The official ``seq_idx`` semantics and ``return_varlen_states`` are checked
here too, against cu_seqlens and against each sequence scanned alone.

parallel (through the d = h p mapping, its Mamba-1 packed path) runs on test_varlen.py's shrunk
plan: chunks of 3 to 8 tokens over the packed tokens, so sequences start and end mid-chunk.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import impls

from .test_varlen import small_plan
from .ssd.varlen import PACKING as SSD, SSDVarlenCase, chunk_starts as ssd_chunk_starts
from .ssd.varlen import packed_inputs as ssd_packed_inputs, varlen_cases as ssd_varlen_cases
from .varlen import (CATEGORIES, check_alone, check_alone_gradients, check_decoding, check_no_crossing,
                     check_prefill, covered, scan_alone)

pytestmark = pytest.mark.family("ssd")


@pytest.fixture(autouse=True, scope="module")
def _small_parallel_plan():
    with small_plan():
        yield


def _needs(name, gradients=False, step=False):
    """Skip, naming the declared gap, an implementation that lacks what the test needs: the packed
    scan (varlen), or with step=True a step taking state_batch_indices."""
    e = impls.get(name, "ssd")
    lacking = (("varlen", not step and not e.supports["varlen"]),
               ("gradients", gradients and not e.supports["gradients"]),
               ("no step function", step and e.step is None),
               ("state_batch_indices", step and not e.supports["state_batch_indices"]))
    gaps = [g for g, lacks in lacking if lacks]
    if gaps:
        pytest.skip(f"{name}: declared gap: {', '.join(gaps)}")
    return name


# Pinned packings (h = 2, p = 3, n = 4, chunks of 4 laid over the packed sequence): together they
# cover every geometry in CATEGORIES, as the first test checks.
PINNED = (
    SSDVarlenCase(lengths=(0, 1, 5, 7, 14, 0, 3), h=2, p=3, n=4, chunk_size=4, seed=1),
    SSDVarlenCase(lengths=(4, 4, 3, 12), h=2, p=3, n=4, g=2, regime="stress", D="hp", chunk_size=4, seed=2),
    SSDVarlenCase(lengths=(3, 4, 1, 16, 9), h=2, p=3, n=4, dtype="f64", regime="slow", chunk_size=4, seed=3),
    SSDVarlenCase(lengths=(40, 33, 2), h=2, p=3, n=4, dt_limit="tight", initial_states=False, chunk_size=16, seed=4),
    SSDVarlenCase(lengths=(2,) * 10, h=2, p=3, n=4, dtype="bf16", chunk_size=4, seed=5),
    SSDVarlenCase(lengths=(0,), h=2, p=3, n=4, chunk_size=4, seed=6),
    SSDVarlenCase(lengths=(1,), h=2, p=3, n=4, dtype="f16", z=False, D="none", chunk_size=4, seed=7),
)


def test_pinned_packings_cover_every_boundary_geometry():
    found = set()
    for case in PINNED:
        found |= covered(case.offsets, ssd_chunk_starts(case))
    assert found == set(CATEGORIES), sorted(set(CATEGORIES) - found)


@pytest.mark.parametrize("case", PINNED, ids=lambda c: c.id)
def test_pinned_packing(ssd_impl, case):
    name = _needs(ssd_impl)
    check_alone(SSD, name, case)
    for i in range(case.nseq):
        check_no_crossing(SSD, name, case, i)
    check_prefill(SSD, name, case, case.lengths.index(max(case.lengths)), max(case.lengths) // 2)


@pytest.mark.parametrize("case", [c for c in PINNED if c.dtype in ("f32", "f64")], ids=lambda c: c.id)
def test_pinned_packing_gradients(ssd_impl, case):
    check_alone_gradients(SSD, _needs(ssd_impl, gradients=True), case)


@pytest.mark.parametrize("case", PINNED[:3], ids=lambda c: c.id)
def test_pinned_decoding(ssd_impl, case):
    check_decoding(SSD, _needs(ssd_impl, step=True), case, order_seed=case.seed, padding=2)


@given(case=ssd_varlen_cases())
def test_packed_equals_each_sequence_alone(ssd_impl, case):
    check_alone(SSD, _needs(ssd_impl), case)


@given(case=ssd_varlen_cases(dtypes=("f32", "f64"), max_total=40))
def test_packed_gradients_equal_each_sequence_alone(ssd_impl, case):
    check_alone_gradients(SSD, _needs(ssd_impl, gradients=True), case)


@given(case=ssd_varlen_cases(), i=st.integers(0, 7), value=st.sampled_from([None, "nan", "inf"]))
def test_nothing_crosses_a_boundary(ssd_impl, case, i, value):
    check_no_crossing(SSD, _needs(ssd_impl), case, i, value)


@given(case=ssd_varlen_cases(), i=st.integers(0, 7), k=st.integers(0, 30))
def test_chunked_prefill_split_anywhere_equals_one_call(ssd_impl, case, i, k):
    check_prefill(SSD, _needs(ssd_impl), case, i, k)


@given(case=ssd_varlen_cases(max_total=40), order_seed=st.integers(0, 2**16), padding=st.integers(0, 2))
def test_decoding_through_state_batch_indices(ssd_impl, case, order_seed, padding):
    check_decoding(SSD, _needs(ssd_impl, step=True), case, order_seed, padding)


# --- the official seq_idx semantics and return_varlen_states ---------------------------------------

def _seq_idx_of(case, gen):
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


@given(case=ssd_varlen_cases(max_total=60), seed=st.integers(0, 2**16))
def test_seq_idx_and_varlen_states_agree_with_cu_seqlens(ssd_impl, case, seed):
    """seq_idx marking the same boundaries gives the same out, bit for bit, as cu_seqlens; with it
    initial_states (b, h, p, n) reaches the row's first sequence only, and final_states is the state
    after the row's last sequence; return_varlen_states equals the per-sequence final states."""
    name = _needs(ssd_impl)
    x = ssd_packed_inputs(case)
    out, final, varlen = impls.ssd_scan(**x, return_final_states=True, return_varlen_states=True, impl=name)
    ref, ref_final = impls.ssd_scan(**x, return_final_states=True, impl=name)
    assert torch.equal(out, ref) and torch.equal(final, ref_final) and torch.equal(varlen, ref_final)
    nonempty = [i for i, n in enumerate(case.lengths) if n]
    # the same call through seq_idx: initial states zero but for the first non-empty sequence
    h0 = x["initial_states"]
    first = nonempty[0] if nonempty else 0
    y = dict(x, cu_seqlens=None, seq_idx=_seq_idx_of(case, torch.Generator().manual_seed(seed)),
             initial_states=None if h0 is None else h0[first:first + 1])
    x_zero = dict(x, initial_states=None if h0 is None else
                  torch.where(torch.arange(case.nseq)[:, None, None, None] == first, h0, torch.zeros_like(h0)))
    want, want_final = impls.ssd_scan(**x_zero, return_final_states=True, impl=name)
    got, got_final = impls.ssd_scan(**y, return_final_states=True, impl=name)
    assert torch.equal(got, want), "seq_idx and cu_seqlens disagree on out"
    row_last = want_final[nonempty[-1]] if nonempty else (h0[0] if h0 is not None else torch.zeros_like(got_final[0]))
    assert torch.equal(got_final[0], row_last), "seq_idx: final_states is not the row's last sequence's state"


@pytest.mark.parametrize("case", PINNED[:3], ids=lambda c: c.id)
def test_seq_idx_gradients_equal_those_through_cu_seqlens(ssd_impl, case):
    """The gradients of the seq_idx call (the same boundaries, the row's initial state on its first
    sequence) equal those of the cu_seqlens call with zeros for the others, bit for bit: both are
    the same arithmetic, and the cu_seqlens path is checked against the loop above."""
    name = _needs(ssd_impl, gradients=True)
    x = ssd_packed_inputs(case)
    first = [i for i, n in enumerate(case.lengths) if n][0]
    h0 = x["initial_states"]
    by_idx = dict(x, cu_seqlens=None, seq_idx=_seq_idx_of(case, torch.Generator().manual_seed(case.seed)),
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


def test_seq_idx_padding_contributes_nothing_and_outputs_zeros(ssd_impl):
    """b = 2 rows with padding (negative seq_idx) at the start, between and after sequences, and a
    label reused after a change (a new sequence): each sequence equals itself scanned alone (the
    float64 loop, under the tolerance policy) and NaN in the padding tokens reaches nothing."""
    name = _needs(ssd_impl)
    case = SSDVarlenCase(lengths=(12, 12), h=2, p=3, n=4, initial_states=False, chunk_size=4, seed=9)
    x = ssd_packed_inputs(case)
    flat = {k: v for k, v in x.items() if k != "cu_seqlens"}
    rows = {k: (v.reshape(2, 12, *v.shape[2:]) if k in SSD.time_args and v is not None else v) for k, v in flat.items()}
    seq_idx = torch.tensor([[-1, -1, 0, 0, 0, 1, 1, -1, 0, 0, 0, 0],
                            [5, 5, 5, 5, 5, 5, -1, -1, -1, 7, 7, -1]], dtype=torch.int32)
    runs = [[(2, 5), (5, 7), (8, 12)], [(0, 6), (9, 11)]]
    h0 = torch.randn(2, 2, 3, 4, generator=torch.Generator().manual_seed(1))
    out, final = impls.ssd_scan(**dict(rows, seq_idx=seq_idx, initial_states=h0), return_final_states=True, impl=name)
    poisoned = {k: (v.clone() if k in SSD.time_args and v is not None else v) for k, v in rows.items()}
    pad = seq_idx < 0
    for k in SSD.time_args:
        if poisoned[k] is not None:
            poisoned[k][pad] = float("nan")
    out2, final2 = impls.ssd_scan(**dict(poisoned, seq_idx=seq_idx, initial_states=h0), return_final_states=True,
                                  impl=name)
    assert torch.equal(out[pad], torch.zeros_like(out[pad])), "padding tokens' outputs are not zeros"
    assert torch.equal(out.nan_to_num(), out2.nan_to_num()) and not out2.isnan().any(), "padding reached an output"
    assert torch.equal(final, final2), "padding reached a final state"
    for r in range(2):
        for j, (a, e) in enumerate(runs[r]):
            alone = {k: (v[r:r + 1, a:e] if k in SSD.time_args and v is not None else v) for k, v in rows.items()}
            alone["initial_states"] = h0[r:r + 1] if j == 0 else None
            want, want_final = impls.ssd_scan(**{k: (v.double() if isinstance(v, torch.Tensor) else v)
                                                 for k, v in alone.items()}, return_final_states=True, impl="loop")
            torch.testing.assert_close(out[r, a:e].double(), want[0], rtol=1e-5, atol=1e-6)
            if j == len(runs[r]) - 1:
                torch.testing.assert_close(final[r].double(), want_final[0], rtol=1e-5, atol=1e-6)


def test_scan_alone_is_what_the_loop_defines():
    """The oracle of these tests, each sequence cut out and scanned alone by the loop, is the loop's
    own packed path: one definition, not two."""
    case = PINNED[0]
    x = ssd_packed_inputs(case, torch.float64)
    y, s = impls.ssd_scan(**x, return_final_states=True, impl="loop")
    y0, s0 = scan_alone(SSD, "loop", x)
    assert torch.equal(y, y0) and torch.equal(s, s0)
