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
k~_{c0-1} are the previous chunk's last token, or the input v and k states). Only the first chunk
of a sequence folds it explicitly; every later boundary's term is the previous chunk's last token
weighted by gamma + delta of the next token, so it is already in the previous chunk's S. So:
    1. angles: within each chunk a cumulative sum of pi tanh(Angles) DT; between chunks the
       end angle carried sequentially and reduced mod 2 pi (so float32 keeps its precision
       however long the sequence); then q~, k~ rotated (bias first, interleaved pairs).
    2. intra-chunk: y_t = sum_{s <= t} (q~_t . k~_s) w(t, s) v_s (the quadratic form);
       each chunk's own contribution to the next chunk's H' is
       S_c = sum_s (gamma_s + delta_{s+1}) exp(seg(last, s)) v_s k~_s^T, delta_{s+1} read across the
       chunk boundary (0 past the end of the sequence, so the last chunk gives the true final state).
    3. the state pass, one chunk after another in the compute dtype:
       H'_{c+1} = exp(a_{c0} + ... + a_last) H'_c + S_c.
    4. inter-chunk readout: y_t += exp(a_{c0} + ... + a_t) H'_c q~_t.
Exactly four batched matrix products per (chunk, head): q~ k~^T, (q~ k~^T o W) V, the chunk state and
the readout (benchmarks/mamba3_grid.py times these alone as the floor); the rest is elementwise.

