"""The properties every implementation of every family must have, written once over a family.

A family is its module in equivalence/ (equivalence/selective/, equivalence/ssd/, ...), named by
its impls Family value (``Family.equivalence``) and got by ``family(name)``. What a property needs
of it, what it must write itself first:

    NAME                    the impls family name
    Case, cases(...)        the case type (frozen dataclass: id, seed, b, l, dtype, torch_dtype; and
                            within(limits) where an implementation declares case_limits) and its
                            hypothesis strategy, shrinking to the plainest case
    make_inputs(case, dtype=None)
                            keyword arguments of its public scan (dtype: the float64 oracle's copy)
    TIME_ARGS, Y_AXES       the arguments with a time axis; y's letters
    magnitudes(case, weights=None, x=None), conditionings(case, x=None), terms(case, output, arg=None)
                            what the tolerance policy (equivalence/tolerance.py) needs; x: float64
                            inputs to take instead of reference_inputs(case) (a poisoned copy)

and what it writes only where it differs from the default (DEFAULTS below fills in the rest):

    TIME_DIM                the time axis of the time arguments and of y (1: batch, then time)
    STATE_ARG               the initial state's argument ("initial_state"), also the capability
                            that continuing needs
    SCAN_ARGS, BATCH_ARGS   the tensor arguments, and those with a batch axis (both: TIME_ARGS and
                            STATE_ARG)
    CHANNEL_ARG             the input with one element per output channel (TIME_ARGS[0])
    PINNED                  known edge cases, each run by a test of its own (none)
    PINNED_INVARIANTS       {property: its long and edge cases} (none)
    STRATEGIES              {test: the strategy it draws from} (cases() for every test)
    reference_inputs(case)  the float64 oracle's inputs (make_inputs(case, torch.float64))
    scan(name, case, x, chunk_size=None), step(name, state, x, t), state_shape(case)
                            the public scan returning (y, last state) (the Family's scan, which
                            returns both); one token through the public step, updating the state
                            in place (the Family's step on token t of each time argument, the
                            other arguments as they are); the state's shape (the loop's last state's)
    supported(entry, case)  whether the entry declares what the case needs (its dtype)
    exact_kinds(case)       whether NaN, +inf and -inf must match the loop's kind for kind (always)
    call(name, case)        the public call as a Python expression, the reproduce line's (scan on
                            make_inputs, through the family's module)
    CHUNK_SIZES             chunk sizes a result must not depend on (None: no chunk size)
    PACKING                 its packed sequences (equivalence/varlen.py: Packing) (None)
    and for equivalence/diagnose.py: OPTIONS, UNGROUPED, GROUPED_AXIS, AXES, PLAIN (UNREDUCED), TINY, PROBES,
    positional(x), scan_by_stepping(step) (without them a failure is reported undiagnosed)

Optional, for a family whose arguments or state do not fit the plain form (Mamba-3's):
    TIME_DIMS               {argument: its time axis} where it is not TIME_DIM (y's is TIME_DIM)
    STATE_PARTS             the names of the parts when the state is a tuple of tensors; then
                            state_shape(case), magnitudes(...)[1], conditionings(...)[1] and
                            terms(case, "state") give one entry per part, the state argument's
                            gradients are named "<STATE_ARG>.<part>", and step(...) updates each
                            part in place
    align_state(part, actual, oracle)
                            the actual part moved to the representative of its value nearest the
                            oracle's before a comparison (an angle: 0 and 2 pi are one value)
    mixed_axes(case)        the letters of Y_AXES along which one channel's input reaches every output
                            of its token (a norm over p: Mamba-3 MIMO's); y may have axes past Y_AXES,
                            each indexed whole (all of a channel's ranks)

Each check(family, name, case, ...) raises AssertionError (with a line that reproduces the case)
or returns quietly; the case-drawn ones raise a CaseFailure that can re-run the check on other
cases (equivalence/diagnose.py says from it what the failure needs).

    values              y and the last state against the float64 loop; an undeclared capability refused
    split               scan the first k tokens, continue from the last state
    prefill then decode the scan, then the step once per token
    causality           a finite change at token t changes no output before t, bit for bit
    batch independence  a change in batch row j changes no other row, bit for bit
    non-finite          a NaN, inf or -inf at token t of one input: outputs non-finite exactly where
                        the loop's are (a NaN stays NaN), within the policy elsewhere
    NaN propagation     a NaN in one channel's input at token t: that channel NaN from t on, every
                        other output unchanged bit for bit
    gradients           of every input, against float64 autograd through the loop
    partial gradients   of one input alone requiring grad, the loss reading y alone, the last
                        state alone or both, against the loop's (none where the loop has none)
    chunk sizes         the same results for every chunk size (families with CHUNK_SIZES)
    determinism, batch invariance, unwritten memory, non-finite causality (below)

NaN counts as equal to NaN wherever a check compares bit for bit (causality, batch independence,
determinism): the spec says where a NaN goes, not which NaN it is; its sign and payload are not
part of any interface, and an output that is NaN in both runs was not changed by the perturbation.
"""

import collections
import contextlib
import dataclasses
import functools
import importlib

import torch

import impls
from impls.frontdoor import compute_dtype

from .tolerance import assert_close


# What a family's module must define for the shared properties to run on it: the first list above
CONTRACT = ("NAME", "Case", "cases", "make_inputs", "TIME_ARGS", "Y_AXES", "magnitudes", "conditionings", "terms")


def default_scan(fam, name, case, x, chunk_size=None):
    return impls.get_family(fam.NAME).scan(**x, impl=name)


def default_step(fam, name, state, x, t):
    token = {k: (v.select(time_dim(fam, k), t) if k in fam.TIME_ARGS and v is not None else v)
             for k, v in x.items() if k != fam.STATE_ARG}
    return impls.get_family(fam.NAME).step(state, **token, impl=name)


def default_state_shape(fam, case):
    return map_state(fam, lambda s: tuple(s.shape), fam.scan("loop", case, fam.make_inputs(case))[1])


