"""The Mamba-2 SSD scan (chunked, forward and backward) and its decoding step as Triton kernels.

Same contract as impls/ssd/loop.py (the spec) and impls/ssd/recurrent.py (the step); letters
(b, l, h, p, n, g) are defined in impls/ssd/frontdoor.py. Dtypes: every load is converted to the
compute dtype (float32, float64 for float64 inputs) at once; out comes back in x's dtype and every
state in the compute dtype.

The recurrence (Dao & Gu 2024, eq. 1), per batch row and head, with a_t = dt_t A (a scalar)::

    h_t = exp(a_t) h_{t-1} + dt_t x_t ⊗ B_t          # h: (p, n)
    y_t = h_t C_t + D x_t;  out_t = y_t silu(z_t)

The chunked algorithm (Section 7 / Listing 1 of the paper; the official kernels are
ssd_chunk_state.py, ssd_state_passing.py and ssd_chunk_scan.py in state-spaces/mamba). Time is cut
into chunks of Q = chunk_size tokens; inside a chunk, with cs_i = a_1 + ... + a_i (from the chunk's
start) and L_ij = exp(cs_i - cs_j) for j <= i (0 above the diagonal)::

    1. chunk cumsum   dt = clamp(softplus(dt + dt_bias), dt_limit);  cs = cumsum(dt A) per chunk
    2. chunk states   S_c = sum_j exp(cs_end - cs_j) dt_j x_j ⊗ B_j          # (p, Q) @ (Q, n): tl.dot
    3. state pass     h_0 = initial_states;  h_{c+1} = exp(cs_end) h_c + S_c  # sequential over chunks
    4. chunk scan     y_i = exp(cs_i) h_c C_i                                  # (Q, n) @ (n, p): tl.dot
                          + sum_{j<=i} L_ij (C_i . B_j) dt_j x_j               # (Q, Q) @ (Q, p): tl.dot
                          + D x_i;   out_i = y_i silu(z_i)

The backward runs the same pieces in reverse (derivation in the comments of chunk_bwd_kernel):
g = d out silu(z) is the gradient of y; step 2 with exp(cs_i) g_i ⊗ C_i gives each chunk's own
gradient of its start state, a reverse state pass carries the gradient of every chunk's end state,
and one kernel per block of positions makes dx, dB, dC, and the gradients of dt and of the cumsum,
which torch turns into dA, d dt_bias and d dt (the reverse cumsum and the dt pipeline's chain rule).

Numerics, where this departs from the official kernels on purpose:
  - the cumsum is kept in float64 even for float32 compute: exp(cs_i - cs_j) is taken of a
    difference of two cumsums, and in float32 that difference loses eps |cs_i| (the cumsum's
    magnitude, up to Q |a|) where the loop's own error is eps |cs_i - cs_j|. For float64 compute,
    with no wider type left, the cumsum is compensated (a TwoSum scan keeps each prefix as hi + lo):
    one token with dt = 100 and A = -16 puts |cs| at 1600, and plain float64 differences then cost
    3e-13 relative, 3x the policy's float64 bound (found by the SSD suite's NaN-propagation test);
  - no exp is taken of a segment sum above the diagonal: the segment is replaced by 0 there before
    the exp and the entry by 0 after it (tl.where, never a multiplication by a 0 mask, so an inf
    stays out). The official kernels instead clamp every exponent with exp(min(x, 0)), which
    silently changes the result where A > 0. Here A > 0 grows as the loop does;
  - every padded lane (p, n to the block, positions past l or past the chunk) is loaded as 0 and
    its decay weight set by tl.where: nothing outside the real data reaches a result (the kind of
    the Mamba-1 kernel's padded-lane bug);
  - a NaN or inf in x (or dt) at token j must not reach the outputs of earlier tokens of its chunk,
    not even in their last bit (the loop is the spec: y_i reads no input after i), but in a tl.dot
    the 0 above the diagonal times inf is NaN. Tiles that reach above the diagonal therefore check
    their dt x for non-finite values and, only when there is one, run the same tl.dot with those
    entries set to 0 and add them back as masked products (a rare path that keeps the loop's
    causality bit for bit; summing the whole tile under the mask instead moved earlier outputs by
    an ulp);
  - float32 tl.dot runs with input_precision="ieee": TF32 would cost about 1e-3 relative.

Kernel conventions (after flash-linear-attention, as impls/selective/triton.py): ``p_`` pointers, ``b_``
block values, ``o_`` offsets, ``m_`` masks, ``i_`` program indices, ``s_`` strides. Every offset is
computed in 64 bits: program ids are cast before any multiplication (b l h p past 2^31 elements
wrapped in the official kernels at about 61K tokens, often through views into a wide projection).

Declared limits: packed sequences (seq_idx, cu_seqlens, return_varlen_states) are not implemented
here and raise NotImplementedError. chunk_size may be any positive integer: a chunk longer than l
is the same single chunk as one of l tokens, so Q = min(chunk_size, l). The backward holds a whole
(p, n) state tile per program: p and n up to 256 (MAX_PN); larger raise NotImplementedError.

Devices and Triton's interpreter (which runs these very kernels on the CPU in CI), the elementwise
functions (softplus, silu) and the launcher helpers are shared with the Mamba-1 kernels, in
impls/triton_common.py; its interpreter differences are handled the same way here.
"""

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..frontdoor import compute_dtype
# first: importing it settles TRITON_INTERPRET, which triton reads when it is imported
from ..triton_common import INTERPRETED  # noqa: F401 (the compile tests read it here)
from ..triton_common import (CHUNKED_GPU_CONFIG, CHUNKED_INTERPRETER_CONFIG, MAX_PN, block,
                             check_tile_limits, host_tensors_on_a_gpu_machine, launch_config, quiet, result_dtype,
                             segment, silu, softplus, tl_dtype)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

# Launch configuration: the chunked kernels' (impls/triton_common.py), read at every launch.
CONFIG = launch_config(dict(CHUNKED_GPU_CONFIG), dict(CHUNKED_INTERPRETER_CONFIG))


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

