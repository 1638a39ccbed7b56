"""The suite catches real bugs: for each planted bug of each family (equivalence/<family>/planted_bugs.py)
hypothesis finds a case that the checks reject, and the correct control is rejected by none. Also
through the command line, as a kernel author runs it."""

import dataclasses
import os
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, Phase, find, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample

import impls

from . import properties, selective, ssd
from .diagnose import what_it_needs
from .properties import (NONFINITE, CaseFailure, check_batch_independence, check_causality,
                         check_chunk_size_invariance, check_gradients, check_nonfinite, check_split, check_values,
                         family, fresh_memory, property_checks, register_planted)
from .selective import Case, planted_bugs

SEARCH = settings(max_examples=300, database=None, derandomize=True, deadline=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
ROOT = os.path.join(os.path.dirname(__file__), os.pardir)   # where equivalence/ is: the checkout's root, or site-packages
FAMILIES = [f for f in impls.FAMILIES if properties.wired(f) and hasattr(family(f), "planted_bugs")]


def drawn(fam):
    """What the property tests draw: a case, a position, and a non-finite value for the non-finite checks."""
    return st.tuples(fam.STRATEGIES["planted"], fam.STRATEGIES["planted_positions"], st.sampled_from(tuple(NONFINITE)))


def checks(fam, name, drawn):
    """{property: a call of its check} on one drawn case, in the order the search runs them: the
    five properties of equivalence/properties.py first, on the case folded small (they need no long
    sequence, and every planted scan is a Python loop), then the checks of values and invariants."""
    case, k, poison = drawn
    return {
        **property_checks(fam, name, case.within(fam.PLANTED_SMALL), k, poison),
        "values": lambda: check_values(fam, name, case),
        "split": lambda: check_split(fam, name, case, k),
        "causality": lambda: check_causality(fam, name, case, k),
        "batch independence": lambda: check_batch_independence(fam, name, case, k),
    }


def rejected(fam, name, drawn, only=None):
    """Whether a check rejects ``name`` on the drawn case (with ``only``, that one check). A case
    with a non-finite input (Case.poison) is a values test only, as in selective/test_values.py.
    Fresh memory is zero throughout (as a CPU often gives it; the unwritten-memory check fills it
    with NaN for its own calls): stale memory would make a bug that reads memory it never wrote fail
    other checks only by chance, and hypothesis could not replay what it found."""
    todo = checks(fam, name, drawn)
    if getattr(drawn[0], "poison", ()):
        todo = {"values": todo["values"]}
    try:
        with fresh_memory(0.0):
            for prop, check in todo.items():
                if only in (None, prop):
                    check()
    except AssertionError:
        return True
    return False


def each(what):
    return [pytest.param(family(f), bug, id=f"{f}-{bug}") for f in FAMILIES for bug in getattr(family(f).planted_bugs, what)]


@pytest.mark.parametrize("fam, bug", each("BUGS"))
def test_suite_finds_the_planted_bug(fam, bug):
    name = register_planted(fam, bug)
    find(drawn(fam), lambda d: rejected(fam, name, d), settings=SEARCH)


@pytest.mark.parametrize("fam, bug", each("ONLY"))
def test_only_its_property_catches_the_planted_bug(fam, bug):
    """Hypothesis finds a case its property rejects; on that case every other check passes, those
    the search runs and non-finite propagation, the gradients and chunk sizes too. Fresh memory is
    zero there (as a CPU often gives it): what a NaN fill exposes, stale memory would show only by chance."""
    name = register_planted(fam, bug)
    prop = fam.planted_bugs.ONLY[bug]
    found = find(drawn(fam), lambda d: rejected(fam, name, d, only=prop), settings=SEARCH)
    case, k, poison = found
    arg = fam.TIME_ARGS[k % len(fam.TIME_ARGS)]
    others = {**checks(fam, name, found), "non-finite": lambda: check_nonfinite(fam, name, case, arg, k, poison),
              "gradients": lambda: check_gradients(fam, name, case)}
    if fam.CHUNK_SIZES:
        others["chunk sizes"] = lambda: check_chunk_size_invariance(fam, name, case, fam.CHUNK_SIZES)
    with fresh_memory(0.0):
        for other, check in others.items():
            if other != prop:
                check()


@pytest.mark.parametrize("fam", [family(f) for f in FAMILIES], ids=FAMILIES)
def test_suite_accepts_the_correct_control(fam):
    name = register_planted(fam, "correct")
    with pytest.raises(NoSuchExample):
        find(drawn(fam), lambda d: rejected(fam, name, d), settings=settings(SEARCH, max_examples=40))


@pytest.mark.parametrize("target, fails", [("missing_softplus", True), ("correct", False)])
def test_command_line_plugin(target, fails):
    """As a kernel author runs it: the header shows the capabilities its tiny calls found (the
    gradients included: a plain function is not assumed to lack them); a failure comes on the
    shrunk case, says what it needs, and its reproduce line runs as-is in a plain script."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-p", "no:cacheprovider", "--hypothesis-profile", "ci",
           f"--impl=equivalence.selective.planted_bugs:{target}", "equivalence/test_values.py"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert (run.returncode != 0) == fails, run.stdout[-3000:]
    assert f"equivalence.selective.planted_bugs:{target}" in run.stdout
    assert "'gradients': True" in run.stdout and "(probed by tiny calls; refused: {'varlen'" in run.stdout, run.stdout[:3000]
    if fails:
        assert "what the failure needs" in run.stdout and "fails only with softplus" in run.stdout, run.stdout[-3000:]
        line = re.search(r"reproduce: (.*)", run.stdout).group(1)
        script = subprocess.run([sys.executable, "-c", line + "; print(out[0].shape)"], capture_output=True,
                                text=True, timeout=300)
        assert script.returncode == 0 and "torch.Size" in script.stdout, (line, script.stderr[-2000:])


@pytest.mark.parametrize("bug, case, needs", [
    ("wrong_group_mapping", Case(b=2, d=12, n=3, l=9, g=3, initial_state=True, seed=5), "fails only with g > 1 and d/g > 1"),
    ("batch_leak", Case(b=3, d=2, n=2, l=4, z=False, seed=6), "b >= 2 (passes at b = 1)"),
    ("state_lost_at_chunk", Case(b=1, d=2, n=2, l=100, D=False, seed=7), "l >= 65 (passes at l = 64)"),
    ("ignored_initial_state", Case(b=1, d=3, n=2, l=5, g=1, initial_state=True, seed=8), "fails only with initial_state"),
])
def test_a_failure_says_what_it_needs(bug, case, needs):
    """The re-runs behind "what the failure needs" name the option or axis each bug depends on."""
    name = register_planted(selective, bug)
    with pytest.raises(CaseFailure) as info:
        check_values(selective, name, case)
    lines = what_it_needs(info.value)
    assert needs in lines[0], lines


@pytest.mark.parametrize("bug, change, needs", [
    ("D_after_gate", {}, "fails only with D and Z"),
    ("ignore_kv_states", dict(D=False, Z=False), "fails only with states"),
    ("heads_mod", dict(h_qk=2, groups=2, states=False), "fails only with h_qk >= 2 (passes at h_qk = 1) and groups >= 2"),
])
def test_a_mamba3_failure_says_what_it_needs(bug, change, needs):
    """Mamba-3's grouping is two sizes, h_qk and groups = h / h_qk, bisected as the others are; its
    options are the states, D, Z and the rotation (n_ang)."""
    fam = family("mamba3")
    name = register_planted(fam, bug)
    case = dataclasses.replace(fam.Case(b=1, l=3, p=2, n=4, n_ang=1, seed=3), **change)
    with pytest.raises(CaseFailure) as info:
        check_values(fam, name, case)
    lines = what_it_needs(info.value)
    assert lines[0].startswith(needs), lines


def _looks_ahead(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
                 return_last_state=False):
    """The correct scan, plus a small share of the next token's input: information flows backwards."""
    out = planted_bugs.correct(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_last_state)
    y, last = out if return_last_state else (out, None)
    y = y + 1e-3 * torch.cat([u[..., 1:], torch.zeros_like(u[..., :1])], -1)
    return (y, last) if return_last_state else y


def _mixes_channels(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
                    return_last_state=False):
    """The correct scan, plus a share of the mean over channels: a NaN leaks into other channels."""
    out = planted_bugs.correct(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_last_state)
    y, last = out if return_last_state else (out, None)
    y = y + 1e-3 * u.mean(1, keepdim=True)
    return (y, last) if return_last_state else y


def test_causality_and_nan_failures_name_the_positions():
    """The failure says which output changed and which input changed it, and how the information flowed."""
    for key, fn in (("test-looks-ahead", _looks_ahead), ("test-mixes-channels", _mixes_channels)):
        if key not in impls.names():
            impls.register(key, fn)
    case = Case(b=1, d=3, n=2, l=6, seed=3)
    with pytest.raises(CaseFailure, match=r"output \(batch row 0, channel \d, t=2\) changed by input t=3: "
                                          r"information flowed backwards in time"):
        check_causality(selective, "test-looks-ahead", case, 3)
    with pytest.raises(CaseFailure, match=r"u = nan at token 3 \(batch row 0, first element\): y is nan where the "
                                          r"loop's is .*, first \(batch row 0, channel 0, t=2\): information flowed backwards"):
        check_nonfinite(selective, "test-looks-ahead", case, "u", 3, "nan")
    with pytest.raises(CaseFailure, match=r"u = nan at token 3 \(batch row 0, first element\): y is nan where the "
                                          r"loop's is .*, first \(batch row 0, channel 1, t=3\): it leaked into another channel"):
        check_nonfinite(selective, "test-mixes-channels", case, "u", 3, "nan")


def test_ssd_command_line_plugin():
    """One run with a planted SSD bug and the control, each plugged in by --ssd-impl MODULE:FUNCTION:
    the bug's value test fails, the control's passes."""
    bug, control = (f"equivalence.ssd.planted_bugs:{name}" for name in ("carry_lost_at_chunk", "correct"))
    cmd = [sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider", "--hypothesis-profile", "ci",
           f"--ssd-impl={bug}", f"--ssd-impl={control}", "equivalence/test_values.py", "-k", "test_values_and_last_state"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    test = "equivalence/test_values.py::test_values_and_last_state"
    assert f"FAILED {test}[ssd-{bug}]" in run.stdout, run.stdout[-3000:]
    assert f"PASSED {test}[ssd-{control}]" in run.stdout, run.stdout[-3000:]


def test_an_ssd_plain_function_is_met_as_a_mamba1_one():
    """--ssd-impl MODULE:FUNCTION, as a kernel author runs it on the whole suite with -x: its
    gradients are probed (and so checked); a forward bug (head i reads group i % g) fails first in a
    values test, on a shrunk case, saying what it needs; its reproduce line runs as-is in a script."""
    target = "equivalence.ssd.planted_bugs:wrong_group_mapping"
    # one seed whose drawn cases (the ci profile's) include a grouped one with h/g > 1 (about one draw
    # in seven has one): what is checked is the order the failures are met in and what they say, not
    # the search
    cmd = [sys.executable, "-m", "pytest", "-x", "-p", "no:cacheprovider", "-p", "no:xdist", "--hypothesis-profile",
           "ci", "--hypothesis-seed", "1", f"--ssd-impl={target}", "equivalence/test_model2.py",
           "equivalence/test_gradients.py", "equivalence/test_values.py"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert "'gradients': True" in run.stdout and "(probed by tiny calls; refused: {'varlen'" in run.stdout, run.stdout[:3000]
    first = re.search(r"^FAILED (\S+)", run.stdout, re.M).group(1)
    assert first.startswith("equivalence/test_values.py::test_values_and_last_state"), run.stdout[-3000:]
    assert "fails only with g > 1 and h/g > 1" in run.stdout, run.stdout[-3000:]
    line = re.search(r"reproduce: (.*)", run.stdout).group(1)
    script = subprocess.run([sys.executable, "-c", line + "; print(out[0].shape)"], capture_output=True, text=True,
                            timeout=300, cwd="/")
    assert script.returncode == 0 and "torch.Size" in script.stdout, (line, script.stderr[-2000:])


def test_an_ssd_plain_functions_gradients_are_checked():
    """A differentiable plain SSD function has its gradient tests run, not skipped as a declared gap."""
    target = "equivalence.ssd.planted_bugs:correct"
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "--hypothesis-profile", "ci",
           "-rs", f"--ssd-impl={target}", "equivalence/test_gradients.py", "-k", "test_pinned_gradients"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0 and "1 passed" in run.stdout and "declared gap" not in run.stdout, run.stdout[-3000:]
