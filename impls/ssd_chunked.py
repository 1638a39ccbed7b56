"""The SSD chunked scan in plain PyTorch: quadratic within a chunk, a short state pass between.

The algorithm of the Mamba-2 paper (Dao & Gu 2024, Section 6, "Hardware-efficient algorithm for
SSD", and its Listing 1), in the shapes of the official ``mamba_chunk_scan_combined``; letters in
impls/ssd_frontdoor.py, T = the chunk length. With a_t = dt_t A (the log-decay of token t, per head)
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
    - Masked entries are set with torch.where, not multiplied by 0: a NaN or inf in a later token's
      B, C or dt must not reach an earlier output. A non-finite x is the one input that the
      intra-chunk matmul would still smear over its chunk's earlier tokens (0 x inf is NaN), so
      where x has one, that matmul runs on x with non-finite entries zeroed and each output from
      the bad token on, in its channel, is made NaN, as the loop's is.
    - chunk_size is any positive integer and l need not be a multiple of it: the last, shorter chunk
      is run with its own length (no padding copy).

Chunks are processed in blocks of about BLOCK_TOKENS tokens, carrying the state from block to
block, so memory beyond the inputs and the output is a few chunks' worth whatever l is (the
(T, T) intra-chunk matrices of one block, and the states of its chunks).

Differentiable for every input through autograd.
"""

import torch
import torch.nn.functional as F

from . import ssd_varlen
from .frontdoor import compute_dtype
from .ssd_loop import effective_dt, skip

BLOCK_TOKENS = 512  # tokens per block of chunks (at least one chunk)


