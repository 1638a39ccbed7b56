"""The selective scan and the decoding step as Triton kernels.

Same contract as impls/selective/loop.py (the spec) and impls/selective/recurrent.py (the step); letters (b, d, l, n, g)
are defined in impls/frontdoor.py, the dtype policy too: half inputs are loaded and converted to
float32 at once, everything is computed in float32 (float64 for float64 inputs), y comes back in the
input dtype and every state in the compute dtype.

The recurrence, for one batch row and a block of BLOCK_D channels (Algorithm 2 of the Mamba paper,
Gu & Dao 2023; the official CUDA kernel is selectivescan_fwd_kernel in state-spaces/mamba)::

    h = initial_state[block] or 0                         # (BLOCK_D, n), kept in registers
    for t in 0 .. l-1:
        dt   = softplus(delta[:, t] + delta_bias)         # (BLOCK_D,)  threshold 20, both optional
        h    = exp(dt[:, None] * A) * h                   # Ā = exp(ΔA): decay (zero-order hold)
             + (dt * u[:, t])[:, None] * B[group, :, t]   # B̄ x = Δ B x (Euler, as the official kernels)
        y    = sum_n(h * C[group, :, t]) + D * u[:, t]    # readout and skip
        out[:, t] = y * silu(z[:, t])                     # gate
    last_state[block] = h

Each program owns one (batch row, block of channels) and walks time sequentially: the state never
leaves registers, and the only loop-carried dependency is one multiply-add per state element. Time
is not split across programs. (A ``tl.associative_scan`` within chunks is the other way on a GPU, but
Triton's interpreter runs a custom combine element by element, about 0.2 ms each, so CI could not
exercise it; the kernel that CI runs is the kernel that ships.) ``tl.range(num_stages=...)`` lets
the compiler prefetch the loads of later steps on a GPU; the interpreter ignores it.

The backward walks time in reverse. It needs h_{t-1} at every step; dividing by the decay to run the
recurrence backwards is unstable (the decay underflows to 0 under strong decay), so the forward
saves the state at the start of every CHUNK tokens and the backward, chunk by chunk from the last,
recomputes the chunk's states forward into a small scratch buffer and then walks it in reverse::

    dh = grad(last_state) or 0
    for t in l-1 .. 0:
        g      = grad(out)[:, t] * silu(z[:, t])          # gradient of y before the gate
        dh    += g[:, None] * C_t                         # y_t reads h_t
        dC_t  += sum over the group's channels of g h_t
        dz_t   = grad(out) * y * silu'(z)
        ddt    = sum_n dh * (A * exp(dt A) * h_{t-1} + u B_t)
        dA    += dh * exp(dt A) * h_{t-1} * dt
        du_t   = dt * sum_n(dh * B_t) + D * g;  dD += g u;  dB_t += sum over the group of dh dt u
        ddelta = ddt * sigmoid(delta + bias) (with softplus, below the threshold); ddelta_bias += ddelta
        dh     = exp(dt A) * dh                           # on to h_{t-1}
    grad(initial_state) = dh

B and C gradients are shared by every channel of a group: each program writes its partial sums
(reduced over its block when the block lies in one group, per channel otherwise) and torch adds
them up: deterministic, no atomics. dA, dD and ddelta_bias are summed over batch rows the same way.

Kernel conventions (after flash-linear-attention): ``p_`` pointers, ``b_`` block values, ``o_``
offsets, ``m_`` masks, ``i_`` program indices, ``s_`` strides. Every offset is computed in 64 bits
(program ids and channel indices are cast before any multiplication; time moves by pointer
increments): b·d·l beyond 2^31 elements must not wrap, as it did in the official kernels at 61K-512K
tokens. Sizes that are not powers of two (d = 37, n = 5) are padded to the block and masked.

Padding (_PADDING): d and n need not be powers of two, so a block has lanes beyond d or n. Their
loads read 0, but 0 is not harmless: with u = inf a padded state lane computes dt u B = inf * 0 = NaN,
and a readout summed over the block would turn a real inf into NaN. So every state and every
summand is zeroed outside (d, n) with tl.where before it is summed or carried: no padded lane
contributes to a real output, whatever the input (equivalence/test_triton.py pins n = 3 and 5).

Devices and Triton's interpreter (which runs these kernels on the CPU in CI): see
impls/triton_common.py, which also holds the elementwise functions (softplus, silu, sigmoid) and the
launcher helpers shared with the SSD kernels. Here the interpreter's differences are handled where
marked "interpreter:"; in particular nothing autotunes (the step must not: autotuning would apply
its in-place update more than once), the block sizes are chosen in ``CONFIG`` and ``_config``, and the per-chunk
scratch of the backward never races there, as programs run one after another; on a GPU each program
owns its scratch rows and a barrier separates writing them from reading them.
"""

