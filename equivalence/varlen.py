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

Written once for every family: the drawn lengths, the chunk geometry they are meant to exercise
(``covered``) and the properties (``check_*``), which reach a family only through a ``Packing``:
its inputs, its public scan and step, its sums of |terms| for the tolerance's floor. Each family's
folder declares its Packing (equivalence/selective/varlen.py, equivalence/ssd/varlen.py,
equivalence/mamba3/varlen.py), with a case type that has ``lengths``, ``offsets``, ``l``, ``nseq``
and ``seed``. A state is one tensor (nseq, ...) or, for a family with ``state_parts`` (Mamba-3's
angle, ssm, k and v), a tuple of them, each with one row per sequence: the properties reach its
parts only through ``Packing.parts`` and ``Packing.map``.
"""

import dataclasses

import torch
from hypothesis import strategies as st

from impls.frontdoor import compute_dtype

from .inputs import DTYPES
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


# --- the properties, family-neutral: written once, run for any family described by a Packing ---

@dataclasses.dataclass(frozen=True)
class Packing:
    """What the varlen properties need to know about one family of scans.

    inputs(case, dtype=None): packed keyword arguments of the scan, cu_seqlens included, the
        per-sequence states under ``state_arg``; dtype=torch.float64 gives the oracle's copy
    scan(name, x): (y, last states) of one call through the public function, packed or not
    step(name, cache, x, tokens, indices): one batch-indexed decoding step; tokens holds each of
        ``step_args`` for the rows, (rows, ...); returns the rows' outputs
    magnitudes(x64, weights=None): (y scale, states scale, {argument: gradient scale} or None),
        sums of |terms| (equivalence/tolerance.py); the states' scale, the weights' and a state
        argument's gradient scales (named "<state_arg>.<part>") per part where there are parts
    conditioning(x64, output): ulps a rounding can grow to (equivalence/tolerance.py) for "y",
        "state" (one per part where there are parts) or "gradient": the whole pack's, which
        bounds each sequence's
    terms(case, output, arg=None): rounded terms per element of "y", "state" (one per part where
        there are parts) or "gradient" (of arg)
    repro(name, case, note): a line that reproduces the call
    cases(chunk=8, dtypes=..., max_seqs=6, max_total=80): the hypothesis strategy of its packed cases
    pinned: packed cases that together cover every geometry in CATEGORIES on ``chunk_starts``
    chunk_starts(case): packed positions where the chunks start that ``pinned`` is meant to cover
    time_dims: {argument: its time axis} where it is not time_dim (Mamba-3's ADT, DT, Trap: last)
    state_parts: the names of a state's parts when it is a tuple of tensors, else None
    align_state(part, actual, oracle): the actual part moved to the representative of its value
        nearest the oracle's before a comparison (an angle: 0 and 2 pi are one value), or None
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
    cases: object
    pinned: tuple
    chunk_starts: object
    time_dims: dict = dataclasses.field(default_factory=dict)
    state_parts: tuple = None
    align_state: object = None

    def axis(self, arg):
        """The time axis of argument ``arg`` (y's: time_dim)."""
        return self.time_dims.get(arg, self.time_dim)

    def cut(self, X, a, e, arg=None):
        """Tokens a..e-1 of X, the argument ``arg`` (y when None)."""
        return X.narrow(self.axis(arg), a, e - a)

    def token(self, X, pos, arg=None):
        """(1, ..., l, ...) -> (rows, ...): token pos[r] of X (the argument ``arg``) for row r."""
        td = self.axis(arg)
        td = td - 1 if td > 0 else td                                    # in X[0]
        return X[0].index_select(td, torch.tensor(pos, dtype=torch.long)).movedim(td, 0)

    def parts(self, state):
        """A state as a list of tensors: itself, or its parts."""
        return [state] if self.state_parts is None else list(state)

    def map(self, f, *states):
        """f applied to the states (part by part where they have parts: f(part of each))."""
        if self.state_parts is None:
            return f(*states)
        return tuple(f(*p) for p in zip(*(self.parts(s) for s in states)))

    def labelled(self, state):
        """[(label, tensor)]: "last states", or "last states <part>" for each part."""
        if self.state_parts is None:
            return [("last states", state)]
        return [(f"last states {k}", s) for k, s in zip(self.state_parts, state)]

    def per_part(self, value):
        """A per-state value (a scale, a count, a conditioning) as a list aligned with parts()."""
        return [value] if self.state_parts is None else list(value)

    def aligned(self, label, actual, oracle):
        if self.align_state is None or self.state_parts is None:
            return actual
        return self.align_state(label[len("last states "):], actual, oracle)

    def equal(self, a, b):
        """Whether two states are the same, bit for bit."""
        return all(torch.equal(x, y) for x, y in zip(self.parts(a), self.parts(b)))


def sequence(family, x, i):
    """The arguments of sequence i of packed inputs x, as an ordinary (b = 1) call."""
    offsets = x["cu_seqlens"].tolist()
    a, e = offsets[i], offsets[i + 1]
    out = {k: (family.cut(v, a, e, k) if k in family.time_args and v is not None else v)
           for k, v in x.items() if k != "cu_seqlens"}
    if x[family.state_arg] is not None:
        out[family.state_arg] = family.map(lambda s: s[i:i + 1], x[family.state_arg])
    return out


def scan_alone(family, name, x):
    """Each sequence of packed inputs x scanned alone by ``name`` (no cu_seqlens), concatenated:
    y along time and the last states (nseq, ...). Differentiable where ``name`` is."""
    ys, lasts = [], []
    for i in range(x["cu_seqlens"].numel() - 1):
        y, last = family.scan(name, sequence(family, x, i))
        ys.append(y)
        lasts.append(last)
    return torch.cat(ys, family.time_dim), family.map(lambda *s: torch.cat(s), *lasts)


def max_finite(t):
    t = t.detach()
    t = t[torch.isfinite(t)]
    return float(t.max()) if t.numel() else None


def _against_alone(what, name, case, family, y, last, where):
    """y and last states against each sequence scanned alone by the float64 loop (no cu_seqlens:
    the oracle never takes the packed path), under the tolerance policy."""
    x64 = family.inputs(case, torch.float64)
    ref = scan_alone(family, "loop", x64)
    same = scan_alone(family, "loop", family.inputs(case))
    sy, ss, _ = family.magnitudes(x64)
    assert_close(f"{name} {what}: y", y, ref[0], same[0], family.terms(case, "y"), where, scale=max_finite(sy),
                 conditioning=family.conditioning(x64, "y"))
    for (label, s), (_, r), (_, m), length, scale, k in zip(
            family.labelled(last), family.labelled(ref[1]), family.labelled(same[1]),
            family.per_part(family.terms(case, "state")), family.per_part(ss),
            family.per_part(family.conditioning(x64, "state"))):
        assert_close(f"{name} {what}: {label}", family.aligned(label, s, r), r, family.aligned(label, m, r), length,
                     where, scale=max_finite(scale), conditioning=k)


def check_alone(family, name, case):
    """Values and last states of a packed call equal each sequence scanned alone."""
    y, last = family.scan(name, family.inputs(case))
    _against_alone("packed", name, case, family, y, last, family.repro(name, case, ""))


def named_tensors(family, x):
    """{name: tensor} of the floating tensor inputs of x, a state's parts named "<state_arg>.<part>"."""
    out = {}
    for k, v in x.items():
        if k == family.state_arg and v is not None and family.state_parts is not None:
            out.update({f"{k}.{part}": t for part, t in zip(family.state_parts, v)})
        elif isinstance(v, torch.Tensor) and v.is_floating_point():
            out[k] = v
    return out


def with_tensors(family, x, named):
    """x with the tensors of ``named`` (named_tensors' names) in place of its own."""
    out = {k: named.get(k, v) for k, v in x.items()}
    if x.get(family.state_arg) is not None and family.state_parts is not None:
        out[family.state_arg] = tuple(named.get(f"{family.state_arg}.{part}", t)
                                      for part, t in zip(family.state_parts, x[family.state_arg]))
    return out


def _gradients(family, scan, x, weights, wrt):
    named = named_tensors(family, x)
    leaves = {k: named[k].detach().requires_grad_() for k in wrt}
    y, last = scan(with_tensors(family, x, leaves))
    loss = (y.double() * weights[0]).sum() + sum((s.double() * w).sum() for s, w in
                                                 zip(family.parts(last), family.parts(weights[1])))
    if not loss.requires_grad:   # no token and no initial state: nothing depends on any input
        return dict.fromkeys(wrt)
    return dict(zip(wrt, torch.autograd.grad(loss, [leaves[k] for k in wrt], allow_unused=True)))


def check_alone_gradients(family, name, case):
    """Gradients of a random linear function of (y, last states) of the packed call, for every
    floating tensor input, initial states (each part) included, against float64 autograd through
    the loop run on each sequence alone (the shared parameters' gradients summed over the sequences)."""
    x, x64 = family.inputs(case), family.inputs(case, torch.float64)
    y0, s0 = scan_alone(family, "loop", x64)
    gen = torch.Generator().manual_seed(case.seed + 3)
    weights = (torch.randn(y0.shape, generator=gen, dtype=torch.float64),
               family.map(lambda s: torch.randn(s.shape, generator=gen, dtype=torch.float64), s0))
    named, named64 = named_tensors(family, x), named_tensors(family, x64)
    wrt = list(named)
    got = _gradients(family, lambda v: family.scan(name, v), x, weights, wrt)
    ref = _gradients(family, lambda v: scan_alone(family, "loop", v), x64, weights, wrt)
    same = _gradients(family, lambda v: scan_alone(family, "loop", v), x, weights, wrt)
    sums = family.magnitudes(x64, weights)[2]
    pack_conditioning = family.conditioning(x64, "gradient")
    for k in wrt:
        zero = torch.zeros_like(named64[k])    # an input no output depends on (l = 0) has no gradient
        g, r, s = (zero.to(named[k].dtype) if v is None else v for v in (got[k], ref[k], same[k]))
        assert_close(f"{name} packed: grad {k}", g, r, s, family.terms(case, "gradient", k),
                     family.repro(name, case, f"gradient of {k}"), scale=max_finite(sums[k]),
                     conditioning=pack_conditioning)


def _perturbed(x, i, gen, value, family):
    """A copy of packed inputs x with sequence i's tokens and initial state redrawn, and with
    ``value`` (nan, inf) at its middle token of the first time argument when given."""
    out = dict(x)
    offsets = x["cu_seqlens"].tolist()
    a, e = offsets[i], offsets[i + 1]

    def redrawn(v):
        v = v.clone()
        v[i:i + 1].copy_(torch.randn(v[i:i + 1].shape, generator=gen, dtype=torch.float64).to(v.dtype))
        return v

    for k in family.time_args:
        v = x[k]
        if v is None or e == a:
            continue
        v = v.clone()
        part = family.cut(v, a, e, k)
        part.copy_(torch.randn(part.shape, generator=gen, dtype=torch.float64).to(v.dtype))
        if value is not None and k == family.time_args[0]:
            family.cut(part, (e - a) // 2, (e - a) // 2 + 1, k).fill_(float(value))
        out[k] = v
    if x[family.state_arg] is not None:
        out[family.state_arg] = family.map(redrawn, x[family.state_arg])
    return out


def check_no_crossing(family, name, case, i, value=None):
    """Perturbing sequence i (tokens and initial state; with ``value``, also a NaN or inf) changes
    no output and no last state of any other sequence, bit for bit."""
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
        row = lambda s: s[j]
        if (not torch.equal(family.cut(y, a, e), family.cut(y2, a, e))
                or not family.equal(family.map(row, last), family.map(row, last2))):
            raise AssertionError(f"{name}: perturbing sequence {i} changed sequence {j}'s output or last state\n"
                                 f"  reproduce: {where}")


def check_prefill(family, name, case, i, k):
    """Chunked prefill: sequence i split at token k across two packed calls (the sequences before
    it and its first k tokens; then its remaining tokens, from the first call's last state, and the
    sequences after it) equals each sequence scanned alone."""
    i %= case.nseq
    k = min(k, case.lengths[i])
    x = family.inputs(case)
    offsets = case.offsets
    cut = offsets[i] + k

    def part(lo, hi, seqs, h0):
        lens = [max(0, min(offsets[j + 1], hi) - max(offsets[j], lo)) for j in seqs]
        out = {key: (family.cut(v, lo, hi, key) if key in family.time_args and v is not None else v)
               for key, v in x.items()}
        out["cu_seqlens"] = torch.tensor(offsets_of(lens), dtype=torch.int32)
        out[family.state_arg] = h0
        return out

    h0 = x[family.state_arg]
    y1, last1 = family.scan(name, part(0, cut, range(i + 1), None if h0 is None else family.map(lambda s: s[:i + 1], h0)))
    # zeros where there are no initial states
    others = h0 if h0 is not None else family.map(lambda s: s.new_zeros(case.nseq, *s.shape[1:]), last1)
    y2, last2 = family.scan(name, part(cut, case.l, range(i, case.nseq),
                                       family.map(lambda s, o: torch.cat([s[i:i + 1], o[i + 1:]]), last1, others)))
    _against_alone("split prefill", name, case, family, torch.cat([y1, y2], family.time_dim),
                   family.map(lambda s1, s2: torch.cat([s1[:i], s2]), last1, last2),
                   family.repro(name, case, f"sequence {i} split at its token {k}"))


def check_decoding(family, name, case, order_seed, padding):
    """Decoding every sequence at once through state_batch_indices: a cache of nseq + 2 slots,
    sequence i in a shuffled slot, each step's rows (the sequences with a token left, plus
    ``padding`` rows of index -1) in a shuffled order. Outputs and final slots equal each sequence
    scanned alone; padding rows output exactly zeros; the spare slots are untouched."""
    x = family.inputs(case)
    offsets = case.offsets
    gen = torch.Generator().manual_seed(order_seed)
    y0, s0 = scan_alone(family, "loop", x)                      # only for the shapes and dtypes
    nslots = case.nseq + 2
    slot_of = torch.randperm(nslots, generator=gen)[:case.nseq].tolist()
    cache = family.map(lambda s: torch.randn(nslots, *s.shape[1:], generator=gen, dtype=torch.float64).to(s.dtype), s0)
    h0 = family.map(torch.zeros_like, s0) if x[family.state_arg] is None else x[family.state_arg]
    for i, slot in enumerate(slot_of):
        for c, s in zip(family.parts(cache), family.parts(h0)):
            c[slot] = s[i]
    spare = [slot for slot in range(nslots) if slot not in slot_of]
    spare_before = family.map(lambda c: c[spare].clone(), cache)
    y = torch.full_like(y0, float("nan"))
    where = family.repro(name, case, f"decoded through state_batch_indices, order seed {order_seed}, "
                                     f"{padding} padding rows")
    td = family.time_dim - 1 if family.time_dim > 0 else family.time_dim
    for t in range(max(case.lengths, default=0)):
        rows = [i for i in range(case.nseq) if t < case.lengths[i]] + [-1] * padding
        rows = [rows[r] for r in torch.randperm(len(rows), generator=gen).tolist()]
        pos = [offsets[i] + t if i >= 0 else 0 for i in rows]    # a padding row reads some token
        tokens = {k: (None if x[k] is None else family.token(x[k], pos, k)) for k in family.step_args}
        indices = torch.tensor([slot_of[i] if i >= 0 else -1 for i in rows], dtype=torch.int32)
        out = family.step(name, cache, x, tokens, indices)
        for r, i in enumerate(rows):
            if i < 0:
                if not torch.equal(out[r], torch.zeros_like(out[r])):
                    raise AssertionError(f"{name}: a padding row's output is not zero\n  reproduce: {where}")
            else:
                y[0].select(td, offsets[i] + t).copy_(out[r])
    if not family.equal(family.map(lambda c: c[spare], cache), spare_before):
        raise AssertionError(f"{name}: decoding changed a cache slot no row owns\n  reproduce: {where}")
    _against_alone("decoding", name, case, family, y, family.map(lambda c: c[slot_of], cache), where)



def pack_conditioning(dtA, raw, softplus, biased, gated, time_dim):
    """The conditioning of a whole pack (equivalence/tolerance.py): its cumulative sum at the last
    token, the largest over channels, plus the sigmoids of a gradient and the gate."""
    if dtA.shape[time_dim] == 0:
        return 0.0
    return gradient_conditioning(conditioning(dtA, dt_ulps(raw, softplus, biased), time_dim).select(time_dim, -1), gated)



# --- a family's packed case type and inputs, derived from its case type ---------------------

# The packed geometry every packed case type has
OFFSETS = property(lambda case: offsets_of(case.lengths), doc="cu_seqlens as a list")
TOTAL = property(lambda case: sum(case.lengths), doc="l: the packed length")
NSEQ = property(lambda case: len(case.lengths), doc="the number of sequences")


def packed_case_type(case_type, name, module, state, drop=(), **defaults):
    """A family's packed case type: sequence ``lengths`` first, then every field of ``case_type``
    but b and l (a pack has b = 1 and the packed length) and ``drop``, with ``defaults`` in place of
    the case type's. ``state`` names the flag of per-sequence initial states, which the packed
    inputs draw themselves (``packed_inputs``): ``packed_case()`` passes it off.

    Derived rather than written out so that a packed case has every option its family's case has.
    ``module`` is where the type is reachable, so that its repr reproduces in a plain script."""
    fields = [("lengths", tuple)]
    for f in dataclasses.fields(case_type):
        if f.name in ("b", "l") + tuple(drop):
            continue
        default = defaults.get(f.name, f.default)
        fields.append((f.name, f.type) if default is dataclasses.MISSING
                      else (f.name, f.type, dataclasses.field(default=default)))
    options = [f[0] for f in fields[1:] if f[0] != state]

    def packed_case(self):
        """The case whose (b = 1, packed l) inputs are the packed inputs, its own states off."""
        return case_type(b=1, l=self.l, **{state: False}, **{k: getattr(self, k) for k in options})

    def case_id(self):
        lens = "_".join(map(str, self.lengths))
        return f"lens{lens}-{self.packed_case().id}" + (f"-{state}" if getattr(self, state) else "")

    cls = dataclasses.make_dataclass(name, fields, frozen=True, namespace=dict(
        offsets=OFFSETS, l=TOTAL, nseq=NSEQ, packed_case=packed_case, id=property(case_id),
        __doc__=f"A packed call of {case_type.__name__}'s family: sequence lengths and its options (b = 1)."))
    cls.__module__ = module
    return cls


def packed_inputs(case, x, state, state_shape, dtype=None):
    """x, the keyword arguments of ``case.packed_case()``, completed for the packed call: when the
    case has per-sequence initial states, (nseq, *state_shape) under ``state``, in the compute
    dtype (or ``dtype``, the oracle's); and cu_seqlens (nseq + 1,) int32."""
    if getattr(case, state):
        gen = torch.Generator().manual_seed(case.seed + 7)
        h0 = torch.randn(case.nseq, *state_shape, generator=gen, dtype=torch.float64)
        h0 = h0.to(compute_dtype(DTYPES[case.dtype]))
        x[state] = h0 if dtype is None else h0.to(dtype)
    x["cu_seqlens"] = torch.tensor(case.offsets, dtype=torch.int32)
    return x


# --- the recurrence over packed sequences, for the sums of |terms| and the planted bugs ----------

def row(h0s, i):
    """Row i of per-sequence states (nseq, ...), or of each of their parts (a tuple), as (1, ...)."""
    return tuple(s[i:i + 1] for s in h0s) if isinstance(h0s, tuple) else h0s[i:i + 1]


def run_sequences(offsets, h0s, advance, start=None):
    """The recurrence over packed sequences: sequence i runs over tokens offsets[i]..offsets[i+1]-1,
    h = advance(h, t), from start(i, a, h) (given the state the sequence before it ended in;
    default its own initial state row(h0s, i)). h0s: (nseq, ...), or a tuple of such parts. Returns
    lists: the state after each token, the state before each token, and each sequence's last state
    (its initial state when it is empty)."""
    h, after, before, lasts = row(h0s, 0), [], [], []
    for i, (a, e) in enumerate(zip(offsets, offsets[1:])):
        h = row(h0s, i) if start is None else start(i, a, h)
        for t in range(a, e):
            before.append(h)
            h = advance(h, t)
            after.append(h)
        lasts.append(h if e > a else row(h0s, i))
    return after, before, lasts


def abs_leaves(x64, names, grad):
    """{argument: |value|} of the inputs ``names`` that are passed, and z as it is (its gate is
    |silu(z)|): the leaves of a sums-of-|terms| run, requiring grad when ``grad``."""
    leaves = {k: x64[k].abs().requires_grad_(grad) for k in names if x64[k] is not None}
    if x64["z"] is not None:
        leaves["z"] = x64["z"].clone().requires_grad_(grad)
    return leaves


def adjoints(y, last, weights, inputs, leaves):
    """For the loss sum(|w_y| y) + sum(|w_s| last) of a sums-of-|terms| run: (its gradient with
    respect to ``inputs``, the per-token inputs to the state (the adjoint lambda), and {argument:
    |gradient|} for each of ``leaves``); zeros where nothing depends on a leaf (l = 0)."""
    loss = (y * weights[0].abs()).sum() + (last * weights[1].abs()).sum()
    grads = torch.autograd.grad(loss, [inputs, *leaves.values()], allow_unused=True)
    lam = grads[0] if grads[0] is not None else torch.zeros_like(inputs)
    return lam, {k: (torch.zeros_like(v) if g is None else g.abs()) for (k, v), g in zip(leaves.items(), grads[1:])}
