"""The Mamba-3 (SISO) scan (chunked, forward and backward) and its decoding step as Triton kernels.

Same contract as impls/mamba3/loop.py (the spec) and impls/mamba3/recurrent.py (the step); letters
(b, l, h, h_qk, p, n, n_ang, S) as in impls/mamba3/loop.py. Dtypes: every load is converted to the
compute dtype (float32, float64 for float64 V) at once; out comes back in V's dtype and every state
in the compute dtype.

The recurrence (the paper's exponential-trapezoidal SSM), per batch row and head::

    lambda_t = sigmoid(Trap_t);  gamma_t = lambda_t DT_t;  delta_t = (1 - lambda_t) DT_t
    theta_t  = (theta_{t-1} + pi tanh(Angles_t) DT_t) mod 2 pi
    k~_t = Rot(theta_t)(K_t + K_bias);  q~_t = Rot(theta_t)(Q_t + Q_bias)          (interleaved pairs)
    h_t  = exp(ADT_t) (h_{t-1} + delta_t v_{t-1} k~_{t-1}^T) + gamma_t v_t k~_t^T   # h: (p, n)
    y_t  = h_t q~_t + D v_t;  out_t = y_t silu(Z_t)

Unrolled, token s reaches every later state through its own gamma_s and the next token's delta_{s+1}
(decayed by exp(ADT_{s+1}), as its own term is): with u_s = gamma_s + delta_{s+1} (delta_l = 0: the
next call's token, carried by the k and v states) and cs_t the cumulative sum of ADT from a chunk's
start, this is Mamba-2's SSD with dt = u, x = v, B = k~, C = q~ and a per-token decay, except on the
diagonal, where token t's own output sees gamma_t, not u_t. So, for chunks of Q tokens::

    1. prep         theta, q~, k~ (the angle carried sequentially over l), u and gamma
                    chunk cumsum cs of ADT (Mamba-2's kernel, in float64, with A = 1)
    2. chunk states S_c = sum_s exp(cs_end - cs_s) u_s v_s k~_s^T                 (Mamba-2's kernel)
    3. state pass   H_0 = h_init + delta_0 v_init k_init^T;  H_{c+1} = exp(cs_end) H_c + S_c
                                                                                 (Mamba-2's kernel)
    4. chunk scan   y_t = exp(cs_t) H_c q~_t + sum_{s <= t} W_ts (q~_t . k~_s) v_s + D v_t
                    W_ts = exp(cs_t - cs_s) u_s for s < t,  W_tt = gamma_t;   out = y silu(Z)

The chunk boundary needs nothing of its own: the shifted term of a chunk's first token (delta_{c0}
v_{c0-1} k~_{c0-1}^T) is already in S_{c-1} through u_{c0-1}; only the first token of the call folds
the input k and v states into H_0. The final states are H_nc, theta_{l-1}, k~_{l-1} and v_{l-1}.

The backward runs step 4 then 3 and 2 in reverse, as the Mamba-2 backward does (its state pass and
chunk-state kernels, and a chunk kernel of this file whose derivation is in its comments), giving
d q~, d k~, d v, d u, d gamma and d cs; d ADT is the reverse cumsum of d cs within each chunk. The
elementwise rest (rotation, bias, the coefficients from Trap and DT, the angle's increments, the
fold of the input states, D and the gate) is torch's autograd on a recomputation of those elementwise
pieces from the forward's saved angles, so their chain rule is torch's.

Numerics, where this departs from the official kernels on purpose:
  - tanh is exact to a few ulp (float64 from exp and log, Kahan's expm1); the official kernel's
    tanh.approx costs about 2^-11 relative in every angle increment;
  - the angle is accumulated and reduced mod 2 pi in float64 and kept in the compute dtype (the
    official keeps the cumulative angle in bfloat16); the coefficients (sigmoid, gamma, u) are
    computed in float64 and rounded once;
  - the cumsum of ADT is float64 (compensated for float64 compute) and every exp of a segment is
    taken in float64, of a segment sum that is replaced by 0 above the diagonal before the exp and
    the entry by 0 after it (tl.where): no exp of a non-causal sum, no clamp of the exponent;
  - every padded lane (p, n, n_ang to the block, positions past l or past the chunk) is loaded as 0
    and every weight on it set by tl.where; any p and n up to MAX_PN (p = 1, 3, 17, n = 6 ...) are
    padded to tiles of at least 16 (tl.dot's smallest) and nothing outside the tensors is written.
    The step holds one (slot, head) per program and loops over tiles of p: no tile of 64 assumed;
  - float32 tl.dot runs with input_precision="ieee"; every exp, the gate's silu included, is taken
    in float64 (Triton's float32 exp is ex2.approx on NVIDIA GPUs), except inside Mamba-2's
    chunk-state kernel, reused as it is (step 2, and the backward's own-state gradient).
A non-finite V, which tl.dot would carry to its chunk's earlier outputs (0 x inf), is zeroed for the
kernels and its effect restored after them (mamba3_scan). Declared gaps: packed sequences
(cu_seqlens) raise NotImplementedError; p or n above MAX_PN raise NotImplementedError; an ADT of
-inf makes the later segments of its chunk exp(-inf - (-inf)) = NaN, where the loop's decay is 0.

Grids: CUDA allows 2^31 - 1 programs on axis 0 and 65,535 on axes 1 and 2; every grid here puts
b x h (folded with the chunk index where there is one) on axis 0 and only tile counts on axis 1
(``launch_grids``). Kernel conventions as impls/ssd/triton.py: ``p_`` pointers, ``b_`` block values,
``o_`` offsets, ``m_`` masks, ``i_`` program indices; every offset computed in 64 bits.
"""

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..frontdoor import compute_dtype
# first: importing it settles TRITON_INTERPRET, which triton reads when it is imported
from ..triton_common import INTERPRETED  # noqa: F401 (the compile tests read it here)
from ..triton_common import (CHUNKED_GPU_CONFIG, CHUNKED_INTERPRETER_CONFIG, MAX_PN, block,
                             check_tile_limits, host_tensors_on_a_gpu_machine, launch_config, quiet, result_dtype,
                             segment, sigmoid, silu, tl_dtype)
from ..ssd.triton import chunk_cumsum_kernel, chunk_state_kernel, state_pass_bwd_kernel, state_pass_kernel
from . import chunked
from .loop import per_head, rotate, zero_states

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

# Launch configuration: the chunked kernels' (impls/triton_common.py) with 32-token cumsum blocks
# and n tiles of 64 on a GPU, read at every launch.
CONFIG = launch_config(dict(CHUNKED_GPU_CONFIG, block_t=32, block_n=64), dict(CHUNKED_INTERPRETER_CONFIG))


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

@triton.jit
def tanh64(x):
    """tanh of a float64 x to a few ulp, from exp and log only (the interpreter has no libdevice):
    sign(x) (-e) / (2 + e) with e = expm1(-2|x|), expm1 by Kahan's (u - 1) y / log(u), u = exp(y),
    taken as y where u rounds to 1 and as -1 where u underflows. NaN stays NaN, +-inf gives +-1."""
    y = -2.0 * tl.abs(x)
    u = tl.exp(y)
    safe = tl.where((u == 1.0) | (u == 0.0), 0.5, u)
    e = tl.where(u == 1.0, y, tl.where(u == 0.0, -1.0, (safe - 1.0) * y / tl.log(safe)))
    t = -e / (2.0 + e)
    return tl.where(x < 0, -t, t)


_NS = ["h", "l", "Q", "p", "n", "nc", "n_ang", "hpg", "n_mb"]


