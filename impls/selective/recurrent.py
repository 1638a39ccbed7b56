"""Recurrent decoding: an explicit state, one token per call.

``selective_state_update`` is what a generating model calls once per new token: it reads the
state (b, d, n), advances it by one token in place and returns that token's output. Its cost does
not depend on how many tokens came before. ``selective_scan`` here is nothing more than that step
run over a sequence, starting from ``initial_state``: exactly the decode path, so checking it
against the loop checks decoding against the full scan.

Same equations as impls/selective/loop.py (Algorithm 2 of the Mamba paper), letters in impls/frontdoor.py.
"""

import torch
import torch.nn.functional as F

from ..frontdoor import compute_dtype, per_channel


def _as(t, f):
    """t in dtype f, without a conversion call when it already is (about 1 µs saved per argument)."""
    return t if t.dtype == f else t.to(f)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    """Advance the state by one token, in place, and return the token's output.

    Args:
        state: (b, d, n) in the compute dtype; overwritten with the new state; with
               state_batch_indices, a (slots, d, n) cache (see _indexed_update)
        x: (b, d) the token's input (u at one time step)
        dt: (b, d) its step size before bias and softplus
        A: (d, n)
        B, C: (b, n) or grouped (b, g, n)
        D: (d,) optional skip; z: (b, d) optional gate; dt_bias: (d,) optional
        dt_softplus: apply softplus (threshold 20) to dt + dt_bias
        state_batch_indices: (b,) int32 cache slot of each row, negative for a padding row, optional
    Returns:
        y: (b, d) in x's dtype

    A decoding step works on one (b, d, n) state, small enough (8k elements for the small model)
    that each torch call's fixed cost (a few µs) rivals its arithmetic, so this is written in as few
    calls as the equations allow: the state is advanced in place (no new (b, d, n) tensor for h and
    no copy back), and the readout is one batched mat-vec.
    """
    if state_batch_indices is not None:
        return _indexed_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)
    f = compute_dtype(x.dtype)
    x_f = _as(x, f)
    dt = _as(dt, f)
    if dt_bias is not None:
        dt = dt + _as(dt_bias, f)
    if dt_softplus:
        dt = F.softplus(dt)
    # the state in the compute dtype (it always is through the front door; a copy otherwise, stored
    # back in the state's own dtype at the end)
    h = state if state.dtype == f else state.to(f)

    h.mul_(torch.mul(dt.unsqueeze(-1), _as(A, f)).exp_())     # Ā h_{t-1},  Ā = exp(ΔA)
    dtx = (dt * x_f).unsqueeze(-1)                              # (b, d, 1): Δ x
    if B.dim() == 2:                                            # (b, n): the same B for every channel
        h.addcmul_(dtx, _as(B, f).unsqueeze(1))                 # h_t = Ā h_{t-1} + B̄ x_t,  B̄ x = Δ B x
    else:                                                       # (b, g, n): spread over channels
        h.addcmul_(dtx, per_channel(_as(B, f), x.shape[1]))
    if C.dim() == 2:                                            # y_t = C_t h_t, a batched mat-vec
        y = torch.bmm(h, _as(C, f).unsqueeze(-1)).squeeze(-1)   # (b, d, n) @ (b, n, 1) -> (b, d)
    else:
        y = (h * per_channel(_as(C, f), x.shape[1])).sum(-1)
    if h is not state:
        state.copy_(h)
    if D is not None:
        y.addcmul_(_as(D, f), x_f)                              # + D x_t
    if z is not None:
        y.mul_(F.silu(_as(z, f)))                               # gate: y silu(z)
    return _as(y, x.dtype)


def _indexed_update(cache, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices):
    """The step on the rows that have a slot, each reading and writing its own slot of ``cache``
    (slots, d, n); padding rows (negative index) output zeros and touch nothing.

    The real rows' states are gathered into a (b', d, n) tensor, stepped by the plain step above
    and written back to their slots: the same arithmetic as decoding each sequence alone."""
    rows = (state_batch_indices >= 0).nonzero().squeeze(1)
    slots = state_batch_indices[rows].long()
    y = torch.zeros_like(x)
    if rows.numel():
        def take(X):
            return None if X is None else X[rows]

        h = cache[slots]                                             # a copy: advanced, then stored back
        y[rows] = selective_state_update(h, x[rows], dt[rows], A, take(B), take(C), D, take(z), dt_bias, dt_softplus)
        cache[slots] = h
    return y


def scan_by_stepping(step):
    """Build a scan (the impls.selective_scan signature) that calls ``step`` once per token."""

    def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       initial_state=None, return_last_state=False, cu_seqlens=None):
        if cu_seqlens is not None:
            return _packed_by_stepping(step, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                       initial_state, return_last_state, cu_seqlens)
        b, d, l = u.shape
        f = compute_dtype(u.dtype)
        state = (torch.zeros(b, d, A.shape[1], dtype=f, device=u.device) if initial_state is None
                 else initial_state.to(f).clone())  # clone: the caller's initial_state is never written
        ys = [step(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D,
                   None if z is None else z[..., t], delta_bias, delta_softplus)
              for t in range(l)]
        y = torch.stack(ys, dim=-1) if ys else u.new_zeros(b, d, 0)
        return (y, state) if return_last_state else y

    selective_scan.__doc__ = f"Selective scan by calling {getattr(step, '__qualname__', step)} once per token."
    return selective_scan


selective_scan = scan_by_stepping(selective_state_update)


def _packed_by_stepping(step, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                        return_last_state, cu_seqlens):
    """Packed sequences decoded as a server decodes them: a (nseq, d, n) cache of per-sequence
    states (from initial_state (nseq, d, n), or zeros), and each token a batch-indexed step of its
    own sequence's slot. u: (1, d, l); cu_seqlens: (nseq + 1,) int32 (checked by the front door)."""
    offsets = cu_seqlens.tolist()
    nseq, d, l = len(offsets) - 1, u.shape[1], u.shape[2]
    f = compute_dtype(u.dtype)
    cache = (torch.zeros(nseq, d, A.shape[1], dtype=f, device=u.device) if initial_state is None
             else initial_state.to(f).clone())
    owner = torch.repeat_interleave(torch.arange(nseq, dtype=torch.int32, device=u.device),
                                    torch.tensor(offsets, device=u.device).diff())  # (l,) sequence of each token
    ys = [step(cache, u[..., t], delta[..., t], A, B[..., t], C[..., t], D, None if z is None else z[..., t],
               delta_bias, delta_softplus, state_batch_indices=owner[t:t + 1])
          for t in range(l)]
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(1, d, 0)
    return (y, cache) if return_last_state else y
