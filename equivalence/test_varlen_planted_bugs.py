"""The varlen properties catch real packed-sequence bugs: for each bug planted in
equivalence/varlen_planted_bugs.py hypothesis finds a case that one of them rejects, and the
correct control is rejected by none."""

import pytest
from hypothesis import HealthCheck, Phase, find, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample

import impls

from .selective import varlen_planted_bugs as planted
from .selective.varlen import PACKING, varlen_cases
from .varlen import check_alone, check_alone_gradients, check_decoding, check_no_crossing, check_prefill

SEARCH = settings(max_examples=200, database=None, derandomize=True, deadline=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))

DRAWN = st.tuples(varlen_cases(chunk=planted.CHUNK, dtypes=("f32", "f64"), max_d=4, max_n=3, max_seqs=4,
                               max_total=40),
                  st.integers(0, 7), st.integers(0, 30), st.integers(0, 2**16), st.integers(0, 2))


def rejected(name, drawn):
    case, i, k, order_seed, padding = drawn
    try:
        check_alone(PACKING, name, case)
        check_no_crossing(PACKING, name, case, i)
        check_prefill(PACKING, name, case, i, k)
        check_decoding(PACKING, name, case, order_seed, padding)
        check_alone_gradients(PACKING, name, case)
    except AssertionError:
        return True
    return False


def _register(bug):
    key = f"varlen-planted:{bug}"
    if key not in impls.names():
        impls.register(key, getattr(planted, bug), step=getattr(planted, f"{bug}_step"), gradients=True, varlen=True)
    return key


@pytest.mark.parametrize("bug", planted.BUGS)
def test_varlen_suite_finds_the_planted_bug(bug):
    name = _register(bug)
    find(DRAWN, lambda drawn: rejected(name, drawn), settings=SEARCH)


def test_varlen_suite_accepts_the_correct_control():
    name = _register("correct")
    with pytest.raises(NoSuchExample):
        find(DRAWN, lambda drawn: rejected(name, drawn), settings=settings(SEARCH, max_examples=30))
