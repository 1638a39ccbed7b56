"""Mamba-1's selective scan: the family, its public scan and step, and its built-in implementations.

    y = impls.selective_scan(u, delta, A, B, C, ..., impl="parallel")
    y = impls.selective_state_update(state, x, dt, A, B, C, ..., impl="recurrent")

Shapes follow the official ``selective_scan_fn`` / ``selective_state_update``; letters in
impls/frontdoor.py. Both functions check their arguments (impls/selective/frontdoor.py) and what the
implementation returns, so a plugged-in implementation gets the same errors and guarantees as the
built-in ones. The spec is loop.py.
"""

import importlib.util

import torch

from .. import registry
from ..frontdoor import INPUT_DTYPES, check_bool, check_result
from ..registry import lazy, register
from . import frontdoor, loop, parallel, recurrent

# What an implementation can do. A call that needs more raises NotImplementedError: a gap is
# declared and visible, never a silent fallback.
SUPPORTS = dict(
    dtypes=INPUT_DTYPES,            # input dtypes it accepts
    grouped=True,                   # B/C with g groups
    initial_state=True,             # initial_state argument
    gradients=False,                # autograd through the scan
    varlen=False,                   # packed sequences (cu_seqlens)
    state_batch_indices=None,       # the step's batch-indexed state cache; None: as varlen
    nonfinite_inputs=True,          # one inf or NaN input gives non-finite outputs exactly where the loop's are
    deterministic=True,             # the same call twice (forward, and backward) gives the same bits
    batch_invariant=False,          # row i's results are bit for bit the same alone or in any batch (a claim
                                    # a kernel makes; otherwise its rows agree within the tolerance policy)
    case_limits=None,               # dict of upper bounds on b, d, n, l for the property tests, if slow
)
GAPS = dict(grouped="grouped B/C", varlen="packed sequences (cu_seqlens)", state_batch_indices=registry.INDEXED_GAP)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False, *, cu_seqlens=None, impl="parallel"):
    """The Mamba-1 selective scan through the implementation named ``impl``.

    dt = softplus(delta + delta_bias) (each optional); h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t;
    y_t = <C_t, h_t> + D u_t; out = y * silu(z).

    Args:
        u, delta: (b, d, l); A: (d, n) real; B, C: (b, n, l) or (b, g, n, l)
        D, delta_bias: (d,) optional; z: (b, d, l) optional; initial_state: (b, d, n) optional
        cu_seqlens: (nseq + 1,) int32, optional: nseq sequences packed end to end along time, with
            b = 1; sequence i is tokens cu_seqlens[i]:cu_seqlens[i + 1] and is scanned as if alone
            (nothing crosses a boundary), from initial_state[i] with initial_state (nseq, d, n)
    Returns:
        y: (b, d, l) in u's dtype, or (y, last_state) with last_state (b, d, n) in the compute
        dtype when return_last_state; with cu_seqlens, last_state is (nseq, d, n), each
        sequence's state after its last token (its initial state, or zeros, for a length-0 one).
    Raises:
        ValueError or TypeError naming the argument for bad input (impls/selective/frontdoor.py), a malformed
        cu_seqlens and a delta_softplus that is not a bool included; NotImplementedError when the
        implementation lacks what the call needs (cu_seqlens needs the capability ``varlen``).
    """
    entry = registry.get(impl)
    check_bool("selective_scan", "delta_softplus", delta_softplus)
    if cu_seqlens is None:
        dims = frontdoor.check_scan(u, delta, A, B, C, D, z, delta_bias, initial_state)
    else:
        dims = frontdoor.check_scan_packed(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens)
    registry.require(entry, "selective_scan", dims["input_dtype"], (u, delta, A, B, C, D, z, delta_bias, initial_state),
                     varlen=cu_seqlens is not None, grouped=B.dim() == 4 or C.dim() == 4,
                     initial_state=initial_state is not None)
    b, d, l, n, f = dims["b"], dims["d"], dims["l"], dims["n"], dims["compute_dtype"]
    states = b if cu_seqlens is None else dims["nseq"]
    if u.numel() == 0:  # l = 0 (or b, d = 0): empty output, the state passes through unchanged
        last = (initial_state.to(f) if initial_state is not None
                else torch.zeros(states, d, n, dtype=f, device=u.device))
        y = u.new_empty(b, d, l)
        return (y, last) if return_last_state else y
    packed = {} if cu_seqlens is None else dict(cu_seqlens=cu_seqlens)
    out = entry.scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_last_state, **packed)
    y, last = out if return_last_state else (out, None)
    check_result("selective_scan", impl, "y", y, (b, d, l), u.dtype)
    if return_last_state:
        check_result("selective_scan", impl, "last_state", last, (states, d, n), f)
        return y, last
    return y


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           *, state_batch_indices=None, impl="recurrent"):
    """One decoding step: advance ``state`` by one token in place and return the token's output.

    Args:
        state: (b, d, n) in the compute dtype, updated in place (left untouched if the call raises
               before the implementation runs); with state_batch_indices, a (slots, d, n) cache
        x, dt: (b, d); A: (d, n); B, C: (b, n) or (b, g, n); D, dt_bias: (d,) optional; z: (b, d) optional
        state_batch_indices: (b,) int32, optional: row i advances cache slot state_batch_indices[i];
            a negative index marks a padding row: its output is zeros and no slot is touched
    Returns:
        y: (b, d) in x's dtype
    Raises:
        ValueError or TypeError naming the argument for bad input, an index >= slots, a slot used
        twice and a dt_softplus that is not a bool included, with the state untouched;
        NotImplementedError when the implementation has no step or lacks what the call needs
        (state_batch_indices needs the capability ``state_batch_indices``).
    """
    entry = registry.get(impl)
    registry.require_step(entry, "selective_state_update")
    check_bool("selective_state_update", "dt_softplus", dt_softplus)
    if state_batch_indices is None:
        dims = frontdoor.check_step(state, x, dt, A, B, C, D, z, dt_bias)
    else:
        dims = frontdoor.check_step_indexed(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)
    registry.require(entry, "selective_state_update", dims["input_dtype"], (state, x, dt, A, B, C, D, z, dt_bias),
                     state_batch_indices=state_batch_indices is not None, grouped=B.dim() == 3 or C.dim() == 3)
    if state_batch_indices is None:
        y = entry.step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    else:
        y = entry.step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices=state_batch_indices)
    check_result("selective_state_update", impl, "y", y, (dims["b"], dims["d"]), x.dtype)
    return y


