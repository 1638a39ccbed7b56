"""Every implementation of every family against the float64 loop, in values and last state, on
drawn cases.

These run first (equivalence/plugin.py orders values, then invariants, then gradients), and the
drawn tests before the pinned edge cases: hypothesis shrinks a drawn failure to a case that cannot
be made smaller, which is the one a kernel author should see first. The pinned cases (long
sequences, half dtypes, strides) are tests of their own, so they never pre-empt a drawn, shrunk
failure. Mamba-1's own value tests are in equivalence/selective/test_values.py.
"""

from hypothesis import given
from hypothesis import strategies as st

from .properties import check_values


@given(data=st.data())
def test_values_and_last_state(family, impl, data):
    check_values(family, impl, data.draw(family.STRATEGIES["values"], label="case"))


def test_pinned_edge_case(family, impl, pinned_case):
    check_values(family, impl, pinned_case)
