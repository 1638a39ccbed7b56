"""The properties every SSD implementation must have, as plain functions of (implementation, case).

Each check raises AssertionError (with a snippet that reproduces the case) or returns quietly. The
tests draw cases with hypothesis (equivalence/ssd_cases.py) and call these; the oracle is the SSD
loop (impls/ssd_loop.py) run in float64, and every comparison goes through the tolerance policy
(equivalence/tolerance.py).
"""

import torch
import torch.nn.functional as F

import impls
from impls.ssd_loop import effective_dt, per_head

from .ssd_cases import SCAN_ARGS, TIME_ARGS, make_inputs, reference_inputs
from .tolerance import assert_close, ssd_terms

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


def _finite_max(t):
    t = t.detach()
    t = t[torch.isfinite(t)]
    return float(t.max()) if t.numel() else None


def scales(case):
    return tuple(_finite_max(t) for t in magnitudes(case))


def assert_matches_oracle(what, case, out, state, ref, same, where):
    so, ss = scales(case)
    assert_close(f"{what}: out", out, ref[0], same[0], ssd_terms("out", case.l, case.n), where, scale=so)
    assert_close(f"{what}: final_states", state, ref[1], same[1], ssd_terms("final_states", case.l, case.n),
                 where, scale=ss)


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