def default_call(fam, name, case):
    m = fam.__name__
    return f"{m}.scan({name!r}, {m}.{case!r}, {m}.make_inputs({m}.{case!r}))"


# What a family leaves out, as a function of its module, in the order they may depend on each other
DEFAULTS = dict(
    TIME_DIM=lambda fam: 1,
    STATE_ARG=lambda fam: "initial_state",
    SCAN_ARGS=lambda fam: fam.TIME_ARGS + (fam.STATE_ARG,),
    BATCH_ARGS=lambda fam: fam.TIME_ARGS + (fam.STATE_ARG,),
    CHANNEL_ARG=lambda fam: fam.TIME_ARGS[0],
    PINNED=lambda fam: (),
    PINNED_INVARIANTS=lambda fam: {},
    STRATEGIES=lambda fam: collections.defaultdict(fam.cases),
    reference_inputs=lambda fam: lambda case: fam.make_inputs(case, torch.float64),
    scan=lambda fam: functools.partial(default_scan, fam),
    step=lambda fam: functools.partial(default_step, fam),
    state_shape=lambda fam: functools.partial(default_state_shape, fam),
    supported=lambda fam: lambda entry, case: case.torch_dtype in entry.supports["dtypes"],
    exact_kinds=lambda fam: lambda case: True,
    call=lambda fam: functools.partial(default_call, fam),
    CHUNK_SIZES=lambda fam: None,
    PACKING=lambda fam: None,
)


def complete(module):
    """The family's module with every name of DEFAULTS that it does not define set to the default,
    where it has the whole CONTRACT (the defaults are made of it); returns it."""
    if any(not hasattr(module, k) for k in CONTRACT):
        return module
    for k, default in DEFAULTS.items():
        if not hasattr(module, k):
            setattr(module, k, default(module))
    return module


def family(name):
    """The equivalence module of the impls family ``name`` (equivalence.selective, ...), completed;
    TypeError naming what it lacks of CONTRACT (without it no property can run on the family)."""
    missing = missing_contract(name)
    if missing:
        raise TypeError(f"family {name!r}: {impls.get_family(name).equivalence} does not define "
                        f"{', '.join(missing)} (equivalence/properties.py: CONTRACT)")
    return complete(importlib.import_module(impls.get_family(name).equivalence))


def missing_contract(name):
    """The names of CONTRACT that the equivalence module of family ``name`` lacks (empty when the
    shared properties can run on it)."""
    module = importlib.import_module(impls.get_family(name).equivalence)
    return [k for k in CONTRACT if not hasattr(module, k)]


def wired(name):
    """Whether the shared properties run on family ``name`` (its module has the whole contract)."""
    return not missing_contract(name)


def within(case, limits):
    """The case folded into an implementation's size limits (``case_limits``; None: none)."""
    return case if limits is None else case.within(limits)


def prepare(fam, name, case):
    """The implementation's entry and the case folded into its size limits."""
    entry = impls.get(name, fam.NAME)
    return entry, within(case, entry.supports["case_limits"])


# (family, name) -> Python statements that register it in a plain script, for implementations that
# a plain ``import impls`` does not register (a plain function, a step, a module registering on
# import): filled by equivalence/plugin.py, read by repro().
SETUP = {}


def repro(fam, name, case):
    """One line that reproduces the call in a plain Python script (python -c "..."), whatever
    registered ``name``: the imports and registration it needs, then the call on the case's inputs."""
    setup = SETUP.get((fam.NAME, name), "")
    return f"import impls, {fam.__name__}; {setup + '; ' if setup else ''}out = {fam.call(name, case)}"


class CaseFailure(AssertionError):
    """A property check failed on a case. Carries what is needed to re-run the check on other cases
    (equivalence/plugin.py does so once, for the final, shrunk failure, to say what the bug needs)."""

    def __init__(self, message, fam, name, case, rerun):
        super().__init__(message)
        self.family, self.name, self.case, self.rerun = fam, name, case, rerun


def case_check(check):
    """Decorate a check(fam, name, case, *extra): the case is folded into the implementation's size
    limits (what it runs on is what it reports), and an AssertionError becomes a CaseFailure."""

    @functools.wraps(check)
    def wrapper(fam, name, case, *extra):
        case = within(case, impls.get(name, fam.NAME).supports["case_limits"])
        try:
            return check(fam, name, case, *extra)
        except CaseFailure:
            raise
        except AssertionError as e:
            raise CaseFailure(str(e), fam, name, case, lambda c: check(fam, name, c, *extra)) from None

    return wrapper


def register_planted(fam, bug):
    """Register the family's planted scan ``bug`` (equivalence/<family>/planted_bugs.py) as
    "planted:<bug>"; returns that name. They are written row by row, so they claim batch_invariant
    (the bit-for-bit check runs on them)."""
    key = f"planted:{bug}"
    if key not in impls.names(fam.NAME):
        impls.register(key, getattr(fam.planted_bugs, bug), family=fam.NAME,
                       **{"batch_invariant": True, **fam.planted_bugs.CAPABILITIES.get(bug, {})})
    return key


def max_finite(t):
    t = t.detach()
    t = t[torch.isfinite(t)]
    return float(t.max()) if t.numel() else None


def scales(fam, case, x=None):
    """What the policy's floor is relative to for (y, last state), and its conditionings, on the
    case's inputs or the float64 inputs x: (scale y, scale state, conditioning y, conditioning state)."""
    sy, ss = fam.magnitudes(case, x=x)[:2]
    ky, ks = fam.conditionings(case, x=x)[:2]
    return sy, ss, ky, ks


def oracle(fam, case):
    """(float64 oracle, loop in the case's dtype), each (y, last state)."""
    return fam.scan("loop", case, fam.reference_inputs(case)), fam.scan("loop", case, fam.make_inputs(case))


