"""Planted bugs for the Mamba-3 families, SISO and MIMO: each a small variant of the spec or a wrapper of a
correct scan, drawn from the field's reports and from what a port gets wrong. Every one
takes the scan's signature (impls/mamba3/loop.py) and must be caught by the checks of
equivalence/mamba3/test_planted_bugs.py on a small case, while the correct scans pass them.
"""

import functools
import math
import types

import torch
import torch.nn.functional as F

from impls.frontdoor import compute_dtype
from impls.mamba3 import chunked, loop

from .varlen_planted_bugs import MIMO as MIMO_PACKED
from .varlen_planted_bugs import angle_not_reset, v_state_from_pack_end


def _halves(x, theta):
    """Rotation of pairs (i, i + n/2), the MIMO pairing, instead of SISO's interleaved (2i, 2i+1)."""
    n, na = x.shape[-1], theta.shape[-1]
    x0, x1 = x[..., :na], x[..., n // 2:n // 2 + na]
    c, s = torch.cos(theta), torch.sin(theta)
    out = x.clone()
    out[..., :na], out[..., n // 2:n // 2 + na] = x0 * c - x1 * s, x0 * s + x1 * c
    return out


def variant(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None, chunk_size=64,
            return_final_states=False, cu_seqlens=None, *, bug):
    """The spec's loop with one bug switched on (cu_seqlens: each sequence alone, as the spec)."""
    if cu_seqlens is not None:
        scan = functools.partial(variant, bug=bug)
        return loop.each_sequence(scan, Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, Input_States,
                                  chunk_size, return_final_states, cu_seqlens)
    b, l, h, p = V.shape
    n, na = Q.shape[-1], Angles.shape[-1]
    f = compute_dtype(V.dtype)
    if bug == "heads_mod":   # head i reads Q/K head i % h_qk instead of i // (h / h_qk)
        h_qk = Q.shape[-2]
        Q, K = Q.to(f)[:, :, torch.arange(h) % h_qk], K.to(f)[:, :, torch.arange(h) % h_qk]
    else:
        Q, K = loop.per_head(Q.to(f), h), loop.per_head(K.to(f), h)
    V_f, Angles, ADT, DT, Trap = V.to(f), Angles.to(f), ADT.to(f), DT.to(f), Trap.to(f)
    Q_bias, K_bias = Q_bias.to(f), K_bias.to(f)
    angle, ssm, k_prev, v_prev = (loop.zero_states(b, h, p, n, na, f, V.device) if Input_States is None
                                  else tuple(s.to(f) for s in Input_States))
    if bug == "ignore_kv_states":
        k_prev, v_prev = torch.zeros_like(k_prev), torch.zeros_like(v_prev)
    rot = _halves if bug == "halves" else loop.rotate
    alpha_prev = torch.ones(b, h, dtype=f, device=V.device)
    ys = []
    for t in range(l):
        adt, dt = ADT[:, :, t], DT[:, :, t]
        lam = Trap[:, :, t] if bug == "trap_no_sigmoid" else torch.sigmoid(Trap[:, :, t])
        alpha = torch.exp(adt)
        gamma = lam * dt
        beta = (1 - lam) * dt * {"beta_no_alpha": 1.0, "beta_prev_alpha": alpha_prev}.get(bug, alpha)
        rate = Angles[:, t] if bug == "no_tanh" else torch.tanh(Angles[:, t])
        angle = angle + math.pi * rate * dt[..., None]
        if bug == "angle_bf16":
            angle = angle.to(torch.bfloat16).to(f)
        if bug != "no_modulo":
            angle = torch.remainder(angle, 2 * math.pi)
        if bug == "bias_after_rotation":
            k, q = rot(K[:, t], angle) + K_bias, rot(Q[:, t], angle) + Q_bias
        else:
            k, q = rot(K[:, t] + K_bias, angle), rot(Q[:, t] + Q_bias, angle)
        v = V_f[:, t]
        ssm = (alpha[..., None, None] * ssm + beta[..., None, None] * v_prev[..., :, None] * k_prev[..., None, :]
               + gamma[..., None, None] * v[..., :, None] * k[..., None, :])
        ys.append((ssm * q[..., None, :]).sum(-1))
        k_prev = rot(K[:, t] + K_bias, torch.zeros_like(angle)) if bug == "k_state_unrotated" else k
        v_prev, alpha_prev = v, alpha
    y = torch.stack(ys, 1) if ys else V_f.new_zeros(b, 0, h, p)
    if bug == "D_after_gate":
        y = y * F.silu(Z.to(f)) if Z is not None else y
        y = y + D.to(f)[:, None] * V_f if D is not None else y
    else:
        y = y + D.to(f)[:, None] * V_f if D is not None else y
        y = y * F.silu(Z.to(f)) if Z is not None else y
    out = y.to(V.dtype)
    return (out, angle, ssm, k_prev, v_prev) if return_final_states else out


def chunk_boundary_drops_kv(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None,
                            chunk_size=64, return_final_states=False, cu_seqlens=None):
    """Chunked, but the v_{t-1} k~_{t-1} term is dropped at every chunk boundary: the chunked scan run
    chunk by chunk, carrying the angle and ssm states but not the k and v states."""
    b, l, h, p = V.shape
    if l == 0:  # no chunk, so no boundary: the chunked scan's own empty result and states
        return chunked.mamba3_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, Input_States, chunk_size,
                                   return_final_states)
    states, outs = Input_States, []
    for s in range(0, l, chunk_size):
        e = min(s + chunk_size, l)
        cut = lambda x, dim=1: None if x is None else x.narrow(dim, s, e - s)
        if states is not None and s > 0:
            states = (states[0], states[1], torch.zeros_like(states[2]), torch.zeros_like(states[3]))
        out, *states = chunked.mamba3_scan(cut(Q), cut(K), cut(V), cut(ADT, 2), cut(DT, 2), cut(Trap, 2), Q_bias,
                                           K_bias, cut(Angles), D, cut(Z), states, chunk_size, True)
        outs.append(out)
    out = torch.cat(outs, 1) if outs else V.new_zeros(b, 0, h, p)
    return (out, *states) if return_final_states else out


class _GateGradientSizedUpFront(torch.autograd.Function):
    """out and the final states passed through as they are; Z's gradient made whole before the
    backward knows which results have a gradient (torch.empty) and written only where out's arrives."""

    @staticmethod
    def forward(ctx, Z, out, *states):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(Z)
        return (out.view_as(out), *(x.view_as(x) for x in states))

    @staticmethod
    def backward(ctx, g_out, *g_states):
        Z, = ctx.saved_tensors
        g_Z = torch.empty_like(Z)
        if g_out is not None:
            g_Z.zero_()   # Z's true gradient reaches it through the spec's own graph
        return (g_Z, g_out, *g_states)


def gate_gradient_unwritten(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None,
                            chunk_size=64, return_final_states=False, cu_seqlens=None):
    """The spec, but Z's gradient is memory never written when the loss reads the final states
    alone (a backward that sizes its gradients before it knows which results have one, as the
    chunked scan's once did): only a loss without out shows it."""
    out, *states = loop.mamba3_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, Input_States, chunk_size,
                                    True, cu_seqlens)
    if Z is not None and Z.requires_grad and torch.is_grad_enabled():
        out, *states = _GateGradientSizedUpFront.apply(Z, out, *states)
    return (out, *states) if return_final_states else out


