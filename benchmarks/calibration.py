"""A fixed unit of work measured at the start of every sweep: the floor operation of the scan grid
(one exp(dt ⊗ A) pass) at one size. Timings divided by it compare across machines, so a slower
machine is not mistaken for a slower kernel (see reports/check.py)."""

import torch

from .common import time_call

SHAPE = dict(b=1, d=256, l=2048, n=16)


def points(size, impls):
    return [dict(SHAPE, op="floor")]


def measure(point):
    gen = torch.Generator().manual_seed(0)
    dt = torch.rand(point["b"], point["d"], point["l"], generator=gen)
    A = -torch.rand(point["d"], point["n"], generator=gen)
    return time_call(lambda: torch.exp(dt.unsqueeze(-1) * A[:, None, :]), min_run_time=0.3)
