"""Mamba-1's planted packed-sequence bugs (equivalence/varlen_planted_bugs.py lists them and holds
what every family's share): a packed scan written as a loop over tokens, and its batch-indexed
decoding step, each with ``bug`` planted."""

import torch
import torch.nn.functional as F

from impls.frontdoor import compute_dtype, per_channel
from impls.selective import loop

from ..varlen_planted_bugs import BUGS, CHUNK, indexed_step, planted, run_packed, scan_packed  # noqa: F401


def _tokens(bug, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, offsets, reset=True):
    """The packed scan token by token: y (1, d, l) and last_state (nseq, d, n)."""
    f = compute_dtype(u.dtype)
    d, n = u.shape[1], A.shape[1]
    dt = delta.to(f) + (0 if delta_bias is None else delta_bias.to(f)[:, None])
    if delta_softplus:
        dt = F.softplus(dt)
    Bc = per_channel(B.to(f) if B.dim() == 4 else B.to(f)[:, None], d)     # (1, d or 1, n, l)
    Cc = per_channel(C.to(f) if C.dim() == 4 else C.to(f)[:, None], d)
    uf = u.to(f)
    h0s = torch.zeros(len(offsets) - 1, d, n, dtype=f) if initial_state is None else initial_state.to(f)
    states, lasts = run_packed(
        bug, offsets, h0s,
        lambda h, t: torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * uf[:, :, t])[..., None] * Bc[..., t],
        lambda h, a, e: torch.exp(dt[:, :, a:e].sum(-1)[..., None] * A) * h, reset)
    ys = [(h * Cc[..., t]).sum(-1) for t, h in enumerate(states)]
    y = torch.stack(ys, -1) if ys else uf[..., :0]
    if D is not None:
        y = y + D.to(f)[:, None] * uf
    if z is not None:
        y = y * F.silu(z.to(f))
    return y, torch.cat(lasts)


def _scan(bug, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
          return_last_state=False, cu_seqlens=None):
    if cu_seqlens is None:   # every bug here is about packing; an unpacked call is the loop's
        return loop.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                   return_last_state)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens.tolist())
    y, last = scan_packed(bug, _tokens, args, 3)
    y = y.to(u.dtype)
    return (y, last) if return_last_state else y


def _step(bug, state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, state_batch_indices=None):
    """A batch-indexed decoding step: gather the rows' slots, one loop step, scatter back."""
    def step_rows(h, rows):
        def take(X):
            return None if X is None else X[rows][..., None]

        out, h = loop.selective_scan(take(x), take(dt), A, take(B), take(C), D, take(z), dt_bias, dt_softplus, h, True)
        return out[..., 0], h

    return indexed_step(bug, state, torch.zeros_like(x), state_batch_indices, step_rows)


globals().update(planted(_scan, _step))
