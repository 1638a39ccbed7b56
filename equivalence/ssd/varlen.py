"""Mamba-2 SSD's packed sequences: its packed case type, inputs, sums of |terms| and its ``Packing``
(impls.ssd_scan with cu_seqlens, time on axis 1; the family-neutral properties are equivalence/varlen.py)."""

import dataclasses

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

import impls
from impls.frontdoor import compute_dtype
from impls.ssd.loop import effective_dt, per_head

from .. import varlen
from ..tolerance import ssd_terms
from .cases import DTYPES, SSDCase, make_inputs

# Every option of SSDCase but strided inputs and extreme_dt; per-sequence initial states
# (nseq, h, p, n) on by default, and chunks of 8
SSDVarlenCase = varlen.packed_case_type(SSDCase, "SSDVarlenCase", __name__, "initial_states",
                                        drop=("strided", "extreme_dt"), initial_states=True, chunk_size=8)


@st.composite
def varlen_cases(draw, chunk=8, dtypes=tuple(DTYPES), regimes=("mamba2", "stress", "slow"), max_h=4, max_p=4,
                     max_n=4, max_seqs=6, max_total=80):
    h = draw(st.integers(1, max_h))
    return SSDVarlenCase(
        lengths=draw(varlen.sequence_lengths(chunk, max_seqs, max_total)), h=h, p=draw(st.integers(1, max_p)),
        n=draw(st.integers(1, max_n)), g=draw(st.sampled_from([g for g in range(1, h + 1) if h % g == 0])),
        dtype=draw(st.sampled_from(dtypes)), regime=draw(st.sampled_from(regimes)),
        D=draw(st.sampled_from(("none", "h", "hp"))), z=draw(st.booleans()), dt_bias=draw(st.booleans()),
        softplus=draw(st.booleans()), dt_limit=draw(st.sampled_from(("default", "tight"))),
        initial_states=draw(st.booleans()), chunk_size=draw(st.sampled_from((chunk, 1, 3, chunk + 5))),
        seed=draw(st.integers(0, 2**32 - 1)))


TIME_ARGS = ("x", "dt", "B", "C", "z")


def packed_inputs(case, dtype=None):
    """impls.ssd_scan keyword arguments for the packed call: x, z (1, l, h, p), dt (1, l, h), B, C
    (1, l, g, n), initial_states (nseq, h, p, n) or None, cu_seqlens (nseq + 1,) int32, chunk_size,
    dt_softplus, dt_limit. With dtype=torch.float64, the same values in float64."""
    x = varlen.packed_inputs(case, make_inputs(case.packed_case(), dtype), "initial_states",
                             (case.h, case.p, case.n), dtype)
    x["chunk_size"] = case.chunk_size
    return x


def repro(name, case, note=""):
    return (f"impls.ssd_scan(**equivalence.ssd.varlen.packed_inputs(equivalence.ssd.varlen.{case!r}), "
            f"return_final_states=True, impl={name!r}){'  # ' + note if note else ''}")


def magnitudes(x64, weights=None):
    """Sums of |terms| for packed SSD inputs (float64), as Mamba-1's (equivalence/selective/varlen.py) and
    equivalence.ssd's magnitudes and gradient_magnitudes, each sequence restarting from
    |initial_states[i]|. Returns (out scale (1, l, h, p), final states scale (nseq, h, p, n),
    {argument: gradient scale} or None); weights as in check_alone_gradients."""
    h = x64["x"].shape[2]
    p, n = x64["x"].shape[3], x64["B"].shape[-1]
    offsets = x64["cu_seqlens"].tolist()
    raw = x64["dt"] + (x64["dt_bias"] if x64["dt_bias"] is not None else 0)
    dt = effective_dt(x64["dt"], x64["dt_bias"], x64["dt_softplus"], x64["dt_limit"], torch.float64)   # (1, l, h)
    decay = torch.exp(dt * x64["A"])
    grad = weights is not None
    leaves = varlen.abs_leaves(x64, ("x", "B", "C", "D", "initial_states"), grad)
    B, C = per_head(leaves["B"], h), per_head(leaves["C"], h)                                 # (1, l, h, n)
    inp = (dt.abs()[..., None] * leaves["x"])[..., None] * B[:, :, :, None, :]                # (1, l, h, p, n)
    h0s = leaves.get("initial_states", torch.zeros(len(offsets) - 1, h, p, n, dtype=torch.float64))
    states, previous, lasts = varlen.run_sequences(offsets, h0s,
                                                   lambda state, t: decay[:, t, :, None, None] * state + inp[:, t])
    H = torch.stack(states, 1) if states else inp                                           # (1, l, h, p, n)
    y = (H * C[:, :, :, None, :]).sum(-1)
    if "D" in leaves:
        y = y + (leaves["D"][:, None] if leaves["D"].dim() == 1 else leaves["D"]) * leaves["x"]
    if "z" in leaves:
        y = y * F.silu(leaves["z"]).abs()
    last = torch.cat(lasts)
    if not grad:
        return y.detach(), last.detach(), None
    lam, sums = varlen.adjoints(y, last, weights, inp, leaves)                                # lambda: dL/dh_t
    before = torch.stack(previous, 1).detach() if previous else inp.detach()                  # h_{t-1}
    decay_terms = (decay[..., None, None] * lam * before).sum((-1, -2))                       # (1, l, h)
    input_terms = ((lam * B[:, :, :, None, :].detach()).sum(-1) * x64["x"].abs()).sum(-1)     # (1, l, h)
    sums["A"] = (dt.abs() * decay_terms).sum((0, 1))
    dsoftplus = torch.where(raw > 20, 1.0, torch.sigmoid(raw)) if x64["dt_softplus"] else torch.ones_like(raw)
    sums["dt"] = dsoftplus * (x64["A"].abs() * decay_terms + input_terms)
    if x64["dt_bias"] is not None:
        sums["dt_bias"] = sums["dt"].sum((0, 1))
    return y.detach(), last.detach(), sums


