"""Mamba-3's planted packed-sequence bugs, SISO and MIMO (equivalence/varlen_planted_bugs.py lists
the shared ones and holds what every family's share): a packed Mamba-3 scan written as a loop over
tokens, and its batch-indexed decoding step, each with ``bug`` planted; the state is the tuple
(angle, ssm, k, v). The loop is written once in MIMO's form, with the rank axis; SISO is rank 1 with
every projection 1 and its interleaved pairs (as equivalence/mamba3/cases.py writes the sums of
|terms|). This module's names are SISO's (the scan and step of impls.mamba3_scan); MIMO's, the same
bugs in impls.mamba3_mimo's signature, are the namespace MIMO. Two more bugs, Mamba-3's own, from
the official kernels:

    angle_not_reset        the angle sum runs on across a boundary: each sequence starts from the
                           angle the one before it ended in, not its own angle state (the official
                           packed MIMO cumsum, fixed there)
    v_state_from_pack_end  every sequence's final v state is the pack's last token (read in the
                           official packed MIMO code)
"""

import math
import types

import torch

import impls
from impls.frontdoor import compute_dtype
from impls.mamba3 import loop

from ..varlen import row, run_sequences
from ..varlen_planted_bugs import BUGS as SHARED_BUGS
from ..varlen_planted_bugs import CHUNK, indexed_step, planted, run_packed, scan_packed  # noqa: F401

BUGS = SHARED_BUGS + ("angle_not_reset", "v_state_from_pack_end")


def _tokens(bug, Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z, Input_States,
            offsets, rotate, norm, norm_weight, norm_eps, reset=True):
    """The packed scan token by token in MIMO's form (the loop's steps, impls/mamba3/loop.py:
    mamba3_mimo): Q, K (1, l, R, h_qk, n), Q_bias, K_bias (h, R, n), MIMO_V, MIMO_Z, MIMO_Out (h, R, p),
    ``rotate`` the pairing. Returns out (1, l, h, p), or (1, l, R, h, p) without MIMO_Out, and the
    final states, one row per sequence of each part (k: (nseq, R, h, n))."""
    f = compute_dtype(V.dtype)
    _, l, R, _, n = Q.shape
    h, p = V.shape[-2:]
    n_ang = Angles.shape[-1]
    cast = lambda x: None if x is None else x.to(f)
    Qh, Kh = loop.per_head(Q.to(f), h), loop.per_head(K.to(f), h)                # (1, l, R, h, n)
    Q_bias, K_bias, up = (x.to(f).transpose(0, 1) for x in (Q_bias, K_bias, MIMO_V))   # (R, h, n), (R, h, p)
    Vf, Angles, ADT, DT, Trap = V.to(f), Angles.to(f), ADT.to(f), DT.to(f), Trap.to(f)
    h0s = (loop.zero_mimo_states(len(offsets) - 1, R, h, p, n, n_ang, f, V.device) if Input_States is None
           else tuple(s.to(f) for s in Input_States))

    def advance(state, t):
        angle, ssm, k_prev, v_prev = state
        lam, alpha, dt = torch.sigmoid(Trap[:, :, t]), torch.exp(ADT[:, :, t]), DT[:, :, t]
        angle = torch.remainder(angle + math.pi * torch.tanh(Angles[:, t]) * dt[..., None], 2 * math.pi)
        k, v = rotate(Kh[:, t] + K_bias, angle[:, None]), Vf[:, t, None] * up               # (1, R, h, n), (1, R, h, p)
        prev = ((v_prev[:, None] * up)[..., None] * k_prev[..., None, :]).sum(1)        # sum_r v~_{t-1,r} k~_{t-1,r}^T
        ssm = (alpha[..., None, None] * ssm + ((1 - lam) * dt * alpha)[..., None, None] * prev
               + (lam * dt)[..., None, None] * (v[..., None] * k[..., None, :]).sum(1))
        return angle, ssm, k, Vf[:, t]

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
    w = loop.norm_weight(norm_weight, h, p, f)
    ys = [loop.mimo_read_out((ssm[:, None] * rotate(Qh[:, t] + Q_bias, angle[:, None])[..., None, :]).sum(-1),
                             Vf[:, t, None] * up, cast(D), cast(None if Z is None else Z[:, t]), cast(MIMO_Z),
                             cast(MIMO_Out), norm, w, norm_eps)
          for t, (angle, ssm, _, _) in enumerate(states)]
    y = torch.stack(ys, 1) if ys else Vf.new_zeros((1, 0, h, p) if MIMO_Out is not None else (1, 0, R, h, p))
    return y, tuple(torch.cat(parts) for parts in zip(*lasts))


