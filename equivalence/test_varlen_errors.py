"""Packed sequences at the front door: a malformed cu_seqlens or state_batch_indices raises
ValueError naming it (the state untouched), and an implementation without ``varlen`` refuses a
call that needs it with NotImplementedError: a declared gap, never a silent fallback."""

import pytest
import torch

import impls

from .selective.varlen import VarlenCase, packed_inputs

CASE = VarlenCase(lengths=(3, 0, 5), d=4, n=2, seed=1)   # l = 8, nseq = 3

MALFORMED = {   # what is wrong: cu_seqlens
    "not starting at 0": torch.tensor([1, 3, 3, 8], dtype=torch.int32),
    "decreasing": torch.tensor([0, 5, 3, 8], dtype=torch.int32),
    "not ending at l": torch.tensor([0, 3, 3, 7], dtype=torch.int32),
    "past l": torch.tensor([0, 3, 3, 9], dtype=torch.int32),
    "int64": torch.tensor([0, 3, 3, 8], dtype=torch.int64),
    "float": torch.tensor([0.0, 3.0, 3.0, 8.0]),
    "two-dimensional": torch.tensor([[0, 3], [3, 8]], dtype=torch.int32),
    "empty": torch.zeros(0, dtype=torch.int32),
}


def varlen_names():
    return [n for n in impls.names() if impls.get(n).supports["varlen"]]


@pytest.mark.parametrize("name", varlen_names())
@pytest.mark.parametrize("what", MALFORMED)
def test_malformed_cu_seqlens_raises_value_error_naming_it(name, what):
    x = {**packed_inputs(CASE), "cu_seqlens": MALFORMED[what]}
    with pytest.raises(ValueError, match="cu_seqlens"):
        impls.selective_scan(**x, impl=name)


@pytest.mark.parametrize("name", varlen_names())
def test_cu_seqlens_with_a_batch_of_two_raises(name):
    x = packed_inputs(CASE)
    for k in ("u", "delta", "z", "B", "C"):
        x[k] = x[k].expand(2, *x[k].shape[1:])
    with pytest.raises(ValueError, match="cu_seqlens.*b=1.*b=2"):
        impls.selective_scan(**x, impl=name)


@pytest.mark.parametrize("name", varlen_names())
def test_packed_initial_state_is_one_per_sequence(name):
    x = packed_inputs(CASE)
    x["initial_state"] = x["initial_state"][:1]      # (b, d, n): one per batch row, not per sequence
    with pytest.raises(ValueError, match=r"initial_state.*nseq=3"):
        impls.selective_scan(**x, impl=name)


def test_a_correct_cu_seqlens_is_accepted_and_the_last_state_has_one_row_per_sequence():
    y, last = impls.selective_scan(**packed_inputs(CASE), return_last_state=True, impl="loop")
    assert y.shape == (1, 4, 8) and last.shape == (3, 4, 2)
    assert torch.equal(last[1], packed_inputs(CASE)["initial_state"][1])   # length 0: passed through


def _step_args(b=3, d=4, n=2, slots=5):
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return dict(state=r(slots, d, n), x=r(b, d), dt=r(b, d), A=-r(d, n).abs(), B=r(b, n), C=r(b, n))


BAD_INDICES = {   # what is wrong: (state_batch_indices for b = 3 rows into 5 slots, the message)
    "out of range": (torch.tensor([0, 5, 1], dtype=torch.int32), "state_batch_indices\\[1\\]=5"),
    "int64": (torch.tensor([0, 1, 2], dtype=torch.int64), "dtype torch.int32"),
    "wrong length": (torch.tensor([0, 1], dtype=torch.int32), "shape"),
    "a slot twice": (torch.tensor([2, -1, 2], dtype=torch.int32), "at most once"),
}


@pytest.mark.parametrize("name", [n for n in varlen_names() if impls.get(n).step is not None])
@pytest.mark.parametrize("what", BAD_INDICES)
def test_bad_state_batch_indices_raise_and_leave_the_state_untouched(name, what):
    args = _step_args()
    before = args["state"].clone()
    indices, message = BAD_INDICES[what]
    with pytest.raises(ValueError, match=message):
        impls.selective_state_update(**args, state_batch_indices=indices, impl=name)
    assert torch.equal(args["state"], before)


def test_the_cache_is_checked_as_slots():
    args = _step_args()
    args["state"] = args["state"][:, :3]               # d = 3, not 4
    with pytest.raises(ValueError, match=r"state.*slots"):
        impls.selective_state_update(**args, state_batch_indices=torch.tensor([0, 1, 2], dtype=torch.int32))


# The implementations without varlen: triton and the adapters (mambapy, mamba_ssm), where installed.
def gap_names():
    return [n for n in impls.names() if not impls.get(n).supports["varlen"]]


@pytest.mark.parametrize("name", gap_names())
def test_without_varlen_a_packed_call_is_refused(name):
    with pytest.raises(NotImplementedError, match="cu_seqlens"):
        impls.selective_scan(**packed_inputs(CASE), impl=name)


@pytest.mark.parametrize("name", [n for n in impls.names()
                                  if impls.get(n).step is not None and not impls.get(n).supports["state_batch_indices"]])
def test_without_state_batch_indices_a_batch_indexed_step_is_refused_and_the_state_untouched(name):
    args = _step_args()
    before = args["state"].clone()
    with pytest.raises(NotImplementedError, match="state_batch_indices"):
        impls.selective_state_update(**args, state_batch_indices=torch.tensor([0, 1, 2], dtype=torch.int32), impl=name)
    assert torch.equal(args["state"], before)
