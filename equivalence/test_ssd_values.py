"""Every SSD implementation against the float64 SSD loop, in out and final_states, on drawn cases."""

from hypothesis import example, given

from .ssd_cases import PINNED, cases
from .ssd_checks import check_values


def _pinned(test):
    for case in PINNED:
        test = example(case=case)(test)
    return test


@_pinned
@given(case=cases())
def test_ssd_values_and_final_states(ssd_impl, case):
    check_values(ssd_impl, case)
