"""The SSD spec: the Mamba-2 scan as a plain loop over time, in Mamba-2's own shapes.

Read beside the paper: Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient
Algorithms Through Structured State Space Duality" (2024): Section 3 (the SSM with scalar-times-
identity A, "SSD"), eq. (1) for the recurrence, Section 7 / Listing 1 for the chunked algorithm that
impls/ssd/chunked.py implements instead. Official code: https://github.com/state-spaces/mamba,
``mamba_chunk_scan_combined`` (its signature is ours) and ``selective_state_update`` (the step).
Letters (b, l, h, p, n, g) are defined once, in impls/ssd/frontdoor.py.

Every other SSD implementation is checked against this function run in float64.
"""

import torch
import torch.nn.functional as F

from . import varlen
from ..frontdoor import compute_dtype


def effective_dt(dt, dt_bias, dt_softplus, dt_limit, f):
    """The dt pipeline of the official kernel, in the compute dtype f.

    dt: (..., h) raw step size; dt_bias: (h,) or None. dt + dt_bias, then softplus (threshold 20:
    identity above, as the official kernel) if dt_softplus, then the clamp to dt_limit, always: the
    default lower limit 0 turns a negative dt into 0 even without softplus.
    """
    dt = dt.to(f)
    if dt_bias is not None:
        dt = dt + dt_bias.to(f)
    if dt_softplus:
        dt = F.softplus(dt)
    return dt.clamp(dt_limit[0], dt_limit[1])


def per_head(X, h):
    """B or C: (..., g, n) -> (..., h, n), head i reading group i // (h // g)."""
    g = X.shape[-2]
    return X if g == h else X.repeat_interleave(h // g, dim=-2)


def skip(D, x):
    """D x, for D (h,) or (h, p) and x (..., h, p)."""
    return (D[:, None] if D.dim() == 1 else D) * x


def ssd_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
             seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
             return_final_states=False, return_varlen_states=False):
    """Mamba-2 SSD scan, one time step after another.

    Args:
        x: (b, l, h, p) input
        dt: (b, l, h) step size before dt_bias, softplus and the clamp
        A: (h,) one real decay rate per head, negative for a decaying state
        B, C: (b, l, g, n) input and output projections, shared by the h // g heads of a group
        chunk_size: ignored here (a performance setting of chunked implementations)
        D: (h,) or (h, p) skip connection, optional; z: (b, l, h, p) gate, optional
        dt_bias: (h,) optional; initial_states: (b, h, p, n) optional (zeros)
        seq_idx, cu_seqlens, return_varlen_states: packed sequences (impls/ssd/varlen.py: with
            cu_seqlens, initial_states and final_states are (nseq, h, p, n)), each scanned alone
        dt_softplus: softplus (threshold 20) on dt + dt_bias; dt_limit: (lo, hi) clamp, always applied
        return_final_states: also return the state after the last token
    Returns:
        out: (b, l, h, p) in x's dtype; with return_final_states, (out, final_states) with
        final_states (b, h, p, n) in the compute dtype (float32, or float64 for float64 inputs)
    """
    if seq_idx is not None or cu_seqlens is not None or return_varlen_states:
        # packed sequences, by definition: each sequence cut out and scanned alone (impls/ssd/varlen.py)
        return varlen.each_alone(ssd_scan, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx,
                                     cu_seqlens, dt_softplus, dt_limit, return_final_states, return_varlen_states)
    b, l, h, p = x.shape
    n = B.shape[-1]
    f = compute_dtype(x.dtype)

    dt = effective_dt(dt, dt_bias, dt_softplus, dt_limit, f)  # (b, l, h)
    A = A.to(f)
    B, C = per_head(B.to(f), h), per_head(C.to(f), h)         # (b, l, h, n)
    x_f = x.to(f)

    state = torch.zeros(b, h, p, n, dtype=f, device=x.device) if initial_states is None else initial_states.to(f)
    ys = []
    for dt_t, x_t, B_t, C_t in zip(dt.unbind(1), x_f.unbind(1), B.unbind(1), C.unbind(1)):
        # Discretise (Section 3.1 / the official kernels): Ā = exp(Δ A), a scalar per head;
        # B̄ x = Δ x ⊗ B, the Euler form the official kernels use.
        decay = torch.exp(dt_t * A)                                        # (b, h)
        # Recurrence (eq. 1): h_t = Ā_t h_{t-1} + Δ_t x_t ⊗ B_t; the state is (p, n) per head
        state = decay[:, :, None, None] * state + (dt_t[:, :, None] * x_t)[..., None] * B_t[:, :, None, :]
        # Readout: y_t = h_t C_t, a sum over the n states
        ys.append((state * C_t[:, :, None, :]).sum(-1))                    # (b, h, p)

    y = torch.stack(ys, dim=1) if ys else x_f.new_zeros(b, 0, h, p)
    if D is not None:
        y = y + skip(D.to(f), x_f)                                         # skip connection, D x
    if z is not None:
        y = y * F.silu(z.to(f))                                            # gate: y silu(z)
    out = y.to(x.dtype)
    return (out, state) if return_final_states else out