@triton.jit
def _dt_pipeline(dt, bias, lo, hi, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """dt + dt_bias, softplus (threshold 20), clamp to [lo, hi] (NaN stays NaN, as torch.clamp).
    Softplus is evaluated in float64 and rounded: its log1p formula is a few ulp off, which a float32
    final state of one token (dt x B) shows against torch's; it touches (b, l, h) elements only."""
    if HAS_BIAS:
        dt = dt + bias
    if SOFTPLUS:
        dt = softplus(dt.to(tl.float64)).to(dt.dtype)
    return tl.where(dt < lo, lo, tl.where(dt > hi, hi, dt))


@triton.jit
def _nonfinite(v):
    """Whether any element of v is NaN or inf (v * 0 is NaN exactly there)."""
    return tl.max(tl.where(v * 0.0 != 0.0, 1, 0)) > 0


@triton.jit
def _two_sum(a_hi, a_lo, b_hi, b_lo):
    """(a_hi + a_lo) + (b_hi + b_lo) as an unevaluated pair: Knuth's TwoSum keeps the rounding
    error of the high parts in the low part (no multiplications, so FMA contraction cannot break it)."""
    s = a_hi + b_hi
    bb = s - a_hi
    err = (a_hi - (s - bb)) + (b_hi - bb)
    return s, a_lo + b_lo + err


# Sizes and strides are not specialised: one compiled kernel per set of flags and dtypes.
_NS = ["h", "l", "Q", "p", "n", "hpg", "nc"]


# ---------------------------------------------------------------------------------------------
# 1. Chunk cumsum: dt through its pipeline, and cs = cumsum(dt A) within each chunk (float64)
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=_NS + ["s_tb", "s_tl", "s_th"])
def chunk_cumsum_kernel(
    dt_ptr, A_ptr, bias_ptr, limits_ptr, dt_out_ptr, cs_ptr, cs_lo_ptr,
    h, l, Q, s_tb, s_tl, s_th,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr,
    COMPUTE: tl.constexpr, COMPENSATED: tl.constexpr,
):
    # grid (chunks x b, head blocks); outputs dt_out (b, h, l) in COMPUTE, cs (b, h, l) in float64,
    # and with COMPENSATED (float64 compute, where no wider type is left) cs_lo, the rounding error
    # of cs (a TwoSum scan): cs_i - cs_j is then exact to the segment's own rounding
    nc = tl.cdiv(l, Q)
    i_c, i_b, i_hb = tl.program_id(0) % nc, tl.program_id(0) // nc, tl.program_id(1)
    o_h = i_hb * BLOCK_H + tl.arange(0, BLOCK_H)
    m_h = o_h < h
    b_A = tl.load(A_ptr + o_h, mask=m_h, other=0.0).to(COMPUTE).to(tl.float64)
    b_bias = tl.load(bias_ptr + o_h, mask=m_h, other=0.0).to(COMPUTE) if HAS_BIAS else 0.0
    lo = tl.load(limits_ptr).to(COMPUTE)
    hi = tl.load(limits_ptr + 1).to(COMPUTE)
    t_start = tl.cast(i_c, tl.int64) * Q
    o_row = (tl.cast(i_b, tl.int64) * h + o_h) * l                     # (b, h, l) rows
    carry = tl.zeros([BLOCK_H], dtype=tl.float64)
    carry_lo = tl.zeros([BLOCK_H], dtype=tl.float64)
    for t0 in range(0, Q, BLOCK_T):
        o_q = t0 + tl.arange(0, BLOCK_T)
        o_t = t_start + o_q
        m = m_h[:, None] & ((o_q < Q) & (o_t < l))[None, :]
        b_dt = tl.load(dt_ptr + tl.cast(i_b, tl.int64) * s_tb + o_t[None, :] * s_tl + tl.cast(o_h, tl.int64)[:, None] * s_th,
                       mask=m, other=0.0).to(COMPUTE)
        b_dt = _dt_pipeline(b_dt, b_bias[:, None] if HAS_BIAS else 0.0, lo, hi, HAS_BIAS, SOFTPLUS)
        b_dt = tl.where(m, b_dt, 0.0)                                   # padding contributes nothing
        b_a = tl.where(m, b_dt.to(tl.float64) * b_A[:, None], 0.0)
        tl.store(dt_out_ptr + o_row[:, None] + o_t[None, :], b_dt, mask=m)
        if COMPENSATED:
            b_hi, b_lo = tl.associative_scan((b_a, tl.zeros_like(b_a)), 1, _two_sum)
            b_hi, b_lo = _two_sum(b_hi, b_lo, carry[:, None], carry_lo[:, None])
            tl.store(cs_ptr + o_row[:, None] + o_t[None, :], b_hi, mask=m)
            tl.store(cs_lo_ptr + o_row[:, None] + o_t[None, :], b_lo, mask=m)
            last = (tl.arange(0, BLOCK_T) == BLOCK_T - 1)[None, :]          # padding adds 0: the block's total
            carry = tl.sum(tl.where(last, b_hi, 0.0), axis=1)
            carry_lo = tl.sum(tl.where(last, b_lo, 0.0), axis=1)
        else:
            tl.store(cs_ptr + o_row[:, None] + o_t[None, :], tl.cumsum(b_a, axis=1) + carry[:, None], mask=m)
            carry += tl.sum(b_a, axis=1)