# ---------------------------------------------------------------------------------------------
# 1. Prep: the angle (sequential over l), q~ and k~, u and gamma. One program per (b, h).
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=_NS)
def prep_kernel(
    Q_ptr, K_ptr, qb_ptr, kb_ptr, ang_ptr, dt_ptr, trap_ptr, angle0_ptr, consts_ptr,
    qr_ptr, kr_ptr, u_ptr, gam_ptr, theta_ptr, angle_ptr,
    h, l, n, n_ang, hpg,
    HAS_ANGLE0: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_A: tl.constexpr, COMPUTE: tl.constexpr,
):
    # Inputs contiguous: Q, K (b, l, h_qk, n); Angles (b, l, h, n_ang); DT, Trap (b, h, l); biases
    # (h, n); angle0 (b, h, n_ang). Outputs: q~, k~ (b, l, h, n), theta (b, l, h, n_ang), u and
    # gamma (b, h, l), the final angle (b, h, n_ang). Work is laid out over the n/2 pairs: pair i
    # is (2i, 2i+1), rotated by theta_i for i < n_ang and copied as is past n_ang.
    i_bh = tl.program_id(0)
    i_h = i_bh % h
    b64, h64 = tl.cast(i_bh // h, tl.int64), tl.cast(i_h, tl.int64)
    g64 = tl.cast(i_h // hpg, tl.int64)
    h_qk = h // hpg
    PI = tl.load(consts_ptr)
    TWO_PI = tl.load(consts_ptr + 1)
    o_a = tl.arange(0, BLOCK_A)
    m_pair, m_ang = o_a < n // 2, o_a < n_ang
    o_e = tl.cast(2 * o_a, tl.int64)                                    # the even element of each pair
    o_row = tl.cast(i_bh, tl.int64) * l                                 # (b, h, l) rows
    if HAS_ANGLE0:
        carry = tl.load(angle0_ptr + tl.cast(i_bh, tl.int64) * n_ang + o_a, mask=m_ang, other=0.0).to(tl.float64)
    else:
        carry = tl.zeros([BLOCK_A], dtype=tl.float64)
    qb0 = tl.load(qb_ptr + h64 * n + o_e, mask=m_pair, other=0.0).to(COMPUTE)
    qb1 = tl.load(qb_ptr + h64 * n + o_e + 1, mask=m_pair, other=0.0).to(COMPUTE)
    kb0 = tl.load(kb_ptr + h64 * n + o_e, mask=m_pair, other=0.0).to(COMPUTE)
    kb1 = tl.load(kb_ptr + h64 * n + o_e + 1, mask=m_pair, other=0.0).to(COMPUTE)
    last = (tl.arange(0, BLOCK_T) == BLOCK_T - 1)[:, None]
    for t0 in range(0, l, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T)
        m_t, m_nx = o_t < l, o_t + 1 < l
        # the coefficients, in float64 and rounded once
        b_dt = tl.load(dt_ptr + o_row + o_t, mask=m_t, other=0.0).to(COMPUTE).to(tl.float64)
        b_lam = sigmoid(tl.load(trap_ptr + o_row + o_t, mask=m_t, other=0.0).to(COMPUTE).to(tl.float64))
        b_dt_nx = tl.load(dt_ptr + o_row + o_t + 1, mask=m_nx, other=0.0).to(COMPUTE).to(tl.float64)
        b_lam_nx = sigmoid(tl.load(trap_ptr + o_row + o_t + 1, mask=m_nx, other=0.0).to(COMPUTE).to(tl.float64))
        b_gam = b_lam * b_dt
        b_u = b_gam + tl.where(m_nx, (1.0 - b_lam_nx) * b_dt_nx, 0.0)    # gamma_t + delta_{t+1}
        tl.store(gam_ptr + o_row + o_t, b_gam.to(COMPUTE), mask=m_t)
        tl.store(u_ptr + o_row + o_t, b_u.to(COMPUTE), mask=m_t)
        # the angle: a cumulative sum over the tile from the carried angle, reduced mod 2 pi
        o_r = (b64 * l + o_t) * h + i_h                                 # (b, l, h) rows
        m_ta = m_t[:, None] & m_ang[None, :]
        b_raw = tl.load(ang_ptr + o_r[:, None] * n_ang + o_a[None, :], mask=m_ta, other=0.0).to(COMPUTE)
        b_inc = tl.where(m_ta, PI * tanh64(b_raw.to(tl.float64)) * b_dt[:, None], 0.0)
        b_th = carry[None, :] + tl.cumsum(b_inc, axis=0)                # padding adds 0
        b_th = b_th - TWO_PI * tl.floor(b_th / TWO_PI)                   # into [0, 2 pi)
        carry = tl.sum(tl.where(last, b_th, 0.0), axis=0)
        tl.store(theta_ptr + o_r[:, None] * n_ang + o_a[None, :], b_th.to(COMPUTE), mask=m_ta)
        b_c = tl.cos(b_th).to(COMPUTE)
        b_s = tl.sin(b_th).to(COMPUTE)
        # bias first, then rotate
        m_tp = m_t[:, None] & m_pair[None, :]
        o_qk = ((b64 * l + o_t) * h_qk + g64)[:, None] * n + o_e[None, :]
        o_out = o_r[:, None] * n + o_e[None, :]
        x0 = tl.load(Q_ptr + o_qk, mask=m_tp, other=0.0).to(COMPUTE) + qb0[None, :]
        x1 = tl.load(Q_ptr + o_qk + 1, mask=m_tp, other=0.0).to(COMPUTE) + qb1[None, :]
        tl.store(qr_ptr + o_out, tl.where(m_ang[None, :], x0 * b_c - x1 * b_s, x0), mask=m_tp)
        tl.store(qr_ptr + o_out + 1, tl.where(m_ang[None, :], x0 * b_s + x1 * b_c, x1), mask=m_tp)
        x0 = tl.load(K_ptr + o_qk, mask=m_tp, other=0.0).to(COMPUTE) + kb0[None, :]
        x1 = tl.load(K_ptr + o_qk + 1, mask=m_tp, other=0.0).to(COMPUTE) + kb1[None, :]
        tl.store(kr_ptr + o_out, tl.where(m_ang[None, :], x0 * b_c - x1 * b_s, x0), mask=m_tp)
        tl.store(kr_ptr + o_out + 1, tl.where(m_ang[None, :], x0 * b_s + x1 * b_c, x1), mask=m_tp)
    tl.store(angle_ptr + tl.cast(i_bh, tl.int64) * n_ang + o_a, carry.to(COMPUTE), mask=m_ang)


# ---------------------------------------------------------------------------------------------
# 4. Chunk scan: y for a (BLOCK_M positions, BLOCK_P) tile of one chunk
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=_NS)
def chunk_scan_kernel(
    qr_ptr, kr_ptr, v_ptr, z_ptr, D_ptr, u_ptr, gam_ptr, cs_ptr, cs_lo_ptr, states_ptr, out_ptr, ypre_ptr,
    h, l, Q, p, n, nc,
    COMPENSATED: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SAVE_Y: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # q~, k~ (b, l, h, n), v, z, out, ypre (b, l, h, p) contiguous; u, gamma (b, h, l); cs (b, h, l)
    # float64; states (b, nc, h, p, n): each chunk's start state H_c
    i_c, i_bh, i_mp = tl.program_id(0) % nc, tl.program_id(0) // nc, tl.program_id(1)
    i_h = i_bh % h
    b64 = tl.cast(i_bh // h, tl.int64)
    n_pb = tl.cdiv(p, BLOCK_P)
    i_m = i_mp // n_pb
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)                          # positions in the chunk
    o_p = (i_mp % n_pb) * BLOCK_P + tl.arange(0, BLOCK_P)
    m_p = o_p < p
    t_start = tl.cast(i_c, tl.int64) * Q
    clen = tl.minimum(l - t_start, Q)
    m_m = o_m < clen
    o_row = tl.cast(i_bh, tl.int64) * l + t_start
    r_m = (b64 * l + t_start + o_m) * h + i_h                           # (b, l, h) rows of the targets
    b_cs_m = tl.load(cs_ptr + o_row + o_m, mask=m_m, other=0.0)          # float64
    b_lo_m = tl.load(cs_lo_ptr + o_row + o_m, mask=m_m, other=0.0) if COMPENSATED else 0.0
    b_gam_m = tl.load(gam_ptr + o_row + o_m, mask=m_m, other=0.0)

    # y_t = exp(cs_t) q~_t . H_c
    p_h = states_ptr + ((b64 * nc + i_c) * h + i_h) * p * n + o_p[:, None] * n
    acc = tl.zeros([BLOCK_M, BLOCK_P], dtype=COMPUTE)
    for n0 in range(0, n, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < n
        b_q = tl.load(qr_ptr + r_m[:, None] * n + o_n[None, :], mask=m_m[:, None] & m_n[None, :], other=0.0)
        b_hc = tl.load(p_h + o_n[None, :], mask=m_p[:, None] & m_n[None, :], other=0.0)
        acc += tl.dot(b_q, tl.trans(b_hc), input_precision=DOT_PRECISION)
    acc = acc * tl.where(m_m, tl.exp(tl.where(m_m, b_cs_m, 0.0)).to(COMPUTE), 0.0)[:, None]

    # + sum_{s <= t} W_ts (q~_t . k~_s) v_s, over the source blocks up to the diagonal
    k_end = tl.minimum((i_m + 1) * BLOCK_M, clen)
    for k0 in range(0, k_end, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < clen
        r_k = (b64 * l + t_start + o_k) * h + i_h
        b_qk = tl.zeros([BLOCK_M, BLOCK_K], dtype=COMPUTE)
        for n0 in range(0, n, BLOCK_N):
            o_n = n0 + tl.arange(0, BLOCK_N)
            m_n = o_n < n
            b_q = tl.load(qr_ptr + r_m[:, None] * n + o_n[None, :], mask=m_m[:, None] & m_n[None, :], other=0.0)
            b_k = tl.load(kr_ptr + r_k[:, None] * n + o_n[None, :], mask=m_k[:, None] & m_n[None, :], other=0.0)
            b_qk += tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)
        b_cs_k = tl.load(cs_ptr + o_row + o_k, mask=m_k, other=0.0)
        b_lo_k = tl.load(cs_lo_ptr + o_row + o_k, mask=m_k, other=0.0) if COMPENSATED else 0.0
        b_u_k = tl.load(u_ptr + o_row + o_k, mask=m_k, other=0.0)
        valid = m_m[:, None] & m_k[None, :]
        later = (o_m[:, None] > o_k[None, :]) & valid
        same = (o_m[:, None] == o_k[None, :]) & valid
        b_seg = tl.where(later, segment(b_cs_m[:, None], b_lo_m[:, None] if COMPENSATED else 0.0, b_cs_k[None, :],
                                        b_lo_k[None, :] if COMPENSATED else 0.0, COMPENSATED), 0.0)
        b_W = tl.where(later, tl.exp(b_seg).to(COMPUTE) * b_u_k[None, :], tl.where(same, b_gam_m[:, None], 0.0))
        b_v = tl.load(v_ptr + r_k[:, None] * p + o_p[None, :], mask=m_k[:, None] & m_p[None, :], other=0.0).to(COMPUTE)
        # a select, not b_W's zeros: q~_t . k~_s is NaN for every t when k~_s is not finite
        acc += tl.dot(tl.where(later | same, b_qk * b_W, 0.0), b_v, input_precision=DOT_PRECISION)

    # + D v_t; out = y silu(z)
    m_mp = m_m[:, None] & m_p[None, :]
    o_out = r_m[:, None] * p + o_p[None, :]
    if HAS_D:
        acc += tl.load(D_ptr + i_h).to(COMPUTE) * tl.load(v_ptr + o_out, mask=m_mp, other=0.0).to(COMPUTE)
    if SAVE_Y:
        tl.store(ypre_ptr + o_out, acc, mask=m_mp)
    if HAS_Z:
        acc = acc * silu(tl.load(z_ptr + o_out, mask=m_mp, other=0.0).to(COMPUTE).to(tl.float64)).to(COMPUTE)
    tl.store(out_ptr + o_out, acc.to(out_ptr.dtype.element_ty), mask=m_mp)


# ---------------------------------------------------------------------------------------------
# Backward: one kernel per block of positions of a chunk (after Mamba-2's reverse state pass)
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=_NS)
def chunk_bwd_kernel(
    qr_ptr, kr_ptr, v_ptr, u_ptr, gam_ptr, cs_ptr, cs_lo_ptr, g_ptr, states_ptr, dS_ptr,
    dv_ptr, dk_ptr, dq_ptr, du_ptr, dgam_ptr, dcs_ptr, dend_ptr, rpart_ptr,
    h, l, Q, p, n, nc, n_mb,
    COMPENSATED: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program per (chunk x batch x head, block J of BLOCK positions of the chunk), whole (p, n).
    # g = dL/dy (before D and the gate); dS = dL/dH_{c+1}; H_c the chunk's start state;
    # w_s = exp(cs_end - cs_s) u_s; W_ts = exp(cs_t - cs_s) u_s (s < t), gamma_t (s = t);
    # P_ts = q~_t . k~_s; G_ts = g_t . v_s.
    #   as sources s in J, from S_c = sum_s w_s v_s k~_s^T:
    #       U = dS k~_s;  dv_s = w_s U;  dk~_s = w_s dS^T v_s;  dw = v_s . U
    #       du_s += exp(cs_end - cs_s) dw;  d cs_s -= w_s dw;  d cs_end += w_s dw (dend)
    #     from y_t = sum_{s <= t} W_ts P_ts v_s, over targets t >= s:
    #       dv_s += sum_t W_ts P_ts g_t;  dk~_s += sum_t W_ts G_ts q~_t
    #       du_s += sum_{t > s} exp(cs_t - cs_s) P_ts G_ts;  d gamma_s += P_ss G_ss
    #       with T_ts = W_ts P_ts G_ts (t > s): d cs_s -= sum_t T_ts;  d cs_t += T_ts (rpart)
    #   as targets t in J, from y_t = exp(cs_t) H_c q~_t + sum_{s <= t} ...:
    #       dq~_t = exp(cs_t) H_c^T g_t + sum_{s <= t} W_ts G_ts k~_s;  d cs_t += exp(cs_t) g_t . H_c q~_t
    # Each T_ts is formed once, in the program of s's block, and both its row and column sums are
    # taken from it in float64, so that the reverse cumsum of d cs cancels the pairs that do not
    # span a position to float64 rounding (the reason is in impls/ssd/triton.py's chunk_bwd_kernel).
    # Outputs: dv (b, l, h, p); dk~, dq~ (b, l, h, n); du, d gamma (b, h, l); d cs (b, h, l) float64;
    # dend (b, h, nc, n_mb) partial sums for the chunk's last position; rpart (b, h, nc, n_mb, Q).
    i_c, i_bh, i_m = tl.program_id(0) % nc, tl.program_id(0) // nc, tl.program_id(1)
    i_h = i_bh % h
    b64 = tl.cast(i_bh // h, tl.int64)
    o_p = tl.arange(0, BLOCK_P)
    o_n = tl.arange(0, BLOCK_N)
    m_p, m_n = o_p < p, o_n < n
    m_pn = m_p[:, None] & m_n[None, :]
    t_start = tl.cast(i_c, tl.int64) * Q
    clen = tl.minimum(l - t_start, Q)
    o_row = tl.cast(i_bh, tl.int64) * l + t_start
    o_state = ((b64 * nc + i_c) * h + i_h) * p * n + o_p[:, None] * n + o_n[None, :]
    b_S = tl.load(dS_ptr + o_state, mask=m_pn, other=0.0)            # dL/dH_{c+1} (BLOCK_P, BLOCK_N)
    b_hc = tl.load(states_ptr + o_state, mask=m_pn, other=0.0)       # H_c

    o_j = i_m * BLOCK + tl.arange(0, BLOCK)
    m_j = o_j < clen
    r_j = (b64 * l + t_start + o_j) * h + i_h
    m_jp, m_jn = m_j[:, None] & m_p[None, :], m_j[:, None] & m_n[None, :]
    cs_end = tl.load(cs_ptr + o_row + clen - 1)
    cs_end_lo = tl.load(cs_lo_ptr + o_row + clen - 1) if COMPENSATED else 0.0
    b_cs_j = tl.load(cs_ptr + o_row + o_j, mask=m_j, other=0.0)
    b_lo_j = tl.load(cs_lo_ptr + o_row + o_j, mask=m_j, other=0.0) if COMPENSATED else 0.0
    b_u_j = tl.load(u_ptr + o_row + o_j, mask=m_j, other=0.0)
    b_gam_j = tl.load(gam_ptr + o_row + o_j, mask=m_j, other=0.0)
    b_v_j = tl.load(v_ptr + r_j[:, None] * p + o_p[None, :], mask=m_jp, other=0.0).to(COMPUTE)
    b_k_j = tl.load(kr_ptr + r_j[:, None] * n + o_n[None, :], mask=m_jn, other=0.0)
    b_q_j = tl.load(qr_ptr + r_j[:, None] * n + o_n[None, :], mask=m_jn, other=0.0)
    b_g_j = tl.load(g_ptr + r_j[:, None] * p + o_p[None, :], mask=m_jp, other=0.0)

    # sources, through the chunk's end state
    b_seg_end = tl.where(m_j, segment(cs_end, cs_end_lo, b_cs_j, b_lo_j, COMPENSATED), 0.0)
    b_decay_end = tl.where(m_j, tl.exp(b_seg_end).to(COMPUTE), 0.0)
    b_w = b_decay_end * b_u_j
    b_U = tl.dot(b_k_j, tl.trans(b_S), input_precision=DOT_PRECISION)            # (BLOCK, BLOCK_P)
    b_dv = b_U * b_w[:, None]
    b_dw = tl.sum(b_v_j * b_U, axis=1)
    b_dk = tl.dot(b_v_j, b_S, input_precision=DOT_PRECISION) * b_w[:, None]      # (BLOCK, BLOCK_N)
    b_du = b_decay_end * b_dw
    b_dgam = tl.zeros([BLOCK], dtype=COMPUTE)
    # d cs only from segments of at least one token (the last token reaches the end state undecayed)
    b_V = tl.where(o_j < clen - 1, b_w * b_dw, 0.0).to(tl.float64)
    b_dcs = -b_V
    tl.store(dend_ptr + (tl.cast(i_bh, tl.int64) * nc + i_c) * n_mb + i_m, tl.sum(b_V))
    p_r = rpart_ptr + ((tl.cast(i_bh, tl.int64) * nc + i_c) * n_mb + i_m) * Q

    # sources, through the outputs of the chunk's tokens t >= s
    for i0 in range(i_m * BLOCK, clen, BLOCK):
        o_i = i0 + tl.arange(0, BLOCK)
        m_i = o_i < clen
        r_i = (b64 * l + t_start + o_i) * h + i_h
        b_q_i = tl.load(qr_ptr + r_i[:, None] * n + o_n[None, :], mask=m_i[:, None] & m_n[None, :], other=0.0)
        b_g_i = tl.load(g_ptr + r_i[:, None] * p + o_p[None, :], mask=m_i[:, None] & m_p[None, :], other=0.0)
        b_cs_i = tl.load(cs_ptr + o_row + o_i, mask=m_i, other=0.0)
        b_lo_i = tl.load(cs_lo_ptr + o_row + o_i, mask=m_i, other=0.0) if COMPENSATED else 0.0
        valid = m_j[:, None] & m_i[None, :]
        later = (o_i[None, :] > o_j[:, None]) & valid                                  # (s, t): t > s
        same = (o_i[None, :] == o_j[:, None]) & valid
        b_seg = tl.where(later, segment(b_cs_i[None, :], b_lo_i[None, :] if COMPENSATED else 0.0, b_cs_j[:, None],
                                        b_lo_j[:, None] if COMPENSATED else 0.0, COMPENSATED), 0.0)
        b_L = tl.where(later, tl.exp(b_seg).to(COMPUTE), 0.0)
        b_W = tl.where(later, b_L * b_u_j[:, None], tl.where(same, b_gam_j[:, None], 0.0))
        b_P = tl.dot(b_k_j, tl.trans(b_q_i), input_precision=DOT_PRECISION)            # (s, t): q~_t . k~_s
        b_G = tl.dot(b_v_j, tl.trans(b_g_i), input_precision=DOT_PRECISION)            # (s, t): g_t . v_s
        b_dv += tl.dot(b_W * b_P, b_g_i, input_precision=DOT_PRECISION)
        b_dk += tl.dot(b_W * b_G, b_q_i, input_precision=DOT_PRECISION)
        b_T = b_P * b_G
        b_du += tl.sum(b_L * b_T, axis=1)
        b_dgam += tl.sum(tl.where(same, b_T, 0.0), axis=1)
        b_Ts = tl.where(later, b_W * b_T, 0.0).to(tl.float64)
        b_dcs -= tl.sum(b_Ts, axis=1)
        tl.store(p_r + o_i, tl.sum(b_Ts, axis=0), mask=m_i)

    # targets t in J: through the start state and the chunk's tokens s <= t
    b_dq = tl.dot(b_g_j, b_hc, input_precision=DOT_PRECISION) * tl.where(m_j, tl.exp(b_cs_j).to(COMPUTE), 0.0)[:, None]
    b_dcs += tl.sum(b_dq * b_q_j, axis=1).to(tl.float64)
    for j0 in range(0, (i_m + 1) * BLOCK, BLOCK):
        o_s = j0 + tl.arange(0, BLOCK)
        m_s = o_s < clen
        r_s = (b64 * l + t_start + o_s) * h + i_h
        b_k_s = tl.load(kr_ptr + r_s[:, None] * n + o_n[None, :], mask=m_s[:, None] & m_n[None, :], other=0.0)
        b_v_s = tl.load(v_ptr + r_s[:, None] * p + o_p[None, :], mask=m_s[:, None] & m_p[None, :], other=0.0).to(COMPUTE)
        b_u_s = tl.load(u_ptr + o_row + o_s, mask=m_s, other=0.0)
        b_cs_s = tl.load(cs_ptr + o_row + o_s, mask=m_s, other=0.0)
        b_lo_s = tl.load(cs_lo_ptr + o_row + o_s, mask=m_s, other=0.0) if COMPENSATED else 0.0
        valid = m_j[:, None] & m_s[None, :]
        later = (o_j[:, None] > o_s[None, :]) & valid                                  # (t, s): t > s
        same = (o_j[:, None] == o_s[None, :]) & valid
        b_seg = tl.where(later, segment(b_cs_j[:, None], b_lo_j[:, None] if COMPENSATED else 0.0, b_cs_s[None, :],
                                        b_lo_s[None, :] if COMPENSATED else 0.0, COMPENSATED), 0.0)
        b_W = tl.where(later, tl.exp(b_seg).to(COMPUTE) * b_u_s[None, :], tl.where(same, b_gam_j[:, None], 0.0))
        b_G = tl.dot(b_g_j, tl.trans(b_v_s), input_precision=DOT_PRECISION)            # (t, s)
        b_dq += tl.dot(b_W * b_G, b_k_s, input_precision=DOT_PRECISION)

    tl.store(dv_ptr + r_j[:, None] * p + o_p[None, :], b_dv, mask=m_jp)
    tl.store(dk_ptr + r_j[:, None] * n + o_n[None, :], b_dk, mask=m_jn)
    tl.store(dq_ptr + r_j[:, None] * n + o_n[None, :], b_dq, mask=m_jn)
    tl.store(du_ptr + o_row + o_j, b_du, mask=m_j)
    tl.store(dgam_ptr + o_row + o_j, b_dgam, mask=m_j)
    tl.store(dcs_ptr + o_row + o_j, b_dcs, mask=m_j)


# ---------------------------------------------------------------------------------------------
# The decoding step: one token. One program per (batch row, head) holds that head's whole state
# and loops over tiles of p, so that it reads every old value it needs before it writes a new one
# (in place, with state_batch_indices): no tile size is assumed of p or n. No autotuning (it would
# apply the in-place update once per configuration).
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["h", "p", "n", "n_ang", "hpg", "s_ab", "s_ah", "s_aa", "s_hb", "s_hh", "s_hp",
                                "s_hn", "s_kb", "s_kh", "s_kn", "s_vb", "s_vh", "s_vp", "s_Ab", "s_Ah", "s_Aa",
                                "s_Hb", "s_Hh", "s_Hp", "s_Hn", "s_Kb", "s_Kh", "s_Kn", "s_Vb", "s_Vh", "s_Vp"])
def step_kernel(
    q_ptr, k_ptr, v_ptr, adt_ptr, dt_ptr, trap_ptr, qb_ptr, kb_ptr, ang_ptr, D_ptr, z_ptr, consts_ptr, idx_ptr,
    angle_in_ptr, ssm_in_ptr, k_in_ptr, v_in_ptr, angle_out_ptr, ssm_out_ptr, k_out_ptr, v_out_ptr, y_ptr,
    h, p, n, n_ang, hpg,
    s_ab, s_ah, s_aa, s_hb, s_hh, s_hp, s_hn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vp,
    s_Ab, s_Ah, s_Aa, s_Hb, s_Hh, s_Hp, s_Hn, s_Kb, s_Kh, s_Kn, s_Vb, s_Vh, s_Vp,
    HAS_STATE: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_IDX: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr,
):
    # Inputs contiguous: q, k (b, h_qk, n); v, z (b, h, p); adt, dt, trap (b, h); angles (b, h, n_ang).
    # States through strides (lower-case s_: read, upper-case s_: written), in the compute dtype.
    # The rotation is laid out over n: element j pairs with j ^ 1, both rotated by theta_{j // 2}.
    i_bh = tl.program_id(0)
    i_b, i_h = i_bh // h, i_bh % h
    b64, h64 = tl.cast(i_b, tl.int64), tl.cast(i_h, tl.int64)
    g64 = tl.cast(i_h // hpg, tl.int64)
    h_qk = h // hpg
    o_n = tl.arange(0, BLOCK_N)
    m_n = o_n < n
    o_a = o_n // 2
    m_rot = m_n & (o_a < n_ang)
    odd = (o_n % 2) == 1
    o_pt = tl.where(odd, o_n - 1, o_n + 1)                              # the other element of the pair
    n64, a64 = tl.cast(o_n, tl.int64), tl.cast(o_a, tl.int64)
    if HAS_IDX:
        slot = tl.load(idx_ptr + i_b).to(tl.int64)       # state_batch_indices: a negative slot is padding
    else:
        slot = b64
    if slot < 0:
        for p0 in range(0, p, BLOCK_P):
            o_p = p0 + tl.arange(0, BLOCK_P)
            tl.store(y_ptr + (b64 * h + i_h) * p + o_p, tl.zeros([BLOCK_P], dtype=COMPUTE).to(y_ptr.dtype.element_ty),
                     mask=o_p < p)
    else:
        PI = tl.load(consts_ptr)
        TWO_PI = tl.load(consts_ptr + 1)
        o_bh = b64 * h + i_h
        b_dt = tl.load(dt_ptr + o_bh).to(COMPUTE).to(tl.float64)
        b_lam = sigmoid(tl.load(trap_ptr + o_bh).to(COMPUTE).to(tl.float64))
        b_alpha = tl.exp(tl.load(adt_ptr + o_bh).to(COMPUTE).to(tl.float64)).to(COMPUTE)
        b_gam = (b_lam * b_dt).to(COMPUTE)
        b_delta = ((1.0 - b_lam) * b_dt).to(COMPUTE)
        # the angle and the rotated q~, k~ (bias first)
        if HAS_STATE:
            b_a0 = tl.load(angle_in_ptr + slot * s_ab + h64 * s_ah + a64 * s_aa, mask=m_rot, other=0.0).to(tl.float64)
            b_kp = tl.load(k_in_ptr + slot * s_kb + h64 * s_kh + n64 * s_kn, mask=m_n, other=0.0).to(COMPUTE)
        else:
            b_a0 = tl.zeros([BLOCK_N], dtype=tl.float64)
            b_kp = tl.zeros([BLOCK_N], dtype=COMPUTE)
        b_raw = tl.load(ang_ptr + o_bh * n_ang + a64, mask=m_rot, other=0.0).to(COMPUTE).to(tl.float64)
        b_th = tl.where(m_rot, b_a0 + PI * tanh64(b_raw) * b_dt, 0.0)
        b_th = b_th - TWO_PI * tl.floor(b_th / TWO_PI)                   # into [0, 2 pi)
        b_c = tl.cos(b_th).to(COMPUTE)
        b_s = tl.sin(b_th).to(COMPUTE)
        o_qk = (b64 * h_qk + g64) * n
        x = tl.load(q_ptr + o_qk + o_n, mask=m_n, other=0.0).to(COMPUTE) + tl.load(qb_ptr + h64 * n + o_n, mask=m_n, other=0.0).to(COMPUTE)
        xp = tl.load(q_ptr + o_qk + o_pt, mask=m_n, other=0.0).to(COMPUTE) + tl.load(qb_ptr + h64 * n + o_pt, mask=m_n, other=0.0).to(COMPUTE)
        b_q = tl.where(m_rot, tl.where(odd, xp * b_s + x * b_c, x * b_c - xp * b_s), x)
        x = tl.load(k_ptr + o_qk + o_n, mask=m_n, other=0.0).to(COMPUTE) + tl.load(kb_ptr + h64 * n + o_n, mask=m_n, other=0.0).to(COMPUTE)
        xp = tl.load(k_ptr + o_qk + o_pt, mask=m_n, other=0.0).to(COMPUTE) + tl.load(kb_ptr + h64 * n + o_pt, mask=m_n, other=0.0).to(COMPUTE)
        b_k = tl.where(m_rot, tl.where(odd, xp * b_s + x * b_c, x * b_c - xp * b_s), x)
        if HAS_D:
            b_D = tl.load(D_ptr + i_h).to(COMPUTE)
        for p0 in range(0, p, BLOCK_P):
            o_p = p0 + tl.arange(0, BLOCK_P)
            m_p = o_p < p
            p64 = tl.cast(o_p, tl.int64)
            m_pn = m_p[:, None] & m_n[None, :]
            b_v = tl.load(v_ptr + o_bh * p + o_p, mask=m_p, other=0.0).to(COMPUTE)
            if HAS_STATE:
                b_vp = tl.load(v_in_ptr + slot * s_vb + h64 * s_vh + p64 * s_vp, mask=m_p, other=0.0).to(COMPUTE)
                b_h = tl.load(ssm_in_ptr + slot * s_hb + h64 * s_hh + p64[:, None] * s_hp + n64[None, :] * s_hn,
                              mask=m_pn, other=0.0).to(COMPUTE)
            else:
                b_vp = tl.zeros([BLOCK_P], dtype=COMPUTE)
                b_h = tl.zeros([BLOCK_P, BLOCK_N], dtype=COMPUTE)
            # every lane has read its old values before any lane writes in place (the layouts of a
            # load and of a store need not give one element to one thread)
            tl.debug_barrier()
            # h_t = alpha (h_{t-1} + delta v_{t-1} k~_{t-1}^T) + gamma v_t k~_t^T
            b_h = b_alpha * (b_h + b_delta * (b_vp[:, None] * b_kp[None, :])) + b_gam * (b_v[:, None] * b_k[None, :])
            tl.store(ssm_out_ptr + slot * s_Hb + h64 * s_Hh + p64[:, None] * s_Hp + n64[None, :] * s_Hn, b_h, mask=m_pn)
            tl.store(v_out_ptr + slot * s_Vb + h64 * s_Vh + p64 * s_Vp, b_v, mask=m_p)
            b_y = tl.sum(tl.where(m_pn, b_h * b_q[None, :], 0.0), axis=1)
            if HAS_D:
                b_y += b_D * b_v
            if HAS_Z:
                b_y = b_y * silu(tl.load(z_ptr + o_bh * p + o_p, mask=m_p, other=0.0).to(COMPUTE).to(tl.float64)).to(COMPUTE)
            tl.store(y_ptr + o_bh * p + o_p, b_y.to(y_ptr.dtype.element_ty), mask=m_p)
        # every lane has read the old angle and k state (the odd lanes read their pair's angle)
        # before any lane overwrites them in place
        tl.debug_barrier()
        tl.store(k_out_ptr + slot * s_Kb + h64 * s_Kh + n64 * s_Kn, b_k, mask=m_n)
        tl.store(angle_out_ptr + slot * s_Ab + h64 * s_Ah + a64 * s_Aa, b_th.to(COMPUTE), mask=m_rot & ((o_n % 2) == 0))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def launch_grids(b, l, h, p, n, chunk_size):
    """The launch grid of every kernel at these sizes, as the launchers launch them: computed without
    launching, so a test can check CUDA's grid limits (65,535 on axes 1 and 2) at sizes too large to
    run (l >= 1)."""
    Q = max(1, min(int(chunk_size), l))
    nc = triton.cdiv(l, Q)
    BP, BN = block(p, CONFIG["block_p"]), block(n, CONFIG["block_n"])
    n_blk = triton.cdiv(p * n, min(CONFIG["block_pn"], triton.next_power_of_2(p * n)))
    return dict(
        prep=(b * h,),
        chunk_cumsum=(nc * b, triton.cdiv(h, min(16, triton.next_power_of_2(h)))),
        chunk_state=(nc * b * h, triton.cdiv(p, BP) * triton.cdiv(n, BN)),
        state_pass=(b * h, n_blk),
        chunk_scan=(nc * b * h, triton.cdiv(Q, block(Q, CONFIG["block_m"])) * triton.cdiv(p, BP)),
        state_pass_bwd=(b * h, n_blk),
        chunk_bwd=(nc * b * h, triton.cdiv(Q, block(Q, CONFIG["bwd_block"]))),
        step=(b * h,),
    )


def _consts(device):
    # pi and 2 pi as float64 tensors: a float literal in a kernel is a float32 constant
    return torch.tensor([math.pi, 2 * math.pi], dtype=torch.float64, device=device)


def _forward(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, states, chunk_size, save):
    """Steps 1-4. Returns out (b, l, h, p), the four final states, and what the backward needs."""
    b, l, h, p = V.shape
    h_qk, n = Q.shape[-2:]
    n_ang = Angles.shape[-1]
    f = compute_dtype(V.dtype)
    dev = V.device
    T = tl_dtype(f)
    Qs = max(1, min(int(chunk_size), l))
    nc = triton.cdiv(l, Qs)
    grid = launch_grids(b, l, h, p, n, chunk_size)
    comp = f == torch.float64
    prec = "ieee"
    Q, K, V, DT, Trap, Angles, Q_bias, K_bias = (t.contiguous() for t in (Q, K, V, DT, Trap, Angles, Q_bias, K_bias))
    Z = None if Z is None else Z.contiguous()
    D = None if D is None else D.contiguous()
    angle0 = None if states is None else states[0].contiguous()
    with quiet():
        qr, kr = (torch.empty(b, l, h, n, dtype=f, device=dev) for _ in range(2))
        u, gam = (torch.empty(b, h, l, dtype=f, device=dev) for _ in range(2))
        theta = torch.empty(b, l, h, n_ang, dtype=f, device=dev)
        angle = torch.empty(b, h, n_ang, dtype=f, device=dev)
        prep_kernel[grid["prep"]](
            Q, K, Q_bias, K_bias, Angles, DT, Trap, angle0 if angle0 is not None else DT, _consts(dev),
            qr, kr, u, gam, theta, angle, h, l, n, n_ang, h // h_qk,
            HAS_ANGLE0=angle0 is not None, BLOCK_T=CONFIG["block_t"],
            BLOCK_A=triton.next_power_of_2(max(n // 2, 1)), COMPUTE=T)

        # cs = the cumsum of ADT within each chunk: Mamba-2's kernel with dt = ADT, A = 1, no dt pipeline
        a_c = torch.empty(b, h, l, dtype=f, device=dev)
        cs = torch.empty(b, h, l, dtype=torch.float64, device=dev)
        cs_lo = torch.empty(b, h, l, dtype=torch.float64, device=dev) if comp else cs
        ones = torch.ones(h, dtype=f, device=dev)
        limits = torch.tensor([-math.inf, math.inf], dtype=f, device=dev)
        chunk_cumsum_kernel[grid["chunk_cumsum"]](
            ADT, ones, ones, limits, a_c, cs, cs_lo, h, l, Qs, ADT.stride(0), ADT.stride(2), ADT.stride(1),
            HAS_BIAS=False, SOFTPLUS=False, BLOCK_H=min(16, triton.next_power_of_2(h)),
            BLOCK_T=block(Qs, CONFIG["block_t"]), COMPUTE=T, COMPENSATED=comp)

        chunk = torch.empty(b, nc, h, p, n, dtype=f, device=dev)
        BP, BN = block(p, CONFIG["block_p"]), block(n, CONFIG["block_n"])
        chunk_state_kernel[grid["chunk_state"]](
            V, kr, u, cs, cs_lo, chunk, h, l, Qs, p, n, 1, nc, *V.stride(), *kr.stride(),
            COMPENSATED=comp, FROM_START=False, BLOCK_K=block(Qs, CONFIG["block_k"]), BLOCK_P=BP, BLOCK_N=BN,
            COMPUTE=T, DOT_PRECISION=prec, num_warps=CONFIG["num_warps"])

        h0 = None if states is None else fold_initial_state(states, DT, Trap)
        final = torch.empty(b, h, p, n, dtype=f, device=dev)
        BLOCK = min(CONFIG["block_pn"], triton.next_power_of_2(p * n))
        state_pass_kernel[grid["state_pass"]](
            chunk, cs, h0 if h0 is not None else final, final, h, l, Qs, nc, p * n,
            HAS_H0=h0 is not None, BLOCK=BLOCK, COMPUTE=T)

        out = torch.empty(b, l, h, p, dtype=result_dtype(V.dtype), device=dev)
        ypre = torch.empty(b, l, h, p, dtype=f, device=dev) if save and Z is not None else None
        BM = block(Qs, CONFIG["block_m"])
        chunk_scan_kernel[grid["chunk_scan"]](
            qr, kr, V, Z if Z is not None else V, D if D is not None else ones, u, gam, cs, cs_lo, chunk, out,
            ypre if ypre is not None else out, h, l, Qs, p, n, nc,
            COMPENSATED=comp, HAS_D=D is not None, HAS_Z=Z is not None, SAVE_Y=ypre is not None,
            BLOCK_M=BM, BLOCK_K=BM, BLOCK_P=BP, BLOCK_N=BN, COMPUTE=T, DOT_PRECISION=prec,
            num_warps=CONFIG["num_warps"])
    finals = (angle, final, kr[:, -1].clone(), V[:, -1].to(f, copy=True))
    return out.to(V.dtype), finals, (qr, kr, u, gam, cs, cs_lo, chunk, theta, ypre)


def fold_initial_state(states, DT, Trap):
    """H_0 = h_init + delta_0 v_init k_init^T: the first token's shifted term, folded into the state it
    decays (exp(ADT_0) multiplies both, as in the spec's alpha h + beta v k^T). (b, h, p, n)."""
    _, ssm, k, v = states
    f = ssm.dtype
    delta = (1 - torch.sigmoid(Trap[:, :, 0].to(f))) * DT[:, :, 0].to(f)
    return (ssm + delta[..., None, None] * (v[..., :, None] * k[..., None, :])).contiguous()


def _backward(saved, douts, chunk_size):
    """Gradients of (Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, angle, ssm, k, v)."""
    (Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, angle0, ssm0, k0, v0,
     qr, kr, u, gam, cs, cs_lo, chunk, theta, ypre) = saved
    dout, dangle, dssm, dk_last, dv_last = douts
    b, l, h, p = V.shape
    n = Q.shape[-1]
    f = compute_dtype(V.dtype)
    dev = V.device
    T = tl_dtype(f)
    Qs = max(1, min(int(chunk_size), l))
    nc = triton.cdiv(l, Qs)
    grid = launch_grids(b, l, h, p, n, chunk_size)
    comp = cs_lo is not cs
    prec = "ieee"
    V_f = V.to(f).contiguous()
    # the gate and the skip, elementwise in torch: g = d out silu(z) is the gradient of y
    dout = dout.to(f).contiguous() if dout is not None else torch.zeros(b, l, h, p, dtype=f, device=dev)
    dZ = dD = None
    if Z is not None:
        z_f = Z.to(f).contiguous()
        sig = torch.sigmoid(z_f)
        dZ = (dout * ypre * sig * (1 + z_f * (1 - sig))).to(Z.dtype)
        gy = (dout * F.silu(z_f)).contiguous()
    else:
        gy = dout
    if D is not None:
        dD = (gy * V_f).sum((0, 1, 3)).to(D.dtype)

    with quiet():
        # each chunk's own gradient of its start state: sum_t exp(cs_t) g_t q~_t^T (step 2's kernel)
        dS = torch.empty(b, nc, h, p, n, dtype=f, device=dev)
        BP, BN = block(p, CONFIG["block_p"]), block(n, CONFIG["block_n"])
        chunk_state_kernel[grid["chunk_state"]](
            gy, qr, u, cs, cs_lo, dS, h, l, Qs, p, n, 1, nc, *gy.stride(), *qr.stride(),
            COMPENSATED=comp, FROM_START=True, BLOCK_K=block(Qs, CONFIG["block_k"]), BLOCK_P=BP, BLOCK_N=BN,
            COMPUTE=T, DOT_PRECISION=prec, num_warps=CONFIG["num_warps"])
        BLOCK = min(CONFIG["block_pn"], triton.next_power_of_2(p * n))
        n_blk = triton.cdiv(p * n, BLOCK)
        dh0 = torch.empty(b, h, p, n, dtype=f, device=dev)
        dtot = torch.empty(b, h, nc, n_blk, dtype=f, device=dev)
        dssm = None if dssm is None else dssm.to(f).contiguous()
        state_pass_bwd_kernel[grid["state_pass_bwd"]](
            dS, chunk, cs, dssm if dssm is not None else dh0, dh0, dtot, h, l, Qs, nc, p * n, n_blk,
            HAS_DFINAL=dssm is not None, BLOCK=BLOCK, COMPUTE=T)
        BK = block(Qs, CONFIG["bwd_block"])
        n_mb = triton.cdiv(Qs, BK)
        dv = torch.empty(b, l, h, p, dtype=f, device=dev)
        dk, dq = (torch.empty(b, l, h, n, dtype=f, device=dev) for _ in range(2))
        du, dgam = (torch.empty(b, h, l, dtype=f, device=dev) for _ in range(2))
        dcs = torch.empty(b, h, l, dtype=torch.float64, device=dev)
        dend = torch.empty(b, h, nc, n_mb, dtype=torch.float64, device=dev)
        rpart = torch.zeros(b, h, nc, n_mb, Qs, dtype=torch.float64, device=dev)   # rows before a block stay 0
        chunk_bwd_kernel[grid["chunk_bwd"]](
            qr, kr, V_f, u, gam, cs, cs_lo, gy, chunk, dS, dv, dk, dq, du, dgam, dcs, dend, rpart,
            h, l, Qs, p, n, nc, n_mb,
            COMPENSATED=comp, BLOCK=BK, BLOCK_P=block(p, MAX_PN), BLOCK_N=block(n, MAX_PN), COMPUTE=T,
            DOT_PRECISION=prec, num_warps=CONFIG["bwd_num_warps"])

    # d cs at each chunk's last position also takes the end-state terms; then d ADT_m = sum_{k >= m}
    # d cs_k within the chunk (a reverse cumsum, in float64: it cancels the +T -T pairs)
    pad = nc * Qs - l
    dcs = F.pad(dcs, (0, pad)).view(b, h, nc, Qs) + rpart.sum(3)
    ends = torch.clamp(torch.arange(1, nc + 1, device=dev) * Qs, max=l) - 1 - torch.arange(nc, device=dev) * Qs
    dcs[:, :, torch.arange(nc, device=dev), ends] += dend.sum(-1) + dtot.double().sum(-1)
    dADT = dcs.flip(-1).cumsum(-1).flip(-1).reshape(b, h, nc * Qs)[..., :l].to(ADT.dtype)

    # the final k and v states are the last token's k~ and v
    if dk_last is not None:
        dk[:, -1] += dk_last.to(f)
    dV = dv + (gy * D.to(f)[:, None] if D is not None else 0)
    if dv_last is not None:
        dV[:, -1] += dv_last.to(f)

    # the elementwise prep and the fold of the input states, by torch's autograd on a recomputation
    with torch.enable_grad():
        leaf = lambda t: t.detach().to(f).requires_grad_()
        Qf, Kf, qb, kb, th = leaf(Q), leaf(K), leaf(Q_bias), leaf(K_bias), leaf(theta)
        q_rot = rotate(per_head(Qf, h) + qb, th)
        k_rot = rotate(per_head(Kf, h) + kb, th)
        dQ, dK, dqb, dkb, dth = torch.autograd.grad((q_rot, k_rot), (Qf, Kf, qb, kb, th), (dq, dk), allow_unused=True)
        dth = torch.zeros_like(theta) if dth is None else dth
        if dangle is not None:
            dth[:, -1] += dangle.to(f)
        # theta_t = theta_init + sum_{s <= t} inc_s (mod 2 pi): d inc_s = sum_{t >= s} d theta_t
        dinc = dth.flip(1).cumsum(1).flip(1)
        DTf, Trapf, Af = leaf(DT), leaf(Trap), leaf(Angles)
        lam = torch.sigmoid(Trapf)
        gam_r = lam * DTf
        delta = (1 - lam) * DTf
        u_r = gam_r + F.pad(delta[..., 1:], (0, 1))
        inc = math.pi * torch.tanh(Af) * DTf.transpose(1, 2)[..., None]
        outs, grads, wrt = [u_r, gam_r, inc], [du, dgam, dinc], [DTf, Trapf, Af]
        if ssm0 is not None:
            s_leaves = [leaf(ssm0), leaf(k0), leaf(v0)]
            outs.append(fold_initial_state((None, *s_leaves), DTf, Trapf))
            grads.append(dh0)
            wrt += s_leaves
        res = torch.autograd.grad(outs, wrt, grads, allow_unused=True)
    zero_if_none = lambda g, like: torch.zeros_like(like, dtype=f) if g is None else g
    dDT, dTrap, dAngles = (zero_if_none(g, x) for g, x in zip(res[:3], (DT, Trap, Angles)))
    dstates = (None,) * 4
    if ssm0 is not None:
        dstates = (dinc[:, 0].to(angle0.dtype) if l else torch.zeros_like(angle0), res[3].to(ssm0.dtype),
                   res[4].to(k0.dtype), res[5].to(v0.dtype))
    as_ = lambda g, x: None if g is None else g.to(x.dtype)
    return (as_(zero_if_none(dQ, Q), Q), as_(zero_if_none(dK, K), K), dV.to(V.dtype), dADT, dDT.to(DT.dtype),
            dTrap.to(Trap.dtype), as_(zero_if_none(dqb, Q_bias), Q_bias), as_(zero_if_none(dkb, K_bias), K_bias),
            dAngles.to(Angles.dtype), dD, dZ, *dstates)


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------

class _Mamba3Scan(torch.autograd.Function):
    """Forward saves the inputs, q~, k~, u, gamma, the cumsum, the chunk start states and the angles;
    backward runs the reverse kernels and torch's autograd for the elementwise prep."""

    @staticmethod
    def forward(ctx, Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, angle0, ssm0, k0, v0, chunk_size):
        states = None if ssm0 is None else (angle0, ssm0, k0, v0)
        out, finals, (qr, kr, u, gam, cs, cs_lo, chunk, theta, ypre) = _forward(
            Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, states, chunk_size, save=True)
        ctx.save_for_backward(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, angle0, ssm0, k0, v0,
                              qr, kr, u, gam, cs, cs_lo if cs_lo is not cs else None, chunk, theta, ypre)
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        return (out, *finals)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dangle, dssm, dk, dv):
        saved = list(ctx.saved_tensors)
        if saved[20] is None:          # no compensated cumsum (float32 compute): cs_lo is cs
            saved[20] = saved[19]
        return (*_backward(saved, (dout, dangle, dssm, dk, dv), ctx.chunk_size), None)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------

def mamba3_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None,
                chunk_size=64, return_final_states=False, cu_seqlens=None):
    """Mamba-3 SISO scan by the chunked Triton kernels (forward, and backward through autograd).

    Args:
        Q, K: (b, l, h_qk, n), n even; V: (b, l, h, p); Z: (b, l, h, p) optional
        ADT, DT, Trap: (b, h, l); Q_bias, K_bias: (h, n); Angles: (b, l, h, n_ang); D: (h,) optional
        Input_States: (angle (b, h, n_ang), ssm (b, h, p, n), k (b, h, n), v (b, h, p)) or None
        chunk_size: any positive integer; return_final_states: bool
        cu_seqlens: must be None (packed sequences are a declared gap)
    Returns:
        out (b, l, h, p) in V's dtype; with return_final_states, (out, angle, ssm, k, v), the states
        in the compute dtype, on V's device
    Raises:
        NotImplementedError: cu_seqlens, or p or n above MAX_PN
    """
    if cu_seqlens is not None:
        raise NotImplementedError("triton mamba3_scan: packed sequences (cu_seqlens) are not supported (a declared gap)")
    b, l, h, p = V.shape
    n, n_ang = Q.shape[-1], Angles.shape[-1]
    f = compute_dtype(V.dtype)
    check_tile_limits("mamba3_scan", "the Triton Mamba-3 kernels", p, n)
    states = None if Input_States is None else tuple(Input_States)
    if l == 0 or b == 0 or h == 0:
        finals = (zero_states(b, h, p, n, n_ang, f, V.device) if states is None else tuple(s.to(f) for s in states))
        out = V.new_zeros(b, l, h, p)
        return (out, *finals) if return_final_states else out
    if p == 0:   # no output and no ssm state to launch a kernel for; the angle and k states still advance
        return chunked.mamba3_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, states, chunk_size,
                                   return_final_states)
    inputs = (Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, *(states or (None,) * 4))
    if host_tensors_on_a_gpu_machine(V):
        moved = [None if t is None else t.to("cuda") for t in inputs]
        res = mamba3_scan(*moved[:11], None if states is None else tuple(moved[11:]), chunk_size, True)
        res = tuple(r.to(V.device) for r in res)
        return res if return_final_states else res[0]
    # A non-finite V would reach the earlier outputs of its chunk through 0 x inf in tl.dot: the
    # kernels run on V with its non-finite entries zeroed, and what they reach is restored after,
    # as the spec has it: from a channel's first non-finite token on, its outputs and its row of the
    # ssm state are NaN (a NaN or inf in v_s k~_s^T makes that row non-finite for good), and the v
    # state is V's last token as it is. A finite sum that overflows only takes this slower path.
    seen = None
    if not bool(torch.isfinite(V.sum())):
        bad = ~torch.isfinite(V)
        seen = bad.cumsum(1) > 0                                            # (b, l, h, p)
        inputs = (*inputs[:2], torch.where(bad, torch.zeros((), dtype=V.dtype, device=V.device), V), *inputs[3:])
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        res = _Mamba3Scan.apply(*inputs, int(chunk_size))
    else:
        out, finals, _ = _forward(*inputs[:11], states, int(chunk_size), save=False)
        res = (out, *finals)
    if seen is not None:
        out, angle, ssm, k, v = res
        res = (torch.where(seen, math.nan, out), angle, torch.where(seen[:, -1, ..., None], math.nan, ssm), k,
               torch.where(bad[:, -1], V[:, -1].to(v.dtype), v))
    return res if return_final_states else res[0]


def mamba3_state_update(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None,
                        state_batch_indices=None):
    """One Mamba-3 SISO token by the Triton step kernel (the official ``mamba3_siso_step``'s interface).

    Args:
        Q, K: (b, h_qk, n); V, Z: (b, h, p) (Z optional); ADT, DT, Trap: (b, h)
        Q_bias, K_bias: (h, n); Angles: (b, h, n_ang), any n_ang <= n / 2; D: (h,) optional
        Input_States: (angle (S, h, n_ang), ssm (S, h, p, n), k (S, h, n), v (S, h, p)) in the compute
            dtype, any strides, or None (zeros). Without state_batch_indices, S = b and they are only read.
        state_batch_indices: (b,) int or None. Given, Input_States is a cache of S slots: row i reads
            and writes slot state_batch_indices[i] in place; a negative index marks a padding row,
            whose output is zeros and which touches no slot.
    Returns:
        (out (b, h, p) in V's dtype, (angle, ssm, k, v)): new state tensors (b, h, ...) in the compute
        dtype; with state_batch_indices, the cache tensors themselves, updated
    """
    b, h, p = V.shape
    h_qk, n = Q.shape[-2:]
    n_ang = Angles.shape[-1]
    f = compute_dtype(V.dtype)
    check_tile_limits("mamba3_state_update", "the Triton Mamba-3 kernels", p, n)
    if host_tensors_on_a_gpu_machine(V):
        moved = [None if t is None else t.to("cuda")
                 for t in (Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, state_batch_indices)]
        on_gpu = None if Input_States is None else tuple(s.to("cuda") for s in Input_States)
        y, new = mamba3_state_update(*moved[:11], on_gpu, moved[11])
        if state_batch_indices is not None:
            for cache, s in zip(Input_States, new):
                cache.copy_(s)
            return y.to(V.device), tuple(Input_States)
        return y.to(V.device), tuple(s.to(V.device) for s in new)
    dev = V.device
    Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles = (t.contiguous() for t in (Q, K, V, ADT, DT, Trap, Q_bias, K_bias,
                                                                               Angles))
    Z = None if Z is None else Z.contiguous()
    if state_batch_indices is not None:
        ins = outs = tuple(Input_States)
    else:
        ins = Input_States
        outs = tuple(torch.empty(s, dtype=f, device=dev) for s in ((b, h, n_ang), (b, h, p, n), (b, h, n), (b, h, p)))
    y = torch.empty(b, h, p, dtype=result_dtype(V.dtype), device=dev)
    if b * h:
        strides = lambda s4: [x for s in s4 for x in s.stride()]
        with quiet():
            step_kernel[launch_grids(b, 1, h, p, n, 1)["step"]](
                Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D if D is not None else DT, Z if Z is not None else V,
                _consts(dev), state_batch_indices if state_batch_indices is not None else DT,
                *(ins if ins is not None else outs), *outs, y, h, p, n, n_ang, h // h_qk,
                *strides(ins if ins is not None else outs), *strides(outs),
                HAS_STATE=ins is not None, HAS_D=D is not None, HAS_Z=Z is not None,
                HAS_IDX=state_batch_indices is not None, BLOCK_P=min(CONFIG["step_block_p"], triton.next_power_of_2(p)),
                BLOCK_N=triton.next_power_of_2(n), COMPUTE=tl_dtype(f), num_warps=1)
    return y.to(V.dtype), tuple(outs)
