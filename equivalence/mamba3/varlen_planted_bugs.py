"""Mamba-3's planted packed-sequence bugs (equivalence/varlen_planted_bugs.py lists the shared ones
and holds what every family's share): a packed Mamba-3 scan written as a loop over tokens, and its
batch-indexed decoding step, each with ``bug`` planted; the state is the tuple (angle, ssm, k, v).
Two more, Mamba-3's own, from the official kernels:

    angle_not_reset        the angle sum runs on across a boundary: each sequence starts from the
                           angle the one before it ended in, not its own angle state (the official
                           packed MIMO cumsum, fixed there)
    v_state_from_pack_end  every sequence's final v state is the pack's last token (read in the
                           official MIMO code)
"""

import math

import torch
import torch.nn.functional as F

import impls
from impls.frontdoor import compute_dtype
from impls.mamba3 import loop

from ..varlen import row, run_sequences
from ..varlen_planted_bugs import BUGS as SHARED_BUGS
from ..varlen_planted_bugs import CHUNK, indexed_step, planted, run_packed, scan_packed  # noqa: F401

BUGS = SHARED_BUGS + ("angle_not_reset", "v_state_from_pack_end")


def _tokens(bug, Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, Input_States, offsets, reset=True):
    """The packed scan token by token (the loop's steps, impls/mamba3/loop.py): out (1, l, h, p) and
    the final states, one row per sequence of each part."""
    f = compute_dtype(V.dtype)
    _, l, h, p = V.shape
    n, n_ang = Q.shape[-1], Angles.shape[-1]
    Qh, Kh = loop.per_head(Q.to(f), h), loop.per_head(K.to(f), h)                # (1, l, h, n)
    Q_bias, K_bias = Q_bias.to(f), K_bias.to(f)
    Vf, Angles, ADT, DT, Trap = V.to(f), Angles.to(f), ADT.to(f), DT.to(f), Trap.to(f)
    h0s = (loop.zero_states(len(offsets) - 1, h, p, n, n_ang, f, V.device) if Input_States is None
           else tuple(s.to(f) for s in Input_States))

    def advance(state, t):
        angle, ssm, k_prev, v_prev = state
        lam, alpha, dt = torch.sigmoid(Trap[:, :, t]), torch.exp(ADT[:, :, t]), DT[:, :, t]
        angle = torch.remainder(angle + math.pi * torch.tanh(Angles[:, t]) * dt[..., None], 2 * math.pi)
        k, v = loop.rotate(Kh[:, t] + K_bias, angle), Vf[:, t]
        ssm = (alpha[..., None, None] * ssm + ((1 - lam) * dt * alpha)[..., None, None] * v_prev[..., None] * k_prev[..., None, :]
               + (lam * dt)[..., None, None] * v[..., None] * k[..., None, :])
        return angle, ssm, k, v

    def decay_over(state, a, e):   # the ssm state decayed through tokens a..e-1; the rest is not decayed
        angle, ssm, k, v = state
        return angle, torch.exp(ADT[:, :, a:e].sum(-1))[..., None, None] * ssm, k, v

    if bug == "angle_not_reset":
        states, _, lasts = run_sequences(offsets, h0s, advance,
                                         lambda i, a, h: row(h0s, i) if i == 0 else (h[0], *row(h0s, i)[1:]))
    else:
        states, lasts = run_packed(bug, offsets, h0s, advance, decay_over, reset)
    if bug == "v_state_from_pack_end" and l:
        lasts = [(*last[:3], Vf[:, -1]) for last in lasts]
    ys = [(ssm * loop.rotate(Qh[:, t] + Q_bias, angle)[..., None, :]).sum(-1) for t, (angle, ssm, _, _) in enumerate(states)]
    y = torch.stack(ys, 1) if ys else Vf[:, :0]
    if D is not None:
        y = y + D.to(f)[:, None] * Vf
    if Z is not None:
        y = y * F.silu(Z.to(f))
    return y, tuple(torch.cat(parts) for parts in zip(*lasts))


def _scan(bug, Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None, chunk_size=64,
          return_final_states=False, cu_seqlens=None):
    if cu_seqlens is None:   # every bug here is about packing; an unpacked call is the loop's
        return loop.mamba3_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, Input_States, chunk_size,
                                return_final_states)
    args = (Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, Input_States, cu_seqlens.tolist())
    y, last = scan_packed(bug, _tokens, args, 1)   # K plays B
    y = y.to(V.dtype)
    return (y, *last) if return_final_states else y


def _step(bug, Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None,
          state_batch_indices=None):
    """A batch-indexed decoding step: gather the rows' slots of the cache (each part), one recurrent
    step, scatter back."""
    def step_rows(states, rows):
        def take(X):
            return None if X is None else X[rows]

        return impls.mamba3_state_update(take(Q), take(K), take(V), take(ADT), take(DT), take(Trap), Q_bias, K_bias,
                                         take(Angles), D, take(Z), states, impl="recurrent")

    y = indexed_step(bug, tuple(Input_States), torch.zeros_like(V), state_batch_indices, step_rows)
    return y, tuple(Input_States)


globals().update(planted(_scan, _step, BUGS))