Traps avoided (the SSD chunked scan's, impls/ssd_chunked.py):
    - every segment sum is a masked cumulative sum over exactly its own terms, never a difference
      of prefix sums (segment_decays splits a long segment at sub-block edges into three such sums
      and multiplies their exps); the non-causal entries (t <= s) are a placeholder dropped by a
      select, so no exp of a positive non-causal sum is ever used;
    - masked entries are set by a select (torch.where, tril), not multiplied by 0: a NaN or inf in a later
      token's Q, K, ADT, DT, Trap or Angles does not reach an earlier output. A non-finite V is
      the one input the intra-chunk matmul would still smear over its chunk's earlier outputs
      (0 x inf = NaN), so where V has one, that matmul runs on V with non-finite entries zeroed
      and each output from the bad token on, in its channel, is made NaN, as the loop's is (the
      SSD chunked scan's remedy); the chunk state takes the raw V, so later chunks get it.
    - chunk_size is any positive integer and l need not be a multiple of it: the last chunk of a
      sequence is simply shorter (no padding). With cu_seqlens each sequence is scanned alone from
      its own row of Input_States, the angle sum and the k, v states included, so no chunk
      straddles two sequences.

Memory. The chunks are processed in blocks of about BLOCK_TOKENS tokens (GRAD_BLOCK_TOKENS under
autograd), one block after another,
carrying (angle, H', k~, v) between blocks, and each block's output is finished (D, gate) and
written into the output as it comes. So the working set is one block's q~, k~, (T, T) weights and
chunk states, whatever l is. With gradients, a SISO block (in SisoScan) keeps the intermediates its
written-out backward reads and cannot remake in a pass (the (T, T) decays, weights, scores and P,
the folded states, the readout, the angles' tanh and e^{i theta}, y and the gate: about
4 T + 3 p + 3 n_ang + p n / T floats a token and head, 2.7 KB at the official optimum shape; q~,
k~ and v are made again), so memory under autograd grows with l while the backward costs its eight
transposed matmuls and one elementwise chain rule, no second forward. A
MIMO block keeps only its inputs (views of the arguments) and the states it starts from (h p n +
small, l / GRAD_BLOCK_TOKENS of them), as torch.utils.checkpoint would, and is recomputed with autograd
inside the backward (RecomputedBlock); CHECKPOINT_BLOCKS = False keeps every MIMO block's graph
instead (faster, memory linear in l).

MIMO (``mamba3_mimo``) is the same algorithm with a rank axis R beside time (the official kernel's
(c r) rows): token s's R pairs (v~_{s,r}, k~_{s,r}) share its weight w(t, s), so
y_{t,r'} = sum_{s <= t} w(t, s) sum_r (q~_{t,r'} . k~_{s,r}) v~_{s,r}, every sum over v k^T runs
over r too, and the rotation pairs (i, i + n/2). SISO is rank 1 with no projection of v.
"""

import math

import torch
import torch.nn.functional as F

from ..frontdoor import compute_dtype
from .loop import mimo_read_out, norm_weight, rotate_halves, zero_mimo_states, zero_states

TWO_PI = 2 * math.pi
# Tokens per block: a few chunks, so that one block's working set (q~ and k~ at h n floats a token,
# the (T, T) weights at h T, the chunk states at h p n a chunk: about 20 MiB at the official
# optimum shape) stays in the last-level cache while the per-block Python overhead (about 160
# dispatches) is small beside its matmuls. At that shape, paired against 64 and 256 on a busy 2-core
# machine, 128 was the fastest in most runs (by about 5% over 256).
BLOCK_TOKENS = 128
# Under autograd a block costs more Python (SisoScan's forward and written-out backward, about
# twice the dispatches) and keeps its intermediates anyway, so it takes more tokens: paired against
# 128 and 384, 256 gave the lowest forward+backward time.
GRAD_BLOCK_TOKENS = 256
# Tokens whose per-token scalars (the trapezoid's weights, the decays from each chunk's start) are made
# at once when no gradient is taken (block_scalars): a few small ops for many blocks instead of each
# block's own, while their memory stays bounded whatever l is.
SCALAR_TOKENS = 2048
# Tokens per sub-block of a chunk's decay matrix (segment_decays): exp on G T entries a chunk, not T^2.
DECAY_BLOCK = 16
# Recompute each block in the backward rather than keep its intermediates (memory independent of l).
CHECKPOINT_BLOCKS = True


class Workspace:
    """Buffers reused from block to block when no gradient is taken: ``ws(name, shape, dtype)`` is the
    same tensor every block of one shape. Why: on a CPU a fresh tensor of a few MiB is a fresh mapping
    of pages, and faulting them in costs more than the arithmetic written into them (measured here:
    about 15x a multiply into a reused buffer), so an out= into a reused buffer is what keeps the
    elementwise passes near memory speed. Under autograd ``NO_WORKSPACE`` gives None for every
    buffer, so every op (called with out=None) is the ordinary functional one autograd records."""

    def __init__(self, device):
        self.device, self.buffers = device, {}

    def __call__(self, name, shape, dtype):
        t = self.buffers.get(name)
        if t is None or t.shape != shape or t.dtype != dtype:
            t = self.buffers[name] = torch.empty(shape, dtype=dtype, device=self.device)
        return t


def NO_WORKSPACE(name, shape, dtype):
    return None


def mamba3_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None,
                chunk_size=64, return_final_states=False, cu_seqlens=None):
    """Mamba-3 SISO scan, chunked; arguments, shapes and returns as impls/mamba3/loop.py's mamba3_scan:
    Q, K (b, l, h_qk, n); V, Z (b, l, h, p); ADT, DT, Trap (b, h, l); Q_bias, K_bias (h, n);
    Angles (b, l, h, n_ang); D (h,); states (angle (S, h, n_ang), ssm (S, h, p, n), k (S, h, n),
    v (S, h, p)); returns out (b, l, h, p) [, angle, ssm, k, v]."""
    b, l, h, p = V.shape
    n, n_ang = Q.shape[-1], Angles.shape[-1]
    f = compute_dtype(V.dtype)
    S = b if cu_seqlens is None else len(cu_seqlens) - 1
    init = (zero_states(S, h, p, n, n_ang, f, V.device) if Input_States is None
            else tuple(s.to(f) for s in Input_States))
    if Input_States is None:
        init = (init[0], transposed_zeros(init[1]), *init[2:])
    v = V.to(f)

    def finish(y, v, extras, params, ws, into):  # y (b, L, 1, h, p), extras (Z's piece,) -> out (b, L, h, p) in V's dtype
        y = y.squeeze(2)              # D v is already in y (scan_chunks' skip); a view (a select's gradient is a copy)
        if Z is not None:
            z = extras[0].to(f)
            if into is None:
                return (y * F.silu(z)).to(V.dtype)
            # the gate written where the output goes and multiplied there (no buffer of its own),
            # unless the output's dtype would round it first
            gate = into if into.dtype == f else ws("gate", z.shape, f)
            return torch.mul(y, torch.ops.aten.silu.out(z, out=gate), out=into)
        return into.copy_(y) if into is not None else y.to(V.dtype)

    out, (angle, ssm, k_last, v_last) = scan_chunks(
        Q.to(f)[:, :, None], K.to(f)[:, :, None], v, None, ADT, DT, Trap, Angles,
        (init[0], init[1], init[2][:, None], init[3]), int(chunk_size), cu_seqlens, rotate_pairs,
        q_bias=Q_bias.to(f)[None], k_bias=K_bias.to(f)[None], skip=None if D is None else D.to(f), finish=finish,
        extras=() if Z is None else (Z,), siso_out_dtype=V.dtype)
    return (out, angle, ssm.contiguous(), k_last[:, 0], v_last) if return_final_states else out


def mamba3_mimo(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D=None, Z=None,
                chunk_size=16, rotary_dim_divisor=None, dtype=None, return_state=False, cu_seqlens=None,
                fuse_pregate_headwise_rms_norm=False, outproj_norm_weight=None, outproj_norm_eps=1e-5,
                Input_States=None):
    """Mamba-3 MIMO scan, chunked; arguments, shapes and returns as impls/mamba3/loop.py's mamba3_mimo:
    Q, K (b, l, R, h_qk, n); V, Z (b, l, h, p); ADT, DT, Trap (b, h, l); Q_bias, K_bias (h, R, n);
    MIMO_V, MIMO_Z, MIMO_Out (h, R, p); Angles (b, l, h, n_ang); D (h,); states (angle (S, h, n_ang),
    ssm (S, h, p, n), k (S, R, h, n), v (S, h, p)); returns out (b, l, h, p) (or (b, l, R, h, p)
    without MIMO_Out) [, angle, ssm, k, v]. rotary_dim_divisor and dtype are unused."""
    b, l, R, _, n = Q.shape
    h, p = V.shape[-2:]
    f = compute_dtype(V.dtype)
    cast = lambda x: None if x is None else x.to(f)
    S = b if cu_seqlens is None else len(cu_seqlens) - 1
    init = (zero_mimo_states(S, R, h, p, n, Angles.shape[-1], f, V.device) if Input_States is None
            else tuple(s.to(f) for s in Input_States))
    if Input_States is None:
        init = (init[0], transposed_zeros(init[1]), *init[2:])
    v, up = V.to(f), MIMO_V.to(f).transpose(0, 1)                            # (b, l, h, p), (R, h, p)
    Z_f = cast(Z)

    def finish(y, v, extras, params, ws, into):  # y (b, L, R, h, p), v (b, L, h, p), extras (Z's piece,) -> out
        z = extras[0] if extras else None
        up, D_f, MIMO_Z_f, MIMO_Out_f, weight = params
        return mimo_read_out(y, v[:, :, None] * up, D_f, z, MIMO_Z_f, MIMO_Out_f,
                             fuse_pregate_headwise_rms_norm, weight, outproj_norm_eps).to(V.dtype)

    out, states = scan_chunks(Q.to(f), K.to(f), v, up, ADT, DT, Trap, Angles, init, int(chunk_size), cu_seqlens,
                              rotate_halves_cs, q_bias=Q_bias.to(f).transpose(0, 1),
                              k_bias=K_bias.to(f).transpose(0, 1), finish=finish, extras=() if Z_f is None else (Z_f,),
                              params=(up, cast(D), cast(MIMO_Z), cast(MIMO_Out), norm_weight(outproj_norm_weight, h, p, f)))
    return (out, states[0], states[1].contiguous(), *states[2:]) if return_state else out


def transposed_zeros(ssm):
    """Zeros shaped as the state ssm (S, h, p, n), laid out as the blocks keep it (H'^T, (n, p)
    contiguous), so that the first block takes it without a transposing copy."""
    return ssm.new_zeros(ssm.shape[:-2] + ssm.shape[-2:][::-1]).transpose(-1, -2)


def scan_chunks(q, k, v, up, ADT, DT, Trap, Angles, init, T, cu_seqlens, rot, *, q_bias=None, k_bias=None,
                skip=None, finish=None, extras=(), params=(), siso_out_dtype=None):
    """The chunked scan up to y_{t,r} = h_t q~_{t,r} (or, with finish, the finished output), in the
    compute dtype of q, block after block.

    q, k: (b, l, R, h_qk, n) not yet biased nor rotated, head i reading head i // (h / h_qk);
    v: (b, l, h, p) raw; up: (R, h, p), the MIMO_V projection v~_{t,r} = v_t * up[r], or None
    (rank 1, v~ = v); ADT, DT, Trap: (b, h, l); Angles: (b, l, h, n_ang); init: (angle (S, h, n_ang),
    ssm (S, h, p, n), k (S, R, h, n), v (S, h, p)); T: chunk size; cu_seqlens: None or (S + 1,)
    with b = 1; rot: the pairing (rotate_pairs, or rotate_halves_cs for MIMO); q_bias, k_bias:
    (R, h, n) or None; skip: (h,) or None, D v_t added to y (rank 1 only); finish: None, or a
    function (y (b, L, R, h, p), v (b, L, h, p), extras' pieces, ws, into) -> the output of a block
    of L tokens, applied block by block so that no whole-length intermediate is made (ws: a
    Workspace or NO_WORKSPACE; into: None, or the output's slice to write, which a finish may also
    leave alone and return its result); extras: (b, l, ...) tensors finish reads, cut as v is;
    params: other tensors finish reads (passed to it, not closed over, so that autograd sees them);
    siso_out_dtype: for rank 1 (up None, rotate_pairs), the output's dtype, finish being the gate
    y silu(Z) with Z extras' one tensor (or no gate without extras): under autograd the scan is then
    one SisoScan node, which gates itself.
    Returns the output (y (b, l, R, h, p) without finish) and the final states, shaped as init.
    """
    b, l = q.shape[:2]
    h = v.shape[-2]
    finish = finish or (lambda y, v, extras, params, ws, into: y if into is None else into.copy_(y))
    if cu_seqlens is None:
        sequences = [(slice(0, b), 0, l, init)]
    else:
        offsets = cu_seqlens.tolist()
        sequences = [(slice(0, 1), s, e, tuple(x[i:i + 1] for x in init))
                     for i, (s, e) in enumerate(zip(offsets, offsets[1:]))]
    grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, up, ADT, DT, Trap, Angles, q_bias, k_bias, skip, *init,
                                                    *extras, *params))
    siso = grad and siso_out_dtype is not None
    pieces, finals, live, starts = [], [], [], []
    fast = Workspace(v.device)   # the forward of recomputed blocks
    back = Workspace(v.device)   # the scratch buffers of SisoScan
    # the output's trailing shape and dtype: finish on no tokens
    R, p = q.shape[2], v.shape[-1]
    empty = finish(v.new_zeros(b, 0, R, h, p), v[:, :0], tuple(x[:, :0] for x in extras), params, NO_WORKSPACE, None)
    out = None if grad else empty.new_empty((b, l) + empty.shape[2:])
    # blocks of whole chunks, then each sequence's shorter last chunk alone
    step = max(1, (GRAD_BLOCK_TOKENS if grad else BLOCK_TOKENS) // T) * T
    cuts = []
    for rows, s, e, _ in sequences:
        whole = s + (e - s) // T * T
        cuts.append([(t0, min(t0 + step, whole), T) for t0 in range(s, whole, step)]
                    + ([(whole, e, e - whole)] if e > whole else []))
    # every time input cut into the blocks once, by split: under autograd a slice per block would
    # make each block's gradient a zero-filled tensor of the whole input (quadratic in l); split's
    # gradient is one concatenation
    points = sorted({0, l} | {t for seq in cuts for c in seq for t in c[:2]})
    sizes = [t1 - t0 for t0, t1 in zip(points, points[1:])]
    piece = {t0: i for i, t0 in enumerate(points[:-1])}
    cut = lambda x, dim: torch.split(x, sizes, dim) if sizes else ()
    q_, k_, v_, A_, DT_, Trap_, Angles_ = (cut(q, 1), cut(k, 1), cut(v, 1), cut(ADT, 2), cut(DT, 2), cut(Trap, 2),
                                           cut(Angles, 1))
    extras_ = [cut(x, 1) for x in extras]
    for (rows, s, e, (angle, H, k_prev, v_prev)), seq in zip(sequences, cuts):
        # a workspace per sequence: a final state may be a view of one of its buffers
        ws = NO_WORKSPACE if grad else Workspace(v.device)
        if e > s:
            # fold the shifted term of the sequence's first token into the state it starts from:
            # H' = H + delta_s v~_prev k~_prev^T (later boundaries are folded by the chunk states)
            i = piece[s]
            lam = torch.sigmoid(Trap_[i][rows, :, 0].to(H.dtype))
            delta = (1 - lam) * DT_[i][rows, :, 0].to(H.dtype)
            v_up = v_prev[:, None] if up is None else v_prev[:, None] * up     # (b, R, h, p)
            # written as H'^T (n, p), the layout the blocks keep it in (scan_block, step 3)
            H = torch.addcmul(H.transpose(-1, -2), delta[..., None, None],
                              torch.einsum("brhp,brhn->bhnp", v_up, k_prev)).transpose(-1, -2)
        if siso:   # the blocks run in one SisoScan node, below
            if e > s:
                live.append((rows, s, e, seq))
                starts += [angle, H]
            finals.append(None if e > s else (angle, H, k_prev, v_prev))
            continue
        whole, scalars_end = s + (e - s) // T * T, s
        for t0, t1, Tb in seq:
            i = piece[t0]
            nxt = t1 < e   # the token after the block (its delta), if any: the next piece's first
            # the rows of a packed sequence; without cu_seqlens every row, taken whole: under autograd a
            # slice's gradient is a zero-filled copy of the piece
            take = (lambda x: x) if cu_seqlens is None else (lambda x: x[rows])
            args = (take(q_[i]), take(k_[i]), take(v_[i]), up, take(A_[i]), take(DT_[i]), take(Trap_[i]),
                    take(DT_[i + 1])[:, :, :1] if nxt else None, take(Trap_[i + 1])[:, :, :1] if nxt else None,
                    take(Angles_[i]), angle, H, q_bias, k_bias, skip, *(take(x[i]) for x in extras_), *params)
            if grad:
                if CHECKPOINT_BLOCKS:
                    y, angle, H, k_prev, v_prev = RecomputedBlock.apply((Tb, rot, finish, fast, len(extras)), *args)
                else:
                    y, angle, H, k_prev, v_prev = _finished_block(*args, Tb=Tb, rot=rot, finish=finish,
                                                                  extras=len(extras))
                pieces.append(y)
                continue
            if t1 <= whole and t1 > scalars_end:   # whole chunks: the scalars of several blocks at once
                scalars_start, scalars_end = t0, min(t0 + max(1, SCALAR_TOKENS // step) * step, whole)
                made = block_scalars(ADT[rows], DT[rows], Trap[rows], scalars_start, scalars_end, e, T, q.dtype)
            scalars = (tuple(x[..., t0 - scalars_start:t1 - scalars_start].unflatten(-1, (-1, T)) for x in made)
                       if t1 <= whole else None)
            y, angle, H, k_prev, v_prev = scan_block(*args[:15], Tb=Tb, rot=rot, ws=ws, scalars=scalars)
            # finished straight into the output as it comes: no whole-length list of pieces
            into = out[:, t0:t1]
            done = finish(y, args[2], args[15:15 + len(extras)], params, ws, into)
            if done is not into:   # a finish that does not write in place (MIMO's read-out)
                into.copy_(done)
        # the blocks carry H as a transposed view: the callers make it contiguous only if they return it
        finals.append((angle, H, k_prev, v_prev))
    if siso and live:
        out, *ends = SisoScan.apply((T, live, siso_out_dtype, back), q, k, v, ADT, DT, Trap, Angles, q_bias, k_bias,
                                    skip, extras[0] if extras else None, *starts)
        ends = iter(zip(*[iter(ends)] * 4))
        finals = [next(ends) if x is None else x for x in finals]
    elif grad:
        out = torch.cat(pieces, 1) if pieces else empty
    if cu_seqlens is None:
        return out, finals[0]
    if not finals:  # no sequences at all (cu_seqlens = [0])
        return out, tuple(s[:0] for s in init)
    return out, tuple(torch.cat(parts, 0) for parts in zip(*finals))


class RecomputedBlock(torch.autograd.Function):
    """A block under autograd that keeps only its inputs: torch.utils.checkpoint's idea, with the
    forward run as the gradient-free scan (its workspace, out= ops) rather than the recorded
    functional one, which allocates every intermediate afresh. The backward recomputes the block
    functionally with autograd and differentiates that."""

    @staticmethod
    def forward(ctx, meta, *args):
        Tb, rot, finish, ws, extras = ctx.meta = meta
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*args)   # views of the inputs and the carried states: nothing new
        y, angle, H, k_last, v_last = scan_block(*args[:15], Tb=Tb, rot=rot, ws=ws)
        y = finish(y, args[2], args[15:15 + extras], args[15 + extras:], NO_WORKSPACE, None)
        # y and H may be the workspace's buffers, which the next block writes
        return y.clone(), angle, H.clone(), k_last, v_last

    @staticmethod
    def backward(ctx, *grads):
        Tb, rot, finish, _, extras = ctx.meta
        args = [None if a is None else a.detach().requires_grad_(a.requires_grad) for a in ctx.saved_tensors]
        with torch.enable_grad():
            outs = _finished_block(*args, Tb=Tb, rot=rot, finish=finish, extras=extras)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        wanted = [i for i, a in enumerate(args) if a is not None and a.requires_grad]
        got = torch.autograd.grad([o for o, _ in pairs], [args[i] for i in wanted], [g for _, g in pairs],
                                  allow_unused=True) if pairs and wanted else [None] * len(wanted)
        result = [None] * len(args)
        for i, g in zip(wanted, got):
            result[i] = g
        return (None, *result)


# scan_block's buffers that neither its results nor its kept intermediates are (views of): SisoScan's
# forward takes them from a workspace, every other buffer fresh
SCRATCH = frozenset({"pi tanh dt", "cos", "sin", "masked", "seg", "S", "y", "q", "k", "v", "vw"})


class SisoScan(torch.autograd.Function):
    """The rank-1 scan under autograd as one node, its backward written out. The forward runs the
    blocks as the workspace scan on fresh buffers (no buffer reused, so each intermediate the
    backward reads is kept as written) and writes each block's gated output straight into the
    output; the backward runs the blocks in reverse, each its four matmuls' eight transposes and one
    elementwise chain rule (siso_block_backward), and writes each block's gradients straight into
    whole-length gradients, so no block makes a piece of its own to be joined by a copy. Its memory is
    the kept intermediates (the module docstring), linear in l: at the official optimum shape, l =
    8192, 1051 MiB beyond the inputs for the forward and backward, where a node per block that kept
    q~, k~ and v took 1252 MiB (their time: the same within this machine's noise). The forward
    without gradients is unchanged.

    meta: (T, the non-empty sequences [(rows, s, e, blocks [(t0, t1, Tb)])], the output dtype, a
    Workspace for the scratch buffers); q, k: (b, l, 1, h_qk, n) and v (b, l, h, p) in the compute
    dtype; ADT, DT, Trap (b, h, l); Angles (b, l, h, n_ang); q_bias, k_bias (1, h, n) or None; skip
    (h,) or None; Z (b, l, h, p) or None, the gate y silu(Z); starts: each sequence's start angle
    (b', h, n_ang) and folded state H' (b', h, p, n), in turn. Returns the output (b, l, h, p) and
    each sequence's final angle, H', k~ (b', 1, h, n) and v (b', h, p), in turn.
    """

    @staticmethod
    def forward(ctx, meta, q, k, v, ADT, DT, Trap, Angles, q_bias, k_bias, skip, Z, *starts):
        T, sequences, out_dtype, ws = ctx.meta = meta
        ctx.set_materialize_grads(False)
        f, device = v.dtype, v.device
        fresh = lambda name, shape, dtype: (ws(name, shape, dtype) if name in SCRATCH
                                            else torch.empty(shape, dtype=dtype, device=device))
        out = torch.empty(v.shape, dtype=out_dtype, device=device)
        ctx.blocks, ends = [], []   # ctx.blocks: each sequence's blocks
        for j, (rows, s, e, blocks) in enumerate(sequences):
            angle, H = starts[2 * j:2 * j + 2]
            ctx.blocks.append([])
            for t0, t1, Tb in blocks:
                args = _block_args(rows, t0, t1, e, q, k, v, ADT, DT, Trap, Angles, angle, H, q_bias, k_bias, skip)
                (y, angle_out, H_out, k_last, v_last), kept = scan_block(*args, Tb=Tb, rot=rotate_pairs, ws=fresh,
                                                                        keep=True)
                y, gate, into = y[:, :, 0], None, out[rows, t0:t1]      # y (b', L, h, p), contiguous
                if Z is not None:
                    gate = F.silu(Z[rows, t0:t1].to(f))
                    if into.dtype == f:
                        torch.mul(y, gate, out=into)
                    else:
                        into.copy_(y * gate)
                else:
                    into.copy_(y)
                ctx.blocks[-1].append((t0, t1, Tb, angle, H, kept, y if Z is not None else None, gate))
                angle, H = angle_out, H_out
            ends += [angle, H, k_last, v_last]
        ctx.save_for_backward(q, k, v, ADT, DT, Trap, Angles, q_bias, k_bias, skip, Z, *starts)
        return (out, *ends)

    @staticmethod
    def backward(ctx, g_out, *g_ends):
        T, sequences, _, ws = ctx.meta
        q, k, v, ADT, DT, Trap, Angles, q_bias, k_bias, skip, Z, *starts = ctx.saved_tensors
        f = v.dtype
        inputs = dict(q=q, k=k, v=v, ADT=ADT, DT=DT, Trap=Trap, Angles=Angles, Z=Z)
        # every token is in one block, which writes its gradients whole, unless the sequences leave some out;
        # Z reaches only the output, so without the output's gradient it has none (as the loop's)
        covered = sum(e - s for _, s, e, _ in sequences) == v.shape[1]
        G = {name: (x.new_empty if covered else x.new_zeros)(x.shape, dtype=f)
             for (name, x), wanted in zip(inputs.items(), ctx.needs_input_grad[1:8] + ctx.needs_input_grad[11:12])
             if wanted and not (name == "Z" and g_out is None)}
        g_params = [None, None, None]                                          # q_bias, k_bias, skip
        g_starts = [None] * len(starts)
        for j, (rows, s, e, _) in enumerate(sequences):
            g_angle, g_H, g_k, g_v = g_ends[4 * j:4 * j + 4]
            for t0, t1, Tb, angle, H, kept, y, gate in reversed(ctx.blocks[j]):
                args = _block_args(rows, t0, t1, e, q, k, v, ADT, DT, Trap, Angles, angle, H, q_bias, k_bias, skip)
                go = None if g_out is None else g_out[rows, t0:t1].to(f)
                if go is not None and "Z" in G:   # y silu(Z): Z's gradient is go y silu'(Z)
                    torch.ops.aten.silu_backward.grad_input(torch.mul(go, y, out=ws("go y", y.shape, f)),
                                                            Z[rows, t0:t1].to(f),
                                                            grad_input=G["Z"][rows, t0:t1])
                into = dict(v=G["v"][rows, t0:t1] if "v" in G else None,
                            angles=G["Angles"][rows, t0:t1] if "Angles" in G else None)
                grads = siso_block_backward(args, kept, Tb, go, gate, g_angle, g_H, g_k, g_v, ws, into)
                (g_q, g_k_in, _, _, g_a, g_dt, g_trap, g_dt_next, g_trap_next, _, g_angle, g_H,
                 *g_block_params) = grads
                for name, g, at in (("q", g_q, 1), ("k", g_k_in, 1), ("ADT", g_a, 2), ("DT", g_dt, 2),
                                    ("Trap", g_trap, 2)):
                    if name in G:
                        G[name][(rows,) + (slice(None),) * (at - 1) + (slice(t0, t1),)] = g
                if t1 < e:   # the next token's delta: its block ran first
                    if "DT" in G:
                        G["DT"][rows, :, t1] += g_dt_next[..., 0]
                    if "Trap" in G:
                        G["Trap"][rows, :, t1] += g_trap_next[..., 0]
                g_params = [a if b is None else b if a is None else a + b for a, b in zip(g_params, g_block_params)]
                g_k = g_v = None   # k~ and v of an earlier block's last token are not results
            g_starts[2 * j:2 * j + 2] = g_angle, g_H
        get = lambda name, x: None if name not in G else G[name].to(x.dtype)
        return (None, *(get(name, x) for name, x in list(inputs.items())[:7]),
                *(None if g is None or not wanted else g.to(x.dtype)
                  for g, x, wanted in zip(g_params, (q_bias, k_bias, skip), ctx.needs_input_grad[8:11])),
                get("Z", Z), *(None if g is None else g.to(x.dtype) for g, x in zip(g_starts, starts)))


def _block_args(rows, t0, t1, e, q, k, v, ADT, DT, Trap, Angles, angle, H, q_bias, k_bias, skip):
    """scan_block's first 15 arguments for the block of tokens t0 to t1 of a sequence ending at e (rank 1)."""
    nxt = slice(t1, t1 + 1) if t1 < e else None   # the token after the block (its delta), if any
    return (q[rows, t0:t1], k[rows, t0:t1], v[rows, t0:t1], None, ADT[rows, :, t0:t1], DT[rows, :, t0:t1],
            Trap[rows, :, t0:t1], None if nxt is None else DT[rows, :, nxt], None if nxt is None else Trap[rows, :, nxt],
            Angles[rows, t0:t1], angle, H, q_bias, k_bias, skip)


def siso_block_backward(args, kept, Tb, gy, gate, g_angle, g_H, g_k, g_v, ws, into):
    """The gradients of scan_block's 15 arguments (rank 1) from those of its five results (each may be
    None; gy (b, L, h, p) that of y, to be multiplied by gate (b, L, h, p) if given) and the
    intermediates its keep mode returned; the chain rule of steps 4 back to 1, every masked entry
    dropped by a select, as in the forward. ws: a Workspace for the temporaries that no gradient
    returned is a view of (shared by the blocks of one scan: their backwards run in turn); into:
    dict(v=..., angles=...), where V's and Angles' gradients are written (None: fresh tensors)."""
    q, k, v, _, a, dt, trap, dt_next, trap_next, angles, angle, H, q_bias, k_bias, skip = args
    lam, th, E, turn, W, scores, P, w_last, folded, inter, fs = (kept[x] for x in (
        "lam", "th", "E", "turn", "W", "scores", "P", "w_last", "folded", "inter", "from_start"))
    b, L, _, h_qk, n = q.shape
    h, p = v.shape[-2:]
    C, f, n_ang = L // Tb, fs.dtype, angles.shape[-1]
    B, finite = b * h * C, kept["finite"]
    # q~, k~, v in the blocks' layout and v's chunk-state weighting, made again as the forward made
    # them (the same ops on the same inputs): a pass each on warm buffers, where keeping them costs
    # the first touch of fresh pages, several times more on this CPU
    qf, kf = (rotate_pairs(_per_head(x, bias, h, Tb, ws, name), None, None, turn, ws).view(B, Tb, n)
              for x, bias, name in ((q, q_bias, "q"), (k, k_bias, "k")))
    vf = _contiguous(v.permute(0, 2, 1, 3), ws, "v").view(B, Tb, p)
    vw = torch.mul(vf, w_last.reshape(B, Tb, 1), out=ws("vw", vf.shape, f))
    zero = fs.new_zeros(())
    dt_f = dt.to(f)
    if gy is None:
        gY = fs.new_zeros(B, Tb, p)
    elif gate is None:
        gY = _contiguous(gy.to(f).permute(0, 2, 1, 3), ws, "gY").view(B, Tb, p)
    else:   # the gate's product made in the blocks' layout: one pass
        gY = torch.mul(gy.permute(0, 2, 1, 3), gate.permute(0, 2, 1, 3), out=ws("gY", (b, h, L, p), f)).view(B, Tb, p)

    # 4. readout y += from_start_t (H'_c q~_t): through q~, H'_c and from_start
    gYf = torch.mul(gY, fs.reshape(B, Tb, 1), out=ws("gYf", gY.shape, f))
    g_fs = (gY * inter).sum(-1).view(b, h, C, Tb)
    # folded holds H'^T (b, h, C, n, p), as the forward keeps it; so do g_folded and gS below
    g_qf = torch.bmm(gYf, folded.view(B, n, p).transpose(1, 2), out=ws("g_qf", qf.shape, f))   # (B, Tb, n)
    g_folded = torch.bmm(qf.transpose(1, 2), gYf, out=ws("g_folded", (B, n, p), f)).view(b, h, C, n, p)

    # 3. the state pass, backwards
    # H'_{c+1} = exp(a_{c0} + ... + a_last) H'_c + S_c: S_c's gradient is H'_{c+1}'s
    gS = ws("gS", folded.shape, f)
    if g_H is None:
        gS[:, :, -1] = 0
    else:
        gS[:, :, -1] = g_H.transpose(-1, -2)
    fsl = fs[..., -1, None, None]
    for c in range(C - 1, 0, -1):
        torch.addcmul(g_folded[:, :, c], fsl[:, :, c], gS[:, :, c], out=gS[:, :, c - 1])
    g_H_in = torch.addcmul(g_folded[:, :, 0], fsl[:, :, 0], gS[:, :, 0]).transpose(-1, -2)
    g_fs[..., -1] += torch.einsum("bhcnp,bhcnp->bhc", gS, folded)           # no (n, p) product made

    # 2. chunk states S = (v w_last)^T k~, and the intra-chunk y = P v, P = (q~ k~^T o W) on t >= s
    gS = gS.view(B, n, p)
    g_vw = torch.bmm(kf, gS, out=ws("g_vw", vf.shape, f))                   # (B, Tb, p)
    g_kf = torch.bmm(vw, gS.transpose(1, 2), out=ws("g_kf", kf.shape, f))
    g_w_last = (g_vw * vf).sum(-1).view(b, h, C, Tb)
    vf_intra = vf if finite else torch.where(torch.isfinite(vf), vf, zero)
    gP = torch.bmm(gY, vf_intra.transpose(1, 2), out=ws("gP", (B, Tb, Tb), f))
    g_intra = torch.bmm(P.view(B, Tb, Tb).transpose(1, 2), gY)
    if not finite:
        g_intra = torch.where(torch.isfinite(vf), g_intra, zero)
    # V's gradient written in V's own layout (b, L, h, p) by this last pass, where SisoScan wants it:
    # no transposing copy of its own
    g_v_in = v.new_empty(b, L, h, p, dtype=f) if into["v"] is None else into["v"]
    torch.addcmul(g_intra.view(b, h, L, p), g_vw.view(b, h, L, p), w_last.reshape(b, h, L, 1),
                  out=g_v_in.permute(0, 2, 1, 3))
    # tril_ is a select (the entries above the diagonal are set to 0), as the forward's
    gP = gP.view(b, h, C, Tb, Tb).tril_()
    g_skip = None if skip is None else gP.diagonal(dim1=-2, dim2=-1).sum((0, 2, 3))
    g_scores = torch.mul(gP, W, out=ws("g_scores", W.shape, f)).tril_().view(B, Tb, Tb)
    g_W = gP.mul_(scores.view(W.shape))     # above the diagonal: selected away by the tril_(-1) below
    g_qf.baddbmm_(g_scores, kf)
    g_kf.baddbmm_(g_scores.transpose(1, 2), qf)

    # the weights: W = exp(seg(t, s)) coef_s below the diagonal, gamma_t on it; w_last its row Tb-1
    g_gamma = g_W.diagonal(dim1=-2, dim2=-1).clone()
    g_M = g_W.tril_(-1)
    g_M[..., -1, :] += g_w_last
    g_M = g_M.mul_(E)
    gamma = lam * dt_f
    after = (delta_of(trap_next, dt_next, f) if dt_next is not None else lam.new_zeros(b, h, 1))
    coef = (gamma + torch.cat((((1 - lam) * dt_f)[..., 1:], after), -1)).view(b, h, C, Tb)
    g_coef = g_M.sum(-2)                                                     # (b, h, C, Tb)
    g_seg = g_M.mul_(coef[..., None, :])
    # seg(t, s) sums a_r over s < r <= t: a_r's gradient sums g_seg[t, s] over s < r and then over
    # t >= r, never a difference of prefix sums; a_0 of a chunk is in no seg
    g_a = segment_sums(g_seg, ws)
    g_a += (g_fs * fs).flip(-1).cumsum(-1).flip(-1)                          # from_start = exp(cumsum a)
    g_gamma += g_coef
    g_coef = g_coef.reshape(b, h, L)
    g_delta = torch.cat((g_coef.new_zeros(b, h, 1), g_coef[..., :-1]), -1)
    g_after = g_coef[..., -1:]
    g_gamma = g_gamma.reshape(b, h, L)
    g_dt = g_gamma * lam + g_delta * (1 - lam)
    g_trap = (g_gamma - g_delta) * dt_f * lam * (1 - lam)
    if dt_next is None:
        g_dt_next = g_trap_next = None
    else:
        lam_next = torch.sigmoid(trap_next.to(f))
        g_dt_next = g_after * (1 - lam_next)
        g_trap_next = -g_after * dt_next.to(f) * lam_next * (1 - lam_next)

    # 1. the rotation q~ = e^{i theta} (q + bias) per pair: back by e^{-i theta}; theta's gradient Im(g conj(q~))
    g_kf = g_kf.view(b, h, C, Tb, 1, n)
    if g_k is not None:
        g_kf[:, :, -1, -1] += g_k.to(f).transpose(1, 2)
    pairs = lambda x: torch.view_as_complex(x.view(b, h, C, Tb, n)[..., :2 * n_ang].unflatten(-1, (n_ang, 2)))
    gq, gk, cq, ck = (pairs(x) for x in (g_qf, g_kf, qf, kf))
    # theta's gradient, Im(g conj(x~)) summed over q~ and k~: conjugated in place in their buffers (spent
    # after this), then complex products, so every pass reads whole pairs (four real passes on the
    # interleaved halves, strided, are about twice as slow here)
    torch.conj_physical(cq, out=cq)
    torch.conj_physical(ck, out=ck)
    g_theta = torch.mul(cq, gq, out=cq).addcmul_(ck, gk).imag                # (b, h, C, Tb, n_ang)
    back = torch.conj_physical(turn.view(b, h, C, Tb, n_ang), out=ws("e^-i theta", (b, h, C, Tb, n_ang), turn.dtype))
    torch.mul(gq, back, out=gq)
    torch.mul(gk, back, out=gk)
    g_pre = [g_qf.view(b, h, C, Tb, 1, n), g_kf]
    # theta = start_c + cumsum within the chunk; start_{c+1} = start_c + the chunk's last cumsum
    Ga = fs.new_zeros(b, h, n_ang) if g_angle is None else g_angle.to(f)
    g_start = g_theta.sum(3)
    for c in reversed(range(C)):
        g_theta[:, :, c, -1] += Ga
        Ga = Ga + g_start[:, :, c]
    g_inc = g_theta.flip(-2).cumsum(-2).flip(-2).view(b, h, L, n_ang)
    g_dt += (g_inc * th.permute(0, 2, 1, 3)).sum(-1) * math.pi              # th kept as (b, L, h, n_ang)
    # in Angles' own layout, th's (as V's gradient above): (th^2 - 1) g_inc (-pi dt)
    g_angles = torch.mul(th, th, out=th.new_empty(th.shape) if into["angles"] is None else into["angles"])
    g_angles.sub_(1).mul_(g_inc.permute(0, 2, 1, 3)).mul_((-math.pi * dt_f).transpose(1, 2)[..., None])

    def per_head(g, bias):  # (b, h, C, Tb, 1, n) -> the gradients of x (b, L, 1, h_qk, n) and of bias (1, h, n)
        g_bias = None if bias is None else g.sum((0, 2, 3)).transpose(0, 1)
        g_x = g.reshape(b, h_qk, h // h_qk, L, 1, n).sum(2).permute(0, 2, 3, 1, 4)
        return g_x, g_bias

    g_q, g_q_bias = per_head(g_pre[0], q_bias)
    g_k_in, g_k_bias = per_head(g_pre[1], k_bias)
    if g_v is not None:
        g_v_in[:, -1] += g_v.to(f)
    return (g_q, g_k_in, g_v_in, None, g_a.reshape(b, h, L), g_dt, g_trap, g_dt_next, g_trap_next, g_angles, Ga,
            g_H_in, g_q_bias, g_k_bias, g_skip)


def delta_of(trap, dt, f):
    """(1 - sigmoid(Trap)) DT in the compute dtype f: the trapezoid's shifted weight."""
    return (1 - torch.sigmoid(trap.to(f))) * dt.to(f)


def _finished_block(*args, Tb, rot, finish, extras):
    y, *states = scan_block(*args[:15], Tb=Tb, rot=rot, ws=NO_WORKSPACE)
    return (finish(y, args[2], args[15:15 + extras], args[15 + extras:], NO_WORKSPACE, None), *states)


def block_scalars(ADT, DT, Trap, t0, t1, e, T, f):
    """scan_block's per-token scalars for tokens t0 to t1 (whole chunks of T) of a sequence ending at e,
    made at once for the blocks there: gamma_s, coef_s = gamma_s + delta_{s+1} (delta read across
    every block and chunk edge, 0 past e) and from_start_t = exp(a_{c0} + ... + a_t), each (b, h, t1 - t0)
    in the compute dtype f, by the same formulas scan_block uses. ADT, DT, Trap: (b, h, l)."""
    end = min(t1 + 1, e)
    lam = torch.sigmoid(Trap[..., t0:end].to(f))
    dt = DT[..., t0:end].to(f)
    gamma, delta = lam * dt, (1 - lam) * dt
    if end == t1:   # past the end of the sequence: no next token, no shifted term
        delta = torch.cat((delta, delta.new_zeros(delta.shape[:-1] + (1,))), -1)
    L = t1 - t0
    gamma = gamma[..., :L]
    from_start = torch.exp(ADT[..., t0:t1].to(f).unflatten(-1, (-1, T)).cumsum(-1)).flatten(-2)
    return gamma, gamma + delta[..., 1:], from_start


def scan_block(q, k, v, up, a, dt, trap, dt_next, trap_next, angles, angle, H, q_bias, k_bias, skip, *, Tb, rot,
               ws, keep=False, scalars=None):
    """One block of L = C Tb tokens (C chunks of Tb): steps 1 to 4 of the module docstring.

    q, k: (b, L, R, h_qk, n); v: (b, L, h, p); up: (R, h, p) or None; a, dt, trap: (b, h, L) (ADT,
    DT, Trap); dt_next, trap_next: (b, h, 1), the token after the block, or None at the end of the
    sequence; angles: (b, L, h, n_ang); angle: (b, h, n_ang) and H: (b, h, p, n), the angle and the
    folded state H' the block starts from; q_bias, k_bias: (R, h, n) or None; skip: (h,), D added to
    y (rank 1 only), or None; ws: a Workspace (its
    buffers written in place) or NO_WORKSPACE (every op functional, for autograd); keep (rank 1, with
    a workspace of fresh buffers): the scores are kept apart from the weighted P, and the block's
    intermediates are returned too, for SisoScan's backward; scalars (not with keep): gamma, coef
    and from_start (b, h, C, Tb) from block_scalars, or None to make them here.
    Returns y (b, L, R, h, p) (a permuted view, maybe of a buffer), and the angle, H', k~ (b, R, h, n)
    and v (b, h, p) after the block's last token [, the intermediates (dict)].
    """
    b, L, R, h_qk, n = q.shape
    h, p = v.shape[-2:]
    C, f, n_ang, TR = L // Tb, q.dtype, angles.shape[-1], Tb * R
    inplace = ws is not NO_WORKSPACE
    a, dt = a.to(f), dt.to(f)
    if scalars is None:
        lam = torch.sigmoid(trap.to(f))
        gamma, delta = lam * dt, (1 - lam) * dt                              # (b, h, L)
        if dt_next is None:   # past the end of the sequence: no next token, no shifted term
            after = delta.new_zeros(b, h, 1)
        else:
            after = (1 - torch.sigmoid(trap_next.to(f))) * dt_next.to(f)
        coef = (gamma + torch.cat((delta[..., 1:], after), -1)).view(b, h, C, Tb)   # gamma_s + delta_{s+1}
        gamma = gamma.view(b, h, C, Tb)
        from_start = None
    else:
        gamma, coef, from_start = scalars
    a = a.view(b, h, C, Tb)

    # 1. angles: cumulative within the chunk, each chunk's start angle carried sequentially (mod 2 pi)
    # tanh in the input's own layout (on a permuted view it runs about 3x slower), the product with
    # pi DT written in the block's: no separate copy
    th = torch.tanh(angles.to(f), out=ws("tanh", angles.shape, f))          # (b, L, h, n_ang)
    inc = torch.mul(th.permute(0, 2, 1, 3), (math.pi * dt)[..., None], out=ws("pi tanh dt", (b, h, L, n_ang), f))
    # the cumulative sum in place where there is a workspace: one buffer fewer for the block to touch
    inc = inc.view(b, h, C, Tb, n_ang)
    cs = inc.cumsum_(-2) if inplace else inc.cumsum(-2)
    starts = []
    for c in range(C):
        starts.append(angle)
        angle = torch.remainder(angle + cs[:, :, c, -1], TWO_PI)
    # theta itself is not reduced again: it is read only through cos and sin, whose own argument
    # reduction is as accurate as a remainder's, and its rounding (relative to start + cs) is the same
    theta = torch.add(torch.stack(starts, 2)[:, :, :, None], cs, out=cs if inplace else None)[..., None, :]  # every rank
    cos = torch.cos(theta, out=ws("cos", theta.shape, f))
    sin = torch.sin(theta, out=ws("sin", theta.shape, f))
    turn = torch.complex(cos, sin, out=ws("e^i theta", theta.shape, torch.promote_types(f, torch.complex64)))
    qr = rot(_per_head(q, q_bias, h, Tb, ws, "q"), cos, sin, turn, ws)       # q~ (b, h, C, Tb, R, n)
    kr = rot(_per_head(k, k_bias, h, Tb, ws, "k"), cos, sin, turn, ws)       # k~
    vr = _contiguous(v.permute(0, 2, 1, 3), ws, "v").view(b, h, C, Tb, 1, p)
    if up is not None:
        vr = torch.mul(vr, up.permute(1, 0, 2)[:, None, None], out=ws("v~", (b, h, C, Tb, R, p), f))
    qf, kf, vf = (x.reshape(b * h * C, TR, x.shape[-1]) for x in (qr, kr, vr))   # rows (t r), batch (b h c)

    # 2. intra-chunk: W[t, s] = w(t, s) on and below the diagonal (above it: selected away below)
    # the weights EC[t, s] = exp(seg(t, s)) coef_s; the decays E alone are kept for the backward
    E = segment_decays(a, ws) if keep else None                              # (b, h, C, Tb, Tb)
    EC = torch.mul(E, coef[..., None, :], out=ws("W", E.shape, f)) if keep else segment_decays(a, ws, coef)
    # each chunk's contribution to the next H' reads row Tb-1 of EC (seg(last, last) = 0), the
    # trapezoid's delta_{s+1} included on the diagonal; the intra-chunk weights then have gamma_t
    # there, written over the diagonal alone (above it the values are selected away below)
    w_last = EC[..., -1, :].clone()
    EC.diagonal(dim1=-2, dim2=-1).copy_(gamma)
    W = EC
    scores = torch.bmm(qf, kf.transpose(1, 2), out=ws("scores", (b * h * C, TR, TR), f))
    if R == 1:
        P = torch.mul(scores.view(W.shape), W, out=ws("P", W.shape, f) if keep else
                      scores.view(W.shape) if inplace else None)
        if skip is not None:   # D v_t as a weight on the diagonal: no pass over the output for it
            P.diagonal(dim1=-2, dim2=-1).add_(skip[:, None, None])
        P = P.tril_() if inplace else torch.where(_causal(Tb, q.device), P, 0.0)
    else:
        P = torch.where(_causal(Tb, q.device)[:, None, :, None], scores.view(b, h, C, Tb, R, Tb, R) * W[..., :, None, :, None],
                        0.0)
    # a non-finite v_s would reach the earlier outputs of its chunk through P's zeros (0 x inf is
    # NaN): the product runs on v with non-finite entries zeroed, and each output from the bad token
    # on, in its channel and every rank, is made NaN, as the loop's is. The chunk state S keeps the
    # raw v, so later chunks get the NaN (or inf) through the state, as in the loop.
    finite = bool(torch.isfinite(vf.sum()))   # a finite sum that overflows only takes the slow path
    vf_intra = vf if finite else torch.where(torch.isfinite(vf), vf, 0.0)
    y = torch.bmm(P.reshape(b * h * C, TR, TR), vf_intra, out=ws("y", (b * h * C, TR, p), f))
    if not finite:
        seen = (~torch.isfinite(vr)).any(-2, keepdim=True).cumsum(3) > 0      # (b, h, C, Tb, 1, p)
        poison = torch.where(seen, math.nan, y.new_zeros(())).expand(b, h, C, Tb, R, p).reshape(b * h * C, TR, p)
        y = torch.add(y, poison, out=y if inplace else None)
    # each chunk's contribution to the next H': row Tb-1 of EC (seg(last, last) = 0)
    w_kept = w_last
    w_last = w_last[..., None, None].expand(b, h, C, Tb, R, 1).reshape(b * h * C, TR, 1)
    vw = torch.mul(vf, w_last, out=ws("vw", vf.shape, f))
    # the states are kept transposed, H'^T (n, p), inside the block: the readout q~ H'^T is then a
    # product of two untransposed operands, about a quarter faster on this CPU than one through a
    # transposed view; the chunk state's product has one transposed operand either way
    ST = torch.bmm(kf.transpose(1, 2), vw, out=ws("S", (b * h * C, n, p), f)).view(b, h, C, n, p)
    if from_start is None:
        from_start = torch.exp(a.cumsum(-1))                                 # exp(a_{c0} + ... + a_t)

    # 3. the state pass, sequential in the compute dtype, each H'_c written where the readout reads it
    HT = H.transpose(-1, -2)                                                 # (b, h, n, p)
    last = lambda out: torch.addcmul(ST[:, :, -1], from_start[:, :, -1, -1, None, None], folded[:, :, -1], out=out)
    if inplace:
        folded = ws("folded", (b, h, C, n, p), f)
        if HT.data_ptr() != folded.data_ptr():   # else the previous block left it there (below)
            folded[:, :, 0] = HT
        for c in range(1, C):
            torch.addcmul(ST[:, :, c - 1], from_start[:, :, c - 1, -1, None, None], folded[:, :, c - 1],
                          out=folded[:, :, c])
        if keep:
            HT = last(ws("H", (b, h, n, p), f))
    else:
        folded = []
        for c in range(C):
            folded.append(HT)
            HT = torch.addcmul(ST[:, :, c], from_start[:, :, c, -1, None, None], HT)
        folded = torch.stack(folded, 2)

    # 4. inter-chunk readout
    # into vw's buffer where there is a workspace: vw is spent once the chunk states are formed
    inter = torch.bmm(qf, folded.view(b * h * C, n, p), out=ws("inter" if keep else "vw", y.shape, f))
    if inplace and not keep:
        # the block's last state written where the next block of this shape starts from (its folded[0]),
        # now that the readout has read this block's; no copy between blocks
        HT = last(folded[:, :, 0])
    H = HT.transpose(-1, -2)                                                 # (b, h, p, n), a view
    if keep:
        # a block under autograd gives y in the output's own layout (b, L, R, h, p), written there by this
        # last pass: SisoScan's gate then writes the output with no transposing pass of its own
        y_out = ws("out", (b, L, R, h, p), f)
        torch.addcmul(y.view(b, h, L, R, p), inter.view(b, h, L, R, p), from_start.reshape(b, h, L, 1, 1),
                      out=y_out.permute(0, 3, 1, 2, 4))
        y = y_out
    else:
        rows = from_start[..., None].expand(b, h, C, Tb, R).reshape(b * h * C, TR, 1)
        y = torch.addcmul(y, inter, rows, out=y if inplace else None)
        y = y.view(b, h, L, R, p).permute(0, 2, 3, 1, 4)                     # (b, L, R, h, p)
    states = (y, angle, H, kr[:, :, -1, -1].transpose(1, 2).clone(), v[:, -1].clone())
    if not keep:
        return states
    return states, dict(lam=lam, th=th, E=E, turn=turn, finite=finite, W=W, scores=scores, P=P,
                        w_last=w_kept, folded=folded, inter=inter, from_start=from_start)


def segment_decays(a, ws, coef=None, G=DECAY_BLOCK):
    """exp(seg(t, s)) = exp(a_{s+1} + ... + a_t) within each chunk, times coef_s if given: a, coef
    (b, h, C, T) -> E (b, h, C, T, T); above the diagonal a placeholder that the callers select away
    (finite where a is).

    In sub-blocks of G tokens (G = decay_block(T), K = T / G of them): on the diagonal sub-blocks a
    masked cumulative sum over exactly its own terms (row r of the masked matrix holds a_r where
    r > s), then its exp. Below them, for t in sub-block I and s in sub-block J < I, the segment
    splits at the sub-blocks' edges, and E[t, s] is the product of three exps, each of a sum over
    its own terms: head_I(t) = exp(a_{t_I} + ... + a_t) (t_I the first token of I), between(I, J)
    = exp of the totals of the sub-blocks strictly between (the same masked cumulative sum, over
    the K totals) and tail_J(s) = exp(a_{s+1} + ... + a_{last of J}), the last row of J's diagonal
    sub-block. Never a difference of prefix sums; exp and the cumulative sums run over G T + K^2
    entries a chunk, not T^2 (the chunk's largest elementwise cost), and the rest is one product
    over E and one copy. A column factor coef_s rides on tail_J(s) and the diagonal sub-blocks.
    ws: a Workspace (its buffers written in place) or NO_WORKSPACE (functional, for autograd).
    """
    b, h, C, T = a.shape
    G = decay_block(T, G)
    K = T // G
    blocks = a.view(b, h, C, K, G)
    # (tril with out= on a broadcast input takes a slow path: the copy and then tril_ is about 5x faster)
    masked = ws("masked", (b, h, C, K, G, G), a.dtype)
    rows = blocks[..., :, None].expand(b, h, C, K, G, G)
    masked = torch.tril(rows, -1) if masked is None else masked.copy_(rows).tril_(-1)
    seg = torch.cumsum(masked, -2, out=ws("seg", masked.shape, a.dtype))
    E = ws("EC", (b, h, C, T, T), a.dtype)
    inplace = E is not None
    seg = torch.exp(seg, out=seg if inplace else None)                      # the diagonal sub-blocks
    if coef is not None:
        seg = torch.mul(seg, coef.view(b, h, C, K, 1, G), out=seg if inplace else None)
    sums = blocks.cumsum(-1)                                                 # a_{t_I} + ... + a_t
    totals = sums[..., -1]                                                   # (b, h, C, K)
    # across[I', J] = exp(total_{J+1} + ... + total_{I'}) for I' > J (1 for I' <= J); between(I, J)
    # is its row I - 1 (row -1, for I = 0, has no entry below the diagonal: 1)
    across = torch.exp(torch.tril(totals[..., :, None].expand(b, h, C, K, K), -1).cumsum(-2))
    between = torch.cat((torch.ones_like(across[..., :1, :]), across[..., :-1, :]), -2)
    outer = between[..., :, :, None] * seg[..., -1, :][..., None, :, :]      # between(I, J) tail_J(s): (b, h, C, K, K, G)
    E = torch.mul(torch.exp(sums)[..., :, :, None, None], outer[..., :, None, :, :],
                  out=None if E is None else E.view(b, h, C, K, G, K, G)).view(b, h, C, T, T)
    E.view(b, h, C, K, G, K, G).diagonal(0, 3, 5).permute(0, 1, 2, 5, 3, 4).copy_(seg)
    return E


def decay_block(T, most=DECAY_BLOCK):
    """The sub-block of a chunk of T tokens in segment_decays: the largest divisor of T that is at most
    ``most`` and T / 2 and leaves at most ``most`` sub-blocks; T itself (one sub-block) where none is.
    So T = 64 takes 16, and the small chunks of the property tests take 1 (2, 3, 5), 2 (4) or 3 (6)."""
    fits = [d for d in range(1, min(most, T // 2) + 1) if T % d == 0 and T // d <= most]
    return fits[-1] if fits else T


def segment_sums(g, ws):
    """The gradient of each a_r from those of the segments seg(t, s) = a_{s+1} + ... + a_t: g (b, h, C,
    T, T), zero on and above the diagonal, -> (b, h, C, T), entry r the sum of g[t, s] over s < r <= t.

    As a product with the strictly upper triangle of ones, U[s, r] = [s < r], then a select (t >= r)
    and a column sum: the cumulative sum along s it replaces runs one row at a time, several times
    slower on this CPU. Every sum is over exactly its own terms; the others enter multiplied by 0,
    so where g has a non-finite entry (0 x inf is NaN) the masked cumulative sum is taken instead,
    as the select rule wants. That case shows in entry 0, which is the sum of 0 x g[t, s] over every
    row t: NaN exactly when some g[t, s] is not finite."""
    b, h, C, T, _ = g.shape
    U = torch.ones(T, T, dtype=g.dtype, device=g.device).triu_(1)
    rows = torch.matmul(g.view(-1, T, T), U, out=ws("segment sums", (b * h * C, T, T), g.dtype))
    sums = rows.view(g.shape).tril_().sum(-2)
    if bool(torch.isfinite(sums[..., 0]).all()):
        return sums
    sums = torch.zeros_like(sums)
    sums[..., 1:] = g.cumsum(-1)[..., :-1].tril_(-1).sum(-2)
    return sums


def _causal(T, device):
    """(T, T) bool, [t, s]: t >= s."""
    ar = torch.arange(T, device=device)
    return ar[:, None] >= ar[None, :]


def _contiguous(x, ws, name):
    """x in contiguous memory: copied into the workspace's buffer, or a fresh copy under autograd."""
    buffer = ws(name, x.shape, x.dtype)
    return x.contiguous() if buffer is None else buffer.copy_(x)


def rotate_pairs(x, cos, sin, turn, ws):
    """loop.rotate (interleaved pairs (2i, 2i+1) by theta_i, dimensions from 2 n_ang on unchanged) as
    one complex product: a pair is a complex number x_{2i} + i x_{2i+1} times e^{i theta_i}, read
    through a complex view, so the rotation is one pass where the real form makes six; with a
    workspace it is done in place (x is then a buffer of the caller's).

    x: (..., n) with n even and its last dimension contiguous; cos, sin: cos theta and sin theta
    (unused), and turn: e^{i theta}, broadcastable to (..., n_ang). Returns (..., n).
    """
    m = 2 * turn.shape[-1]
    pairs = torch.view_as_complex(x[..., :m].unflatten(-1, (m // 2, 2)))
    if ws is not NO_WORKSPACE:
        torch.mul(pairs, turn, out=pairs)
        return x
    turned = torch.view_as_real(pairs * turn).flatten(-2)
    return torch.cat((turned, x[..., m:]), -1) if m < x.shape[-1] else turned


def rotate_halves_cs(x, cos, sin, turn, ws):
    """loop.rotate_halves (pairs (i, i + n/2) by theta_i, the MIMO pairing) from cos and sin theta
    (turn = e^{i theta} and ws unused: the pairs are not adjacent, so no complex view)."""
    half, na = x.shape[-1] // 2, cos.shape[-1]
    x0, x1 = x[..., :na], x[..., half:half + na]
    return torch.cat((x0 * cos - x1 * sin, x[..., na:half], x0 * sin + x1 * cos, x[..., half + na:]), dim=-1)


def _per_head(x, bias, h, Tb, ws, name):
    """(b, L, R, h_qk, n) -> (b, h, C, Tb, R, n) + bias (R, h, n), head i reading head i // (h / h_qk),
    made once in the layout the batched matmuls read."""
    b, L, R, h_qk, n = x.shape
    g, C = h // h_qk, L // Tb
    x = x.permute(0, 3, 1, 2, 4).reshape(b, h_qk, 1, C, Tb, R, n)
    shape = (b, h_qk, g, C, Tb, R, n)
    if bias is None:
        out = _contiguous(x.expand(shape), ws, name)
    else:
        bias = bias.transpose(0, 1).reshape(h_qk, g, 1, 1, R, n)
        out = torch.add(x, bias, out=ws(name, shape, x.dtype))
    return out.reshape(b, h, C, Tb, R, n)
