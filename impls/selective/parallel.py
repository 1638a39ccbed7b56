"""A parallel selective scan in plain PyTorch: chunks side by side, streamed through cache.

The recurrence h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, y_t = <C_t, h_t> (Algorithm 2 of the
Mamba paper; the same equations as impls/selective/loop.py; letters b, d, l, n, g as in impls/frontdoor.py)
is linear in h, so a sequence can be cut into K chunks of T tokens that run side by side:

    pass 1  every chunk runs its T steps from a zero state, all K at once; chunk k ends in s_k,
            and its total decay is P_k = exp(A * sum of dt over the chunk)
    carry   H_0 = initial_state, H_{k+1} = P_k H_k + s_k: K small steps, one after another
    pass 2  every chunk runs its T steps again from its true starting state H_k, all K at once,
            reading out y_t on the way

Numerics. Only decays and products of decays (all <= 1 for A <= 0) ever multiply a state:
nothing is divided by a cumulative decay, no exp of a positive cumulative sum is taken and no
logarithm is used, so under strong decay the states underflow to 0 exactly as in the loop,
instead of overflowing to inf or NaN, at any length.

Work. A step of every chunk at once is one multiply and one broadcast multiply-add on a
(b, K, d, n) state (and, in pass 2, one batched matrix product for the readout); K is chosen so
that a step touches tens of thousands of elements, since an eager op costs microseconds however
small. When b*d*n alone is that large, K = 1: no pass 1, no carry, and the scan is the loop
itself, with everything but the recurrence done in bulk. The decays exp(dt A), the only
transcendental per element and the whole cost of the floor, are computed once per segment (below)
in one op and read by both passes: pass 1 costs two cheap ops per step, not a second exp.

Memory and cache. The (b, d, l, n) tensors are never built. The sequence is cut into segments
of K*T tokens that run one after another, each starting from the last state of the one before;
a segment's decays take SEGMENT_ELEMENTS elements (8 MiB), the state stepped in place
(b, K, d, n) stays in cache, and everything per token (softplus, D, the gate, dt u, y) is done in
the caller's (b, d, l) layout, vectorised, with one transposing copy per tensor into and out of
a segment. Memory beyond the arguments and the output is therefore a few segments whatever l is
(mamba.py's pscan and the loop's autograd graph hold O(b d l n)). A state is laid out
(b, K, g, n, d/g), channels innermost: exp and multiply-adds run over contiguous rows, and the
readout is a batched (1 x n) @ (n x d/g) product, several times cheaper on a CPU than a sum
over a short innermost n.

Backward (a torch.autograd.Function). The adjoint lambda_t = dL/dh_t runs backwards in time,
lambda_t = C_t dL/dy_t + exp(dt_{t+1} A) lambda_{t+1}, from dL/dlast_state, with the same chunk
and segment structure reversed: pass 1 runs each chunk's adjoint from zero, a carry links the
chunk ends, pass 2 runs the true adjoint. The forward keeps every chunk's starting state
(1/T of a full state tensor), so the backward recomputes a segment's decays and states forwards
from there: a state is never stepped backwards (that would divide by the decay). With
q_t = exp(dt_t A) lambda_t h_{t-1}:

    dL/dC_t = sum_d dL/dy_t h_t          dL/dB_t = sum_d lambda_t dt_t u_t
    dL/d(dt_t u_t) = sum_n lambda_t B_t      dL/ddt_t += sum_n q_t A      dL/dA = sum_{b,t} q_t dt_t
    dL/dinitial_state = exp(dt_0 A) lambda_0

and the softplus, bias, D and gate gradients follow elementwise in the caller's layout.

Packed sequences (cu_seqlens, b = 1). Chunks are laid over the packed tokens regardless of where
sequences start, so a sequence may start or end anywhere in a chunk, and a chunk may hold several.
A step at a sequence's first token starts from that sequence's own initial state: just before it,
the chunk's state is overwritten with initial_state[i] (or zeros), so the step computes
Ā_s h0_i + B̄_s x_s, exactly the first step of the sequence scanned alone (no decay from the
chunk's start). A chunk in which a sequence starts passes nothing of its starting state on: the
carry skips it (multiplying by a decay of 0 would still pass a NaN or inf across). Each
sequence's last state is copied out after its last token (wherever that falls in a chunk), and a
length-0 sequence passes its initial state through.
Backwards, the same boundaries: dL/dlast_state[i] enters the adjoint at sequence i's last token,
and at its first token the adjoint Ā_s lambda_s is dL/dinitial_state[i] and stops there.
"""

