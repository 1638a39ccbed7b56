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
from .properties import NONFINITE, SSD, fresh_memory, property_checks
from .ssd_cases import CHUNK_SIZES, TIME_ARGS, cases
from .ssd_checks import (check_batch_independence, check_causality, check_chunk_size_invariance,
                         check_gradients, check_nonfinite_propagation, check_split, check_values)

SEARCH = settings(max_examples=300, database=None, derandomize=True, deadline=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
# Smaller than the suite's drawn cases (the planted scan is a Python loop over chunks): still every
# option, several chunks of the chunk sizes 1, 2 and 17, and l not a multiple of them.
# Also a non-finite value for the non-finite causality check.
DRAWN = st.tuples(cases(max_b=2, max_l=80, max_h=6, max_p=4, max_n=8), st.integers(0, 80), st.sampled_from(tuple(NONFINITE)))
# the size the four properties' checks fold each drawn case to
SMALL = dict(b=2, l=24, h=4, p=4, n=6)


def checks(name, drawn):
    """{property: a call of its check} on one drawn case, in the order the search runs them: the
    four properties of equivalence/properties.py first, on the case folded small (they need no long
    sequence, and every planted scan is a Python loop), then the checks of values and invariants."""
    case, k, poison = drawn
    small = case.within(SMALL)
    return {
        **property_checks(SSD, name, small, k, poison),
        "values": lambda: check_values(name, case),
        "split": lambda: check_split(name, case, k),
        "causality": lambda: check_causality(name, case, k),
    }


def rejected(name, drawn, only=None):
    """Whether a check rejects ``name`` on the drawn case (with ``only``, that one check).
    Fresh memory is zero throughout (as a CPU often gives it; the unwritten-memory check fills it
    with NaN for its own calls): stale memory would make a bug that reads memory it never wrote fail
    other checks only by chance, and hypothesis could not replay what it found."""
    try:
        with fresh_memory(0.0):
            for prop, check in checks(name, drawn).items():
                if only in (None, prop):
                    check()
    except AssertionError:
        return True
    return False


def _register(name):
    """Register a planted scan by name. They are written row by row, so they claim batch_invariant
    (the bit-for-bit check runs on them)."""
    key = f"planted_ssd:{name}"
    if key not in impls.names("ssd"):
        impls.register(key, getattr(ssd_planted_bugs, name), family="ssd",
                       **{"batch_invariant": True, **ssd_planted_bugs.CAPABILITIES.get(name, {})})
    return key


@pytest.mark.parametrize("bug", ssd_planted_bugs.BUGS)
def test_ssd_suite_finds_the_planted_bug(bug):
    name = _register(bug)
    find(DRAWN, lambda drawn: rejected(name, drawn), settings=SEARCH)


# The bugs that only one property catches, and that property
ONLY = {"gradient_order_by_call": "determinism", "chunk_size_by_batch": "batch invariance",
        "unwritten_chunk_padding": "unwritten memory", "guarded_path_on_nonfinite_chunk": "non-finite causality"}


@pytest.mark.parametrize("bug", ONLY)
def test_ssd_only_its_property_catches_the_planted_bug(bug):
    """Hypothesis finds a case its property rejects; on that case every other SSD check passes, those
    the search runs and batch independence, chunk-size invariance, non-finite propagation and the
    gradients too. Fresh memory is zero there (as a CPU often gives it): what a NaN fill exposes,
    stale memory would show only by chance."""
    name = _register(bug)
    drawn = find(DRAWN, lambda drawn: rejected(name, drawn, only=ONLY[bug]), settings=SEARCH)
    case, k, poison = drawn
    arg = TIME_ARGS[k % len(TIME_ARGS)]   # the non-finite propagation check takes one argument
    others = {**checks(name, drawn), "batch independence": lambda: check_batch_independence(name, case, k),
              "chunk sizes": lambda: check_chunk_size_invariance(name, case, CHUNK_SIZES),
              "non-finite propagation": lambda: check_nonfinite_propagation(name, case, arg, k, poison),
              "gradients": lambda: check_gradients(name, case)}
    with fresh_memory(0.0):
        for prop, check in others.items():
            if prop != ONLY[bug]:
                check()


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