def _scan(bug, Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None, chunk_size=64,
          return_final_states=False, cu_seqlens=None):
    """SISO: the MIMO form at rank 1 (a rank axis of 1, projections 1, interleaved pairs)."""
    if cu_seqlens is None:   # every bug here is about packing; an unpacked call is the loop's
        return loop.mamba3_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, Input_States, chunk_size,
                                return_final_states)
    ones = torch.ones(V.shape[-2], 1, V.shape[-1], dtype=V.dtype, device=V.device)      # (h, R = 1, p)
    states = None if Input_States is None else (*Input_States[:2], Input_States[2][:, None], Input_States[3])
    args = (Q[:, :, None], K[:, :, None], V, ADT, DT, Trap, Q_bias[:, None], K_bias[:, None], ones, ones, ones,
            Angles, D, Z, states, cu_seqlens.tolist(), loop.rotate, False, None, 0.0)
    y, (angle, ssm, k, v) = scan_packed(bug, _tokens, args, 1)   # K plays B
    y = y.to(V.dtype)
    return (y, angle, ssm, k[:, 0], v) if return_final_states else y


def _mimo_scan(bug, Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D=None, Z=None,
               chunk_size=16, rotary_dim_divisor=None, dtype=None, return_state=False, cu_seqlens=None,
               fuse_pregate_headwise_rms_norm=False, outproj_norm_weight=None, outproj_norm_eps=1e-5,
               Input_States=None):
    if cu_seqlens is None:   # every bug here is about packing; an unpacked call is the loop's
        return loop.mamba3_mimo(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z,
                                chunk_size, rotary_dim_divisor, dtype, return_state, None,
                                fuse_pregate_headwise_rms_norm, outproj_norm_weight, outproj_norm_eps, Input_States)
    args = (Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z, Input_States,
            cu_seqlens.tolist(), loop.rotate_halves, fuse_pregate_headwise_rms_norm, outproj_norm_weight,
            outproj_norm_eps)
    y, last = scan_packed(bug, _tokens, args, 1)   # K plays B
    y = y.to(V.dtype)
    return (y, *last) if return_state else y


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


def _mimo_step(bug, Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D=None, Z=None,
               Input_States=None, fuse_pregate_headwise_rms_norm=False, outproj_norm_weight=None,
               outproj_norm_eps=1e-5, state_batch_indices=None):
    """MIMO's batch-indexed decoding step, as _step's."""
    def step_rows(states, rows):
        def take(X):
            return None if X is None else X[rows]

        return impls.mamba3_mimo_state_update(take(Q), take(K), take(V), take(ADT), take(DT), take(Trap), Q_bias,
                                              K_bias, MIMO_V, MIMO_Z, MIMO_Out, take(Angles), D, take(Z), states,
                                              fuse_pregate_headwise_rms_norm, outproj_norm_weight, outproj_norm_eps,
                                              impl="recurrent")

    b, R = Q.shape[:2]
    y = torch.zeros_like(V) if MIMO_Out is not None else V.new_zeros(b, R, *V.shape[1:])
    y = indexed_step(bug, tuple(Input_States), y, state_batch_indices, step_rows)
    return y, tuple(Input_States)


globals().update(planted(_scan, _step, BUGS))
MIMO = types.SimpleNamespace(BUGS=BUGS, **planted(_mimo_scan, _mimo_step, BUGS))
