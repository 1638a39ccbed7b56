"""The Mamba-3 (SISO) decode step, and the scan as that step run token after token.

Written apart from the loop (impls/mamba3/loop.py, the spec) so that comparing the two checks
something: the rotation here is a complex product (pair (x_{2i}, x_{2i+1}) as x_{2i} + i x_{2i+1},
times e^{i theta_i}), q and k turned together in one buffer; the biases are added while Q and K
are spread over the heads; and the two input terms of the trapezoid are one rank-2 product per head,

    h_t = alpha_t h_{t-1} + [beta_t v_{t-1}, gamma_t v_t] [k~_{t-1}; k~_t]     ((p, 2) @ (2, n)),

added into alpha_t h_{t-1} in place (baddbmm): three passes over the (p, n) state per token (the
scaled copy, the update, the read-out) where a sum of outer-product terms makes eight, and the
state is most of a decoding step's memory traffic.
Letters (b, h, h_qk, p, n, n_ang, S) as in impls/mamba3/loop.py.

n_ang need not be even. The official ``mamba3_siso_step`` asserts ``headdim_angles % 2 == 0``
while its scan does not; its kernel masks the angles past n_ang (cos 1, sin 0) exactly as an odd
count needs, so the rule is a restriction of that kernel, not of the model. Ours follows the scan:
every n_ang the scan accepts must be decodable, or "prefill then decode equals the scan" would
fail for models the scan serves. An adapter for the official step declares even n_ang as its
capability.
"""

import math

import torch
import torch.nn.functional as F

from ..frontdoor import compute_dtype
from .loop import each_sequence, mimo_each_sequence, per_head, zero_mimo_states, zero_states

TWO_PI = 2 * math.pi


def to_dtype(x, f):
    """x in dtype f, or x itself when it already is (or is None): a decoding step converts each of its
    arguments, and ``.to`` costs a dispatch even when it has nothing to do."""
    return x if x is None or x.dtype == f else x.to(f)


