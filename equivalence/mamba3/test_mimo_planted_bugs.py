"""Every planted Mamba-3 MIMO bug (equivalence/mamba3/planted_bugs.py, MIMO_BUGS) is caught by a
values, split, length-one or packed check on a small case, and the correct MIMO scans pass them."""

import dataclasses
import itertools

import pytest
import torch

from equivalence.mamba3.mimo_cases import MimoCase, check_mimo, mimo_inputs, window
from equivalence.mamba3.planted_bugs import MIMO_BUGS
from equivalence.mamba3.test_mimo import SCANS, tight
from impls.mamba3 import loop

SMALL = MimoCase(b=2, l=7, R=3, h_qk=2, groups=2, p=3, n=8, n_ang=3, chunk_size=3, seed=3, norm=True)


def values(scan, **change):
    case = dataclasses.replace(SMALL, **change)
    args = mimo_inputs(case)
    check_mimo(f"values {case.id()}", scan(**args, chunk_size=case.chunk_size, return_state=True), args)


def split(scan):
    """One call against two with all four states carried (float64)."""
    args = mimo_inputs(SMALL)
    run = lambda a: scan(**a, chunk_size=SMALL.chunk_size, return_state=True)
    whole, first = run(args), run(window(args, 0, 3, args["Input_States"]))
    second = run(window(args, 3, SMALL.l, tuple(first[1:])))
    tight(torch.cat((first[0], second[0]), 1), whole[0])
    for i, (x, y) in enumerate(zip(second[1:], whole[1:])):
        tight(x, y, angle=i == 0)


def packed(scan):
    """Packed sequences against the float64 loop run per sequence (states included)."""
    lens = [3, 1, 5]
    case = dataclasses.replace(SMALL, b=1, l=sum(lens), chunk_size=2, seed=5)
    args = mimo_inputs(case, S=len(lens))
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)
    got = scan(**args, chunk_size=2, return_state=True, cu_seqlens=cu)
    for i, (s, e) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        alone = loop.mamba3_mimo(**window(args, s, e, tuple(x[i:i + 1] for x in args["Input_States"])),
                                 return_state=True)
        tight(got[0][:, s:e], alone[0])
        for j, (x, y) in enumerate(zip(got[1:], alone[1:])):
            tight(x[i:i + 1], y, angle=j == 0)


CHECKS = {"values f64": values, "values f32": lambda s: values(s, dtype="f32"), "length one": lambda s: values(s, l=1),
          "split": split, "packed": packed}


def first_failure(scan):
    for name, check in CHECKS.items():
        try:
            check(scan)
        except AssertionError:
            return name
    return None


@pytest.mark.parametrize("name", list(SCANS))
def test_correct_mimo_scans_pass(name):
    assert first_failure(SCANS[name]) is None


@pytest.mark.parametrize("bug", list(MIMO_BUGS))
def test_planted_mimo_bug_is_caught(bug):
    assert first_failure(MIMO_BUGS[bug]) is not None, f"{bug} passed every check"


def test_each_bug_is_caught_where_expected():
    """The l = 1 bug only by the length-one check, the packed v state only by the packed check: the
    checks that catch them are the ones that name their cause."""
    assert first_failure(MIMO_BUGS["l1_drops_input_kv"]) == "length one"
    assert first_failure(MIMO_BUGS["v_state_from_pack_end"]) == "packed"
