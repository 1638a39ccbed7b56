"""Mamba-3's packed sequences, SISO and MIMO: the packed case type, inputs, sums of |terms| and the
two ``Packing``s, PACKING (impls.mamba3_scan with cu_seqlens) and MIMO_PACKING (impls.mamba3_mimo
with cu_seqlens); the family-neutral properties are equivalence/varlen.py.

One packed case type serves both, as Case does: its rank R is None for SISO and a rank for MIMO,
and every function here reads the interface from the case or the inputs, so the two Packings
differ only in their name, their drawn cases and their pinned packings.

Each sequence's state is a row of each of the four parts (angle (nseq, h, n_ang), ssm (nseq, h, p,
n), k (nseq, h, n), MIMO's (nseq, R, h, n), v (nseq, h, p)); ADT, DT and Trap have time last,
(1, h, l). MIMO's outputs per rank (MIMO_Out None) are y (1, l, R, h, p) as the scan returns them,
time at axis 1 as for every y here. The sums of |terms| are the family's own
(equivalence.mamba3.magnitudes) run on each sequence alone: packing must not change a sequence, so
its scale is its own.
"""

import dataclasses
import functools

import torch
from hypothesis import strategies as st

import impls

from .. import varlen
from .cases import DTYPES, RANKS, STATE_PARTS, TIME_ARGS, TIME_DIMS, Case, align_state, as_dtype, inputs

STATE_ARG = "Input_States"
# parameters every token of every sequence reads (MIMO's projections and norm weight among them)
SHARED = ("Q_bias", "K_bias", "D", "MIMO_V", "MIMO_Z", "MIMO_Out", "outproj_norm_weight")

# Every option of Case (the rank, the norm and outputs per rank included); per-sequence initial
# states (the four parts) on by default, and chunks of 8
Mamba3VarlenCase = varlen.packed_case_type(Case, "Mamba3VarlenCase", __name__, "states", states=True, chunk_size=8)


@st.composite
def varlen_cases(draw, chunk=8, dtypes=tuple(DTYPES), max_p=3, max_seqs=6, max_total=80, ranks=None):
    """Packed cases; ranks None: SISO; (lo, hi): MIMO with R in it, the norm and outputs per rank drawn."""
    n = draw(st.sampled_from([2, 4, 6]))
    mimo = {} if ranks is None else dict(R=draw(st.integers(*ranks)), norm=draw(st.booleans()),
                                         per_rank=draw(st.booleans()))
    return Mamba3VarlenCase(
        lengths=draw(varlen.sequence_lengths(chunk, max_seqs, max_total)), h_qk=draw(st.integers(1, 2)),
        groups=draw(st.integers(1, 2)), p=draw(st.integers(1, max_p)), n=n, n_ang=draw(st.integers(0, n // 2)),
        dtype=draw(st.sampled_from(dtypes)), states=draw(st.booleans()), D=draw(st.booleans()), Z=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)), chunk_size=draw(st.sampled_from((chunk, 1, 3, chunk + 5))), **mimo)


def packed_inputs(case, dtype=None):
    """impls.mamba3_scan keyword arguments for the packed call: Q, K (1, l, h_qk, n), V, Z (1, l, h, p),
    ADT, DT, Trap (1, h, l), Angles (1, l, h, n_ang), Q_bias, K_bias (h, n), D (h,), Input_States (one
    row per sequence of each part) or None, cu_seqlens (nseq + 1,) int32 and chunk_size; for a MIMO
    case impls.mamba3_mimo's (Q, K (1, l, R, h_qk, n), Q_bias, K_bias (h, R, n), MIMO_V, MIMO_Z,
    MIMO_Out (h, R, p), the norm's flag and weight). With dtype=torch.float64, the same values in
    float64."""
    x = inputs(dataclasses.replace(case.packed_case(), states=case.states), S=case.nseq)
    x = x if dtype is None else as_dtype(x, dtype)
    x["cu_seqlens"] = torch.tensor(case.offsets, dtype=torch.int32)
    x["chunk_size"] = case.chunk_size
    return x


def repro(name, case, note=""):
    scan, states = ("mamba3_scan", "return_final_states") if case.R is None else ("mamba3_mimo", "return_state")
    return (f"impls.{scan}(**equivalence.mamba3.varlen.packed_inputs(equivalence.mamba3.varlen.{case!r}), "
            f"{states}=True, impl={name!r}){'  # ' + note if note else ''}")


def magnitudes(x64, weights=None):
    """Sums of |terms| for packed Mamba-3 inputs (float64): equivalence.mamba3.magnitudes on each
    sequence alone, from its own initial states. Returns (out scale (1, l, h, p), the four states'
    scales (nseq, ...), {argument: gradient scale} or None), weights and the states' gradients as in
    check_alone_gradients: the shared parameters' sums added over the sequences."""
    from . import magnitudes as alone   # the family's module imports this one: import it late

    offsets = x64["cu_seqlens"].tolist()
    ys, states, sums = [], [], []
    for i, (a, e) in enumerate(zip(offsets, offsets[1:])):
        w = None if weights is None else (weights[0][:, a:e], tuple(s[i:i + 1] for s in weights[1]))
        y, s, g = alone(None, w, varlen.sequence(PACKING, x64, i))
        ys.append(y)
        states.append(s)
        sums.append(g)
    y, states = torch.cat(ys, 1), tuple(torch.cat(parts) for parts in zip(*states))
    if weights is None:
        return y, states, None
    joined = {}
    for k in sums[0]:
        parts = [g[k] for g in sums]
        joined[k] = (sum(parts) if k in SHARED else torch.cat(parts) if k.startswith(STATE_ARG)
                     else torch.cat(parts, PACKING.axis(k)))
    return y, states, joined


