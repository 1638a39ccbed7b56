"""The properties every implementation must have, as plain functions of (implementation, case).

Each check raises AssertionError (with a snippet that reproduces the case) or returns quietly.
The tests draw cases with hypothesis and call these; test_planted_bugs.py asks hypothesis to find
a case on which each planted bug fails one of them.
"""

import torch
import torch.nn.functional as F

import impls
from impls.frontdoor import per_channel

from .cases import SCAN_ARGS, make_inputs, reference_inputs
from .tolerance import assert_close, terms

TIME_ARGS = ("u", "delta", "z", "B", "C")   # the arguments with a time axis (last)
BATCH_ARGS = TIME_ARGS + ("initial_state",)


def prepare(name, case):
    """The implementation's entry and the case folded into its size limits."""
    entry = impls.get(name)
    return entry, case.within(entry.supports["case_limits"])


def supported(entry, case):
    s = entry.supports
    return case.torch_dtype in s["dtypes"] and (s["grouped"] or not case.g) and (s["initial_state"] or not case.initial_state)


def repro(name, case, call="selective_scan"):
    return (f"impls.{call}(**equivalence.cases.make_inputs(equivalence.cases.{case!r}), "
            f"return_last_state=True, impl={name!r})")


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
    dsoftplus = torch.sigmoid(raw) if x["delta_softplus"] else 1.0
    sums["delta"] = dsoftplus * ((x["A"].abs()[:, None, :] * decay_terms).sum(-1)
                                 + (lam.detach() * B.detach()).sum(-1) * leaves["u"].detach())
    if x["delta_bias"] is not None:
        sums["delta_bias"] = sums["delta"].sum((0, 2))
    return y.detach(), last.detach(), sums


def _finite_max(t):
    t = t.detach()
    t = t[torch.isfinite(t)]
    return float(t.max()) if t.numel() else None


def scales(case):
    """What the policy's floor is relative to for (y, last_state): the largest sum of |terms|."""
    return tuple(_finite_max(t) for t in magnitudes(case)[:2])


def assert_matches_oracle(what, case, y, state, ref, same, where):
    sy, ss = scales(case)
    assert_close(f"{what}: y", y, ref[0], same[0], terms("y", case.l, case.n), where, scale=sy)
    assert_close(f"{what}: last_state", state, ref[1], same[1], terms("last_state", case.l, case.n), where, scale=ss)


def time_slice(inputs, start, stop):
    return {k: (v[..., start:stop] if k in TIME_ARGS and v is not None else v) for k, v in inputs.items()}


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
    if not torch.equal(y[..., :t], y2[..., :t]):
        bad = (y[..., :t] != y2[..., :t]).nonzero()[0].tolist()
        raise AssertionError(f"{name}: changing token {t} changed the output at {bad}, before it\n  reproduce: {where}")
    if torch.equal(y[..., t:], y2[..., t:]):
        raise AssertionError(f"{name}: changing token {t} changed no output at all\n  reproduce: {where}")


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
    others = [i for i in range(case.b) if i != j]
    if not (torch.equal(y[others], y2[others]) and torch.equal(s[others], s2[others])):
        raise AssertionError(f"{name}: changing batch row {j} changed other rows\n  reproduce: {repro(name, case)}")


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
    if not torch.isnan(y[0, 0, t:]).all():
        raise AssertionError(f"{name}: a NaN input at token {t} did not reach every later output of its channel\n  reproduce: {where}")
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[0, 0, t:] = False
    if not torch.equal(y[mask], y_clean[mask]):
        raise AssertionError(f"{name}: a NaN input at (0, 0, {t}) changed outputs outside its channel's future\n  reproduce: {where}")


def _gradients(name, x, weights):
    leaves = {k: (v.detach().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
    y, s = impls.selective_scan(**leaves, return_last_state=True, impl=name)
    loss = (y.double() * weights[0]).sum() + (s.double() * weights[1]).sum()
    wrt = [k for k in SCAN_ARGS if isinstance(leaves[k], torch.Tensor)]
    return dict(zip(wrt, torch.autograd.grad(loss, [leaves[k] for k in wrt])))


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
    for k in got:
        assert_close(f"{name}: grad {k}", got[k], ref[k], same[k], terms, repro(name, case) + f"  # gradient of {k}",
                     scale=_finite_max(sums[k]))


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
    return f"{name}: {e.module} ({version}), step={'yes' if e.step else 'no'}, supports {caps}"


