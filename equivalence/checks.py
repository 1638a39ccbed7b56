"""The properties every implementation must have, as plain functions of (implementation, case).

Each check raises AssertionError (with a snippet that reproduces the case) or returns quietly.
The tests draw cases with hypothesis and call these; test_planted_bugs.py asks hypothesis to find
a case on which each planted bug fails one of them.
"""

import dataclasses
import functools
import time

import torch
import torch.nn.functional as F

import impls
from impls.frontdoor import per_channel

from .cases import SCAN_ARGS, make_inputs, reference_inputs
from .tolerance import GATE_ULPS, assert_close, conditioning, dt_ulps, gradient_conditioning, terms

TIME_ARGS = ("u", "delta", "z", "B", "C")   # the arguments with a time axis (last)
BATCH_ARGS = TIME_ARGS + ("initial_state",)


def prepare(name, case):
    """The implementation's entry and the case folded into its size limits."""
    entry = impls.get(name)
    return entry, case.within(entry.supports["case_limits"])


def supported(entry, case):
    s = entry.supports
    return case.torch_dtype in s["dtypes"] and (s["grouped"] or not case.g) and (s["initial_state"] or not case.initial_state)


# name -> Python statements that register it in a plain script, for implementations that a plain
# ``import impls`` does not register (``--impl mod:fn``, ``--impl-step``, a module registering on
# import): filled by conftest.py, read by repro().
SETUP = {}


def repro(name, case, call="selective_scan"):
    """One line that reproduces the call in a plain Python script (python -c "..."), whatever
    registered ``name``: the imports and registration it needs, then the call on the case's inputs."""
    setup = SETUP.get(name, "")
    return (f"import impls, equivalence.cases; {setup + '; ' if setup else ''}"
            f"out = impls.{call}(**equivalence.cases.make_inputs(equivalence.cases.{case!r}), "
            f"return_last_state=True, impl={name!r})")


class CaseFailure(AssertionError):
    """A property check failed on a case. Carries what is needed to re-run the check on other cases
    (conftest.py does so once, for the final, shrunk failure, to say what the bug needs)."""

    def __init__(self, message, name, case, rerun):
        super().__init__(message)
        self.name, self.case, self.rerun = name, case, rerun


def _case_check(check):
    """Decorate a check(name, case, *extra): its AssertionError becomes a CaseFailure that can re-run it."""

    @functools.wraps(check)
    def wrapper(name, case, *extra):
        case = case.within(impls.get(name).supports["case_limits"])  # what it runs on is what it reports
        try:
            return check(name, case, *extra)
        except CaseFailure:
            raise
        except AssertionError as e:
            raise CaseFailure(str(e), name, case, lambda c: check(name, c, *extra)) from None

    return wrapper


OPTIONS = ("D", "z", "delta_bias", "softplus", "initial_state", "strided")


def what_it_needs(failure, budget_s=120.0):
    """What a failing case needs in order to fail, found by re-running the check with each option
    off, each axis reduced, the grouping, dtype and regime made plain, one change at a time.

    Returns lines such as "fails only with g > 1 and d/g > 1", "only with initial_state",
    "only at l >= 65 (passes at l = 64)", and what the failure does not need. Axes are searched by
    bisection (assuming a failure at some size persists at larger ones); re-runs stop after budget_s.
    """
    case, start = failure.case, time.monotonic()
    tried = {}

    def fails(**change):
        c = dataclasses.replace(case, **change)
        if c.g and c.d % c.g:
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

    needs, not_needed, notes = [], [], []
    try:
        for opt in OPTIONS:
            if getattr(case, opt) and not (case.poison and case.poison[0] == opt):  # the poison needs its argument
                (needs if not fails(**{opt: False}) else not_needed).append(opt)
        if case.poison:
            arg, _, value = case.poison
            if not fails(poison=()):
                needs.append(f"the {value} in {arg}")
        if case.g > 1:
            if not fails(g=0) and not fails(g=1):
                needs.append("g > 1")
                if case.d // case.g > 1 and not fails(d=case.g):
                    needs.append("d/g > 1")
        elif case.g == 1 and not fails(g=0):
            needs.append("grouped B/C (g = 1)")
        if case.dtype != "f32" and not fails(dtype="f32"):
            needs.append(f"dtype {case.dtype} (passes in f32)")
        if case.regime != "mamba" and not fails(regime="mamba"):
            needs.append(f"the {case.regime} regime (passes in mamba)")
        for axis in ("b", "d", "n", "l"):
            step = case.g if axis == "d" and case.g else 1
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
    lines = ["fails only with " + " and ".join(needs) if needs else "fails with every option off and every axis at its smallest"]
    if not_needed:
        lines.append("still fails without " + ", ".join(not_needed))
    if notes:
        lines.append("still fails at " + ", ".join(notes))
    return lines + ([stopped] if stopped else [])


