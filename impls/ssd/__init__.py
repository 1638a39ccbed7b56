"""Mamba-2's SSD: the family, its public scan and step, and its built-in implementations.

    y = impls.ssd_scan(x, dt, A, B, C, chunk_size, ..., impl="chunked")
    y = impls.ssd_state_update(state, x, dt, A, B, C, ..., impl="recurrent")

The signature is the official ``mamba_chunk_scan_combined``'s; letters in impls/frontdoor.py. The
spec is loop.py; packed sequences are varlen.py.
"""

import importlib.util

import torch

from .. import registry
from ..frontdoor import INPUT_DTYPES, check_bool, check_no_overlap, check_result
from ..registry import lazy, register
from . import chunked, frontdoor, loop, mapped, recurrent, varlen

# What an SSD implementation can do; a call needing more raises NotImplementedError.
SUPPORTS = dict(
    dtypes=INPUT_DTYPES,            # input dtypes it accepts
    grouped=True,                   # B/C with g > 1 groups
    initial_states=True,            # initial_states argument
    gradients=False,                # autograd through the scan
    dt_limit=True,                  # a dt_limit other than the default (0, inf)
    D_hp=True,                      # D of shape (h, p)
    varlen=False,                   # seq_idx, cu_seqlens, return_varlen_states
    state_batch_indices=None,       # the step's batch-indexed state cache; None: as varlen
    nonfinite_inputs=True,          # one inf or NaN input gives non-finite outputs exactly where the loop's are
    deterministic=True,             # the same call twice (forward, and backward) gives the same bits
    batch_invariant=False,          # row i's results are bit for bit the same alone or in any batch (a claim
                                    # a kernel makes; otherwise its rows agree within the tolerance policy)
    case_limits=None,               # dict of upper bounds on b, l, h, p, n for the property tests, if slow
)
GAPS = dict(grouped="grouped B/C (g > 1)", D_hp="D of shape (h, p)", dt_limit="a dt_limit other than (0, inf)",
            varlen="packed sequences (varlen)", state_batch_indices=registry.INDEXED_GAP)


