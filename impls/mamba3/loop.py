"""The Mamba-3 (SISO) spec: the scan as a plain loop over tokens, float64-capable.

Read beside the paper: Lahoti, Li, Chen, Wang, Bick, Kolter, Dao & Gu, "Mamba-3: Improved Sequence
Modeling using State Space Principles" (ICLR 2026, arXiv 2603.15569): the exponential-trapezoidal
discretisation (its recurrence with the three coefficients alpha, beta, gamma), the complex-valued
SSM realised as data-dependent rotary embeddings of B and C, SISO form. Official code:
https://github.com/state-spaces/mamba, ``mamba3_siso_combined`` (our signature, minus ``impl``),
``mamba3_siso_step`` and the pure-PyTorch references ``mamba3_siso_step_ref`` /
``mamba3_siso_fwd_ref`` in tests/ops/triton/test_mamba3_siso.py.

Glossary (every docstring of impls/mamba3 uses these letters):
    b      batch size (S: number of sequences; S = b, or nseq with cu_seqlens and b = 1)
    l      sequence length (time)
    h      heads of V (``nheads``); each head has its own ADT, DT, Trap, angles per token
    h_qk   heads of Q and K (``nheads_qk``); head i reads Q/K head i // (h // h_qk); h_qk divides h
    p      head dimension of V (``headdim_v``)
    n      state size, the head dimension of Q and K (``headdim_qk``), even
    n_ang  rotated pairs (``headdim_angles``), n_ang <= n / 2
    Q plays Mamba-2's C, K plays B, V plays x.

The recurrence, per token t and head (the paper's exponential-trapezoidal SSM, in the official
names):
    lambda_t = sigmoid(Trap_t)                         the trapezoid's weight on the current end
    alpha_t  = exp(ADT_t)                              the decay, ADT = A dt (A per token)
    gamma_t  = lambda_t DT_t                           weight of the current token's input
    beta_t   = (1 - lambda_t) DT_t alpha_t             weight of the previous token's input
    theta_t  = (theta_{t-1} + pi tanh(Angles_t) DT_t) mod 2 pi          (n_ang angles per head)
    k~_t = Rot(theta_t)(K_t + K_bias),  q~_t = Rot(theta_t)(Q_t + Q_bias)
    h_t  = alpha_t h_{t-1} + beta_t v_{t-1} k~_{t-1}^T + gamma_t v_t k~_t^T        (p, n) per head
    y_t  = h_t q~_t + D v_t,  then  y_t silu(Z_t)
With lambda = 1 (Trap -> +inf), no rotation and no biases this is Mamba-2's SSD with a per-token
A (impls ssd loop): the cross-family check in equivalence/mamba3.

Conventions pinned (each checked against the official ``mamba3_siso_step_ref`` and
``mamba3_siso_fwd_ref``, run on the CPU beside this loop: agreement to float32 rounding, see the
report of issue 25):
    - Rotation pairing: interleaved pairs (2i, 2i+1), i < n_ang, rotated by theta_i as a complex
      number x_{2i} + i x_{2i+1} times e^{i theta}: (x0 cos - x1 sin, x0 sin + x1 cos). Pairs
      i >= n_ang (dimensions 2 n_ang .. n-1) are left alone (the official pads cos with 1, sin
      with 0). (Mamba-3 MIMO rotates pairs (i, i + n/2) instead; not this family.)
    - Angle modulo: reduced after every token into [0, 2 pi), x - 2 pi floor(x / 2 pi) (torch's
      remainder, as the official step): the angle state stays small, so float32 keeps its
      absolute precision however long the sequence.
    - Order: the bias is added first, then the sum is rotated: k~ = Rot(theta)(K + K_bias).
    - The k state holds k~_{t-1}: biased AND rotated, by theta_{t-1} (the official step stores
      k_rot); the v state holds v_{t-1} raw. The beta term of the first token of a call reads
      them: it multiplies v_state k_state^T as stored, with no rotation by the new angle.
      Without input states all four are zero, so the first token has no beta term.
    - Q_bias and K_bias are per V head, (h, n), added after Q and K are spread over the h heads.
    - DT multiplies the angle increment (pi tanh(Angles) DT); D is per head (h,).
State dtypes: all four states come back in the compute dtype (float32 for 16/32-bit inputs,
float64 for float64). The official kernels differ: the combined scan keeps the angle state in
the Angles' dtype (bfloat16 after its cast), and the step returns the input V itself as the v state
(V's dtype); their ssm and k states are float32, as ours.
"""

