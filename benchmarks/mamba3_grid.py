"""Mamba-3 (SISO) scan speed and memory: chunked against the loop, the recurrent step and its own
matmul floor, forward+backward against forward, and memory beyond inputs and output against l.

A sweep module for benchmarks/runner.py (``points``, ``measure``, ``table``), and a command:

    python -m benchmarks.mamba3_grid [--l 2048] [--direction forward|forward+backward|memory]

The shape is the official kernel's optimum (its docstring: nheads_qk=1, nheads=32, headdim_qk=128,
headdim_v=64, chunk_size=64): h_qk = 1, h = 32, n = 128, p = 64, chunk_size 64, with n_ang = 32
(the module's rope_fraction 0.5: d_state / 4) and the arguments the Mamba3 module passes: D, Z, no
Input_States. Inputs: DT log-uniform in [1e-3, 0.1], ADT = A DT with A = -exp(N(0, 1)) per token
and head, Trap and Angles N(0, 1), Q and K N(0, 1) (RMS-normed in the module), biases 1, D 1.
b = 1 and l = 2048 on this CPU (the official benchmarks use larger b and l on a GPU).

Implementations, each through the public functions (the front door is in every time):

    chunked     impls/mamba3/chunked.py, the reference of every ratio
    loop        the spec, a loop over tokens
    recurrent   the step run token after token (impls/mamba3/recurrent.py)
    step        one call of mamba3_state_update (one token): chunked's time per token over it
                is ``per_token_over_step``
    floor       the chunked algorithm's matmuls alone, timed as torch.matmul on the same shapes

The floor. Per (batch, chunk of T = chunk_size tokens, head) the chunked scan does four matrix
products, and nothing less gives its result (q~ and k~ are per head even with h_qk = 1: the
rotation angles are per head):

    q~ k~ᵀ                 (T, n) @ (n, T)     2·b·c·h·T²·n flops
    (q~ k~ᵀ ∘ W) V         (T, T) @ (T, p)     2·b·c·h·T²·p
    chunk state            (p, T) @ (T, n)     2·b·c·h·T·p·n
    state readout          (T, n) @ (n, p)     2·b·c·h·T·n·p

with c = ceil(l / T), on random float32 operands into preallocated outputs. Everything else (the
rotations, the decays and trapezoid weights, the masks, the state pass, D and the gate) is
elementwise and comes on top.

Ratios are paired: in each interleaved round every callable runs once (a block of calls for the
fast ones), and each ratio is taken within a round (benchmarks.common.interleaved, paired_ratio).
Forward+backward: gradients of every input (Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D,
Z) for chunked, beside chunked's forward in the same rounds. One thread (MAMBA3_GRID_THREADS to
change it), for the reason benchmarks/ssd_grid.py gives.

Memory: each memory point runs chunked alone in a fresh process and records its peak resident
memory beyond the inputs and the output; the points at several l give the growth per token.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

import impls
from .common import interleaved, paired_ratio, peak_rss_during

SHAPE = dict(b=1, h_qk=1, h=32, p=64, n=128, n_ang=32)
CHUNK_SIZE = 64
IMPLS = ("chunked", "loop", "recurrent", "step", "floor")
THREADS = int(os.environ.get("MAMBA3_GRID_THREADS", "1"))
ROUNDS = {"quick": 3, "default": 5, "long": 5}
# l = 65,536 needs more memory than this machine has for chunked, which holds every chunk's
# matrices at once (about 15 MiB a chunk at this shape): the long sweep measures these l and the
# report extrapolates; MEMORY_L is the target, measured only on request (--direction memory --l).
MEMORY_LS = (1024, 2048, 4096, 8192)
MEMORY_L = 65536


def points(size, names):
    """One point per (l, direction): the implementations at a point are measured inside it,
    interleaved. names: None for IMPLS; otherwise those listed (chunked always)."""
    chosen = [i for i in IMPLS if names is None or i in names or i == "chunked"]
    chosen = [i for i in chosen if i in ("step", "floor") or i in impls.names(family="mamba3")]
    shape = dict(SHAPE, chunk_size=CHUNK_SIZE, dtype="float32", threads=THREADS)
    l = 512 if size == "quick" else 2048
    out = [dict(shape, l=l, direction="forward", impls=chosen, rounds=ROUNDS[size])]
    if size != "quick":
        grad = [i for i in chosen if i == "chunked"]  # the loop's autograd holds every state: not timed
        out.append(dict(shape, l=l, direction="forward+backward", impls=grad, rounds=ROUNDS[size]))
    if size == "long":
        out += [dict(shape, l=m, direction="memory", impls=["chunked"], rounds=1) for m in MEMORY_LS]
    return out


def make_inputs(b, h_qk, h, p, n, n_ang, l, seed=0, requires_grad=False, **_):
    """mamba3_scan's float32 arguments (dict) as the Mamba3 module passes them."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    DT = torch.exp(math.log(1e-3) + math.log(100.0) * torch.rand(b, h, l, generator=g))
    A = -torch.exp(r(b, h, l)).clamp(min=1e-4)
    x = dict(Q=r(b, l, h_qk, n), K=r(b, l, h_qk, n), V=r(b, l, h, p), ADT=A * DT, DT=DT, Trap=r(b, h, l),
             Q_bias=torch.ones(h, n), K_bias=torch.ones(h, n), Angles=r(b, l, h, n_ang), D=torch.ones(h),
             Z=r(b, l, h, p))
    if requires_grad:
        for v in x.values():
            v.requires_grad_()
    return x