import torch
from torch.autograd.function import once_differentiable

from ..frontdoor import compute_dtype
# first: importing it settles TRITON_INTERPRET, which triton reads when it is imported
from ..triton_common import INTERPRETED  # noqa: F401 (the tests read it here)
from ..triton_common import (host_tensors_on_a_gpu_machine, launch_config, quiet, result_dtype, sigmoid, silu, softplus,
                             tl_dtype)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

# Tokens between the states the forward saves for the backward (and the scratch the backward uses).
CHUNK = 16


# ---------------------------------------------------------------------------------------------
# Offsets, in 64 bits (the elementwise functions are in impls/triton_common.py)
# ---------------------------------------------------------------------------------------------

@triton.jit
def row_offsets(i_b, o_d, s_b, s_d):
    """Offsets of (batch row i_b, channels o_d) in a tensor of strides (s_b, s_d, ...), in int64.
    Cast first, multiply after: i_b * s_b alone is int32 and wraps past 2^31."""
    return tl.cast(i_b, tl.int64) * s_b + tl.cast(o_d, tl.int64) * s_d


@triton.jit
def state_offsets(i_b, o_d, o_n, d, n):
    """Offsets (BLOCK_D, BLOCK_N) of a contiguous (b, d, n) state, in int64."""
    return (tl.cast(i_b, tl.int64) * d + tl.cast(o_d, tl.int64))[:, None] * n + o_n[None, :]


# Sizes and strides are not specialised (Triton would compile a variant for every pattern of
# "equals 1" and "divisible by 16" among them): one compiled kernel per set of flags and dtypes.
_SIZES = ["d", "n", "l", "dpg_B", "dpg_C"]
_SCAN_STRIDES = ["s_ub", "s_ud", "s_ul", "s_tb", "s_td", "s_tl", "s_zb", "s_zd", "s_zl",
                 "s_Bb", "s_Bg", "s_Bn", "s_Bl", "s_Cb", "s_Cg", "s_Cn", "s_Cl"]


