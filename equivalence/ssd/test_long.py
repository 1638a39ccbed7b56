"""Pinned long SSD cases, in tests of their own (so hypothesis still shrinks the drawn ones):
sequences of thousands of tokens, past many chunk boundaries and not a multiple of the chunk size,
in the three regimes, against the float64 loop."""

import pytest

from . import SSDCase, check_split, check_values

pytestmark = pytest.mark.family("ssd")

LONG = {
    "mamba2-l3001-cs256-bf16": SSDCase(b=1, l=3001, h=4, p=8, n=16, g=2, dtype="bf16", D="hp", initial_states=True,
                                       chunk_size=256, seed=11),
    "stress-l2500-cs17": SSDCase(b=2, l=2500, h=3, p=5, n=8, g=1, regime="stress", extreme_dt=True, chunk_size=17, seed=12),
    "slow-l4096-cs64-tight": SSDCase(b=1, l=4096, h=2, p=4, n=32, g=2, regime="slow", dt_limit="tight", softplus=False,
                                     chunk_size=64, seed=13),
    "slow-l2049-cs256": SSDCase(b=1, l=2049, h=2, p=3, n=8, g=1, regime="slow", initial_states=True, chunk_size=256, seed=14),
}


@pytest.mark.parametrize("case", LONG.values(), ids=LONG.keys())
def test_long_values(ssd_impl, case):
    check_values(ssd_impl, case)


@pytest.mark.parametrize("case", [LONG["slow-l4096-cs64-tight"], LONG["mamba2-l3001-cs256-bf16"]],
                         ids=["slow-l4096-cs64-tight", "mamba2-l3001-cs256-bf16"])
def test_long_split_then_continue(ssd_continuing_impl, case):
    check_split(ssd_continuing_impl, case, 1537)
