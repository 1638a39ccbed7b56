"""The properties every SSD implementation must have, as plain functions of (implementation, case).

Each check raises AssertionError (with a snippet that reproduces the case) or returns quietly. The
tests draw cases with hypothesis (equivalence/ssd_cases.py) and call these; the oracle is the SSD
loop (impls/ssd/loop.py) run in float64, and every comparison goes through the tolerance policy
(equivalence/tolerance.py).
"""

import torch
import torch.nn.functional as F

import impls
from impls.ssd.loop import effective_dt, per_head

from .checks import _perturbed
from .ssd_cases import SCAN_ARGS, TIME_ARGS, make_inputs, reference_inputs
from .tolerance import GATE_ULPS, assert_close, conditioning, dt_ulps, gradient_conditioning, ssd_terms

BATCH_ARGS = TIME_ARGS + ("initial_states",)


def prepare(name, case):
    """The implementation's SSD entry and the case folded into its size limits."""
    entry = impls.get(name, family="ssd")
    return entry, case.within(entry.supports["case_limits"])


def supported(entry, case):
    s = entry.supports
    return (case.torch_dtype in s["dtypes"] and (s["grouped"] or case.g == 1)
            and (s["initial_states"] or not case.initial_states) and (s["D_hp"] or case.D != "hp")
            and (s["dt_limit"] or case.dt_limit == "default"))


def repro(name, case, call="ssd_scan"):
    return (f"impls.{call}(**equivalence.ssd_cases.make_inputs(equivalence.ssd_cases.{case!r}), "
            f"chunk_size={case.chunk_size}, return_final_states=True, impl={name!r})")


def scan(name, case, inputs, **kw):
    return impls.ssd_scan(**inputs, chunk_size=kw.pop("chunk_size", case.chunk_size), impl=name, **kw)


def oracle(case):
    """(float64 oracle, loop in the case's dtype), each (out, final_states)."""
    ref = scan("loop", case, reference_inputs(case), return_final_states=True)
    same = scan("loop", case, make_inputs(case), return_final_states=True)
    return ref, same