import math

import torch
import torch.nn.functional as F

from ..frontdoor import compute_dtype

TWO_PI = 2 * math.pi


def per_head(X, h):
    """Q or K: (..., h_qk, n) -> (..., h, n), head i reading Q/K head i // (h // h_qk)."""
    h_qk = X.shape[-2]
    return X if h_qk == h else X.repeat_interleave(h // h_qk, dim=-2)


def rotate(x, theta):
    """Rotate interleaved pairs of x by theta.

    x: (..., n); theta: (..., n_ang) with n_ang <= n / 2. Pair i = (x_{2i}, x_{2i+1}), i < n_ang,
    becomes (x0 cos theta_i - x1 sin theta_i, x0 sin theta_i + x1 cos theta_i); dimensions from
    2 n_ang on are returned unchanged. Returns (..., n).
    """
    m = 2 * theta.shape[-1]
    x0, x1 = x[..., 0:m:2], x[..., 1:m:2]
    c, s = torch.cos(theta), torch.sin(theta)
    pairs = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    return torch.cat((pairs, x[..., m:]), dim=-1)


def zero_states(S, h, p, n, n_ang, f, device):
    """The four states of a fresh sequence: angle (S, h, n_ang), ssm (S, h, p, n), k (S, h, n), v (S, h, p)."""
    return (torch.zeros(S, h, n_ang, dtype=f, device=device), torch.zeros(S, h, p, n, dtype=f, device=device),
            torch.zeros(S, h, n, dtype=f, device=device), torch.zeros(S, h, p, dtype=f, device=device))


def mamba3_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None,
                chunk_size=64, return_final_states=False, cu_seqlens=None):
    """Mamba-3 SISO scan, one token after another.

    Args:
        Q, K: (b, l, h_qk, n) read-out and input projections (Mamba-2's C and B)
        V: (b, l, h, p) input; Z: (b, l, h, p) gate, optional
        ADT, DT, Trap: (b, h, l) (time last, as the official): log-decay A dt, step size, and the
            trapezoid's raw weight (sigmoid applied here)
        Q_bias, K_bias: (h, n); Angles: (b, l, h, n_ang) raw angle rates (tanh applied here)
        D: (h,) skip connection, optional
        Input_States: (angle (S, h, n_ang), ssm (S, h, p, n), k (S, h, n), v (S, h, p)) or None
            (zeros); S = b, or nseq with cu_seqlens
        chunk_size: ignored (a setting of chunked implementations)
        return_final_states: also return the four states after the last token
        cu_seqlens: (nseq + 1,) int32 with b = 1: packed sequences, each scanned alone from its
            own row of Input_States; a sequence of length 0 returns its initial state
    Returns:
        out (b, l, h, p) in V's dtype; with return_final_states, (out, angle, ssm, k, v), the
        states in the compute dtype (float32, or float64 for float64 V)
    """
    if cu_seqlens is not None:
        return each_sequence(mamba3_scan, Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, Input_States,
                             chunk_size, return_final_states, cu_seqlens)
    b, l, h, p = V.shape
    n, n_ang = Q.shape[-1], Angles.shape[-1]
    f = compute_dtype(V.dtype)
    Q, K = per_head(Q.to(f), h), per_head(K.to(f), h)                   # (b, l, h, n)
    Q_bias, K_bias = Q_bias.to(f), K_bias.to(f)
    V_f, Angles = V.to(f), Angles.to(f)
    ADT, DT, Trap = ADT.to(f), DT.to(f), Trap.to(f)

    if Input_States is None:
        angle, ssm, k_prev, v_prev = zero_states(b, h, p, n, n_ang, f, V.device)
    else:
        angle, ssm, k_prev, v_prev = (s.to(f) for s in Input_States)
    ys = []
    for t in range(l):
        adt, dt = ADT[:, :, t], DT[:, :, t]                              # (b, h)
        # Exponential-trapezoidal discretisation: the three coefficients
        lam = torch.sigmoid(Trap[:, :, t])                               # lambda_t
        alpha = torch.exp(adt)                                           # alpha_t = exp(A dt)
        gamma = lam * dt                                                 # gamma_t = lambda_t dt_t
        beta = (1 - lam) * dt * alpha                                    # beta_t = (1 - lambda_t) dt_t alpha_t
        # Complex SSM as data-dependent rotary embedding: the angle accumulates, reduced mod 2 pi
        angle = torch.remainder(angle + math.pi * torch.tanh(Angles[:, t]) * dt[..., None], TWO_PI)
        # bias first, then rotate (interleaved pairs; pairs past n_ang untouched)
        k = rotate(K[:, t] + K_bias, angle)                              # k~_t (b, h, n)
        q = rotate(Q[:, t] + Q_bias, angle)                              # q~_t (b, h, n)
        v = V_f[:, t]                                                    # (b, h, p)
        # h_t = alpha_t h_{t-1} + beta_t v_{t-1} k~_{t-1}^T + gamma_t v_t k~_t^T
        ssm = (alpha[..., None, None] * ssm
               + beta[..., None, None] * v_prev[..., :, None] * k_prev[..., None, :]
               + gamma[..., None, None] * v[..., :, None] * k[..., None, :])
        # y_t = h_t q~_t (a sum over the n states)
        ys.append((ssm * q[..., None, :]).sum(-1))                       # (b, h, p)
        k_prev, v_prev = k, v

    y = torch.stack(ys, dim=1) if ys else V_f.new_zeros(b, 0, h, p)
    if D is not None:
        y = y + D.to(f)[:, None] * V_f                                   # skip connection D v
    if Z is not None:
        y = y * F.silu(Z.to(f))                                          # gate y silu(z), after D
    out = y.to(V.dtype)
    return (out, angle, ssm, k_prev, v_prev) if return_final_states else out


