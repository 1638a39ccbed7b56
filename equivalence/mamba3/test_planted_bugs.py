"""Every planted Mamba-3 bug, SISO and MIMO (equivalence/mamba3/planted_bugs.py), is caught by a
values, length-one, split, packed or long check on a small case, and the correct scans pass the
same checks. The checks take the interface from the case (Case.R: None for SISO, a rank for MIMO).
The shared properties find the bugs their drawn cases reach too (equivalence/test_planted_bugs.py);
these checks also reach the packed ones and the angle never reduced mod 2 pi."""

import dataclasses
import itertools

import pytest
import torch

from equivalence.mamba3 import test_mimo, test_spec
from equivalence.mamba3.cases import Case, check, inputs, run, tight, window
from equivalence.mamba3.planted_bugs import MIMO_BUGS, VARIANTS
from impls.mamba3 import loop

SMALL = {"siso": Case(b=2, l=7, h_qk=2, groups=2, p=2, n=6, n_ang=2, chunk_size=3, seed=3),
         "mimo": Case(b=2, l=7, h_qk=2, groups=2, p=3, n=8, n_ang=3, chunk_size=3, seed=3, R=3, norm=True)}
FAMILY = {"siso": "mamba3", "mimo": "mamba3_mimo"}   # the family each interface's tests belong to


def values(scan, small, **change):
    case = dataclasses.replace(small, **change)
    args = inputs(case)
    check(f"values {case.id}", run(scan, args, case.chunk_size), args)


def split(scan, small):
    """One call against two with all four states carried (float64)."""
    args = inputs(small)
    whole, first = run(scan, args, small.chunk_size), run(scan, window(args, 0, 3, args["Input_States"]), small.chunk_size)
    second = run(scan, window(args, 3, small.l, tuple(first[1:])), small.chunk_size)
    tight(torch.cat((first[0], second[0]), 1), whole[0])
    for i, (x, y) in enumerate(zip(second[1:], whole[1:])):
        tight(x, y, angle=i == 0)


def packed(scan, small):
    """Packed sequences against the float64 loop run per sequence (states included)."""
    lens = [3, 1, 5]
    case = dataclasses.replace(small, b=1, l=sum(lens), chunk_size=2, seed=5)
    args = inputs(case, S=len(lens))
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)
    got = run(scan, args, 2, cu_seqlens=cu)
    spec = loop.mamba3_scan if small.R is None else loop.mamba3_mimo
    for i, (s, e) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        alone = run(spec, window(args, s, e, tuple(x[i:i + 1] for x in args["Input_States"])))
        tight(got[0][:, s:e], alone[0])
        for j, (x, y) in enumerate(zip(got[1:], alone[1:])):
            tight(x[i:i + 1], y, angle=j == 0)


def long_float32(scan, small):
    """Many tokens in float32 with large, same-signed angle increments: an angle sum never reduced
    mod 2 pi loses float32's absolute precision as it grows (ulp(theta) ~ eps theta per token)."""
    case = Case(b=1, l=4000, h_qk=1, groups=1, p=1, n=2, n_ang=1, dtype="f32", states=False, D=False, Z=False,
                chunk_size=64, seed=7, R=None if small.R is None else 1)
    args = inputs(case)
    args["Angles"] = args["Angles"].abs() + 1
    args["DT"] = args["DT"] * 20
    check("long f32", run(scan, args, 64), args)


CHECKS = {"values f64": values, "values f32": lambda scan, small: values(scan, small, dtype="f32"),
          "length one": lambda scan, small: values(scan, small, l=1), "split": split, "packed": packed,
          "long f32": long_float32}


def first_failure(scan, small):
    for name, check_ in CHECKS.items():
        try:
            check_(scan, small)
        except AssertionError:
            return name
    return None


def each(interface, named):
    return [pytest.param(interface, name, marks=pytest.mark.family(FAMILY[interface]), id=f"{interface}-{name}")
            for name in named]


@pytest.mark.parametrize("interface, name", each("siso", test_spec.SCANS) + each("mimo", test_mimo.SCANS))
def test_correct_scans_pass(interface, name):
    scans = test_spec.SCANS if interface == "siso" else test_mimo.SCANS
    assert first_failure(scans[name], SMALL[interface]) is None


@pytest.mark.parametrize("interface, bug", each("siso", VARIANTS) + each("mimo", MIMO_BUGS))
def test_planted_bug_is_caught(interface, bug):
    bugs = VARIANTS if interface == "siso" else MIMO_BUGS
    assert first_failure(bugs[bug], SMALL[interface]) is not None, f"{bug} passed every check"


@pytest.mark.family("mamba3_mimo")
def test_each_mimo_bug_is_caught_where_expected():
    """The l = 1 bug only by the length-one check, the packed v state only by the packed check: the
    checks that catch them are the ones that name their cause."""
    assert first_failure(MIMO_BUGS["l1_drops_input_kv"], SMALL["mimo"]) == "length one"
    assert first_failure(MIMO_BUGS["v_state_from_pack_end"], SMALL["mimo"]) == "packed"
