"""The SSD suite catches real bugs: for each planted SSD bug (equivalence/ssd_planted_bugs.py)
hypothesis finds a case that the SSD checks reject, and the correct control is rejected by none.
Also through the command line, as a kernel author runs it (--ssd-impl MODULE:FUNCTION)."""

import subprocess
import sys

import pytest
from hypothesis import HealthCheck, Phase, find, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample

import impls
from . import ssd_planted_bugs
from .ssd_cases import cases
from .ssd_checks import check_causality, check_split, check_values

SEARCH = settings(max_examples=300, database=None, derandomize=True, deadline=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
# Smaller than the suite's drawn cases (the planted scan is a Python loop over chunks): still every
# option, several chunks of the chunk sizes 1, 2 and 17, and l not a multiple of them.
DRAWN = st.tuples(cases(max_b=2, max_l=80, max_h=6, max_p=4, max_n=8), st.integers(0, 80))


def rejected(name, drawn):
    case, k = drawn
    try:
        check_values(name, case)
        check_split(name, case, k)
        check_causality(name, case, k)
    except AssertionError:
        return True
    return False


def _register(name):
    key = f"planted_ssd:{name}"
    if key not in impls.names("ssd"):
        impls.register(key, getattr(ssd_planted_bugs, name), family="ssd")
    return key


@pytest.mark.parametrize("bug", ssd_planted_bugs.BUGS)
def test_ssd_suite_finds_the_planted_bug(bug):
    name = _register(bug)
    find(DRAWN, lambda drawn: rejected(name, drawn), settings=SEARCH)


def test_ssd_suite_accepts_the_correct_control():
    name = _register("correct")
    with pytest.raises(NoSuchExample):
        find(DRAWN, lambda drawn: rejected(name, drawn), settings=settings(SEARCH, max_examples=40))


def test_ssd_command_line_plugin():
    """One run with a planted bug and the control, each plugged in by --ssd-impl MODULE:FUNCTION:
    the bug's value test fails, the control's passes."""
    bug, control = (f"equivalence.ssd_planted_bugs:{name}" for name in ("carry_lost_at_chunk", "correct"))
    cmd = [sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider", "--hypothesis-profile", "ci",
           f"--ssd-impl={bug}", f"--ssd-impl={control}", "equivalence/test_ssd_values.py"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    test = "equivalence/test_ssd_values.py::test_ssd_values_and_final_states"
    assert f"FAILED {test}[{bug}]" in run.stdout, run.stdout[-3000:]
    assert f"PASSED {test}[{control}]" in run.stdout, run.stdout[-3000:]
