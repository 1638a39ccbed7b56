"""This kernel's own tests, written against the installed scan suite: its public function (the
front door checks the shapes), its spec (the loop) and its value check under its tolerance policy.

    python -m pytest                 # these, in seconds
    scanbench test my_kernel         # every property of the suite, on drawn and pinned cases

The suite registers the kernel through the entry point in pyproject.toml as it is imported.
"""

import pytest
import torch

import impls
from equivalence import properties, selective


def test_registered_through_the_entry_point():
    assert "my_kernel" in impls.names() and impls.get("my_kernel").module == "my_kernel"


def test_shapes_through_the_front_door():
    b, d, l, n = 2, 4, 7, 3
    u, delta = torch.randn(b, d, l), torch.rand(b, d, l)
    A, B, C = -torch.rand(d, n), torch.randn(b, n, l), torch.randn(b, n, l)
    y, last_state = impls.selective_scan(u, delta, A, B, C, return_last_state=True, impl="my_kernel")
    assert y.shape == (b, d, l) and last_state.shape == (b, d, n)


# The suite's value check (against the float64 loop, within its tolerance policy) on the cases this
# kernel's layout makes worth a look: B and C ungrouped, one group, one channel per group, and
# several channels per group, where the (g, d/g) split matters.
@pytest.mark.parametrize("case", [
    selective.Case(b=2, d=4, n=3, l=9),
    selective.Case(b=1, d=4, n=3, l=9, g=1),
    selective.Case(b=1, d=2, n=3, l=9, g=2),
    selective.Case(b=1, d=6, n=3, l=9, g=2, initial_state=True),
], ids=lambda case: case.id)
def test_values_against_the_suites_loop(case):
    properties.check_values(selective, "my_kernel", case)
