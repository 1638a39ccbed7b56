"""The SSD chunked scan in plain PyTorch: quadratic within a chunk, a short state pass between.

The algorithm of the Mamba-2 paper (Dao & Gu 2024, Section 6, "Hardware-efficient algorithm for
SSD", and its Listing 1), in the shapes of the official ``mamba_chunk_scan_combined``; letters in
impls/ssd/frontdoor.py, T = the chunk length. With a_t = dt_t A (the log-decay of token t, per head)
and the segment sum  s(i, j) = a_{j+1} + ... + a_i  (i >= j, in one chunk):

    1. intra-chunk (the quadratic, attention-like form):
           y_i += sum_{j <= i} (C_i . B_j) exp(s(i, j)) dt_j x_j
    2. chunk states from zero:  S_k = sum_j exp(s(T-1, j)) dt_j x_j (x) B_j
    3. the state pass, one chunk after another, in the compute dtype:
           H_k = exp(a_0 + ... + a_{T-1}) H_{k-1} + S_k      (H_{-1} = initial_states)
    4. inter-chunk readout:  y_i += exp(a_0 + ... + a_i) C_i H_{k-1}

Traps avoided, each of which someone has fallen into:
    - Every segment sum is accumulated from zero over exactly its own terms (a masked cumulative sum),
      never as the difference of two prefix sums, which under strong decay cancels away the small
      sums and their precision, and never as exp(cumsum_i) / exp(cumsum_j): dividing by a
      cumulative decay underflows to 0/0 or overflows.
    - exp is never taken of a positive non-causal entry (j > i): those entries are sums of no terms
      (0) before the exp and zeroed by a mask after it; nothing is clamped, so a positive A gives the
      loop's (growing) result rather than a silently clamped one.
    - The state pass runs sequentially in the compute dtype, so it is as exact as the loop (the
      official torch reference computes it through exp of chunk segment sums and warns that it is
      "much less numerically stable").
    - Masked entries are set by a select (torch.where, triu_), not multiplied by 0: a NaN or inf
      in a later token's B, C or dt must not reach an earlier output. A non-finite x is the one input that the
      intra-chunk matmul would still smear over its chunk's earlier tokens (0 x inf is NaN), so
      where x has one, that matmul runs on x with non-finite entries zeroed and each output from
      the bad token on, in its channel, is made NaN, as the loop's is.
    - chunk_size is any positive integer and l need not be a multiple of it: the last, shorter chunk
      is run with its own length (no padding copy).

Chunks are processed in blocks of about BLOCK_TOKENS tokens, carrying the state from block to
block, so memory beyond the inputs and the output is a few chunks' worth whatever l is (the
(T, T) intra-chunk matrices of one block, and the states of its chunks).

Differentiable for every input: the chunks by a hand-written backward (_block_backward, the same
steps in reverse, checked against float64 autograd through the loop), the dt pipeline, D and z by
autograd. Forward and backward take about 3x the forward without gradients (autograd through the
block took about 4x).
"""

import math

import torch
import torch.nn.functional as F

from . import varlen
from ..frontdoor import compute_dtype
from .loop import effective_dt, skip

BLOCK_TOKENS = 512  # tokens per block of chunks (at least one chunk)