def _block(x, a, dt, B, C, state, T, inplace):
    """One block of K whole chunks of T tokens.

    x: (b, m, h, p) in the compute dtype, m = K T; a, dt: (b, m, h) log-decay and step size;
    B, C: (b, m, g, n) in the compute dtype; state: (b, h, p, n) the state before the block;
    inplace: reuse intermediates in place (no autograd graph: without gradients, about a third
    fewer passes over memory, and no allocation per intermediate). Same arithmetic either way.
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
    later = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)  # [j, i]: i > j
    seg = torch.where(later, a[..., None, :], 0.0).cumsum_(-1)          # (b, h, K, T, T) [j, i]
    decay_from_start = a.cumsum(-1)                                      # a_0 + ... + a_i
    w = seg[..., -1].exp() * dt                                          # exp(s(T-1, j)) dt_j

    # 1. intra-chunk: Mt[j, i] = (B_j . C_i) exp(s(i, j)) dt_j, i >= j (transposed: j is the row),
    #    the non-causal entries set by a mask, never multiplied by 0 (a NaN in B_j or dt_j, j > i,
    #    must not reach y_i)
    BC = torch.matmul(Bc, Cc.transpose(-1, -2))[:, :, None]              # (b, g, 1, K, T, T) [j, i]
    if inplace:
        Mt = seg.exp_().mul_(dt[..., None]).view(b, g, hg, K, T, T).mul_(BC).masked_fill_(later.T, 0.0)
    else:
        Mt = torch.where(later.T, 0.0, BC * (seg.exp() * dt[..., None]).view(b, g, hg, K, T, T))
    X = x.reshape(b, K, T, h, p).permute(0, 3, 1, 2, 4)                  # (b, h, K, T, p)
    # a non-finite x makes the sum non-finite (a finite sum that overflows only takes the slow path)
    finite = bool(torch.isfinite(x.sum()))
    X_diag = X if finite else torch.where(torch.isfinite(X), X, 0.0)
    y_diag = torch.matmul(Mt.view(b, h, K, T, T).transpose(-1, -2), X_diag)  # (b, h, K, T, p)
    if not finite:  # NaN from the bad token on, in its channel and chunk (later chunks get it via the state)
        seen = (~torch.isfinite(X)).cumsum(3) > 0
        y_diag = y_diag + torch.where(seen, float("nan"), 0.0)

    # 2. each chunk's state from zero, heads of a group folded into one matmul with the group's B
    XW = (X * w[..., None]).permute(0, 2, 3, 1, 4).reshape(b, K, T, g, hg * p).permute(0, 3, 1, 4, 2)
    S = torch.matmul(XW, Bc).view(b, g, K, hg, p, n)                    # (b, g, K, hg, p, n)

    # 3. the state pass, sequential (as exact as the loop): H[k] is the state before chunk k
    total = decay_from_start[..., -1].exp().view(b, g, hg, K)[..., None, None]  # each chunk's whole decay
    state = state.reshape(b, g, hg, p, n)
    if inplace:
        H = torch.empty(b, g, K + 1, hg, p, n, dtype=x.dtype, device=x.device)
        H[:, :, 0] = state
        for k in range(K):
            torch.addcmul(S[:, :, k], H[:, :, k], total[:, :, :, k], out=H[:, :, k + 1])
        state, H = H[:, :, K], H[:, :, :K]
    else:  # unbind, not S[:, :, k]: each indexing's backward would zero-fill a whole copy of S
        carried = []
        for total_k, S_k in zip(total.unbind(3), S.unbind(2)):
            carried.append(state)
            state = total_k * state + S_k
        H = torch.stack(carried, 2)

    # 4. inter-chunk readout: exp(a_0 + ... + a_i) C_i H_{k-1}, plus the intra-chunk part
    y = torch.matmul(Cc, H.reshape(b, g, K, hg * p, n).transpose(-1, -2)).view(b, g, K, T, hg, p)
    from_start = decay_from_start.exp().view(b, g, hg, K, T).permute(0, 1, 3, 4, 2)[..., None]
    y_diag = y_diag.view(b, g, hg, K, T, p).permute(0, 1, 3, 4, 2, 5)
    y = y.mul_(from_start).add_(y_diag) if inplace else y * from_start + y_diag   # (b, g, K, T, hg, p)
    return y.permute(0, 2, 3, 1, 4, 5).reshape(b, m, h, p), state.reshape(b, h, p, n)


def ssd_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
             seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
             return_final_states=False, return_varlen_states=False):
    """Mamba-2 SSD scan by chunks (the algorithm above).

    Args:
        x: (b, l, h, p); dt: (b, l, h); A: (h,); B, C: (b, l, g, n); chunk_size: positive int (any,
        l need not be a multiple); D: (h,) or (h, p) optional; z: (b, l, h, p) optional;
        dt_bias: (h,) optional; initial_states: (b, h, p, n) optional; dt_softplus: bool;
        dt_limit: (lo, hi); return_final_states: bool. seq_idx, cu_seqlens, return_varlen_states:
        packed sequences (impls/ssd_varlen.py), each chunked from its own first token.
    Returns:
        out (b, l, h, p) in x's dtype, or (out, final_states (b, h, p, n) in the compute dtype)
    """
    if seq_idx is not None or cu_seqlens is not None or return_varlen_states:
        # packed sequences in vLLM's layout: chunks restart at each sequence's first token (none
        # straddles a boundary), so a state decays from its own sequence's start (impls/ssd_varlen.py)
        return ssd_varlen.each_alone(ssd_scan, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx,
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
    inplace = not (torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, D, z, dt_bias, initial_states)))
    # without gradients each block's result goes straight into out; with them, blocks are joined
    # by one cat (assigning into slices of out would copy the whole gradient once per block)
    out, ys = (x.new_empty(b, l, h, p), None) if inplace else (None, [])
    for s, e, t in bounds:
        x_f = x[:, s:e].to(f)
        y, state = _block(x_f, a[:, s:e], dt[:, s:e], B[:, s:e].to(f), C[:, s:e].to(f), state, t, inplace)
        if D is not None:
            y = y.add_(skip(D.to(f), x_f)) if inplace else y + skip(D.to(f), x_f)
        if z is not None:
            y = y.mul_(F.silu(z[:, s:e].to(f))) if inplace else y * F.silu(z[:, s:e].to(f))
        if inplace:
            out[:, s:e] = y
        else:
            ys.append(y)
    if not inplace:
        out = torch.cat(ys, 1).to(x.dtype)
    return (out, state) if return_final_states else out
