"""pytest-benchmark groups for the scan: a couple of points of the scan grid (benchmarks/scan_grid.py).

    .venv/bin/pytest benchmarks/test_bench_scan.py                        # time, 2 threads
    .venv/bin/pytest benchmarks/test_bench_scan.py --benchmark-disable    # run each once (CI)
    .venv/bin/pytest benchmarks/test_bench_scan.py --benchmark-json out.json

Group "scan-forward": loop, parallel, mambapy's pscan and the floor (one exp(dt ⊗ A) pass over
all b·d·l·n elements, in place into a buffer made outside the timed call) side by side at each point. Group "scan-forward-backward":
parallel's forward alone beside forward + backward (gradients of every input). Nothing here
asserts a time; compare within one run (the machine is shared and times drift between runs).
"""

import pytest
import torch

import impls
from benchmarks.scan_grid import floor_call, make_inputs

POINTS = {"1k-l2048": dict(b=1, d=64, n=16, l=2048), "16k-l512": dict(b=1, d=1024, n=16, l=512)}
SCANS = ("loop", "parallel", "mambapy", "floor")


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    """The grid's setting: 2 threads, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _call(scan, point):
    if scan == "floor":
        return floor_call(point)[0]
    x = make_inputs(**point)
    return lambda: impls.selective_scan(**x, impl=scan)


@pytest.mark.benchmark(group="scan-forward")
@pytest.mark.parametrize("point", list(POINTS))
@pytest.mark.parametrize("scan", SCANS)
def test_forward(benchmark, scan, point):
    benchmark.extra_info.update(POINTS[point], scan=scan, elements_per_step=POINTS[point]["b"] * POINTS[point]["d"] * POINTS[point]["n"])
    benchmark(_call(scan, POINTS[point]))


@pytest.mark.benchmark(group="scan-forward-backward")
@pytest.mark.parametrize("point", list(POINTS))
@pytest.mark.parametrize("direction", ["forward", "forward+backward"])
def test_parallel_forward_backward(benchmark, direction, point):
    x = make_inputs(**POINTS[point], requires_grad=direction == "forward+backward")
    leaves = [v for v in x.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    gy = torch.randn(POINTS[point]["b"], POINTS[point]["d"], POINTS[point]["l"], generator=torch.Generator().manual_seed(1))
    benchmark.extra_info.update(POINTS[point], direction=direction)
    if leaves:
        benchmark(lambda: torch.autograd.grad(impls.selective_scan(**x, impl="parallel"), leaves, gy))
    else:
        benchmark(lambda: impls.selective_scan(**x, impl="parallel"))

