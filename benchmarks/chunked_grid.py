"""The speed and memory grid of a chunked family, written once with the family as a parameter:
benchmarks/ssd_grid.py (Mamba-2's SSD) and benchmarks/mamba3_grid.py (Mamba-3) each describe their
family and take ``measure``, ``table``, ``memory_child`` and ``main`` from here (``bound``).

What a family's grid module describes:

    BENCHMARK                       its sweep's name (benchmarks/runner.py), the records' "benchmark"
    SHAPE, CHUNK_SIZE, IMPLS        the shape (b, h, p, n and the family's own sizes), the default
                                    chunk size, the implementations (with "floor", and "step": one
                                    token of the recurrent step, where the family times it)
    ROUNDS, MAX_L                   interleaved rounds per sweep size; the longest l of the slow ones
    points(size, names)             the sweep's points (benchmarks/runner.py)
    make_inputs(seed=0, requires_grad=False, **point)
                                    the public scan's float32 arguments (dict of tensors)
    forward(point, impl, x)         a no-argument function: impl on x through the public functions
    floor_work(**point)             the chunked algorithm's matmul shapes [(batch, rows, inner, cols)]
                                    and their flops
    chunk_bytes(**point)            one chunk's float32 working set

Timing (benchmarks.common.interleaved and paired_ratio): each round runs every implementation once
(a block of calls for the fast ones), in an order rotated every round, and each ratio to chunked is
taken within a round, on wall-clock time and on this process's CPU time beside it. chunked's
targets are paired ratios of CPU time, the steadier on a busy machine (a descheduled process
accumulates none): over_floor (chunked / floor), per_token_over_step (its time per token over one
step) and forward_backward_over_forward (forward+backward over chunked's own forward, timed in the
same rounds).

Memory: a memory point runs chunked alone in a fresh process, so that its peak resident memory
(VmHWM) is the arguments, the output and the scan's own, and records it beside the bytes of the
inputs and output and of one chunk's working set.
"""

import argparse
import functools
import os
import sys
import time

import torch

from .common import (append_jsonl, in_fresh_process, interleaved, machine_info, paired_ratio, peak_rss_during,
                     status_bytes)


def floor_fn(fam, point):
    """A no-argument function doing the floor's matmuls once (operands made here, outside the timing)."""
    shapes, _ = fam.floor_work(**point)
    g = torch.Generator().manual_seed(0)
    ops = [(torch.randn(k, m, i, generator=g), torch.randn(k, i, j, generator=g), torch.empty(k, m, j))
           for k, m, i, j in shapes]

    def fn():
        for a, b_, out in ops:
            torch.matmul(a, b_, out=out)
    return fn


def call(fam, point, impl, backward=False):
    """A no-argument function running impl once at point (forward, or forward and backward of every
    input against a fixed random gradient of out (b, l, h, p))."""
    if impl == "floor":
        return floor_fn(fam, point)
    x = fam.make_inputs(**point, requires_grad=backward)
    forward = fam.forward(point, impl, x)
    if not backward:
        return forward
    leaves = list(x.values())
    gy = torch.randn(point["b"], point["l"], point["h"], point["p"], generator=torch.Generator().manual_seed(1))
    return lambda: torch.autograd.grad(forward(), leaves, gy)


def measure(fam, point, progress=None):
    """Interleaved rounds at one point. Returns dict(results={impl: seconds per call (median,
    quartiles), its paired ratio to chunked (wall-clock, and CPU time beside it), the first call's
    growth of resident memory}), with the floor's flops and rate and chunked's targets (the module's
    docstring). A memory point runs in a fresh process."""
    if point["direction"] == "memory":
        return in_fresh_process(fam.__spec__.name, "memory_child", point)
    torch.set_num_threads(point["threads"])
    backward = point["direction"] == "forward+backward"
    fns = {i: call(fam, point, i, backward) for i in point["impls"]}
    if backward:
        fns["chunked forward"] = call(fam, point, "chunked")
    growth = {}
    for name, fn in fns.items():  # a first call, watched for memory (interleaved warms up again)
        if progress:
            progress(f"first call: {name}")
        _, peak, before = peak_rss_during(fn)
        growth[name] = peak - before
    if progress:
        progress(f"{point['rounds']} interleaved rounds of {', '.join(fns)}")
    times = interleaved(fns, rounds=point["rounds"])
    ref = times["chunked"]
    results = {}
    for name, t in times.items():
        if name == "step":  # one token against a whole scan: its ratio is per_token_over_step below
            results[name] = dict(t, rss_growth_bytes=growth[name])
            continue
        cpu = paired_ratio(t["cpu_s"], ref["cpu_s"], to="chunked")
        results[name] = dict(t, rss_growth_bytes=growth[name], cpu_ratio=cpu["ratio"], cpu_ratio_q1=cpu["ratio_q1"],
                             cpu_ratio_q3=cpu["ratio_q3"], **paired_ratio(t["times_s"], ref["times_s"], to="chunked"))
    if "step" in times:
        per_token = [s / point["l"] for s in ref["cpu_s"]]
        results["chunked"]["per_token_over_step"] = paired_ratio(per_token, times["step"]["cpu_s"], to="step")
    if "floor" in times:
        _, flops = fam.floor_work(**point)
        results["floor"].update(flops=flops, gflop_per_s=flops / results["floor"]["median_s"] / 1e9)
        results["chunked"]["over_floor"] = paired_ratio(ref["cpu_s"], times["floor"]["cpu_s"], to="floor")
    if backward:
        results["chunked"]["forward_backward_over_forward"] = paired_ratio(
            ref["cpu_s"], times["chunked forward"]["cpu_s"], to="chunked forward")
    return dict(results=results)


