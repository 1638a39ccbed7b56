"""The suite catches real bugs: for each planted bug hypothesis finds a case that the checks reject,
and the correct control is rejected by none. Also through the command line, as a kernel author runs it."""

import re
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, Phase, find, settings
from hypothesis.errors import NoSuchExample
from hypothesis import strategies as st

import impls
from . import planted_bugs
from .cases import Case, cases
from .checks import (CaseFailure, check_batch_independence, check_causality, check_gradients,
                     check_nan_propagation, check_split, check_values, what_it_needs)
from .properties import NONFINITE, SELECTIVE, fresh_memory, property_checks

SEARCH = settings(max_examples=300, database=None, derandomize=True, deadline=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
# the size the four properties' checks fold each drawn case to
SMALL = dict(b=3, d=8, n=6, l=24)


def checks(name, drawn):
    """{property: a call of its check} on one drawn case, in the order the search runs them: the
    four properties of equivalence/properties.py first, on the case folded small (they need no long
    sequence, and every planted scan is a Python loop), then the checks of values and invariants."""
    case, k, poison = drawn
    small = case.within(SMALL)
    return {
        **property_checks(SELECTIVE, name, small, k, poison),
        "values": lambda: check_values(name, case),
        "split": lambda: check_split(name, case, k),
        "causality": lambda: check_causality(name, case, k),
        "batch independence": lambda: check_batch_independence(name, case, k),
    }


def rejected(name, drawn, only=None):
    """Whether a check rejects ``name`` on the drawn case (with ``only``, that one check). A case
    with a non-finite input is a values test only, as in test_values.py.
    Fresh memory is zero throughout (as a CPU often gives it; the unwritten-memory check fills it
    with NaN for its own calls): stale memory would make a bug that reads memory it never wrote fail
    other checks only by chance, and hypothesis could not replay what it found."""
    todo = checks(name, drawn)
    if drawn[0].poison:
        todo = {"values": todo["values"]}
    try:
        with fresh_memory(0.0):
            for prop, check in todo.items():
                if only in (None, prop):
                    check()
    except AssertionError:
        return True
    return False


def _register(name):
    """Register a planted scan by name. They are written row by row, so they claim batch_invariant
    (the bit-for-bit check runs on them)."""
    key = f"planted:{name}"
    if key not in impls.names():
        impls.register(key, getattr(planted_bugs, name),
                       **{"batch_invariant": True, **planted_bugs.CAPABILITIES.get(name, {})})
    return key


# what the property tests draw: plain cases, and cases with one non-finite input (test_values.py),
# a position, and a non-finite value for the non-finite causality check
DRAWN = st.tuples(st.one_of(cases(), cases(poison=True)), st.integers(0, 300), st.sampled_from(tuple(NONFINITE)))


@pytest.mark.parametrize("bug", planted_bugs.BUGS)
def test_suite_finds_the_planted_bug(bug):
    name = _register(bug)
    find(DRAWN, lambda drawn: rejected(name, drawn), settings=SEARCH)


# The bugs that only one property catches, and that property
ONLY = {"gradient_order_by_call": "determinism", "readout_order_by_batch": "batch invariance",
        "unwritten_padded_lanes": "unwritten memory", "guarded_path_on_nonfinite_dt": "non-finite causality"}


@pytest.mark.parametrize("bug", ONLY)
def test_only_its_property_catches_the_planted_bug(bug):
    """Hypothesis finds a case its property rejects; on that case every other check passes, those
    the search runs and the NaN-propagation and gradient checks too. Fresh memory is zero there (as
    a CPU often gives it): what a NaN fill exposes, stale memory would show only by chance."""
    name = _register(bug)
    drawn = find(DRAWN, lambda drawn: rejected(name, drawn, only=ONLY[bug]), settings=SEARCH)
    case, k = drawn[:2]
    others = {**checks(name, drawn), "NaN propagation": lambda: check_nan_propagation(name, case, k),
              "gradients": lambda: check_gradients(name, case)}
    with fresh_memory(0.0):
        for prop, check in others.items():
            if prop != ONLY[bug]:
                check()


def test_suite_accepts_the_correct_control():
    name = _register("correct")
    examples = DRAWN
    with pytest.raises(NoSuchExample):
        find(examples, lambda drawn: rejected(name, drawn), settings=settings(SEARCH, max_examples=60))


@pytest.mark.parametrize("target, fails", [("missing_softplus", True), ("correct", False)])
def test_command_line_plugin(target, fails):
    """As a kernel author runs it: the header shows the capabilities its tiny calls found (the
    gradients included: a plain function is not assumed to lack them); a failure comes on the
    shrunk case, says what it needs, and its reproduce line runs as-is in a plain script."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-p", "no:cacheprovider", "--hypothesis-profile", "ci",
           f"--impl=equivalence.planted_bugs:{target}", "equivalence/test_values.py"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert (run.returncode != 0) == fails, run.stdout[-3000:]
    assert f"equivalence.planted_bugs:{target}" in run.stdout
    assert "'gradients': True" in run.stdout and "(probed by tiny calls)" in run.stdout, run.stdout[:3000]
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
    name = _register(bug)
    with pytest.raises(CaseFailure) as info:
        check_values(name, case)
    lines = what_it_needs(info.value)
    assert needs in lines[0], lines


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
    with pytest.raises(CaseFailure, match=r"output t=2 \(batch row 0, channel \d\) changed by input t=3: "
                                          r"information flowed backwards in time"):
        check_causality("test-looks-ahead", case, 3)
    with pytest.raises(CaseFailure, match=r"output \(batch row 0, channel 0, t=2\) changed, to nan, by the NaN in "
                                          r"input u at \(batch row 0, channel 0, t=3\): information flowed backwards"):
        check_nan_propagation("test-looks-ahead", case, 3)
    with pytest.raises(CaseFailure, match=r"output \(batch row 0, channel 1, t=3\) changed, to nan, by the NaN in "
                                          r"input u at \(batch row 0, channel 0, t=3\): it leaked into another channel"):
        check_nan_propagation("test-mixes-channels", case, 3)