def advance(Q, K, v, adt, dt, trap, Q_bias, K_bias, angles, D, z, states):
    """One token for every row, in the compute dtype, without the front door.

    Q, K: (b, h_qk, n); v, z: (b, h, p); adt, dt, trap: (b, h); Q_bias, K_bias: (h, n);
    angles: (b, h, n_ang); D: (h,) or None; z may be None;
    states: (angle (b, h, n_ang), ssm (b, h, p, n), k (b, h, n), v (b, h, p)).
    Returns (y (b, h, p), the four new states). Nothing is written in place.
    """
    angle, ssm, k_prev, v_prev = states
    b, h, p = v.shape
    h_qk, n = Q.shape[-2:]
    # the angle formed as the spec forms it, (pi tanh) DT then the sum: one fused multiply-add
    # (addcmul) rounds differently, and the angle state feeds every later rotation
    theta = torch.remainder(angle + math.pi * torch.tanh(angles) * dt[..., None], TWO_PI)
    # q~, k~_{t-1} and k~_t in one buffer (3, b, h, n): each bias added while its group is spread over
    # the group's heads (head i reads Q/K head i // (h / h_qk)), then the new pairs of q and k turned
    # by one complex product
    qk = v.new_empty(3, b, h, n)
    spread = (b, h_qk, h // h_qk, n)
    torch.add(Q[:, :, None], Q_bias.reshape(spread[1:]), out=qk[0].view(spread))
    qk[1].copy_(k_prev)
    torch.add(K[:, :, None], K_bias.reshape(spread[1:]), out=qk[2].view(spread))
    pairs = torch.view_as_complex(qk.view(3, b, h, n // 2, 2))
    pairs[::2, ..., :theta.shape[-1]].mul_(torch.polar(torch.ones_like(theta), theta))
    alpha = torch.exp(adt)
    gamma = torch.sigmoid(trap) * dt                                           # lambda DT
    # beta v_{t-1} k~_{t-1}^T + gamma v_t k~_t^T as one (p, 2) @ (2, n) product per head, added into
    # alpha h_{t-1} in place: three passes over the state, one of them its only allocation
    vv = torch.stack((v_prev, v))                                              # (2, b, h, p)
    vs = vv * torch.stack(((dt - gamma) * alpha, gamma))[..., None]            # beta v_{t-1}, gamma v_t
    new = ssm.flatten(0, 1) * alpha.view(b * h, 1, 1)                          # (b h, p, n)
    new.baddbmm_(vs.permute(1, 2, 3, 0).reshape(b * h, p, 2), qk[1:].permute(1, 2, 0, 3).reshape(b * h, 2, n))
    # h_t q~_t as q~^T h_t^T: on a CPU (MKL, torch 2.13) the same products in a third of the time of
    # h_t @ q~ (b h, n, 1), whose one-column batched product takes a slow path
    y = torch.bmm(qk[0].view(b * h, 1, n), new.transpose(1, 2)).view(b, h, p)
    if D is not None:
        y = torch.addcmul(y, v, D[:, None])
    if z is not None:
        y = y * F.silu(z)
    return y, (theta, new.view(b, h, p, n), qk[2], vv[1])


def mamba3_state_update(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None,
                        state_batch_indices=None):
    """One Mamba-3 SISO token (the official ``mamba3_siso_step``), arguments already checked.

    Args:
        Q, K: (b, h_qk, n); V, Z: (b, h, p) (Z optional); ADT, DT, Trap: (b, h)
        Q_bias, K_bias: (h, n); Angles: (b, h, n_ang); D: (h,) optional
        Input_States: (angle (S, h, n_ang), ssm (S, h, p, n), k (S, h, n), v (S, h, p)) in the
            compute dtype, or None (zeros). Without state_batch_indices, S = b and they are only read.
        state_batch_indices: (b,) int32 or None. Given, Input_States is a cache of S slots: row i
            reads and writes slot state_batch_indices[i] IN PLACE; a negative index marks a padding
            row, whose output is zeros and which touches no slot.
    Returns:
        (out (b, h, p) in V's dtype, (angle, ssm, k, v)): new state tensors (b, h, ...) in the
        compute dtype; with state_batch_indices, the cache tensors themselves, updated.
    """
    b, h, p = V.shape
    f = compute_dtype(V.dtype)
    Q, K, V_f, ADT, DT, Trap, Angles, Z = (to_dtype(x, f) for x in (Q, K, V, ADT, DT, Trap, Angles, Z))
    Q_bias, K_bias, D = to_dtype(Q_bias, f), to_dtype(K_bias, f), to_dtype(D, f)
    if state_batch_indices is None:
        states = (zero_states(b, h, p, Q.shape[-1], Angles.shape[-1], f, V.device) if Input_States is None
                  else tuple(to_dtype(s, f) for s in Input_States))
        y, new = advance(Q, K, V_f, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, states)
        return to_dtype(y, V.dtype), new

    # the serving form: gather the rows' slots, advance them, scatter back in place
    indices = state_batch_indices.tolist()
    rows = [i for i, s in enumerate(indices) if s >= 0]
    out = torch.zeros(b, h, p, dtype=V.dtype, device=V.device)
    if rows:
        r = torch.tensor(rows, device=V.device)
        slots = torch.tensor([indices[i] for i in rows], device=V.device)
        states = tuple(s[slots].to(f) for s in Input_States)
        pick = lambda x: None if x is None else x[r]
        y, new = advance(Q[r], K[r], V_f[r], ADT[r], DT[r], Trap[r], Q_bias, K_bias, Angles[r], D, pick(Z), states)
        out[r] = y.to(V.dtype)
        with torch.no_grad():
            for cache, s in zip(Input_States, new):
                cache.index_copy_(0, slots, s.to(cache.dtype))
    return out, tuple(Input_States)


def scan_by_stepping(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None,
                     chunk_size=64, return_final_states=False, cu_seqlens=None):
    """The scan (impls/mamba3/loop.py's signature and shapes) as the step run token after token;
    packed sequences each alone, as the loop."""
    if cu_seqlens is not None:
        return each_sequence(scan_by_stepping, Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, Input_States,
                             chunk_size, return_final_states, cu_seqlens)
    b, l, h, p = V.shape
    f = compute_dtype(V.dtype)
    states = (zero_states(b, h, p, Q.shape[-1], Angles.shape[-1], f, V.device) if Input_States is None
              else tuple(s.to(f) for s in Input_States))
    ys = []
    for t in range(l):
        y, states = mamba3_state_update(Q[:, t], K[:, t], V[:, t], ADT[:, :, t], DT[:, :, t], Trap[:, :, t], Q_bias,
                                        K_bias, Angles[:, t], D, None if Z is None else Z[:, t], states)
        ys.append(y)
    out = torch.stack(ys, dim=1) if ys else V.new_zeros(b, 0, h, p)
    return (out, *states) if return_final_states else out


# ---- MIMO ----------------------------------------------------------------------------------------
# The same step with R ranks (letters and conventions in impls/mamba3/loop.py, MIMO section). Written
# apart from the loop again: pair (x_i, x_{i + n/2}) is the complex number x_i + i x_{i + n/2}, the
# trapezoid is folded into the previous state, and the ranks are summed by einsum.

def rotate_halves_complex(x, theta):
    """x (..., n) with pairs (x_i, x_{i + n/2}), i < n_ang, rotated by theta (..., n_ang) as complex products."""
    half, n_ang = x.shape[-1] // 2, theta.shape[-1]
    pairs = torch.complex(x[..., :n_ang], x[..., half:half + n_ang]) * torch.polar(torch.ones_like(theta), theta)
    return torch.cat((pairs.real, x[..., n_ang:half], pairs.imag, x[..., half + n_ang:]), dim=-1)


def mimo_advance(q, k, v, adt, dt, trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, angles, D, z, norm, norm_weight,
                 norm_eps, states):
    """One MIMO token for every row, in the compute dtype, without the front door.

    q, k: (b, R, h, n) already spread over the h heads; v, z: (b, h, p); adt, dt, trap: (b, h);
    Q_bias, K_bias: (h, R, n); MIMO_V, MIMO_Z, MIMO_Out: (h, R, p) (MIMO_Out may be None);
    angles: (b, h, n_ang); D: (h,) or None; z may be None; norm: bool; norm_weight: (h, p) or None;
    states: (angle (b, h, n_ang), ssm (b, h, p, n), k (b, R, h, n), v (b, h, p)).
    Returns (out (b, h, p), or (b, R, h, p) without MIMO_Out, the four new states).
    """
    angle, ssm, k_prev, v_prev = states
    lam = torch.sigmoid(trap)[..., None, None]
    theta = angle + math.pi * torch.tanh(angles) * dt[..., None]
    theta = theta - TWO_PI * torch.floor(theta / TWO_PI)                   # into [0, 2 pi)
    k_rot = rotate_halves_complex(k + K_bias.transpose(0, 1), theta[:, None])
    q_rot = rotate_halves_complex(q + Q_bias.transpose(0, 1), theta[:, None])
    dt4 = dt[..., None, None]
    prev = torch.einsum("bhp,hrp,brhn->bhpn", v_prev, MIMO_V, k_prev)       # sum_r v~_{t-1,r} k~_{t-1,r}^T
    curr = torch.einsum("bhp,hrp,brhn->bhpn", v, MIMO_V, k_rot)
    ssm = torch.exp(adt)[..., None, None] * (ssm + ((1 - lam) * dt4) * prev) + (lam * dt4) * curr
    y = torch.einsum("bhpn,brhn->brhp", ssm, q_rot)
    if D is not None:
        y = y + torch.einsum("h,bhp,hrp->brhp", D, v, MIMO_V)
    if norm:
        y = y / torch.sqrt((y * y).mean(-1, keepdim=True) + norm_eps)
        y = y if norm_weight is None else y * norm_weight
    if z is not None:
        y = y * F.silu(torch.einsum("bhp,hrp->brhp", z, MIMO_Z))
    out = y if MIMO_Out is None else torch.einsum("brhp,hrp->bhp", y, MIMO_Out)
    return out, (theta, ssm, k_rot, v.clone())


def mamba3_mimo_state_update(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D=None, Z=None,
                             Input_States=None, fuse_pregate_headwise_rms_norm=False, outproj_norm_weight=None,
                             outproj_norm_eps=1e-5, state_batch_indices=None):
    """One Mamba-3 MIMO token, arguments already checked.

    Args:
        Q, K: (b, R, h_qk, n); V, Z: (b, h, p) (Z optional); ADT, DT, Trap: (b, h)
        Q_bias, K_bias: (h, R, n); MIMO_V, MIMO_Z, MIMO_Out: (h, R, p); Angles: (b, h, n_ang); D: (h,)
        Input_States: (angle (S, h, n_ang), ssm (S, h, p, n), k (S, R, h, n), v (S, h, p)) in the
            compute dtype, or None (zeros). Without state_batch_indices, S = b and they are only read.
        fuse_pregate_headwise_rms_norm, outproj_norm_weight ((h, p) or (h * p,)), outproj_norm_eps:
            the norm before the gate, as mamba3_mimo's
        state_batch_indices: (b,) int32 or None. Given, Input_States is a cache of S slots: row i
            reads and writes slot state_batch_indices[i] IN PLACE; a negative index marks a padding
            row, whose output is zeros and which touches no slot.
    Returns:
        (out (b, h, p), or (b, R, h, p) without MIMO_Out, in V's dtype, (angle, ssm, k, v)): new
        state tensors (b, ...) in the compute dtype; with state_batch_indices, the cache tensors
        themselves, updated
    """
    b, R, _, n = Q.shape
    h, p = V.shape[-2:]
    f = compute_dtype(V.dtype)
    cast = lambda x: None if x is None else x.to(f)
    weight = None if outproj_norm_weight is None else cast(outproj_norm_weight).reshape(h, p)
    params = (cast(Q_bias), cast(K_bias), cast(MIMO_V), cast(MIMO_Z), cast(MIMO_Out))

    def advance_rows(rows, states):
        """mimo_advance on the batch rows ``rows`` (an index tensor, or a full slice) from ``states``."""
        pick = lambda x: None if x is None else x.to(f)[rows]
        return mimo_advance(per_head(pick(Q), h), per_head(pick(K), h), pick(V), pick(ADT), pick(DT), pick(Trap),
                            *params, pick(Angles), cast(D), pick(Z), fuse_pregate_headwise_rms_norm,
                            weight, outproj_norm_eps, states)

    if state_batch_indices is None:
        states = (zero_mimo_states(b, R, h, p, n, Angles.shape[-1], f, V.device) if Input_States is None
                  else tuple(map(cast, Input_States)))
        out, new = advance_rows(slice(None), states)
        return out.to(V.dtype), new
    return mimo_update_slots(advance_rows, Input_States, state_batch_indices,
                             (b, h, p) if MIMO_Out is not None else (b, R, h, p), V.dtype, f)


def mimo_update_slots(advance_rows, cache, state_batch_indices, out_shape, out_dtype, f):
    """The serving form of the MIMO step: gather the rows' slots of ``cache`` (a tuple of state tensors
    (slots, ...)), advance them with ``advance_rows(rows, states) -> (out, new states)``, scatter the
    new states back in place; padding rows (negative index) get zeros and touch no slot.
    Returns (out ``out_shape`` in ``out_dtype``, the cache tuple)."""
    indices = state_batch_indices.tolist()
    rows = [i for i, s in enumerate(indices) if s >= 0]
    device = cache[0].device
    out = torch.zeros(out_shape, dtype=out_dtype, device=device)
    if rows:
        r = torch.tensor(rows, device=device)
        slots = torch.tensor([indices[i] for i in rows], device=device)
        y, new = advance_rows(r, tuple(s[slots].to(f) for s in cache))
        out[r] = y.to(out_dtype)
        with torch.no_grad():
            for c, s in zip(cache, new):
                c.index_copy_(0, slots, s.to(c.dtype))
    return out, tuple(cache)


def mimo_scan_by_stepping(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D=None, Z=None,
                          chunk_size=16, rotary_dim_divisor=None, dtype=None, return_state=False, cu_seqlens=None,
                          fuse_pregate_headwise_rms_norm=False, outproj_norm_weight=None, outproj_norm_eps=1e-5,
                          Input_States=None):
    """The MIMO scan (impls/mamba3/loop.py's mamba3_mimo signature and shapes) as the step run token
    after token; packed sequences each alone, as the loop."""
    if cu_seqlens is not None:
        return mimo_each_sequence(mimo_scan_by_stepping, Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z,
                                  MIMO_Out, Angles, D, Z, chunk_size, rotary_dim_divisor, dtype, return_state,
                                  cu_seqlens, fuse_pregate_headwise_rms_norm, outproj_norm_weight, outproj_norm_eps,
                                  Input_States)
    b, l, R, _, n = Q.shape
    h, p = V.shape[-2:]
    f = compute_dtype(V.dtype)
    states = (zero_mimo_states(b, R, h, p, n, Angles.shape[-1], f, V.device) if Input_States is None
              else tuple(s.to(f) for s in Input_States))
    ys = []
    for t in range(l):
        y, states = mamba3_mimo_state_update(Q[:, t], K[:, t], V[:, t], ADT[:, :, t], DT[:, :, t], Trap[:, :, t],
                                             Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles[:, t], D,
                                             None if Z is None else Z[:, t], states, fuse_pregate_headwise_rms_norm,
                                             outproj_norm_weight, outproj_norm_eps)
        ys.append(y)
    out = torch.stack(ys, dim=1) if ys else V.new_zeros((b, 0, h, p) if MIMO_Out is not None else (b, 0, R, h, p))
    return (out, *states) if return_state else out
