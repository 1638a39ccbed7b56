"""Scan speed grid: forward (and forward + backward) time of each scan beside a floor, in one run.

A sweep module for benchmarks/runner.py. The grid is b·d·n ∈ {1k, 16k, 262k} elements per time step
× l ∈ {512, 2048, 8192} (the default sweep leaves out 262k, which alone takes ~3 minutes here;
--long has it), float32, 2 threads, with the arguments a Mamba block passes (D, z,
delta_bias, softplus; no initial_state, which mamba.py's pscan lacks). Implementations:

    loop, parallel   registered scans, through impls.selective_scan
    mambapy          the mambapy package's pscan (a pure-PyTorch Blelloch scan over (b, l, d, n)
                     tensors), registered through its adapter (impls/mambapy_adapter.py), which the
                     equivalence suite checks like every implementation
    floor            one elementwise pass computing exp(dt ⊗ A) over all b·d·l·n elements, written
                     exactly so: torch.exp(dt.unsqueeze(-1) * A.unsqueeze(1)), which allocates the
                     full (b, d, l, n) tensor; no scan does less. Past a few tens of MB page faults
                     are most of its time; below, the C library hands the freed block back to the
                     next call and it costs about what the in-place floor does
    floor_inplace    the same two ops into a preallocated buffer, recorded beside it

Every implementation at a point is measured right after the others (points are ordered so), and the
report divides by the floor of the same run. "long" adds forward + backward at l = 2048 (gradients
of every input) and the memory point b=1, d=1536, n=16, l=65,536, run in a fresh process so that
its peak resident memory is its own (the full (b, d, l, n) float32 tensor there would be 6.4 GB).

The thread count is 2 (the grid's setting); SCAN_GRID_THREADS=1 in the environment measures the
same grid on one thread instead (a different point key), which is what stays comparable on a
machine where other processes keep a core busy: there a 2-thread run waits on a descheduled thread
at every parallel region, and an implementation is slowed by its number of ops, not its work.

Points whose estimated memory would not fit in what the machine has free are refused with a
MemoryError (recorded by the runner, visible in the report); a floor whose tensor alone would be
over FLOOR_PIECE_BYTES is run over l in pieces, each allocated and freed in turn (floor_pieces).
"""

import json
import os
import subprocess
import sys

import torch

import impls
from .common import peak_rss_during, time_call

ELEMENTS = {"1k": dict(b=1, d=64, n=16), "16k": dict(b=1, d=1024, n=16), "262k": dict(b=4, d=4096, n=16)}
LENGTHS = (512, 2048, 8192)
IMPLS = ("loop", "parallel", "mambapy", "floor")   # floor brings floor_inplace with it
MEMORY_POINT = dict(b=1, d=1536, n=16, l=65536)
THREADS = int(os.environ.get("SCAN_GRID_THREADS", "2"))
FLOOR_PIECE_BYTES = 2 << 30
# Peak memory of one call, in full (b, d, l, n) float32 tensors, for refusing what cannot fit.
FULL_TENSORS = {("mambapy", "forward"): 5, ("mambapy", "forward+backward"): 9,
                ("loop", "forward+backward"): 6}


def points(size, names):
    """Grid points: one dict per (elements per step, l, direction, implementation).

    names: None for IMPLS and every implementation an installed package registered (a plugin);
    otherwise those of IMPLS (and floor_inplace) it lists, plus any other registered implementation
    it names (run through impls.selective_scan like loop and parallel)."""
    if names is None:
        names = [*IMPLS, "floor_inplace", *(n for n in impls.names() if n not in impls.BUILTIN)]
    chosen = [i for i in IMPLS if i in names]
    if "floor_inplace" in names and "floor" not in chosen:
        chosen.append("floor")
    chosen += [i for i in names if i not in IMPLS and i != "floor_inplace" and i in impls.names()]

    def expand(shape, l, direction, which):
        out = []
        for name in which:
            for impl in (("floor", "floor_inplace") if name == "floor" else (name,)):
                if impl not in names and name not in names:
                    continue
                out.append(dict(impl=impl, **shape, l=l, dtype="float32", threads=THREADS, direction=direction))
        return out

    if size == "quick":
        grid = [("1k", 512), ("1k", 2048), ("16k", 512)]
    elif size == "default":  # the 262k row alone takes ~3 minutes here (the loop: 18 s a call at l = 8192)
        grid = [(e, l) for e in ELEMENTS if e != "262k" for l in LENGTHS]
    else:
        grid = [(e, l) for e in ELEMENTS for l in LENGTHS]
    out = []
    for e, l in grid:
        out += expand(ELEMENTS[e], l, "forward", chosen)
    if size == "long":
        for e in ELEMENTS:
            out += expand(ELEMENTS[e], 2048, "forward+backward", [i for i in chosen if i != "floor"])
        shape = {k: v for k, v in MEMORY_POINT.items() if k != "l"}
        out += expand(shape, MEMORY_POINT["l"], "forward", [i for i in chosen if i in ("parallel", "loop")])
    return out