import math
import threading

import torch
import torch.nn.functional as F

from ..frontdoor import compute_dtype

# How the work is cut (module-level so that tests can shrink them, putting many chunk and
# segment boundaries into small cases). Chunks run side by side until one step touches at most
# STEP_ELEMENTS elements (b*K*d*n): enough that an op's fixed cost is small beside its work, and
# under torch's 32768-element grain, so that a step's small ops run on one thread. A parallel
# region per step costs a synchronisation each time, and on a loaded machine a wait for a
# descheduled thread (measured: a 30x slowdown of the whole scan on this 2-core machine); the
# bulk ops of a segment, the exp above all, still use every thread. When b*d*n alone is over
# half of it, K = 1.
STEP_ELEMENTS = 32000
SEGMENT_ELEMENTS = 1 << 21   # elements (T*b*K*d*n) of a segment's decays
MIN_CHUNK = 16               # chunks of at least this many tokens (the carry is sequential in K)
WORKSPACE_ELEMENTS = 1 << 23  # segment buffers up to this size are kept for the next call
Q_PER_STEP_FROM = 1 << 16    # backward: reduce q per step from this many elements per step, else in bulk

# Segment buffers are reused from call to call (per thread): a fresh multi-megabyte allocation
# comes from the operating system page by page, and those page faults cost as much as the scan.
_workspace = threading.local()