def _block(x, a, dt, B, C, state, T, saved=None):
    """One block of K whole chunks of T tokens, without an autograd graph (intermediates are
    reused in place: about a third fewer passes over memory than out-of-place ops).

    x: (b, m, h, p) in the compute dtype, m = K T; a, dt: (b, m, h) log-decay and step size;
    B, C: (b, m, g, n) in the compute dtype; state: (b, h, p, n) the state before the block;
    saved: a dict to keep what _block_backward needs (the decays and the chunk states), or None.
    Returns (y (b, m, h, p) without the D and z terms, the state after the block).
    """
    b, m, h, p = x.shape
    g, n = B.shape[-2:]
    K, hg = m // T, h // g
    # per head and chunk, time innermost (cumulative sums along the last axis are the fast ones)
    a = a.reshape(b, K, T, h).permute(0, 3, 1, 2).contiguous()             # (b, h, K, T)
    dt = dt.reshape(b, K, T, h).permute(0, 3, 1, 2)                        # (b, h, K, T)
    Bc = B.reshape(b, K, T, g, n).permute(0, 3, 1, 2, 4)                   # (b, g, K, T, n)
    Cc = C.reshape(b, K, T, g, n).permute(0, 3, 1, 2, 4)

    # seg[j, i] = s(i, j) = a_{j+1} + ... + a_i for i > j, accumulated from zero; 0 for i <= j
    # (a copy and triu_ select, 1.1x-4x faster than torch.where with a broadcast mask)
    seg = a.new_empty(b, h, K, T, T).copy_(a[..., None, :].expand(b, h, K, T, T)).triu_(1).cumsum_(-1)
    # a decay below the smallest normal float is set to exactly 0 (exp(-inf)) rather than to a
    # subnormal: an error below 1.2e-38 per decay (float32), as the loop's own underflow, where
    # subnormals made exp and every product after it 3x slower here. NaN stays NaN.
    F.threshold_(seg, math.log(torch.finfo(seg.dtype).tiny), -math.inf)
    from_start = a.cumsum(-1).exp_()                                     # exp(a_0 + ... + a_i)
    w = seg[..., -1].exp() * dt                                          # exp(s(T-1, j)) dt_j

    # 1. intra-chunk: Mt[j, i] = (B_j . C_i) exp(s(i, j)) dt_j, i >= j (transposed: j is the row),
    #    the non-causal entries set by a mask, never multiplied by 0 (a NaN in B_j or dt_j, j > i,
    #    must not reach y_i)
    BC = torch.matmul(Bc, Cc.transpose(-1, -2))[:, :, None]              # (b, g, 1, K, T, T) [j, i]
    L = seg.exp_()                                                       # exp(s(i, j)) where i >= j
    Mt = (L * dt[..., None] if saved is not None else L.mul_(dt[..., None])).view(b, g, hg, K, T, T)
    Mt = Mt.mul_(BC).triu_().view(b, h, K, T, T)  # triu_ keeps i >= j (a select, 2x masked_fill's speed)
    X = x.reshape(b, K, T, h, p).permute(0, 3, 1, 2, 4)                  # (b, h, K, T, p)
    # a non-finite x makes the sum non-finite (a finite sum that overflows only takes the slow path)
    finite = bool(torch.isfinite(x.sum()))
    X_diag = X if finite else torch.where(torch.isfinite(X), X, 0.0)
    y_diag = torch.matmul(Mt.transpose(-1, -2), X_diag)                  # (b, h, K, T, p)
    if not finite:  # NaN from the bad token on, in its channel and chunk (later chunks get it via the state)
        seen = (~torch.isfinite(X)).cumsum(3) > 0
        y_diag = y_diag + torch.where(seen, float("nan"), 0.0)

    # 2. each chunk's state from zero, heads of a group folded into one matmul with the group's B
    XW = (X * w[..., None]).permute(0, 2, 3, 1, 4).reshape(b, K, T, g, hg * p).permute(0, 3, 1, 4, 2)
    S = torch.matmul(XW, Bc).view(b, g, K, hg, p, n)                    # (b, g, K, hg, p, n)

    # 3. the state pass, sequential (as exact as the loop): H[k] is the state before chunk k
    total = from_start[..., -1].view(b, g, hg, K)[..., None, None]      # each chunk's whole decay
    H = torch.empty(b, g, K + 1, hg, p, n, dtype=x.dtype, device=x.device)
    H[:, :, 0] = state.reshape(b, g, hg, p, n)
    for k in range(K):
        torch.addcmul(S[:, :, k], H[:, :, k], total[:, :, :, k], out=H[:, :, k + 1])
    state, H = H[:, :, K], H[:, :, :K]

    # 4. inter-chunk readout: exp(a_0 + ... + a_i) C_i H_{k-1}, plus the intra-chunk part
    raw = torch.matmul(Cc, H.reshape(b, g, K, hg * p, n).transpose(-1, -2)).view(b, g, K, T, hg, p)
    E = from_start.view(b, g, hg, K, T).permute(0, 1, 3, 4, 2)[..., None]
    y = raw * E if saved is not None else raw.mul_(E)  # the backward needs C_i H_k itself
    y = y.add_(y_diag.view(b, g, hg, K, T, p).permute(0, 1, 3, 4, 2, 5))  # (b, g, K, T, hg, p)
    if saved is not None:
        saved.update(L=L, Mt=Mt, w=w, from_start=from_start, total=total, H=H, X=X, XW=XW, Bc=Bc, Cc=Cc, dt=dt, T=T,
                     raw=raw, BC=BC)
    return y.permute(0, 2, 3, 1, 4, 5).reshape(b, m, h, p), state.reshape(b, h, p, n)


