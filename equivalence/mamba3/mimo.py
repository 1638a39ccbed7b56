"""Mamba-3 MIMO (family "mamba3_mimo") as the properties see it (equivalence/properties.py).

The contract of equivalence/mamba3/__init__.py, whose functions read the interface from the case,
on cases with a rank R (equivalence/mamba3/cases.py: Case.R, norm, per_rank). Letters as in
impls/mamba3/loop.py (MIMO section): out is (b, l, h, p), or per rank (MIMO_Out None) (b, l, R, h, p),
which the properties get as (b, l, h, p, R): y's axes are then Y_AXES, and a channel (h, p) indexes
all its ranks. The state is the tuple (angle (b, h, n_ang), ssm (b, h, p, n), k (b, R, h, n),
v (b, h, p)). The oracle is the MIMO loop run in float64.

MIMO's own: its arguments, cases and strategies (R from 1 to 3, the norm before the gate, outputs per
rank, any n_ang <= n / 2), the NaN's reach (the norm mixes a head's p channels: mixed_axes), its
planted bugs (equivalence/mamba3/planted_bugs.py, MIMO) and a step run as a scan. Packed sequences:
PACKING (equivalence/mamba3/varlen.py's MIMO_PACKING, Mamba-3's packing with the rank drawn), each
sequence's state a row of each of the four parts, and their planted bugs (varlen_planted_bugs: the
shared ones and Mamba-3's two, the v state from the pack's end among them). Not here, as for SISO:
the diagnosis of a failure's needs.
"""

import dataclasses
import sys

import torch
from hypothesis import strategies as st

from impls.frontdoor import compute_dtype
from impls.mamba3 import loop

from .. import properties
from . import (BATCH_ARGS, CHANNEL_ARG, CHUNK_SIZES, DTYPES, GROUPED_AXIS, PLAIN, STATE_ARG, STATE_PARTS,  # noqa: F401
               TIME_ARGS, TIME_DIM, TIME_DIMS, UNGROUPED, UNREDUCED, Y_AXES, align_state, call, cases, conditionings,
               exact_kinds, magnitudes, make_inputs, positional, reference_inputs, scan, state_shape, step, supported,
               terms)
from . import AXES as SISO_AXES
from . import OPTIONS as SISO_OPTIONS
from . import planted_bugs as _planted_bugs
from . import varlen_planted_bugs as _varlen_planted_bugs
from .cases import MIMO_ARGS, RANKS, Case, case_strategy
from .varlen import MIMO_PACKING, varlen_cases

NAME = "mamba3_mimo"
SCAN_ARGS = MIMO_ARGS + (STATE_ARG,)
PACKING = MIMO_PACKING
planted_bugs = _planted_bugs.MIMO
varlen_planted_bugs = _varlen_planted_bugs.MIMO

# The tiny calls that probe a plain function's capabilities (equivalence/diagnose.py)
TINY = Case(b=1, l=3, h_qk=1, groups=1, p=2, n=4, n_ang=1, dtype="f32", states=False, chunk_size=2, R=2)
PROBES = dict(grouped=dataclasses.replace(TINY, groups=2), Input_States=dataclasses.replace(TINY, states=True),
              pregate_norm=dataclasses.replace(TINY, norm=True), rank_outputs=dataclasses.replace(TINY, per_rank=True))

PINNED = (
    Case(b=1, l=1, h_qk=1, groups=1, p=1, n=2, n_ang=1, dtype="f32", states=False, D=False, Z=False, R=1),
    Case(b=1, l=1, h_qk=1, groups=2, p=2, n=4, n_ang=2, dtype="f64", states=True, R=3),   # the official fails at l = 1
    Case(b=2, l=0, h_qk=1, groups=2, p=2, n=4, n_ang=2, dtype="f64", states=True, R=2, per_rank=True),
    Case(b=2, l=70, h_qk=2, groups=2, p=3, n=8, n_ang=2, dtype="f32", states=True, chunk_size=16, seed=1, R=4,
         norm=True),
    Case(b=1, l=45, h_qk=1, groups=2, p=2, n=8, n_ang=4, dtype="f64", states=True, chunk_size=7, seed=2, R=2,
         angle_rate=20.0, per_rank=True),
)


