"""Packed variable-length sequences: cases, and the properties every varlen implementation keeps.

A packed call lays nseq sequences end to end along time (b = 1) and marks their boundaries with
``cu_seqlens`` (nseq + 1,) int32: 0, then each sequence's end. The properties, for any family:

    alone       a packed call equals each sequence scanned alone, in values, in last states and in
                gradients, initial states included
    no crossing perturbing one sequence (its tokens and its initial state, with finite values or
                a NaN or inf) changes no output and no state of another, bit for bit
    prefill     a sequence split across two packed calls at any point, its state carried from the
                first to the second, equals one call
    decoding    batch-indexed decoding (state_batch_indices into a cache of slots, rows in any
                order, padding rows among them) equals decoding each sequence alone; padding rows
                output zeros and no slot but a row's own is touched

Written once for both families: the drawn lengths, the chunk geometry they are meant to exercise
(``covered``) and the properties (``check_*``), which reach a family only through a ``Family``:
its inputs, its public scan and step, its sums of |terms| for the tolerance's floor. ``SELECTIVE``
is Mamba-1 (``selective_scan``, time last); the SSD family needs its own Family (time on axis 1,
``initial_states``) and case type with ``lengths``, ``offsets``, ``l``, ``nseq`` and ``seed``.
"""

import dataclasses

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

import impls
from impls.frontdoor import compute_dtype

from .cases import DTYPES, REGIMES, Case, make_inputs
from .tolerance import assert_close, conditioning, dt_ulps, gradient_conditioning

# --- family-neutral: sequence lengths around a chunk, and what a packing covers ---------------

CATEGORIES = (
    "length 0",
    "length 1",
    "shorter than a chunk",
    "equal to a chunk",
    "straddles a chunk boundary",
    "starts mid-chunk",
    "ends at a chunk end",
    "several sequences in one chunk",
)


def covered(offsets, chunk_starts):
    """Which CATEGORIES a packing exercises, given where the chunks of the implementation under
    test start (sorted packed positions, 0 first). offsets: cu_seqlens as a list."""
    starts = sorted(set(chunk_starts))
    ends_of_chunks = set(starts[1:]) | {offsets[-1]}

    def chunk_of(t):
        return max(i for i, s in enumerate(starts) if s <= t)

    found = set()
    per_chunk = {}
    for a, e in zip(offsets, offsets[1:]):
        length = e - a
        if length == 0:
            found.add("length 0")
            continue
        if length == 1:
            found.add("length 1")
        k = chunk_of(a)
        size = (starts[k + 1] if k + 1 < len(starts) else offsets[-1]) - starts[k]
        if length < size:
            found.add("shorter than a chunk")
        if a == starts[k] and length == size:
            found.add("equal to a chunk")
        if chunk_of(e - 1) != k:
            found.add("straddles a chunk boundary")
        if a != starts[k]:
            found.add("starts mid-chunk")
        if e in ends_of_chunks:
            found.add("ends at a chunk end")
        per_chunk[k] = per_chunk.get(k, 0) + 1
    if any(v > 1 for v in per_chunk.values()):
        found.add("several sequences in one chunk")
    return found


@st.composite
def sequence_lengths(draw, chunk, max_seqs=6, max_total=None):
    """nseq >= 1 lengths drawn around a nominal ``chunk``: 0, 1, shorter than, equal to and longer
    than a chunk; sometimes one is stretched so that a sequence ends exactly at a chunk end
    (multiple of ``chunk`` in packed position). Shrinks towards one sequence of length 1."""
    kinds = st.one_of(st.just(1), st.just(0), st.integers(2, max(2, chunk - 1)), st.just(chunk),
                      st.integers(chunk + 1, 3 * chunk))
    lengths = draw(st.lists(kinds, min_size=1, max_size=max_seqs))
    if len(lengths) > 1 and draw(st.booleans()):
        i = draw(st.integers(0, len(lengths) - 2))
        end = sum(lengths[:i + 1])
        lengths[i] += -end % chunk
    if max_total is not None:
        while sum(lengths) > max_total:
            j = lengths.index(max(lengths))
            lengths[j] //= 2
    return tuple(lengths)