FAMILY = registry.add_family(registry.Family(
    name="selective", scan=selective_scan, step=selective_state_update, supports=SUPPORTS, gaps=GAPS,
    option="--impl", step_option="--impl-step", equivalence="equivalence.selective"))

# Not batch_invariant (the default): built from batched torch ops on a CPU, whose softplus and silu
# round an element differently in their vectorised body and in their scalar tail (measured: 13% of
# float32 elements, by an ulp), and which elements fall in the tail depends on the batch size. Their
# rows agree within the tolerance policy instead, which is what is tested.
register("loop", loop.selective_scan, gradients=True, varlen=True)
register("recurrent", recurrent.selective_scan, step=recurrent.selective_state_update, varlen=True)
register("parallel", parallel.selective_scan, gradients=True, varlen=True)

# Triton kernels (triton.py), when triton is installed. Imported on first call only. Without a GPU
# they run in Triton's interpreter, one program after another, so the property tests fold their
# cases into small sizes (odd sizes stay odd; l still spans several 16-token chunks); on a GPU they
# run natively, at the suite's full sizes. Declared gap: varlen (the kernels take no cu_seqlens or
# state_batch_indices yet).
if importlib.util.find_spec("triton") is not None:
    register("triton", lazy("selective.triton", "selective_scan"), step=lazy("selective.triton", "selective_state_update"),
             gradients=True, batch_invariant=True,
             case_limits=dict(b=2, d=40, n=16, l=40) if registry.triton_interpreted() else None)
