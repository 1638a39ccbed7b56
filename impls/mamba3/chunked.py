"""The Mamba-3 (SISO) chunked scan in plain PyTorch: quadratic within a chunk, a sequential state
pass between chunks, gradients by autograd for every input, the four initial states included.

Letters as in impls/mamba3/loop.py; T = chunk_size. Write a_t = ADT_t, gamma_t = lambda_t DT_t and
delta_t = (1 - lambda_t) DT_t, so that the spec's beta_t = delta_t alpha_t. Unrolling the spec's
h_t = alpha_t h_{t-1} + beta_t v_{t-1} k~_{t-1}^T + gamma_t v_t k~_t^T, token s < t reaches h_t through
its own gamma and through the next token's beta (the trapezoid's shifted term):

    h_t = exp(a_{c0} + ... + a_t) H'  +  sum_{c0 <= s <= t} w(t, s) v_s k~_s^T
    w(t, t) = gamma_t,   w(t, s) = (gamma_s + delta_{s+1}) exp(seg(t, s))  for s < t,
    seg(t, s) = a_{s+1} + ... + a_t,

for a chunk starting at token c0, where H' = h_{c0-1} + delta_{c0} v_{c0-1} k~_{c0-1}^T folds the
shifted term that crosses the chunk boundary into the state the chunk starts from (v_{c0-1} and
k~_{c0-1} are the previous chunk's last token, or the input v and k states). So:
    1. angles: within each chunk a cumulative sum of pi tanh(Angles) DT; between chunks the
       end angle carried sequentially and reduced mod 2 pi (so float32 keeps its precision
       however long the sequence); then q~, k~ rotated (bias first, interleaved pairs).
    2. intra-chunk: y_t = sum_{s <= t} (q~_t . k~_s) w(t, s) v_s (the quadratic form);
       each chunk's own state contribution is row T-1 of w: S_c = sum_s w(last, s) v_s k~_s^T.
    3. the state pass, one chunk after another in the compute dtype:
       H'_c = H_c + delta_{c0} v_prev k_prev^T;  H_{c+1} = exp(a_{c0} + ... + a_last) H'_c + S_c.
    4. inter-chunk readout: y_t += exp(a_{c0} + ... + a_t) H'_c q~_t.

Traps avoided (the SSD chunked scan's, impls/ssd_chunked.py):
    - every segment sum is a masked cumulative sum over exactly its own terms, never a difference
      of prefix sums; the non-causal entries (t <= s) sum no terms (0) and are dropped by a
      select, so no exp of a positive non-causal sum is ever used;
    - masked entries are set by torch.where, not multiplied by 0: a NaN or inf in a later
      token's Q, K, ADT, DT, Trap or Angles does not reach an earlier output. (A non-finite V is
      still smeared over its chunk's earlier outputs by the intra-chunk matmul, 0 x inf = NaN:
      not handled here, a declared gap.)
    - chunk_size is any positive integer, l need not be a multiple of it, and with cu_seqlens no
      chunk straddles two sequences: chunks are cut per sequence, the short last chunk of each is
      padded by selects (zero decay, zero weight), and the state pass restarts every sequence
      from its own row of Input_States, the angle sum and the k, v states included.
Memory holds every chunk's (T, T) matrices and states at once (no blocking yet).
"""

import math

import torch
import torch.nn.functional as F

from ..frontdoor import compute_dtype
from .loop import per_head, rotate, zero_states

TWO_PI = 2 * math.pi