def oracle(case):
    """(float64 oracle, loop in the case's dtype), each (y, last_state)."""
    ref = impls.selective_scan(**reference_inputs(case), return_last_state=True, impl="loop")
    same = impls.selective_scan(**make_inputs(case), return_last_state=True, impl="loop")
    return ref, same


def magnitudes(case, weights=None):
    """Sums of |terms|: the scale a sound rounding error is relative to where the oracle's sums
    cancel (equivalence/tolerance.py).

    The scan's recursion in float64 with every term made non-negative: h_t = Ā_t h_{t-1} + |dt_t B_t u_t|
    from |initial_state| (the decays Ā = exp(dt A) are positive already), y_t = <|C_t|, h_t> + |D u_t|,
    times |silu(z_t)|: each element of (y, last_state) is the sum of the |terms| that the oracle's
    element sums. Written out here rather than run through the loop because the gradients need its
    states and adjoints, not only its outputs.

    weights: the (b, d, l) and (b, d, n) weights of the loss sum(w_y y) + sum(w_s last_state) whose
    gradients the check compares; with them, also {argument: sum of |summands| of its gradient},
    from this run's adjoint lambda (with |weights|): u, B, C, D, initial_state, z by autograd (the
    outputs are linear in each, with non-negative coefficients); A and delta from each step's decay
    term Ā_t lambda_t h_{t-1} (>= 0) by the chain rule, with |A| and |dt| so that no sign cancels;
    delta_bias the sum over b and l of delta's. Returns (y, last_state, that dict or None).
    """
    x = reference_inputs(case)
    d = x["u"].shape[1]
    raw = x["delta"] if x["delta_bias"] is None else x["delta"] + x["delta_bias"][:, None]
    dt = F.softplus(raw) if x["delta_softplus"] else raw                         # (b, d, l)

    def time_last(X):  # B, C (b, n, l) or (b, g, n, l) -> (b, d or 1, l, n)
        return (per_channel(X, d) if X.dim() == 4 else X[:, None]).transpose(-1, -2)

    leaves = {k: x[k].abs().requires_grad_(weights is not None)
              for k in ("u", "B", "C", "D", "initial_state") if x[k] is not None}
    if x["z"] is not None:
        leaves["z"] = x["z"].clone().requires_grad_(weights is not None)
    decay = torch.exp(dt[..., None] * x["A"][:, None, :])                         # (b, d, l, n)
    B = time_last(leaves["B"])
    X = (dt.abs() * leaves["u"])[..., None] * B                                  # |dt B u|
    h = h0 = leaves.get("initial_state", torch.zeros_like(decay[:, :, 0]))
    states = []
    for t in range(decay.shape[2]):
        h = decay[:, :, t] * h + X[:, :, t]
        states.append(h)
    H = torch.stack(states, 2)                                                    # (b, d, l, n)
    y = (H * time_last(leaves["C"])).sum(-1)
    if "D" in leaves:
        y = y + leaves["D"][:, None] * leaves["u"]
    if "z" in leaves:
        y = y * F.silu(leaves["z"]).abs()
    last = H[:, :, -1]
    if weights is None:
        return y, last, None

    loss = (y * weights[0].abs()).sum() + (last * weights[1].abs()).sum()
    grads = torch.autograd.grad(loss, [X, *leaves.values()])
    lam = grads[0]                                                                # dL/dh_t (b, d, l, n)
    sums = {k: g.abs() for k, g in zip(leaves, grads[1:])}
    previous = torch.cat([h0[:, :, None], H[:, :, :-1]], 2)                      # h_{t-1}
    decay_terms = (decay * lam * previous).detach()                               # Ā_t lambda_t h_{t-1}
    sums["A"] = (dt.abs()[..., None] * decay_terms).sum((0, 2))
    # softplus' derivative, exactly 1 above its threshold (20) where softplus is the identity
    dsoftplus = torch.where(raw > 20, 1.0, torch.sigmoid(raw)) if x["delta_softplus"] else 1.0
    sums["delta"] = dsoftplus * ((x["A"].abs()[:, None, :] * decay_terms).sum(-1)
                                 + (lam.detach() * B.detach()).sum(-1) * leaves["u"].detach())
    if x["delta_bias"] is not None:
        sums["delta_bias"] = sums["delta"].sum((0, 2))
    return y.detach(), last.detach(), sums