def assert_matches_oracle(fam, what, case, y, state, ref, same, where):
    sy, ss, _ = fam.magnitudes(case)
    ky, ks, _ = fam.conditionings(case)
    kinds = fam.exact_kinds(case)
    assert_close(f"{what}: y", y, ref[0], same[0], fam.terms(case, "y"), where, scale=sy, exact_kinds=kinds,
                 conditioning=ky)
    for (label, s), (_, r), (_, m), scale, cond, length in zip(
            state_parts(fam, state), state_parts(fam, ref[1]), state_parts(fam, same[1]), per_part(fam, ss),
            per_part(fam, ks), per_part(fam, fam.terms(case, "state"))):
        assert_close(f"{what}: {label}", aligned(fam, label, s, r), r, aligned(fam, label, m, r), length, where,
                     scale=scale, exact_kinds=kinds, conditioning=cond)


def time_dim(fam, arg):
    """The time axis of argument ``arg``: TIME_DIM unless the family's TIME_DIMS says otherwise."""
    return getattr(fam, "TIME_DIMS", {}).get(arg, fam.TIME_DIM)


def state_parts(fam, state):
    """A last state as [(label, tensor)]: one "last state", or one "last state <part>" for each of
    the family's STATE_PARTS (a tuple of tensors)."""
    names = getattr(fam, "STATE_PARTS", None)
    if names is None:
        return [("last state", state)]
    return [(f"last state {k}", s) for k, s in zip(names, state)]


def per_part(fam, value):
    """A per-state value (a scale, a conditioning, a count) as a list aligned with state_parts."""
    return [value] if getattr(fam, "STATE_PARTS", None) is None else list(value)


def map_state(fam, f, state):
    """f applied to the state, or to each of its parts."""
    return f(state) if getattr(fam, "STATE_PARTS", None) is None else tuple(f(s) for s in state)


def aligned(fam, label, actual, oracle):
    """actual moved by the family's align_state (an angle to within pi of the oracle's), if any."""
    align = getattr(fam, "align_state", None)
    if align is None or actual is None or label == "last state":
        return actual
    return align(label[len("last state "):], actual, oracle)


def time_slice(fam, x, start, stop):
    def cut(k, v):
        d = time_dim(fam, k)
        return v.narrow(d, start, (v.shape[d] if stop is None else stop) - start)

    return {k: (cut(k, v) if k in fam.TIME_ARGS and v is not None else v) for k, v in x.items()}


AXIS_NAMES = dict(b="batch row", d="channel", h="head", p="channel", l="t")


def position(fam, index):
    """'batch row 0, head 1, channel 2, t=5' for an index of y."""
    named = [f"{AXIS_NAMES.get(a, a)} {i}" for a, i in zip(fam.Y_AXES, index) if a != "l"]
    return ", ".join(named + [f"t={index[fam.Y_AXES.index('l')]}"])


@case_check
def check_values(fam, name, case):
    """Values and last state against the float64 loop; an undeclared capability must be refused."""
    entry = impls.get(name, fam.NAME)
    x = fam.make_inputs(case)
    if not fam.supported(entry, case):
        try:
            fam.scan(name, case, x)
        except NotImplementedError:
            return
        raise AssertionError(f"{name} ran a case it declares unsupported: {case.id}")
    y, state = fam.scan(name, case, x)
    ref, same = oracle(fam, case)
    assert_matches_oracle(fam, name, case, y, state, ref, same, repro(fam, name, case))


@case_check
def check_split(fam, name, case, k):
    """Scan the first k tokens, continue from the last state: the same as one scan of everything
    (segment-by-segment prefill, which the official code and transformers failed to carry)."""
    entry = impls.get(name, fam.NAME)
    if not fam.supported(entry, case) or not entry.supports[fam.STATE_ARG]:
        return
    k = min(k, case.l)
    x = fam.make_inputs(case)
    y1, s1 = fam.scan(name, case, time_slice(fam, x, 0, k))
    y2, s2 = fam.scan(name, case, {**time_slice(fam, x, k, None), fam.STATE_ARG: s1})
    ref, same = oracle(fam, case)
    assert_matches_oracle(fam, f"{name}, split at {k}", case, torch.cat([y1, y2], fam.TIME_DIM), s2, ref, same,
                          repro(fam, name, case) + f"  # split at k={k}")


@case_check
def check_prefill_then_decode(fam, name, case, k):
    """Prefill k tokens with the scan, then one step per token: the generation path of a model."""
    entry = impls.get(name, fam.NAME)
    if entry.step is None or not fam.supported(entry, case):
        return
    k = min(k, case.l)
    x = fam.make_inputs(case)
    if k:
        y_pre, state = fam.scan(name, case, time_slice(fam, x, 0, k))
    else:
        zeros = functools.partial(torch.zeros, dtype=compute_dtype(case.torch_dtype))
        state = (map_state(fam, torch.clone, x[fam.STATE_ARG]) if x[fam.STATE_ARG] is not None
                 else map_state(fam, zeros, fam.state_shape(case)))
    steps = [fam.step(name, state, x, t).unsqueeze(fam.TIME_DIM) for t in range(k, case.l)]
    if not k:  # no prefill: an empty output of the steps' shape (at l = 0, the scan's of no token)
        y_pre = steps[0].narrow(fam.TIME_DIM, 0, 0) if steps else fam.scan(name, case, time_slice(fam, x, 0, 0))[0]
    ys = [y_pre] + steps
    ref, same = oracle(fam, case)
    assert_matches_oracle(fam, f"{name}, prefill {k} then step", case, torch.cat(ys, fam.TIME_DIM), state, ref, same,
                          repro(fam, name, case) + f"  # prefill k={k}, then the step once per token")


def perturbed(x, keys, index, gen):
    """A copy of the inputs with fresh random values at ``index`` of each argument in ``keys``
    (``index``: one index for all, or a function of the argument's name; a tuple of tensors, a
    state's parts, has each part perturbed)."""
    def fresh(v, at):
        # same strides as the original: elementwise kernels may round differently on another
        # layout (vectorised vs scalar exp), and the comparisons are bit for bit
        v = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype).copy_(v)
        v[at] = torch.randn(v[at].shape, generator=gen, dtype=torch.float64).to(v.dtype)
        return v

    out = dict(x)
    for k in keys:
        if x[k] is not None:
            at = index(k) if callable(index) else index
            out[k] = tuple(fresh(s, at) for s in x[k]) if isinstance(x[k], tuple) else fresh(x[k], at)
    return out