def mamba3_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None,
                chunk_size=64, return_final_states=False, cu_seqlens=None):
    """Mamba-3 SISO scan, chunked; arguments, shapes and returns as impls/mamba3/loop.py's mamba3_scan:
    Q, K (b, l, h_qk, n); V, Z (b, l, h, p); ADT, DT, Trap (b, h, l); Q_bias, K_bias (h, n);
    Angles (b, l, h, n_ang); D (h,); states (angle (S, h, n_ang), ssm (S, h, p, n), k (S, h, n),
    v (S, h, p)); returns out (b, l, h, p) [, angle, ssm, k, v]."""
    b, l, h, p = V.shape
    n, n_ang = Q.shape[-1], Angles.shape[-1]
    f = compute_dtype(V.dtype)
    T = int(chunk_size)
    dev = V.device
    packed = cu_seqlens is not None
    bounds = list(zip(*(lambda o: (o, o[1:]))(cu_seqlens.tolist()))) if packed else [(0, l)]
    rows = (lambda i: slice(i, i + 1)) if packed else (lambda i: slice(0, b))
    S = len(bounds) if packed else b
    init = (zero_states(S, h, p, n, n_ang, f, dev) if Input_States is None
            else tuple(s.to(f) for s in Input_States))

    # token-major inputs in the compute dtype, (b, l, h, ...)
    q = per_head(Q.to(f), h) + Q_bias.to(f)
    k = per_head(K.to(f), h) + K_bias.to(f)
    v = V.to(f)
    a, dt = ADT.to(f).transpose(1, 2), DT.to(f).transpose(1, 2)             # (b, l, h)
    lam = torch.sigmoid(Trap.to(f).transpose(1, 2))
    gamma, delta = lam * dt, (1 - lam) * dt
    inc = math.pi * torch.tanh(Angles.to(f)) * dt[..., None]                 # (b, l, h, n_ang)

    # chunks, cut per sequence: (start, end, sequence); none straddles two sequences
    chunks = [(c0, min(c0 + T, e), i) for i, (s, e) in enumerate(bounds) for c0 in range(s, e, T)]
    C = len(chunks)
    finals = {}
    if C:
        starts = torch.tensor([c[0] for c in chunks], device=dev)
        ends = torch.tensor([c[1] for c in chunks], device=dev)
        pos = starts[:, None] + torch.arange(T, device=dev)                  # (C, T)
        valid = pos < ends[:, None]
        idx = torch.minimum(pos, ends[:, None] - 1)

        def gather(x):  # (b, l, ...) -> (b, C, T, ...), padding set to 0 by a select
            g = x[:, idx]
            return torch.where(valid.view(1, C, T, *([1] * (g.dim() - 3))), g, 0.0)

        a_c, g_c, d_c, v_c = gather(a), gather(gamma), gather(delta), gather(v)
        # 1. angles: cumulative within the chunk, the chunk's start angle carried sequentially
        cs = gather(inc).cumsum(2)                                           # (b, C, T, h, n_ang)
        theta0, first = [], set()
        for c, (c0, c1, i) in enumerate(chunks):
            if c == 0 or chunks[c - 1][2] != i:
                first.add(c)
                start = init[0][rows(i)]
            theta0.append(start)
            start = torch.remainder(start + cs[:, c, -1], TWO_PI)
            if c == C - 1 or chunks[c + 1][2] != i:
                finals[i] = [start]
        theta = torch.remainder(torch.stack(theta0, 1)[:, :, None] + cs, TWO_PI)
        qr = torch.where(valid[None, :, :, None, None], rotate(gather(q), theta), 0.0)   # q~ (b, C, T, h, n)
        kr = torch.where(valid[None, :, :, None, None], rotate(gather(k), theta), 0.0)   # k~

        # 2. intra-chunk. Per head, time last: (b, C, h, T)
        a_h, g_h, d_h = (x.permute(0, 1, 3, 2) for x in (a_c, g_c, d_c))
        ar = torch.arange(T, device=dev)
        later = ar[:, None] > ar[None, :]                                    # [t, s]: t > s
        # seg[t, s] = a_{s+1} + ... + a_t: row r of the masked matrix holds a_r where r > s
        seg = torch.where(later, a_h[..., :, None], 0.0).cumsum(-2)          # (b, C, h, T, T)
        shifted = torch.cat((d_h[..., 1:], torch.zeros_like(d_h[..., :1])), -1)  # delta_{s+1} in the chunk
        w = torch.where(later, torch.exp(seg) * (g_h + shifted)[..., None, :],
                        torch.where(ar[:, None] == ar[None, :], g_h[..., None, :], 0.0))
        scores = torch.einsum("bcthn,bcshn->bchts", qr, kr)
        P = torch.where(later | (ar[:, None] == ar[None, :]), scores * w, 0.0)
        y = torch.einsum("bchts,bcshp->bcthp", P, v_c)
        # each chunk's own contribution to its end state: row T-1 of w (padding has zero decay and weight)
        S_c = torch.einsum("bchs,bcshp,bcshn->bchpn", w[..., -1, :], v_c, kr)
        from_start = torch.exp(a_h.cumsum(-1))                               # exp(a_{c0} + ... + a_t)

        # 3. the state pass, sequential in the compute dtype
        folded = []
        for c, (c0, c1, i) in enumerate(chunks):
            if c in first:
                H, k_prev, v_prev = (s[rows(i)] for s in init[1:])
            H = H + d_h[:, c, :, 0, None, None] * (v_prev[..., :, None] * k_prev[..., None, :])
            folded.append(H)
            H = from_start[:, c, :, -1, None, None] * H + S_c[:, c]
            last = c1 - c0 - 1
            k_prev, v_prev = kr[:, c, last], v_c[:, c, last]
            if i in finals and len(finals[i]) == 1 and (c == C - 1 or chunks[c + 1][2] != i):
                finals[i] += [H, k_prev, v_prev]

        # 4. inter-chunk readout
        Hc = torch.stack(folded, 1)                                          # (b, C, h, p, n)
        y = y + from_start.permute(0, 1, 3, 2)[..., None] * torch.einsum("bchpn,bcthn->bcthp", Hc, qr)
        y = y[:, valid]                                                      # (b, l, h, p), chunks in time order
    else:
        y = v.new_zeros(b, 0, h, p)

    if D is not None:
        y = y + D.to(f)[:, None] * v
    if Z is not None:
        y = y * F.silu(Z.to(f))
    out = y.to(V.dtype)
    if not return_final_states:
        return out
    # a sequence with no tokens keeps its initial state
    per_seq = [finals.get(i) or [s[rows(i)] for s in init] for i in range(len(bounds))]
    if packed:
        states = tuple(torch.cat(parts, 0) for parts in zip(*per_seq)) if per_seq else zero_states(0, h, p, n, n_ang, f, dev)
    else:
        states = tuple(per_seq[0])
    return (out, *states)
