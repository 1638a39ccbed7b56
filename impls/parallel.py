"""A parallel selective scan in plain PyTorch: streaming chunks, two passes, no full state tensor.

The recurrence h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t (Algorithm 2 of the Mamba paper, the
same equations as impls/loop.py; letters b, d, l, n, g as in impls/frontdoor.py) is linear in h,
so a sequence can be cut into K chunks of T tokens and the chunks run side by side:

    pass 1  every chunk runs its T steps from a zero state, all chunks at once; chunk k ends in
            s_k, and its total decay is P_k = exp(A * sum of dt over the chunk)
    carry   H_0 = initial_state, H_{k+1} = P_k H_k + s_k: K small sequential steps
    pass 2  every chunk reruns its T steps from its true starting state H_k, all chunks at once,
            and reads out y_t = <C_t, h_t> on the way

Only products of decays <= 1 ever appear: nothing is divided by a cumulative decay, no exp of a
positive cumulative sum is taken and no logarithm is used, so strong decay underflows to 0 as in
the loop instead of overflowing to inf or NaN. When one time step already has enough work
(b*d*n elements) to keep the CPU busy, K = 1: no pass 1, no carry, and pass 2 is the loop itself,
with Python's per-op cost paid once per block of J steps for everything but the recurrence
(one fused multiply-add per step).

Streaming: the (b, d, l, n) tensors of decays exp(dt A) and inputs dt B u are never built.
Positions j0..j0+J of every chunk form a block: its decays and states, (J, b, K, d, n) elements
each, go into buffers reused from block to block, small enough to stay in cache. Inputs are
gathered into a block, and outputs scattered out of it, in the caller's layout, so the memory
beyond the arguments and the output is a few blocks whatever l is (the loop's autograd graph
and mamba.py's pscan hold O(b d l n)).

Inside a block a state is laid out (b, K, g, n, d/g), channels innermost: the exp and the
multiply-adds then run over long contiguous rows, and the readout <C_t, h_t> is one batched
(1 x n) @ (n x d/g) product (a sum over a short innermost n costs several times more on a CPU).

Backward (a torch.autograd.Function): the adjoint lambda_t = dL/dh_t runs backwards in time,
lambda_t = C_t dL/dy_t + exp(dt_{t+1} A) lambda_{t+1}, with the same chunk structure reversed:
pass 1 runs each chunk's adjoint from zero, a carry links the chunk ends (starting from
dL/dlast_state), pass 2 reruns each block with the true adjoint. The forward keeps the state at
the start of every block (1/J of a full state tensor), so pass 2 recomputes a block's decays and
states forwards from there; a state is never stepped backwards (that would divide by the decay).
With q_t = lambda_t exp(dt_t A) h_{t-1}:

    dL/dC_t = sum_d dL/dy_t h_t        dL/dB_t = sum_d lambda_t dt_t u_t
    dL/d(dt_t u_t) = sum_n lambda_t B_t      dL/ddt_t += sum_n q_t A      dL/dA = sum_{b,t} q_t dt_t
    dL/dinitial_state = exp(dt_0 A) lambda_0

and the softplus, bias, D and gate gradients follow elementwise, block by block.
"""

import math
import threading

import torch
import torch.nn.functional as F

from .frontdoor import compute_dtype

# How the work is cut. An eager PyTorch op costs microseconds however small, so one step of the
# recurrence should touch tens of thousands of elements; a segment's buffers should stay in the
# CPU's caches. Module-level so that tests can shrink them and put many chunk and segment
# boundaries into small cases.
STEP_ELEMENTS = 65536        # chunks run side by side until one step touches about this many elements
SEQUENTIAL_FROM = 8192       # b*d*n at or above this: one chunk (K = 1), no pass 1 and no carry
SEGMENT_ELEMENTS = 1 << 21   # elements (T*b*K*d*n) of a segment buffer
MIN_CHUNK = 16               # chunks of at least this many tokens (the carry is sequential in K)
CORRECT = True
STREAM = True
WORKSPACE_ELEMENTS = 1 << 23  # segment buffers up to this size are kept for the next call