def token_index(fam, t, arg=None):
    """The index of token t in time argument ``arg`` of the family (its time axis: time_dim)."""
    d = fam.TIME_DIM if arg is None else time_dim(fam, arg)
    if d >= 0:
        return (slice(None),) * d + (t,)
    return (Ellipsis, t) + (slice(None),) * (-d - 1)


@case_check
def check_causality(fam, name, case, t):
    """Changing token t changes no output before t (bit for bit) and does change the output from t on."""
    entry = impls.get(name, fam.NAME)
    if not fam.supported(entry, case):
        return
    t = min(t, case.l - 1)
    x = fam.make_inputs(case)
    gen = torch.Generator().manual_seed(case.seed + 1)
    x2 = perturbed(x, fam.TIME_ARGS, lambda k: token_index(fam, t, k), gen)
    y, y2 = fam.scan(name, case, x)[0], fam.scan(name, case, x2)[0]
    where = repro(fam, name, case) + f"  # token {t} perturbed"
    changed = ~same(y.narrow(fam.TIME_DIM, 0, t), y2.narrow(fam.TIME_DIM, 0, t))
    if changed.any():
        i = tuple(changed.nonzero()[0].tolist())
        raise AssertionError(f"{name}: output ({position(fam, i)}) changed by input t={t}: information flowed "
                             f"backwards in time ({y[i].item()!r} became {y2[i].item()!r}; inputs "
                             f"{', '.join(fam.TIME_ARGS)} changed at token {t} only)\n  reproduce: {where}")
    if same(y.narrow(fam.TIME_DIM, t, case.l - t), y2.narrow(fam.TIME_DIM, t, case.l - t)).all():
        raise AssertionError(f"{name}: changing input t={t} changed no output at all (outputs t >= {t} should "
                             f"depend on it)\n  reproduce: {where}")


@case_check
def check_batch_independence(fam, name, case, j):
    """Changing batch row j changes no other row, bit for bit, in y and the last state."""
    entry = impls.get(name, fam.NAME)
    if not fam.supported(entry, case) or case.b < 2:
        return
    j = j % case.b
    x = fam.make_inputs(case)
    gen = torch.Generator().manual_seed(case.seed + 2)
    x2 = perturbed(x, fam.BATCH_ARGS, (j,), gen)
    y, s = fam.scan(name, case, x)
    y2, s2 = fam.scan(name, case, x2)
    for i in range(case.b):
        if i != j and not (same(y[i], y2[i]).all() and all(same(a[i], b[i]).all() for (_, a), (_, b) in
                                                             zip(state_parts(fam, s), state_parts(fam, s2)))):
            raise AssertionError(f"{name}: changing input batch row {j} changed output batch row {i}"
                                 f"\n  reproduce: {repro(fam, name, case)}  # batch row {j} perturbed")


NONFINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def poisoned(fam, x, arg, t, value):
    """A copy of inputs x with ``value`` at token t of ``arg``, batch row 0, the first element of
    every other axis."""
    # same strides as the original (clone() makes a strided view contiguous): elementwise kernels
    # may round differently on another layout, and the comparisons are bit for bit
    v = torch.empty_strided(x[arg].shape, x[arg].stride(), dtype=x[arg].dtype).copy_(x[arg])
    index = [0] * v.dim()
    index[time_dim(fam, arg)] = t
    v[tuple(index)] = value
    return {**x, arg: v}


@case_check
def check_nonfinite(fam, name, case, arg, t, poison):
    """A NaN, inf or -inf at token t of one time input (batch row 0, the first element of its other
    axes): y and the last state are non-finite exactly where the loop's are (in its dtype, on the
    same input), and within the policy of the float64 loop everywhere else; a NaN stays NaN, and the
    first output where it is not as the loop's is named with how it got there (an earlier token,
    another channel or row).
    For an infinity only finiteness is compared, since the sign of a sum holding infinities of both
    signs depends on the order it is formed in, and no order is the spec's."""
    entry = impls.get(name, fam.NAME)
    x = fam.make_inputs(case)
    if not fam.supported(entry, case) or x[arg] is None or not x[arg].numel():  # Mamba-3's Angles at n_ang = 0
        return
    t = min(t, case.l - 1)
    value = NONFINITE[poison]
    xp = poisoned(fam, x, arg, t, value)
    x64 = poisoned(fam, fam.reference_inputs(case), arg, t, value)
    ref = fam.scan("loop", case, x64)
    loop = fam.scan("loop", case, xp)
    where = repro(fam, name, case) + f"  # {arg}[token {t}, first element] = {poison}"
    # the scales and conditionings of the poisoned inputs: a finite poison's effect (sigmoid(inf) = 1
    # where the drawn Trap gave 0.2; a decay of 1 where softplus(-inf) = 0) can raise the sums of
    # |terms| above the case's. Where they are not finite, the policy drops them (tolerance.compare).
    sy, ss, ky, ks = scales(fam, case, x64)
    # with gradients an implementation may take another path (autograd-friendly ops): check both
    runs = [(fam.scan(name, case, xp), "")]
    if entry.supports["gradients"] and case.dtype in ("f32", "f64"):
        leaves = differentiable(xp)
        y_g, s_g = fam.scan(name, case, leaves)
        runs.append(((y_g.detach(), map_state(fam, torch.Tensor.detach, s_g)), " (inputs requiring grad)"))
    for got, mode in runs:
        compared = [("y", got[0], ref[0], loop[0], fam.terms(case, "y"), sy, ky)]
        compared += [(label, aligned(fam, label, a, r), r, aligned(fam, label, s, r), length, scale, cond)
                     for (label, a), (_, r), (_, s), length, scale, cond in zip(
                         state_parts(fam, got[1]), state_parts(fam, ref[1]), state_parts(fam, loop[1]),
                         per_part(fam, fam.terms(case, "state")), per_part(fam, ss), per_part(fam, ks))]
        for what, a, r, s, length, scale, cond in compared:
            what = what + mode
            bad = torch.isfinite(a) != torch.isfinite(s)
            if bad.any():
                i = tuple(bad.nonzero()[0].tolist())
                at = f"({position(fam, i)}): {flow(fam, i, t)}" if what == "y" else f"{list(i)}"
                raise AssertionError(f"{name}: {arg} = {poison} at token {t} (batch row 0, first element): {what} is "
                                     f"{a[i].item()!r} where the loop's is {s[i].item()!r}, at {int(bad.sum())} "
                                     f"positions, first {at}\n  reproduce: {where}")
            if poison == "nan" and not torch.equal(torch.isnan(a), torch.isnan(s)):
                raise AssertionError(f"{name}: {arg} = nan at token {t}: {what} has an infinity where the loop has NaN, "
                                     f"or the reverse\n  reproduce: {where}")
            keep = torch.isfinite(s)
            zero = torch.zeros((), dtype=a.dtype)
            assert_close(f"{name}, {arg} = {poison} at {t}: {what}", torch.where(keep, a, zero),
                         torch.where(keep, r, torch.zeros((), dtype=r.dtype)), torch.where(keep, s, zero), length, where,
                         scale=scale, conditioning=cond)


