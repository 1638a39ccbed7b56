"""SSD (Mamba-2) scan speed grid: chunked, loop, the mapped `parallel`, transformers' torch SSD and a
matmul floor, measured side by side and interleaved, with paired ratios.

A sweep module for benchmarks/runner.py (``points``, ``measure``), and a command of its own:

    python -m benchmarks.ssd_grid [--l 2048] [--direction forward|forward+backward] [--memory]

The shape is mamba2-130m's layer (b=1, h=24, p=64, n=128, g=1), float32, at its chunk_size 256 and at
64 (chunk_size is a performance setting; the floor's work depends on it), with the
arguments its Mamba2 block passes to ``mamba_chunk_scan_combined``: D (h,), dt_bias, dt_softplus, no
z (the block gates in its RMSNorm), no initial_states. Inputs follow Mamba-2's initialisation:
A = -U(1, 16), dt log-uniform in [1e-3, 0.1] stored through the inverse softplus in dt_bias.

Implementations (every one through ``impls.ssd_scan``, so the front door is in every time):

    chunked        the SSD default (impls/ssd/chunked.py)
    loop           the spec, a loop over time (impls/ssd/loop.py)
    parallel       Mamba-1's chunked scan through the d = h·p mapping
    transformers   transformers' pure-PyTorch mamba2_chunk_scan (impls/adapters/transformers_ssd.py)
    floor          the chunked algorithm's matmul work, timed as torch.matmul on the same shapes

The floor. Per (batch, chunk of Q = chunk_size tokens), the SSD algorithm (Dao & Gu 2024, §6) does
four batched matrix products, and nothing less gives its result:

    C Bᵀ                  (Q, n) @ (n, Q)   per group           2·b·g·c·Q²·n flops
    (C Bᵀ ∘ L) (dt·x)     (Q, Q) @ (Q, p)   per head            2·b·h·c·Q²·p
    chunk states          (p, Q) @ (Q, n)   per head            2·b·h·c·Q·p·n
    state readout         (Q, n) @ (n, p)   per head            2·b·h·c·Q·n·p

with c = ceil(l / Q). The floor is one call running those four torch.matmul products on random
float32 operands of exactly those shapes, batched over (b·c·g) or (b·c·h), into preallocated
outputs: the time the matmuls alone take at the rate torch.matmul reaches here. Everything else a
chunked scan does (the decays, the mask, the state pass, D, the dt pipeline) is elementwise and
comes on top. Its flops and rate are recorded beside its time.

Interleaving (benchmarks.common.interleaved and paired_ratio). Each round runs every
implementation once (a block of calls for the fast ones), in an order rotated every round, and
each ratio X/chunked is taken within a round; the median of the per-round ratios and their
quartiles are recorded, and a ratio whose quartiles are wide is marked unstable. On this shared
machine ratios of medians measured at different moments moved by 2-10x; paired ratios hold
(docs/benchmarks.md).

Forward + backward: gradients of x, dt, A, B, C, D and dt_bias for the implementations that declare
gradients (the loop is left out: autograd through 2048 Python steps holds every state); each round
also times chunked's forward, so the paired ratio (forward+backward)/forward is chunked's own.

Memory: the point at l = 65,536 runs chunked alone in a fresh process (its peak resident memory,
VmHWM, is then the arguments, the output and the scan's own), and records it beside the bytes of
the inputs and output and of one chunk's working set (see ``chunk_bytes``).

One thread by default (SSD_GRID_THREADS=2 measures on two, a different point key): on this shared
2-core machine a two-thread run waits on a descheduled thread at every parallel region whenever
another process holds a core, which slows an implementation by its number of ops, not its work
(measured: chunked 2.6 s a call at l = 2048 on two threads under load, against 0.16-0.4 s on one).
"""

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import torch

import impls
from .common import interleaved, paired_ratio, peak_rss_during

if importlib.util.find_spec("transformers") is not None:
    import impls.adapters.transformers_ssd  # noqa: F401  (registers "transformers" in the ssd family)

