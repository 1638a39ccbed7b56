"""Mamba-3 (SISO): the public scan and decode step, checked at the front door, then dispatched.

    from impls.mamba3 import mamba3_scan, mamba3_state_update
    out, angle, ssm, k, v = mamba3_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z,
                                        return_final_states=True, impl="chunked")
    out, (angle, ssm, k, v) = mamba3_state_update(q, k, v, adt, dt, trap, Q_bias, K_bias, angles,
                                                  D, z, Input_States=(angle, ssm, k, v))

Implementations: loop (the spec, impls/mamba3/loop.py), chunked (impls/mamba3/chunked.py),
recurrent (impls/mamba3/recurrent.py: the step, and the scan by stepping). Letters (b, l, h, h_qk,
p, n, n_ang, S) in impls/mamba3/loop.py; dtype policy in impls/mamba3/frontdoor.py.
"""

import torch

from .. import registry
from ..frontdoor import INPUT_DTYPES, check_result
from ..registry import register
from . import chunked, frontdoor, loop, recurrent

# What a Mamba-3 implementation can do; a call needing more raises NotImplementedError.
SUPPORTS = dict(
    dtypes=INPUT_DTYPES,            # input dtypes it accepts (V's dtype)
    grouped=True,                   # Q and K with h_qk < h heads
    initial_states=True,            # Input_States (angle, ssm, k, v)
    gradients=False,                # autograd through the scan
    varlen=False,                   # cu_seqlens
    state_batch_indices=None,       # the step's batch-indexed state cache; None: as varlen
    nonfinite_inputs=True,          # one inf or NaN input gives non-finite outputs exactly where the loop's are
    deterministic=True,             # the same call twice (forward, and backward) gives the same bits
    batch_invariant=False,          # row i's results are bit for bit the same alone or in any batch
    case_limits=None,               # dict of upper bounds on b, l, h, p, n for the property tests, if slow
)
GAPS = dict(grouped="Q and K with fewer heads than V (h_qk < h)", varlen="packed sequences (cu_seqlens)",
            initial_states="Input_States", state_batch_indices=registry.INDEXED_GAP)


def mamba3_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None, chunk_size=64,
                return_final_states=False, cu_seqlens=None, *, impl="chunked"):
    """Mamba-3 SISO scan, the official ``mamba3_siso_combined``'s interface.

    Args:
        Q, K: (b, l, h_qk, n) read-out and input projections, n even, h_qk dividing h
        V: (b, l, h, p) input (its dtype is the input dtype); Z: (b, l, h, p) gate, optional
        ADT, DT, Trap: (b, h, l) log-decay A dt, step size, raw trapezoid weight (time last)
        Q_bias, K_bias: (h, n); Angles: (b, l, h, n_ang), n_ang <= n / 2; D: (h,) optional
        Input_States: (angle (S, h, n_ang), ssm (S, h, p, n), k (S, h, n), v (S, h, p)) or None
        chunk_size: positive int, a setting of the chunked implementation
        return_final_states: bool
        cu_seqlens: (nseq + 1,) int32, with b = 1: packed sequences; then S = nseq
        impl: a registered Mamba-3 implementation (impls.names(family="mamba3"))
    Returns:
        out (b, l, h, p) in V's dtype; with return_final_states, (out, angle, ssm, k, v) with the
        states (S, h, ...) in the compute dtype
    """
    entry = registry.get(impl, "mamba3")
    dims = frontdoor.check_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, Input_States, chunk_size,
                                return_final_states, cu_seqlens)
    registry.require(entry, "mamba3_scan", dims["input_dtype"],
                     (Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, *(Input_States or ())),
                     grouped=dims["h_qk"] < dims["h"], initial_states=Input_States is not None,
                     varlen=cu_seqlens is not None)
    res = entry.scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, Input_States, dims["chunk_size"],
                     return_final_states, cu_seqlens)
    _check_results("mamba3_scan", impl, res if return_final_states else (res,), dims, dims["S"], with_time=True)
    return res


def mamba3_state_update(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None,
                        state_batch_indices=None, *, impl="recurrent"):
    """One Mamba-3 SISO token, the official ``mamba3_siso_step``'s interface.

    Args:
        Q, K: (b, h_qk, n); V, Z: (b, h, p) (Z optional); ADT, DT, Trap: (b, h)
        Q_bias, K_bias: (h, n); Angles: (b, h, n_ang), any n_ang <= n / 2 (odd allowed); D: (h,)
        Input_States: (angle (b, h, n_ang), ssm (b, h, p, n), k (b, h, n), v (b, h, p)) or None (zeros)
        state_batch_indices: (b,) int32 or None: Input_States is then a cache (slots, h, ...)
            updated in place, row i in slot state_batch_indices[i], negative = padding row (zeros out)
        impl: a registered Mamba-3 implementation with a step
    Returns:
        (out (b, h, p) in V's dtype, (angle, ssm, k, v)): new tensors in the compute dtype, the
        inputs untouched; with state_batch_indices, the cache tensors, updated in place
    """
    entry = registry.get(impl, "mamba3")
    registry.require_step(entry, "mamba3_state_update")
    dims = frontdoor.check_step(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, Input_States,
                                state_batch_indices)
    registry.require(entry, "mamba3_state_update", dims["input_dtype"],
                     (Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, *(Input_States or ())),
                     grouped=dims["h_qk"] < dims["h"], state_batch_indices=state_batch_indices is not None)
    out, states = entry.step(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, Input_States, state_batch_indices)
    _check_results("mamba3_state_update", impl, (out, *states), dims, dims["S"], with_time=False)
    return out, states


def _check_results(where, impl, res, dims, S, with_time):
    """out (b, [l,] h, p) in the input dtype, then the states (S, h, ...) in the compute dtype."""
    b, l, h, p, n, f = dims["b"], dims["l"], dims["h"], dims["p"], dims["n"], dims["compute_dtype"]
    wanted = [("out", (b, *(l,) * with_time, h, p), dims["input_dtype"])]
    if len(res) > 1:
        wanted += [("angle", (S, h, dims["n_ang"]), f), ("ssm", (S, h, p, n), f), ("k", (S, h, n), f), ("v", (S, h, p), f)]
    if len(res) != len(wanted):
        raise RuntimeError(f"{where}: implementation {impl!r} returned {len(res)} results, expected {len(wanted)}")
    for r, (what, shape, dtype) in zip(res, wanted):
        check_result(where, impl, what, r, shape, dtype)


FAMILY = registry.add_family(registry.Family(
    name="mamba3", scan=mamba3_scan, step=mamba3_state_update, supports=SUPPORTS, gaps=GAPS,
    option="--mamba3-impl", step_option="--mamba3-impl-step", equivalence="equivalence.mamba3"))

# The spec computes through autograd in any dtype; chunked builds decays with selects and masked
# sums. Declared gap of chunked: a non-finite V at a later token of a chunk reaches that chunk's
# earlier outputs through 0 x inf in its within-chunk products (the loop's do not change).
register("loop", loop.mamba3_scan, family="mamba3", gradients=True, varlen=True)
register("chunked", chunked.mamba3_scan, family="mamba3", gradients=True, varlen=True, nonfinite_inputs=False)
register("recurrent", recurrent.scan_by_stepping, step=recurrent.mamba3_state_update, family="mamba3", varlen=True)
