"""Every implementation against the float64 loop, in values and last_state, on drawn cases."""

from hypothesis import example, given

from .cases import PINNED, cases
from .checks import check_values


def _pinned(test):
    for case in PINNED:
        test = example(case=case)(test)
    return test


@_pinned
@given(case=cases())
def test_values_and_last_state(impl, case):
    check_values(impl, case)
