"""Plausible packed-sequence bugs in an SSD (Mamba-2) scan, planted on purpose: the varlen
properties, run for the SSD family, must reject each one (equivalence/test_varlen_planted_bugs.py).

Each bug is one realistic mistake, reported publicly for some kernel (issue 16), in a packed SSD
scan written as a loop over tokens with chunks of CHUNK tokens laid over the whole packed sequence
(as the official kernel lays them), and its batch-indexed decoding step. ``correct`` is the same
code without a mistake: the control.

    leak_across_boundary      a sequence starts from the state the one before it ended in
    decay_from_chunk_start    a sequence starting mid-chunk has its initial state decayed from the
                              chunk's start, through the tokens of the sequence before it
    final_state_at_chunk_end  final_states[i] read at the end of the chunk holding sequence i's last
                              token, not at that token
    boundary_ignored_in_dB    values right; dL/dB from an adjoint that crosses the boundaries (the
                              official backward's wrong dB with seq_idx)
    padding_rows_updated      decoding: a padding row (index -1) advances slot -1, the last slot
"""

import functools

import torch
import torch.nn.functional as F

from impls.ssd import loop as ssd_loop
from impls.frontdoor import compute_dtype
from impls.ssd.loop import effective_dt, per_head, skip
from impls.ssd.recurrent import ssd_state_update

CHUNK = 8

BUGS = ("leak_across_boundary", "decay_from_chunk_start", "final_state_at_chunk_end", "boundary_ignored_in_dB",
        "padding_rows_updated")


def _tokens(bug, x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, dt_limit, offsets, reset=True):
    """The packed scan token by token: out (1, l, h, p) and final states (nseq, h, p, n)."""
    f = compute_dtype(x.dtype)
    _, l, h, p = x.shape
    n = B.shape[-1]
    dt = effective_dt(dt, dt_bias, dt_softplus, dt_limit, f)                    # (1, l, h)
    A = A.to(f)
    Bh, Ch = per_head(B.to(f), h), per_head(C.to(f), h)                           # (1, l, h, n)
    xf = x.to(f)
    nseq = len(offsets) - 1
    h0s = torch.zeros(nseq, h, p, n, dtype=f) if initial_states is None else initial_states.to(f)
    state = h0s[:1]
    ys, states, lasts = [], [], []
    for i, (a, e) in enumerate(zip(offsets, offsets[1:])):
        if reset and not (bug == "leak_across_boundary" and i > 0):
            state = h0s[i:i + 1]
            if bug == "decay_from_chunk_start" and a % CHUNK:
                # decayed through the tokens from the chunk's start: another sequence's
                state = state * torch.exp(dt[:, a - a % CHUNK:a].sum(1) * A)[:, :, None, None]
        for t in range(a, e):
            state = (torch.exp(dt[:, t] * A)[:, :, None, None] * state
                     + (dt[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :])
            ys.append((state * Ch[:, t, :, None, :]).sum(-1))
            states.append(state)
        lasts.append(state if e > a else h0s[i:i + 1])
    if bug == "final_state_at_chunk_end":   # the state after the chunk's last token, whoever's it is
        lasts = [states[min(-(-e // CHUNK) * CHUNK, l) - 1] if e > a else last
                 for last, a, e in zip(lasts, offsets, offsets[1:])]
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
    offsets = cu_seqlens.tolist()
    rest = (D, z, dt_bias, initial_states, dt_softplus, dt_limit, offsets)
    if bug == "boundary_ignored_in_dB":
        # values from the correct scan with B held constant; dL/dB alone from a scan that never
        # resets (its adjoint crosses every boundary), added as a term whose value is exactly zero
        y, last = _tokens(None, x, dt, A, B.detach(), C, *rest)
        frozen = [v.detach() if isinstance(v, torch.Tensor) else v for v in (x, dt, A, B, C, *rest)]
        frozen[3] = B
        y_leak, last_leak = _tokens(None, *frozen, reset=False)
        y = y + torch.nan_to_num(y_leak - y_leak.detach(), nan=0.0, posinf=0.0, neginf=0.0)
        last = last + torch.nan_to_num(last_leak - last_leak.detach(), nan=0.0, posinf=0.0, neginf=0.0)
    else:
        y, last = _tokens(bug, x, dt, A, B, C, *rest)
    res = [y.to(x.dtype)] + [last] * bool(return_final_states) + [last] * bool(return_varlen_states)
    return res[0] if len(res) == 1 else tuple(res)


def _step(bug, state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
          state_batch_indices=None):
    """A batch-indexed decoding step: gather the rows' slots, one recurrent step, scatter back."""
    if state_batch_indices is None:
        return ssd_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit)
    index = state_batch_indices.long()
    rows = torch.arange(x.shape[0]) if bug == "padding_rows_updated" else (index >= 0).nonzero().squeeze(1)
    slots = index[rows]                                      # -1 is the last slot, in torch as in Python
    y = torch.zeros_like(x)
    if rows.numel():
        def take(X):
            return None if X is None else X[rows]

        s = state[slots]
        y[rows] = ssd_state_update(s, take(x), take(dt), A, take(B), take(C), D, take(z), dt_bias, dt_softplus,
                                   dt_limit)
        state[slots] = s
        y[state_batch_indices < 0] = 0                       # the padding rows' outputs are still zeros
    return y


correct = functools.partial(_scan, None)
correct_step = functools.partial(_step, None)
for _bug in BUGS:
    globals()[_bug] = functools.partial(_scan, _bug)
    globals()[_bug + "_step"] = functools.partial(_step, _bug)
