"""The SSD's (Mamba-2's) planted packed-sequence bugs (equivalence/varlen_planted_bugs.py lists them
and holds what every family's share): a packed SSD scan written as a loop over tokens, and its
batch-indexed decoding step, each with ``bug`` planted."""

import torch
import torch.nn.functional as F

from impls.frontdoor import compute_dtype
from impls.ssd import loop as ssd_loop
from impls.ssd.loop import effective_dt, per_head, skip
from impls.ssd.recurrent import ssd_state_update

from ..varlen_planted_bugs import BUGS, CHUNK, indexed_step, planted, run_packed, scan_packed  # noqa: F401


def _tokens(bug, x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, dt_limit, offsets, reset=True):
    """The packed scan token by token: out (1, l, h, p) and final states (nseq, h, p, n)."""
    f = compute_dtype(x.dtype)
    _, l, h, p = x.shape
    n = B.shape[-1]
    dt = effective_dt(dt, dt_bias, dt_softplus, dt_limit, f)                    # (1, l, h)
    A = A.to(f)
    Bh, Ch = per_head(B.to(f), h), per_head(C.to(f), h)                           # (1, l, h, n)
    xf = x.to(f)
    h0s = torch.zeros(len(offsets) - 1, h, p, n, dtype=f) if initial_states is None else initial_states.to(f)
    states, lasts = run_packed(
        bug, offsets, h0s,
        lambda s, t: (torch.exp(dt[:, t] * A)[:, :, None, None] * s
                      + (dt[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]),
        lambda h, a, e: torch.exp(dt[:, a:e].sum(1) * A)[:, :, None, None] * h, reset)
    ys = [(s * Ch[:, t, :, None, :]).sum(-1) for t, s in enumerate(states)]
    y = torch.stack(ys, 1) if ys else xf[:, :0]
    if D is not None:
        y = y + skip(D.to(f), xf)
    if z is not None:
        y = y * F.silu(z.to(f))
    return y, torch.cat(lasts)


def _scan(bug, x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
          cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False,
          return_varlen_states=False):
    if cu_seqlens is None:   # every bug here is about packing; an unpacked call is the loop's
        return ssd_loop.ssd_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, None, None, dt_softplus,
                                 dt_limit, return_final_states)
    args = (x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, dt_limit, cu_seqlens.tolist())
    y, last = scan_packed(bug, _tokens, args, 3)
    res = [y.to(x.dtype)] + [last] * bool(return_final_states) + [last] * bool(return_varlen_states)
    return res[0] if len(res) == 1 else tuple(res)


def _step(bug, state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
          state_batch_indices=None):
    """A batch-indexed decoding step: gather the rows' slots, one recurrent step, scatter back."""
    def step_rows(s, rows):
        def take(X):
            return None if X is None else X[rows]

        y = ssd_state_update(s, take(x), take(dt), A, take(B), take(C), D, take(z), dt_bias, dt_softplus, dt_limit)
        return y, s

    return indexed_step(bug, state, torch.zeros_like(x), state_batch_indices, step_rows)


globals().update(planted(_scan, _step))