class Plan:
    """Sizes of one call. The sequence is cut into segments of L = K*T tokens, run one after
    another; a segment into K chunks of T tokens, run side by side. Only the last segment is
    padded. Channels are G groups of dG (G is the lcm of B's and C's group counts)."""

    def __init__(self, u, A, B, C, offsets=None):
        self.b, self.d, self.l = u.shape
        self.n = A.shape[1]
        self.device = u.device
        self.gB = B.shape[1] if B.dim() == 4 else 1
        self.gC = C.shape[1] if C.dim() == 4 else 1
        self.G = self.gB * self.gC // math.gcd(self.gB, self.gC)
        self.dG = self.d // self.G
        self.f = compute_dtype(u.dtype)
        step = self.b * self.d * self.n
        K = max(1, min(STEP_ELEMENTS // step, self.l // MIN_CHUNK))
        T = max(1, SEGMENT_ELEMENTS // (K * step))
        segments = -(-self.l // (K * T))
        tokens = -(-self.l // segments)         # spread evenly: the last segment is not mostly padding
        self.T = -(-tokens // K)
        self.K = -(-tokens // self.T)
        self.L = self.K * self.T
        self.segments = [(a, min(a + self.L, self.l)) for a in range(0, self.l, self.L)]
        self.M = self.b * self.K * self.G       # independent (1 x n) @ (n x dG) products per step
        self.bounds = None if offsets is None else _Boundaries(self, offsets)

    def empty(self, *shape):
        return torch.empty(*shape, dtype=self.f, device=self.device)

    def state(self):
        """An uninitialised (b, K, G, n, dG) state: one per chunk."""
        return self.empty(self.b, self.K, self.G, self.n, self.dG)

    def buffer(self, name):
        """A (T, b, K, G, n, dG) segment buffer kept in this thread's workspace under ``name``.
        Time leads, so that one step of every chunk is one contiguous slice."""
        shape = (self.T, self.b, self.K, self.G, self.n, self.dG)
        size = math.prod(shape)
        cache = _workspace.__dict__.setdefault("buffers", {})
        buf = cache.get(name)
        if buf is None or buf.dtype != self.f or buf.device != self.device or buf.numel() < size:
            buf = self.empty(size)
            if size <= WORKSPACE_ELEMENTS:
                cache[name] = buf
        return buf[:size].view(shape)

    def to_state(self, h):
        """(b, d, n) -> (b, G, n, dG) view."""
        return h.to(self.f).view(self.b, self.G, self.dG, self.n).transpose(-1, -2)

    def from_state(self, h):
        """(b, G, n, dG) -> a new (b, d, n) tensor (never a view of a buffer); any leading size."""
        out = self.empty(h.shape[0], self.d, self.n)
        out.view(h.shape[0], self.G, self.dG, self.n).copy_(h.transpose(-1, -2))
        return out

    def to_states(self, h):
        """(nseq, d, n) -> (nseq, G, n, dG) view: per-sequence states in a chunk's layout."""
        return h.to(self.f).view(h.shape[0], self.G, self.dG, self.n).transpose(-1, -2)

    def restarted(self, s):
        """The chunks of segment s in which a packed sequence starts (none without cu_seqlens)."""
        return () if self.bounds is None else self.bounds.restarted[s]

    def rows(self, k):
        """Chunk k's rows of a (M, ...) per-step view (b = 1: rows k*G .. k*G + G - 1)."""
        return slice(k * self.G, (k + 1) * self.G)


class _Boundaries:
    """Where packed sequences start and end (b = 1), per segment s:
    first[s][j] and last[s][j]: [(chunk k, sequence i), ...] for the sequences whose first (last)
    token is step j of chunk k; restarted[s]: the chunks in which a sequence starts."""

    def __init__(self, p, offsets):
        self.nseq = len(offsets) - 1
        self.first = [{} for _ in p.segments]
        self.last = [{} for _ in p.segments]
        self.restarted = [set() for _ in p.segments]
        for i, (a, e) in enumerate(zip(offsets, offsets[1:])):
            if e == a:
                continue  # a length-0 sequence: its state passes through, no token to mark
            for pos, table in ((a, self.first), (e - 1, self.last)):
                seg, offset = divmod(pos, p.L)
                k, j = divmod(offset, p.T)
                table[seg].setdefault(j, []).append((k, i))
            self.restarted[a // p.L].add(a % p.L // p.T)


# --- moving data between the caller's (b, ..., l) layout and segments ------------------------
# Token a + k*T + j of a segment is chunk k, step j. Per batch row, the segment (K*T, channels)
# is the transpose of a (channels, tokens) slab: a transposing copy of a contiguous matrix takes
# ATen's blocked 2-D path, several times faster than a strided copy, hence the loops over rows.

def _gather(p, X, used):
    """(T, b, K, *mid) time-major segment, compute dtype <- X (b, *mid, used); zeros past used."""
    mid = X.shape[1:-1]
    m = math.prod(mid)
    src = X.reshape(p.b, m, used).to(p.f).contiguous()
    out = p.empty(p.b, p.L, m)
    for i in range(p.b):
        out[i, :used].copy_(src[i].t())
    if used < p.L:
        out[:, used:] = 0                       # padding: dt = 0 there, an exact no-op step
    # to time-major with a contiguous copy: the rows are long (K*m), so it is cheap
    return out.view(p.b, p.K, p.T, *mid).movedim(2, 0).contiguous()


def _scatter(p, seg, used):
    """A new (b, *mid, used) slab <- a (T, b, K, *mid) time-major segment; the inverse of _gather."""
    mid = seg.shape[3:]
    m = math.prod(mid)
    src = seg.movedim(0, 2).reshape(p.b, p.L, m)
    out = p.empty(p.b, m, used)
    for i in range(p.b):
        out[i].copy_(src[i, :used].t())
    return out.view(p.b, *mid, used)


class _Inputs:
    """The arguments, and per segment the elementwise work around the recurrence, done in the
    caller's (b, d, l) layout where it is contiguous and vectorised."""

    def __init__(self, p, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        self.p, self.u, self.delta, self.z = p, u, delta, z
        self.B = B if B.dim() == 4 else B.unsqueeze(1)               # (b, gB, n, l)
        self.C = C if C.dim() == 4 else C.unsqueeze(1)
        self.D = None if D is None else D.to(p.f)[:, None]           # (d, 1)
        self.bias = None if delta_bias is None else delta_bias.to(p.f)[:, None]
        self.softplus = delta_softplus
        # A as (G, n, dG), the layout of a state, so that dt (..., G, 1, dG) * A broadcasts
        self.A = A.to(p.f).reshape(p.G, p.dG, p.n).transpose(1, 2).contiguous()

    def native(self, X, a, e):
        """X[..., a:e], (b, d, e - a), in the compute dtype (a view when it already is)."""
        return X[..., a:e].to(self.p.f)

    def dt(self, a, e):
        """(dt, the value before softplus or None), (b, d, e - a)."""
        v = self.native(self.delta, a, e)
        if self.bias is not None:
            v = v + self.bias
        if not self.softplus:
            return v, None
        return F.softplus(v), v                 # threshold 20, as in the loop

    def groups(self, X, a, e):
        """(T, b, K, G, n) segment of B or C (b, g, n, l), each group repeated G // g times."""
        p = self.p
        seg = _gather(p, X[..., a:e], e - a)
        g = X.shape[1]
        if g != p.G:
            # a copy: where g = 1, expand-then-reshape would be a zero-stride view that the per-step
            # views (_per_step) cannot flatten
            seg = seg.repeat_interleave(p.G // g, dim=3)
        return seg

    def decays(self, dt, out):
        """out (T, b, K, G, n, dG) <- exp(dt A), the zero-order hold Ā of the paper (eq. 4),
        for a (T, b, K, d) segment dt."""
        p = self.p
        torch.mul(dt.view(p.T, p.b, p.K, p.G, 1, p.dG), self.A, out=out)
        return out.exp_()

    def chunk_decays(self, dt):
        """(b, K, G, n, dG): each chunk's total decay exp(A * sum of dt), a product of decays, <= 1
        for A <= 0 and dt >= 0 (nothing is ever divided by it). A chunk in which a packed sequence
        starts passes nothing of its starting state on: _carry skips its decay."""
        p = self.p
        return torch.mul(dt.sum(0).view(p.b, p.K, p.G, 1, p.dG), self.A).exp_()


def _per_step(p, seg, *shape):
    """Per-step views of a time-major segment, each of ``shape``: (b*K*G, 1, dG) rows of a
    (T, b, K, d) segment, or (b*K*G, n, 1) columns and (b*K*G, 1, n) rows of a (T, b, K, G, n) one."""
    return seg.view(p.T, *shape).unbind(0)


def _carry(p, ends, P, starts, backwards=False, restarted=()):
    """starts[:, k + 1] <- P[:, k] starts[:, k] + ends[:, k] for k = 0..K-2, in order: each chunk
    starts where the one before it ended (the short sequential part of the scan). Backwards, for
    adjoints: starts[:, k - 1] <- P[:, k] starts[:, k] + ends[:, k] for k = K-1..1. For a chunk in
    ``restarted`` (a packed sequence starts in it) only ends[:, k] passes: 0 * starts would still
    carry a NaN or inf of the sequence before across the boundary."""
    ends, P, starts = ends.unbind(1), P.unbind(1), starts.unbind(1)
    for k in (range(p.K - 1, 0, -1) if backwards else range(p.K - 1)):
        to = starts[k - 1 if backwards else k + 1]
        if k in restarted:
            to.copy_(ends[k])
        else:
            torch.addcmul(ends[k], P[k], starts[k], out=to)


def _steps(p, dAs, xs, Bs, h, Cs=None, ys=None, s=None, h0=None, last=None):
    """Step h (b*K*G, n, dG) in place through a segment: h_t = Ā_t h_{t-1} + x_t B_t (eq. 2a),
    reading out y_t = <C_t, h_t> (eq. 2b), with Cs[t] (b*K*G, 1, n), into ys[t] (b*K*G, 1, dG)
    when given. The state stays in cache; a step reads its decays and a few per-token values,
    nothing else of segment size.

    Packed sequences (p.bounds, this is segment s): before a sequence's first token its chunk's
    state is set to h0[i] (nseq, G, n, dG), or zeros when h0 is None; after its last token the
    state is copied into last[i] when last is given.

    In float64, the oracle's dtype, where the tolerance is a few ulps, each step rounds as the
    loop does: x B is rounded before it is added (no fused multiply-add), and the n products of
    the readout are summed over a contiguous innermost n, in the loop's order (under cancellation
    another order of that sum differs by more than a few ulps)."""
    exact = p.f == torch.float64
    first, final = (p.bounds.first[s], p.bounds.last[s]) if p.bounds is not None else ({}, {})
    for j in range(p.T):
        for k, i in first.get(j, ()):
            h[p.rows(k)] = 0 if h0 is None else h0[i]
        if exact:
            h.mul_(dAs[j]).add_(xs[j] * Bs[j])
        else:
            h.mul_(dAs[j]).addcmul_(xs[j], Bs[j])
        if ys is not None:
            if exact:
                ys[j].view(p.M, p.dG).copy_((h.transpose(1, 2) * Cs[j]).contiguous().sum(-1))
            else:
                torch.bmm(Cs[j], h, out=ys[j])
        if last is not None:
            for k, i in final.get(j, ()):
                last[i] = h[p.rows(k)]
    return h


# --- forward -------------------------------------------------------------------------------

def _forward(p, x_in, initial_state, save):
    """y (b, d, l) in u's dtype and last_state (b, d, n); with ``save``, also every chunk's
    starting state (segments, b, K, G, n, dG), and y before the gate (b, d, l) when there is one."""
    u, z = x_in.u, x_in.z
    y = torch.empty(p.b, p.d, p.l, dtype=u.dtype, device=p.device)
    y_pre = p.empty(p.b, p.d, p.l) if save and z is not None else None
    saved_starts = p.empty(len(p.segments), p.b, p.K, p.G, p.n, p.dG) if save else None
    dA = p.buffer("decays")
    dAs = dA.view(p.T, p.M, p.n, p.dG).unbind(0)
    h, starts = p.state(), p.state()
    hv = h.view(p.M, p.n, p.dG)
    ys = p.empty(p.T, p.M, 1, p.dG)
    carry = torch.zeros(p.b, p.G, p.n, p.dG, dtype=p.f, device=p.device)
    h0 = last = None
    if p.bounds is not None:                 # packed: each sequence starts from its own state
        h0 = None if initial_state is None else p.to_states(initial_state)
        last = torch.zeros(p.bounds.nseq, p.G, p.n, p.dG, dtype=p.f, device=p.device)
        if h0 is not None:
            last.copy_(h0)                   # what a length-0 sequence returns
    elif initial_state is not None:
        carry.copy_(p.to_state(initial_state))
    for s, (a, e) in enumerate(p.segments):
        dt_native, _ = x_in.dt(a, e)
        u_native = x_in.native(u, a, e)
        dt = _gather(p, dt_native, e - a)
        xs = _per_step(p, _gather(p, dt_native * u_native, e - a), p.M, 1, p.dG)   # dt u
        x_in.decays(dt, dA)                                          # the only exp per element
        Bs = _per_step(p, x_in.groups(x_in.B, a, e), p.M, p.n, 1)
        Cs = _per_step(p, x_in.groups(x_in.C, a, e), p.M, 1, p.n)
        starts[:, 0] = carry
        if p.K > 1:
            h.zero_()
            _steps(p, dAs, xs, Bs, hv, s=s, h0=h0)                   # pass 1: each chunk from zero
            _carry(p, h, x_in.chunk_decays(dt), starts, restarted=p.restarted(s))
        if save:
            saved_starts[s] = starts
        h.copy_(starts)
        _steps(p, dAs, xs, Bs, hv, Cs, ys.unbind(0), s, h0, last)   # pass 2: from the true starts
        carry.copy_(h[:, p.K - 1])
        yb = _scatter(p, ys.view(p.T, p.b, p.K, p.d), e - a)
        if x_in.D is not None:
            yb += x_in.D * u_native                                  # skip connection D u
        if y_pre is not None:
            y_pre[..., a:e] = yb
        if z is not None:
            yb *= F.silu(x_in.native(z, a, e))                       # the Mamba block's gate
        y[..., a:e] = yb
    return y, p.from_state(carry if last is None else last), (saved_starts, y_pre)


# --- backward ------------------------------------------------------------------------------

def _backward(p, x_in, saved, gy, glast, needs, initial_state=None):
    """Gradients for (u, delta, A, B, C, D, z, delta_bias, initial_state), None where not needed.
    Segments run last to first; in each, the adjoint runs backwards through every chunk at once.
    Packed (p.bounds): glast and the gradient of initial_state are (nseq, d, n), and the forward's
    initial_state is needed again (the state a sequence's first step starts from)."""
    saved_starts, y_pre = saved
    u, delta, z = x_in.u, x_in.delta, x_in.z
    f, dev = p.f, p.device
    need_u, need_delta, need_A, need_B, need_C, need_D, need_z, need_bias, need_h0 = needs
    gu = torch.empty(p.b, p.d, p.l, dtype=u.dtype, device=dev) if need_u else None
    gdelta = torch.empty(p.b, p.d, p.l, dtype=delta.dtype, device=dev) if need_delta else None
    gz = torch.empty(p.b, p.d, p.l, dtype=z.dtype, device=dev) if need_z else None
    gB = torch.empty(x_in.B.shape, dtype=x_in.B.dtype, device=dev) if need_B else None
    gC = torch.empty(x_in.C.shape, dtype=x_in.C.dtype, device=dev) if need_C else None
    gA = None
    gD = torch.zeros(p.d, 1, dtype=f, device=dev) if need_D else None
    gbias = torch.zeros(p.d, 1, dtype=f, device=dev) if need_bias else None

    dA, H = p.buffer("decays"), p.buffer("states")
    dAs = dA.view(p.T, p.M, p.n, p.dG).unbind(0)
    Hs = H.view(p.T, p.M, p.n, p.dG).unbind(0)
    # per-step results, written by the steps of the adjoint: sum_d lambda x, sum_n lambda B, sum_n q A
    gBs, gxs, gdts = p.empty(p.T, p.M, 1, p.n), p.empty(p.T, p.M, 1, p.dG), p.empty(p.T, p.b * p.K, p.G, p.dG)
    gBs_, gxs_, gdts_ = gBs.unbind(0), gxs.unbind(0), gdts.unbind(0)
    lam = p.state()                              # the adjoint, stepped in place
    lv = lam.view(p.M, p.n, p.dG)
    q = p.empty(p.M, p.n, p.dG)                  # q_t = Ā_t lambda_t h_{t-1}, one step at a time
    qg = q.view(p.b * p.K, p.G, p.n, p.dG)
    gA_steps = torch.zeros(p.M, p.n, p.dG, dtype=f, device=dev)   # sum over steps of q_t dt_t
    R = p.state()                                # the adjoint arriving at each chunk's end
    incoming = torch.zeros(p.b, p.G, p.n, p.dG, dtype=f, device=dev)   # ... at the segment's end
    bounds = p.bounds
    if bounds is not None:
        # per sequence: the state its first step starts from, dL/dlast_state entering at its last
        # token, and dL/dinitial_state: glast itself for a length-0 sequence, otherwise overwritten
        # where the adjoint reaches the sequence's first token
        h0 = None if initial_state is None else p.to_states(initial_state)
        gl = None if glast is None else p.to_states(glast)
        gh0s = torch.zeros(bounds.nseq, p.G, p.n, p.dG, dtype=f, device=dev)
        if gl is not None:
            gh0s.copy_(gl)
    elif glast is not None:
        incoming.copy_(p.to_state(glast))

    def enter(j, s):
        """Packed: dL/dlast_state of the sequences whose last token is step j joins the adjoint."""
        if gl is not None:
            for k, i in bounds.last[s].get(j, ()):
                lv[p.rows(k)] += gl[i]

    def leave(j, s, record):
        """Packed: at a sequence's first token the adjoint (already times Ā_t) is dL/dinitial_state
        and goes no further back."""
        for k, i in bounds.first[s].get(j, ()):
            if record:
                gh0s[i] = lv[p.rows(k)]
            lv[p.rows(k)] = 0
    for s in reversed(range(len(p.segments))):
        a, e = p.segments[s]
        used = e - a
        dt_native, v = x_in.dt(a, e)
        u_native = x_in.native(u, a, e)
        dt = _gather(p, dt_native, used)
        x = _gather(p, dt_native * u_native, used)
        xs = _per_step(p, x, p.M, 1, p.dG)
        Bb, Cb = x_in.groups(x_in.B, a, e), x_in.groups(x_in.C, a, e)
        Bs, Cs = _per_step(p, Bb, p.M, p.n, 1), _per_step(p, Cb, p.M, p.n, 1)
        Bs_rows = _per_step(p, Bb, p.M, 1, p.n)
        # the gate and the skip, in the caller's layout
        go = x_in.native(gy, a, e)
        if z is not None:
            z_native = x_in.native(z, a, e)
            if need_z:
                gz[..., a:e] = torch.ops.aten.silu_backward(go * y_pre[..., a:e], z_native)
            go = go * F.silu(z_native)           # dL/dy before the gate
        if need_D:
            gD += (go * u_native).sum((0, 2))[:, None]
        gys = _gather(p, go, used)
        gs = _per_step(p, gys, p.M, 1, p.dG)
        # the segment's decays, and its states forwards from the saved chunk starts
        x_in.decays(dt, dA)
        starts = saved_starts[s]
        prev = starts.view(p.M, p.n, p.dG)
        first = bounds.first[s] if bounds is not None else {}
        for j in range(p.T):
            torch.mul(dAs[j], prev, out=Hs[j]).addcmul_(xs[j], Bs[j])
            for k, i in first.get(j, ()):      # a sequence's first step starts from its own state
                r = p.rows(k)
                Hs[j][r] = dAs[j][r] * (0 if h0 is None else h0[i]) + xs[j][r] * Bs[j][r]
            prev = Hs[j]
        # the adjoint arriving at the end of every chunk: backward pass 1 and its carry
        R[:, p.K - 1] = incoming
        if p.K > 1:
            lam.zero_()
            for j in range(p.T - 1, -1, -1):    # each chunk from a zero adjoint
                if bounds is not None:
                    enter(j, s)
                lv.addcmul_(Cs[j], gs[j]).mul_(dAs[j])
                if bounds is not None:
                    leave(j, s, record=False)
            _carry(p, lam, x_in.chunk_decays(dt), R, backwards=True, restarted=p.restarted(s))
        # backward pass 2, the true adjoint: lambda_t = C_t dL/dy_t + (what arrives from t + 1)
        lam.copy_(R)
        dts = _per_step(p, dt, p.M, 1, p.dG)
        bulk = p.M * p.n * p.dG < Q_PER_STEP_FROM
        for j in range(p.T - 1, -1, -1):
            if bounds is not None:
                enter(j, s)
            lv.addcmul_(Cs[j], gs[j])                                       # lambda_t
            torch.bmm(xs[j], lv.transpose(1, 2), out=gBs_[j])               # sum_d lambda_t x_t
            torch.bmm(Bs_rows[j], lv, out=gxs_[j])                          # sum_n lambda_t B_t
            lv.mul_(dAs[j])                                                 # Ā_t lambda_t, to t - 1
            prev = Hs[j - 1] if j else starts.view(p.M, p.n, p.dG)
            qj = dAs[j] if bulk else q                                      # q_t over the spent decays
            torch.mul(lv, prev, out=qj)
            if bounds is not None:
                for k, i in bounds.first[s].get(j, ()):                     # h_{t-1} is the sequence's own h0
                    r = p.rows(k)
                    qj[r] = 0 if h0 is None else lv[r] * h0[i]
                leave(j, s, record=True)
            if not bulk:
                gA_steps.addcmul_(q, dts[j])                                # dL/dA: q_t dt_t
                torch.sum(qg.mul_(x_in.A), -2, out=gdts_[j])                # dL/ddt_t: sum_n q_t A
        incoming = lam[:, 0].clone()            # exp(dt A) lambda at the segment's first token
        if need_C:                               # sum_d dL/dy_t h_t, in bulk over the segment
            gCb = torch.bmm(gys.view(p.T * p.M, 1, p.dG), H.view(p.T * p.M, p.n, p.dG).transpose(1, 2))
            gC[..., a:e] = _scatter(p, _to_groups(p, gCb, p.gC), used)
        if need_B:
            gB[..., a:e] = _scatter(p, _to_groups(p, gBs, p.gB), used)
        if not (need_u or need_delta or need_bias or need_A):
            continue
        if bulk:                                 # the per-step reductions of q, over the whole segment
            torch.mul(dA, dt.view(p.T, p.b, p.K, p.G, 1, p.dG), out=H)      # (H is spent)
            gA_steps += H.view(p.T, p.M, p.n, p.dG).sum(0)
            torch.sum(dA.mul_(x_in.A), -2, out=gdts.view(p.T, p.b, p.K, p.G, p.dG))
        gx = _scatter(p, gxs.view(p.T, p.b, p.K, p.d), used)               # dL/d(dt u)
        if need_u:
            gub = gx * dt_native
            if x_in.D is not None:
                gub.addcmul_(go, x_in.D)
            gu[..., a:e] = gub
        if need_delta or need_bias:
            gdt = _scatter(p, gdts.view(p.T, p.b, p.K, p.d), used).addcmul_(gx, u_native)
            gv = torch.ops.aten.softplus_backward(gdt, v, 1, 20) if v is not None else gdt
            if need_delta:
                gdelta[..., a:e] = gv
            if need_bias:
                gbias += gv.sum((0, 2))[:, None]
    gh0 = None if not need_h0 else p.from_state(incoming if bounds is None else gh0s)
    if need_A:
        gA = gA_steps.view(p.b * p.K, p.G, p.n, p.dG).sum(0).transpose(1, 2).reshape(p.d, p.n)
    return (gu, gdelta, gA, gB, gC, None if gD is None else gD[:, 0], gz,
            None if gbias is None else gbias[:, 0], gh0)


def _to_groups(p, X, g):
    """(T, b, K, G, n) of any layout -> (T, b, K, g, n): sum the G // g copies of each group."""
    X = X.reshape(p.T, p.b, p.K, p.G, p.n)
    return X if g == p.G else X.view(p.T, p.b, p.K, g, p.G // g, p.n).sum(4)


class _SelectiveScan(torch.autograd.Function):
    """The scan with the reverse-time backward above; outputs (y, last_state)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, plan):
        x_in = _Inputs(plan, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        y, last, (starts, y_pre) = _forward(plan, x_in, initial_state, save=True)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, starts, y_pre,
                              initial_state if plan.bounds is not None else None)
        ctx.plan, ctx.delta_softplus = plan, delta_softplus
        return y, last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, glast):
        u, delta, A, B, C, D, z, delta_bias, starts, y_pre, initial_state = ctx.saved_tensors
        p = ctx.plan
        x_in = _Inputs(p, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus)
        grads = _backward(p, x_in, (starts, y_pre), gy, glast, ctx.needs_input_grad[:9], initial_state)
        gB, gC = grads[3], grads[4]
        if gB is not None and B.dim() == 3:
            gB = gB.squeeze(1)
        if gC is not None and C.dim() == 3:
            gC = gC.squeeze(1)
        return (*grads[:3], gB, gC, *grads[5:], None, None)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False, cu_seqlens=None):
    """Selective scan by chunks side by side (see the module docstring); differentiable in every tensor.

    Args:
        u: (b, d, l) input x of the paper
        delta: (b, d, l) step size before bias and softplus
        A: (d, n) real, negative for a decaying state
        B, C: (b, n, l) or grouped (b, g, n, l), in u's dtype or the compute dtype
        D: (d,) skip connection, optional
        z: (b, d, l) gate, optional: out = y * silu(z)
        delta_bias: (d,) added to delta before softplus, optional
        delta_softplus: apply softplus (threshold 20) to delta + delta_bias
        initial_state: (b, d, n) state before the first token, optional (zeros)
        return_last_state: also return the state after the last token
        cu_seqlens: (nseq + 1,) int32, optional: packed sequences with b = 1, each scanned as if
            alone from initial_state[i], initial_state (nseq, d, n) (module docstring)
    Returns:
        y: (b, d, l) in u's dtype; with return_last_state, (y, last_state) with last_state
        (b, d, n) in the compute dtype (float32, or float64 for float64 inputs); (nseq, d, n)
        with cu_seqlens
    """
    plan = Plan(u, A, B, C, None if cu_seqlens is None else cu_seqlens.tolist())
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        y, last = _SelectiveScan.apply(*tensors, delta_softplus, plan)
    else:
        x_in = _Inputs(plan, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        y, last, _ = _forward(plan, x_in, initial_state, save=False)
    return (y, last) if return_last_state else y