def _conditioning(x64, output):
    """The whole pack's (equivalence.mamba3.conditionings on the packed inputs): one number for y
    and the gradients, one per part for the states."""
    from . import conditionings   # the family's module imports this one: import it late

    cond, states, gradient = conditionings(None, x64)
    return {"y": float(cond.amax()) if cond.numel() else 0.0, "state": states, "gradient": gradient}[output]


def _terms(case, output, arg=None):
    """Rounded terms per element, as equivalence.mamba3.terms: the longest sequence's for y and the
    states, every packed token's (b = 1) for a gradient of ``arg``."""
    from . import terms   # the family's module imports this one: import it late

    l = max(case.l, 1) if output == "gradient" else max(case.lengths)
    return terms(dataclasses.replace(case.packed_case(), l=l), output, arg)


def _scan(name, x):
    if "MIMO_V" in x:
        out, *states = impls.mamba3_mimo(**x, return_state=True, impl=name)
    else:
        out, *states = impls.mamba3_scan(**x, return_final_states=True, impl=name)
    return out, tuple(states)


def _step(name, cache, x, tokens, indices):
    if "MIMO_V" in x:
        out, _ = impls.mamba3_mimo_state_update(
            tokens["Q"], tokens["K"], tokens["V"], tokens["ADT"], tokens["DT"], tokens["Trap"], x["Q_bias"],
            x["K_bias"], x["MIMO_V"], x["MIMO_Z"], x["MIMO_Out"], tokens["Angles"], x["D"], tokens["Z"],
            Input_States=cache, fuse_pregate_headwise_rms_norm=x["fuse_pregate_headwise_rms_norm"],
            outproj_norm_weight=x["outproj_norm_weight"], state_batch_indices=indices, impl=name)
        return out
    out, _ = impls.mamba3_state_update(tokens["Q"], tokens["K"], tokens["V"], tokens["ADT"], tokens["DT"], tokens["Trap"],
                                       x["Q_bias"], x["K_bias"], tokens["Angles"], x["D"], tokens["Z"],
                                       Input_States=cache, state_batch_indices=indices, impl=name)
    return out


def chunk_starts(case):
    """Packed positions where a chunk of case.chunk_size starts when the chunks are laid over the
    whole packed sequence, as the official kernel and the planted bugs lay them (impls/mamba3/chunked.py
    restarts its chunks at each sequence instead)."""
    return list(range(0, max(case.l, 1), case.chunk_size))


# Pinned packings (chunks of 4, or 16, laid over the packed sequence): together they cover every
# geometry in varlen.CATEGORIES, as a test in equivalence/test_varlen.py checks.
PINNED = (
    Mamba3VarlenCase(lengths=(0, 1, 5, 7, 14, 0, 3), h_qk=1, groups=2, p=2, n=4, n_ang=2, chunk_size=4, seed=1),
    Mamba3VarlenCase(lengths=(4, 4, 3, 12), h_qk=2, groups=1, p=3, n=6, n_ang=3, dtype="f32", chunk_size=4, seed=2),
    Mamba3VarlenCase(lengths=(3, 4, 1, 16, 9), h_qk=1, groups=2, p=2, n=4, n_ang=1, chunk_size=4, seed=3,
                     angle_rate=20.0),
    Mamba3VarlenCase(lengths=(40, 33, 2), h_qk=1, groups=2, p=2, n=4, n_ang=2, dtype="f32", states=False,
                     chunk_size=16, seed=4),
    Mamba3VarlenCase(lengths=(2,) * 10, h_qk=1, groups=1, p=2, n=2, n_ang=1, dtype="f32", D=False, chunk_size=4,
                     seed=5),
    Mamba3VarlenCase(lengths=(0,), h_qk=1, groups=2, p=2, n=4, n_ang=2, chunk_size=4, seed=6),
    Mamba3VarlenCase(lengths=(1,), h_qk=1, groups=1, p=1, n=2, n_ang=0, dtype="f32", D=False, Z=False, chunk_size=4,
                     seed=7),
)

# MIMO's: the same packings with a rank, the norm and outputs per rank varied among them
MIMO_PINNED = tuple(dataclasses.replace(case, R=R, norm=norm, per_rank=per_rank) for case, (R, norm, per_rank) in zip(
    PINNED, ((3, True, False), (2, False, True), (1, False, False), (4, True, True), (2, False, False),
             (2, True, False), (3, False, True))))
PACKING = varlen.Packing(name="mamba3", time_args=TIME_ARGS, time_dim=1, state_arg=STATE_ARG,
                         step_args=("Q", "K", "V", "ADT", "DT", "Trap", "Angles", "Z"), inputs=packed_inputs,
                         scan=_scan, step=_step, magnitudes=magnitudes, conditioning=_conditioning, terms=_terms,
                         repro=repro, cases=varlen_cases, pinned=PINNED, chunk_starts=chunk_starts,
                         time_dims=TIME_DIMS, state_parts=STATE_PARTS, align_state=align_state)
MIMO_PACKING = dataclasses.replace(PACKING, name="mamba3_mimo", cases=functools.partial(varlen_cases, ranks=RANKS),
                                   pinned=MIMO_PINNED)
