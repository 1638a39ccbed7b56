"""Mamba-1's packed sequences: its packed case type, inputs, sums of |terms| and its ``Packing``
(the family-neutral properties are equivalence/varlen.py)."""

import dataclasses

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

import impls
from impls.frontdoor import compute_dtype

from .. import varlen
from ..tolerance import conditioning, dt_ulps
from .cases import DTYPES, REGIMES, Case, make_inputs

# Every option of Case but strided inputs and poison; per-sequence initial states on by default
VarlenCase = varlen.packed_case_type(Case, "VarlenCase", __name__, "initial_state", drop=("strided", "poison"),
                                     initial_state=True)


@st.composite
def varlen_cases(draw, chunk=8, dtypes=tuple(DTYPES), regimes=REGIMES, max_d=6, max_n=4, max_seqs=6, max_total=80):
    d = draw(st.integers(1, max_d))
    divisors = [g for g in range(1, d + 1) if d % g == 0]
    return VarlenCase(
        lengths=draw(varlen.sequence_lengths(chunk, max_seqs, max_total)), d=d, n=draw(st.integers(1, max_n)),
        g=draw(st.sampled_from([0] + divisors)), dtype=draw(st.sampled_from(dtypes)),
        regime=draw(st.sampled_from(regimes)), D=draw(st.booleans()), z=draw(st.booleans()),
        delta_bias=draw(st.booleans()), softplus=draw(st.booleans()), initial_state=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)))


TIME_ARGS = ("u", "delta", "z", "B", "C")


def packed_inputs(case, dtype=None):
    """selective_scan keyword arguments for the packed call: u, delta, z (1, d, l), B, C (1, n, l)
    or (1, g, n, l), initial_state (nseq, d, n) or None, cu_seqlens (nseq + 1,) int32. With
    dtype=torch.float64, the same values in float64 (the oracle's inputs)."""
    return varlen.packed_inputs(case, make_inputs(case.packed_case(), dtype), "initial_state", (case.d, case.n), dtype)


def repro(name, case, note=""):
    return (f"impls.selective_scan(**equivalence.selective.varlen.packed_inputs(equivalence.selective.varlen.{case!r}), "
            f"return_last_state=True, impl={name!r}){'  # ' + note if note else ''}")