def offsets_of(lengths):
    """cu_seqlens as a list: 0 and each sequence's end."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


# --- Mamba-1: cases and inputs ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class VarlenCase:
    """A packed Mamba-1 call: sequence lengths and the options of equivalence.cases.Case (b = 1)."""
    lengths: tuple
    d: int
    n: int
    g: int = 0
    dtype: str = "f32"
    regime: str = "mamba"
    D: bool = True
    z: bool = True
    delta_bias: bool = True
    softplus: bool = True
    initial_state: bool = True
    seed: int = 0

    @property
    def id(self):
        opts = "".join(f"-{k}" for k in ("D", "z", "delta_bias", "softplus", "initial_state") if getattr(self, k))
        return (f"lens{'_'.join(map(str, self.lengths))}-d{self.d}-n{self.n}-g{self.g}-{self.dtype}-"
                f"{self.regime}{opts}-s{self.seed}")

    @property
    def offsets(self):
        return offsets_of(self.lengths)

    @property
    def l(self):
        return sum(self.lengths)

    @property
    def nseq(self):
        return len(self.lengths)

    def packed_case(self):
        """The equivalence.cases.Case whose (1, d, l) inputs are the packed inputs."""
        return Case(b=1, d=self.d, n=self.n, l=self.l, g=self.g, dtype=self.dtype, regime=self.regime, D=self.D,
                    z=self.z, delta_bias=self.delta_bias, softplus=self.softplus, seed=self.seed)


@st.composite
def varlen_cases(draw, chunk=8, dtypes=tuple(DTYPES), regimes=REGIMES, max_d=6, max_n=4, max_seqs=6, max_total=80):
    d = draw(st.integers(1, max_d))
    divisors = [g for g in range(1, d + 1) if d % g == 0]
    return VarlenCase(
        lengths=draw(sequence_lengths(chunk, max_seqs, max_total)), d=d, n=draw(st.integers(1, max_n)),
        g=draw(st.sampled_from([0] + divisors)), dtype=draw(st.sampled_from(dtypes)),
        regime=draw(st.sampled_from(regimes)), D=draw(st.booleans()), z=draw(st.booleans()),
        delta_bias=draw(st.booleans()), softplus=draw(st.booleans()), initial_state=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)))


TIME_ARGS = ("u", "delta", "z", "B", "C")


def packed_inputs(case, dtype=None):
    """selective_scan keyword arguments for the packed call: u, delta, z (1, d, l), B, C (1, n, l)
    or (1, g, n, l), initial_state (nseq, d, n) or None, cu_seqlens (nseq + 1,) int32. With
    dtype=torch.float64, the same values in float64 (the oracle's inputs)."""
    x = make_inputs(case.packed_case(), dtype)
    if case.initial_state:
        gen = torch.Generator().manual_seed(case.seed + 7)
        h0 = torch.randn(case.nseq, case.d, case.n, generator=gen, dtype=torch.float64)
        h0 = h0.to(compute_dtype(DTYPES[case.dtype]))
        x["initial_state"] = h0 if dtype is None else h0.to(dtype)
    x["cu_seqlens"] = torch.tensor(case.offsets, dtype=torch.int32)
    return x


def repro(name, case, note=""):
    return (f"impls.selective_scan(**equivalence.varlen_cases.packed_inputs(equivalence.varlen_cases.{case!r}), "
            f"return_last_state=True, impl={name!r}){'  # ' + note if note else ''}")


def _time_last(X, d):
    """B or C (1, n, l) or (1, g, n, l) -> (1, d or 1, l, n)."""
    return (X.repeat_interleave(d // X.shape[1], dim=1) if X.dim() == 4 else X[:, None]).transpose(-1, -2)


def magnitudes(x64, weights=None):
    """Sums of |terms| for packed inputs (float64), the scale of the tolerance's floor (as
    equivalence.checks.magnitudes, per sequence: each restarts from |initial_state[i]|).

    Returns (y scale, last_state scale, {argument: sum of |summands| of its gradient} or None),
    the first two as tensors (1, d, l) and (nseq, d, n). weights: the loss's (1, d, l) and
    (nseq, d, n) weights, as in check_gradients."""
    d = x64["u"].shape[1]
    offsets = x64["cu_seqlens"].tolist()
    raw = x64["delta"] if x64["delta_bias"] is None else x64["delta"] + x64["delta_bias"][:, None]
    dt = F.softplus(raw) if x64["delta_softplus"] else raw
    grad = weights is not None
    leaves = {k: x64[k].abs().requires_grad_(grad) for k in ("u", "B", "C", "D", "initial_state") if x64[k] is not None}
    if x64["z"] is not None:
        leaves["z"] = x64["z"].clone().requires_grad_(grad)
    n = x64["A"].shape[1]
    decay = torch.exp(dt[..., None] * x64["A"][:, None, :])                       # (1, d, l, n)
    B = _time_last(leaves["B"], d)
    X = (dt.abs() * leaves["u"])[..., None] * B                                   # |dt B u|
    states, previous = [], []
    h0s = leaves.get("initial_state", torch.zeros(len(offsets) - 1, d, n, dtype=torch.float64))
    lasts = []
    for i, (a, e) in enumerate(zip(offsets, offsets[1:])):
        h = h0s[i:i + 1]
        for t in range(a, e):
            previous.append(h)
            h = decay[:, :, t] * h + X[:, :, t]
            states.append(h)
        lasts.append(h)
    H = torch.stack(states, 2) if states else decay                              # (1, d, l, n)
    y = (H * _time_last(leaves["C"], d)).sum(-1)
    if "D" in leaves:
        y = y + leaves["D"][:, None] * leaves["u"]
    if "z" in leaves:
        y = y * F.silu(leaves["z"]).abs()
    last = torch.cat(lasts)
    if not grad:
        return y.detach(), last.detach(), None
    loss = (y * weights[0].abs()).sum() + (last * weights[1].abs()).sum()
    grads = torch.autograd.grad(loss, [X, *leaves.values()], allow_unused=True)
    lam = grads[0] if grads[0] is not None else torch.zeros_like(X)   # None when l = 0
    sums = {k: (torch.zeros_like(v) if g is None else g.abs()) for (k, v), g in zip(leaves.items(), grads[1:])}
    before = torch.stack(previous, 2) if previous else decay                    # h_{t-1}
    decay_terms = (decay * lam * before).detach()                                 # Ā_t lambda_t h_{t-1}
    sums["A"] = (dt.abs()[..., None] * decay_terms).sum((0, 2))
    dsoftplus = torch.where(raw > 20, 1.0, torch.sigmoid(raw)) if x64["delta_softplus"] else 1.0
    sums["delta"] = dsoftplus * ((x64["A"].abs()[:, None, :] * decay_terms).sum(-1)
                                 + (lam.detach() * B.detach()).sum(-1) * leaves["u"].detach())
    if x64["delta_bias"] is not None:
        sums["delta_bias"] = sums["delta"].sum((0, 2))
    return y.detach(), last.detach(), sums


# --- the properties, family-neutral: written once, run for any family described by a Family ---

@dataclasses.dataclass(frozen=True)
class Family:
    """What the varlen properties need to know about one family of scans (Mamba-1: SELECTIVE below).

    inputs(case, dtype=None): packed keyword arguments of the scan, cu_seqlens included, the
        per-sequence states under ``state_arg``; dtype=torch.float64 gives the oracle's copy
    scan(name, x): (y, last states) of one call through the public function, packed or not
    step(name, cache, x, tokens, indices): one batch-indexed decoding step; tokens holds each of
        ``step_args`` for the rows, (rows, ...); returns the rows' outputs
    magnitudes(x64, weights=None): (y scale, states scale, {argument: gradient scale} or None),
        sums of |terms| (equivalence/tolerance.py)
    conditioning(x64): ulps a rounding can grow to (equivalence/tolerance.py), one number for every
        output and gradient of the pack: the whole pack's, which bounds each sequence's
    terms(case, output, arg=None): rounded terms per element of "y", "state" or "gradient" (of arg)
    repro(name, case, note): a line that reproduces the call
    """
    name: str
    time_args: tuple       # arguments with a time axis
    time_dim: int          # the time axis of those arguments and of y (with the batch axis first)
    state_arg: str         # the per-sequence initial states' argument
    step_args: tuple       # the time arguments a decoding step takes one token of, in its order
    inputs: object
    scan: object
    step: object
    magnitudes: object
    conditioning: object
    terms: object
    repro: object

    def cut(self, X, a, e):
        return X.narrow(self.time_dim, a, e - a)

    def token(self, X, pos):
        """(1, ..., l, ...) -> (rows, ...): token pos[r] of X for row r."""
        td = self.time_dim - 1 if self.time_dim > 0 else self.time_dim       # in X[0]
        return X[0].index_select(td, torch.tensor(pos, dtype=torch.long)).movedim(td, 0)


def sequence(x, i, family=None):
    """The arguments of sequence i of packed inputs x, as an ordinary (b = 1) call."""
    family = family or SELECTIVE
    offsets = x["cu_seqlens"].tolist()
    a, e = offsets[i], offsets[i + 1]
    out = {k: (family.cut(v, a, e) if k in family.time_args and v is not None else v)
           for k, v in x.items() if k != "cu_seqlens"}
    if x[family.state_arg] is not None:
        out[family.state_arg] = x[family.state_arg][i:i + 1]
    return out


def scan_alone(name, x, family=None):
    """Each sequence of packed inputs x scanned alone by ``name`` (no cu_seqlens), concatenated:
    y along time and the last states (nseq, ...). Differentiable where ``name`` is."""
    family = family or SELECTIVE
    ys, lasts = [], []
    for i in range(x["cu_seqlens"].numel() - 1):
        y, last = family.scan(name, sequence(x, i, family))
        ys.append(y)
        lasts.append(last)
    return torch.cat(ys, family.time_dim), torch.cat(lasts)


def _max(t):
    t = t.detach()
    t = t[torch.isfinite(t)]
    return float(t.max()) if t.numel() else None


def _against_alone(what, name, case, family, y, last, where):
    """y and last states against each sequence scanned alone by the float64 loop (no cu_seqlens:
    the oracle never takes the packed path), under the tolerance policy."""
    x64 = family.inputs(case, torch.float64)
    ref = scan_alone("loop", x64, family)
    same = scan_alone("loop", family.inputs(case), family)
    sy, ss, _ = family.magnitudes(x64)
    k = family.conditioning(x64)
    assert_close(f"{name} {what}: y", y, ref[0], same[0], family.terms(case, "y"), where, scale=_max(sy),
                 conditioning=k)
    assert_close(f"{name} {what}: last states", last, ref[1], same[1], family.terms(case, "state"), where,
                 scale=_max(ss), conditioning=k)


def check_alone(name, case, family=None):
    """Values and last states of a packed call equal each sequence scanned alone."""
    family = family or SELECTIVE
    y, last = family.scan(name, family.inputs(case))
    _against_alone("packed", name, case, family, y, last, family.repro(name, case, ""))


def _gradients(scan, x, weights, wrt):
    leaves = {k: (v.detach().requires_grad_() if k in wrt else v) for k, v in x.items()}
    y, last = scan(leaves)
    loss = (y.double() * weights[0]).sum() + (last.double() * weights[1]).sum()
    if not loss.requires_grad:   # no token and no initial state: nothing depends on any input
        return dict.fromkeys(wrt)
    return dict(zip(wrt, torch.autograd.grad(loss, [leaves[k] for k in wrt], allow_unused=True)))


def check_alone_gradients(name, case, family=None):
    """Gradients of a random linear function of (y, last states) of the packed call, for every
    floating tensor input, initial states included, against float64 autograd through the loop run
    on each sequence alone (the shared parameters' gradients summed over the sequences)."""
    family = family or SELECTIVE
    x, x64 = family.inputs(case), family.inputs(case, torch.float64)
    y0, s0 = scan_alone("loop", x64, family)
    gen = torch.Generator().manual_seed(case.seed + 3)
    weights = (torch.randn(y0.shape, generator=gen, dtype=torch.float64),
               torch.randn(s0.shape, generator=gen, dtype=torch.float64))
    wrt = [k for k, v in x.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    got = _gradients(lambda v: family.scan(name, v), x, weights, wrt)
    ref = _gradients(lambda v: scan_alone("loop", v, family), x64, weights, wrt)
    same = _gradients(lambda v: scan_alone("loop", v, family), x, weights, wrt)
    sums = family.magnitudes(x64, weights)[2]
    pack_conditioning = family.conditioning(x64)
    for k in wrt:
        zero = torch.zeros_like(x64[k])        # an input no output depends on (l = 0) has no gradient
        g, r, s = (zero.to(x[k].dtype) if v is None else v for v in (got[k], ref[k], same[k]))
        assert_close(f"{name} packed: grad {k}", g, r, s, family.terms(case, "gradient", k),
                     family.repro(name, case, f"gradient of {k}"), scale=_max(sums[k]),
                     conditioning=pack_conditioning)


def _perturbed(x, i, gen, value, family):
    """A copy of packed inputs x with sequence i's tokens and initial state redrawn, and with
    ``value`` (nan, inf) at its middle token of the first time argument when given."""
    out = dict(x)
    offsets = x["cu_seqlens"].tolist()
    a, e = offsets[i], offsets[i + 1]
    for k in family.time_args + (family.state_arg,):
        v = x[k]
        if v is None or (k != family.state_arg and e == a):
            continue
        v = v.clone()
        part = v[i:i + 1] if k == family.state_arg else family.cut(v, a, e)
        part.copy_(torch.randn(part.shape, generator=gen, dtype=torch.float64).to(v.dtype))
        if value is not None and k == family.time_args[0]:
            family.cut(part, (e - a) // 2, (e - a) // 2 + 1).fill_(float(value))
        out[k] = v
    return out


def check_no_crossing(name, case, i, value=None, family=None):
    """Perturbing sequence i (tokens and initial state; with ``value``, also a NaN or inf) changes
    no output and no last state of any other sequence, bit for bit."""
    family = family or SELECTIVE
    i %= case.nseq
    x = family.inputs(case)
    x2 = _perturbed(x, i, torch.Generator().manual_seed(case.seed + 11), value, family)
    y, last = family.scan(name, x)
    y2, last2 = family.scan(name, x2)
    offsets = case.offsets
    where = family.repro(name, case, f"sequence {i} perturbed" + (f", {value} at its middle token" if value else ""))
    for j in range(case.nseq):
        if j == i:
            continue
        a, e = offsets[j], offsets[j + 1]
        if not torch.equal(family.cut(y, a, e), family.cut(y2, a, e)) or not torch.equal(last[j], last2[j]):
            raise AssertionError(f"{name}: perturbing sequence {i} changed sequence {j}'s output or last state\n"
                                 f"  reproduce: {where}")


def check_prefill(name, case, i, k, family=None):
    """Chunked prefill: sequence i split at token k across two packed calls (the sequences before
    it and its first k tokens; then its remaining tokens, from the first call's last state, and the
    sequences after it) equals each sequence scanned alone."""
    family = family or SELECTIVE
    i %= case.nseq
    k = min(k, case.lengths[i])
    x = family.inputs(case)
    offsets = case.offsets
    cut = offsets[i] + k

    def part(lo, hi, seqs, h0):
        lens = [max(0, min(offsets[j + 1], hi) - max(offsets[j], lo)) for j in seqs]
        out = {key: (family.cut(v, lo, hi) if key in family.time_args and v is not None else v) for key, v in x.items()}
        out["cu_seqlens"] = torch.tensor(offsets_of(lens), dtype=torch.int32)
        out[family.state_arg] = h0
        return out

    h0 = x[family.state_arg]
    y1, last1 = family.scan(name, part(0, cut, range(i + 1), None if h0 is None else h0[:i + 1]))
    others = h0 if h0 is not None else last1.new_zeros(case.nseq, *last1.shape[1:])   # zeros: no initial states
    y2, last2 = family.scan(name, part(cut, case.l, range(i, case.nseq), torch.cat([last1[i:i + 1], others[i + 1:]])))
    _against_alone("split prefill", name, case, family, torch.cat([y1, y2], family.time_dim),
                   torch.cat([last1[:i], last2]), family.repro(name, case, f"sequence {i} split at its token {k}"))


def check_decoding(name, case, order_seed, padding, family=None):
    """Decoding every sequence at once through state_batch_indices: a cache of nseq + 2 slots,
    sequence i in a shuffled slot, each step's rows (the sequences with a token left, plus
    ``padding`` rows of index -1) in a shuffled order. Outputs and final slots equal each sequence
    scanned alone; padding rows output exactly zeros; the spare slots are untouched."""
    family = family or SELECTIVE
    x = family.inputs(case)
    offsets = case.offsets
    gen = torch.Generator().manual_seed(order_seed)
    y0, s0 = scan_alone("loop", x, family)                      # only for the shapes and dtypes
    nslots = case.nseq + 2
    slot_of = torch.randperm(nslots, generator=gen)[:case.nseq].tolist()
    cache = torch.randn(nslots, *s0.shape[1:], generator=gen, dtype=torch.float64).to(s0.dtype)
    for i, slot in enumerate(slot_of):
        cache[slot] = 0 if x[family.state_arg] is None else x[family.state_arg][i]
    spare = [slot for slot in range(nslots) if slot not in slot_of]
    spare_before = cache[spare].clone()
    y = torch.full_like(y0, float("nan"))
    where = family.repro(name, case, f"decoded through state_batch_indices, order seed {order_seed}, "
                                     f"{padding} padding rows")
    td = family.time_dim - 1 if family.time_dim > 0 else family.time_dim
    for t in range(max(case.lengths, default=0)):
        rows = [i for i in range(case.nseq) if t < case.lengths[i]] + [-1] * padding
        rows = [rows[r] for r in torch.randperm(len(rows), generator=gen).tolist()]
        pos = [offsets[i] + t if i >= 0 else 0 for i in rows]    # a padding row reads some token
        tokens = {k: (None if x[k] is None else family.token(x[k], pos)) for k in family.step_args}
        indices = torch.tensor([slot_of[i] if i >= 0 else -1 for i in rows], dtype=torch.int32)
        out = family.step(name, cache, x, tokens, indices)
        for r, i in enumerate(rows):
            if i < 0:
                if not torch.equal(out[r], torch.zeros_like(out[r])):
                    raise AssertionError(f"{name}: a padding row's output is not zero\n  reproduce: {where}")
            else:
                y[0].select(td, offsets[i] + t).copy_(out[r])
    if not torch.equal(cache[spare], spare_before):
        raise AssertionError(f"{name}: decoding changed a cache slot no row owns\n  reproduce: {where}")
    _against_alone("decoding", name, case, family, y, cache[slot_of], where)


def chunk_starts(name, case):
    """Packed positions where the chunks of Mamba-1's ``name`` start on this case: parallel's plan
    (with whatever plan constants are in force), every token for a step-by-step implementation, and
    0 alone for one that scans in one piece (the loop)."""
    if case.l == 0:
        return [0]
    if name == "parallel":
        from impls.selective import parallel

        x = packed_inputs(case)
        p = parallel._Plan(x["u"], x["A"], x["B"], x["C"])
        return sorted({a + k * p.T for a, _ in p.segments for k in range(p.K) if a + k * p.T < max(case.l, 1)})
    if name == "recurrent":
        return list(range(max(case.l, 1)))
    return [0]


# --- Mamba-1 as a Family ------------------------------------------------------------------------

def _selective_scan(name, x):
    return impls.selective_scan(**x, return_last_state=True, impl=name)


def _selective_step(name, cache, x, tokens, indices):
    return impls.selective_state_update(cache, tokens["u"], tokens["delta"], x["A"], tokens["B"], tokens["C"], x["D"],
                                        tokens["z"], x["delta_bias"], x["delta_softplus"],
                                        state_batch_indices=indices, impl=name)


def _pack_conditioning(dtA, raw, softplus, biased, gated, time_dim):
    """The conditioning of a whole pack (equivalence/tolerance.py): its cumulative sum at the last
    token, the largest over channels, plus the sigmoids of a gradient and the gate."""
    if dtA.shape[time_dim] == 0:
        return 0.0
    return gradient_conditioning(conditioning(dtA, dt_ulps(raw, softplus, biased), time_dim).select(time_dim, -1), gated)


def _selective_conditioning(x64):
    raw = x64["delta"] if x64["delta_bias"] is None else x64["delta"] + x64["delta_bias"][:, None]
    dt = F.softplus(raw) if x64["delta_softplus"] else raw                        # (1, d, l)
    return _pack_conditioning(dt[..., None] * x64["A"][:, None, :], raw[..., None], x64["delta_softplus"],
                              x64["delta_bias"] is not None, x64["z"] is not None, 2)


def _selective_terms(case, output, arg=None):
    """Rounded terms per element (equivalence/tolerance.py's terms): the longest sequence's steps,
    plus the readout's n for y; a gradient (of any argument ``arg``) sums over every token and over
    channels or states."""
    longest = max(case.lengths)
    return dict(y=longest + case.n, state=longest,
                gradient=case.l * (case.d // max(case.g, 1) + case.n))[output]


SELECTIVE = Family(name="selective", time_args=TIME_ARGS, time_dim=-1, state_arg="initial_state",
                   step_args=("u", "delta", "B", "C", "z"), inputs=packed_inputs, scan=_selective_scan,
                   step=_selective_step, magnitudes=magnitudes, conditioning=_selective_conditioning,
                   terms=_selective_terms, repro=repro)


# --- Mamba-2 (SSD) as a Family: impls.ssd_scan with cu_seqlens, time on axis 1 ----------------

@dataclasses.dataclass(frozen=True)
class SSDVarlenCase:
    """A packed SSD call: sequence lengths and the options of equivalence.ssd_cases.SSDCase (b = 1);
    initial_states, when on, are one per sequence (nseq, h, p, n)."""
    lengths: tuple
    h: int
    p: int
    n: int
    g: int = 1
    dtype: str = "f32"
    regime: str = "mamba2"
    D: str = "h"
    z: bool = True
    dt_bias: bool = True
    softplus: bool = True
    dt_limit: str = "default"
    initial_states: bool = True
    chunk_size: int = 8
    seed: int = 0

    @property
    def id(self):
        opts = "".join(f"-{k}" for k in ("z", "dt_bias", "softplus", "initial_states") if getattr(self, k))
        return (f"lens{'_'.join(map(str, self.lengths))}-h{self.h}-p{self.p}-n{self.n}-g{self.g}-{self.dtype}-"
                f"{self.regime}-D{self.D}-lim{self.dt_limit}{opts}-cs{self.chunk_size}-s{self.seed}")

    offsets = VarlenCase.offsets
    l = VarlenCase.l
    nseq = VarlenCase.nseq

    def packed_case(self):
        """The equivalence.ssd_cases.SSDCase whose (1, l, h, p) inputs are the packed inputs."""
        from .ssd_cases import SSDCase

        return SSDCase(b=1, l=self.l, h=self.h, p=self.p, n=self.n, g=self.g, dtype=self.dtype, regime=self.regime,
                       D=self.D, z=self.z, dt_bias=self.dt_bias, softplus=self.softplus, dt_limit=self.dt_limit,
                       chunk_size=self.chunk_size, seed=self.seed)


@st.composite
def ssd_varlen_cases(draw, chunk=8, dtypes=tuple(DTYPES), regimes=("mamba2", "stress", "slow"), max_h=4, max_p=4,
                     max_n=4, max_seqs=6, max_total=80):
    h = draw(st.integers(1, max_h))
    return SSDVarlenCase(
        lengths=draw(sequence_lengths(chunk, max_seqs, max_total)), h=h, p=draw(st.integers(1, max_p)),
        n=draw(st.integers(1, max_n)), g=draw(st.sampled_from([g for g in range(1, h + 1) if h % g == 0])),
        dtype=draw(st.sampled_from(dtypes)), regime=draw(st.sampled_from(regimes)),
        D=draw(st.sampled_from(("none", "h", "hp"))), z=draw(st.booleans()), dt_bias=draw(st.booleans()),
        softplus=draw(st.booleans()), dt_limit=draw(st.sampled_from(("default", "tight"))),
        initial_states=draw(st.booleans()), chunk_size=draw(st.sampled_from((chunk, 1, 3, chunk + 5))),
        seed=draw(st.integers(0, 2**32 - 1)))


SSD_TIME_ARGS = ("x", "dt", "B", "C", "z")


def ssd_packed_inputs(case, dtype=None):
    """impls.ssd_scan keyword arguments for the packed call: x, z (1, l, h, p), dt (1, l, h), B, C
    (1, l, g, n), initial_states (nseq, h, p, n) or None, cu_seqlens (nseq + 1,) int32, chunk_size,
    dt_softplus, dt_limit. With dtype=torch.float64, the same values in float64."""
    from .ssd_cases import make_inputs as ssd_make_inputs

    x = ssd_make_inputs(case.packed_case(), dtype)
    x["initial_states"] = None
    if case.initial_states:
        gen = torch.Generator().manual_seed(case.seed + 7)
        h0 = torch.randn(case.nseq, case.h, case.p, case.n, generator=gen, dtype=torch.float64)
        h0 = h0.to(compute_dtype(DTYPES[case.dtype]))
        x["initial_states"] = h0 if dtype is None else h0.to(dtype)
    x["cu_seqlens"] = torch.tensor(case.offsets, dtype=torch.int32)
    x["chunk_size"] = case.chunk_size
    return x


def ssd_repro(name, case, note=""):
    return (f"impls.ssd_scan(**equivalence.varlen_cases.ssd_packed_inputs(equivalence.varlen_cases.{case!r}), "
            f"return_final_states=True, impl={name!r}){'  # ' + note if note else ''}")


def ssd_magnitudes(x64, weights=None):
    """Sums of |terms| for packed SSD inputs (float64), as magnitudes() for Mamba-1 and
    equivalence/ssd_checks.py's magnitudes and gradient_magnitudes, each sequence restarting from
    |initial_states[i]|. Returns (out scale (1, l, h, p), final states scale (nseq, h, p, n),
    {argument: gradient scale} or None); weights as in check_alone_gradients."""
    from impls.ssd.loop import effective_dt, per_head

    h = x64["x"].shape[2]
    p, n = x64["x"].shape[3], x64["B"].shape[-1]
    offsets = x64["cu_seqlens"].tolist()
    raw = x64["dt"] + (x64["dt_bias"] if x64["dt_bias"] is not None else 0)
    dt = effective_dt(x64["dt"], x64["dt_bias"], x64["dt_softplus"], x64["dt_limit"], torch.float64)   # (1, l, h)
    decay = torch.exp(dt * x64["A"])
    grad = weights is not None
    leaves = {k: x64[k].abs().requires_grad_(grad)
              for k in ("x", "B", "C", "D", "initial_states") if x64[k] is not None}
    if x64["z"] is not None:
        leaves["z"] = x64["z"].clone().requires_grad_(grad)
    B, C = per_head(leaves["B"], h), per_head(leaves["C"], h)                                 # (1, l, h, n)
    inp = (dt.abs()[..., None] * leaves["x"])[..., None] * B[:, :, :, None, :]                # (1, l, h, p, n)
    h0s = leaves.get("initial_states", torch.zeros(len(offsets) - 1, h, p, n, dtype=torch.float64))
    states, previous, lasts = [], [], []
    for i, (a, e) in enumerate(zip(offsets, offsets[1:])):
        state = h0s[i:i + 1]
        for t in range(a, e):
            previous.append(state)
            state = decay[:, t, :, None, None] * state + inp[:, t]
            states.append(state)
        lasts.append(state)
    H = torch.stack(states, 1) if states else inp                                           # (1, l, h, p, n)
    y = (H * C[:, :, :, None, :]).sum(-1)
    if "D" in leaves:
        y = y + (leaves["D"][:, None] if leaves["D"].dim() == 1 else leaves["D"]) * leaves["x"]
    if "z" in leaves:
        y = y * F.silu(leaves["z"]).abs()
    last = torch.cat(lasts)
    if not grad:
        return y.detach(), last.detach(), None
    loss = (y * weights[0].abs()).sum() + (last * weights[1].abs()).sum()
    grads = torch.autograd.grad(loss, [inp, *leaves.values()], allow_unused=True)
    lam = grads[0] if grads[0] is not None else torch.zeros_like(inp)                         # dL/dh_t
    sums = {k: (torch.zeros_like(v) if g is None else g.abs()) for (k, v), g in zip(leaves.items(), grads[1:])}
    before = torch.stack(previous, 1).detach() if previous else inp.detach()                  # h_{t-1}
    decay_terms = (decay[..., None, None] * lam * before).sum((-1, -2))                       # (1, l, h)
    input_terms = ((lam * B[:, :, :, None, :].detach()).sum(-1) * x64["x"].abs()).sum(-1)     # (1, l, h)
    sums["A"] = (dt.abs() * decay_terms).sum((0, 1))
    dsoftplus = torch.where(raw > 20, 1.0, torch.sigmoid(raw)) if x64["dt_softplus"] else torch.ones_like(raw)
    sums["dt"] = dsoftplus * (x64["A"].abs() * decay_terms + input_terms)
    if x64["dt_bias"] is not None:
        sums["dt_bias"] = sums["dt"].sum((0, 1))
    return y.detach(), last.detach(), sums


def _ssd_conditioning(x64):
    from impls.ssd.loop import effective_dt

    raw = x64["dt"] + (x64["dt_bias"] if x64["dt_bias"] is not None else 0)
    dt = effective_dt(x64["dt"], x64["dt_bias"], x64["dt_softplus"], x64["dt_limit"], torch.float64)   # (1, l, h)
    return _pack_conditioning(dt * x64["A"], raw, x64["dt_softplus"], x64["dt_bias"] is not None,
                              x64["z"] is not None, 1)


def _ssd_terms(case, output, arg=None):
    """Rounded terms per element, as equivalence/tolerance.py's ssd_terms (the longest sequence) and
    equivalence/ssd_checks.py's gradient_terms (every packed token, b = 1) for ``arg``."""
    from .ssd_checks import gradient_terms
    from .tolerance import ssd_terms

    longest = max(case.lengths)
    if output == "gradient":
        return gradient_terms(dataclasses.replace(case.packed_case(), l=max(case.l, 1)), arg)
    return ssd_terms("out" if output == "y" else "final_states", longest, case.n)


def _ssd_scan(name, x):
    return impls.ssd_scan(**x, return_final_states=True, impl=name)


def _ssd_step(name, cache, x, tokens, indices):
    return impls.ssd_state_update(cache, tokens["x"], tokens["dt"], x["A"], tokens["B"], tokens["C"], x["D"],
                                  tokens["z"], x["dt_bias"], x["dt_softplus"], x["dt_limit"],
                                  state_batch_indices=indices, impl=name)


SSD = Family(name="ssd", time_args=SSD_TIME_ARGS, time_dim=1, state_arg="initial_states", step_args=SSD_TIME_ARGS,
             inputs=ssd_packed_inputs, scan=_ssd_scan, step=_ssd_step, magnitudes=ssd_magnitudes,
             conditioning=_ssd_conditioning, terms=_ssd_terms,
             repro=ssd_repro)


def ssd_chunk_starts(case):
    """Packed positions where a chunk of case.chunk_size starts when the chunks are laid over the
    whole packed sequence, as the official kernel and the planted bugs lay them (impls/ssd/chunked.py
    restarts its chunks at each sequence instead, which is why it passes)."""
    return list(range(0, max(case.l, 1), case.chunk_size))