@case_check
def check_nan_propagation(fam, name, case, t):
    """A NaN at token t of the family's channel input (CHANNEL_ARG: batch row 0, the first element
    of its other axes) makes that channel's outputs NaN from token t on (and, where the family mixes
    a token's channels along some axes, mixed_axes(case), all of them along those), and changes no other output,
    bit for bit: a finite change elsewhere (an ulp in another channel, an earlier token) is caught,
    which the non-finite check, held to the tolerance policy away from the non-finite outputs, lets
    pass. Every implementation is held to it, including one with the non-finite-inputs gap (that gap
    is about infinities and NaN in the decays, not about a NaN in a channel's input)."""
    entry = impls.get(name, fam.NAME)
    if not fam.supported(entry, case):
        return
    t = min(t, case.l - 1)
    x = fam.make_inputs(case)
    with torch.no_grad():
        y = fam.scan(name, case, poisoned(fam, x, fam.CHANNEL_ARG, t, float("nan")))[0]
        y_clean = fam.scan(name, case, x)[0]
    where = repro(fam, name, case) + f"  # {fam.CHANNEL_ARG}[token {t}, first element] = nan"
    mixed = getattr(fam, "mixed_axes", lambda case: ())(case)
    reach = torch.zeros(y.shape, dtype=torch.bool)
    reach[tuple(slice(t, None) if a == "l" else slice(None) if a in mixed else 0 for a in fam.Y_AXES)] = True
    missed = reach & ~torch.isnan(y)
    if missed.any():
        i = tuple(missed.nonzero()[0].tolist())
        raise AssertionError(f"{name}: the NaN in input {fam.CHANNEL_ARG} at (batch row 0, first channel, t={t}) did "
                             f"not reach output ({position(fam, i)}) of its channel, which is {y[i].item()!r}"
                             f"\n  reproduce: {where}")
    outside = ~same(y, y_clean) & ~reach
    if outside.any():
        i = tuple(outside.nonzero()[0].tolist())
        raise AssertionError(f"{name}: output ({position(fam, i)}) changed, to {y[i].item()!r}, by the NaN in input "
                             f"{fam.CHANNEL_ARG} at (batch row 0, first channel, t={t}): {flow(fam, i, t)}"
                             f"\n  reproduce: {where}")


def flow(fam, index, t):
    """How a non-finite value got to y at ``index`` from token t of batch row 0's first elements."""
    others = [a for a, i in zip(fam.Y_AXES, index) if a not in ("b", "l") and i != 0]
    if index[0] != 0:
        return "it leaked into another batch row"
    if index[fam.Y_AXES.index("l")] < t:
        return "information flowed backwards in time"
    return f"it leaked into another {AXIS_NAMES.get(others[0], others[0])}" if others else "in its own channel"


def differentiable(x, floating_only=True):
    """Inputs x with every (floating) tensor, and every tensor of a tuple (a state's parts), a fresh leaf
    requiring grad."""
    def leaf(v):
        return v.detach().requires_grad_() if v.is_floating_point() or not floating_only else v

    def parts(v):  # a state's parts, not a tuple of numbers (the SSD's dt_limit)
        return isinstance(v, tuple) and v and all(isinstance(t, torch.Tensor) for t in v)

    return {k: (leaf(v) if isinstance(v, torch.Tensor) else tuple(leaf(t) for t in v) if parts(v) else v)
            for k, v in x.items()}


def state_loss(fam, state, weights):
    """sum(w_s last state) over the state's parts (float64)."""
    return sum((s.double() * w).sum() for (_, s), w in zip(state_parts(fam, state), per_part(fam, weights)))


# What a partial gradient's loss reads (check_partial_gradients)
READS = ("y and last state", "last state", "y")


def weighted_loss(fam, y, state, weights, reads=READS[0]):
    """sum(w_y y) + sum(w_s last state) in float64, or one of the two (``reads``, one of READS)."""
    return sum(([(y.double() * weights[0]).sum()] if reads != "last state" else [])
               + ([state_loss(fam, state, weights[1])] if reads != "y" else []))


def gradient_leaves(fam, leaves, keys):
    """{name: leaf} of the tensors among ``keys`` of ``leaves``, a state's parts as "<arg>.<part>"."""
    out = {}
    for k in keys:
        v = leaves[k]
        if isinstance(v, torch.Tensor):
            out[k] = v
        elif isinstance(v, tuple) and getattr(fam, "STATE_PARTS", None) is not None:
            out.update({f"{k}.{part}": t for part, t in zip(fam.STATE_PARTS, v)})
    return out