def conditionings(case):
    """Ulps a rounding can grow to (equivalence/tolerance.py: conditioning) for each element of
    y (b, d, l) and last_state (b, d, n), and for every gradient element (a number: the whole
    sequence's, forwards and through the adjoint)."""
    x = reference_inputs(case)
    raw = x["delta"] if x["delta_bias"] is None else x["delta"] + x["delta_bias"][:, None]
    dt = F.softplus(raw) if x["delta_softplus"] else raw                          # (b, d, l)
    dt_rel = dt_ulps(raw, x["delta_softplus"], x["delta_bias"] is not None)[..., None]
    cum = conditioning(dt[..., None] * x["A"][:, None, :], dt_rel, 2)             # (b, d, l, n)
    gate = GATE_ULPS if x["z"] is not None else 0
    last = cum[:, :, -1]
    return cum.amax(-1) + gate, last, gradient_conditioning(last, x["z"] is not None)


def _finite_max(t):
    t = t.detach()
    t = t[torch.isfinite(t)]
    return float(t.max()) if t.numel() else None


def scales(case):
    """What the policy's floor is relative to for (y, last_state): the largest sum of |terms|."""
    return tuple(_finite_max(t) for t in magnitudes(case)[:2])


def infinite_decay(case):
    """Whether the case's poison makes a step's dt -inf, so its decay exp(dt A) is +inf (A < 0)."""
    return bool(case.poison) and case.poison[0] in ("delta", "delta_bias") and case.poison[2] == "-inf" and not case.softplus


def assert_matches_oracle(what, case, y, state, ref, same, where):
    sy, ss, _ = magnitudes(case)
    ky, ks, _ = conditionings(case)
    kinds = not infinite_decay(case)  # which non-finite value an infinite decay gives is order-dependent
    assert_close(f"{what}: y", y, ref[0], same[0], terms("y", case.l, case.n), where, scale=sy, exact_kinds=kinds,
                 conditioning=ky)
    assert_close(f"{what}: last_state", state, ref[1], same[1], terms("last_state", case.l, case.n), where,
                 scale=ss, exact_kinds=kinds, conditioning=ks)


def time_slice(inputs, start, stop):
    return {k: (v[..., start:stop] if k in TIME_ARGS and v is not None else v) for k, v in inputs.items()}


@_case_check
def check_values(name, case):
    """Values and last_state against the float64 loop; an undeclared capability must be refused."""
    entry, case = prepare(name, case)
    x = make_inputs(case)
    if not supported(entry, case):
        try:
            impls.selective_scan(**x, impl=name)
        except NotImplementedError:
            return
        raise AssertionError(f"{name} ran a case it declares unsupported: {case.id}")
    y, state = impls.selective_scan(**x, return_last_state=True, impl=name)
    ref, same = oracle(case)
    assert_matches_oracle(name, case, y, state, ref, same, repro(name, case))