def mixed_axes(case):
    """The norm before the gate mixes a head's p channels: a NaN in one reaches every p of its head."""
    return ("p",) if case.norm else ()


def scan_by_stepping(step):
    """A MIMO scan (mamba3_mimo's signature) that runs ``step`` (mamba3_mimo_state_update's, without
    impl) token by token, from Input_States or zeros; packed sequences each alone, as the loop."""

    def scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D=None, Z=None, chunk_size=16,
             rotary_dim_divisor=None, dtype=None, return_state=False, cu_seqlens=None,
             fuse_pregate_headwise_rms_norm=False, outproj_norm_weight=None, outproj_norm_eps=1e-5, Input_States=None):
        if cu_seqlens is not None:
            return loop.mimo_each_sequence(scan, Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out,
                                           Angles, D, Z, chunk_size, rotary_dim_divisor, dtype, return_state,
                                           cu_seqlens, fuse_pregate_headwise_rms_norm, outproj_norm_weight,
                                           outproj_norm_eps, Input_States)
        b, l, R, _, n = Q.shape
        h, p = V.shape[-2:]
        states = (loop.zero_mimo_states(b, R, h, p, n, Angles.shape[-1], compute_dtype(V.dtype), V.device)
                  if Input_States is None else tuple(Input_States))
        ys = []
        for t in range(l):
            y, states = step(Q[:, t], K[:, t], V[:, t], ADT[..., t], DT[..., t], Trap[..., t], Q_bias, K_bias, MIMO_V,
                             MIMO_Z, MIMO_Out, Angles[:, t], D, None if Z is None else Z[:, t], tuple(states),
                             fuse_pregate_headwise_rms_norm, outproj_norm_weight, outproj_norm_eps)
            ys.append(y)
        out = torch.stack(ys, 1) if ys else V.new_zeros((b, 0, h, p) if MIMO_Out is not None else (b, 0, R, h, p))
        return (out, *states) if return_state else out

    return scan


