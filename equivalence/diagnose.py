"""What a failure needs, and what a plain function can do: the suite's two ways of asking an
implementation questions by re-running it, for any family (equivalence/properties.py says what a
family's module provides).

    what_it_needs(failure)         the final, shrunk failure re-run with each option off, each axis
                                   reduced: "fails only with g > 1 and d/g > 1"
    probe_capabilities(fam, scan)  a plain function's capabilities, found by tiny calls
    describe(fam, name)            one line for the pytest header
"""

import dataclasses
import importlib
import time

import torch

import impls

# What what_it_needs reads of a family's module (optional in its contract: without them a failure
# is reported undiagnosed). GROUPED_AXIS None: the family's grouping is not a case field g but
# sizes among its AXES (Mamba-3's h_qk and groups), bisected as the others are.
NEEDS = ("OPTIONS", "UNGROUPED", "GROUPED_AXIS", "AXES", "PLAIN")

# (family, name) -> {capability: how its probe call went}, for implementations registered from a plain function
PROBED = {}


def what_it_needs(failure, budget_s=120.0):
    """What a failing case needs in order to fail, found by re-running the check with each option
    off, each axis reduced, the grouping, dtype and regime made plain, one change at a time.

    failure: a properties.CaseFailure. Returns lines such as "fails only with g > 1 and d/g > 1",
    "only with initial_state", "only at l >= 65 (passes at l = 64)", and what the failure does not
    need. Axes are searched by bisection (assuming a failure at some size persists at larger ones);
    re-runs stop after budget_s.
    """
    fam, case, start = failure.family, failure.case, time.monotonic()
    grouped_axis = fam.GROUPED_AXIS
    tried = {}

    def fails(**change):
        c = dataclasses.replace(case, **change)
        if grouped_axis is not None and c.g and getattr(c, grouped_axis) % c.g:
            return True
        if c not in tried:
            if time.monotonic() - start > budget_s:
                raise TimeoutError
            try:
                failure.rerun(c)
                tried[c] = False
            except Exception:  # an AssertionError, or a crash: either way it still fails
                tried[c] = True
        return tried[c]

    def said(opt, value):
        return opt if isinstance(value, bool) else f"{opt} = {value}"

    poison = getattr(case, "poison", ())
    needs, not_needed, notes = [], [], []
    try:
        for opt, off in fam.OPTIONS.items():
            value = getattr(case, opt)
            if value != off and not (poison and poison[0] == opt):  # the poison needs its argument
                (needs if not fails(**{opt: off}) else not_needed).append(said(opt, value))
        if poison and not fails(poison=()):
            needs.append(f"the {poison[2]} in {poison[0]}")
        if grouped_axis is not None:   # None: the grouping is among AXES
            plain_g = fam.UNGROUPED[0]
            if case.g > 1:
                if not any(fails(g=u) for u in fam.UNGROUPED):
                    needs.append("g > 1")
                    if getattr(case, grouped_axis) // case.g > 1 and not fails(**{grouped_axis: case.g}):
                        needs.append(f"{grouped_axis}/g > 1")
            elif case.g != plain_g and not fails(g=plain_g):
                needs.append(f"grouped B/C (g = {case.g})")
        for k, plain in fam.PLAIN.items():
            if getattr(case, k) != plain and not fails(**{k: plain}):
                needs.append(f"{k} {getattr(case, k)} (passes in {plain})" if k == "dtype"
                             else f"the {getattr(case, k)} {k} (passes in {plain})")
        for axis in fam.AXES:
            step = case.g if axis == grouped_axis and case.g else 1
            lo, hi = 1, getattr(case, axis) // step      # hi fails; find the smallest multiple that does
            if hi == 1:
                continue
            if fails(**{axis: step}):
                notes.append(f"{axis} = {step}")
                continue
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if fails(**{axis: mid * step}) else (mid, hi)
            needs.append(f"{axis} >= {hi * step} (passes at {axis} = {lo * step})")
    except TimeoutError:
        stopped = f"(re-runs stopped after {budget_s:.0f} s: what is listed was found before that)"
    else:
        stopped = None
    kept = ", ".join(f"{axis} = {getattr(case, axis)}" for axis in getattr(fam, "UNREDUCED", ()))
    lines = ["fails only with " + " and ".join(needs) if needs else "fails with every option off and every axis at its smallest"
             + (f" (not reduced: {kept})" if kept else "")]
    if not_needed:
        lines.append("still fails without " + ", ".join(not_needed))
    if notes:
        lines.append("still fails at " + ", ".join(notes))
    return lines + ([stopped] if stopped else [])