@_case_check
def check_split(name, case, k):
    """Scan the first k tokens, continue from last_state: the same as one scan of everything."""
    entry, case = prepare(name, case)
    if not supported(entry, case) or not entry.supports["initial_state"]:
        return
    k = min(k, case.l)
    x = make_inputs(case)
    y1, s1 = impls.selective_scan(**time_slice(x, 0, k), return_last_state=True, impl=name)
    y2, s2 = impls.selective_scan(**{**time_slice(x, k, None), "initial_state": s1}, return_last_state=True, impl=name)
    ref, same = oracle(case)
    assert_matches_oracle(f"{name}, split at {k}", case, torch.cat([y1, y2], -1), s2, ref, same,
                          repro(name, case) + f"  # split at k={k}")


@_case_check
def check_prefill_then_decode(name, case, k):
    """Prefill k tokens with the scan, then one step per token: the generation path of a model."""
    entry, case = prepare(name, case)
    if entry.step is None or not supported(entry, case):
        return
    k = min(k, case.l)
    x = make_inputs(case)
    if k:
        y_pre, state = impls.selective_scan(**time_slice(x, 0, k), return_last_state=True, impl=name)
    else:
        y_pre = x["u"][..., :0]
        state = (x["initial_state"].clone() if x["initial_state"] is not None
                 else torch.zeros(case.b, case.d, case.n, dtype=x["A"].dtype))
    ys = [y_pre]
    for t in range(k, case.l):
        ys.append(impls.selective_state_update(
            state, x["u"][..., t], x["delta"][..., t], x["A"], x["B"][..., t], x["C"][..., t], x["D"],
            None if x["z"] is None else x["z"][..., t], x["delta_bias"], x["delta_softplus"], impl=name)[..., None])
    ref, same = oracle(case)
    assert_matches_oracle(f"{name}, prefill {k} then step", case, torch.cat(ys, -1), state, ref, same,
                          repro(name, case) + f"  # prefill k={k}, then selective_state_update per token")


def _perturbed(x, keys, index, gen):
    """A copy of the inputs with fresh random values at ``index`` of each argument in ``keys``."""
    out = dict(x)
    for k in keys:
        if x[k] is not None:
            # same strides as the original: elementwise kernels may round differently on another
            # layout (vectorised vs scalar exp), and the comparison below is bit for bit
            v = torch.empty_strided(x[k].shape, x[k].stride(), dtype=x[k].dtype).copy_(x[k])
            v[index] = torch.randn(v[index].shape, generator=gen, dtype=torch.float64).to(v.dtype)
            out[k] = v
    return out


@_case_check
def check_causality(name, case, t):
    """Changing token t changes no output before t (bit for bit) and does change the output from t on."""
    entry, case = prepare(name, case)
    if not supported(entry, case):
        return
    t = min(t, case.l - 1)
    x = make_inputs(case)
    gen = torch.Generator().manual_seed(case.seed + 1)
    x2 = _perturbed(x, TIME_ARGS, (Ellipsis, t), gen)
    y = impls.selective_scan(**x, impl=name)
    y2 = impls.selective_scan(**x2, impl=name)
    where = repro(name, case) + f"  # token {t} perturbed"
    changed = ~_same(y[..., :t], y2[..., :t])
    if changed.any():
        bi, c, s = (changed.nonzero()[0]).tolist()
        raise AssertionError(f"{name}: output t={s} (batch row {bi}, channel {c}) changed by input t={t}: information "
                             f"flowed backwards in time ({y[bi, c, s].item()!r} became {y2[bi, c, s].item()!r}; "
                             f"inputs u, delta, z, B, C changed at token {t} only)\n  reproduce: {where}")
    if _same(y[..., t:], y2[..., t:]).all():
        raise AssertionError(f"{name}: changing input t={t} changed no output at all (outputs t >= {t} should depend on it)"
                             f"\n  reproduce: {where}")


def _same(a, b):
    """Elementwise: bit-for-bit equal values, NaN equal to NaN."""
    return (a == b) | (torch.isnan(a) & torch.isnan(b))


