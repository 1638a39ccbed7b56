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

from . import chunked, frontdoor, loop, recurrent

# implementation name -> (scan, step); to be replaced by the family registry
IMPLEMENTATIONS = {
    "loop": (loop.mamba3_scan, None),
    "chunked": (chunked.mamba3_scan, None),
    "recurrent": (recurrent.scan_by_stepping, recurrent.mamba3_state_update),
}


def _entry(where, impl, kind):
    fn = IMPLEMENTATIONS.get(impl, (None, None))[kind]
    if fn is None:
        have = [name for name, fns in IMPLEMENTATIONS.items() if fns[kind] is not None]
        raise ValueError(f"{where}: impl: expected one of {have}, got {impl!r}")
    return fn


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
        impl: "chunked" (default), "loop" or "recurrent"
    Returns:
        out (b, l, h, p) in V's dtype; with return_final_states, (out, angle, ssm, k, v) with the
        states (S, h, ...) in the compute dtype
    """
    dims = frontdoor.check_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, Input_States, chunk_size,
                                return_final_states, cu_seqlens)
    return _entry("mamba3_scan", impl, 0)(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, Input_States,
                                          dims["chunk_size"], return_final_states, cu_seqlens)


def mamba3_state_update(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None,
                        state_batch_indices=None, *, impl="recurrent"):
    """One Mamba-3 SISO token, the official ``mamba3_siso_step``'s interface.

    Args:
        Q, K: (b, h_qk, n); V, Z: (b, h, p) (Z optional); ADT, DT, Trap: (b, h)
        Q_bias, K_bias: (h, n); Angles: (b, h, n_ang), any n_ang <= n / 2 (odd allowed); D: (h,)
        Input_States: (angle (b, h, n_ang), ssm (b, h, p, n), k (b, h, n), v (b, h, p)) or None (zeros)
        state_batch_indices: (b,) int32 or None: Input_States is then a cache (slots, h, ...)
            updated in place, row i in slot state_batch_indices[i], negative = padding row (zeros out)
        impl: "recurrent" (default)
    Returns:
        (out (b, h, p) in V's dtype, (angle, ssm, k, v)): new tensors in the compute dtype, the
        inputs untouched; with state_batch_indices, the cache tensors, updated in place
    """
    frontdoor.check_step(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, Input_States, state_batch_indices)
    return _entry("mamba3_state_update", impl, 1)(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, Input_States,
                                                  state_batch_indices)
