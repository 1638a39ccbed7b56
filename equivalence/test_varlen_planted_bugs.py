"""The varlen properties catch real packed-sequence bugs: for each bug planted in a family's
varlen_planted_bugs.py (equivalence/<family>/) hypothesis finds a case that one of them rejects,
and the correct control is rejected by none."""

import pytest
from hypothesis import HealthCheck, Phase, find, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample

import impls

from .properties import family, wired
from .varlen import check_alone, check_alone_gradients, check_decoding, check_no_crossing, check_prefill

SEARCH = settings(max_examples=200, database=None, derandomize=True, deadline=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
FAMILIES = [f for f in impls.FAMILIES if wired(f) and hasattr(family(f), "varlen_planted_bugs")]


def drawn(fam):
    """A packed case, a sequence, a split point, a decoding order's seed and a number of padding rows."""
    return st.tuples(fam.STRATEGIES["packed_planted"], st.integers(0, 7), st.integers(0, 30),
                     st.integers(0, 2**16), st.integers(0, 2))


def rejected(fam, name, drawn):
    case, i, k, order_seed, padding = drawn
    try:
        check_alone(fam.PACKING, name, case)
        check_no_crossing(fam.PACKING, name, case, i)
        check_prefill(fam.PACKING, name, case, i, k)
        check_decoding(fam.PACKING, name, case, order_seed, padding)
        check_alone_gradients(fam.PACKING, name, case)
    except AssertionError:
        return True
    return False


def register(fam, bug):
    planted = fam.varlen_planted_bugs
    key = f"varlen-planted:{bug}"
    if key not in impls.names(fam.NAME):
        impls.register(key, getattr(planted, bug), step=getattr(planted, f"{bug}_step"), family=fam.NAME,
                       gradients=True, varlen=True)
    return key


@pytest.mark.parametrize("fam, bug", [pytest.param(family(f), bug, id=f"{f}-{bug}") for f in FAMILIES
                                      for bug in family(f).varlen_planted_bugs.BUGS])
def test_varlen_suite_finds_the_planted_bug(fam, bug):
    name = register(fam, bug)
    find(drawn(fam), lambda d: rejected(fam, name, d), settings=SEARCH)


@pytest.mark.parametrize("fam", [family(f) for f in FAMILIES], ids=FAMILIES)
def test_varlen_suite_accepts_the_correct_control(fam):
    name = register(fam, "correct")
    with pytest.raises(NoSuchExample):
        find(drawn(fam), lambda d: rejected(fam, name, d), settings=settings(SEARCH, max_examples=30))
