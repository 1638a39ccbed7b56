"""Packed sequences at the front door, for every family with a Packing: a malformed cu_seqlens,
per-sequence initial states or state_batch_indices raises ValueError (TypeError for a non-tensor)
naming the argument, before anything runs, the cache untouched; an implementation without
``varlen`` or ``state_batch_indices`` refuses a call that needs it with NotImplementedError: a
declared gap, never a silent fallback. The SSD's seq_idx errors are in equivalence/ssd/test_seq_idx.py."""

import dataclasses

import pytest
import torch

import impls

from .properties import family, wired

# The family modules (equivalence/<family>/), under the parameter name the plugin reads a test's family from
FAMILIES = [family(f) for f in impls.FAMILIES if wired(f) and getattr(family(f), "PACKING", None) is not None]
FAMILY_IDS = [fam.NAME for fam in FAMILIES]


def i32(*v):
    return torch.tensor(v, dtype=torch.int32)


def inputs(fam, **changes):
    """The packed inputs of lengths 3, 0, 5 (l = 8, nseq = 3), with the options of the family's
    first pinned packing, with ``changes``."""
    return {**fam.PACKING.inputs(dataclasses.replace(fam.PACKING.pinned[0], lengths=(3, 0, 5))), **changes}


def names(where):
    """pytest.param(family module, name) for each registered implementation where(entry) holds."""
    return [pytest.param(fam, n, id=f"{fam.NAME}-{n}") for fam in FAMILIES for n in impls.names(fam.NAME)
            if where(impls.get(n, fam.NAME))]


VARLEN = names(lambda e: e.supports["varlen"])

MALFORMED = {   # what is wrong: (cu_seqlens for l = 8, what the message says)
    "not starting at 0": (i32(1, 3, 3, 8), "first offset"),
    "decreasing": (i32(0, 5, 3, 8), "non-decreasing"),
    "not ending at l": (i32(0, 3, 3, 7), "last offset"),
    "past l": (i32(0, 3, 3, 9), "last offset"),
    "int64": (torch.tensor([0, 3, 3, 8]), "int32"),
    "float": (torch.tensor([0.0, 3.0, 3.0, 8.0]), "int32"),
    "two-dimensional": (i32(0, 3, 3, 8)[None], "shape"),
    "empty": (torch.zeros(0, dtype=torch.int32), ""),
}


@pytest.mark.parametrize("fam, name", VARLEN)
@pytest.mark.parametrize("what", MALFORMED)
def test_malformed_cu_seqlens_raises_value_error_naming_it(fam, name, what):
    cu_seqlens, says = MALFORMED[what]
    with pytest.raises(ValueError, match=f"cu_seqlens.*{says}"):
        fam.PACKING.scan(name, inputs(fam, cu_seqlens=cu_seqlens))


@pytest.mark.parametrize("fam, name", VARLEN)
def test_cu_seqlens_with_a_batch_of_two_raises(fam, name):
    P, x = fam.PACKING, inputs(fam)
    two = {k: (v.expand(2, *v.shape[1:]) if k in P.time_args and v is not None else v) for k, v in x.items()}
    with pytest.raises(ValueError, match="cu_seqlens.*b=1.*b=2"):
        P.scan(name, two)


@pytest.mark.parametrize("fam, name", VARLEN)
def test_packed_initial_states_are_one_per_sequence(fam, name):
    P, x = fam.PACKING, inputs(fam)
    for wrong in (lambda s: s[:1], lambda s: torch.cat([s] * 2), lambda s: s[0]):  # per row, too many, no batch axis
        with pytest.raises(ValueError, match=f"{P.state_arg}.*nseq=3"):
            P.scan(name, {**x, P.state_arg: P.map(wrong, x[P.state_arg])})


@pytest.mark.parametrize("fam", FAMILIES, ids=FAMILY_IDS)
def test_a_correct_cu_seqlens_is_accepted_and_the_last_state_has_one_row_per_sequence(fam):
    P, x = fam.PACKING, inputs(fam)
    y, last = P.scan("loop", x)
    assert y.shape[P.time_dim] == 8 and all(s.shape[0] == 3 for s in P.parts(last))
    assert P.equal(P.map(lambda s: s[1], last), P.map(lambda s: s[1], x[P.state_arg]))   # length 0: passed through


