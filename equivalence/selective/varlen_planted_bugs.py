"""Plausible packed-sequence bugs, planted on purpose: the varlen properties must reject each one.

Each bug is one realistic mistake, reported publicly for some kernel (issue 16), in a packed scan
written as a loop over tokens with chunks of CHUNK tokens laid over the packed sequence, and its
batch-indexed decoding step. ``correct`` is the same code without a mistake: the control.

    leak_across_boundary      a sequence starts from the state the one before it ended in
    decay_from_chunk_start    a sequence starting mid-chunk has its initial state decayed from the
                              chunk's start, through the tokens of the sequence before it
    final_state_at_chunk_end  last_state[i] read at the end of the chunk holding sequence i's last
                              token, not at that token
    boundary_ignored_in_dB    values right; dL/dB from an adjoint that crosses the boundaries
    padding_rows_updated      decoding: a padding row (index -1) advances slot -1, the last slot
"""

import functools

import torch
import torch.nn.functional as F

from impls.selective import loop
from impls.frontdoor import compute_dtype, per_channel

CHUNK = 8

BUGS = ("leak_across_boundary", "decay_from_chunk_start", "final_state_at_chunk_end", "boundary_ignored_in_dB",
        "padding_rows_updated")


def _tokens(bug, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, offsets, reset=True):
    """The packed scan token by token: y (1, d, l) and last_state (nseq, d, n)."""
    f = compute_dtype(u.dtype)
    d, l, n = u.shape[1], u.shape[2], A.shape[1]
    dt = delta.to(f) + (0 if delta_bias is None else delta_bias.to(f)[:, None])
    if delta_softplus:
        dt = F.softplus(dt)
    Bc = per_channel(B.to(f) if B.dim() == 4 else B.to(f)[:, None], d)     # (1, d or 1, n, l)
    Cc = per_channel(C.to(f) if C.dim() == 4 else C.to(f)[:, None], d)
    uf = u.to(f)
    nseq = len(offsets) - 1
    h0s = torch.zeros(nseq, d, n, dtype=f) if initial_state is None else initial_state.to(f)
    h = h0s[:1]
    ys, states, lasts = [], [], []
    for i, (a, e) in enumerate(zip(offsets, offsets[1:])):
        if reset and not (bug == "leak_across_boundary" and i > 0):
            h = h0s[i:i + 1]
            if bug == "decay_from_chunk_start" and a % CHUNK:
                h = h * torch.exp(dt[:, :, a - a % CHUNK:a].sum(-1)[..., None] * A)   # the wrong tokens' decay
        for t in range(a, e):
            h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * uf[:, :, t])[..., None] * Bc[..., t]
            ys.append((h * Cc[..., t]).sum(-1))
            states.append(h)
        lasts.append(h if e > a else h0s[i:i + 1])
    if bug == "final_state_at_chunk_end":   # the state after the last token of the chunk, whoever's it is
        lasts = [states[min(-(-e // CHUNK) * CHUNK, l) - 1] if e > a else last
                 for last, a, e in zip(lasts, offsets, offsets[1:])]
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
    offsets = cu_seqlens.tolist()
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, offsets)
    if bug == "boundary_ignored_in_dB":
        # values from the correct scan with B held constant; dL/dB alone from a scan that never
        # resets (its adjoint crosses every boundary), added as a term whose value is exactly zero
        y, last = _tokens(None, u, delta, A, B.detach(), *args[4:])
        frozen = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        frozen[3] = B
        y_leak, last_leak = _tokens(None, *frozen, reset=False)
        y = y + torch.nan_to_num(y_leak - y_leak.detach(), nan=0.0, posinf=0.0, neginf=0.0)
        last = last + torch.nan_to_num(last_leak - last_leak.detach(), nan=0.0, posinf=0.0, neginf=0.0)
    else:
        y, last = _tokens(bug, *args)
    y = y.to(u.dtype)
    return (y, last) if return_last_state else y


def _step(bug, state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, state_batch_indices=None):
    """A batch-indexed decoding step: gather the rows' slots, one loop step, scatter back."""
    if state_batch_indices is None:
        slots = torch.arange(x.shape[0])
        rows = slots
    else:
        index = state_batch_indices.long()
        rows = torch.arange(x.shape[0]) if bug == "padding_rows_updated" else (index >= 0).nonzero().squeeze(1)
        slots = index[rows]                                  # -1 is the last slot, in torch as in Python
    y = torch.zeros_like(x)
    if rows.numel():
        def take(X):
            return None if X is None else X[rows][..., None]

        h = state[slots]
        out, h = loop.selective_scan(take(x), take(dt), A, take(B), take(C), D, take(z), dt_bias, dt_softplus, h, True)
        state[slots] = h
        y[rows] = out[..., 0]
        if state_batch_indices is not None:
            y[state_batch_indices < 0] = 0                   # the padding rows' outputs are still zeros
    return y


correct = functools.partial(_scan, None)
correct_step = functools.partial(_step, None)
for _bug in BUGS:
    globals()[_bug] = functools.partial(_scan, _bug)
    globals()[_bug + "_step"] = functools.partial(_step, _bug)
