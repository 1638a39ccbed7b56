"""Scan speed grid: forward (and forward + backward) time of each scan beside a floor, interleaved.

A sweep module for benchmarks/runner.py. The grid is b·d·n ∈ {1k, 16k, 262k} elements per time step
× l ∈ {512, 2048, 8192} (the default sweep leaves out 262k, which alone takes minutes here; --long
has it), float32, THREADS threads, with the arguments a Mamba block passes (D, z, delta_bias,
softplus; no initial_state, which mamba.py's pscan lacks). Implementations:

    loop, parallel   registered scans, through impls.selective_scan (and every plugin's scan)
    mambapy          the mambapy package's pscan (a pure-PyTorch Blelloch scan over (b, l, d, n)
                     tensors), registered through its adapter (impls/adapters/mambapy.py), which the
                     equivalence suite checks like every implementation
    floor            one elementwise pass computing exp(dt ⊗ A) over all b·d·l·n elements, in
                     place, in pieces along l of at most FLOOR_PIECE_BYTES (1 MiB) into one buffer
                     allocated outside the timed region: torch.mul(dt_piece, A, out=buf); buf.exp_().
                     An allocating floor (torch.exp(dt.unsqueeze(-1) * A)) measured page faults rather
                     than work: 0.38, 0.93 and 29.6 ms at d = 64, l = 512, 2048, 8192. A floor writing
                     the whole tensor to memory measured memory bandwidth, which other processes on a
                     shared machine take: its ratio to a scan that streams through cache (parallel)
                     moved by half between runs. In cache-sized pieces the floor is the exps' work, as
                     the scans' is. It is a unit of work, not a lower bound
Implementations run interpreted (declared ``case_limits``: Triton's interpreter on a CPU) are left
out with a "skipped" record giving the reason.

All implementations at one grid point are one group (``group``), measured interleaved
(benchmarks.common.interleaved: rounds of one block each, order rotated), and each record carries
its ratio to the floor (``ratio``, the median of the per-round ratios, with quartiles and the
``unstable`` flag: benchmarks.common.paired_ratio) and to the best peer (``vs_best_peer``: the
faster of loop and mambapy at that point, per round). "long" adds forward + backward at l = 2048
(gradients of every input) and the memory point b=1, d=1536, n=16, l=65,536, run alone in a fresh
process so that its peak resident memory is its own (the full (b, d, l, n) float32 tensor there
would be 6.4 GB).

Threads: THREADS = 1 (SCAN_GRID_THREADS in the environment changes it; recorded in each point and
its settings). On a machine where other processes keep a core busy, a 2-thread run waits on a
descheduled thread at every parallel region, and an implementation is slowed by its number of ops,
not its work: a ratio between a many-op scan and the two-op floor then measures the load.

Points whose estimated memory would not fit in what the machine has free are refused with a
MemoryError (recorded by the runner, visible in the report).
"""

import json
import os
import time

import torch

import impls
from .common import in_fresh_process, interleaved, paired_ratio, peak_rss_during, status_bytes, time_call

ELEMENTS = {"1k": dict(b=1, d=64, n=16), "16k": dict(b=1, d=1024, n=16), "262k": dict(b=4, d=4096, n=16)}
LENGTHS = (512, 2048, 8192)
IMPLS = ("loop", "parallel", "mambapy", "floor")
PEERS = ("loop", "mambapy")          # the faster of these at a point is the best peer
MEMORY_POINT = dict(b=1, d=1536, n=16, l=65536)
THREADS = int(os.environ.get("SCAN_GRID_THREADS", "1"))
ROUNDS, BLOCK_S, GROUP_BUDGET_S = 21, 0.025, 20.0   # interleaved rounds; seconds per block; per group
FLOOR_PIECE_BYTES = 1 << 20   # the floor's buffer: 1 MiB, reused piece after piece, so it stays in cache
# Peak memory of one call, in full (b, d, l, n) float32 tensors, for refusing what cannot fit.
FULL_TENSORS = {("mambapy", "forward"): 5, ("mambapy", "forward+backward"): 9,
                ("loop", "forward+backward"): 6}


def points(size, names):
    """Grid points: one dict per (elements per step, l, direction, implementation), a group's points
    together; the floor is in every group (the ratios' denominator).

    names: None for IMPLS and every implementation an installed package registered (a plugin);
    otherwise those of IMPLS it lists, plus any other registered implementation it names (run
    through impls.selective_scan like loop and parallel)."""
    if names is None:
        names = [*IMPLS, *(n for n in impls.names() if n not in impls.BUILTIN)]
    for n in names:
        if n != "floor":
            impls.get(n)  # an unknown name raises ValueError listing the registered ones
    chosen = [i for i in IMPLS if i in names] + [i for i in names if i not in IMPLS]
    out = [dict(kind="skipped", impl=n, reason=f"interpreted (case_limits {impls.get(n).supports['case_limits']}): "
                                          "seconds per call, not a timing of the kernel")
           for n in chosen if n != "floor" and impls.get(n).supports["case_limits"]]
    chosen = [n for n in chosen if n == "floor" or not impls.get(n).supports["case_limits"]]
    if "floor" not in chosen:
        chosen.append("floor")

    def expand(shape, l, direction, which):
        return [dict(impl=impl, **shape, l=l, dtype="float32", threads=THREADS, direction=direction) for impl in which]

    if size == "quick":
        grid = [("1k", 512), ("1k", 2048), ("16k", 512)]
    elif size == "default":  # the 262k row alone takes minutes here (the loop: 18 s a call at l = 8192)
        grid = [(e, l) for e in ELEMENTS if e != "262k" for l in LENGTHS]
    else:
        grid = [(e, l) for e in ELEMENTS for l in LENGTHS]
    for e, l in grid:
        out += expand(ELEMENTS[e], l, "forward", chosen)
    if size == "long":
        for e in ELEMENTS:
            out += expand(ELEMENTS[e], 2048, "forward+backward", chosen)
        shape = {k: v for k, v in MEMORY_POINT.items() if k != "l"}
        out += expand(shape, MEMORY_POINT["l"], "forward", [i for i in chosen if i in ("parallel", "loop")])
    for p in out:
        _members.setdefault(group(p), []).append(p["impl"])
    for k, v in _members.items():
        _members[k] = list(dict.fromkeys(v))
    return out