def magnitudes(case):
    """Sums of |terms| of each element of (out, final_states): the scale that a sound rounding error
    is relative to where the oracle's sums cancel (equivalence/tolerance.py).

    The recursion in float64 with every term made non-negative: h_t = exp(dt_t A) h_{t-1} +
    |dt_t x_t (x) B_t| from |initial_states|, y_t = <|C_t|, h_t> + |D x_t|, times |silu(z_t)|.
    """
    x = reference_inputs(case)
    h = case.h
    dt = effective_dt(x["dt"], x["dt_bias"], x["dt_softplus"], x["dt_limit"], torch.float64)  # (b, l, h)
    decay = torch.exp(dt * x["A"])
    B, C = per_head(x["B"].abs(), h), per_head(x["C"].abs(), h)                            # (b, l, h, n)
    inp = (dt.abs()[..., None] * x["x"].abs())[..., None] * B[:, :, :, None, :]             # (b, l, h, p, n)
    state = (x["initial_states"].abs() if x["initial_states"] is not None
             else torch.zeros(case.b, h, case.p, case.n, dtype=torch.float64))
    ys = []
    for t in range(case.l):
        state = decay[:, t, :, None, None] * state + inp[:, t]
        ys.append((state * C[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, 1)
    if x["D"] is not None:
        y = y + (x["D"].abs()[:, None] if x["D"].dim() == 1 else x["D"].abs()) * x["x"].abs()
    if x["z"] is not None:
        y = y * F.silu(x["z"]).abs()
    return y, state


def conditionings(case):
    """Ulps a rounding can grow to (equivalence/tolerance.py: conditioning) for each element of
    out (b, l, h, p) and final_states (b, h, p, n), and for every gradient element (a number)."""
    x = reference_inputs(case)
    raw = x["dt"] + (x["dt_bias"] if x["dt_bias"] is not None else 0)
    dt = effective_dt(x["dt"], x["dt_bias"], x["dt_softplus"], x["dt_limit"], torch.float64)   # (b, l, h)
    cum = conditioning(dt * x["A"], dt_ulps(raw, x["dt_softplus"], x["dt_bias"] is not None), 1)
    gate = GATE_ULPS if x["z"] is not None else 0
    last = cum[:, -1]
    out = (cum + gate)[..., None].expand(case.b, case.l, case.h, case.p)
    return (out, last[:, :, None, None].expand(case.b, case.h, case.p, case.n),
            gradient_conditioning(last, x["z"] is not None))


def _finite_max(t):
    t = t.detach()
    t = t[torch.isfinite(t)]
    return float(t.max()) if t.numel() else None


def scales(case):
    return tuple(_finite_max(t) for t in magnitudes(case))


def assert_matches_oracle(what, case, out, state, ref, same, where):
    so, ss = magnitudes(case)
    ko, ks, _ = conditionings(case)
    assert_close(f"{what}: out", out, ref[0], same[0], ssd_terms("out", case.l, case.n), where, scale=so,
                 conditioning=ko)
    assert_close(f"{what}: final_states", state, ref[1], same[1], ssd_terms("final_states", case.l, case.n),
                 where, scale=ss, conditioning=ks)


def time_slice(inputs, start, stop):
    return {k: (v[:, start:stop] if k in TIME_ARGS and v is not None else v) for k, v in inputs.items()}


def check_values(name, case):
    """out and final_states against the float64 loop; an undeclared capability must be refused."""
    entry, case = prepare(name, case)
    x = make_inputs(case)
    if not supported(entry, case):
        try:
            scan(name, case, x)
        except NotImplementedError:
            return
        raise AssertionError(f"{name} ran a case it declares unsupported: {case.id}")
    out, state = scan(name, case, x, return_final_states=True)
    ref, same = oracle(case)
    assert_matches_oracle(name, case, out, state, ref, same, repro(name, case))


def check_step_equals_scan(name, case, k):
    """Prefill k tokens with the scan, then ssd_state_update once per token: the same values and
    state as the float64 scan of everything (the generation path of a model)."""
    entry, case = prepare(name, case)
    if entry.step is None or not supported(entry, case):
        return
    k = min(k, case.l)
    x = make_inputs(case)
    if k:
        out_pre, state = scan(name, case, time_slice(x, 0, k), return_final_states=True)
    else:
        out_pre = x["x"][:, :0]
        state = (x["initial_states"].clone() if x["initial_states"] is not None
                 else torch.zeros(case.b, case.h, case.p, case.n, dtype=x["A"].dtype))
    outs = [out_pre]
    for t in range(k, case.l):
        outs.append(impls.ssd_state_update(
            state, x["x"][:, t], x["dt"][:, t], x["A"], x["B"][:, t], x["C"][:, t], x["D"],
            None if x["z"] is None else x["z"][:, t], x["dt_bias"], x["dt_softplus"], x["dt_limit"],
            impl=name)[:, None])
    ref, same = oracle(case)
    assert_matches_oracle(f"{name}, prefill {k} then step", case, torch.cat(outs, 1), state, ref, same,
                          repro(name, case) + f"  # prefill k={k}, then ssd_state_update per token")


def describe(name):
    """One line for the pytest header: name, module, step, declared capabilities."""
    e = impls.get(name, family="ssd")
    caps = {k: ([str(t).replace("torch.", "") for t in v] if k == "dtypes" else v) for k, v in e.supports.items()}
    return f"{name}: {e.module}, step={'yes' if e.step else 'no'}, supports {caps}"


def check_split(name, case, k):
    """Scan the first k tokens, continue from final_states: the same as one scan of everything
    (segment-by-segment prefill, which the official code and transformers failed to carry)."""
    entry, case = prepare(name, case)
    if not supported(entry, case) or not entry.supports["initial_states"]:
        return
    k = min(k, case.l)
    x = make_inputs(case)
    out1, s1 = scan(name, case, time_slice(x, 0, k), return_final_states=True)
    out2, s2 = scan(name, case, {**time_slice(x, k, None), "initial_states": s1}, return_final_states=True)
    ref, same = oracle(case)
    assert_matches_oracle(f"{name}, split at {k}", case, torch.cat([out1, out2], 1), s2, ref, same,
                          repro(name, case) + f"  # split at k={k}")


def check_chunk_size_invariance(name, case, chunk_sizes):
    """The same result, within rounding of the float64 loop, for every chunk size (any l)."""
    entry, case = prepare(name, case)
    if not supported(entry, case):
        return
    x = make_inputs(case)
    ref, same = oracle(case)
    for cs in chunk_sizes:
        out, state = scan(name, case, x, chunk_size=cs, return_final_states=True)
        assert_matches_oracle(f"{name}, chunk_size={cs}", case, out, state, ref, same,
                              repro(name, case).replace(f"chunk_size={case.chunk_size}", f"chunk_size={cs}"))


def check_causality(name, case, t):
    """Changing token t (x, dt, B, C, z) changes no output before t, bit for bit, and does change
    the output from t on."""
    entry, case = prepare(name, case)
    if not supported(entry, case):
        return
    t = min(t, case.l - 1)
    x = make_inputs(case)
    gen = torch.Generator().manual_seed(case.seed + 1)
    x2 = _perturbed(x, TIME_ARGS, (slice(None), t), gen)
    out, out2 = scan(name, case, x), scan(name, case, x2)
    where = repro(name, case) + f"  # token {t} perturbed"
    if not torch.equal(out[:, :t], out2[:, :t]):
        bad = (out[:, :t] != out2[:, :t]).nonzero()[0].tolist()
        raise AssertionError(f"{name}: changing token {t} changed the output at {bad}, before it\n  reproduce: {where}")
    if torch.equal(out[:, t:], out2[:, t:]):
        raise AssertionError(f"{name}: changing token {t} changed no output at all\n  reproduce: {where}")


def check_batch_independence(name, case, j):
    """Changing batch row j changes no other row, bit for bit, in out and final_states."""
    entry, case = prepare(name, case)
    if not supported(entry, case) or case.b < 2:
        return
    j = j % case.b
    x = make_inputs(case)
    gen = torch.Generator().manual_seed(case.seed + 2)
    x2 = _perturbed(x, BATCH_ARGS, (j,), gen)
    out, s = scan(name, case, x, return_final_states=True)
    out2, s2 = scan(name, case, x2, return_final_states=True)
    others = [i for i in range(case.b) if i != j]
    if not (torch.equal(out[others], out2[others]) and torch.equal(s[others], s2[others])):
        raise AssertionError(f"{name}: changing batch row {j} changed other rows\n  reproduce: {repro(name, case)}")


POISONS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def poisoned(inputs, arg, t, value, dtype=None):
    """A copy of ``inputs`` with ``value`` at token t of ``arg`` (x, dt, B, C or z), at batch row 0
    and the first element of its other axes (head 0, channel 0 / group 0, state 0)."""
    out = dict(inputs)
    v = inputs[arg].clone()
    v[(0, t) + (0,) * (v.dim() - 2)] = value
    out[arg] = v
    return out


def check_nonfinite_propagation(name, case, arg, t, poison):
    """A NaN, inf or -inf at token t of one input: out and final_states are non-finite exactly where
    the loop's are (in its dtype, on the same input), and within the policy of the float64 loop
    everywhere else. NaN must stay NaN; for an infinity only finiteness is compared, since the sign
    of a sum holding infinities of both signs depends on the order it is formed in (inf or NaN),
    and no order is the spec's."""
    entry, case = prepare(name, case)
    if not supported(entry, case) or (arg == "z" and not case.z):
        return
    t = min(t, case.l - 1)
    value = POISONS[poison]
    x = poisoned(make_inputs(case), arg, t, value)
    ref = scan("loop", case, poisoned(reference_inputs(case), arg, t, value), return_final_states=True)
    same = scan("loop", case, x, return_final_states=True)
    where = repro(name, case) + f"  # {arg}[0, {t}, 0...] = {poison}"
    scale = scales(case)
    lengths = (ssd_terms("out", case.l, case.n), ssd_terms("final_states", case.l, case.n))
    # with gradients an implementation may take another path (autograd-friendly ops): check both
    runs = [(scan(name, case, x, return_final_states=True), "")]
    if entry.supports["gradients"] and case.dtype in ("f32", "f64"):
        leaves = {k: (v.detach().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
        runs.append((tuple(t.detach() for t in scan(name, case, leaves, return_final_states=True)), " (inputs requiring grad)"))
    for got, mode in runs:
        for what, a, r, s, length, sc in zip(("out", "final_states"), got, ref, same, lengths, scale):
            what = what + mode
            bad = torch.isfinite(a) != torch.isfinite(s)
            if bad.any():
                raise AssertionError(f"{name}: {arg} = {poison} at token {t}: {what} finite where the loop's is not, "
                                     f"or the reverse, at {int(bad.sum())} positions, first {bad.nonzero()[0].tolist()}"
                                     f"\n  reproduce: {where}")
            if poison == "nan" and not torch.equal(torch.isnan(a), torch.isnan(s)):
                raise AssertionError(f"{name}: {arg} = nan at token {t}: {what} has an infinity where the loop has NaN, "
                                     f"or the reverse\n  reproduce: {where}")
            keep = torch.isfinite(s)
            zero = torch.zeros((), dtype=a.dtype)
            assert_close(f"{name}, {arg} = {poison} at {t}: {what}", torch.where(keep, a, zero),
                         torch.where(keep, r, torch.zeros((), dtype=r.dtype)), torch.where(keep, s, zero), length, where,
                         scale=sc)


def gradient_magnitudes(case, weights):
    """{argument: sums of |summands| of each element of its gradient} for the loss
    sum(w_out out) + sum(w_s final_states): the scale of the gradients' floor in the tolerance policy.

    magnitudes()'s recursion with every term non-negative, differentiated: x, B, C, D,
    initial_states and z by autograd (the outputs are linear in each, with non-negative
    coefficients); A and dt from each token's decay term exp(dt_t A) lambda_t h_{t-1} (>= 0) and
    input term lambda_t x_t B_t by the chain rule with |A| and |dt|, so that no sign cancels;
    dt_bias the sum over b and l of dt's. lambda is the adjoint of the state.
    """
    x = reference_inputs(case)
    h = case.h
    raw = x["dt"] + (x["dt_bias"] if x["dt_bias"] is not None else 0)
    dt = effective_dt(x["dt"], x["dt_bias"], x["dt_softplus"], x["dt_limit"], torch.float64)   # (b, l, h)
    decay = torch.exp(dt * x["A"])
    leaves = {k: x[k].abs().requires_grad_() for k in ("x", "B", "C", "D", "initial_states") if x[k] is not None}
    if x["z"] is not None:
        leaves["z"] = x["z"].clone().requires_grad_()
    B, C = per_head(leaves["B"], h), per_head(leaves["C"], h)
    inp = (dt.abs()[..., None] * leaves["x"])[..., None] * B[:, :, :, None, :]                 # (b, l, h, p, n)
    h0 = leaves.get("initial_states", torch.zeros(case.b, h, case.p, case.n, dtype=torch.float64))
    state, states = h0, []
    for t in range(case.l):
        state = decay[:, t, :, None, None] * state + inp[:, t]
        states.append(state)
    H = torch.stack(states, 1)                                                                 # (b, l, h, p, n)
    y = (H * C[:, :, :, None, :]).sum(-1)
    if "D" in leaves:
        y = y + (leaves["D"][:, None] if leaves["D"].dim() == 1 else leaves["D"]) * leaves["x"]
    if "z" in leaves:
        y = y * F.silu(leaves["z"]).abs()
    loss = (y * weights[0].abs()).sum() + (H[:, -1] * weights[1].abs()).sum()
    grads = torch.autograd.grad(loss, [inp, *leaves.values()])
    lam = grads[0]                                                                             # dL/dh_t
    sums = {k: g.abs() for k, g in zip(leaves, grads[1:])}
    previous = torch.cat([h0[:, None], H[:, :-1]], 1).detach()                                 # h_{t-1}
    decay_terms = (decay[..., None, None] * lam * previous).sum((-1, -2))                      # (b, l, h)
    input_terms = ((lam * B[:, :, :, None, :].detach()).sum(-1) * x["x"].abs()).sum(-1)        # (b, l, h)
    sums["A"] = (dt.abs() * decay_terms).sum((0, 1))
    # softplus' derivative, 1 above its threshold (20) where softplus is the identity
    dsoftplus = torch.where(raw > 20, 1.0, torch.sigmoid(raw)) if x["dt_softplus"] else torch.ones_like(raw)
    sums["dt"] = dsoftplus * (x["A"].abs() * decay_terms + input_terms)
    if x["dt_bias"] is not None:
        sums["dt_bias"] = sums["dt"].sum((0, 1))
    return sums


# Each summand of a gradient element is itself a product of up to eight rounded factors (dt, A,
# exp(dt A), the adjoint, a state, x, B or C, silu(z)'s derivative), formed in another order by
# another implementation: up to half an ulp each, 4 eps relative in all. Measured: the mapped
# `parallel`'s float64 dL/dA at l = n = p = 1, a single summand, one ulp from the loop's.
GRADIENT_TERM_ROUNDINGS = 4


def gradient_terms(case, arg):
    """Rounded terms accumulated into one element of the gradient of ``arg``: over the tokens whose
    adjoint reaches it (l) and what its element is shared by (the readout's n, a group's heads and
    channels, or every token and state of a head for A and dt_bias), plus the roundings inside each
    summand (GRADIENT_TERM_ROUNDINGS)."""
    b, l, p, n, hg = case.b, case.l, case.p, case.n, case.h // case.g
    summed = {"x": l + n, "z": l + n, "initial_states": l + n, "B": l + hg * p, "C": l + hg * p,
              "dt": l + p * n, "A": b * l * p * n, "dt_bias": b * l * p * n,
              "D": b * l * (p if case.D == "h" else 1)}[arg]
    return summed + GRADIENT_TERM_ROUNDINGS


def _gradients(name, case, x, weights):
    leaves = {k: (v.detach().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
    out, s = scan(name, case, leaves, return_final_states=True)
    loss = (out.double() * weights[0]).sum() + (s.double() * weights[1]).sum()
    wrt = [k for k in SCAN_ARGS if isinstance(leaves[k], torch.Tensor)]
    return dict(zip(wrt, torch.autograd.grad(loss, [leaves[k] for k in wrt])))


def check_gradients(name, case):
    """Gradients of a random linear function of (out, final_states) for every tensor input (x, dt,
    A, B, C, D, z, dt_bias, initial_states) against float64 autograd through the loop, under the
    same tolerance policy."""
    entry, case = prepare(name, case)
    if not entry.supports["gradients"] or not supported(entry, case):
        return
    gen = torch.Generator().manual_seed(case.seed + 3)
    weights = (torch.randn(case.b, case.l, case.h, case.p, generator=gen, dtype=torch.float64),
               torch.randn(case.b, case.h, case.p, case.n, generator=gen, dtype=torch.float64))
    got = _gradients(name, case, make_inputs(case), weights)
    ref = _gradients("loop", case, reference_inputs(case), weights)
    same = _gradients("loop", case, make_inputs(case), weights)
    sums = gradient_magnitudes(case, weights)
    grad_conditioning = conditionings(case)[2]
    for k in got:
        assert_close(f"{name}: grad {k}", got[k], ref[k], same[k], gradient_terms(case, k),
                     repro(name, case) + f"  # gradient of {k}", scale=sums[k], conditioning=grad_conditioning)