@_case_check
def check_batch_independence(name, case, j):
    """Changing batch row j changes no other row (bit for bit)."""
    entry, case = prepare(name, case)
    if not supported(entry, case) or case.b < 2:
        return
    j = j % case.b
    x = make_inputs(case)
    gen = torch.Generator().manual_seed(case.seed + 2)
    x2 = _perturbed(x, BATCH_ARGS, (j,), gen)
    y, s = impls.selective_scan(**x, return_last_state=True, impl=name)
    y2, s2 = impls.selective_scan(**x2, return_last_state=True, impl=name)
    for i in range(case.b):
        if i != j and not (_same(y[i], y2[i]).all() and _same(s[i], s2[i]).all()):
            raise AssertionError(f"{name}: changing input batch row {j} changed output batch row {i}"
                                 f"\n  reproduce: {repro(name, case)}  # batch row {j} perturbed")


@_case_check
def check_nan_propagation(name, case, t):
    """A NaN in u at (0, 0, t) makes y[0, 0, t:] NaN and leaves everything else as it was."""
    entry, case = prepare(name, case)
    if not supported(entry, case):
        return
    t = min(t, case.l - 1)
    x = make_inputs(case)
    u = x["u"].clone()
    u[0, 0, t] = float("nan")
    y = impls.selective_scan(**{**x, "u": u}, impl=name)
    y_clean = impls.selective_scan(**x, impl=name)
    where = repro(name, case) + f"  # u[0, 0, {t}] = nan"
    missed = ~torch.isnan(y[0, 0, t:])
    if missed.any():
        s = t + int(missed.nonzero()[0])
        raise AssertionError(f"{name}: the NaN in input u at (batch row 0, channel 0, t={t}) did not reach output t={s} "
                             f"of its channel, which is {y[0, 0, s].item()!r}\n  reproduce: {where}")
    outside = ~_same(y, y_clean)
    outside[0, 0, t:] = False
    if outside.any():
        bi, c, s = outside.nonzero()[0].tolist()
        flow = ("information flowed backwards in time" if (bi, c) == (0, 0)
                else "it leaked into another batch row" if bi != 0 else "it leaked into another channel")
        raise AssertionError(f"{name}: output (batch row {bi}, channel {c}, t={s}) changed, to {y[bi, c, s].item()!r}, "
                             f"by the NaN in input u at (batch row 0, channel 0, t={t}): {flow}\n  reproduce: {where}")