def _block_backward(sv, gy, g_after):
    """The gradients of one block, from what _block saved: the chain rule through steps 4 to 1 in
    reverse, the state pass backwards over the chunks. gy: (b, m, h, p) gradient of the block's y;
    g_after: (b, h, p, n) gradient of the state after it.
    Returns the gradients of (x, a, dt, B, C) in _block's layouts and of the state before the block.

    With u = what a gradient is taken of: y_i = Σ_j Mt[j, i] x_j + E_i C_i H_k (E = from_start),
    Mt[j, i] = (B_j . C_i) L[j, i] dt_j, S_k = Σ_j w_j x_j (x) B_j with w_j = L[j, T-1] dt_j,
    H_{k+1} = E_{T-1} H_k + S_k, and a reaches L through s(i, j) = a_{j+1} + ... + a_i and E through
    its cumulative sum; every sum over tokens is a cumulative sum or a matmul, no division.
    """
    L, Mt, w, E, total, H, X, XW, Bc, Cc, dt, T, raw, BC = (
        sv[k] for k in ("L", "Mt", "w", "from_start", "total", "H", "X", "XW", "Bc", "Cc", "dt", "T", "raw", "BC"))
    b, h, K, _, p = X.shape
    g, n = Bc.shape[1], Bc.shape[-1]
    hg, m = h // g, K * T
    gy_g = gy.reshape(b, K, T, g, hg, p).permute(0, 3, 1, 2, 4, 5)      # (b, g, K, T, hg, p)
    E_g = E.view(b, g, hg, K, T).permute(0, 1, 3, 4, 2)[..., None]      # (b, g, K, T, hg, 1)

    # 4. readout y_i += E_i C_i H_k: gradients of E, C and H (heads of a group folded)
    Hf = H.reshape(b, g, K, hg * p, n)
    gE = (gy_g * raw).sum(-1).permute(0, 1, 4, 2, 3).reshape(b, h, K, T)   # d/dE_i
    gyE = (gy_g * E_g).reshape(b, g, K, T, hg * p)
    gH_read = torch.matmul(gyE.transpose(-1, -2), Cc).view(b, g, K, hg, p, n)
    gC = torch.matmul(gyE, Hf)                                           # (b, g, K, T, n)

    # 3. the state pass backwards: H_{k+1} = total_k H_k + S_k
    gH = g_after.reshape(b, g, hg, p, n)
    gS = torch.empty(b, g, K, hg, p, n, dtype=X.dtype, device=X.device)
    gtotal = torch.empty(b, g, hg, K, dtype=X.dtype, device=X.device)
    for k in reversed(range(K)):
        gS[:, :, k] = gH
        gtotal[..., k] = (gH * H[:, :, k]).sum((-1, -2))
        gH = torch.addcmul(gH_read[:, :, k], gH, total[:, :, :, k])
    g_before = gH.reshape(b, h, p, n)

    # 2. S_k = XW^T B: gradients of x (through w_j x_j), w and B
    P = torch.matmul(Bc, gS.view(b, g, K, hg * p, n).transpose(-1, -2))   # (b, g, K, T, hg p): gS_k B_j
    P = P.view(b, g, K, T, hg, p).permute(0, 1, 4, 2, 3, 5).reshape(b, h, K, T, p)
    gX = P * w[..., None]
    gw = (P * X).sum(-1)                                                 # (b, h, K, T)
    gB = torch.matmul(XW.transpose(-1, -2), gS.view(b, g, K, hg * p, n))  # (b, g, K, T, n)

    # 1. y_diag = Mt^T X: gradients of x and Mt; Mt = BC L dt_j
    gy_h = gy.reshape(b, K, T, h, p).permute(0, 3, 1, 2, 4)              # (b, h, K, T, p)
    gX += torch.matmul(Mt, gy_h)
    gMt = torch.matmul(X, gy_h.transpose(-1, -2)).triu_()               # [j, i] = x_j . gy_i, i >= j
    gML = gMt.mul_(L).view(b, g, hg, K, T, T)                            # gMt L (in place: no new (T, T) buffers)
    R = (gML * BC).view(b, h, K, T, T)                                   # gMt L BC: d/dlog L, before dt_j
    gBC = gML.mul_(dt.reshape(b, g, hg, K, T)[..., None]).sum(2)         # (b, g, K, T, T)
    gdt = R.sum(-1) + gw * L[..., -1]                                    # Mt and w are linear in dt_j
    gseg = R.mul_(dt[..., None])
    gseg[..., -1] += gw * w
    gB += torch.matmul(gBC, Cc)
    gC += torch.matmul(gBC.transpose(-1, -2), Bc)

    # a: s(i, j) sums a_r over j < r <= i; log E_i sums a_r over r <= i (total = E_{T-1})
    # after[j, c] = Σ_{i >= r} gseg[j, i] with r = T-1-c (one flip of the (T, T) matrix, not two)
    after = gseg.flip(-1).cumsum_(-1)
    later_flipped = torch.ones(T, T, dtype=torch.bool, device=X.device).triu(1).flip(-1)  # [j, c]: r > j
    ga = torch.where(later_flipped, after, 0.0).sum(-2).flip(-1)         # Σ_{j < r}
    gE = gE * E
    gE[..., -1] += gtotal.reshape(b, h, K) * E[..., -1]
    ga += gE.flip(-1).cumsum(-1).flip(-1)

    def tokens(t):  # (b, h, K, T, ...) -> (b, m, h, ...)
        return t.movedim(1, 3).reshape(b, m, h, *t.shape[4:])

    def group_tokens(t):  # (b, g, K, T, n) -> (b, m, g, n)
        return t.permute(0, 2, 3, 1, 4).reshape(b, m, g, n)

    return tokens(gX), tokens(ga), tokens(gdt), group_tokens(gB), group_tokens(gC), g_before


