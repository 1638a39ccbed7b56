"""Mamba-3: the public SISO and MIMO scans and decode steps, checked at the front door, then dispatched.

    from impls.mamba3 import mamba3_scan, mamba3_state_update
    out, angle, ssm, k, v = mamba3_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z,
                                        return_final_states=True, impl="chunked")
    out, (angle, ssm, k, v) = mamba3_state_update(q, k, v, adt, dt, trap, Q_bias, K_bias, angles,
                                                  D, z, Input_States=(angle, ssm, k, v))

    out, angle, ssm, k, v = mamba3_mimo(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out,
                                        Angles, D, Z, return_state=True, impl="chunked")

Implementations: loop (the spec, impls/mamba3/loop.py), chunked (impls/mamba3/chunked.py),
recurrent (impls/mamba3/recurrent.py: the step, and the scan by stepping). Letters (b, l, h, h_qk,
p, n, n_ang, S) in impls/mamba3/loop.py; dtype policy in impls/mamba3/frontdoor.py.
"""

import importlib.util

import torch

from .. import registry
from ..frontdoor import INPUT_DTYPES, check_result
from ..registry import lazy, register
from . import chunked, frontdoor, loop, recurrent

# What a Mamba-3 implementation can do; a call needing more raises NotImplementedError.
SUPPORTS = dict(
    dtypes=INPUT_DTYPES,            # input dtypes it accepts (V's dtype)
    grouped=True,                   # Q and K with h_qk < h heads
    Input_States=True,              # initial states (angle, ssm, k, v); named as the argument, as the
                                    # capability that continuing from a last state needs (the SSD's initial_states)
    gradients=False,                # autograd through the scan
    varlen=False,                   # cu_seqlens
    state_batch_indices=None,       # the step's batch-indexed state cache; None: as varlen
    nonfinite_inputs=True,          # one inf or NaN input gives non-finite outputs exactly where the loop's are
    deterministic=True,             # the same call twice (forward, and backward) gives the same bits
    batch_invariant=False,          # row i's results are bit for bit the same alone or in any batch
    case_limits=None,               # dict of upper bounds on b, l, h, p, n for the property tests, if slow
)
GAPS = dict(grouped="Q and K with fewer heads than V (h_qk < h)", varlen="packed sequences (cu_seqlens)",
            Input_States="Input_States", state_batch_indices=registry.INDEXED_GAP)


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
                     grouped=dims["h_qk"] < dims["h"], Input_States=Input_States is not None,
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
# sums, and keeps a non-finite V out of its chunk's earlier outputs (impls/mamba3/chunked.py).
register("loop", loop.mamba3_scan, family="mamba3", gradients=True, varlen=True)
register("chunked", chunked.mamba3_scan, family="mamba3", gradients=True, varlen=True)
register("recurrent", recurrent.scan_by_stepping, step=recurrent.mamba3_state_update, family="mamba3", varlen=True)


# ---- MIMO ------------------------------------------------------------------------------------------
# MIMO is its own public function, ``mamba3_mimo``, in the official signature (and family
# "mamba3_mimo" in the registry), not a rank argument of mamba3_scan, because:
#   - its arguments differ, not only in size: three projections (MIMO_V, MIMO_Z, MIMO_Out), a norm
#     before the gate, rotary_dim_divisor and dtype, states with a rank axis (k: (S, R, h, n));
#     folded into mamba3_scan they would be a second signature hidden behind the first;
#   - it rotates other pairs than SISO ((i, i + n/2), not (2i, 2i + 1)), so "MIMO at R = 1" is not
#     the SISO scan: as a capability of one function the rank would silently change the pairing;
#   - the official ``mamba3_mimo`` then plugs in unchanged (same names, order and returns), and
#     its gaps (no initial states) are declared capabilities of its entry, as for SISO.
# Beyond the official: Input_States (last, keyword) and a decode step, mamba3_mimo_state_update.

MIMO_SUPPORTS = dict(
    dtypes=INPUT_DTYPES,            # input dtypes it accepts (V's dtype)
    grouped=True,                   # Q and K with h_qk < h heads
    Input_States=True,              # initial states (angle, ssm, k, v); the official kernel takes none
    gradients=False,                # autograd through the scan
    varlen=False,                   # cu_seqlens
    state_batch_indices=None,       # the step's batch-indexed state cache; None: as varlen
    pregate_norm=True,              # fuse_pregate_headwise_rms_norm
    rank_outputs=True,              # MIMO_Out = None: the R outputs returned apart
    nonfinite_inputs=True,          # as SUPPORTS
    deterministic=True,
    batch_invariant=False,
    case_limits=None,
)
MIMO_GAPS = dict(grouped=GAPS["grouped"], varlen=GAPS["varlen"], Input_States="Input_States",
                 state_batch_indices=registry.INDEXED_GAP, pregate_norm="fuse_pregate_headwise_rms_norm",
                 rank_outputs="MIMO_Out = None (outputs per rank)")