def memory_child(fam, point):
    """Run in the fresh process: the point's implementation once at its l; its peak beyond inputs
    and output, in bytes and in chunks (chunk_bytes)."""
    torch.set_num_threads(point["threads"])
    impl = point["impls"][0]
    # a short call first: what torch allocates once (thread pools, library buffers) is then in the
    # base, not counted as the scan's; its peak (VmHWM) is far below the long call's
    fam.forward(point, impl, fam.make_inputs(**dict(point, l=2 * point["chunk_size"])))()
    x = fam.make_inputs(**point)
    inputs_bytes = sum(v.numel() * v.element_size() for v in x.values())
    base = status_bytes("VmRSS")            # the interpreter, torch, a warm scan and the inputs
    start = time.perf_counter()
    out = fam.forward(point, impl, x)()
    seconds = time.perf_counter() - start
    peak = status_bytes("VmHWM")
    out_bytes = out.numel() * out.element_size()
    beyond = peak - base - out_bytes         # what the scan held beyond its inputs and output
    chunk = fam.chunk_bytes(**point)
    return dict(results={impl: dict(
        median_s=seconds, runs=1, peak_rss_bytes=peak, rss_before_bytes=base, inputs_bytes=inputs_bytes,
        output_bytes=out_bytes, beyond_inputs_and_output_bytes=beyond, chunk_bytes=chunk,
        beyond_in_chunks=beyond / chunk)})


def _ratio(q):
    return f"{q['ratio']:.2f} ({q['ratio_q1']:.2f}-{q['ratio_q3']:.2f}{', UNSTABLE' if q['unstable'] else ''})"


def table(fam, point, measured):
    """Plain text lines: the point, then one per implementation."""
    sizes = " ".join(f"{k}={point[k]}" for k in fam.SHAPE)
    lines = [f"l={point['l']} {point['direction']} ({sizes} chunk_size={point['chunk_size']}, {point['threads']} threads)"]
    for name, r in measured["results"].items():
        line = f"  {name:16s} {r['median_s'] * 1e3:10.2f} ms"
        if "ratio" in r:
            line += f"   / chunked: {_ratio(r)}; CPU time {r['cpu_ratio']:.2f}"
        for key, label in (("over_floor", "chunked / floor"), ("per_token_over_step", "per token / step"),
                           ("forward_backward_over_forward", "(f+b)/f")):
            if key in r:
                line += f"   {label}: {_ratio(r[key])}"
        if "gflop_per_s" in r:
            line += f"   {r['flops'] / 1e9:.2f} GFLOP at {r['gflop_per_s']:.1f} GFLOP/s"
        if "beyond_in_chunks" in r:
            line += (f"   peak {r['peak_rss_bytes'] / 2**20:.0f} MiB; beyond inputs ({r['inputs_bytes'] / 2**20:.0f} MiB)"
                     f" and output ({r['output_bytes'] / 2**20:.0f} MiB): {r['beyond_inputs_and_output_bytes'] / 2**20:.0f}"
                     f" MiB = {r['beyond_in_chunks']:.1f} chunks of {r['chunk_bytes'] / 2**20:.2f} MiB")
        lines.append(line)
    return lines


def main(fam, argv=None):
    """python -m <the family's grid module>: one point of the long sweep, at the l, direction, chunk
    size and implementations asked for."""
    parser = argparse.ArgumentParser(prog=f"python -m {fam.__spec__.name}", description=fam.__doc__.split("\n\n")[0])
    parser.add_argument("--l", type=int, default=2048)
    parser.add_argument("--direction", choices=("forward", "forward+backward", "memory"), default="forward")
    parser.add_argument("--impl", action="append", help=f"of {fam.IMPLS} (default: all registered)")
    parser.add_argument("--chunk-size", type=int, default=fam.CHUNK_SIZE)
    parser.add_argument("--rounds", type=int, default=fam.ROUNDS["default"])
    parser.add_argument("--out", help="append the result as one JSON line to this file")
    args = parser.parse_args(argv)
    planned = [p for p in fam.points("long", args.impl) if p["direction"] == args.direction]
    default = next((p for p in planned if p["chunk_size"] == args.chunk_size), planned[0])
    point = dict(default, l=args.l, chunk_size=args.chunk_size, rounds=args.rounds)
    point["impls"] = [i for i in point["impls"] if args.l <= fam.MAX_L.get(i, args.l) or (args.impl and i in args.impl)]
    measured = measure(fam, point, progress=lambda s: print(s, file=sys.stderr, flush=True))
    print("\n".join(table(fam, point, measured)))
    if args.out:
        append_jsonl(args.out, dict(benchmark=fam.BENCHMARK, **point, **measured, machine=machine_info(),
                                    load_avg=os.getloadavg()[0]))
    return 0


def bound(fam):
    """{name: the function above with ``fam`` (a family's grid module) as its first argument}, for
    the module's namespace: measure(point), table(point, measured), memory_child(point), main(argv)."""
    return {k: functools.partial(globals()[k], fam) for k in ("measure", "table", "memory_child", "main", "call")}