def tensors(value):
    """The tensors in a value: itself, or those of a (nested) tuple or list, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors(v)]
    return []


def leaf(value):
    """A floating tensor as a fresh leaf requiring grad, and each of a tuple's (a state of parts);
    anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.detach().requires_grad_() if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(leaf(v) for v in value)
    return value


def probe_capabilities(fam, scan, step=None):
    """What a plain scan function of family ``fam`` can do, found by tiny calls rather than assumed.

    scan: a function with the signature of the family's public scan (without ``impl``), called
    positionally as the registry calls it; step: its step function, if it has one. Calls: each
    input dtype; each of fam.PROBES (grouped B/C, initial states, ...) on its own; a backward pass
    to every input; and, for a family with packed sequences (fam.PACKING), a tiny packed call, and
    with a step a batch-indexed step (probe_packed). The base capability (float32, fam.TINY) is
    required, never probed away. Any other capability is a gap only when its call is refused: it
    raises NotImplementedError, the interface's way to refuse, or the function does not take the
    call's arguments (a scan without a ``cu_seqlens`` parameter: refused_by_signature); for
    gradients, also when the output has no autograd graph (nothing to differentiate) or torch
    refuses the function's out= ops on inputs that require grad (a step written for decoding, run
    token by token as the scan of a step plugged in alone). Any other
    exception, a TypeError inside the function included, means "supported but broken": the
    capability stays on, so the tests run and fail with the kernel's own error instead of passing
    on a refusal the kernel never made. What a call returns is not judged here (that is the tests' job).
    Returns (capabilities for impls.register, {capability: "ok", "gap: <exception>" or
    "broken: <exception>"}).
    """
    def attempt(case, grad=False):
        args = fam.positional(fam.make_inputs(case))
        if not grad:
            with torch.no_grad():
                return outcome(lambda: scan(*args))
        args = [leaf(a) for a in args]

        def backward():
            # whatever the family returns (y and a state; Mamba-3's out and four states): every tensor
            try:
                results = scan(*args)
            except RuntimeError as e:   # torch refusing an out= op on inputs that require grad
                if "don't support automatic differentiation" not in str(e):
                    raise
                raise NotImplementedError(f"not differentiable (an out= op under autograd: {e})") from e
            outs = [t for t in tensors(results) if t.requires_grad]
            if not outs:
                raise NotImplementedError("output has no autograd graph (not differentiable)")
            torch.autograd.grad(sum(t.double().sum() for t in outs), [a for a in tensors(args) if a.requires_grad],
                                allow_unused=True)
        return outcome(backward)

    notes = {f"dtype {k}": attempt(dataclasses.replace(fam.TINY, dtype=k)) for k in fam.DTYPES}
    notes.update({k: attempt(case) for k, case in fam.PROBES.items()})
    notes["gradients"] = attempt(fam.TINY, grad=True)
    if getattr(fam, "PACKING", None) is not None:
        notes.update(probe_packed(fam, scan, step))
    if notes["dtype f32"].startswith("gap"):  # the base call is required: its refusal is a failure too
        notes["dtype f32"] = BASE_REFUSED + notes["dtype f32"][len("gap: "):]
    on = {k: not v.startswith("gap") for k, v in notes.items()}
    supports = dict(dtypes=tuple(v for k, v in fam.DTYPES.items() if on[f"dtype {k}"]),
                    **{k: on[k] for k in notes if not k.startswith("dtype ")})
    return supports, notes


BASE_REFUSED = "broken (the base call is required): "


def base_call_refused_by_signature(notes):
    """The TypeError of probe_capabilities' base call when the function refused it by its signature
    (it does not take the family's arguments: a kernel of another family?), else None. A refusal
    by signature is the only TypeError a refused call is noted with (outcome)."""
    note = notes["dtype f32"]
    return note[len(BASE_REFUSED):] if note.startswith(BASE_REFUSED + "TypeError") else None


