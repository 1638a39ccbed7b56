"""Every planted Mamba-3 bug (equivalence/mamba3/planted_bugs.py) is caught by a values, split or
packed check on a small case, and the correct scans pass the same checks."""

import itertools
import math

import pytest
import torch

from equivalence.mamba3.cases import Case, as_f64, check, inputs
from equivalence.mamba3.planted_bugs import VARIANTS
from equivalence.mamba3.test_spec import SCANS, tight, window
from impls.mamba3 import loop

# the family's plain tests of its own: in a run with no implementation named (they run none of them)
pytestmark = pytest.mark.family("mamba3")

SMALL = Case(b=2, l=7, h_qk=2, groups=2, p=2, n=6, n_ang=2, chunk_size=3, seed=3)


def values(scan, dtype):
    args = inputs(Case(**{**SMALL.__dict__, "dtype": dtype}))
    check(f"values {dtype}", scan(**args, chunk_size=SMALL.chunk_size, return_final_states=True), args)


def split(scan):
    """One call against two with all four states carried (float64)."""
    args = inputs(SMALL)
    run = lambda a: scan(**a, chunk_size=SMALL.chunk_size, return_final_states=True)
    whole, first = run(args), run(window(args, 0, 3, args["Input_States"]))
    second = run(window(args, 3, SMALL.l, tuple(first[1:])))
    tight(torch.cat((first[0], second[0]), 1), whole[0])
    for i, (x, y) in enumerate(zip(second[1:], whole[1:])):
        tight(x, y, angle=i == 0)


def packed(scan):
    """Packed sequences against the float64 loop run per sequence."""
    lens = [3, 1, 5]
    case = Case(b=1, l=sum(lens), n=4, n_ang=2, chunk_size=2, seed=5)
    args = inputs(case, S=len(lens))
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)
    got = scan(**args, chunk_size=2, return_final_states=True, cu_seqlens=cu)
    for i, (s, e) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        alone = loop.mamba3_scan(**window(args, s, e, tuple(x[i:i + 1] for x in args["Input_States"])),
                                 return_final_states=True)
        tight(got[0][:, s:e], alone[0])
        for j, (x, y) in enumerate(zip(got[1:], alone[1:])):
            tight(x[i:i + 1], y, angle=j == 0)


def long_float32(scan):
    """Many tokens in float32 with large, same-signed angle increments: an angle sum never reduced
    mod 2 pi loses float32's absolute precision as it grows (ulp(theta) ~ eps theta per token)."""
    case = Case(b=1, l=4000, h_qk=1, groups=1, p=1, n=2, n_ang=1, dtype="f32", states=False, D=False, Z=False,
                chunk_size=64, seed=7)
    args = inputs(case)
    args["Angles"] = args["Angles"].abs() + 1
    args["DT"] = args["DT"] * 20
    check("long f32", scan(**args, chunk_size=64, return_final_states=True), args)


CHECKS = {"values f64": lambda s: values(s, "f64"), "values f32": lambda s: values(s, "f32"), "split": split,
          "packed": packed, "long f32": long_float32}


def first_failure(scan):
    for name, run in CHECKS.items():
        try:
            run(scan)
        except AssertionError:
            return name
    return None


@pytest.mark.parametrize("name", list(SCANS))
def test_correct_scans_pass(name):
    assert first_failure(SCANS[name]) is None


@pytest.mark.parametrize("bug", list(VARIANTS))
def test_planted_bug_is_caught(bug):
    assert first_failure(VARIANTS[bug]) is not None, f"{bug} passed every check"
