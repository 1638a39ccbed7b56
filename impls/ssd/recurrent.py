"""Recurrent SSD decoding: an explicit (b, h, p, n) state, one token per call.

``ssd_state_update`` is what a generating Mamba-2 model calls once per new token: it advances the
state by one token in place and returns that token's output. ``ssd_scan`` here is nothing more than
that step run over a sequence, starting from ``initial_states``: exactly the decode path, so
checking it against the loop checks decoding against the full scan.

Same equations as impls/ssd/loop.py (eq. 1 of the Mamba-2 paper, Dao & Gu 2024); letters in
impls/ssd/frontdoor.py.
"""

import torch
import torch.nn.functional as F

from . import varlen
from ..frontdoor import compute_dtype
from .loop import effective_dt, per_head, skip


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                     dt_limit=(0.0, float("inf")), state_batch_indices=None):
    """Advance the state by one token, in place, and return the token's output.

    With state_batch_indices (b,) int32, ``state`` is a (slots, h, p, n) cache and row r advances
    slot state_batch_indices[r]; a negative index is a padding row (output zeros, no slot touched).

    Args:
        state: (b, h, p, n) in the compute dtype; overwritten with the new state
        x: (b, h, p) the token's input; dt: (b, h) its step size before bias, softplus and clamp
        A: (h,); B, C: (b, g, n); D: (h,) or (h, p) optional; z: (b, h, p) optional; dt_bias: (h,) optional
        dt_softplus: softplus (threshold 20) on dt + dt_bias; dt_limit: (lo, hi), always applied
    Returns:
        y: (b, h, p) in x's dtype
    """
    if state_batch_indices is not None:
        return varlen.indexed_step(ssd_state_update, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus,
                                       dt_limit, state_batch_indices)
    f = compute_dtype(x.dtype)
    h = x.shape[1]
    x_f = x.to(f)
    dt = effective_dt(dt, dt_bias, dt_softplus, dt_limit, f)                   # (b, h)
    # the state in the compute dtype (it always is through the front door; a copy otherwise,
    # stored back in the state's own dtype at the end)
    s = state if state.dtype == f else state.to(f)
    s.mul_(torch.exp(dt * A.to(f))[:, :, None, None])                         # Ā h_{t-1}
    s.add_((dt[:, :, None] * x_f)[..., None] * per_head(B.to(f), h)[:, :, None, :])  # + Δ x ⊗ B
    y = torch.matmul(s, per_head(C.to(f), h)[..., None]).squeeze(-1)          # y = h C: (b, h, p)
    if s is not state:
        state.copy_(s)
    if D is not None:
        y = y + skip(D.to(f), x_f)
    if z is not None:
        y = y * F.silu(z.to(f))
    return y.to(x.dtype)


def scan_by_stepping(step):
    """Build an SSD scan (the impls.ssd_scan signature, positional) that calls ``step`` once per token."""

    def ssd_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                 seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                 return_final_states=False, return_varlen_states=False):
        if seq_idx is not None or cu_seqlens is not None or return_varlen_states:
            # packed sequences: each stepped through alone from its own state (impls/ssd/varlen.py)
            return varlen.each_alone(ssd_scan, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states,
                                         seq_idx, cu_seqlens, dt_softplus, dt_limit, return_final_states,
                                         return_varlen_states)
        b, l, h, p = x.shape
        f = compute_dtype(x.dtype)
        state = (torch.zeros(b, h, p, B.shape[-1], dtype=f, device=x.device) if initial_states is None
                 else initial_states.to(f).clone())  # clone: the caller's initial_states is never written
        ys = [step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D, None if z is None else z[:, t],
                   dt_bias, dt_softplus, dt_limit) for t in range(l)]
        out = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, h, p)
        return (out, state) if return_final_states else out

    ssd_scan.__doc__ = f"SSD scan by calling {getattr(step, '__qualname__', step)} once per token."
    return ssd_scan


ssd_scan = scan_by_stepping(ssd_state_update)