def refused_by_signature(e):
    """Whether exception ``e`` is a function refusing the arguments it was called with: a TypeError
    raised where the suite called it (the innermost frame is the suite's: the function never ran),
    such as "got an unexpected keyword argument 'cu_seqlens'". Inside the function, it is a bug."""
    if not isinstance(e, TypeError) or "argument" not in str(e) or e.__traceback__ is None:
        return False
    tb = e.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_globals.get("__name__", "").split(".")[0] in ("impls", "equivalence")


def outcome(call):
    """"ok", "gap: <exception>" (refused: NotImplementedError, or arguments the function does not
    take) or "broken: <exception>" (any other exception: a bug in a supported path) of call()."""
    def said(e):
        return f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"

    try:
        call()
        return "ok"
    except NotImplementedError as e:  # the interface's refusal: a declared gap
        return "gap: " + said(e)
    except Exception as e:  # anything else is a bug in a supported path (the tests show it), unless never called
        return ("gap: " if refused_by_signature(e) else "broken: ") + said(e)


PROBE_NAME = "probe: packed sequences"


def probe_packed(fam, scan, step):
    """A plain function's packed-sequence capabilities: ``varlen``, from one call of two packed
    sequences (fam.TINY's options: no initial states) through the family's public scan, and with a
    step ``state_batch_indices``, from one batch-indexed step of two rows into a cache of two slots
    through its public step. Both are made under a registration that declares them, removed after.
    Returns {capability: outcome}."""
    P = fam.PACKING
    packed_type = type(P.pinned[0])
    fields = {f.name for f in dataclasses.fields(packed_type)} - {"lengths"}
    case = packed_type(lengths=(2, fam.TINY.l - 2), **{k: getattr(fam.TINY, k) for k in fields if hasattr(fam.TINY, k)})
    x = P.inputs(case)
    impls.register(PROBE_NAME, scan, step=step, family=fam.NAME, varlen=True, state_batch_indices=step is not None)
    try:
        notes = {"varlen": outcome(lambda: P.scan(PROBE_NAME, x))}
        if step is not None:   # a cache of the loop's packed states' shapes (each part's, where they have parts)
            cache = P.map(lambda s: torch.zeros(2, *s.shape[1:], dtype=s.dtype), P.scan("loop", x)[1])
            tokens = {k: None if x[k] is None else P.token(x[k], [0, 1], k) for k in P.step_args}
            notes["state_batch_indices"] = outcome(
                lambda: P.step(PROBE_NAME, cache, x, tokens, torch.tensor([1, 0], dtype=torch.int32)))
    finally:
        impls.unregister(PROBE_NAME, fam.NAME)
    return notes


def version(package):
    """The installed version of the distribution that provides ``package`` (a top-level import name)."""
    from importlib import metadata

    for dist in metadata.packages_distributions().get(package, ()):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            pass
    return f"{package} (version unknown)"


def describe(fam, name):
    """One line for the pytest header: name, module, the distribution and version it comes from (and,
    for an adapter, those of the package it wraps: its module's WRAPS), step, declared capabilities."""
    e = impls.get(name, fam.NAME)
    caps = {k: ([str(t).replace("torch.", "") for t in v] if k == "dtypes" else v) for k, v in e.supports.items()}
    line = f"{name}: {e.module} ({version(e.module.split('.')[0])}"
    try:
        wraps = getattr(importlib.import_module(e.module), "WRAPS", None)
    except ImportError:
        wraps = None
    line += f", wrapping {version(wraps)}" if wraps else ""
    line += f"), step={'yes' if e.step else 'no'}, supports {caps}"
    probed = PROBED.get((fam.NAME, name))
    if probed:
        gaps = {k: v[len("gap: "):] for k, v in probed.items() if v.startswith("gap")}
        broken = {k: v[len("broken"):].lstrip(": ") for k, v in probed.items() if v.startswith("broken")}
        line += (" (probed by tiny calls" + (f"; refused: {gaps}" if gaps else "")
                 + (f"; raised, so tested and expected to fail: {broken}" if broken else "") + ")")
    return line