def _conditioning(x64, output):
    """The whole pack's conditioning: one number for every ``output`` (y, the states, the gradients)."""
    raw = x64["dt"] + (x64["dt_bias"] if x64["dt_bias"] is not None else 0)
    dt = effective_dt(x64["dt"], x64["dt_bias"], x64["dt_softplus"], x64["dt_limit"], torch.float64)   # (1, l, h)
    return varlen.pack_conditioning(dt * x64["A"], raw, x64["dt_softplus"], x64["dt_bias"] is not None,
                              x64["z"] is not None, 1)


def _terms(case, output, arg=None):
    """Rounded terms per element, as equivalence/tolerance.py's ssd_terms (the longest sequence) and
    equivalence.ssd.gradient_terms (every packed token, b = 1) for ``arg``."""
    from . import gradient_terms   # the family's module imports this one: import it late

    longest = max(case.lengths)
    if output == "gradient":
        return gradient_terms(dataclasses.replace(case.packed_case(), l=max(case.l, 1)), arg)
    return ssd_terms("out" if output == "y" else "final_states", longest, case.n)


def _scan(name, x):
    return impls.ssd_scan(**x, return_final_states=True, impl=name)


def _step(name, cache, x, tokens, indices):
    return impls.ssd_state_update(cache, tokens["x"], tokens["dt"], x["A"], tokens["B"], tokens["C"], x["D"],
                                  tokens["z"], x["dt_bias"], x["dt_softplus"], x["dt_limit"],
                                  state_batch_indices=indices, impl=name)


def chunk_starts(case):
    """Packed positions where a chunk of case.chunk_size starts when the chunks are laid over the
    whole packed sequence, as the official kernel and the planted bugs lay them (impls/ssd/chunked.py
    restarts its chunks at each sequence instead, which is why it passes)."""
    return list(range(0, max(case.l, 1), case.chunk_size))


# Pinned packings (h = 2, p = 3, n = 4, chunks of 4 laid over the packed sequence): together they
# cover every geometry in varlen.CATEGORIES, as a test in equivalence/test_varlen.py checks.
PINNED = (
    SSDVarlenCase(lengths=(0, 1, 5, 7, 14, 0, 3), h=2, p=3, n=4, chunk_size=4, seed=1),
    SSDVarlenCase(lengths=(4, 4, 3, 12), h=2, p=3, n=4, g=2, regime="stress", D="hp", chunk_size=4, seed=2),
    SSDVarlenCase(lengths=(3, 4, 1, 16, 9), h=2, p=3, n=4, dtype="f64", regime="slow", chunk_size=4, seed=3),
    SSDVarlenCase(lengths=(40, 33, 2), h=2, p=3, n=4, dt_limit="tight", initial_states=False, chunk_size=16, seed=4),
    SSDVarlenCase(lengths=(2,) * 10, h=2, p=3, n=4, dtype="bf16", chunk_size=4, seed=5),
    SSDVarlenCase(lengths=(0,), h=2, p=3, n=4, chunk_size=4, seed=6),
    SSDVarlenCase(lengths=(1,), h=2, p=3, n=4, dtype="f16", z=False, D="none", chunk_size=4, seed=7),
)

PACKING = varlen.Packing(name="ssd", time_args=TIME_ARGS, time_dim=1, state_arg="initial_states",
                         step_args=TIME_ARGS, inputs=packed_inputs, scan=_scan, step=_step, magnitudes=magnitudes,
                         conditioning=_conditioning, terms=_terms, repro=repro, cases=varlen_cases, pinned=PINNED,
                         chunk_starts=chunk_starts)