def mamba3_mimo(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D=None, Z=None,
                chunk_size=16, rotary_dim_divisor=None, dtype=None, return_state=False, cu_seqlens=None,
                fuse_pregate_headwise_rms_norm=False, outproj_norm_weight=None, outproj_norm_eps=1e-5,
                Input_States=None, *, impl="chunked"):
    """Mamba-3 MIMO scan, the official ``mamba3_mimo``'s interface (plus Input_States).

    Args:
        Q, K: (b, l, R, h_qk, n) read-outs and inputs per rank, n even, h_qk dividing h
        V: (b, l, h, p) input (its dtype is the input dtype); Z: (b, l, h, p) gate, optional
        ADT, DT, Trap: (b, h, l) as mamba3_scan
        Q_bias, K_bias: (h, R, n)
        MIMO_V, MIMO_Z, MIMO_Out: (h, R, p): v~_r = V * MIMO_V[r], the gate silu(Z * MIMO_Z[r]),
            out = sum_r MIMO_Out[r] * y_r. MIMO_Z is needed with Z; MIMO_Out None returns y per rank
        Angles: (b, l, h, n_ang), n_ang <= n / 2, pairs (i, i + n/2) rotated; D: (h,) optional
        chunk_size: positive int, a setting of chunked implementations
        rotary_dim_divisor: None or n / n_ang (the official's 2 or 4), checked against Angles
        dtype: None or the official kernel's low-precision matmul dtype; ours compute in the compute dtype
        return_state: bool
        cu_seqlens: (nseq + 1,) int32, with b = 1: packed sequences; then S = nseq
        fuse_pregate_headwise_rms_norm: RMS norm of each rank's y over p before the gate;
            outproj_norm_weight: its weight, (h, p) or (h * p,), optional; outproj_norm_eps: its eps
        Input_States: (angle (S, h, n_ang), ssm (S, h, p, n), k (S, R, h, n), v (S, h, p)) or None
        impl: a registered MIMO implementation (impls.names(family="mamba3_mimo"))
    Returns:
        out (b, l, h, p), or (b, l, R, h, p) without MIMO_Out, in V's dtype; with return_state,
        (out, angle, ssm, k, v), the states (S, h, ...) in the compute dtype
    """
    entry = registry.get(impl, "mamba3_mimo")
    dims = frontdoor.check_mimo(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z,
                                chunk_size, rotary_dim_divisor, dtype, return_state, cu_seqlens,
                                fuse_pregate_headwise_rms_norm, outproj_norm_weight, outproj_norm_eps, Input_States)
    registry.require(entry, "mamba3_mimo", dims["input_dtype"],
                     (Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z,
                      outproj_norm_weight, *(Input_States or ())),
                     grouped=dims["h_qk"] < dims["h"], Input_States=Input_States is not None,
                     varlen=cu_seqlens is not None, pregate_norm=fuse_pregate_headwise_rms_norm,
                     rank_outputs=MIMO_Out is None)
    res = entry.scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z,
                     dims["chunk_size"], rotary_dim_divisor, dtype, return_state, cu_seqlens,
                     fuse_pregate_headwise_rms_norm, outproj_norm_weight, outproj_norm_eps, Input_States)
    _check_mimo_results("mamba3_mimo", impl, res if return_state else (res,), dims, MIMO_Out is None, with_time=True)
    return res