VARIANTS = {name: functools.partial(variant, bug=name) for name in (
    "halves", "bias_after_rotation", "angle_bf16", "no_modulo", "no_tanh", "beta_no_alpha", "beta_prev_alpha",
    "trap_no_sigmoid", "k_state_unrotated", "ignore_kv_states", "D_after_gate", "heads_mod")}
VARIANTS.update(angle_not_reset=angle_not_reset, v_state_from_pack_end=v_state_from_pack_end,
                chunk_boundary_drops_kv=chunk_boundary_drops_kv)

# What the shared planted-bug tests (equivalence/test_planted_bugs.py) read: each bug by name, the
# control, and the bugs their drawn cases can reach. Not among those: the two packed bugs (planted in
# varlen_planted_bugs.py, where the packed properties find them, equivalence/test_varlen_planted_bugs.py;
# this folder's packed check finds them too) and the angle never reduced mod 2 pi (it shows only
# after thousands of float32 tokens: the long check here).
globals().update(VARIANTS)
correct = loop.mamba3_scan
# The gate's unwritten gradient is not among VARIANTS: no check of this folder takes gradients.
BUGS = tuple(k for k in VARIANTS if k not in ("angle_not_reset", "v_state_from_pack_end", "no_modulo")) + (
    "gate_gradient_unwritten",)