_members = {}   # group -> the implementations planned in it (filled by points)
_stored = {}    # group -> {impl: result or exception} measured but not yet returned


def group(point):
    """The points measured together: one grid point, every implementation (the memory point alone)."""
    if point.get("kind") == "skipped" or _is_memory_point(point):
        return json.dumps(point, sort_keys=True)
    return json.dumps({k: v for k, v in point.items() if k != "impl"}, sort_keys=True)


def _is_memory_point(point):
    return all(point.get(k) == v for k, v in MEMORY_POINT.items())


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


def floor_call(point):
    """exp(dt ⊗ A) over all b·d·l·n elements, in pieces along l of at most FLOOR_PIECE_BYTES, into
    one buffer made here (outside the timed call). Returns (fn, pieces)."""
    b, d, n, l = point["b"], point["d"], point["n"], point["l"]
    gen = torch.Generator().manual_seed(0)
    dt = torch.rand(b, d, l, generator=gen) * 0.1
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)
    pieces = -(-b * d * l * n * 4 // FLOOR_PIECE_BYTES)
    step = -(-l // pieces)
    slices = [dt[..., i:i + step] for i in range(0, l, step)]
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
    """The point's result from its group, measuring the group at its first point: median_s, iqr_s,
    runs, times_s (seconds per call, one per round), peak_rss_bytes and rss_before_bytes of the
    warm-up call, and for a scan its ratio to the floor (ratio, ratio_q1, ratio_q3, ratio_pairs,
    unstable) and to the best peer (vs_best_peer, vs_best_peer_q1, vs_best_peer_q3, best_peer)."""
    if point.get("kind") == "skipped":
        return dict(skipped=point["reason"])
    torch.set_num_threads(point["threads"])
    if _is_memory_point(point):
        return in_fresh_process(__spec__.name, "memory_child", point)
    key = group(point)
    if point["impl"] not in _stored.get(key, {}):
        _stored[key] = _measure_group(point, _members.get(key) or [point["impl"], "floor"])
    result = _stored[key].pop(point["impl"])
    if isinstance(result, Exception):
        raise result
    return result


def _measure_group(point, members):
    full_bytes = point["b"] * point["d"] * point["l"] * point["n"] * 4
    fns, warm, out = {}, {}, {}
    for impl in members:
        p = dict(point, impl=impl)
        try:
            _refuse_if_too_big(p, full_bytes)
            if impl == "floor":
                fn, pieces = floor_call(p)
                extra = dict(floor_pieces=pieces, floor="in place, 1 MiB pieces, buffer allocated outside the timed call")
            else:
                fn, extra = _scan_call(p), {}
            t0 = time.perf_counter()
            res, peak, before = peak_rss_during(fn)     # the warm-up call, watched for memory
            warm[impl] = time.perf_counter() - t0
            del res                                      # (kept, it would be counted in the next call's peak)
        except (MemoryError, RuntimeError, NotImplementedError) as e:
            out[impl] = e
            continue
        fns[impl] = fn
        out[impl] = dict(extra, peak_rss_bytes=peak, rss_before_bytes=before, full_tensor_bytes=full_bytes,
                         members=list(fns))
    timed = interleaved(fns, rounds=ROUNDS, block_s=BLOCK_S, budget_s=GROUP_BUDGET_S, warm=warm)
    peers = [p for p in PEERS if p in timed]
    for impl, t in timed.items():
        out[impl].update(t, members=list(timed))
        if impl == "floor":
            continue
        if "floor" in timed:
            out[impl].update(paired_ratio(t["cpu_s"], timed["floor"]["cpu_s"], to="floor"))
        others = [p for p in peers if p != impl]
        if others:
            best = min(others, key=lambda p: timed[p]["cpu_median_s"])
            r = paired_ratio(t["cpu_s"], timed[best]["cpu_s"], to=best)
            out[impl].update(vs_best_peer=r["ratio"], vs_best_peer_q1=r["ratio_q1"], vs_best_peer_q3=r["ratio_q3"],
                             best_peer=best, vs_best_peer_unstable=r["unstable"])
    return out


def memory_child(point):
    """Run in the fresh process: the point's implementation alone, its time and peak resident memory."""
    torch.set_num_threads(point["threads"])
    # the scan alone: u, delta, B, C, D, delta_bias (a gate z would add 0.4 GB of input, not of scan)
    x = make_inputs(point["b"], point["d"], point["n"], point["l"], gate=False)

    def fn():
        return impls.selective_scan(**x, impl=point["impl"])
    out, peak, before = peak_rss_during(fn)
    del out
    result = time_call(fn, min_run_time=1.0, warmup=0)
    result.update(peak_rss_bytes=max(peak, status_bytes("VmHWM")), rss_before_bytes=before,
                  full_tensor_bytes=point["b"] * point["d"] * point["l"] * point["n"] * 4, gate=False)
    return result