def mamba3_mimo_state_update(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D=None, Z=None,
                             Input_States=None, fuse_pregate_headwise_rms_norm=False, outproj_norm_weight=None,
                             outproj_norm_eps=1e-5, state_batch_indices=None, *, impl="recurrent"):
    """One Mamba-3 MIMO token (the official has no public MIMO step; the module's decode does this).

    Args:
        Q, K: (b, R, h_qk, n); V, Z: (b, h, p) (Z optional); ADT, DT, Trap: (b, h)
        Q_bias, K_bias: (h, R, n); MIMO_V, MIMO_Z, MIMO_Out: (h, R, p); Angles: (b, h, n_ang); D: (h,)
        Input_States: (angle (b, h, n_ang), ssm (b, h, p, n), k (b, R, h, n), v (b, h, p)) or None (zeros)
        fuse_pregate_headwise_rms_norm, outproj_norm_weight, outproj_norm_eps: as mamba3_mimo
        state_batch_indices: (b,) int32 or None: Input_States is then a cache (slots, h, ...), k
            (slots, R, h, n), updated in place, row i in slot state_batch_indices[i], negative = padding
            row (zeros out, no slot touched)
        impl: a registered MIMO implementation with a step
    Returns:
        (out (b, h, p), or (b, R, h, p) without MIMO_Out, in V's dtype, (angle, ssm, k, v)): new
        tensors in the compute dtype, the inputs untouched; with state_batch_indices, the cache
        tensors, updated in place
    """
    entry = registry.get(impl, "mamba3_mimo")
    registry.require_step(entry, "mamba3_mimo_state_update")
    dims = frontdoor.check_mimo_step(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z,
                                     Input_States, fuse_pregate_headwise_rms_norm, outproj_norm_weight,
                                     outproj_norm_eps, state_batch_indices)
    registry.require(entry, "mamba3_mimo_state_update", dims["input_dtype"],
                     (Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z,
                      outproj_norm_weight, *(Input_States or ())),
                     grouped=dims["h_qk"] < dims["h"], pregate_norm=fuse_pregate_headwise_rms_norm,
                     rank_outputs=MIMO_Out is None, state_batch_indices=state_batch_indices is not None)
    out, states = entry.step(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z,
                             Input_States, fuse_pregate_headwise_rms_norm, outproj_norm_weight, outproj_norm_eps,
                             state_batch_indices)
    _check_mimo_results("mamba3_mimo_state_update", impl, (out, *states), dims, MIMO_Out is None, with_time=False)
    return out, states


def _check_mimo_results(where, impl, res, dims, per_rank, with_time):
    """out (b, [l,] [R,] h, p) in the input dtype, then the states (S, h, ...), k (S, R, h, n), in the compute dtype."""
    b, l, R, h, p, n, S, f = (dims[k] for k in ("b", "l", "R", "h", "p", "n", "S", "compute_dtype"))
    wanted = [("out", (b, *(l,) * with_time, *(R,) * per_rank, h, p), dims["input_dtype"])]
    if len(res) > 1:
        wanted += [("angle", (S, h, dims["n_ang"]), f), ("ssm", (S, h, p, n), f), ("k", (S, R, h, n), f), ("v", (S, h, p), f)]
    if len(res) != len(wanted):
        raise RuntimeError(f"{where}: implementation {impl!r} returned {len(res)} results, expected {len(wanted)}")
    for r, (what, shape, dtype) in zip(res, wanted):
        check_result(where, impl, what, r, shape, dtype)


MIMO_FAMILY = registry.add_family(registry.Family(
    name="mamba3_mimo", scan=mamba3_mimo, step=mamba3_mimo_state_update, supports=MIMO_SUPPORTS, gaps=MIMO_GAPS,
    option="--mamba3-mimo-impl", step_option="--mamba3-mimo-impl-step", equivalence="equivalence.mamba3.mimo"))

register("loop", loop.mamba3_mimo, family="mamba3_mimo", gradients=True, varlen=True)
# chunked: SISO's blocks with a rank axis (scan_chunks), so SISO's declared gaps
register("chunked", chunked.mamba3_mimo, family="mamba3_mimo", gradients=True, varlen=True, nonfinite_inputs=False)
register("recurrent", recurrent.mimo_scan_by_stepping, step=recurrent.mamba3_mimo_state_update, family="mamba3_mimo",
         varlen=True)

# The chunked SISO scan and the decode step as Triton kernels (triton.py), imported on first call only.
# Without a GPU they run in Triton's interpreter, so property tests fold their cases into small sizes.
# Declared gaps: packed scans (cu_seqlens), and the loop's exact non-finite pattern (nonfinite_inputs:
# a segment's decay is exp(cs_t - cs_s), a difference of cumulative sums, NaN after an ADT of -inf
# where the loop's decays are 0). No non-finite input reaches an earlier output (a non-finite V is
# zeroed for the kernels and its effect restored after them). Its step takes state_batch_indices.
# Each (batch row, head) is computed by programs whose work does not depend on b, so a row's results
# are the same bits alone or in any batch.
if importlib.util.find_spec("triton") is not None:
    register("triton", lazy("mamba3.triton", "mamba3_scan"), step=lazy("mamba3.triton", "mamba3_state_update"),
             family="mamba3", gradients=True, varlen=False, state_batch_indices=True, nonfinite_inputs=False,
             batch_invariant=True,
             case_limits=dict(b=2, l=12, h=2, p=3, n=6, chunks=4) if registry.triton_interpreted() else None)