# The bugs that only one property catches, and that property (test_planted_bugs.py)
ONLY = {"gate_gradient_unwritten": "partial gradients"}
# None is bit for bit batch invariant, the control included: the spec's elementwise exp, sigmoid and
# tanh round differently on a CPU for another batch size (vectorised or not; measured: an ulp of a
# float32 y), and the chunked scan's einsum may sum in another order. Batch invariance is then held
# to the tolerance policy.
CAPABILITIES = {k: dict(batch_invariant=False) for k in (*BUGS, "correct")}
CAPABILITIES["gate_gradient_unwritten"].update(gradients=True)


# ---- MIMO ----------------------------------------------------------------------------------------
# Each takes mamba3_mimo's signature (impls/mamba3/loop.py) and must be caught by the checks of
# equivalence/mamba3/test_planted_bugs.py, while the correct MIMO scans pass them.

def _interleaved(x, theta):
    """SISO's pairing (2i, 2i+1) where MIMO rotates (i, i + n/2)."""
    return loop.rotate(x, theta.expand(*x.shape[:-1], theta.shape[-1]))


def mimo_variant(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D=None, Z=None,
                 chunk_size=16, rotary_dim_divisor=None, dtype=None, return_state=False, cu_seqlens=None,
                 fuse_pregate_headwise_rms_norm=False, outproj_norm_weight=None, outproj_norm_eps=1e-5,
                 Input_States=None, *, bug):
    """The MIMO loop with one bug switched on (cu_seqlens: each sequence alone, as the spec)."""
    if cu_seqlens is not None:
        return loop.mimo_each_sequence(functools.partial(mimo_variant, bug=bug), Q, K, V, ADT, DT, Trap, Q_bias,
                                       K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z, chunk_size, rotary_dim_divisor,
                                       dtype, return_state, cu_seqlens, fuse_pregate_headwise_rms_norm,
                                       outproj_norm_weight, outproj_norm_eps, Input_States)
    b, l, R, _, n = Q.shape
    h, p = V.shape[-2:]
    f = compute_dtype(V.dtype)
    cast = lambda x: None if x is None else x.to(f)
    Q, K = loop.per_head(Q.to(f), h), loop.per_head(K.to(f), h)
    Q_bias, K_bias, up = Q_bias.to(f).transpose(0, 1), K_bias.to(f).transpose(0, 1), MIMO_V.to(f).transpose(0, 1)
    V_f, Angles, ADT, DT, Trap = V.to(f), Angles.to(f), ADT.to(f), DT.to(f), Trap.to(f)
    angle, ssm, k_prev, v_prev = (loop.zero_mimo_states(b, R, h, p, n, Angles.shape[-1], f, V.device)
                                  if Input_States is None else tuple(s.to(f) for s in Input_States))
    if bug == "l1_drops_input_kv" and l == 1:   # "one token has no previous token"
        k_prev, v_prev = torch.zeros_like(k_prev), torch.zeros_like(v_prev)
    rot = _interleaved if bug == "interleaved" else loop.rotate_halves
    w = loop.norm_weight(outproj_norm_weight, h, p, f)
    ys = []
    for t in range(l):
        dt, alpha = DT[:, :, t], torch.exp(ADT[:, :, t])
        lam = torch.sigmoid(Trap[:, :, t])
        beta, gamma = (1 - lam) * dt * alpha, lam * dt
        angle = torch.remainder(angle + math.pi * torch.tanh(Angles[:, t]) * dt[..., None], 2 * math.pi)
        k, q = rot(K[:, t] + K_bias, angle[:, None]), rot(Q[:, t] + Q_bias, angle[:, None])
        v = V_f[:, t, None] * up
        prev = (v_prev[:, None] * up)[..., :, None] * k_prev[..., None, :]          # (b, R, h, p, n)
        prev = prev[:, -1] if bug == "beta_one_rank" else prev.sum(1)
        ssm = (alpha[..., None, None] * ssm + beta[..., None, None] * prev
               + gamma[..., None, None] * (v[..., :, None] * k[..., None, :]).sum(1))
        y = (ssm[:, None] * q[..., None, :]).sum(-1)                                  # (b, R, h, p)
        if D is not None:
            y = y + D.to(f)[:, None] * (V_f[:, t, None] if bug == "D_on_raw_v" else v)
        g = 1 if Z is None else F.silu(Z.to(f)[:, t, None] * MIMO_Z.to(f).transpose(0, 1))
        norm = lambda y: (y * torch.rsqrt(y.square().mean(-1, keepdim=True) + outproj_norm_eps)
                          * (1 if w is None else w)) if fuse_pregate_headwise_rms_norm else y
        o = None if MIMO_Out is None else cast(MIMO_Out).transpose(0, 1)
        gated = norm(y * g) if bug == "norm_after_gate" else norm(y) * g
        if o is None:                               # the outputs per rank
            y = gated
        elif bug == "out_proj_before_gate":         # contract the ranks first, then one averaged gate
            y = (norm(y) * o).sum(1) * (g.mean(1) if Z is not None else 1)
        elif bug == "ranks_summed_before_projecting":   # sum_r y_r, then the mean projection
            y = gated.sum(1) * o.mean(0)
        else:
            y = (gated * o).sum(1)
        ys.append(y)
        k_prev, v_prev = k, V_f[:, t]
    empty = V_f.new_zeros((b, 0, h, p) if MIMO_Out is not None else (b, 0, R, h, p))
    out = (torch.stack(ys, 1) if ys else empty).to(V.dtype)
    return (out, angle, ssm, k_prev, v_prev) if return_state else out


MIMO_BUGS = {name: functools.partial(mimo_variant, bug=name) for name in (
    "ranks_summed_before_projecting", "out_proj_before_gate", "interleaved", "norm_after_gate", "beta_one_rank",
    "l1_drops_input_kv", "D_on_raw_v")}
# Packed MIMO: every sequence's final v state is the pack's last token (the official ``mamba3_mimo``
# returns V[:, -1] whatever cu_seqlens says); planted once, with the packed bugs (varlen_planted_bugs.py,
# where the shared packed properties find it), and found here too by the packed check.
MIMO_BUGS.update(v_state_from_pack_end=MIMO_PACKED.v_state_from_pack_end)

# What the shared planted-bug tests read of the MIMO family (equivalence/mamba3/mimo.py's planted_bugs),
# as this module is for SISO: not the packed v state (equivalence/test_varlen_planted_bugs.py's).
MIMO = types.SimpleNamespace(**MIMO_BUGS, correct=loop.mamba3_mimo,
                             BUGS=tuple(k for k in MIMO_BUGS if k != "v_state_from_pack_end"), ONLY={},
                             CAPABILITIES={k: dict(batch_invariant=False) for k in (*MIMO_BUGS, "correct")})