def _gradients(name, x, weights):
    leaves = {k: (v.detach().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
    y, s = impls.selective_scan(**leaves, return_last_state=True, impl=name)
    loss = (y.double() * weights[0]).sum() + (s.double() * weights[1]).sum()
    wrt = [k for k in SCAN_ARGS if isinstance(leaves[k], torch.Tensor)]
    return dict(zip(wrt, torch.autograd.grad(loss, [leaves[k] for k in wrt])))


@_case_check
def check_gradients(name, case):
    """Gradients of a random linear function of (y, last_state) for every tensor input,
    against float64 autograd through the loop, under the same tolerance policy."""
    entry, case = prepare(name, case)
    if not entry.supports["gradients"] or not supported(entry, case):
        return
    gen = torch.Generator().manual_seed(case.seed + 3)
    weights = (torch.randn(case.b, case.d, case.l, generator=gen, dtype=torch.float64),
               torch.randn(case.b, case.d, case.n, generator=gen, dtype=torch.float64))
    got = _gradients(name, make_inputs(case), weights)
    ref = _gradients("loop", reference_inputs(case), weights)
    same = _gradients("loop", make_inputs(case), weights)
    # the most terms any gradient element accumulates: over batch, time and channels or states
    terms = case.b * case.l * (case.d // max(case.g, 1) + case.n)
    # Sums under cancellation have their floor relative to their summands (equivalence/tolerance.py)
    sums = magnitudes(case, weights)[2]
    grad_conditioning = conditionings(case)[2]
    for k in got:
        assert_close(f"{name}: grad {k}", got[k], ref[k], same[k], terms, repro(name, case) + f"  # gradient of {k}",
                     scale=sums[k], conditioning=grad_conditioning)


# name -> {capability: how its probe call went}, for implementations registered from a plain function
PROBED = {}


def probe_capabilities(scan):
    """What a plain scan function can do, found by tiny calls rather than assumed.

    scan: a function with the selective_scan signature (without ``impl``), called positionally as
    the registry calls it. Calls: each input dtype; grouped B/C (d = 4, g = 2); initial_state; and a
    backward pass to every input. The base capability (float32, ungrouped, no initial_state, no
    gradients) is required, never probed away. Any other capability is a gap only when its call
    raises NotImplementedError, the interface's way to refuse (or, for gradients, when the output
    has no autograd graph: nothing to differentiate). Any other exception, a TypeError included,
    means "supported but broken": the capability stays on, so the tests run and fail with the
    kernel's own error instead of passing on a refusal the kernel never made.
    What a call returns is not judged here (that is the tests' job).
    Returns (capabilities for impls.register, {capability: "ok", "gap: <exception>" or
    "broken: <exception>"}).
    """
    from .cases import DTYPES, Case

    tiny = Case(b=1, d=2, n=2, l=3)

    def said(e):
        return f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"

    def attempt(case, grad=False):
        x = make_inputs(case)
        args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
        args += [x["delta_softplus"], x["initial_state"], True]
        try:
            if grad:
                args = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
                y, s = scan(*args)
                if not (y.requires_grad or s.requires_grad):
                    return "gap: output has no autograd graph (not differentiable)"
                leaves = [a for a in args if isinstance(a, torch.Tensor)]
                torch.autograd.grad((y.double().sum() + s.double().sum()), leaves, allow_unused=True)
            else:
                with torch.no_grad():
                    scan(*args)
            return "ok"
        except NotImplementedError as e:  # the interface's refusal: a declared gap
            return "gap: " + said(e)
        except Exception as e:  # anything else is a bug in a supported path: the tests show it
            return "broken: " + said(e)

    notes = {f"dtype {k}": attempt(dataclasses.replace(tiny, dtype=k)) for k in DTYPES}
    notes["grouped"] = attempt(Case(b=1, d=4, n=2, l=3, g=2))
    notes["initial_state"] = attempt(dataclasses.replace(tiny, initial_state=True))
    notes["gradients"] = attempt(tiny, grad=True)
    if notes["dtype f32"].startswith("gap"):  # the base call is required: its refusal is a failure too
        notes["dtype f32"] = "broken (the base call is required): " + notes["dtype f32"][len("gap: "):]
    on = {k: not v.startswith("gap") for k, v in notes.items()}
    supports = dict(dtypes=tuple(v for k, v in DTYPES.items() if on[f"dtype {k}"]),
                    grouped=on["grouped"], initial_state=on["initial_state"], gradients=on["gradients"])
    return supports, notes


def _version(package):
    """The installed version of the distribution that provides ``package`` (a top-level import name)."""
    from importlib import metadata

    for dist in metadata.packages_distributions().get(package, ()):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            pass
    return f"{package} (version unknown)"


def describe(name):
    """One line for the pytest header: name, module, the distribution and version it comes from (and,
    for an adapter, those of the package it wraps: its module's WRAPS), step, declared capabilities."""
    import importlib

    e = impls.get(name)
    caps = {k: ([str(t).replace("torch.", "") for t in v] if k == "dtypes" else v) for k, v in e.supports.items()}
    version = _version(e.module.split(".")[0])
    try:
        wraps = getattr(importlib.import_module(e.module), "WRAPS", None)
    except ImportError:
        wraps = None
    if wraps:
        version += f", wrapping {_version(wraps)}"
    line = f"{name}: {e.module} ({version}), step={'yes' if e.step else 'no'}, supports {caps}"
    if name in PROBED:
        gaps = {k: v[len("gap: "):] for k, v in PROBED[name].items() if v.startswith("gap")}
        broken = {k: v[len("broken"):].lstrip(": ") for k, v in PROBED[name].items() if v.startswith("broken")}
        line += (" (probed by tiny calls" + (f"; refused (NotImplementedError): {gaps}" if gaps else "")
                 + (f"; raised, so tested and expected to fail: {broken}" if broken else "") + ")")
    return line