# What each property test draws (equivalence/test_*.py), smallest first when shrunk: ranks 1 to 3
STRATEGIES = dict(
    values=case_strategy(ranks=RANKS), split=case_strategy(min_l=1, ranks=RANKS),
    causality=case_strategy(min_l=1, ranks=RANKS), decode=case_strategy(min_l=1, ranks=RANKS),
    batch=case_strategy(min_l=1, min_b=2, max_b=3, ranks=RANKS), nonfinite=case_strategy(min_l=1, ranks=RANKS),
    gradients=case_strategy(min_l=1, max_l=10, ranks=RANKS), chunk_sizes=case_strategy(max_l=40, ranks=RANKS),
    properties=case_strategy(min_l=1, max_l=8, chunk_sizes=(2, 5), ranks=RANKS),
    magnitudes=case_strategy(dtypes=("f64",), min_l=1, max_l=10, ranks=RANKS),
    planted=case_strategy(min_l=1, max_l=14, ranks=RANKS), planted_positions=st.integers(0, 14),
    packed=varlen_cases(ranks=RANKS), packed_gradients=varlen_cases(max_total=40, ranks=RANKS),
    packed_decoding=varlen_cases(max_total=40, ranks=RANKS),
    packed_planted=varlen_cases(chunk=_varlen_planted_bugs.CHUNK, max_p=2, max_seqs=4, max_total=40, ranks=RANKS),
)
# The long and edge cases of the invariants, each in a test of its own (an @example is never shrunk)
PINNED_INVARIANTS = dict(
    split=[(Case(b=2, l=70, h_qk=2, groups=2, p=3, n=8, n_ang=2, dtype="f32", chunk_size=16, seed=1, R=4, norm=True),
            33),
           (Case(b=1, l=20, h_qk=1, groups=3, p=2, n=4, n_ang=1, dtype="f64", chunk_size=7, seed=2, R=2), 1)],
    decode=[(Case(b=2, l=30, h_qk=2, groups=2, p=3, n=4, n_ang=2, dtype="f32", seed=1, R=3, per_rank=True), 17),
            (Case(b=1, l=12, h_qk=1, groups=2, p=2, n=6, n_ang=1, dtype="f64", states=False, seed=2, R=2,
                  norm=True), 0)],
    causality=[(Case(b=1, l=80, h_qk=1, groups=2, p=2, n=4, n_ang=2, dtype="f32", chunk_size=64, R=2), 65),
               (Case(b=1, l=64, h_qk=1, groups=1, p=2, n=8, n_ang=2, dtype="f32", chunk_size=16, R=3, norm=True), 33)],
    nonfinite=[(Case(b=1, l=20, p=2, n=4, chunk_size=8, dtype="f32", R=2), "V", 10, "nan"),
               (Case(b=1, l=20, p=2, n=4, chunk_size=8, dtype="f32", R=2, norm=True), "V", 10, "nan"),
               (Case(b=1, l=20, p=2, n=4, chunk_size=8, dtype="f32", R=2), "Angles", 10, "nan"),
               (Case(b=1, l=20, p=2, n=4, chunk_size=8, dtype="f32", R=2), "ADT", 10, "nan"),
               (Case(b=1, l=20, p=2, n=4, chunk_size=8, dtype="f32", R=2), "DT", 10, "inf"),
               (Case(b=1, l=20, p=2, n=4, chunk_size=8, dtype="f32", R=2, per_rank=True), "ADT", 3, "-inf")],
    nan=[(Case(b=1, l=1, groups=1, p=1, n=2, n_ang=1, R=1), 0), (Case(b=1, l=20, p=2, n=4, chunk_size=8, R=3), 10),
         (Case(b=1, l=20, p=3, n=4, chunk_size=8, R=2, norm=True, per_rank=True), 10)],
    gradients=[Case(b=2, l=30, h_qk=2, groups=2, p=3, n=4, n_ang=2, dtype="f64", chunk_size=7, seed=7, R=3, norm=True),
               Case(b=1, l=20, h_qk=1, groups=1, p=2, n=8, n_ang=2, dtype="f32", states=False, chunk_size=4, seed=8,
                    R=2, per_rank=True),
               # a pre-norm y of 2 sqrt(eps) that cancels from far larger terms (norm_jacobian_ulps)
               Case(b=1, l=1, h_qk=2, groups=1, p=1, n=6, n_ang=3, dtype="f64", D=False, Z=False, seed=7343,
                    chunk_size=1, R=2, norm=True)],
    chunk_sizes=[Case(b=2, l=130, h_qk=2, groups=2, p=3, n=6, n_ang=3, dtype="f32", seed=1, R=2, norm=True),
                 Case(b=1, l=70, h_qk=1, groups=3, p=2, n=4, n_ang=1, dtype="f64", states=False, seed=2, R=3)],
    nonfinite_causality=[(Case(b=1, l=12, p=2, n=4, chunk_size=5, dtype="f32", R=2), 9, "nan"),
                         (Case(b=1, l=12, p=2, n=4, chunk_size=5, dtype="f32", R=2), 9, "inf")],
)
# What a failure needs (equivalence/diagnose.py): SISO's, with MIMO's own options and the rank
OPTIONS = dict(SISO_OPTIONS, norm=False, per_rank=False)
AXES = SISO_AXES + ("R",)

# The size the planted-bug search folds each drawn case to for the five properties of properties.py
PLANTED_SMALL = dict(b=2, l=8, p=3, n=6)


# The properties with this family bound: check_values(name, case), oracle(case), ...
FAMILY = sys.modules[__name__]
globals().update(properties.bound(FAMILY))