def floor_work(b, h, p, n, l, chunk_size, **_):
    """The four matmul shapes of the chunked algorithm, [(batch, rows, inner, cols)], and flops."""
    c, T = -(-l // chunk_size), chunk_size
    shapes = [(b * c * h, T, n, T), (b * c * h, T, T, p), (b * c * h, p, T, n), (b * c * h, T, n, p)]
    return shapes, sum(2 * k * m * i * j for k, m, i, j in shapes)


def chunk_bytes(h, p, n, chunk_size, **_):
    """One chunk's float32 working set: its (h, T, T) weighted scores, its q~, k~ (T, h, n), its V and
    out (T, h, p) and a state (h, p, n): memory independent of l is a few of these."""
    T = chunk_size
    return 4 * (h * T * T + 2 * T * h * n + 2 * T * h * p + h * p * n)


def floor_fn(point):
    """A no-argument function doing the floor's matmuls once (operands made here, outside the timing)."""
    shapes, _ = floor_work(**point)
    g = torch.Generator().manual_seed(0)
    ops = [(torch.randn(k, m, i, generator=g), torch.randn(k, i, j, generator=g), torch.empty(k, m, j))
           for k, m, i, j in shapes]

    def fn():
        for a, b_, out in ops:
            torch.matmul(a, b_, out=out)
    return fn


def call(point, impl, backward=False):
    """A no-argument function running impl once at point (forward, or forward and backward)."""
    if impl == "floor":
        return floor_fn(point)
    x = make_inputs(**point, requires_grad=backward)
    if impl == "step":
        tok = {k: v[..., 0] if k in ("ADT", "DT", "Trap") else v[:, 0] if v.dim() > 2 else v for k, v in x.items()}
        return lambda: impls.mamba3_state_update(**tok, impl="recurrent")

    def forward():
        return impls.mamba3_scan(**x, chunk_size=point["chunk_size"], impl=impl)
    if not backward:
        return forward
    leaves = list(x.values())
    gy = torch.randn(x["V"].shape, generator=torch.Generator().manual_seed(1))
    return lambda: torch.autograd.grad(forward(), leaves, gy)


def measure(point, progress=None):
    """Interleaved rounds at one point. Returns dict(results={impl: seconds per call (median,
    quartiles), its paired ratio to chunked (wall-clock, and CPU time beside it), the first call's
    growth of resident memory}), with the floor's flops and rate and, on chunked, the targets' paired
    ratios of CPU time: over_floor, per_token_over_step (its time per token over one step) and, for
    forward+backward, forward_backward_over_forward."""
    if point["direction"] == "memory":
        return in_fresh_process(point)
    torch.set_num_threads(point["threads"])
    backward = point["direction"] == "forward+backward"
    fns = {i: call(point, i, backward) for i in point["impls"]}
    if backward:
        fns["chunked forward"] = call(point, "chunked")
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
    # the targets' ratios on CPU time, the steadier on a busy machine (benchmarks/common.py)
    if "step" in times:
        per_token = [s / point["l"] for s in ref["cpu_s"]]
        results["chunked"]["per_token_over_step"] = paired_ratio(per_token, times["step"]["cpu_s"], to="step")
    if "floor" in times:
        _, flops = floor_work(**point)
        results["floor"].update(flops=flops, gflop_per_s=flops / results["floor"]["median_s"] / 1e9)
        results["chunked"]["over_floor"] = paired_ratio(ref["cpu_s"], times["floor"]["cpu_s"], to="floor")
    if backward:
        results["chunked"]["forward_backward_over_forward"] = paired_ratio(
            ref["cpu_s"], times["chunked forward"]["cpu_s"], to="chunked forward")
    return dict(results=results)


def in_fresh_process(point):
    """The memory point in a new Python process: its peak resident memory (VmHWM) is then the
    arguments, the output and the scan's own, nothing left over from earlier points."""
    code = f"import json, benchmarks.mamba3_grid as g; print(json.dumps(g.memory_child({point!r})))"
    env = dict(os.environ, OMP_NUM_THREADS=str(point["threads"]))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"child process failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def memory_child(point):
    """Run in the fresh process: chunked once at point's l; its peak beyond inputs and output."""
    torch.set_num_threads(point["threads"])
    impl = point["impls"][0]
    # a short call first: what torch allocates once is then in the base, not counted as the scan's
    small = make_inputs(**dict(point, l=2 * point["chunk_size"]))
    impls.mamba3_scan(**small, chunk_size=point["chunk_size"], impl=impl)
    del small
    x = make_inputs(**point)
    inputs_bytes = sum(v.numel() * v.element_size() for v in x.values())
    base = _status_bytes("VmRSS")            # the interpreter, torch, a warm scan and the inputs
    start = time.perf_counter()
    out = impls.mamba3_scan(**x, chunk_size=point["chunk_size"], impl=impl)
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    out_bytes = out.numel() * out.element_size()
    beyond = peak - base - out_bytes
    chunk = chunk_bytes(**point)
    return dict(results={impl: dict(
        median_s=seconds, runs=1, peak_rss_bytes=peak, rss_before_bytes=base, inputs_bytes=inputs_bytes,
        output_bytes=out_bytes, beyond_inputs_and_output_bytes=beyond, chunk_bytes=chunk,
        beyond_in_chunks=beyond / chunk)})


def memory_growth(records):
    """Memory beyond inputs and output against l, from memory points' results: dict(bytes_per_token:
    least-squares slope, at_MEMORY_L_bytes: its extrapolation to MEMORY_L, ls, beyond_bytes) or None."""
    pairs = sorted((r["l"], r["results"]["chunked"]["beyond_inputs_and_output_bytes"]) for r in records)
    if len(pairs) < 2:
        return None
    ls, ys = zip(*pairs)
    ml, my = sum(ls) / len(ls), sum(ys) / len(ys)
    slope = sum((a - ml) * (y - my) for a, y in pairs) / sum((a - ml) ** 2 for a in ls)
    return dict(bytes_per_token=slope, at_MEMORY_L_bytes=my + slope * (MEMORY_L - ml), ls=list(ls), beyond_bytes=list(ys))


def _ratio(q):
    return f"{q['ratio']:.2f} ({q['ratio_q1']:.2f}-{q['ratio_q3']:.2f}{', UNSTABLE' if q['unstable'] else ''})"


def table(point, measured):
    """Plain text lines: one per implementation."""
    lines = [f"l={point['l']} {point['direction']} (b={point['b']} h_qk={point['h_qk']} h={point['h']} p={point['p']} "
             f"n={point['n']} n_ang={point['n_ang']} chunk_size={point['chunk_size']}, {point['threads']} threads)"]
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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mamba3_grid", description=__doc__.split("\n\n")[0])
    parser.add_argument("--l", type=int, default=2048)
    parser.add_argument("--direction", choices=("forward", "forward+backward", "memory"), default="forward")
    parser.add_argument("--impl", action="append", help=f"of {IMPLS} (default: all registered)")
    parser.add_argument("--rounds", type=int, default=ROUNDS["default"])
    parser.add_argument("--out", help="append the result as one JSON line to this file")
    args = parser.parse_args(argv)
    default = [p for p in points("long", args.impl) if p["direction"] == args.direction][0]
    point = dict(default, l=args.l, rounds=args.rounds)
    measured = measure(point, progress=lambda s: print(s, file=sys.stderr, flush=True))
    print("\n".join(table(point, measured)))
    if args.out:
        from .common import append_jsonl, machine_info
        append_jsonl(args.out, dict(benchmark="mamba3_grid", **point, **measured, machine=machine_info(),
                                    load_avg=os.getloadavg()[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