class _ChunkedScan(torch.autograd.Function):
    """The block loop with a hand-written backward: the forward without an autograd graph (in
    place), keeping per block the decays, the intra-chunk matrix and the chunk states; the backward
    block by block in reverse. Autograd through the same code took about 4x the forward without
    gradients, from its many small saved intermediates and zero-filled slices."""

    @staticmethod
    def forward(ctx, x, a, dt, B, C, state, bounds):
        ctx.bounds, ctx.saved = bounds, []
        ys = []
        for s, e, t in bounds:
            sv = {}
            y, state = _block(x[:, s:e], a[:, s:e], dt[:, s:e], B[:, s:e], C[:, s:e], state, t, sv)
            ctx.saved.append(sv)
            ys.append(y)
        return torch.cat(ys, 1), state

    @staticmethod
    def backward(ctx, gy, g_state):
        b, l, h, p = gy.shape
        gy = gy.contiguous()
        g_state = torch.zeros_like(ctx.saved[-1]["H"][:, :, 0]).reshape(b, h, p, -1) if g_state is None else g_state
        parts = []
        for (s, e, t), sv in zip(reversed(ctx.bounds), reversed(ctx.saved)):
            *grads, g_state = _block_backward(sv, gy[:, s:e], g_state)
            parts.append(grads)
        ctx.saved = None
        gx, ga, gdt, gB, gC = (torch.cat(list(reversed(k)), 1) for k in zip(*parts))
        return gx, ga, gdt, gB, gC, g_state, None


def ssd_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
             seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
             return_final_states=False, return_varlen_states=False):
    """Mamba-2 SSD scan by chunks (the algorithm above).

    Args:
        x: (b, l, h, p); dt: (b, l, h); A: (h,); B, C: (b, l, g, n); chunk_size: positive int (any,
        l need not be a multiple); D: (h,) or (h, p) optional; z: (b, l, h, p) optional;
        dt_bias: (h,) optional; initial_states: (b, h, p, n) optional; dt_softplus: bool;
        dt_limit: (lo, hi); return_final_states: bool. seq_idx, cu_seqlens, return_varlen_states:
        packed sequences (impls/ssd/varlen.py), each chunked from its own first token.
    Returns:
        out (b, l, h, p) in x's dtype, or (out, final_states (b, h, p, n) in the compute dtype)
    """
    if seq_idx is not None or cu_seqlens is not None or return_varlen_states:
        # packed sequences in vLLM's layout: chunks restart at each sequence's first token (none
        # straddles a boundary), so a state decays from its own sequence's start (impls/ssd/varlen.py)
        return varlen.each_alone(ssd_scan, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx,
                                     cu_seqlens, dt_softplus, dt_limit, return_final_states, return_varlen_states)
    b, l, h, p = x.shape
    n = B.shape[-1]
    f = compute_dtype(x.dtype)
    T = max(1, min(chunk_size, l))  # a chunk longer than the sequence is the sequence
    dt = effective_dt(dt, dt_bias, dt_softplus, dt_limit, f)            # (b, l, h)
    a = dt * A.to(f)                                                     # log-decay of each token
    state = (torch.zeros(b, h, p, n, dtype=f, device=x.device) if initial_states is None
             else initial_states.to(f))
    whole = l - l % T
    K = max(1, BLOCK_TOKENS // T)
    bounds = [(s, min(s + K * T, whole), T) for s in range(0, whole, K * T)]
    if whole < l:
        bounds.append((whole, l, l - whole))  # the last, shorter chunk on its own
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, D, z, dt_bias, initial_states))
    if grad:  # the dt pipeline, D and z by autograd; the chunks by _ChunkedScan's own backward
        y, state = _ChunkedScan.apply(x.to(f), a, dt, B.to(f), C.to(f), state, bounds)
        x_f = x.to(f)
        if D is not None:
            y = y + skip(D.to(f), x_f)
        if z is not None:
            y = y * F.silu(z.to(f))
        out = y.to(x.dtype)
        return (out, state) if return_final_states else out
    out = x.new_empty(b, l, h, p)  # each block's result goes straight into out
    for s, e, t in bounds:
        x_f = x[:, s:e].to(f)
        y, state = _block(x_f, a[:, s:e], dt[:, s:e], B[:, s:e].to(f), C[:, s:e].to(f), state, t)
        if D is not None:
            y = y.add_(skip(D.to(f), x_f))
        if z is not None:
            y = y.mul_(F.silu(z[:, s:e].to(f)))
        out[:, s:e] = y
    return (out, state) if return_final_states else out