def step(fam, name, cache, indices, rows=3):
    """A batch-indexed decoding step of ``rows`` rows (the packed case's first tokens) into ``cache``."""
    P, x = fam.PACKING, inputs(fam)
    tokens = {k: (None if x[k] is None else P.token(x[k], list(range(rows)), k)) for k in P.step_args}
    return P.step(name, cache, x, tokens, indices)


def cache_of(fam, slots=5):
    """A random cache of ``slots`` states of the family's packed case: (slots, ...), each part."""
    P = fam.PACKING
    gen = torch.Generator().manual_seed(0)
    return P.map(lambda s: torch.randn(slots, *s.shape[1:], generator=gen, dtype=s.dtype), P.scan("loop", inputs(fam))[1])


def copied(fam, cache):
    return fam.PACKING.map(torch.clone, cache)


BAD_INDICES = {   # what is wrong: (state_batch_indices for 3 rows into 5 slots, the error, what it says)
    "out of range": (i32(0, 5, 1), ValueError, "state_batch_indices\\[1\\]=5"),
    "int64": (torch.tensor([0, 1, 2]), ValueError, "dtype torch.int32"),
    "wrong length": (i32(0, 1), ValueError, "shape"),
    "a slot twice": (i32(2, -1, 2), ValueError, "at most once"),
    "not a tensor": ([0, 1, 2], TypeError, "Tensor"),
}
INDEXED_STEPS = names(lambda e: e.step is not None and e.supports["state_batch_indices"])


@pytest.mark.parametrize("fam, name", INDEXED_STEPS)
@pytest.mark.parametrize("what", BAD_INDICES)
def test_bad_state_batch_indices_raise_and_leave_the_cache_untouched(fam, name, what):
    cache = cache_of(fam)
    before = copied(fam, cache)
    indices, error, says = BAD_INDICES[what]
    with pytest.raises(error, match=f"state_batch_indices.*{says}"):
        step(fam, name, cache, indices)
    assert fam.PACKING.equal(cache, before)


@pytest.mark.parametrize("fam, name", INDEXED_STEPS)
def test_the_cache_is_checked_as_slots(fam, name):
    with pytest.raises(ValueError, match=r"state.*slots"):
        step(fam, name, fam.PACKING.map(lambda s: s[..., :-1], cache_of(fam)), i32(0, 1, 2))


@pytest.mark.parametrize("fam, name", INDEXED_STEPS)
def test_padding_rows_output_zeros_and_touch_no_slot(fam, name):
    P, cache = fam.PACKING, cache_of(fam, slots=3)
    before = copied(fam, cache)
    y = step(fam, name, cache, i32(-1, 2), rows=2)
    assert torch.equal(y[0], torch.zeros_like(y[0]))
    slots = lambda s, sel: P.map(lambda t: t[sel], s)
    assert P.equal(slots(cache, slice(0, 2)), slots(before, slice(0, 2))) and not P.equal(slots(cache, 2), slots(before, 2))


@pytest.mark.parametrize("fam, name", names(lambda e: not e.supports["varlen"]))
def test_without_varlen_a_packed_call_is_refused(fam, name):
    with pytest.raises(NotImplementedError, match="varlen|cu_seqlens"):
        fam.PACKING.scan(name, inputs(fam))


@pytest.mark.parametrize("fam, name", names(lambda e: e.step is not None and not e.supports["state_batch_indices"]))
def test_without_state_batch_indices_a_batch_indexed_step_is_refused_and_the_cache_untouched(fam, name):
    cache = cache_of(fam)
    before = copied(fam, cache)
    with pytest.raises(NotImplementedError, match="state_batch_indices"):
        step(fam, name, cache, i32(0, 1, 2))
    assert fam.PACKING.equal(cache, before)


@pytest.mark.parametrize("fam", FAMILIES, ids=FAMILY_IDS)
def test_a_plugged_in_step_declares_neither_and_is_refused_both(fam):
    """The family's recurrent scan and step registered with the default capabilities: no varlen
    and no state_batch_indices until declared."""
    name = "varlen-errors:recurrent without varlen"
    if name not in impls.names(fam.NAME):
        e = impls.get("recurrent", fam.NAME)
        impls.register(name, e.scan, step=e.step, family=fam.NAME)
    with pytest.raises(NotImplementedError, match="varlen|cu_seqlens"):
        fam.PACKING.scan(name, inputs(fam))
    with pytest.raises(NotImplementedError, match="state_batch_indices"):
        step(fam, name, cache_of(fam), i32(0, 1), rows=2)
