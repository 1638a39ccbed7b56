"""A kernel whose error sits near the bound is pushed over it by hypothesis' targeted search. The
bug, why it hides and the search are described in equivalence/targeted_search.py; how often random
draws of the same budget find it instead is a measurement (docs/tolerance.md), not a test: which
cases a seed draws changes with every constant in the project's source, which hypothesis mixes into
its draws, so no fixed seed's outcome is a stable fact.
"""

import dataclasses

import pytest

from . import selective
from .properties import CaseFailure, check_values, register_planted
from .selective import Case
from .targeted_search import BUG, SEARCHES, search

# Mamba's initialisation with 16 states, an initial state and one token: each decay is most of its
# state's value, and the bound has not yet grown with the sequence
CORNER = Case(b=1, d=16, n=16, l=1, regime="mamba", D=False, z=False, delta_bias=False, softplus=False,
              initial_state=True, seed=1)
# Measured, the targeted search finds the bug under about half of all seeds: twenty misses in a row
# would mean a rate below one in twenty, and a change to look at
SEEDS = range(20)


def test_the_bug_crosses_the_bound_only_in_its_corner():
    """The bug is small: it fails the corner case, passes the same case sixteen tokens long (the
    bound counts the ulps of every decay so far, the error only those of the decays still felt),
    and the correct control passes the corner case."""
    name = register_planted(selective, BUG)
    with pytest.raises(CaseFailure, match="last state"):
        check_values(selective, name, CORNER)
    check_values(selective, name, dataclasses.replace(CORNER, l=16))
    check_values(selective, register_planted(selective, "correct"), CORNER)


def test_the_targeted_search_finds_it_in_its_corner():
    """Seeds in turn until one search finds it (the second, on average); what it finds has the
    corner's initial state and one or two tokens."""
    found = next((case for case in (search(SEARCHES["targeted"], seed) for seed in SEEDS) if case), None)
    assert found is not None, f"the targeted search missed the bug under all of seeds {SEEDS}"
    assert found.initial_state and found.l <= 2, found