def gradients(fam, name, case, x, weights):
    """{argument: gradient} of sum(w_y y) + sum(w_s last state) for every tensor input of the scan.
    An input the loss does not reach gets zeros (autograd's unused input): an implementation may
    leave out of its graph what it has no use for (an empty Angles), and one that leaves out what
    it needs then fails the comparison by the input's name."""
    leaves = differentiable(x, floating_only=False)
    loss = weighted_loss(fam, *fam.scan(name, case, leaves), weights)
    wrt = gradient_leaves(fam, leaves, fam.SCAN_ARGS)
    got = torch.autograd.grad(loss, list(wrt.values()), allow_unused=True) if loss.requires_grad else [None] * len(wrt)
    return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(wrt.items(), got)}


def gradient_weights(fam, case):
    """The loss's random weights for y and the last state (float64), from the case's seed."""
    gen = torch.Generator().manual_seed(case.seed + 3)
    with torch.no_grad():
        y, s = fam.scan("loop", case, fam.reference_inputs(case))
    return (torch.randn(y.shape, generator=gen, dtype=torch.float64),
            map_state(fam, lambda t: torch.randn(t.shape, generator=gen, dtype=torch.float64), s))


@case_check
def check_gradients(fam, name, case):
    """Gradients of a random linear function of (y, last state) for every tensor input, against
    float64 autograd through the loop, under the same tolerance policy."""
    entry = impls.get(name, fam.NAME)
    if not entry.supports["gradients"] or not fam.supported(entry, case):
        return
    weights = gradient_weights(fam, case)
    got = gradients(fam, name, case, fam.make_inputs(case), weights)
    ref = gradients(fam, "loop", case, fam.reference_inputs(case), weights)
    loop = gradients(fam, "loop", case, fam.make_inputs(case), weights)
    # sums under cancellation have their floor relative to their summands (equivalence/tolerance.py)
    sums = fam.magnitudes(case, weights)[2]
    grad_conditioning = fam.conditionings(case)[2]
    for k in got:
        assert_close(f"{name}: grad {k}", got[k], ref[k], loop[k], fam.terms(case, "gradient", k),
                     repro(fam, name, case) + f"  # gradient of {k}", scale=sums[k], conditioning=grad_conditioning)


def partial_gradient(fam, name, case, x, weights, leaf, reads):
    """The gradient of the loss of ``check_gradients`` reading only ``reads`` (one of READS), with
    ``leaf`` (a name of gradient_leaves) the one input requiring grad; None where the loss does not
    reach it (autograd's unused input)."""
    leaves = differentiable(x)
    wrt = gradient_leaves(fam, leaves, fam.SCAN_ARGS)
    for k, v in wrt.items():
        v.requires_grad_(k == leaf)
    loss = weighted_loss(fam, *fam.scan(name, case, leaves), weights, reads)
    if not loss.requires_grad:
        return None
    return torch.autograd.grad(loss, [wrt[leaf]], allow_unused=True)[0]


def partial_gradient_inputs(fam, case, x=None):
    """The names (gradient_leaves') of the case's floating inputs (x: the case's, if made already),
    each one that check_partial_gradients can differentiate alone."""
    x = fam.make_inputs(case) if x is None else x
    return [n for n, v in gradient_leaves(fam, x, fam.SCAN_ARGS).items() if v.is_floating_point()]