def ssd_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
             cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False,
             return_varlen_states=False, *, impl="chunked"):
    """The Mamba-2 SSD scan through the SSD implementation named ``impl``; the signature of the
    official ``mamba_chunk_scan_combined`` (without its state_dtype).

    dt <- clamp(softplus?(dt + dt_bias), *dt_limit) (softplus threshold 20; the clamp always, so the
    default lower limit 0 turns a negative dt into 0); h_t = exp(dt_t A) h_{t-1} + dt_t x_t (x) B_t;
    y_t = h_t C_t + D x_t; out = y silu(z). Dao & Gu 2024, eq. (1); the spec is impls/ssd/loop.py.

    Args:
        x: (b, l, h, p); dt: (b, l, h); A: (h,); B, C: (b, l, g, n), head i reads group i // (h // g)
        chunk_size: positive int, a performance setting only (any l, results differ by rounding)
        D: (h,) or (h, p) optional; z: (b, l, h, p) optional; dt_bias: (h,) optional
        initial_states: (b, h, p, n) optional (zeros); (nseq, h, p, n) with cu_seqlens
        seq_idx: (b, l) int32 optional: a new sequence wherever it changes, negative = padding
            (outputs zeros, contributes to no state); initial_states reaches a row's first sequence
        cu_seqlens: (nseq + 1,) int32 optional, b = 1: sequence i is tokens cu_seqlens[i]:cu_seqlens[i+1],
            scanned as if alone from initial_states[i]
        return_varlen_states: with cu_seqlens, also return varlen_states (nseq, h, p, n)
        (packed sequences: impls/ssd/varlen.py; they need the capability ``varlen``)
        dt_softplus: bool; dt_limit: (lo, hi) with lo <= hi
        return_final_states: also return the state after the last token (with cu_seqlens, after
            each sequence's last token: (nseq, h, p, n))
    Returns:
        out (b, l, h, p) in x's dtype, or (out, final_states) with final_states (b, h, p, n) in the
        compute dtype (float32, float64 for float64 inputs); then varlen_states if asked, the
        official order: out, [final_states], [varlen_states].
    Raises:
        ValueError / TypeError at the front door (impls/ssd/frontdoor.py, impls/ssd/varlen.py)
        naming the argument, malformed cu_seqlens or seq_idx included; NotImplementedError for what
        the implementation does not declare.
    """
    entry = registry.get(impl, "ssd")
    check_bool("ssd_scan", "dt_softplus", dt_softplus)
    packed = seq_idx is not None or cu_seqlens is not None or bool(return_varlen_states)
    dims, chunk_size, dt_limit = frontdoor.check_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias,
                                                          None if packed else initial_states, dt_limit)
    if packed:
        dims = varlen.check_packed(x, initial_states, seq_idx, cu_seqlens, return_varlen_states, dims)
    registry.require(entry, "ssd_scan", dims["input_dtype"], (x, dt, A, B, C, D, z, dt_bias, initial_states),
                 grouped=dims["g"] > 1, initial_states=initial_states is not None,
                 dt_limit=dt_limit != frontdoor.DEFAULT_DT_LIMIT, D_hp=D is not None and D.dim() == 2,
                 varlen=packed)
    b, l, h, p, n, f = dims["b"], dims["l"], dims["h"], dims["p"], dims["n"], dims["compute_dtype"]
    if x.numel() == 0 and not packed:  # l = 0 (or b, h, p = 0): empty output, the state passes through
        final = (initial_states.to(f) if initial_states is not None
                 else torch.zeros(b, h, p, n, dtype=f, device=x.device))
        out = x.new_empty(b, l, h, p)
        return (out, final) if return_final_states else out
    res = entry.scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
                     dt_softplus, dt_limit, return_final_states, return_varlen_states)
    if packed:
        res = list(res) if isinstance(res, tuple) else [res]
        states = b if dims["nseq"] is None else dims["nseq"]
        wanted = [("out", (b, l, h, p), x.dtype)] + [("final_states", (states, h, p, n), f)] * bool(return_final_states)
        wanted += [("varlen_states", (dims["nseq"], h, p, n), f)] * bool(return_varlen_states)
        if len(res) != len(wanted):
            raise RuntimeError(f"ssd_scan: implementation {impl!r} returned {len(res)} results, expected "
                               f"{len(wanted)}: {', '.join(w[0] for w in wanted)}")
        for r, (what, shape, dtype) in zip(res, wanted):
            check_result("ssd_scan", impl, what, r, shape, dtype)
        return res[0] if len(res) == 1 else tuple(res)
    out, final = res if return_final_states else (res, None)
    check_result("ssd_scan", impl, "out", out, (b, l, h, p), x.dtype)
    if return_final_states:
        check_result("ssd_scan", impl, "final_states", final, (b, h, p, n), f)
        return out, final
    return out


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                     dt_limit=(0.0, float("inf")), *, state_batch_indices=None, impl="recurrent"):
    """One Mamba-2 decoding step: advance ``state`` by one token in place and return its output.

    Args:
        state: (b, h, p, n) in the compute dtype, updated in place (left untouched whenever the call
               raises at the front door)
        x: (b, h, p); dt: (b, h) or the tied (b, h, p); A: (h,) or the tied (h, p, n);
        B, C: (b, g, n); D: (h,) or (h, p) optional; z: (b, h, p) optional;
        dt_bias: (h,) or the tied (h, p) optional. Tied forms are the official Mamba2.step's
        broadcasts (zero strides, one value per head); they are untied before the implementation runs.
        dt_softplus: bool; dt_limit: (lo, hi), applied after softplus, as in ssd_scan
        state_batch_indices: (b,) int32 optional: ``state`` is then a (slots, h, p, n) cache and row
            r advances slot state_batch_indices[r]; negative = padding row (output zeros, no slot
            touched); needs the capability ``state_batch_indices``
    Returns:
        y: (b, h, p) in x's dtype
    Raises:
        ValueError / TypeError naming the argument (an index >= slots or a slot used twice
        included), the state untouched; NotImplementedError for what the implementation lacks.
    """
    entry = registry.get(impl, "ssd")
    registry.require_step(entry, "ssd_state_update")
    check_bool("ssd_state_update", "dt_softplus", dt_softplus)
    indexed = state_batch_indices is not None
    # a (slots, h, p, n) cache is checked on its own (impls/ssd/varlen.py); no state has overlap with the rest
    dims, untied, dt_limit = frontdoor.check_step(None if indexed else state, x, dt, A, B, C, D, z, dt_bias,
                                                      dt_limit)
    if indexed:
        dims = varlen.check_step_indexed(state, x, state_batch_indices, dims)
        check_no_overlap("ssd_state_update", dict(state=state),
                                   dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias))
    dt, A, dt_bias = untied["dt"], untied["A"], untied["dt_bias"]
    registry.require(entry, "ssd_state_update", dims["input_dtype"], (state, x, dt, A, B, C, D, z, dt_bias),
                 grouped=dims["g"] > 1, dt_limit=dt_limit != frontdoor.DEFAULT_DT_LIMIT,
                 D_hp=D is not None and D.dim() == 2, state_batch_indices=indexed)
    if indexed:
        y = entry.step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit,
                       state_batch_indices=state_batch_indices)
    else:
        y = entry.step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit)
    check_result("ssd_state_update", impl, "y", y, (dims["b"], dims["h"], dims["p"]), x.dtype)
    return y


FAMILY = registry.add_family(registry.Family(
    name="ssd", scan=ssd_scan, step=ssd_state_update, supports=SUPPORTS, gaps=GAPS,
    option="--ssd-impl", step_option="--ssd-impl-step", equivalence="equivalence.ssd"))

# varlen (varlen.py): the loop cuts each sequence out (the definition), chunked restarts its chunks at
# each sequence's first token (vLLM's layout), recurrent steps each sequence from its own state and
# its step takes state_batch_indices.
# batch_invariant=False: batched torch ops on a CPU, as for Mamba-1's loop.
register("loop", loop.ssd_scan, family="ssd", gradients=True, varlen=True)
register("chunked", chunked.ssd_scan, family="ssd", gradients=True, varlen=True)
register("recurrent", recurrent.ssd_scan, step=recurrent.ssd_state_update, family="ssd", varlen=True)
# Every grouped Mamba-1 implementation (parallel, ...) through the d = h p mapping, under its own name,
# with its Mamba-1 varlen: cu_seqlens and state_batch_indices pass through the mapping, seq_idx rows
# are packed into one cu_seqlens call (varlen.py: through_cu_seqlens).
mapped.register_all()

# The chunked SSD scan and the decode step as Triton kernels (triton.py), imported on first call only.
# Without a GPU they run in Triton's interpreter, so the property tests fold their cases into small
# sizes (l still spans several chunks of the drawn chunk sizes). Declared gap: packed scans (varlen);
# its step does take state_batch_indices.
if importlib.util.find_spec("triton") is not None:
    register("triton", lazy("ssd.triton", "ssd_scan"), step=lazy("ssd.triton", "ssd_state_update"), family="ssd",
             gradients=True, state_batch_indices=True, batch_invariant=True,
             case_limits=dict(b=2, l=24, h=2, p=6, n=6, chunks=4) if registry.triton_interpreted() else None)