def _time_last(X, d):
    """B or C (1, n, l) or (1, g, n, l) -> (1, d or 1, l, n)."""
    return (X.repeat_interleave(d // X.shape[1], dim=1) if X.dim() == 4 else X[:, None]).transpose(-1, -2)


def magnitudes(x64, weights=None):
    """Sums of |terms| for packed inputs (float64), the scale of the tolerance's floor (as
    equivalence.selective.magnitudes, per sequence: each restarts from |initial_state[i]|).

    Returns (y scale, last_state scale, {argument: sum of |summands| of its gradient} or None),
    the first two as tensors (1, d, l) and (nseq, d, n). weights: the loss's (1, d, l) and
    (nseq, d, n) weights, as in check_gradients."""
    d = x64["u"].shape[1]
    offsets = x64["cu_seqlens"].tolist()
    raw = x64["delta"] if x64["delta_bias"] is None else x64["delta"] + x64["delta_bias"][:, None]
    dt = F.softplus(raw) if x64["delta_softplus"] else raw
    grad = weights is not None
    leaves = varlen.abs_leaves(x64, ("u", "B", "C", "D", "initial_state"), grad)
    n = x64["A"].shape[1]
    decay = torch.exp(dt[..., None] * x64["A"][:, None, :])                       # (1, d, l, n)
    B = _time_last(leaves["B"], d)
    X = (dt.abs() * leaves["u"])[..., None] * B                                   # |dt B u|
    h0s = leaves.get("initial_state", torch.zeros(len(offsets) - 1, d, n, dtype=torch.float64))
    states, previous, lasts = varlen.run_sequences(offsets, h0s, lambda h, t: decay[:, :, t] * h + X[:, :, t])
    H = torch.stack(states, 2) if states else decay                              # (1, d, l, n)
    y = (H * _time_last(leaves["C"], d)).sum(-1)
    if "D" in leaves:
        y = y + leaves["D"][:, None] * leaves["u"]
    if "z" in leaves:
        y = y * F.silu(leaves["z"]).abs()
    last = torch.cat(lasts)
    if not grad:
        return y.detach(), last.detach(), None
    lam, sums = varlen.adjoints(y, last, weights, X, leaves)
    before = torch.stack(previous, 2) if previous else decay                    # h_{t-1}
    sums.update(decay_sums(x64, raw, dt, decay, lam, before, B))
    return y.detach(), last.detach(), sums


def decay_sums(x64, raw, dt, decay, lam, before, B):
    """Sums of |summands| of the gradients of A, delta and delta_bias, from each step's decay term
    Ā_t lambda_t h_{t-1} (>= 0) and input term by the chain rule, with |A| and |dt| so that no sign
    cancels: decay (b, d, l, n), lam the adjoint dL/dh_t and before h_{t-1}, both (b, d, l, n);
    raw and dt (b, d, l) before and after softplus; B (b, d or 1, l, n) as |B|."""
    decay_terms = (decay * lam * before).detach()                                 # Ā_t lambda_t h_{t-1}
    sums = dict(A=(dt.abs()[..., None] * decay_terms).sum((0, 2)))
    # softplus' derivative, exactly 1 above its threshold (20) where softplus is the identity
    dsoftplus = torch.where(raw > 20, 1.0, torch.sigmoid(raw)) if x64["delta_softplus"] else 1.0
    sums["delta"] = dsoftplus * ((x64["A"].abs()[:, None, :] * decay_terms).sum(-1)
                                 + (lam.detach() * B.detach()).sum(-1) * x64["u"].abs())
    if x64["delta_bias"] is not None:
        sums["delta_bias"] = sums["delta"].sum((0, 2))
    return sums



def chunk_starts(name, case):
    """Packed positions where the chunks of Mamba-1's ``name`` start on this case: parallel's plan
    (with whatever plan constants are in force), every token for a step-by-step implementation, and
    0 alone for one that scans in one piece (the loop)."""
    if case.l == 0:
        return [0]
    if name == "parallel":
        from impls.selective import parallel

        x = packed_inputs(case)
        p = parallel.Plan(x["u"], x["A"], x["B"], x["C"])
        return sorted({a + k * p.T for a, _ in p.segments for k in range(p.K) if a + k * p.T < max(case.l, 1)})
    if name == "recurrent":
        return list(range(max(case.l, 1)))
    return [0]


def _scan(name, x):
    return impls.selective_scan(**x, return_last_state=True, impl=name)


def _step(name, cache, x, tokens, indices):
    return impls.selective_state_update(cache, tokens["u"], tokens["delta"], x["A"], tokens["B"], tokens["C"], x["D"],
                                        tokens["z"], x["delta_bias"], x["delta_softplus"],
                                        state_batch_indices=indices, impl=name)


def _conditioning(x64, output):
    """The whole pack's conditioning: one number for every ``output`` (y, the states, the gradients)."""
    raw = x64["delta"] if x64["delta_bias"] is None else x64["delta"] + x64["delta_bias"][:, None]
    dt = F.softplus(raw) if x64["delta_softplus"] else raw                        # (1, d, l)
    return varlen.pack_conditioning(dt[..., None] * x64["A"][:, None, :], raw[..., None], x64["delta_softplus"],
                              x64["delta_bias"] is not None, x64["z"] is not None, 2)


def _terms(case, output, arg=None):
    """Rounded terms per element (equivalence/tolerance.py's terms): the longest sequence's steps,
    plus the readout's n for y; a gradient (of any argument ``arg``) sums over every token and over
    channels or states."""
    longest = max(case.lengths)
    return dict(y=longest + case.n, state=longest,
                gradient=case.l * (case.d // max(case.g, 1) + case.n))[output]


# Pinned packings (d = 3, n = 4: on parallel's small plan in equivalence/test_varlen.py, chunks of 4
# to 8 tokens); together they cover every geometry in varlen.CATEGORIES, as a test there checks.
PINNED = (
    VarlenCase(lengths=(0, 1, 5, 7, 14, 0, 3), d=3, n=4, seed=1),
    VarlenCase(lengths=(5, 5, 3, 12), d=3, n=4, g=3, regime="stress", seed=2),
    VarlenCase(lengths=(3, 4, 1, 16, 9), d=3, n=4, dtype="f64", regime="slow", seed=3),
    VarlenCase(lengths=(40, 33, 2), d=3, n=4, g=1, regime="official", initial_state=False, seed=4),
    VarlenCase(lengths=(2,) * 10, d=3, n=4, dtype="bf16", seed=5),
    VarlenCase(lengths=(0,), d=3, n=4, seed=6),
    VarlenCase(lengths=(1,), d=3, n=4, dtype="f16", z=False, D=False, seed=7),
)

PACKING = varlen.Packing(name="selective", time_args=TIME_ARGS, time_dim=-1, state_arg="initial_state",
                         step_args=("u", "delta", "B", "C", "z"), inputs=packed_inputs, scan=_scan, step=_step,
                         magnitudes=magnitudes, conditioning=_conditioning, terms=_terms, repro=repro,
                         cases=varlen_cases, pinned=PINNED, chunk_starts=lambda case: chunk_starts("parallel", case))