SHAPE = dict(b=1, h=24, p=64, n=128, g=1)          # mamba2-130m: d_model 768, expand 2, headdim 64
CHUNK_SIZE = 256                                   # mamba2-130m's chunk_size
IMPLS = ("chunked", "loop", "parallel", "transformers", "floor")
MEMORY_L = 65536
THREADS = int(os.environ.get("SSD_GRID_THREADS", "1"))
ROUNDS = {"quick": 3, "default": 5, "long": 5}
# Slow implementations are measured only up to this l, without a chunk size of their own at
# chunk_size 256 only, and in the long sweep only (one thread, l = 2048: the loop about 1 s a call, the
# mapped parallel 3 s; two threads on this machine under load: the loop 11 s at l = 512, parallel 106 s
# at 2048). Neither is timed with gradients (the loop's autograd holds every state; parallel's backward
# at this shape takes far longer than the forward).
MAX_L = {"loop": 2048, "parallel": 2048}
CHUNKLESS = ("loop", "parallel")


def points(size, names):
    """One point per (l, direction, chunk_size): every implementation at that point is measured
    inside it, interleaved. names: None for IMPLS (those registered in the ssd family, and the floor);
    otherwise those of them listed (chunked, the reference of every ratio, is always measured).
    Implementations that have no chunk size (loop, parallel) are measured at chunk_size 256 only."""
    chosen = [i for i in IMPLS if (names is None or i in names or i == "chunked")]
    chosen = [i for i in chosen if i == "floor" or i in impls.names(family="ssd")]
    shape = dict(SHAPE, dtype="float32", threads=THREADS)
    forward = [(2048, "forward", CHUNK_SIZE), (2048, "forward", 64)]
    backward = [(2048, "forward+backward", CHUNK_SIZE), (2048, "forward+backward", 64)]
    if size == "quick":
        grid = [(512, "forward", 64)]
    elif size == "default":
        grid = forward + backward
    else:
        grid = [(512, "forward", CHUNK_SIZE)] + forward + [(8192, "forward", CHUNK_SIZE), (8192, "forward", 64)] + backward
    out = []
    for l, direction, chunk_size in grid:
        # the slow chunkless ones (a minute a call and more) in the long sweep only
        which = [i for i in chosen if l <= MAX_L.get(i, l) and (i not in CHUNKLESS or (size == "long" and chunk_size == CHUNK_SIZE))]
        if direction == "forward+backward":
            which = [i for i in which if i not in ("floor", *CHUNKLESS) and impls.get(i, family="ssd").supports["gradients"]]
        out.append(dict(shape, l=l, chunk_size=chunk_size, direction=direction, impls=which, rounds=ROUNDS[size]))
    if size == "long":
        for chunk_size in (CHUNK_SIZE, 64):
            out.append(dict(shape, l=MEMORY_L, chunk_size=chunk_size, direction="memory", impls=["chunked"], rounds=1))
    return out


def make_inputs(b, h, p, n, g, l, seed=0, requires_grad=False):
    """Mamba-2-initialised float32 arguments of ssd_scan (as its block passes them)."""
    gen = torch.Generator().manual_seed(seed)
    dt0 = torch.rand(h, generator=gen).mul_(math.log(100.0)).add_(math.log(1e-3)).exp_()
    dt_bias = dt0.expm1().log()                                   # inverse softplus of dt in [1e-3, 0.1]
    x = dict(x=torch.randn(b, l, h, p, generator=gen), dt=0.1 * torch.randn(b, l, h, generator=gen),
             A=-(1 + 15 * torch.rand(h, generator=gen)), B=torch.randn(b, l, g, n, generator=gen),
             C=torch.randn(b, l, g, n, generator=gen), D=torch.ones(h), dt_bias=dt_bias)
    if requires_grad:
        for v in x.values():
            v.requires_grad_()
    return x