# ---------------------------------------------------------------------------------------------
# 2. Chunk states: S_c = sum_j w_j x_j ⊗ B_j, one (BLOCK_P, BLOCK_N) tile per program
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=_NS + ["s_xb", "s_xl", "s_xh", "s_xp", "s_Bb", "s_Bl", "s_Bg", "s_Bn"])
def chunk_state_kernel(
    x_ptr, B_ptr, dt_ptr, cs_ptr, cs_lo_ptr, states_ptr,
    h, l, Q, p, n, hpg, nc,
    s_xb, s_xl, s_xh, s_xp, s_Bb, s_Bl, s_Bg, s_Bn,
    COMPENSATED: tl.constexpr, FROM_START: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # forward (FROM_START False): w_j = exp(cs_end - cs_j) dt_j, the weight of token j in the
    #   chunk's end state; states (b, nc, h, p, n)
    # backward (FROM_START True, x = g, the gradient of y, and B = C): w_j = exp(cs_j), the weight of
    #   the chunk's start state in y_j; the result is that chunk's own gradient of its start state
    i_c, i_bh, i_pn = tl.program_id(0) % nc, tl.program_id(0) // nc, tl.program_id(1)
    i_b, i_h = i_bh // h, i_bh % h
    n_nb = tl.cdiv(n, BLOCK_N)
    o_p = (i_pn // n_nb) * BLOCK_P + tl.arange(0, BLOCK_P)
    o_n = (i_pn % n_nb) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_p, m_n = o_p < p, o_n < n
    t_start = tl.cast(i_c, tl.int64) * Q
    clen = tl.minimum(l - t_start, Q)
    o_row = tl.cast(i_bh, tl.int64) * l + t_start                       # (b, h, l) rows of dt, cs
    cs_end = tl.load(cs_ptr + o_row + clen - 1)
    cs_end_lo = tl.load(cs_lo_ptr + o_row + clen - 1) if COMPENSATED else 0.0
    p_x = x_ptr + tl.cast(i_b, tl.int64) * s_xb + tl.cast(i_h, tl.int64) * s_xh + tl.cast(o_p, tl.int64)[None, :] * s_xp
    p_B = B_ptr + tl.cast(i_b, tl.int64) * s_Bb + tl.cast(i_h // hpg, tl.int64) * s_Bg + tl.cast(o_n, tl.int64)[None, :] * s_Bn
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=COMPUTE)
    for k0 in range(0, clen, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < clen
        o_t = t_start + o_k
        b_cs = tl.load(cs_ptr + o_row + o_k, mask=m_k, other=0.0)
        if FROM_START:
            b_w = tl.where(m_k, tl.exp(b_cs.to(COMPUTE)), 0.0)
        else:
            b_dt = tl.load(dt_ptr + o_row + o_k, mask=m_k, other=0.0)
            b_cs_lo = tl.load(cs_lo_ptr + o_row + o_k, mask=m_k, other=0.0) if COMPENSATED else 0.0
            b_seg = tl.where(m_k, segment(cs_end, cs_end_lo, b_cs, b_cs_lo, COMPENSATED), 0.0)
            b_w = tl.where(m_k, tl.exp(b_seg.to(COMPUTE)) * b_dt, 0.0)
        b_x = tl.load(p_x + o_t[:, None] * s_xl, mask=m_k[:, None] & m_p[None, :], other=0.0).to(COMPUTE)
        b_B = tl.load(p_B + o_t[:, None] * s_Bl, mask=m_k[:, None] & m_n[None, :], other=0.0).to(COMPUTE)
        acc += tl.dot(tl.trans(b_x * b_w[:, None]), b_B, input_precision=DOT_PRECISION)
    o_s = ((tl.cast(i_b, tl.int64) * nc + i_c) * h + i_h) * p * n
    tl.store(states_ptr + o_s + o_p[:, None] * n + o_n[None, :], acc, mask=m_p[:, None] & m_n[None, :])


# ---------------------------------------------------------------------------------------------
# 3. State pass: h_{c+1} = exp(cs_end of chunk c) h_c + S_c, sequential over chunks
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=_NS + ["pn"])
def state_pass_kernel(
    states_ptr, cs_ptr, h0_ptr, final_ptr,
    h, l, Q, nc, pn,
    HAS_H0: tl.constexpr, BLOCK: tl.constexpr, COMPUTE: tl.constexpr,
):
    # states (b, nc, h, p, n) holds S_c on entry and the state at each chunk's start on exit
    i_bh, i_blk = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // h, i_bh % h
    o = i_blk * BLOCK + tl.arange(0, BLOCK)
    m = o < pn
    o_bh = tl.cast(i_bh, tl.int64) * pn + o
    if HAS_H0:
        b_h = tl.load(h0_ptr + o_bh, mask=m, other=0.0).to(COMPUTE)
    else:
        b_h = tl.zeros([BLOCK], dtype=COMPUTE)
    for c in range(0, nc):
        p_s = states_ptr + ((tl.cast(i_b, tl.int64) * nc + c) * h + i_h) * pn + o
        b_local = tl.load(p_s, mask=m, other=0.0)
        tl.store(p_s, b_h, mask=m)
        end = tl.minimum(tl.cast(c, tl.int64) * Q + Q, l) - 1
        b_decay = tl.exp(tl.load(cs_ptr + tl.cast(i_bh, tl.int64) * l + end)).to(COMPUTE)
        b_h = b_decay * b_h + b_local
    tl.store(final_ptr + o_bh, b_h, mask=m)


# ---------------------------------------------------------------------------------------------
# 4. Chunk scan: y for a (BLOCK_M positions, BLOCK_P) tile of one chunk
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=_NS + ["s_xb", "s_xl", "s_xh", "s_xp", "s_zb", "s_zl", "s_zh", "s_zp",
                                     "s_Bb", "s_Bl", "s_Bg", "s_Bn", "s_Cb", "s_Cl", "s_Cg", "s_Cn"])
def chunk_scan_kernel(
    x_ptr, z_ptr, B_ptr, C_ptr, D_ptr, dt_ptr, cs_ptr, cs_lo_ptr, states_ptr, out_ptr, ypre_ptr,
    h, l, Q, p, n, hpg, nc,
    s_xb, s_xl, s_xh, s_xp, s_zb, s_zl, s_zh, s_zp, s_Bb, s_Bl, s_Bg, s_Bn, s_Cb, s_Cl, s_Cg, s_Cn,
    COMPENSATED: tl.constexpr, HAS_D: tl.constexpr, D_HP: tl.constexpr, HAS_Z: tl.constexpr, SAVE_Y: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_c, i_bh, i_mp = tl.program_id(0) % nc, tl.program_id(0) // nc, tl.program_id(1)
    i_b, i_h = i_bh // h, i_bh % h
    n_pb = tl.cdiv(p, BLOCK_P)
    i_m = i_mp // n_pb
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)                          # positions in the chunk
    o_p = (i_mp % n_pb) * BLOCK_P + tl.arange(0, BLOCK_P)
    m_p = o_p < p
    t_start = tl.cast(i_c, tl.int64) * Q
    clen = tl.minimum(l - t_start, Q)
    m_m = o_m < clen
    o_row = tl.cast(i_bh, tl.int64) * l + t_start
    b_cs_m = tl.load(cs_ptr + o_row + o_m, mask=m_m, other=0.0)          # float64
    b_lo_m = tl.load(cs_lo_ptr + o_row + o_m, mask=m_m, other=0.0) if COMPENSATED else 0.0
    g64 = tl.cast(i_h // hpg, tl.int64)
    p_C = C_ptr + tl.cast(i_b, tl.int64) * s_Cb + g64 * s_Cg + (t_start + o_m)[:, None] * s_Cl
    p_B = B_ptr + tl.cast(i_b, tl.int64) * s_Bb + g64 * s_Bg
    p_x = x_ptr + tl.cast(i_b, tl.int64) * s_xb + tl.cast(i_h, tl.int64) * s_xh + tl.cast(o_p, tl.int64)[None, :] * s_xp

    # y_i = exp(cs_i) C_i . h_c, with h_c the state at the chunk's start (BLOCK_P, n)
    p_h = states_ptr + ((tl.cast(i_b, tl.int64) * nc + i_c) * h + i_h) * p * n + o_p[:, None] * n
    acc = tl.zeros([BLOCK_M, BLOCK_P], dtype=COMPUTE)
    for n0 in range(0, n, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < n
        b_C = tl.load(p_C + tl.cast(o_n, tl.int64)[None, :] * s_Cn, mask=m_m[:, None] & m_n[None, :], other=0.0).to(COMPUTE)
        b_hc = tl.load(p_h + o_n[None, :], mask=m_p[:, None] & m_n[None, :], other=0.0)
        acc += tl.dot(b_C, tl.trans(b_hc), input_precision=DOT_PRECISION)
    acc = acc * tl.where(m_m, tl.exp(b_cs_m.to(COMPUTE)), 0.0)[:, None]

    # + sum_{j <= i} L_ij (C_i . B_j) dt_j x_j, over the source blocks up to the diagonal
    k_end = tl.minimum((i_m + 1) * BLOCK_M, clen)
    for k0 in range(0, k_end, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < clen
        b_cb = tl.zeros([BLOCK_M, BLOCK_K], dtype=COMPUTE)
        for n0 in range(0, n, BLOCK_N):
            o_n = n0 + tl.arange(0, BLOCK_N)
            m_n = o_n < n
            b_C = tl.load(p_C + tl.cast(o_n, tl.int64)[None, :] * s_Cn, mask=m_m[:, None] & m_n[None, :], other=0.0).to(COMPUTE)
            b_B = tl.load(p_B + (t_start + o_k)[:, None] * s_Bl + tl.cast(o_n, tl.int64)[None, :] * s_Bn,
                          mask=m_k[:, None] & m_n[None, :], other=0.0).to(COMPUTE)
            b_cb += tl.dot(b_C, tl.trans(b_B), input_precision=DOT_PRECISION)
        b_cs_k = tl.load(cs_ptr + o_row + o_k, mask=m_k, other=0.0)
        b_lo_k = tl.load(cs_lo_ptr + o_row + o_k, mask=m_k, other=0.0) if COMPENSATED else 0.0
        causal = (o_m[:, None] >= o_k[None, :]) & m_m[:, None] & m_k[None, :]
        b_seg = tl.where(causal, segment(b_cs_m[:, None], b_lo_m[:, None] if COMPENSATED else 0.0, b_cs_k[None, :],
                                          b_lo_k[None, :] if COMPENSATED else 0.0, COMPENSATED), 0.0)
        b_seg = b_seg.to(COMPUTE)                                       # never above the diagonal
        b_L = tl.where(causal, b_cb * tl.exp(b_seg), 0.0)
        b_dt = tl.load(dt_ptr + o_row + o_k, mask=m_k, other=0.0)
        b_x = tl.load(p_x + (t_start + o_k)[:, None] * s_xl, mask=m_k[:, None] & m_p[None, :], other=0.0).to(COMPUTE)
        b_xdt = b_x * b_dt[:, None]
        if k0 + BLOCK_K > i_m * BLOCK_M + 1 and _nonfinite(b_xdt):
            # a NaN or inf above the diagonal: 0 x inf in tl.dot would leak it backwards in time. The finite entries
            # still go through the same tl.dot (a sum over the tile in another order would move earlier outputs by an
            # ulp: information flowing backwards too); only the non-finite ones are added under the causal mask
            b_bad = b_xdt * 0.0 != 0.0
            acc += tl.dot(b_L, tl.where(b_bad, 0.0, b_xdt), input_precision=DOT_PRECISION)
            acc += tl.sum(tl.where(causal[:, :, None] & b_bad[None, :, :], b_L[:, :, None] * b_xdt[None, :, :], 0.0),
                          axis=1)
        else:
            acc += tl.dot(b_L, b_xdt, input_precision=DOT_PRECISION)

    # + D x_i; out = y silu(z)
    o_t = t_start + o_m
    m_mp = m_m[:, None] & m_p[None, :]
    if HAS_D:
        b_xm = tl.load(p_x + o_t[:, None] * s_xl, mask=m_mp, other=0.0).to(COMPUTE)
        if D_HP:
            b_D = tl.load(D_ptr + tl.cast(i_h, tl.int64) * p + o_p, mask=m_p, other=0.0).to(COMPUTE)
            acc += b_D[None, :] * b_xm
        else:
            acc += tl.load(D_ptr + i_h).to(COMPUTE) * b_xm
    o_out = ((tl.cast(i_b, tl.int64) * l + o_t) * h + i_h)[:, None] * p + o_p[None, :]   # (b, l, h, p)
    if SAVE_Y:
        tl.store(ypre_ptr + o_out, acc, mask=m_mp)
    if HAS_Z:
        b_z = tl.load(z_ptr + tl.cast(i_b, tl.int64) * s_zb + o_t[:, None] * s_zl + tl.cast(i_h, tl.int64) * s_zh
                      + tl.cast(o_p, tl.int64)[None, :] * s_zp, mask=m_mp, other=0.0).to(COMPUTE)
        acc = acc * silu(b_z)
    tl.store(out_ptr + o_out, acc.to(out_ptr.dtype.element_ty), mask=m_mp)


# ---------------------------------------------------------------------------------------------
# Backward: the reverse state pass, then one kernel per block of positions
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=_NS + ["pn", "n_blk"])
def state_pass_bwd_kernel(
    dS_ptr, states_ptr, cs_ptr, dfinal_ptr, dh0_ptr, dtot_ptr,
    h, l, Q, nc, pn, n_blk,
    HAS_DFINAL: tl.constexpr, BLOCK: tl.constexpr, COMPUTE: tl.constexpr,
):
    # Reverse of h_{c+1} = exp(tot_c) h_c + S_c, with tot_c = cs_end of chunk c. dS (b, nc, h, p, n) holds on entry
    # each chunk's own gradient of its start state (from y = ... + exp(cs_i) h_c C_i) and on exit the gradient of S_c
    # (= of h_{c+1}); dtot (b, h, nc, n_blk): partial sums of d tot_c = exp(tot_c) sum(dh_{c+1} h_c), one per program.
    i_bh, i_blk = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // h, i_bh % h
    o = i_blk * BLOCK + tl.arange(0, BLOCK)
    m = o < pn
    o_bh = tl.cast(i_bh, tl.int64) * pn + o
    if HAS_DFINAL:
        b_dh = tl.load(dfinal_ptr + o_bh, mask=m, other=0.0).to(COMPUTE)
    else:
        b_dh = tl.zeros([BLOCK], dtype=COMPUTE)
    for cc in range(0, nc):
        c = nc - 1 - cc
        o_s = ((tl.cast(i_b, tl.int64) * nc + c) * h + i_h) * pn + o
        b_own = tl.load(dS_ptr + o_s, mask=m, other=0.0)
        tl.store(dS_ptr + o_s, b_dh, mask=m)
        b_hc = tl.load(states_ptr + o_s, mask=m, other=0.0)
        end = tl.minimum(tl.cast(c, tl.int64) * Q + Q, l) - 1
        b_decay = tl.exp(tl.load(cs_ptr + tl.cast(i_bh, tl.int64) * l + end)).to(COMPUTE)
        tl.store(dtot_ptr + (tl.cast(i_bh, tl.int64) * nc + c) * n_blk + i_blk,
                 b_decay * tl.sum(tl.where(m, b_dh * b_hc, 0.0)))
        b_dh = b_decay * b_dh + b_own
    tl.store(dh0_ptr + o_bh, b_dh, mask=m)


@triton.jit(do_not_specialize=_NS + ["n_mb", "s_xb", "s_xl", "s_xh", "s_xp", "s_Bb", "s_Bl", "s_Bg", "s_Bn",
                                     "s_Cb", "s_Cl", "s_Cg", "s_Cn"])
def chunk_bwd_kernel(
    x_ptr, B_ptr, C_ptr, dt_ptr, cs_ptr, cs_lo_ptr, g_ptr, states_ptr, dS_ptr,
    dx_ptr, dB_ptr, dC_ptr, ddt_ptr, dcs_ptr, dend_ptr, rpart_ptr,
    h, l, Q, p, n, hpg, nc, n_mb,
    s_xb, s_xl, s_xh, s_xp, s_Bb, s_Bl, s_Bg, s_Bn, s_Cb, s_Cl, s_Cg, s_Cn,
    COMPENSATED: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program per (chunk, batch x head, block of BLOCK positions J of the chunk), whole (p, n).
    # With w_j = exp(cs_end - cs_j) dt_j, L_ij = exp(cs_i - cs_j) (j <= i), g = dL/dy:
    #   as sources j in J:  from S_c = sum_j w_j x_j ⊗ B_j and dS = dL/dS_c:
    #       U = dS B_j;  dx_j = w_j U;  dB_j = w_j dS^T x_j;  dw_j = x_j . U
    #       d dt_j += exp(cs_end - cs_j) dw_j;  d cs_j -= w_j dw_j;  d cs_end += w_j dw_j (dend)
    #     from y_i = sum_{j <= i} L_ij (C_i . B_j) dt_j x_j, over targets i >= j:
    #       dx_j += dt_j sum_i L_ij (C_i . B_j) g_i;  dB_j += dt_j sum_i L_ij (g_i . x_j) C_i
    #       d dt_j += sum_i L_ij (C_i . B_j)(g_i . x_j) = T_.j / dt_j;  d cs_j -= sum_i T_ij
    #   as targets i in J:  from y_i = exp(cs_i) h_c C_i + sum_{j <= i} ...:
    #       dC_i = exp(cs_i) g_i h_c + sum_j L_ij dt_j (g_i . x_j) B_j
    #       d cs_i += exp(cs_i) g_i . (h_c C_i) + sum_{j < i} T_ij   (zero-length segments: no d cs)
    # Every T_ij (i > j) is formed once, in the program of j's block, and both its row and its column
    # sums are taken from it in float64: da_m = sum_{k >= m} d cs_k then cancels the +T_ij -T_ij of
    # every pair that does not span m to float64 rounding (formed twice, in two roundings, they left
    # eps |T| of noise at every earlier m: a float32 dA 3x over the policy under stress).
    # Outputs: dx (b, l, h, p); per-head dB, dC (b, l, h, n) (torch sums the heads of a group);
    # ddt, dcs (b, h, l); dend (b, h, nc, n_mb) partial sums for the chunk's last position.
    i_c, i_bh, i_m = tl.program_id(0) % nc, tl.program_id(0) // nc, tl.program_id(1)
    i_b, i_h = i_bh // h, i_bh % h
    o_p = tl.arange(0, BLOCK_P)
    o_n = tl.arange(0, BLOCK_N)
    m_p, m_n = o_p < p, o_n < n
    m_pn = m_p[:, None] & m_n[None, :]
    t_start = tl.cast(i_c, tl.int64) * Q
    clen = tl.minimum(l - t_start, Q)
    o_row = tl.cast(i_bh, tl.int64) * l + t_start
    g64 = tl.cast(i_h // hpg, tl.int64)
    b64 = tl.cast(i_b, tl.int64)
    h64 = tl.cast(i_h, tl.int64)
    p_x = x_ptr + b64 * s_xb + h64 * s_xh + tl.cast(o_p, tl.int64)[None, :] * s_xp
    p_B = B_ptr + b64 * s_Bb + g64 * s_Bg + tl.cast(o_n, tl.int64)[None, :] * s_Bn
    p_C = C_ptr + b64 * s_Cb + g64 * s_Cg + tl.cast(o_n, tl.int64)[None, :] * s_Cn
    o_state = ((b64 * nc + i_c) * h + i_h) * p * n + o_p[:, None] * n + o_n[None, :]
    b_S = tl.load(dS_ptr + o_state, mask=m_pn, other=0.0)            # dL/dS_c (BLOCK_P, BLOCK_N)
    b_hc = tl.load(states_ptr + o_state, mask=m_pn, other=0.0)       # h_c

    o_j = i_m * BLOCK + tl.arange(0, BLOCK)
    m_j = o_j < clen
    t_j = t_start + o_j
    cs_end = tl.load(cs_ptr + o_row + clen - 1)
    cs_end_lo = tl.load(cs_lo_ptr + o_row + clen - 1) if COMPENSATED else 0.0
    b_cs_j = tl.load(cs_ptr + o_row + o_j, mask=m_j, other=0.0)
    b_lo_j = tl.load(cs_lo_ptr + o_row + o_j, mask=m_j, other=0.0) if COMPENSATED else 0.0
    b_dt_j = tl.load(dt_ptr + o_row + o_j, mask=m_j, other=0.0)
    b_x_j = tl.load(p_x + t_j[:, None] * s_xl, mask=m_j[:, None] & m_p[None, :], other=0.0).to(COMPUTE)
    b_B_j = tl.load(p_B + t_j[:, None] * s_Bl, mask=m_j[:, None] & m_n[None, :], other=0.0).to(COMPUTE)
    b_C_j = tl.load(p_C + t_j[:, None] * s_Cl, mask=m_j[:, None] & m_n[None, :], other=0.0).to(COMPUTE)
    o_g = ((b64 * l + t_j) * h + i_h)[:, None] * p + o_p[None, :]      # g is contiguous (b, l, h, p)
    b_g_j = tl.load(g_ptr + o_g, mask=m_j[:, None] & m_p[None, :], other=0.0)

    # sources, through the chunk's end state
    b_decay_end = tl.where(m_j, tl.exp(tl.where(m_j, segment(cs_end, cs_end_lo, b_cs_j, b_lo_j, COMPENSATED),
                                                0.0).to(COMPUTE)), 0.0)
    b_w = b_decay_end * b_dt_j
    b_U = tl.dot(b_B_j, tl.trans(b_S), input_precision=DOT_PRECISION)            # (BLOCK, BLOCK_P)
    b_dx = b_U * b_w[:, None]
    b_dw = tl.sum(b_x_j * b_U, axis=1)
    b_dB = tl.dot(b_x_j, b_S, input_precision=DOT_PRECISION) * b_w[:, None]     # (BLOCK, BLOCK_N)
    b_ddt = b_decay_end * b_dw
    # d cs only from segments of at least one token: the chunk's last token reaches its end state through no decay,
    # and a +V -V pair summed in different orders would leave rounding noise in dA (whose true value may be exactly 0)
    b_V = tl.where(o_j < clen - 1, b_w * b_dw, 0.0).to(tl.float64)
    b_dcs = -b_V                                                    # float64: see the reverse cumsum
    tl.store(dend_ptr + (tl.cast(i_bh, tl.int64) * nc + i_c) * n_mb + i_m, tl.sum(b_V))
    # R: d cs_i from the pairs (i, j in J), i > j, as row sums of the same T tiles whose column sums
    # go into d cs_j: partials (b, h, nc, n_mb, Q), one row per source block, summed by torch
    p_r = rpart_ptr + ((tl.cast(i_bh, tl.int64) * nc + i_c) * n_mb + i_m) * Q

    # sources, through the outputs of later tokens of the chunk (targets i >= j)
    for i0 in range(i_m * BLOCK, clen, BLOCK):
        o_i = i0 + tl.arange(0, BLOCK)
        m_i = o_i < clen
        t_i = t_start + o_i
        b_C_i = tl.load(p_C + t_i[:, None] * s_Cl, mask=m_i[:, None] & m_n[None, :], other=0.0).to(COMPUTE)
        b_g_i = tl.load(g_ptr + ((b64 * l + t_i) * h + i_h)[:, None] * p + o_p[None, :],
                        mask=m_i[:, None] & m_p[None, :], other=0.0)
        b_cs_i = tl.load(cs_ptr + o_row + o_i, mask=m_i, other=0.0)
        b_lo_i = tl.load(cs_lo_ptr + o_row + o_i, mask=m_i, other=0.0) if COMPENSATED else 0.0
        causal = (o_i[None, :] >= o_j[:, None]) & m_j[:, None] & m_i[None, :]        # (j, i)
        b_seg = segment(b_cs_i[None, :], b_lo_i[None, :] if COMPENSATED else 0.0, b_cs_j[:, None],
                         b_lo_j[:, None] if COMPENSATED else 0.0, COMPENSATED)
        b_L = tl.where(causal, tl.exp(tl.where(causal, b_seg, 0.0).to(COMPUTE)), 0.0)
        b_cb = tl.dot(b_B_j, tl.trans(b_C_i), input_precision=DOT_PRECISION)          # (j, i): C_i . B_j
        b_gx = tl.dot(b_x_j, tl.trans(b_g_i), input_precision=DOT_PRECISION)          # (j, i): g_i . x_j
        b_Lcb = b_L * b_cb
        b_dx += b_dt_j[:, None] * tl.dot(b_Lcb, b_g_i, input_precision=DOT_PRECISION)
        b_Lgx = b_L * b_gx
        b_dB += b_dt_j[:, None] * tl.dot(b_Lgx, b_C_i, input_precision=DOT_PRECISION)
        b_T = b_Lcb * b_gx                                                          # T_ij / dt_j
        b_ddt += tl.sum(b_T, axis=1)
        b_Ts = tl.where(o_i[None, :] > o_j[:, None], b_T * b_dt_j[:, None], 0.0).to(tl.float64)  # i > j only
        b_dcs -= tl.sum(b_Ts, axis=1)
        tl.store(p_r + o_i, tl.sum(b_Ts, axis=0), mask=m_i)

    # targets i in J: through the start state and the earlier tokens of the chunk (j <= i)
    b_cs_i = b_cs_j
    b_exp_i = tl.where(m_j, tl.exp(b_cs_i.to(COMPUTE)), 0.0)
    b_dC = tl.dot(b_g_j, b_hc, input_precision=DOT_PRECISION) * b_exp_i[:, None]   # (BLOCK, BLOCK_N)
    b_dcs += tl.sum(b_dC * b_C_j, axis=1).to(tl.float64)
    for j0 in range(0, (i_m + 1) * BLOCK, BLOCK):
        o_s = j0 + tl.arange(0, BLOCK)
        m_s = o_s < clen
        t_s = t_start + o_s
        b_B_s = tl.load(p_B + t_s[:, None] * s_Bl, mask=m_s[:, None] & m_n[None, :], other=0.0).to(COMPUTE)
        b_x_s = tl.load(p_x + t_s[:, None] * s_xl, mask=m_s[:, None] & m_p[None, :], other=0.0).to(COMPUTE)
        b_dt_s = tl.load(dt_ptr + o_row + o_s, mask=m_s, other=0.0)
        b_cs_s = tl.load(cs_ptr + o_row + o_s, mask=m_s, other=0.0)
        b_lo_s = tl.load(cs_lo_ptr + o_row + o_s, mask=m_s, other=0.0) if COMPENSATED else 0.0
        causal = (o_j[:, None] >= o_s[None, :]) & m_j[:, None] & m_s[None, :]        # (i, j)
        b_seg = segment(b_cs_i[:, None], b_lo_j[:, None] if COMPENSATED else 0.0, b_cs_s[None, :],
                         b_lo_s[None, :] if COMPENSATED else 0.0, COMPENSATED)
        b_L = tl.where(causal, tl.exp(tl.where(causal, b_seg, 0.0).to(COMPUTE)), 0.0)
        b_gx = tl.dot(b_g_j, tl.trans(b_x_s), input_precision=DOT_PRECISION)          # (i, j)
        b_P = b_L * b_gx * b_dt_s[None, :]
        b_dC += tl.dot(b_P, b_B_s, input_precision=DOT_PRECISION)

    o_xo = ((b64 * l + t_j) * h + i_h)
    tl.store(dx_ptr + o_xo[:, None] * p + o_p[None, :], b_dx, mask=m_j[:, None] & m_p[None, :])
    tl.store(dB_ptr + o_xo[:, None] * n + o_n[None, :], b_dB, mask=m_j[:, None] & m_n[None, :])
    tl.store(dC_ptr + o_xo[:, None] * n + o_n[None, :], b_dC, mask=m_j[:, None] & m_n[None, :])
    tl.store(ddt_ptr + o_row + o_j, b_ddt, mask=m_j)
    tl.store(dcs_ptr + o_row + o_j, b_dcs, mask=m_j)


# ---------------------------------------------------------------------------------------------
# The decoding step: one token, state updated in place; no autotuning (it would apply the
# in-place update once per configuration). A, dt, dt_bias and D are read through strides, so the
# official "tied" form (A (h, p, n), dt (b, h, p), dt_bias and D (h, p), broadcast with zero
# strides) and the untied form (A (h,), dt (b, h), ...) are the same kernel.
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["h", "p", "n", "hpg", "s_hb", "s_hh", "s_hp", "s_hn", "s_xb", "s_xh", "s_xp",
                                "s_tb", "s_th", "s_tp", "s_Ah", "s_Ap", "s_An", "s_Bb", "s_Bg", "s_Bn",
                                "s_Cb", "s_Cg", "s_Cn", "s_Dh", "s_Dp", "s_bh", "s_bp", "s_zb", "s_zh", "s_zp"])
def step_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, limits_ptr, idx_ptr, y_ptr,
    h, p, n, hpg,
    s_hb, s_hh, s_hp, s_hn, s_xb, s_xh, s_xp, s_tb, s_th, s_tp, s_Ah, s_Ap, s_An,
    s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn, s_Dh, s_Dp, s_bh, s_bp, s_zb, s_zh, s_zp,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_IDX: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr,
):
    i_bh, i_pb = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // h, i_bh % h
    o_p = i_pb * BLOCK_P + tl.arange(0, BLOCK_P)
    o_n = tl.arange(0, BLOCK_N)
    m_p, m_n = o_p < p, o_n < n
    m_pn = m_p[:, None] & m_n[None, :]
    p64 = tl.cast(o_p, tl.int64)
    n64 = tl.cast(o_n, tl.int64)
    b64, h64 = tl.cast(i_b, tl.int64), tl.cast(i_h, tl.int64)
    o_y = (b64 * h + i_h) * p + o_p
    if HAS_IDX:
        slot = tl.load(idx_ptr + i_b).to(tl.int64)       # state_batch_indices: a negative slot is padding
    else:
        slot = b64
    if slot < 0:
        tl.store(y_ptr + o_y, tl.zeros([BLOCK_P], dtype=COMPUTE).to(y_ptr.dtype.element_ty), mask=m_p)
    else:
        p_h = state_ptr + slot * s_hb + h64 * s_hh + p64[:, None] * s_hp + n64[None, :] * s_hn
        b_state = tl.load(p_h, mask=m_pn, other=0.0).to(COMPUTE)
        b_x = tl.load(x_ptr + b64 * s_xb + h64 * s_xh + p64 * s_xp, mask=m_p, other=0.0).to(COMPUTE)
        b_dt = tl.load(dt_ptr + b64 * s_tb + h64 * s_th + p64 * s_tp, mask=m_p, other=0.0).to(COMPUTE)
        b_bias = tl.load(bias_ptr + h64 * s_bh + p64 * s_bp, mask=m_p, other=0.0).to(COMPUTE) if HAS_BIAS else 0.0
        b_dt = _dt_pipeline(b_dt, b_bias, tl.load(limits_ptr).to(COMPUTE), tl.load(limits_ptr + 1).to(COMPUTE),
                            HAS_BIAS, SOFTPLUS)
        b_A = tl.load(A_ptr + h64 * s_Ah + p64[:, None] * s_Ap + n64[None, :] * s_An, mask=m_pn, other=0.0).to(COMPUTE)
        g64 = tl.cast(i_h // hpg, tl.int64)
        b_B = tl.load(B_ptr + b64 * s_Bb + g64 * s_Bg + n64 * s_Bn, mask=m_n, other=0.0).to(COMPUTE)
        b_C = tl.load(C_ptr + b64 * s_Cb + g64 * s_Cg + n64 * s_Cn, mask=m_n, other=0.0).to(COMPUTE)
        b_state = tl.exp(b_dt[:, None] * b_A) * b_state + (b_dt * b_x)[:, None] * b_B[None, :]
        tl.store(p_h, b_state.to(state_ptr.dtype.element_ty), mask=m_pn)            # in place
        b_y = tl.sum(tl.where(m_pn, b_state * b_C[None, :], 0.0), axis=1)
        if HAS_D:
            b_y += tl.load(D_ptr + h64 * s_Dh + p64 * s_Dp, mask=m_p, other=0.0).to(COMPUTE) * b_x
        if HAS_Z:
            b_y = b_y * silu(tl.load(z_ptr + b64 * s_zb + h64 * s_zh + p64 * s_zp, mask=m_p, other=0.0).to(COMPUTE))
        tl.store(y_ptr + o_y, b_y.to(y_ptr.dtype.element_ty), mask=m_p)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _limits(dt_limit, f, device):
    return torch.tensor([float(dt_limit[0]), float(dt_limit[1])], dtype=f, device=device)


def _dims(x, B, chunk_size):
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    Q = max(1, min(int(chunk_size), l))
    return b, l, h, p, g, n, Q, triton.cdiv(l, Q)


# CUDA allows 2^31 - 1 programs on grid axis 0 but only 65,535 on axes 1 and 2. Every grid puts the
# programs that scale with b x h (and with the number of chunks) on axis 0, folded into one index the
# kernel unfolds, and keeps only tile counts (bounded by MAX_PN and the blocks) on axis 1; b x h on
# axis 1 stopped working at 65,536 batch rows x heads (b = 1024 with 64 heads, a serving batch).
def launch_grids(b, l, h, p, n, chunk_size):
    """The launch grid of every kernel at these sizes, as the launchers launch them: computed without
    launching, so a test can check CUDA's grid limits at sizes too large to run (l >= 1)."""
    Q = max(1, min(int(chunk_size), l))
    nc, BP, BN = triton.cdiv(l, Q), block(p, CONFIG["block_p"]), block(n, CONFIG["block_n"])
    n_blk = triton.cdiv(p * n, min(CONFIG["block_pn"], triton.next_power_of_2(p * n)))
    return dict(chunk_cumsum=(nc * b, triton.cdiv(h, min(16, triton.next_power_of_2(h)))),
                chunk_state=(nc * b * h, triton.cdiv(p, BP) * triton.cdiv(n, BN)), state_pass=(b * h, n_blk),
                chunk_scan=(nc * b * h, triton.cdiv(Q, block(Q, CONFIG["block_m"])) * triton.cdiv(p, BP)),
                state_pass_bwd=(b * h, n_blk), chunk_bwd=(nc * b * h, triton.cdiv(Q, block(Q, CONFIG["bwd_block"]))),
                step=(b * h, triton.cdiv(p, min(CONFIG["step_block_p"], triton.next_power_of_2(p)))))


def _forward(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus, dt_limit, save):
    """Steps 1-4. Returns out (b, l, h, p), final_states (b, h, p, n), and what the backward needs
    (dt and cs (b, h, l), the chunk start states (b, nc, h, p, n), y before the gate) when save."""
    b, l, h, p, g, n, Q, nc = _dims(x, B, chunk_size)
    f = compute_dtype(x.dtype)
    dev = x.device
    T = tl_dtype(f)
    grid = launch_grids(b, l, h, p, n, chunk_size)
    A, D, dt_bias = (None if t is None else t.contiguous() for t in (A, D, dt_bias))
    h0 = None if initial_states is None else initial_states.contiguous()
    prec = "ieee"
    dt_c = torch.empty(b, h, l, dtype=f, device=dev)
    cs = torch.empty(b, h, l, dtype=torch.float64, device=dev)
    comp = f == torch.float64
    cs_lo = torch.empty(b, h, l, dtype=torch.float64, device=dev) if comp else cs
    BLOCK_H = min(16, triton.next_power_of_2(h))
    with quiet():
        chunk_cumsum_kernel[grid["chunk_cumsum"]](
            dt, A, dt_bias if dt_bias is not None else A, _limits(dt_limit, f, dev), dt_c, cs, cs_lo,
            h, l, Q, *dt.stride(),
            HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), BLOCK_H=BLOCK_H,
            BLOCK_T=block(Q, CONFIG["block_t"]), COMPUTE=T, COMPENSATED=comp)

        states = torch.empty(b, nc, h, p, n, dtype=f, device=dev)
        BP, BN = block(p, CONFIG["block_p"]), block(n, CONFIG["block_n"])
        chunk_state_kernel[grid["chunk_state"]](
            x, B, dt_c, cs, cs_lo, states, h, l, Q, p, n, h // g, nc, *x.stride(), *B.stride(),
            COMPENSATED=comp, FROM_START=False, BLOCK_K=block(Q, CONFIG["block_k"]), BLOCK_P=BP, BLOCK_N=BN,
            COMPUTE=T, DOT_PRECISION=prec, num_warps=CONFIG["num_warps"])

        final = torch.empty(b, h, p, n, dtype=f, device=dev)
        BLOCK = min(CONFIG["block_pn"], triton.next_power_of_2(p * n))
        state_pass_kernel[grid["state_pass"]](
            states, cs, h0 if h0 is not None else final, final, h, l, Q, nc, p * n,
            HAS_H0=h0 is not None, BLOCK=BLOCK, COMPUTE=T)

        out = torch.empty(b, l, h, p, dtype=result_dtype(x.dtype), device=dev)
        ypre = torch.empty(b, l, h, p, dtype=f, device=dev) if save and z is not None else None
        zz = z if z is not None else x
        BM = block(Q, CONFIG["block_m"])
        chunk_scan_kernel[grid["chunk_scan"]](
            x, zz, B, C, D if D is not None else A, dt_c, cs, cs_lo, states, out, ypre if ypre is not None else out,
            h, l, Q, p, n, h // g, nc, *x.stride(), *zz.stride(), *B.stride(), *C.stride(),
            COMPENSATED=comp, HAS_D=D is not None, D_HP=D is not None and D.dim() == 2, HAS_Z=z is not None,
            SAVE_Y=ypre is not None, BLOCK_M=BM, BLOCK_K=BM, BLOCK_P=BP, BLOCK_N=BN,
            COMPUTE=T, DOT_PRECISION=prec, num_warps=CONFIG["num_warps"])
    return out.to(x.dtype), final, (dt_c, cs, cs_lo, states, ypre)


def _backward(saved, dout, dfinal):
    """Gradients of (x, dt, A, B, C, D, z, dt_bias, initial_states) from those of out and final_states."""
    (x, dt, A, B, C, D, z, dt_bias, dt_c, cs, cs_lo, states, ypre), (chunk_size, dt_softplus, dt_limit) = saved
    comp = cs_lo is not cs
    b, l, h, p, g, n, Q, nc = _dims(x, B, chunk_size)
    f = compute_dtype(x.dtype)
    dev = x.device
    T = tl_dtype(f)
    grid = launch_grids(b, l, h, p, n, chunk_size)
    prec = "ieee"
    # the gate and the skip, elementwise in torch: g = d out silu(z) is the gradient of y
    # (contiguous: torch's elementwise ops round differently on strided layouts, vectorised or not,
    # and a view into a wide projection must give what its compact copy gives)
    x_f = x.to(f).contiguous()
    dout = dout.to(f).contiguous() if dout is not None else torch.zeros(b, l, h, p, dtype=f, device=dev)
    dz = None
    if z is not None:
        z_f = z.to(f).contiguous()
        sig = torch.sigmoid(z_f)
        dz = (dout * ypre * sig * (1 + z_f * (1 - sig))).to(z.dtype)
        gy = (dout * F.silu(z_f)).contiguous()
    else:
        gy = dout.contiguous()
    dD = None
    if D is not None:
        dD = (gy * x_f).sum((0, 1))
        dD = (dD if D.dim() == 2 else dD.sum(-1)).to(D.dtype)

    with quiet():
        # each chunk's own gradient of its start state: sum_i exp(cs_i) g_i ⊗ C_i (step 2's kernel)
        dS = torch.empty(b, nc, h, p, n, dtype=f, device=dev)
        BP, BN = block(p, CONFIG["block_p"]), block(n, CONFIG["block_n"])
        chunk_state_kernel[grid["chunk_state"]](
            gy, C, dt_c, cs, cs_lo, dS, h, l, Q, p, n, h // g, nc, *gy.stride(), *C.stride(),
            COMPENSATED=comp, FROM_START=True, BLOCK_K=block(Q, CONFIG["block_k"]), BLOCK_P=BP, BLOCK_N=BN,
            COMPUTE=T, DOT_PRECISION=prec, num_warps=CONFIG["num_warps"])
        # the reverse state pass
        BLOCK = min(CONFIG["block_pn"], triton.next_power_of_2(p * n))
        n_blk = triton.cdiv(p * n, BLOCK)
        dh0 = torch.empty(b, h, p, n, dtype=f, device=dev)
        dtot = torch.empty(b, h, nc, n_blk, dtype=f, device=dev)
        dfinal = None if dfinal is None else dfinal.contiguous()
        state_pass_bwd_kernel[grid["state_pass_bwd"]](
            dS, states, cs, dfinal if dfinal is not None else dh0, dh0, dtot, h, l, Q, nc, p * n, n_blk,
            HAS_DFINAL=dfinal is not None, BLOCK=BLOCK, COMPUTE=T)
        # per block of positions: dx, dB, dC, d dt (direct), d cs
        BK = block(Q, CONFIG["bwd_block"])
        n_mb = triton.cdiv(Q, BK)
        dx = torch.empty(b, l, h, p, dtype=f, device=dev)
        dB_h, dC_h = (torch.empty(b, l, h, n, dtype=f, device=dev) for _ in range(2))
        ddt = torch.empty(b, h, l, dtype=f, device=dev)
        dcs = torch.empty(b, h, l, dtype=torch.float64, device=dev)
        dend = torch.empty(b, h, nc, n_mb, dtype=torch.float64, device=dev)
        rpart = torch.zeros(b, h, nc, n_mb, Q, dtype=torch.float64, device=dev)   # rows before a block stay 0
        chunk_bwd_kernel[grid["chunk_bwd"]](
            x, B, C, dt_c, cs, cs_lo, gy, states, dS, dx, dB_h, dC_h, ddt, dcs, dend, rpart,
            h, l, Q, p, n, h // g, nc, n_mb, *x.stride(), *B.stride(), *C.stride(),
            COMPENSATED=comp, BLOCK=BK, BLOCK_P=block(p, MAX_PN), BLOCK_N=block(n, MAX_PN), COMPUTE=T, DOT_PRECISION=prec,
            num_warps=CONFIG["bwd_num_warps"])

    # d cs at each chunk's last position also takes the end-state terms; then da_m = sum_{k >= m} d cs_k
    # within the chunk (a reverse cumsum), and a = dt A
    pad = nc * Q - l
    dcs = F.pad(dcs, (0, pad)).view(b, h, nc, Q) + rpart.sum(3)
    ends = torch.clamp(torch.arange(1, nc + 1, device=dev) * Q, max=l) - 1 - torch.arange(nc, device=dev) * Q
    dcs[:, :, torch.arange(nc, device=dev), ends] += dend.sum(-1) + dtot.double().sum(-1)
    # (in float64: the sum cancels pairs +T -T of every segment that does not span m)
    da = dcs.flip(-1).cumsum(-1).flip(-1).reshape(b, h, nc * Q)[..., :l]
    ddt = (ddt + da * A.to(torch.float64)[None, :, None]).to(f)
    dA = (da * dt_c.double()).sum((0, 2)).to(A.dtype)
    # the dt pipeline (bias, softplus, clamp) by torch's own autograd, so its masks are torch's
    with torch.enable_grad():
        dt_leaf = dt.detach().to(f).requires_grad_()
        bias_leaf = None if dt_bias is None else dt_bias.detach().to(f).requires_grad_()
        s = dt_leaf + bias_leaf if bias_leaf is not None else dt_leaf
        s = F.softplus(s) if dt_softplus else s
        s = s.clamp(dt_limit[0], dt_limit[1])
        wrt = [dt_leaf] + ([bias_leaf] if bias_leaf is not None else [])
        grads = torch.autograd.grad(s, wrt, ddt.transpose(1, 2))
    d_dt = grads[0].to(dt.dtype)
    d_bias = grads[1].to(dt_bias.dtype) if dt_bias is not None else None

    dx = dx + (gy * (D.to(f)[:, None] if D.dim() == 1 else D.to(f)) if D is not None else 0)
    dB = dB_h.view(b, l, g, h // g, n).sum(3).to(B.dtype)
    dC = dC_h.view(b, l, g, h // g, n).sum(3).to(C.dtype)
    return dx.to(x.dtype), d_dt, dA, dB, dC, dD, dz, d_bias, dh0


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------

class _SSDScan(torch.autograd.Function):
    """Forward saves the inputs, dt, the cumsum and the chunk start states; backward runs the
    reverse kernels."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_states, chunk_size, dt_softplus, dt_limit):
        out, final, (dt_c, cs, cs_lo, states, ypre) = _forward(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states,
                                                        dt_softplus, dt_limit, save=True)
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, dt_c, cs, cs_lo if cs_lo is not cs else None, states, ypre)
        ctx.options = (chunk_size, dt_softplus, dt_limit)
        ctx.h0_dtype = None if initial_states is None else initial_states.dtype
        ctx.set_materialize_grads(False)
        return out, final

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dfinal):
        saved = list(ctx.saved_tensors)
        if saved[10] is None:          # no compensated cumsum (float32 compute): cs_lo is cs
            saved[10] = saved[9]
        grads = _backward((saved, ctx.options), dout, dfinal)
        dh0 = None if ctx.h0_dtype is None else grads[-1].to(ctx.h0_dtype)
        return (*grads[:-1], dh0, None, None, None)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------

def ssd_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
             cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False,
             return_varlen_states=False):
    """Mamba-2 SSD scan by the chunked Triton kernels (forward, and backward through autograd).

    Args:
        x: (b, l, h, p); dt: (b, l, h) before dt_bias, softplus and the clamp; A: (h,)
        B, C: (b, l, g, n), head i reading group i // (h // g); chunk_size: any positive integer
        D: (h,) or (h, p) optional; z: (b, l, h, p) optional; dt_bias: (h,) optional
        initial_states: (b, h, p, n) optional; dt_softplus: softplus (threshold 20) on dt + dt_bias
        dt_limit: (lo, hi), applied always; return_final_states: also return the last state
    Returns:
        out: (b, l, h, p) in x's dtype; with return_final_states, (out, final_states (b, h, p, n) in
        the compute dtype), on x's device
    Raises:
        NotImplementedError: packed sequences (seq_idx, cu_seqlens, return_varlen_states), or p or n
        above MAX_PN
    """
    if seq_idx is not None or cu_seqlens is not None or return_varlen_states:
        raise NotImplementedError("triton_ssd: packed sequences (seq_idx, cu_seqlens, return_varlen_states) "
                                  "are not supported (a declared gap)")
    b, l, h, p = x.shape
    n = B.shape[-1]
    f = compute_dtype(x.dtype)
    check_tile_limits("ssd_scan", "the Triton SSD kernels", p, n)
    if x.numel() == 0:
        final = (initial_states.to(f) if initial_states is not None
                 else torch.zeros(b, h, p, n, dtype=f, device=x.device))
        out = x.new_empty(b, l, h, p)
        return (out, final) if return_final_states else out
    inputs = (x, dt, A, B, C, D, z, dt_bias, initial_states)
    if host_tensors_on_a_gpu_machine(x):
        moved = [None if t is None else t.to("cuda") for t in inputs]
        out, final = ssd_scan(*moved[:5], chunk_size, *moved[5:], dt_softplus=dt_softplus, dt_limit=dt_limit,
                              return_final_states=True)
        out, final = out.to(x.device), final.to(x.device)
        return (out, final) if return_final_states else out
    dt_limit = (float(dt_limit[0]), float(dt_limit[1]))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        out, final = _SSDScan.apply(*inputs, int(chunk_size), bool(dt_softplus), dt_limit)
    else:
        out, final, _ = _forward(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus, dt_limit,
                                 save=False)
    return (out, final) if return_final_states else out


def _tied_strides(t, dims):
    """Strides of t over ``dims`` trailing axes, with 0 for an axis t lacks (the untied form)."""
    return list(t.stride()) + [0] * (dims - t.dim())


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                     dt_limit=(0.0, float("inf")), state_batch_indices=None):
    """One Mamba-2 decoding step by the Triton step kernel: ``state`` advanced by one token in place.

    Args:
        state: (b, h, p, n) in the compute dtype, any strides, overwritten with the new state (with
               state_batch_indices: (slots, h, p, n), row i updating slot state_batch_indices[i])
        x: (b, h, p); dt: (b, h) or tied (b, h, p); A: (h,) or tied (h, p, n); B, C: (b, g, n)
        D: (h,) or (h, p), optional; z: (b, h, p) optional; dt_bias: (h,) or (h, p), optional
        dt_softplus: softplus (threshold 20); dt_limit: (lo, hi), applied always
        state_batch_indices: (b,) int, optional; a negative index marks a padding row: its output is
               zeros and no state is touched
    Returns:
        y: (b, h, p) in x's dtype
    """
    b, h, p = x.shape
    n = B.shape[-1]
    g = B.shape[1]
    check_tile_limits("ssd_state_update", "the Triton SSD kernels", p, n)
    if host_tensors_on_a_gpu_machine(x):
        moved = [None if t is None else t.to("cuda") for t in (x, dt, A, B, C, D, z, dt_bias, state_batch_indices)]
        state_gpu = state.to("cuda")
        y = ssd_state_update(state_gpu, *moved[:8], dt_softplus, dt_limit, moved[8])
        state.copy_(state_gpu)
        return y.to(x.device)
    f = compute_dtype(x.dtype)
    y = torch.empty(b, h, p, dtype=result_dtype(x.dtype), device=x.device)
    zz = z if z is not None else x
    BP = min(CONFIG["step_block_p"], triton.next_power_of_2(p))
    s_A = list(A.stride()) if A.dim() == 3 else [A.stride(0), 0, 0]
    with quiet():
        step_kernel[launch_grids(b, 1, h, p, n, 1)["step"]](
            state, x, dt, A, B, C, D if D is not None else A, zz, dt_bias if dt_bias is not None else A,
            _limits(dt_limit, f, x.device), state_batch_indices if state_batch_indices is not None else A, y,
            h, p, n, h // g, *state.stride(), *x.stride(), *_tied_strides(dt, 3), *s_A,
            *B.stride(), *C.stride(), *(_tied_strides(D, 2) if D is not None else (0, 0)),
            *(_tied_strides(dt_bias, 2) if dt_bias is not None else (0, 0)), *zz.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
            HAS_IDX=state_batch_indices is not None, BLOCK_P=BP, BLOCK_N=triton.next_power_of_2(n),
            COMPUTE=tl_dtype(f), num_warps=1)
    return y.to(x.dtype)