def each_sequence(scan, Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, Input_States, chunk_size,
                  return_final_states, cu_seqlens):
    """Packed sequences by definition: each sequence cut out of the (b = 1) pack and scanned alone by
    ``scan`` from its own row of Input_States; outputs laid back end to end, states stacked
    (nseq, h, ...). A sequence of length 0 contributes no output and returns its initial state."""
    offsets = cu_seqlens.tolist()
    h, p = V.shape[-2:]
    n, n_ang = Q.shape[-1], Angles.shape[-1]
    f = compute_dtype(V.dtype)
    outs, finals = [], []
    for i, (s, e) in enumerate(zip(offsets, offsets[1:])):
        init = None if Input_States is None else tuple(st[i:i + 1] for st in Input_States)
        if e == s:
            finals.append(zero_states(1, h, p, n, n_ang, f, V.device) if init is None else
                          tuple(st.to(f) for st in init))
            continue
        piece = lambda x, time_dim=1: None if x is None else x.narrow(time_dim, s, e - s)
        out, *states = scan(piece(Q), piece(K), piece(V), piece(ADT, 2), piece(DT, 2), piece(Trap, 2), Q_bias,
                            K_bias, piece(Angles), D, piece(Z), init, chunk_size, True)
        outs.append(out)
        finals.append(states)
    out = torch.cat(outs, dim=1) if outs else V.new_zeros(1, 0, h, p)
    if not return_final_states:
        return out
    if not finals:  # no sequences at all (cu_seqlens = [0])
        return (out, *zero_states(0, h, p, n, n_ang, f, V.device))
    return (out, *(torch.cat(parts, dim=0) for parts in zip(*finals)))