def floor_work(b, h, p, n, g, l, chunk_size):
    """The four matmul shapes of the chunked algorithm: [(batch, rows, inner, cols)], and flops."""
    c, Q = -(-l // chunk_size), chunk_size
    shapes = [(b * c * g, Q, n, Q), (b * c * h, Q, Q, p), (b * c * h, p, Q, n), (b * c * h, Q, n, p)]
    return shapes, sum(2 * k * m * i * j for k, m, i, j in shapes)


def chunk_bytes(h, p, n, chunk_size, **_):
    """One chunk's float32 working set: its (h, Q, Q) decayed scores, its x and out (Q, h, p) and a
    state (h, p, n). "A few chunks' worth" of memory beyond inputs and output is a few of these."""
    Q = chunk_size
    return 4 * (h * Q * Q + 2 * Q * h * p + h * p * n)


def _floor_fn(point):
    shapes, _ = floor_work(*(point[k] for k in ("b", "h", "p", "n", "g", "l", "chunk_size")))
    gen = torch.Generator().manual_seed(0)
    ops = [(torch.randn(k, m, i, generator=gen), torch.randn(k, i, j, generator=gen), torch.empty(k, m, j))
           for k, m, i, j in shapes]

    def fn():
        for a, b_, out in ops:
            torch.matmul(a, b_, out=out)
    return fn


def _call(point, impl, backward):
    """A no-argument function running impl once at point (forward, or forward and backward)."""
    if impl == "floor":
        return _floor_fn(point)
    x = make_inputs(*(point[k] for k in ("b", "h", "p", "n", "g", "l")), requires_grad=backward)
    kw = dict(dt_softplus=True)

    def forward():
        return impls.ssd_scan(x["x"], x["dt"], x["A"], x["B"], x["C"], point["chunk_size"], D=x["D"],
                              dt_bias=x["dt_bias"], **kw, impl=impl)
    if not backward:
        return forward
    leaves = list(x.values())
    gy = torch.randn(x["x"].shape, generator=torch.Generator().manual_seed(1))

    def forward_backward():
        return torch.autograd.grad(forward(), leaves, gy)
    return forward_backward


def measure(point, progress=None):
    """Interleaved rounds at one point (benchmarks.common.interleaved). Returns results: per
    implementation, its seconds per call (median, quartiles) and its paired ratio to chunked
    (benchmarks.common.paired_ratio); the floor's flops and rate; each first call's growth of the
    resident memory."""
    if point["direction"] == "memory":
        return _in_fresh_process(point)
    torch.set_num_threads(point["threads"])
    backward = point["direction"] == "forward+backward"
    fns = {i: _call(point, i, backward) for i in point["impls"]}
    if backward:  # chunked's forward beside its forward+backward, for the paired (f+b)/f ratio
        fns["chunked forward"] = _call(point, "chunked", False)
    growth = {}
    for name, fn in fns.items():  # a first call, watched for memory (interleaved warms up again)
        if progress:
            progress(f"first call: {name}")
        _, peak, before = peak_rss_during(fn)
        growth[name] = peak - before
    if progress:
        progress(f"{point['rounds']} interleaved rounds of {', '.join(fns)}")
    times = interleaved(fns, rounds=point["rounds"])
    results = {}
    for name, t in times.items():
        # the ratio on wall-clock time (what a user waits), and on this process's CPU time beside it
        # (a descheduled process accumulates none: the steadier of the two on a busy machine)
        cpu = paired_ratio(t["cpu_s"], times["chunked"]["cpu_s"], to="chunked")
        results[name] = dict(t, rss_growth_bytes=growth[name], cpu_ratio=cpu["ratio"], cpu_ratio_q1=cpu["ratio_q1"],
                             cpu_ratio_q3=cpu["ratio_q3"],
                             **paired_ratio(t["times_s"], times["chunked"]["times_s"], to="chunked"))
    if backward:
        results["chunked"]["forward_backward_over_forward"] = paired_ratio(
            times["chunked"]["times_s"], times["chunked forward"]["times_s"], to="chunked forward")
    if "floor" in results:
        _, flops = floor_work(*(point[k] for k in ("b", "h", "p", "n", "g", "l", "chunk_size")))
        results["floor"].update(flops=flops, gflop_per_s=flops / results["floor"]["median_s"] / 1e9)
    return dict(results=results)


def _in_fresh_process(point):
    """Run the memory point in a new Python process, so that its peak resident memory (VmHWM) is
    the arguments, the output and the scan's own, nothing left over from earlier points."""
    code = f"import json, benchmarks.ssd_grid as g; print(json.dumps(g._child({point!r})))"
    env = dict(os.environ, OMP_NUM_THREADS=str(point["threads"]))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"child process failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _high_water_bytes():
    """Peak resident memory since exec (VmHWM; ru_maxrss would carry the forking parent's over)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(point):
    torch.set_num_threads(point["threads"])
    # a short call first: what torch allocates once (thread pools, library buffers) is then in the
    # base, not counted as the scan's; its peak (VmHWM) is far below the long call's
    small = make_inputs(*(point[k] for k in ("b", "h", "p", "n", "g")), 2 * point["chunk_size"])
    impls.ssd_scan(small["x"], small["dt"], small["A"], small["B"], small["C"], point["chunk_size"], D=small["D"],
                   dt_bias=small["dt_bias"], dt_softplus=True, impl=point["impls"][0])
    del small
    x = make_inputs(*(point[k] for k in ("b", "h", "p", "n", "g", "l")))
    inputs_bytes = sum(v.numel() * v.element_size() for v in x.values())
    base = _rss_bytes()                     # the interpreter, torch, a warm scan and the inputs
    start = time.perf_counter()
    out = impls.ssd_scan(x["x"], x["dt"], x["A"], x["B"], x["C"], point["chunk_size"], D=x["D"],
                         dt_bias=x["dt_bias"], dt_softplus=True, impl=point["impls"][0])
    seconds = time.perf_counter() - start
    peak = _high_water_bytes()
    out_bytes = out.numel() * out.element_size()
    beyond = peak - base - out_bytes         # what the scan held beyond its inputs and output
    chunk = chunk_bytes(**{k: point[k] for k in ("h", "p", "n", "chunk_size")})
    return dict(results={point["impls"][0]: dict(
        median_s=seconds, runs=1, peak_rss_bytes=peak, rss_before_bytes=base,
        inputs_bytes=inputs_bytes, output_bytes=out_bytes, beyond_inputs_and_output_bytes=beyond,
        chunk_bytes=chunk, beyond_in_chunks=beyond / chunk)})


def table(point, measured):
    """Plain text lines: one per implementation."""
    lines = [f"l={point['l']} {point['direction']} (b={point['b']} h={point['h']} p={point['p']} n={point['n']} "
             f"g={point['g']} chunk_size={point['chunk_size']}, {point['threads']} threads)"]
    for name, r in measured["results"].items():
        line = f"  {name:16s} {r['median_s'] * 1e3:9.1f} ms"
        if "ratio" in r:
            line += (f"   / chunked: {r['ratio']:6.2f} (quartiles {r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}, "
                     f"{len(r['ratio_pairs'])} rounds{', UNSTABLE' if r['unstable'] else ''}; CPU time {r['cpu_ratio']:.2f})")
        if "gflop_per_s" in r:
            line += f"   {r['flops'] / 1e9:.2f} GFLOP at {r['gflop_per_s']:.1f} GFLOP/s"
        if "forward_backward_over_forward" in r:
            q = r["forward_backward_over_forward"]
            line += f"   (f+b)/f: {q['ratio']:.2f} ({q['ratio_q1']:.2f}-{q['ratio_q3']:.2f})"
        if "beyond_in_chunks" in r:
            line += (f"   peak {r['peak_rss_bytes'] / 2**20:.0f} MiB; beyond inputs ({r['inputs_bytes'] / 2**20:.0f} MiB)"
                     f" and output ({r['output_bytes'] / 2**20:.0f} MiB): {r['beyond_inputs_and_output_bytes'] / 2**20:.0f}"
                     f" MiB = {r['beyond_in_chunks']:.1f} chunks of {r['chunk_bytes'] / 2**20:.1f} MiB")
        lines.append(line)
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ssd_grid", description=__doc__.split("\n\n")[0])
    parser.add_argument("--l", type=int, default=2048)
    parser.add_argument("--direction", choices=("forward", "forward+backward", "memory"), default="forward")
    parser.add_argument("--impl", action="append", help=f"of {IMPLS} (default: all registered)")
    parser.add_argument("--chunk-size", type=int, default=CHUNK_SIZE)
    parser.add_argument("--rounds", type=int, default=ROUNDS["default"])
    parser.add_argument("--out", help="append the result as one JSON line to this file")
    args = parser.parse_args(argv)
    default = [p for p in points("long", args.impl) if p["direction"] == args.direction
               and p["chunk_size"] == args.chunk_size][0]
    point = dict(default, l=args.l, rounds=args.rounds)
    point["impls"] = [i for i in point["impls"] if args.l <= MAX_L.get(i, args.l) or (args.impl and i in args.impl)]
    measured = measure(point, progress=lambda s: print(s, file=sys.stderr, flush=True))
    print("\n".join(table(point, measured)))
    if args.out:
        from .common import append_jsonl, machine_info
        append_jsonl(args.out, dict(benchmark="ssd_grid", **point, **measured, machine=machine_info()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