def partial_gradient_pick(fam, case, k):
    """(input, what the loss reads) for check_partial_gradients, picked by a drawn position k (the
    planted-bug search's): every input as k runs over its count, the loss turning with k too."""
    names = partial_gradient_inputs(fam, case)
    return names[k % len(names)], READS[(k + k // len(names)) % len(READS)]


@case_check
def check_partial_gradients(fam, name, case, leaf, reads):
    """``leaf`` (a name of partial_gradient_inputs) alone requiring grad, the loss reading ``reads``
    (one of READS: y alone, the last state alone or both): its gradient against the loop's under
    the same policy as ``check_gradients``, and none or zeros where the loop has none. Catches a
    backward that decides from which inputs require grad, or which outputs have a gradient, what
    to compute and decides wrong: it skips a gradient, raises, or returns memory it never wrote
    (the implementation runs with fresh memory NaN-filled), where every input requiring grad and a
    loss of both hide it. The policy's scale is the whole loss's sum of |terms|, which bounds the
    sum of any part's. A case without that input (a re-run with an option off) passes."""
    entry = impls.get(name, fam.NAME)
    if not entry.supports["gradients"] or not fam.supported(entry, case):
        return
    x = fam.make_inputs(case)
    if leaf not in partial_gradient_inputs(fam, case, x):
        return
    weights = gradient_weights(fam, case)
    with fresh_memory():
        got = partial_gradient(fam, name, case, x, weights, leaf, reads)
    ref = partial_gradient(fam, "loop", case, fam.reference_inputs(case), weights, leaf, reads)
    what = f"{name}: grad {leaf}, the one input requiring grad, of a loss reading the {reads}"
    line = repro(fam, name, case) + f"  # the gradient of {leaf} alone, of a loss reading the {reads}"
    if ref is None:
        assert got is None or bool((got == 0).all()), (
            f"{what}: the loop's is none ({leaf} does not reach the {reads}), this one's is not zero: "
            f"largest |value| {got.abs().max().item():.3g}, NaN at {int(torch.isnan(got).sum())} of {got.numel()} "
            f"(NaN: memory never written)\n  reproduce: {line}")
        return
    loop = partial_gradient(fam, "loop", case, x, weights, leaf, reads)
    assert_close(what, torch.zeros_like(ref) if got is None else got, ref, loop, fam.terms(case, "gradient", leaf),
                 line, scale=fam.magnitudes(case, weights)[2][leaf], conditioning=fam.conditionings(case)[2])


@case_check
def check_chunk_size_invariance(fam, name, case, chunk_sizes):
    """The same result, within rounding of the float64 loop, for every chunk size (any l)."""
    entry = impls.get(name, fam.NAME)
    if not fam.supported(entry, case):
        return
    x = fam.make_inputs(case)
    ref, loop = oracle(fam, case)
    for cs in chunk_sizes:
        y, state = fam.scan(name, case, x, chunk_size=cs)
        assert_matches_oracle(fam, f"{name}, chunk_size={cs}", case, y, state, ref, loop,
                              repro(fam, name, case).replace(f"chunk_size={case.chunk_size}", f"chunk_size={cs}"))


def same(a, b):
    """Elementwise: bit-for-bit equal values, NaN equal to NaN (and -0 equal to 0)."""
    return (a == b) | (torch.isnan(a) & torch.isnan(b))


def _first(mask, a, b, limit=5):
    """The first positions where ``mask`` holds, with a's and b's values there."""
    return ", ".join(f"{tuple(i)}: {a[tuple(i)].item()!r} vs {b[tuple(i)].item()!r}"
                     for i in mask.nonzero()[:limit].tolist())


# --- determinism ---------------------------------------------------------------------------------

def _forward_backward(fam, name, case, x):
    """{what: tensor}: y, last states, and with gradients (float32 and float64 cases, as the
    gradient tests) every floating input's gradient of a fixed random linear function of both."""
    entry = impls.get(name, fam.NAME)
    def outputs(y, s):
        return {"y": y.detach(), **{label.replace("last state", "last states"): t.detach()
                                    for label, t in state_parts(fam, s)}}

    if not (entry.supports["gradients"] and case.dtype in ("f32", "f64")):
        with torch.no_grad():
            return outputs(*fam.scan(name, case, x))
    leaves = differentiable(x)
    y, s = fam.scan(name, case, leaves)
    gen = torch.Generator().manual_seed(case.seed + 3)
    w_y = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    w_s = map_state(fam, lambda t: torch.randn(t.shape, generator=gen, dtype=torch.float64), s)
    loss = weighted_loss(fam, y, s, (w_y, w_s))
    wrt = {k: v for k, v in gradient_leaves(fam, leaves, leaves).items() if v.requires_grad}
    grads = torch.autograd.grad(loss, list(wrt.values()), allow_unused=True)
    out = outputs(y, s)
    out.update({f"grad {k}": g for k, g in zip(wrt, grads) if g is not None})
    return out


def check_determinism(fam, name, case):
    """The same call twice, and forward plus backward twice (where the implementation has
    gradients), give the same bits in every output and gradient."""
    entry, case = prepare(fam, name, case)
    if not fam.supported(entry, case):
        return
    x = fam.make_inputs(case)
    a, b = _forward_backward(fam, name, case, x), _forward_backward(fam, name, case, x)
    for what in a:
        differ = ~same(a[what], b[what])
        if differ.any():
            raise AssertionError(
                f"{name}: two identical calls gave different {what} at {int(differ.sum())} positions, "
                f"first {_first(differ, a[what], b[what])}: not deterministic\n"
                f"  reproduce: {repro(fam, name, case)}  # run twice")


# --- batch invariance ----------------------------------------------------------------------------

def _rows(fam, x, rows):
    return {k: (map_state(fam, lambda t: t[rows], v) if k == fam.STATE_ARG and v is not None
                else v[rows] if k in fam.BATCH_ARGS and v is not None else v) for k, v in x.items()}


def _grown(fam, x, other, before):
    """x's batch grown by the rows of ``other`` (after x's rows, or before them), with x's
    parameters and memory layout."""
    def grown(mine, theirs):
        v = torch.cat([theirs, mine] if before else [mine, theirs])
        if not mine.is_contiguous():  # the cases' strided form: every other element of a wider last axis
            wide = v.new_zeros(*v.shape[:-1], 2 * v.shape[-1])
            wide[..., ::2] = v
            v = wide[..., ::2]
        return v

    out = dict(x)
    for k in fam.BATCH_ARGS:
        if x[k] is not None:
            out[k] = (tuple(grown(a, b) for a, b in zip(x[k], other[k])) if isinstance(x[k], tuple)
                      else grown(x[k], other[k]))
    return out


def check_batch_invariance(fam, name, case, i):
    """Row i's output and last state are the same alone and in its batch grown by b other rows
    after it or before it: bit for bit where the implementation declares
    ``batch_invariant``, else each within the tolerance policy of the float64 loop's row i."""
    entry, case = prepare(fam, name, case)
    if not fam.supported(entry, case):
        return
    i %= case.b
    x = fam.make_inputs(case)
    other = fam.make_inputs(dataclasses.replace(case, seed=(case.seed + 5) % 2**32))
    runs = {
        "alone": (_rows(fam, x, slice(i, i + 1)), 0),
        f"with {case.b} other rows after it": (_grown(fam, x, other, before=False), i),
        f"with {case.b} other rows before it": (_grown(fam, x, other, before=True), case.b + i),
    }
    results = {}
    with torch.no_grad():
        for how, (inputs, row) in runs.items():
            y, s = fam.scan(name, case, inputs)
            results[how] = (y[row:row + 1], map_state(fam, lambda t: t[row:row + 1], s))
    where = repro(fam, name, case) + f"  # batch row {i}"
    if entry.supports["batch_invariant"]:
        (how0, (y0, s0)), *rest = results.items()
        for how, (y, s) in rest:
            pairs = [("y", y0, y)] + [(label, a, b) for (label, a), (_, b) in zip(state_parts(fam, s0),
                                                                                   state_parts(fam, s))]
            for what, a, b in pairs:
                differ = ~same(a, b)
                if differ.any():
                    raise AssertionError(
                        f"{name}: batch row {i}'s {what} {how} differs from the row {how0} at "
                        f"{int(differ.sum())} positions, first {_first(differ, a, b)} (declared batch_invariant: "
                        f"bit for bit)\n  reproduce: {where}")
        return
    ref, loop = oracle(fam, case)
    rows = slice(i, i + 1)
    for how, (y, s) in results.items():
        assert_matches_oracle(fam, f"{name}, batch row {i} {how}", case, y, s,
                              (ref[0][rows], map_state(fam, lambda t: t[rows], ref[1])),
                              (loop[0][rows], map_state(fam, lambda t: t[rows], loop[1])), where)


# --- unwritten memory ----------------------------------------------------------------------------

@contextlib.contextmanager
def fresh_memory(value=float("nan")):
    """Within the block, every floating tensor made by torch.empty, torch.empty_like,
    torch.empty_strided or Tensor.new_empty comes filled with ``value`` (on a CPU, fresh memory is
    often zero, which hides an output that is never written where the true value is about 0)."""
    originals = dict(empty=torch.empty, empty_like=torch.empty_like, empty_strided=torch.empty_strided)
    new_empty = torch.Tensor.new_empty

    def filled(make):
        @functools.wraps(make)
        def call(*args, **kwargs):
            t = make(*args, **kwargs)
            if t.is_floating_point():
                with torch.no_grad():
                    t.fill_(value)
            return t
        return call

    for k, make in originals.items():
        setattr(torch, k, filled(make))
    torch.Tensor.new_empty = filled(new_empty)
    try:
        yield
    finally:
        for k, make in originals.items():
            setattr(torch, k, make)
        torch.Tensor.new_empty = new_empty


def check_unwritten_memory(fam, name, case):
    """The call (forward, and backward where the implementation has gradients) run again with every
    fresh allocation NaN-filled: no output or gradient may be NaN there where it is not NaN in the
    ordinary run. Such a NaN is memory the implementation returned or read without writing it."""
    entry, case = prepare(fam, name, case)
    if not fam.supported(entry, case):
        return
    x = fam.make_inputs(case)
    plain = _forward_backward(fam, name, case, x)
    with fresh_memory(float("nan")):
        filled = _forward_backward(fam, name, case, x)
    for what, a in plain.items():
        unwritten = torch.isnan(filled[what]) & ~torch.isnan(a)
        if unwritten.any():
            raise AssertionError(
                f"{name}: {what} is NaN at {int(unwritten.sum())} of {a.numel()} positions only when fresh memory "
                f"is NaN-filled (never written, or read before written); first positions "
                f"{unwritten.nonzero()[:8].tolist()}\n"
                f"  reproduce (a script of two lines):\n    import equivalence.properties\n"
                f"    with equivalence.properties.fresh_memory(): {repro(fam, name, case)}")


# --- causality with non-finite perturbations -----------------------------------------------------

def check_nonfinite_causality(fam, name, case, t, poison):
    """A NaN, inf or -inf (``poison``) at token t of each time input in turn changes no output
    before t, bit for bit: every batch row, every channel."""
    entry, case = prepare(fam, name, case)
    if not fam.supported(entry, case):
        return
    x = fam.make_inputs(case)
    t = min(t, case.l - 1)
    with torch.no_grad():
        y = fam.scan(name, case, x)[0]
        for arg in fam.TIME_ARGS:
            if x[arg] is None or not x[arg].numel():  # Mamba-3's Angles at n_ang = 0: nothing to poison
                continue
            y2 = fam.scan(name, case, poisoned(fam, x, arg, t, NONFINITE[poison]))[0]
            before = y.narrow(fam.TIME_DIM, 0, t), y2.narrow(fam.TIME_DIM, 0, t)
            changed = ~same(*before)
            if changed.any():
                raise AssertionError(
                    f"{name}: {arg} = {poison} at token {t} (batch row 0) changed {int(changed.sum())} outputs "
                    f"before token {t}, first {_first(changed, *before)}: information flowed backwards in time\n"
                    f"  reproduce: {repro(fam, name, case)}  # {arg}[token {t}] = {poison}")


# The checks above with one family bound, as each family's module exports them for the tests of one
# implementation or one adapter: equivalence.selective.check_values(name, case), ...
BOUND = ("check_values", "check_split", "check_prefill_then_decode", "check_causality", "check_batch_independence",
         "check_nonfinite", "check_nan_propagation", "check_gradients", "check_chunk_size_invariance", "oracle",
         "scales")


def bound(fam):
    """{name: the function of BOUND with ``fam`` as its first argument}."""
    return {k: functools.partial(globals()[k], fam) for k in BOUND}


def property_checks(fam, name, small, k, poison):
    """{property: a call of its check} for the four properties above and partial gradients on one
    case (folded small by the caller: they need no long sequence), in the order a planted-bug search
    runs them."""
    return {
        "determinism": lambda: check_determinism(fam, name, small),
        "batch invariance": lambda: check_batch_invariance(fam, name, small, k),
        "unwritten memory": lambda: check_unwritten_memory(fam, name, small),
        "non-finite causality": lambda: check_nonfinite_causality(fam, name, small, k, poison),
        "partial gradients": lambda: check_partial_gradients(fam, name, small, *partial_gradient_pick(fam, small, k)),
    }


def every_check(fam, name, case, t, poison):
    """{property: a call of its check on one case} for every property of this module, in the order
    of its docstring, for a test that runs them all on one drawn case (a family of its own). t: a
    token and a batch row, each folded to the case; poison: a key of NONFINITE. The non-finite
    check runs once for each time argument; chunk sizes only where the family has them."""
    checks = {
        "values": lambda: check_values(fam, name, case),
        "split": lambda: check_split(fam, name, case, t),
        "prefill then decode": lambda: check_prefill_then_decode(fam, name, case, t),
        "causality": lambda: check_causality(fam, name, case, t),
        "batch independence": lambda: check_batch_independence(fam, name, case, t),
        **{f"non-finite {arg}": functools.partial(check_nonfinite, fam, name, case, arg, t, poison)
           for arg in fam.TIME_ARGS},
        "NaN propagation": lambda: check_nan_propagation(fam, name, case, t),
        "gradients": lambda: check_gradients(fam, name, case),
    }
    if fam.CHUNK_SIZES is not None:
        checks["chunk sizes"] = lambda: check_chunk_size_invariance(fam, name, case, fam.CHUNK_SIZES)
    return {**checks, **property_checks(fam, name, case, t, poison)}