# ---------------------------------------------------------------------------------------------
# Forward kernel
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=_SIZES + _SCAN_STRIDES + ["s_yb", "s_yd", "s_yl"])
def scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,   # inputs
    y_ptr, last_ptr, ckpt_ptr,                                               # outputs
    d, n, l, dpg_B, dpg_C,                      # sizes; dpg: channels per group of B and of C
    s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_zb, s_zd, s_zl,                    # u, delta (t), z
    s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_yb, s_yd, s_yl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, SAVE_CKPT: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    i_b = tl.program_id(0)
    i_d = tl.program_id(1)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)              # this program's channels
    o_n = tl.arange(0, BLOCK_N)
    m_d = o_d < d
    m_dn = m_d[:, None] & (o_n < n)[None, :]                 # padding: d, n need not be powers of two

    # per-channel parameters, loaded once (A, D, delta_bias are contiguous: the launcher sees to it)
    o_dn = state_offsets(0, o_d, o_n, d, n)
    b_A = tl.load(A_ptr + o_dn, mask=m_dn, other=0.0).to(COMPUTE)
    if HAS_D:
        b_D = tl.load(D_ptr + o_d, mask=m_d, other=0.0).to(COMPUTE)
    if HAS_BIAS:
        b_bias = tl.load(bias_ptr + o_d, mask=m_d, other=0.0).to(COMPUTE)

    # pointers at t = 0; time then moves by pointer increments (64-bit pointer arithmetic)
    p_u = u_ptr + row_offsets(i_b, o_d, s_ub, s_ud)
    p_t = delta_ptr + row_offsets(i_b, o_d, s_tb, s_td)
    p_z = z_ptr + row_offsets(i_b, o_d, s_zb, s_zd)
    p_y = y_ptr + row_offsets(i_b, o_d, s_yb, s_yd)
    # B, C: channel c reads group c // dpg; a block may straddle groups, so gather (BLOCK_D, BLOCK_N)
    p_B = B_ptr + row_offsets(i_b, o_d // dpg_B, s_Bb, s_Bg)[:, None] + tl.cast(o_n, tl.int64)[None, :] * s_Bn
    p_C = C_ptr + row_offsets(i_b, o_d // dpg_C, s_Cb, s_Cg)[:, None] + tl.cast(o_n, tl.int64)[None, :] * s_Cn

    o_state = state_offsets(i_b, o_d, o_n, d, n)
    if HAS_H0:
        h = tl.load(h0_ptr + o_state, mask=m_dn, other=0.0).to(COMPUTE)
    else:
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=COMPUTE)
    # checkpoints: (b, cdiv(l, CHUNK), d, n), the state before tokens 0, CHUNK, 2 CHUNK, ...
    p_ck = ckpt_ptr + state_offsets(i_b * tl.cdiv(l, CHUNK), o_d, o_n, d, n)
    ck_step = tl.cast(d, tl.int64) * n

    for t in tl.range(0, l, num_stages=NUM_STAGES):
        if SAVE_CKPT:
            if t % CHUNK == 0:
                tl.store(p_ck, h, mask=m_dn)
                p_ck += ck_step
        # interpreter: bfloat16 arrives as raw 16-bit integers; .to(COMPUTE) converts it properly
        b_u = tl.load(p_u, mask=m_d, other=0.0).to(COMPUTE)
        b_dt = tl.load(p_t, mask=m_d, other=0.0).to(COMPUTE)
        if HAS_BIAS:
            b_dt = b_dt + b_bias
        if SOFTPLUS:
            b_dt = softplus(b_dt)
        b_B = tl.load(p_B, mask=m_dn, other=0.0).to(COMPUTE)
        b_C = tl.load(p_C, mask=m_dn, other=0.0).to(COMPUTE)

        b_dA = tl.exp(b_dt[:, None] * b_A)                               # Ā = exp(ΔA)
        h = b_dA * h + (b_dt * b_u)[:, None] * b_B                        # h_t = Ā h_{t-1} + ΔB x_t
        h = tl.where(m_dn, h, 0.0)                                        # padded lanes: see _PADDING
        b_y = tl.sum(h * b_C, axis=1)                                     # y_t = C_t h_t
        if HAS_D:
            b_y += b_D * b_u
        if HAS_Z:
            b_z = tl.load(p_z, mask=m_d, other=0.0).to(COMPUTE)
            b_y = b_y * silu(b_z)                                        # y silu(z)
        tl.store(p_y, b_y.to(y_ptr.dtype.element_ty), mask=m_d)

        p_u += s_ul
        p_t += s_tl
        p_z += s_zl
        p_y += s_yl
        p_B += s_Bl
        p_C += s_Cl
    tl.store(last_ptr + o_state, h, mask=m_dn)


# ---------------------------------------------------------------------------------------------
# Backward kernel
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=_SIZES + _SCAN_STRIDES + ["s_gb", "s_gd", "s_gl"])
def scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr,  # forward inputs, checkpoints
    gy_ptr, glast_ptr,                                                        # incoming gradients
    du_ptr, dt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr,  # outgoing gradients
    scratch_ptr,
    d, n, l, dpg_B, dpg_C,
    s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_zb, s_zd, s_zl,
    s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_gb, s_gd, s_gl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_GLAST: tl.constexpr, REDUCE_B: tl.constexpr, REDUCE_C: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr,
):
    i_b = tl.program_id(0)
    i_d = tl.program_id(1)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, BLOCK_N)
    m_d = o_d < d
    m_dn = m_d[:, None] & (o_n < n)[None, :]
    m_n = o_n < n

    o_dn = state_offsets(0, o_d, o_n, d, n)
    b_A = tl.load(A_ptr + o_dn, mask=m_dn, other=0.0).to(COMPUTE)
    if HAS_D:
        b_D = tl.load(D_ptr + o_d, mask=m_d, other=0.0).to(COMPUTE)
    if HAS_BIAS:
        b_bias = tl.load(bias_ptr + o_d, mask=m_d, other=0.0).to(COMPUTE)

    o_state = state_offsets(i_b, o_d, o_n, d, n)
    if HAS_GLAST:
        dh = tl.load(glast_ptr + o_state, mask=m_dn, other=0.0).to(COMPUTE)
    else:
        dh = tl.zeros([BLOCK_D, BLOCK_N], dtype=COMPUTE)
    acc_dA = tl.zeros([BLOCK_D, BLOCK_N], dtype=COMPUTE)
    acc_dD = tl.zeros([BLOCK_D], dtype=COMPUTE)
    acc_dbias = tl.zeros([BLOCK_D], dtype=COMPUTE)

    # Row pointers at t = 0. Inputs (u, delta, z, B, C, grad y) by their strides; the gradients
    # this kernel writes are contiguous: du, ddelta, dz (b, d, l); partial dB, dC (b, slots, l, n)
    # with one slot per block (REDUCE_*) or per channel.
    n_chunks = tl.cdiv(l, CHUNK)
    p_u0 = u_ptr + row_offsets(i_b, o_d, s_ub, s_ud)
    p_t0 = delta_ptr + row_offsets(i_b, o_d, s_tb, s_td)
    p_z0 = z_ptr + row_offsets(i_b, o_d, s_zb, s_zd)
    p_g0 = gy_ptr + row_offsets(i_b, o_d, s_gb, s_gd)
    o_out = row_offsets(i_b, o_d, tl.cast(d, tl.int64) * l, l)
    p_B0 = B_ptr + row_offsets(i_b, o_d // dpg_B, s_Bb, s_Bg)[:, None] + tl.cast(o_n, tl.int64)[None, :] * s_Bn
    p_C0 = C_ptr + row_offsets(i_b, o_d // dpg_C, s_Cb, s_Cg)[:, None] + tl.cast(o_n, tl.int64)[None, :] * s_Cn
    if REDUCE_B:
        p_dB0 = dB_ptr + row_offsets(i_b, i_d, tl.cast(tl.num_programs(1), tl.int64) * l * n, tl.cast(l, tl.int64) * n) + o_n
    else:
        p_dB0 = dB_ptr + row_offsets(i_b, o_d, tl.cast(d, tl.int64) * l * n, tl.cast(l, tl.int64) * n)[:, None] + o_n[None, :]
    if REDUCE_C:
        p_dC0 = dC_ptr + row_offsets(i_b, i_d, tl.cast(tl.num_programs(1), tl.int64) * l * n, tl.cast(l, tl.int64) * n) + o_n
    else:
        p_dC0 = dC_ptr + row_offsets(i_b, o_d, tl.cast(d, tl.int64) * l * n, tl.cast(l, tl.int64) * n)[:, None] + o_n[None, :]
    # this program's scratch: CHUNK states (BLOCK_D, BLOCK_N), laid out (programs, CHUNK, BLOCK_D, BLOCK_N)
    i_prog = tl.cast(i_b, tl.int64) * tl.num_programs(1) + i_d
    o_tile = (tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + o_n[None, :])
    p_s0 = scratch_ptr + i_prog * (CHUNK * BLOCK_D * BLOCK_N) + o_tile
    p_ck = ckpt_ptr + state_offsets(i_b * n_chunks + n_chunks - 1, o_d, o_n, d, n)
    ck_step = tl.cast(d, tl.int64) * n

    for kk in range(0, n_chunks):
        # chunk k = n_chunks-1-kk covers tokens t0 .. t0+len-1
        t0 = tl.cast((n_chunks - 1 - kk) * CHUNK, tl.int64)
        length = tl.minimum(l - (n_chunks - 1 - kk) * CHUNK, CHUNK)

        # pass 1: recompute the chunk's states forward from its checkpoint, saving h_{t-1}
        h = tl.load(p_ck, mask=m_dn, other=0.0).to(COMPUTE)
        p_ck -= ck_step
        p_u = p_u0 + t0 * s_ul
        p_t = p_t0 + t0 * s_tl
        p_B = p_B0 + t0 * s_Bl
        p_s = p_s0
        for i in range(0, length):
            tl.store(p_s, h)
            b_u = tl.load(p_u, mask=m_d, other=0.0).to(COMPUTE)
            b_dt = tl.load(p_t, mask=m_d, other=0.0).to(COMPUTE)
            if HAS_BIAS:
                b_dt = b_dt + b_bias
            if SOFTPLUS:
                b_dt = softplus(b_dt)
            b_B = tl.load(p_B, mask=m_dn, other=0.0).to(COMPUTE)
            h = tl.where(m_dn, tl.exp(b_dt[:, None] * b_A) * h + (b_dt * b_u)[:, None] * b_B, 0.0)
            p_s += BLOCK_D * BLOCK_N
            p_u += s_ul
            p_t += s_tl
            p_B += s_Bl
        tl.debug_barrier()  # the scratch rows just written are read below (same thread, same layout)

        # pass 2: walk the chunk in reverse, from its last token
        t_last = t0 + length - 1
        p_u -= s_ul
        p_t -= s_tl
        p_B -= s_Bl
        p_s -= BLOCK_D * BLOCK_N
        p_z = p_z0 + t_last * s_zl
        p_g = p_g0 + t_last * s_gl
        p_C = p_C0 + t_last * s_Cl
        o_t = o_out + t_last
        p_dB = p_dB0 + t_last * n
        p_dC = p_dC0 + t_last * n
        for i in range(0, length):
            h_prev = tl.load(p_s)
            b_u = tl.load(p_u, mask=m_d, other=0.0).to(COMPUTE)
            b_x = tl.load(p_t, mask=m_d, other=0.0).to(COMPUTE)
            if HAS_BIAS:
                b_x = b_x + b_bias
            if SOFTPLUS:
                b_dt = softplus(b_x)
            else:
                b_dt = b_x
            b_B = tl.load(p_B, mask=m_dn, other=0.0).to(COMPUTE)
            b_C = tl.load(p_C, mask=m_dn, other=0.0).to(COMPUTE)
            b_gy = tl.load(p_g, mask=m_d, other=0.0).to(COMPUTE)

            b_dA = tl.exp(b_dt[:, None] * b_A)
            h = tl.where(m_dn, b_dA * h_prev + (b_dt * b_u)[:, None] * b_B, 0.0)   # h_t, recomputed
            if HAS_Z:
                b_z = tl.load(p_z, mask=m_d, other=0.0).to(COMPUTE)
                b_sig = sigmoid(b_z)
                b_y = tl.sum(h * b_C, axis=1)
                if HAS_D:
                    b_y += b_D * b_u
                # d/dz of y z sigmoid(z) = y sigmoid(z) (1 + z (1 - sigmoid(z)))
                tl.store(dz_ptr + o_t, b_gy * b_y * b_sig * (1.0 + b_z * (1.0 - b_sig)), mask=m_d)
                b_g = b_gy * silu(b_z)                                   # gradient of y before the gate
            else:
                b_g = b_gy

            dh = tl.where(m_dn, dh + b_g[:, None] * b_C, 0.0)             # y_t reads h_t
            contrib_C = tl.where(m_dn, b_g[:, None] * h, 0.0)
            if REDUCE_C:
                tl.store(p_dC, tl.sum(contrib_C, axis=0), mask=m_n)
            else:
                tl.store(p_dC, contrib_C, mask=m_dn)
            b_dtu = b_dt * b_u
            contrib_B = tl.where(m_dn, dh * b_dtu[:, None], 0.0)
            if REDUCE_B:
                tl.store(p_dB, tl.sum(contrib_B, axis=0), mask=m_n)
            else:
                tl.store(p_dB, contrib_B, mask=m_dn)
            dh_dA = dh * b_dA * h_prev
            b_ddt = tl.sum(tl.where(m_dn, dh_dA * b_A + dh * b_B * b_u[:, None], 0.0), axis=1)
            acc_dA += dh_dA * b_dt[:, None]
            b_du = tl.sum(tl.where(m_dn, dh * b_B, 0.0), axis=1) * b_dt
            if HAS_D:
                b_du += b_D * b_g
                acc_dD += b_g * b_u
            if SOFTPLUS:
                b_ddt = tl.where(b_x > 20.0, b_ddt, b_ddt * sigmoid(b_x))
            acc_dbias += b_ddt
            tl.store(du_ptr + o_t, b_du, mask=m_d)
            tl.store(dt_ptr + o_t, b_ddt, mask=m_d)
            dh = tl.where(m_dn, b_dA * dh, 0.0)                           # on to h_{t-1}

            p_s -= BLOCK_D * BLOCK_N
            p_u -= s_ul
            p_t -= s_tl
            p_B -= s_Bl
            p_C -= s_Cl
            p_z -= s_zl
            p_g -= s_gl
            o_t -= 1
            p_dB -= n
            p_dC -= n
        tl.debug_barrier()  # the next chunk rewrites the scratch

    tl.store(dh0_ptr + o_state, dh, mask=m_dn)
    tl.store(dA_ptr + o_state, acc_dA, mask=m_dn)            # per batch row: (b, d, n), summed by torch
    o_bd = tl.cast(i_b, tl.int64) * d + o_d
    if HAS_D:
        tl.store(dD_ptr + o_bd, acc_dD, mask=m_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + o_bd, acc_dbias, mask=m_d)


# ---------------------------------------------------------------------------------------------
# Step kernel (decoding): one token, state updated in place. Like the official
# selective_state_update: grid (channel blocks, batch), the whole n per program, no autotuning.
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["d", "n", "dpg_B", "dpg_C", "s_hb", "s_hd", "s_hn", "s_xb", "s_xd", "s_tb",
                                "s_td", "s_zb", "s_zd", "s_Bb", "s_Bg", "s_Bn", "s_Cb", "s_Cg", "s_Cn"])
def step_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
    d, n, dpg_B, dpg_C,
    s_hb, s_hd, s_hn, s_xb, s_xd, s_tb, s_td, s_zb, s_zd, s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr,
):
    i_d = tl.program_id(0)
    i_b = tl.program_id(1)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, BLOCK_N)
    m_d = o_d < d
    m_dn = m_d[:, None] & (o_n < n)[None, :]
    o_n64 = tl.cast(o_n, tl.int64)[None, :]

    p_h = state_ptr + row_offsets(i_b, o_d, s_hb, s_hd)[:, None] + o_n64 * s_hn
    h = tl.load(p_h, mask=m_dn, other=0.0).to(COMPUTE)
    b_A = tl.load(A_ptr + state_offsets(0, o_d, o_n, d, n), mask=m_dn, other=0.0).to(COMPUTE)
    b_x = tl.load(x_ptr + row_offsets(i_b, o_d, s_xb, s_xd), mask=m_d, other=0.0).to(COMPUTE)
    b_dt = tl.load(dt_ptr + row_offsets(i_b, o_d, s_tb, s_td), mask=m_d, other=0.0).to(COMPUTE)
    if HAS_BIAS:
        b_dt += tl.load(bias_ptr + o_d, mask=m_d, other=0.0).to(COMPUTE)
    if SOFTPLUS:
        b_dt = softplus(b_dt)
    b_B = tl.load(B_ptr + row_offsets(i_b, o_d // dpg_B, s_Bb, s_Bg)[:, None] + o_n64 * s_Bn,
                  mask=m_dn, other=0.0).to(COMPUTE)
    b_C = tl.load(C_ptr + row_offsets(i_b, o_d // dpg_C, s_Cb, s_Cg)[:, None] + o_n64 * s_Cn,
                  mask=m_dn, other=0.0).to(COMPUTE)

    h = tl.where(m_dn, tl.exp(b_dt[:, None] * b_A) * h + (b_dt * b_x)[:, None] * b_B, 0.0)  # see _PADDING
    tl.store(p_h, h.to(state_ptr.dtype.element_ty), mask=m_dn)      # in place
    b_y = tl.sum(h * b_C, axis=1)
    if HAS_D:
        b_y += tl.load(D_ptr + o_d, mask=m_d, other=0.0).to(COMPUTE) * b_x
    if HAS_Z:
        b_z = tl.load(z_ptr + row_offsets(i_b, o_d, s_zb, s_zd), mask=m_d, other=0.0).to(COMPUTE)
        b_y = b_y * silu(b_z)
    tl.store(y_ptr + tl.cast(i_b, tl.int64) * d + o_d, b_y.to(y_ptr.dtype.element_ty), mask=m_d)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

# Launch configuration per machine. On a GPU, small channel blocks give many programs (b·d/BLOCK_D)
# to hide the latency of the sequential walk; the interpreter runs programs one after another at a
# fixed cost per operation, so there a block covers up to 32 channels. The kernels are the same.
CONFIG = launch_config(dict(block_d=16, num_warps=1, num_stages=3, bwd_block_d=16, bwd_num_warps=1),
                       dict(block_d=32, num_warps=1, num_stages=1, bwd_block_d=32, bwd_num_warps=1))


def _config(d, key):
    value = CONFIG[key]
    if key in ("block_d", "bwd_block_d"):
        value = min(value, triton.next_power_of_2(d))
    return value


def _as_grouped(X):
    """B, C as (b, g, n, ...): the ungrouped (b, n, ...) is one group."""
    return X if X.dim() == 4 else X[:, None]


def _contiguous(x):
    return None if x is None else x.contiguous()


def _dummy(like):
    """A pointer for an absent optional tensor: never dereferenced (its HAS_ flag is off)."""
    return like


def _scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save_checkpoints):
    """Launch the forward kernel. Returns y (b, d, l) in u's dtype, last_state (b, d, n) in the
    compute dtype, and the checkpoints (b, cdiv(l, CHUNK), d, n) or None."""
    b, d, l = u.shape
    n = A.shape[1]
    f = compute_dtype(u.dtype)
    B4, C4 = _as_grouped(B), _as_grouped(C)
    A, D, delta_bias, initial_state = (_contiguous(x) for x in (A, D, delta_bias, initial_state))
    zz = z if z is not None else u
    y = torch.empty(b, d, l, dtype=result_dtype(u.dtype), device=u.device)
    last = torch.empty(b, d, n, dtype=f, device=u.device)
    ckpt = (torch.empty(b, triton.cdiv(l, CHUNK), d, n, dtype=f, device=u.device)
            if save_checkpoints else None)
    BLOCK_D = _config(d, "block_d")
    grid = (b, triton.cdiv(d, BLOCK_D))
    with quiet():
        scan_fwd_kernel[grid](
            u, delta, A, B4, C4, D if D is not None else _dummy(A), zz,
            delta_bias if delta_bias is not None else _dummy(A),
            initial_state if initial_state is not None else _dummy(last),
            y, last, ckpt if ckpt is not None else _dummy(last),
            d, n, l, d // B4.shape[1], d // C4.shape[1],
            *u.stride(), *delta.stride(), *zz.stride(), *B4.stride(), *C4.stride(), *y.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
            HAS_H0=initial_state is not None, SAVE_CKPT=save_checkpoints, CHUNK=CHUNK,
            BLOCK_D=BLOCK_D, BLOCK_N=triton.next_power_of_2(n), COMPUTE=tl_dtype(f),
            NUM_STAGES=_config(d, "num_stages"), num_warps=_config(d, "num_warps"),
        )
    return y.to(u.dtype), last, ckpt


def _group_sum(part, g, b, d, n, l):
    """Partial B/C gradients (b, slots, l, n) -> (b, g, n, l): slots are blocks lying in one group
    each (reduced) or channels."""
    return part.view(b, g, -1, l, n).sum(2).transpose(-1, -2)


def _scan_backward(saved, gy, glast):
    """Launch the backward kernel; returns the gradients of (u, delta, A, B, C, D, z, delta_bias,
    initial_state) as the inputs' shapes and dtypes."""
    u, delta, A, B, C, D, z, delta_bias, ckpt, delta_softplus = saved
    A, D, delta_bias = (_contiguous(x) for x in (A, D, delta_bias))
    b, d, l = u.shape
    n = A.shape[1]
    f = compute_dtype(u.dtype)
    B4, C4 = _as_grouped(B), _as_grouped(C)
    gB, gC = B4.shape[1], C4.shape[1]
    BLOCK_D = _config(d, "bwd_block_d")
    BLOCK_N = triton.next_power_of_2(n)
    n_blocks = triton.cdiv(d, BLOCK_D)
    # a block lies in one group when there is one group, or when blocks tile each group exactly
    reduce_B = gB == 1 or (d // gB) % BLOCK_D == 0
    reduce_C = gC == 1 or (d // gC) % BLOCK_D == 0
    dev = u.device
    du, ddelta = (torch.empty(b, d, l, dtype=f, device=dev) for _ in range(2))
    dz = torch.empty(b, d, l, dtype=f, device=dev) if z is not None else None
    dB_part = torch.empty(b, n_blocks if reduce_B else d, l, n, dtype=f, device=dev)
    dC_part = torch.empty(b, n_blocks if reduce_C else d, l, n, dtype=f, device=dev)
    dA_part, dh0 = (torch.empty(b, d, n, dtype=f, device=dev) for _ in range(2))
    dD_part = torch.empty(b, d, dtype=f, device=dev) if D is not None else None
    dbias_part = torch.empty(b, d, dtype=f, device=dev) if delta_bias is not None else None
    scratch = torch.empty(b * n_blocks, CHUNK, BLOCK_D, BLOCK_N, dtype=f, device=dev)
    zz = z if z is not None else u
    with quiet():
        scan_bwd_kernel[(b, n_blocks)](
            u, delta, A, B4, C4, D if D is not None else _dummy(A), zz,
            delta_bias if delta_bias is not None else _dummy(A), ckpt,
            gy, glast if glast is not None else _dummy(dh0),
            du, ddelta, dz if dz is not None else _dummy(du), dB_part, dC_part, dA_part,
            dD_part if dD_part is not None else _dummy(dA_part),
            dbias_part if dbias_part is not None else _dummy(dA_part), dh0, scratch,
            d, n, l, d // gB, d // gC,
            *u.stride(), *delta.stride(), *zz.stride(), *B4.stride(), *C4.stride(), *gy.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
            HAS_GLAST=glast is not None, REDUCE_B=reduce_B, REDUCE_C=reduce_C, CHUNK=CHUNK,
            BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, COMPUTE=tl_dtype(f), num_warps=_config(d, "bwd_num_warps"),
        )
    dB = _group_sum(dB_part, gB, b, d, n, l)
    dC = _group_sum(dC_part, gC, b, d, n, l)
    if B.dim() == 3:
        dB = dB[:, 0]
    if C.dim() == 3:
        dC = dC[:, 0]
    return (du.to(u.dtype), ddelta.to(delta.dtype), dA_part.sum(0).to(A.dtype), dB.to(B.dtype),
            dC.to(C.dtype), None if D is None else dD_part.sum(0).to(D.dtype),
            None if z is None else dz.to(z.dtype),
            None if delta_bias is None else dbias_part.sum(0).to(delta_bias.dtype), dh0)


def _step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    b, d = x.shape
    n = A.shape[1]
    f = compute_dtype(x.dtype)
    B3 = B if B.dim() == 3 else B[:, None]
    C3 = C if C.dim() == 3 else C[:, None]
    A, D, dt_bias = (_contiguous(t) for t in (A, D, dt_bias))
    zz = z if z is not None else x
    y = torch.empty(b, d, dtype=result_dtype(x.dtype), device=x.device)
    BLOCK_D = _config(d, "block_d")
    with quiet():
        step_kernel[(triton.cdiv(d, BLOCK_D), b)](
            state, x, dt, A, B3, C3, D if D is not None else _dummy(A), zz,
            dt_bias if dt_bias is not None else _dummy(A), y,
            d, n, d // B3.shape[1], d // C3.shape[1],
            *state.stride(), *x.stride(), *dt.stride(), *zz.stride(), *B3.stride(), *C3.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
            BLOCK_D=BLOCK_D, BLOCK_N=triton.next_power_of_2(n), COMPUTE=tl_dtype(f),
            num_warps=_config(d, "num_warps"),
        )
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------

class _SelectiveScan(torch.autograd.Function):
    """Forward saves the inputs and the chunk checkpoints; backward runs the reverse-time kernel."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
        y, last, ckpt = _scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                      save_checkpoints=True)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
        ctx.delta_softplus = delta_softplus
        ctx.has_initial_state = initial_state is not None
        ctx.set_materialize_grads(False)  # an unused output's gradient is None, not zeros
        return y, last

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, glast):
        u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        if gy is None:
            gy = torch.zeros_like(u)
        grads = _scan_backward((u, delta, A, B, C, D, z, delta_bias, ckpt, ctx.delta_softplus), gy,
                               None if glast is None else glast.contiguous())
        dh0 = grads[-1] if ctx.has_initial_state else None
        return (*grads[:-1], dh0, None)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------

def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False):
    """Selective scan by the Triton kernels (forward, and backward through autograd).

    Args:
        u, delta: (b, d, l); A: (d, n); B, C: (b, n, l) or (b, g, n, l)
        D, delta_bias: (d,) optional; z: (b, d, l) optional; initial_state: (b, d, n) optional
        delta_softplus: softplus (threshold 20) on delta + delta_bias
    Returns:
        y: (b, d, l) in u's dtype; with return_last_state, (y, last_state (b, d, n) in the compute dtype),
        on u's device (CPU tensors on a machine with a GPU run there: host_tensors_on_a_gpu_machine)
    """
    b, d, l = u.shape
    if u.numel() == 0:
        last = (initial_state.to(compute_dtype(u.dtype)) if initial_state is not None
                else torch.zeros(b, d, A.shape[1], dtype=compute_dtype(u.dtype), device=u.device))
        y = u.new_empty(b, d, l)
        return (y, last) if return_last_state else y
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if host_tensors_on_a_gpu_machine(u):
        moved = [None if t is None else t.to("cuda") for t in inputs]
        y, last = selective_scan(*moved, delta_softplus=delta_softplus, return_last_state=True)
        y, last = y.to(u.device), last.to(u.device)
        return (y, last) if return_last_state else y
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        y, last = _SelectiveScan.apply(*inputs, bool(delta_softplus))
    else:
        y, last, _ = _scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                   save_checkpoints=False)
    return (y, last) if return_last_state else y


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decoding step by the Triton step kernel: ``state`` advanced by one token in place.

    Args:
        state: (b, d, n) in the compute dtype, any strides, overwritten with the new state
        x, dt: (b, d); A: (d, n); B, C: (b, n) or (b, g, n); D, dt_bias: (d,) optional; z: (b, d) optional
    Returns:
        y: (b, d) in x's dtype
    """
    if host_tensors_on_a_gpu_machine(x):
        moved = [None if t is None else t.to("cuda") for t in (x, dt, A, B, C, D, z, dt_bias)]
        state_gpu = state.to("cuda")
        y = _step(state_gpu, *moved, dt_softplus)
        state.copy_(state_gpu)
        return y.to(x.device)
    return _step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