def make_inputs(b, d, n, l, seed=0, requires_grad=False, gate=True):
    """Mamba-initialised float32 arguments, built in place (no float64 copies: the memory point
    measures the scan, not the input generation). A = -(1..n); dt log-uniform in [1e-3, 0.1],
    stored through the inverse softplus as delta + delta_bias."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, l, generator=gen)
    delta = torch.rand(b, d, l, generator=gen).mul_(torch.log(torch.tensor(100.0))).add_(torch.log(torch.tensor(1e-3)))
    delta.exp_().expm1_().log_()                      # inverse softplus of dt
    delta_bias = 0.1 * torch.randn(d, generator=gen)
    delta -= delta_bias[:, None]
    x = dict(u=u, delta=delta, A=-torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1),
             B=torch.randn(b, n, l, generator=gen), C=torch.randn(b, n, l, generator=gen),
             D=torch.ones(d), z=torch.randn(b, d, l, generator=gen) if gate else None, delta_bias=delta_bias,
             delta_softplus=True)
    if requires_grad:
        for v in x.values():
            if isinstance(v, torch.Tensor):
                v.requires_grad_()
    return x


def _available_bytes():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def _refuse_if_too_big(point, full_bytes):
    need = FULL_TENSORS.get((point["impl"], point["direction"]), 0) * full_bytes
    free = _available_bytes()
    if need and free is not None and need > 0.6 * free:
        raise MemoryError(f"{point['impl']} {point['direction']} needs about {need / 2**30:.1f} GiB "
                          f"({FULL_TENSORS[(point['impl'], point['direction'])]} full tensors), "
                          f"{free / 2**30:.1f} GiB available")


def _floor_call(point, inplace):
    """exp(dt ⊗ A) over all b·d·l·n elements, in pieces along l if the tensor alone is too big."""
    b, d, n, l = point["b"], point["d"], point["n"], point["l"]
    gen = torch.Generator().manual_seed(0)
    dt = torch.rand(b, d, l, generator=gen) * 0.1
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)
    pieces = -(-b * d * l * n * 4 // FLOOR_PIECE_BYTES)
    step = -(-l // pieces)
    slices = [dt[..., i:i + step] for i in range(0, l, step)]
    if not inplace:
        def fn():
            for s in slices:
                torch.exp(s.unsqueeze(-1) * A.unsqueeze(1))
    else:
        buf = torch.empty(b, d, step, n)

        def fn():
            for s in slices:
                out = buf[:, :, :s.shape[-1]]
                torch.mul(s.unsqueeze(-1), A.unsqueeze(1), out=out)
                out.exp_()
    return fn, len(slices)


def _scan_call(point):
    b, d, n, l = point["b"], point["d"], point["n"], point["l"]
    backward = point["direction"] == "forward+backward"
    x = make_inputs(b, d, n, l, requires_grad=backward)
    def forward():
        return impls.selective_scan(**x, impl=point["impl"])
    if not backward:
        return forward
    leaves = [v for v in x.values() if isinstance(v, torch.Tensor)]
    gy = torch.randn(b, d, l, generator=torch.Generator().manual_seed(1))

    def forward_backward():
        return torch.autograd.grad(forward(), leaves, gy)
    return forward_backward


def measure(point):
    """median_s, iqr_s, runs, times_s; peak_rss_bytes and rss_before_bytes of the first call."""
    torch.set_num_threads(point["threads"])
    if all(point[k] == v for k, v in MEMORY_POINT.items()):
        return _in_fresh_process(point)
    full_bytes = point["b"] * point["d"] * point["l"] * point["n"] * 4
    _refuse_if_too_big(point, full_bytes)
    extra = {}
    if point["impl"] in ("floor", "floor_inplace"):
        fn, pieces = _floor_call(point, point["impl"] == "floor_inplace")
        extra["floor_pieces"] = pieces
    else:
        fn = _scan_call(point)
    out, peak, before = peak_rss_during(fn)          # the warm-up call, watched for memory
    del out                                          # (kept, it would be counted in the next call's peak)
    result = time_call(fn, min_run_time=1.0, warmup=0)
    return dict(result, peak_rss_bytes=peak, rss_before_bytes=before, full_tensor_bytes=full_bytes, **extra)


def _in_fresh_process(point):
    """Run the point in a new Python process: its peak resident memory (VmHWM) is then the
    arguments, the output and the scan's own memory, nothing left over from earlier points."""
    code = f"import json, benchmarks.scan_grid as g; print(json.dumps(g._child({point!r})))"
    env = dict(os.environ, OMP_NUM_THREADS=str(point["threads"]))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"child process failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _high_water_bytes():
    """This process's peak resident memory since its exec (VmHWM). Not ru_maxrss: Linux carries
    that over from the forking parent, whose memory a fresh process does not hold."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(point):
    torch.set_num_threads(point["threads"])
    # the scan alone: u, delta, B, C, D, delta_bias (a gate z would add 0.4 GB of input, not of scan)
    x = make_inputs(point["b"], point["d"], point["n"], point["l"], gate=False)

    def fn():
        return impls.selective_scan(**x, impl=point["impl"])
    out, peak, before = peak_rss_during(fn)
    del out
    result = time_call(fn, min_run_time=1.0, warmup=0)
    result.update(peak_rss_bytes=max(peak, _high_water_bytes()), rss_before_bytes=before,
                  full_tensor_bytes=point["b"] * point["d"] * point["l"] * point["n"] * 4, gate=False)
    return result