# Segment buffers are reused from call to call (per thread): fresh multi-megabyte allocations
# come from the operating system page by page, and the page faults cost as much as the scan.
_workspace = threading.local()


class _Plan:
    """Sizes of one call. The sequence is cut into segments of L = K*T tokens, run one after
    another; a segment into K chunks of T tokens, run side by side. Only the last segment is
    padded. Channels are G groups of dG (G is the lcm of B's and C's group counts)."""

    def __init__(self, u, A, B, C):
        self.b, self.d, self.l = u.shape
        self.n = A.shape[1]
        self.device = u.device
        self.gB = B.shape[1] if B.dim() == 4 else 1
        self.gC = C.shape[1] if C.dim() == 4 else 1
        self.G = self.gB * self.gC // math.gcd(self.gB, self.gC)
        self.dG = self.d // self.G
        self.f = compute_dtype(u.dtype)
        step = self.b * self.d * self.n
        K = 1
        if step < SEQUENTIAL_FROM:
            K = max(1, min(-(-STEP_ELEMENTS // step), self.l // MIN_CHUNK))
        T = max(1, SEGMENT_ELEMENTS // (K * step))
        segments = -(-self.l // (K * T))
        tokens = -(-self.l // segments)         # spread evenly, so the last segment is not mostly padding
        self.T = -(-tokens // K)
        self.K = -(-tokens // self.T)
        self.L = self.K * self.T
        self.segments = [(a, min(a + self.L, self.l)) for a in range(0, self.l, self.L)]

    def empty(self, *shape):
        return torch.empty(*shape, dtype=self.f, device=self.device)

    def states(self, T=None):
        """An uninitialised state buffer, (T, b, K, G, n, dG), or (b, K, G, n, dG) without T.
        Time leads: one step of every chunk is one contiguous slice (chunk-major, the slices of a
        step would sit a power-of-two stride apart and evict each other from the caches)."""
        time = () if T is None else (T,)
        return self.empty(*time, self.b, self.K, self.G, self.n, self.dG)

    def buffer(self, name):
        """A (T, b, K, G, n, dG) state buffer kept in this thread's workspace under ``name``."""
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
        """(b, d, n) -> (b, G, n, dG)."""
        return h.to(self.f).view(self.b, self.G, self.dG, self.n).transpose(-1, -2)

    def from_state(self, h):
        """(b, G, n, dG) -> a new (b, d, n) tensor (never a view of a buffer)."""
        out = self.empty(self.b, self.d, self.n)
        out.view(self.b, self.G, self.dG, self.n).copy_(h.transpose(-1, -2))
        return out


# --- moving data between the caller's (b, ..., l) layout and segments (b, K, T, ...) ----------
# A segment's tokens a..e, chunk k, position j are token a + k*T + j: per batch row, a segment is
# the transpose of a (channels x tokens) slab. A transposing copy of a contiguous 2-D matrix takes
# ATen's blocked path, several times faster than a strided copy, hence the per-row loops.

def _gather(p, X, a, e):
    """(b, K, T, *mid) segment in the compute dtype <- tokens a..e of X (b, *mid, l); zeros past e."""
    mid = X.shape[1:-1]
    m, used = math.prod(mid), e - a
    src = X[..., a:e].reshape(p.b, m, used).to(p.f).contiguous()
    out = p.empty(p.b, p.L, m)
    for i in range(p.b):
        out[i, :used].copy_(src[i].t())
    if used < p.L:
        out[:, used:] = 0                       # padding: dt = 0 there, an exact no-op step
    return out.view(p.b, p.K, p.T, *mid)


def _scatter(p, seg, a, e):
    """A new (b, *mid, e - a) slab <- a (b, K, T, *mid) segment, the inverse of _gather."""
    mid = seg.shape[3:]
    m, used = math.prod(mid), e - a
    src = seg.reshape(p.b, p.L, m)
    out = p.empty(p.b, m, used)
    for i in range(p.b):
        out[i].copy_(src[i, :used].t())
    return out.view(p.b, *mid, used)


class _Inputs:
    """The arguments, and per segment the elementwise work around the recurrence. Work on one
    value per (b, d, t) is done in the caller's (b, d, l) layout, contiguous and vectorised; only
    dt, dt u and dL/dy are transposed into segments, and y (or gradients) out of them."""

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
        """X[..., a:e] (b, d, e - a) in the compute dtype (a view when it already is)."""
        return X[..., a:e].to(self.p.f)

    def dt(self, a, e):
        """(dt, the value before softplus or None), (b, d, e - a) in the caller's layout."""
        v = self.native(self.delta, a, e)
        if self.bias is not None:
            v = v + self.bias
        if not self.softplus:
            return v, None
        return F.softplus(v), v                 # threshold 20, as in the loop

    def groups(self, X, a, e):
        """(b, K, T, G, n) segment of B or C (b, g, n, l), each group repeated G // g times."""
        p = self.p
        g = X.shape[1]
        seg = _gather(p, X, a, e)
        if g != p.G:
            seg = seg.unsqueeze(4).expand(-1, -1, -1, -1, p.G // g, -1).reshape(p.b, p.K, p.T, p.G, p.n)
        return seg

    def decays(self, dt, out):
        """out (T, b, K, G, n, dG) <- exp(dt A), the zero-order hold Ā of the paper (eq. 4)."""
        p = self.p
        torch.mul(_time_major(dt).unflatten(-1, (p.G, 1, p.dG)), self.A, out=out)
        return out.exp_()

    def chunk_decays(self, dt):
        """(b, K, G, n, dG): each chunk's total decay exp(A * sum of dt), a product of decays, <= 1
        for A <= 0 and dt >= 0 (nothing is ever divided by it)."""
        p = self.p
        return torch.mul(dt.sum(2).view(p.b, p.K, p.G, 1, p.dG), self.A).exp_()


def _time_major(x):
    """(T, b, K, ...) view of a (b, K, T, ...) segment."""
    return x.movedim(2, 0)


def _chunk_major(x):
    """(b, K, T, ...) view of a (T, b, K, ...) segment."""
    return x.movedim(0, 2)


def _outer(p, x, Bb):
    """Broadcastable (T, b, K, G, 1, dG) and (T, b, K, G, n, 1) views of the segments
    x (b, K, T, d) and Bb (b, K, T, G, n), whose product is x B."""
    return _time_major(x).unflatten(-1, (p.G, 1, p.dG)), _time_major(Bb).unsqueeze(-1)


def _readout(p, Cb, H):
    """(b, K, T, d) <- <C_t, h_t> over n (eq. 2b): a batched (1 x n) @ (n x dG) product.

    In float64 (the oracle's dtype, where the tolerance is a few ulps) the products are summed
    over a contiguous innermost n instead, as the loop does, so that the n-term sum is added in
    the loop's order: under cancellation another order differs by more than that."""
    C = _time_major(Cb).unsqueeze(-2)                                  # (T, b, K, G, 1, n)
    if p.f == torch.float64:
        prod = p.empty(p.T, p.b, p.K, p.G, p.dG, p.n)
        y = torch.mul(H.transpose(-1, -2), C, out=prod).sum(-1)
    else:
        y = torch.matmul(C, H)
    return _chunk_major(y.view(p.T, p.b, p.K, p.d))


def _recurrence(p, dA, x, Bb, H, start=None):
    """States h_t = Ā_t h_{t-1} + x_t B_t (eq. 2a) into H (T, b, K, G, n, dG), every chunk at
    once, from ``start`` (b, K, G, n, dG), or from zero when None.

    A step is a multiply and a broadcast multiply-add on one (b, K, G, n, dG) slice while it is
    in cache: the inputs x B are never written out as a whole segment. In float64 the products
    x B are rounded first and added after, as in the loop."""
    dAs, Hs = dA.unbind(0), H.unbind(0)         # slicing once, not per step
    xs, Bs = (v.unbind(0) for v in _outer(p, x, Bb))
    exact = p.f == torch.float64
    if exact:
        torch.mul(*_outer(p, x, Bb), out=H)
    elif start is None:
        torch.mul(xs[0], Bs[0], out=Hs[0])
    for j in range(0 if start is not None else 1, p.T):
        prev = Hs[j - 1] if j else start
        if exact:
            Hs[j].add_(dAs[j] * prev)
        else:
            torch.mul(dAs[j], prev, out=Hs[j]).addcmul_(xs[j], Bs[j])
    return H


def _adjoint_recurrence(p, dA, gys, Cb, W, end=None):
    """Adjoints lambda_t = C_t dL/dy_t + Ā_{t+1} lambda_{t+1} into W (T, b, K, G, n, dG),
    backwards, every chunk at once, with ``end`` (b, K, G, n, dG) added to each chunk's last
    lambda (what arrives from after the chunk), or nothing when None."""
    dAs, Ws = dA.unbind(0), W.unbind(0)
    gs, Cs = (v.unbind(0) for v in _outer(p, gys, Cb))
    last = p.T - 1
    torch.mul(gs[last], Cs[last], out=Ws[last])
    if end is not None:
        Ws[last].add_(end)
    for j in range(last - 1, -1, -1):
        torch.mul(dAs[j + 1], Ws[j + 1], out=Ws[j]).addcmul_(gs[j], Cs[j])
    return W


def _to_groups(p, X, g):
    """(T, b, K, G, n) -> (b, K, T, g, n): sum the G // g copies of each of g groups."""
    return _chunk_major(X if g == p.G else X.view(p.T, p.b, p.K, g, p.G // g, p.n).sum(4))


def _carry(p, ends, P, starts, backwards=False):
    """starts[:, k + 1] <- P[:, k] starts[:, k] + ends[:, k] for k = 0..K-2, in order: each chunk
    starts where the one before it ended (the short sequential part of the scan). Backwards, for
    adjoints: starts[:, k - 1] <- P[:, k] starts[:, k] + ends[:, k] for k = K-1..1."""
    ends, P, starts = ends.unbind(1), P.unbind(1), starts.unbind(1)
    for k in (range(p.K - 1, 0, -1) if backwards else range(p.K - 1)):
        torch.addcmul(ends[k], P[k], starts[k], out=starts[k - 1 if backwards else k + 1])


# --- forward -------------------------------------------------------------------------------

def _forward(p, x_in, initial_state, save):
    """y (b, d, l) in u's dtype and last_state (b, d, n); with ``save``, also every chunk's
    starting state (segments, b, K, G, n, dG) and y before the gate (b, d, l) when there is one."""
    u, z = x_in.u, x_in.z
    y = torch.empty(p.b, p.d, p.l, dtype=u.dtype, device=p.device)
    y_pre = p.empty(p.b, p.d, p.l) if save and z is not None else None
    saved_starts = p.empty(len(p.segments), p.b, p.K, p.G, p.n, p.dG) if save else None
    dA, H, starts = p.buffer("dA"), p.buffer("H"), p.states()
    carry = torch.zeros(p.b, p.G, p.n, p.dG, dtype=p.f, device=p.device)
    if initial_state is not None:
        carry.copy_(p.to_state(initial_state))
    for s, (a, e) in enumerate(p.segments):
        dt_native, _ = x_in.dt(a, e)
        u_native = x_in.native(u, a, e)
        dt = _gather(p, dt_native, 0, e - a)
        x = _gather(p, dt_native * u_native, 0, e - a)              # dt u
        x_in.decays(dt, dA)                     # the only exp per element
        Bb = x_in.groups(x_in.B, a, e)
        starts[:, 0] = carry
        if p.K > 1:
            _recurrence(p, dA, x, Bb, H)                          # pass 1: each chunk from zero
            _carry(p, H[p.T - 1], x_in.chunk_decays(dt), starts)
            if save:
                saved_starts[s] = starts
            if CORRECT:
                # pass 2: add each chunk's decayed true start, c_t = Ā_t c_{t-1} from c = start
                # (a product of decays, computed in place: the decays are not needed again)
                dAs = dA.unbind(0)
                dAs[0].mul_(starts)
                for j in range(1, p.T):
                    dAs[j].mul_(dAs[j - 1])
                H += dA
            else:
                _recurrence(p, dA, x, Bb, H, start=starts)
        else:
            if save:
                saved_starts[s] = starts
            _recurrence(p, dA, x, Bb, H, start=starts)                # pass 2: from the true starts
        carry.copy_(H[p.T - 1][:, p.K - 1])
        yb = _scatter(p, _readout(p, x_in.groups(x_in.C, a, e), H), a, e)
        if x_in.D is not None:
            yb += x_in.D * u_native                                 # skip connection D u
        if y_pre is not None:
            y_pre[..., a:e] = yb
        if z is not None:
            yb *= F.silu(x_in.native(z, a, e))                      # the Mamba block's gate
        y[..., a:e] = yb
    return y, p.from_state(carry), (saved_starts, y_pre)


def _step_views(p, x, Bb, Cb):
    """Per-step slices (b, K, G, 1, dG) of x, (b, K, G, n, 1) of B and (b, K, G, 1, n) of C, from
    small time-major copies of the segments, so that each step reads contiguous memory."""
    xt = _time_major(x).contiguous().view(p.T, p.b, p.K, p.G, 1, p.dG)
    Bt = _time_major(Bb).contiguous().unsqueeze(-1)
    Ct = None if Cb is None else _time_major(Cb).contiguous().unsqueeze(-2)
    return xt.unbind(0), Bt.unbind(0), (None if Ct is None else Ct.unbind(0))


def _stream(p, dAs, xs, Bs, h, Cs=None, ys=None):
    """Run h (b, K, G, n, dG) in place through the segment's steps, h_t = Ā_t h_{t-1} + x_t B_t
    (eq. 2a), reading out y_t = <C_t, h_t> (eq. 2b) into ys[t] (b*K*G, 1, dG) when given.
    The state stays in cache: a step reads its decays and nothing else of segment size."""
    exact = p.f == torch.float64
    hv = h.view(-1, p.n, p.dG)
    for j in range(p.T):
        h.mul_(dAs[j])
        if exact:                               # x B rounded first, then added, as in the loop
            h.add_(xs[j] * Bs[j])
        else:
            h.addcmul_(xs[j], Bs[j])
        if ys is not None:
            if exact:                           # the loop's order for the n-term sum
                ys[j].copy_((h.transpose(-1, -2) * Cs[j]).contiguous().sum(-1).view(ys[j].shape))
            else:
                torch.bmm(Cs[j].view(-1, 1, p.n), hv, out=ys[j])
    return h


def _forward_stream(p, x_in, initial_state, save):
    """_forward with the state kept in cache: pass 1 and pass 2 step a (b, K, G, n, dG) state
    in place instead of writing every step's state out."""
    u, z = x_in.u, x_in.z
    y = torch.empty(p.b, p.d, p.l, dtype=u.dtype, device=p.device)
    y_pre = p.empty(p.b, p.d, p.l) if save and z is not None else None
    saved_starts = p.empty(len(p.segments), p.b, p.K, p.G, p.n, p.dG) if save else None
    dA, h, starts = p.buffer("dA"), p.states(), p.states()
    dAs = dA.unbind(0)
    ys = p.empty(p.T, p.b * p.K * p.G, 1, p.dG)
    yss = ys.unbind(0)
    carry = torch.zeros(p.b, p.G, p.n, p.dG, dtype=p.f, device=p.device)
    if initial_state is not None:
        carry.copy_(p.to_state(initial_state))
    for s, (a, e) in enumerate(p.segments):
        dt_native, _ = x_in.dt(a, e)
        u_native = x_in.native(u, a, e)
        dt = _gather(p, dt_native, 0, e - a)
        x = _gather(p, dt_native * u_native, 0, e - a)              # dt u
        x_in.decays(dt, dA)                     # the only exp per element
        xs, Bs, Cs = _step_views(p, x, x_in.groups(x_in.B, a, e), x_in.groups(x_in.C, a, e))
        starts[:, 0] = carry
        if p.K > 1:
            h.zero_()
            _stream(p, dAs, xs, Bs, h)                                # pass 1: each chunk from zero
            _carry(p, h, x_in.chunk_decays(dt), starts)
        if save:
            saved_starts[s] = starts
        h.copy_(starts)
        _stream(p, dAs, xs, Bs, h, Cs, yss)                           # pass 2: from the true starts
        carry.copy_(h[:, p.K - 1])
        yb = _scatter(p, _chunk_major(ys.view(p.T, p.b, p.K, p.d)), a, e)
        if x_in.D is not None:
            yb += x_in.D * u_native                                 # skip connection D u
        if y_pre is not None:
            y_pre[..., a:e] = yb
        if z is not None:
            yb *= F.silu(x_in.native(z, a, e))                      # the Mamba block's gate
        y[..., a:e] = yb
    return y, p.from_state(carry), (saved_starts, y_pre)


# --- backward ------------------------------------------------------------------------------

def _backward(p, x_in, saved, gy, glast, needs):
    """Gradients for (u, delta, A, B, C, D, z, delta_bias, initial_state); None where not needed.
    Segments run last to first; within a segment the adjoint runs backwards through each chunk."""
    saved_starts, y_pre = saved
    u, delta, z = x_in.u, x_in.delta, x_in.z
    f, dev = p.f, p.device
    need_u, need_delta, need_A, need_B, need_C, need_D, need_z, need_bias, need_h0 = needs
    gu = torch.empty(p.b, p.d, p.l, dtype=u.dtype, device=dev) if need_u else None
    gdelta = torch.empty(p.b, p.d, p.l, dtype=delta.dtype, device=dev) if need_delta else None
    gz = torch.empty(p.b, p.d, p.l, dtype=z.dtype, device=dev) if need_z else None
    gB = torch.empty(x_in.B.shape, dtype=x_in.B.dtype, device=dev) if need_B else None
    gC = torch.empty(x_in.C.shape, dtype=x_in.C.dtype, device=dev) if need_C else None
    gA = torch.zeros(p.G, p.n, p.dG, dtype=f, device=dev) if need_A else None
    gD = torch.zeros(p.d, 1, dtype=f, device=dev) if need_D else None
    gbias = torch.zeros(p.d, 1, dtype=f, device=dev) if need_bias else None

    dA, H, W, R = p.buffer("dA"), p.buffer("H"), p.buffer("W"), p.states()
    incoming = torch.zeros(p.b, p.G, p.n, p.dG, dtype=f, device=dev)   # the adjoint from after the segment
    if glast is not None:
        incoming.copy_(p.to_state(glast))
    for s in reversed(range(len(p.segments))):
        a, e = p.segments[s]
        dt_native, v = x_in.dt(a, e)
        u_native = x_in.native(u, a, e)
        dt = _gather(p, dt_native, 0, e - a)
        x = _gather(p, dt_native * u_native, 0, e - a)
        Bb, Cb = x_in.groups(x_in.B, a, e), x_in.groups(x_in.C, a, e)
        # the segment's decays and states, forwards from the saved starting states
        x_in.decays(dt, dA)
        starts = saved_starts[s]
        _recurrence(p, dA, x, Bb, H, start=starts)
        # the gate and the skip, in the caller's layout
        go = x_in.native(gy, a, e)
        if z is not None:
            z_native = x_in.native(z, a, e)
            if need_z:
                gz[..., a:e] = torch.ops.aten.silu_backward(go * y_pre[..., a:e], z_native)
            go = go * F.silu(z_native)             # dL/dy before the gate
        if need_D:
            gD += (go * u_native).sum((0, 2))[:, None]
        gys = _gather(p, go, 0, e - a)
        # the adjoint arriving at the end of every chunk: backward pass 1 and its carry
        R[:, p.K - 1] = incoming
        if p.K > 1:
            _adjoint_recurrence(p, dA, gys, Cb, W)                     # each chunk from zero
            _carry(p, dA[0] * W[0], x_in.chunk_decays(dt), R, backwards=True)
        # backward pass 2: the true adjoint lambda_t into W
        _adjoint_recurrence(p, dA, gys, Cb, W, end=R)
        incoming = dA[0][:, 0] * W[0][:, 0]        # exp(dt A) lambda at the segment's first token
        if need_C:
            gCb = torch.matmul(H, _time_major(gys).unflatten(-1, (p.G, p.dG, 1))).view(p.T, p.b, p.K, p.G, p.n)
            gC[..., a:e] = _scatter(p, _to_groups(p, gCb, p.gC), a, e)
        if need_B:
            gBb = torch.matmul(W, _time_major(x).unflatten(-1, (p.G, p.dG, 1))).view(p.T, p.b, p.K, p.G, p.n)
            gB[..., a:e] = _scatter(p, _to_groups(p, gBb, p.gB), a, e)
        if not (need_u or need_delta or need_bias or need_A):
            continue
        gx = torch.matmul(_time_major(Bb).unsqueeze(-2), W).view(p.T, p.b, p.K, p.d)
        gx = _scatter(p, _chunk_major(gx), a, e)   # dL/d(dt u)
        if need_u:
            gub = gx * dt_native
            if x_in.D is not None:
                gub.addcmul_(go, x_in.D)
            gu[..., a:e] = gub
        if need_delta or need_bias or need_A:
            q = dA.mul_(W)                          # q = lambda_t Ā_t h_{t-1}, in place: dA is done with
            q[1:].mul_(H[:-1])
            q[0].mul_(starts)
            if need_A:
                gA += torch.mul(q, _time_major(dt).unflatten(-1, (p.G, 1, p.dG)), out=W).sum((0, 1, 2))
            if need_delta or need_bias:
                gdt = _chunk_major(q.mul_(x_in.A).sum(-2).view(p.T, p.b, p.K, p.d))
                gdt = _scatter(p, gdt, a, e).addcmul_(gx, u_native)
                gv = torch.ops.aten.softplus_backward(gdt, v, 1, 20) if v is not None else gdt
                if need_delta:
                    gdelta[..., a:e] = gv
                if need_bias:
                    gbias += gv.sum((0, 2))[:, None]
    gh0 = p.from_state(incoming) if need_h0 else None
    if gA is not None:
        gA = gA.transpose(1, 2).reshape(p.d, p.n)
    return (gu, gdelta, gA, gB, gC, None if gD is None else gD[:, 0], gz, None if gbias is None else gbias[:, 0], gh0)


class _SelectiveScan(torch.autograd.Function):
    """The scan with the reverse-time backward above; outputs (y, last_state)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, plan):
        x_in = _Inputs(plan, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        y, last, (starts, y_pre) = _forward(plan, x_in, initial_state, save=True)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, starts, y_pre)
        ctx.plan, ctx.delta_softplus = plan, delta_softplus
        return y, last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, glast):
        u, delta, A, B, C, D, z, delta_bias, starts, y_pre = ctx.saved_tensors
        p = ctx.plan
        x_in = _Inputs(p, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus)
        grads = _backward(p, x_in, (starts, y_pre), gy, glast, ctx.needs_input_grad[:9])
        gB, gC = grads[3], grads[4]
        if gB is not None and B.dim() == 3:
            gB = gB.squeeze(1)
        if gC is not None and C.dim() == 3:
            gC = gC.squeeze(1)
        return (*grads[:3], gB, gC, *grads[5:], None, None)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False):
    """Selective scan by streaming chunks (see the module docstring); differentiable in every tensor.

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
    Returns:
        y: (b, d, l) in u's dtype; with return_last_state, (y, last_state) with last_state
        (b, d, n) in the compute dtype (float32, or float64 for float64 inputs)
    """
    plan = _Plan(u, A, B, C)
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        y, last = _SelectiveScan.apply(*tensors, delta_softplus, plan)
    else:
        x_in = _Inputs(plan, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        y, last, _ = (_forward_stream if STREAM else _forward)(plan, x_in, initial_state, save=False)
    return (y, last) if return_last_state else y
