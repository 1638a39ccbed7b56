"""GPU check of the Triton kernels (impls/selective/triton.py, impls/ssd/triton.py), for when a machine with a GPU is lent.
Run it through scripts/gpu_check.sh:

    scripts/gpu_check.sh OUTPUT_DIR            # on a machine with a CUDA device
    scripts/gpu_check.sh --smoke OUTPUT_DIR    # every phase at tiny sizes on the CPU, in Triton's
                                               # interpreter: tests this script, measures nothing

Phases, each in its own process (a crash, say an illegal address from a wrapped offset, or a hang
is recorded and the other phases still run); suite and big run side by side, bench alone after them:
  suite  the equivalence suite for triton, natively. On a GPU the triton entry has no case limits,
         so the property tests draw their full sizes (l up to 1000); four test files in parallel.
  big    forward, backward and step on more than 2^31 elements (b·d·l = 2^31 + 2^18 for the scan,
         b·d·n > 2^31 for the step's state), each checked against the same rows computed on a
         compact copy: a wrapped 32-bit offset reads or writes the wrong row.
  bench  CUDA-event timings (triton.testing.do_bench; calls slower than 50 ms are timed with CUDA
         events directly, median of 3) of the scan forward, forward + backward and the step:
         triton against parallel (when registered) and loop (recurrent for the step); the device
         copy bandwidth and the memory floor; a sweep of launch configurations.

  ssd_big    the Mamba-2 SSD kernels (impls/ssd/triton.py) past 2^31 elements: forward and backward
         on x of b·l·h·p = 2^31 + 2^17 elements, the step on a state of b·h·p·n > 2^31, each checked
         against the same heads or rows computed on a compact copy.
  ssd_bench  the SSD forward, forward + backward and step at mamba2-130m's (h=24) and mamba2-2.7b's
         (h=80) layer shapes (p=64, n=128, g=1, chunk_size=256), l = 2048, 8192, 65536: triton
         against chunked (the torch SSD, same GPU), the official mamba_chunk_scan_combined when
         mamba_ssm imports (registered as mamba_ssm), and the memory floor, in ms, GB/s and TFLOP/s.
         The SSD suite (values, invariants, gradients, step, test_triton_ssd.py) runs in the suite phase.

Writes OUTPUT_DIR/gpu_check.json (complete or not at all) and prints a short table.
Exit status: 0 every check passed; 1 a check failed, or a phase crashed or ran out of time (the
JSON says which); 2 usage error; 3 no CUDA device, or no torch or triton: nothing is written.
The targets of issue 4 (at b=8, d=1536, n=16, l=8192: forward at least 20x faster than parallel
and within 2x of the memory floor) are reported, not enforced.
"""

import argparse
import concurrent.futures
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_NAME = "gpu_check.json"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_CUDA = 0, 1, 2, 3

SUITE_FILES = ["equivalence/test_values.py", "equivalence/test_invariants.py",
               "equivalence/test_gradients.py", "equivalence/test_triton.py"]
SSD_SUITE_FILES = ["equivalence/test_ssd_values.py", "equivalence/test_ssd_invariants.py",
                   "equivalence/test_ssd_gradients.py", "equivalence/test_ssd_step.py",
                   "equivalence/test_triton_ssd.py"]
SUITE_TIMEOUT_S, BIG_TIMEOUT_S, BENCH_TIMEOUT_S = 240, 240, 200
SSD_BIG_TIMEOUT_S, SSD_BENCH_TIMEOUT_S = 240, 300

MAIN_SIZE = dict(b=8, d=1536, n=16, l=8192)      # the size of the targets
BENCH_SIZES = [MAIN_SIZE, dict(b=2, d=768, n=16, l=2048)]
STEP_SIZE = dict(b=8, d=1536, n=16)
# launch configurations to sweep at the main size: (block_d, num_warps, num_stages) for the forward,
# (bwd_block_d, bwd_num_warps) for the backward
FWD_CONFIGS = [(4, 1, 3), (8, 1, 3), (16, 1, 3), (16, 1, 1), (16, 2, 3), (32, 1, 3), (32, 2, 3), (64, 4, 3), (8, 1, 6)]
BWD_CONFIGS = [(8, 1), (16, 1), (16, 2), (32, 2)]
TARGET_SPEEDUP_VS_PARALLEL, TARGET_FLOOR_RATIO = 20.0, 2.0

# the SSD grid: mamba2-130m and mamba2-2.7b layers (d_model 768 and 2560, expand 2, headdim 64,
# d_state 128, one group), batch 1, chunk_size 256 (the official default)
SSD_SHAPES = {"mamba2-130m": dict(h=24, p=64, n=128, g=1), "mamba2-2.7b": dict(h=80, p=64, n=128, g=1)}
SSD_LENGTHS = [2048, 8192, 65536]
SSD_CHUNK = 256
SSD_STEP_BATCH = 64
SMOKE_SSD_SHAPES = {"tiny": dict(h=2, p=4, n=4, g=1)}
SMOKE_SSD_LENGTHS = [24]
SMOKE_SSD_CHUNK = 8

SMOKE_SUITE = ["equivalence/test_triton.py", "-k", "offset_helpers"]
SMOKE_SSD_SUITE = ["equivalence/test_triton_ssd.py", "-k", "growth"]
SMOKE_BENCH_SIZES = [dict(b=1, d=8, n=4, l=16)]
SMOKE_STEP_SIZE = dict(b=2, d=8, n=4)
SMOKE_FWD_CONFIGS, SMOKE_BWD_CONFIGS = [(4, 1, 1)], [(4, 1)]

NO_CUDA = """\
gpu_check: no CUDA device here ({why}), so nothing was run and nothing was written.
This check runs the Triton kernels natively and times them; it needs a machine with an NVIDIA GPU
and torch, triton, pytest and hypothesis installed. Without a GPU the same kernels are exercised
in Triton's interpreter by the ordinary test suite (.venv/bin/pytest --impl triton), and
`scripts/gpu_check.sh --smoke OUTPUT_DIR` runs this script's phases at tiny sizes on the CPU.
Exit status {code}."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n\n")[0],
                                epilog=f"exit status: {EXIT_OK} passed, {EXIT_FAILED} a check failed, "
                                       f"{EXIT_USAGE} usage error, {EXIT_NO_CUDA} no CUDA device (nothing written)")
    p.add_argument("output_dir", help=f"folder for {RESULT_NAME} (created if missing)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, to test this script")
    p.add_argument("--phase", choices=["big", "bench", "ssd_big", "ssd_bench"], help=argparse.SUPPRESS)  # internal
    return p.parse_args(argv)


# ---- pure helpers (tested on the CPU) ------------------------------------------------------------

def forward_bytes(b, d, n, l, g=1, itemsize=4, param_itemsize=4):
    """Bytes the forward must move at the least: u, delta, z read, y written (b·d·l each), B and C
    read (b·g·n·l each), A, D, delta_bias read once."""
    return itemsize * (4 * b * d * l + 2 * b * g * n * l) + param_itemsize * (d * n + 2 * d)


def backward_bytes(b, d, n, l, g=1, itemsize=4, param_itemsize=4):
    """Bytes the backward must move at the least: u, delta, z, grad y, B, C read; du, ddelta, dz, dB,
    dC written; parameters and their gradients once."""
    return itemsize * (7 * b * d * l + 4 * b * g * n * l) + 2 * param_itemsize * (d * n + 2 * d)


def step_bytes(b, d, n, itemsize=4):
    """The state read and written, x, dt, z, B, C read, y written."""
    return itemsize * (2 * b * d * n + 4 * b * d + 2 * b * n) + itemsize * (d * n + 2 * d)


def ssd_forward_bytes(b, l, h, p, n, g=1, itemsize=4, has_z=True):
    """Bytes the SSD forward must move at the least: x (and z) read, out written (b·l·h·p each),
    B and C read (b·l·g·n each), dt read (b·l·h, in the input dtype), A, D, dt_bias once (float32)."""
    return itemsize * ((3 if has_z else 2) * b * l * h * p + 2 * b * l * g * n + b * l * h) + 4 * 3 * h


def ssd_backward_bytes(b, l, h, p, n, g=1, itemsize=4, has_z=True):
    """Bytes the SSD backward must move at the least: x, z, d out, B, C, dt read; dx, dz, dB, dC,
    d dt written; parameters and their gradients once."""
    return itemsize * ((5 if has_z else 3) * b * l * h * p + 4 * b * l * g * n + 2 * b * l * h) + 4 * 6 * h


def ssd_flops(b, l, h, p, n, chunk_size):
    """Multiply-adds x 2 of the chunked algorithm's products: per token and head, the chunk state
    (p n), the readout of the carried state (p n), and the causal half of the within-chunk C B^T
    (Q n / 2) and of its product with dt x (Q p / 2), Q = min(chunk_size, l)."""
    Q = min(chunk_size, l)
    return 2 * b * l * h * (2 * p * n + Q * (n + p) / 2)


def ssd_step_bytes(b, h, p, n, g=1, itemsize=4):
    """The state read and written (b·h·p·n each), x, z read and y written, dt, B, C read."""
    return 4 * 2 * b * h * p * n + itemsize * (3 * b * h * p + b * h + 2 * b * g * n) + 4 * 3 * h


def pytest_summary(text):
    """Counts from pytest's last summary line, e.g. '12 passed, 1 skipped in 3.2s'."""
    lines = [ln for ln in text.strip().splitlines() if re.search(r"\b(passed|failed|error|skipped|no tests ran)\b", ln)]
    counts = {}
    if lines:
        for num, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)", lines[-1]):
            counts[word.rstrip("s") if word.startswith("error") else word] = int(num)
    return counts


def _fmt_ms(x):
    return "-" if x is None else (f"{x:.3g}" if x < 100 else f"{x:.0f}")


def format_table(results):
    """The short table printed at the end, from the JSON results."""
    out = [f"GPU check on {results.get('device', '?')} (torch {results.get('torch', '?')}, "
           f"triton {results.get('triton', '?')}){'  [SMOKE: tiny sizes on the CPU, not measurements]' if results.get('smoke') else ''}"]
    suite = results.get("suite", {})
    for f, r in suite.get("files", {}).items():
        counts = ", ".join(f"{v} {k}" for k, v in r.get("counts", {}).items()) or r.get("error", "no summary")
        out.append(f"  suite {os.path.basename(f):<22} {'ok  ' if r.get('ok') else 'FAIL'} {counts}")
    big = results.get("big", {})
    for k, r in big.get("checks", {}).items():
        out.append(f"  past 2^31: {k:<24} {'ok  ' if r.get('ok') else 'FAIL'} {r.get('elements', '')} elements, "
                   f"max |diff| {r.get('max_abs_diff', '?')}")
    if big.get("error"):
        out.append(f"  past 2^31: FAIL {big['error']}")
    bench = results.get("bench", {})
    if bench.get("error"):
        out.append(f"  bench: FAIL {bench['error']}")
    names = bench.get("names", [])
    if bench.get("scan"):
        out.append("")
        out.append(f"  {'scan (ms, median)':<42}" + "".join(f"{n:>11}" for n in names) + f"{'floor':>9}")
        for row in bench["scan"]:
            label = f"b{row['b']} d{row['d']} n{row['n']} l{row['l']} {row['dtype']} {row['op']}"
            cells = "".join(f"{_fmt_ms(row['ms'].get(n)):>11}" for n in names)
            out.append(f"  {label:<42}{cells}{_fmt_ms(row.get('floor_ms')):>9}")
    for row in bench.get("step", []):
        label = f"step b{row['b']} d{row['d']} n{row['n']}"
        out.append(f"  {label:<42}" + "".join(f"{_fmt_ms(row['ms'].get(n)):>11}" for n in names)
                   + f"{_fmt_ms(row.get('floor_ms')):>9}")
    if bench.get("copy_bandwidth_gbs"):
        out.append(f"  device copy bandwidth {bench['copy_bandwidth_gbs']:.4g} GB/s")
    t = results.get("targets", {})
    if t:
        out.append("")
        for key, label, fmt in (("forward_speedup_vs_parallel", "forward, parallel / triton", ">= {:g}x"),
                                ("forward_over_floor", "forward, triton / memory floor", "<= {:g}x")):
            r = t.get(key, {})
            if r.get("value") is not None:
                out.append(f"  {label:<32} {r['value']:.2f}x  (target {fmt.format(r['target'])}: "
                           f"{'met' if r['met'] else 'not met'})")
            elif r:
                out.append(f"  {label:<32} -  ({r.get('note', 'not measured')})")
    for name, best in (("forward", bench.get("best_fwd_config")), ("backward", bench.get("best_bwd_config"))):
        if best:
            out.append(f"  best {name} launch config: {best['config']} at {_fmt_ms(best['ms'])} ms")
    out.extend(format_ssd_table(results))
    out.append(f"  {'PASSED' if results.get('ok') else 'FAILED'} in {results.get('duration_s', 0):.0f} s")
    return "\n".join(out)


def targets(bench):
    """The issue's targets at the main size, from the bench results."""
    row = next((r for r in bench.get("scan", []) if r["op"] == "forward" and r["dtype"] == "float32"
                and all(r[k] == v for k, v in MAIN_SIZE.items())), None)
    out = {}
    tri = row and row["ms"].get("triton")
    par = row and row["ms"].get("parallel")
    if tri and par:
        out["forward_speedup_vs_parallel"] = dict(value=par / tri, target=TARGET_SPEEDUP_VS_PARALLEL,
                                                  met=par / tri >= TARGET_SPEEDUP_VS_PARALLEL)
    else:
        out["forward_speedup_vs_parallel"] = dict(value=None, target=TARGET_SPEEDUP_VS_PARALLEL, met=False,
                                                  note="parallel not registered or not measured" if tri else "not measured")
    if tri and row.get("floor_ms"):
        out["forward_over_floor"] = dict(value=tri / row["floor_ms"], target=TARGET_FLOOR_RATIO,
                                         met=tri / row["floor_ms"] <= TARGET_FLOOR_RATIO)
    else:
        out["forward_over_floor"] = dict(value=None, target=TARGET_FLOOR_RATIO, met=False, note="not measured")
    return out


def write_atomically(path, obj):
    """Write JSON to path whole or not at all (a temporary file beside it, then a rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".gpu_check.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---- the phases (each runs in its own process) ---------------------------------------------------

def _setup(smoke):
    """Import the kernels; returns (torch, impls, triton_scan module, device)."""
    sys.path.insert(0, ROOT)
    import torch
    import impls
    from impls.selective import triton as ts
    return torch, impls, ts, ("cpu" if smoke else "cuda")


def phase_big(smoke):
    torch, impls, ts, dev = _setup(smoke)
    gen = torch.Generator(device=dev).manual_seed(0)
    results = {}

    def compare(name, big, small, elements):
        diff = (big.double() - small.double()).abs()
        scale = float(small.double().abs().max()) or 1.0
        max_diff = float(diff.max())
        results[name] = dict(ok=bool(torch.isfinite(big).all()) and max_diff <= 1e-6 * scale,
                             bitwise_equal=bool(torch.equal(big, small)), max_abs_diff=max_diff, elements=elements)

    # the scan: b·d·l = 2^31 + 2^18 elements in bfloat16, n = 4 keeps the checkpoints small
    b, d, n, l = (2, 20, 3, 18) if smoke else (4, 1024, 4, 2**19 + 64)
    cd = 16 if not smoke else 8          # compact copy: 16 channels (the GPU block), same launch shape
    dt_ = torch.bfloat16
    u = torch.randn(b, d, l, device=dev, generator=gen, dtype=dt_)
    delta = (0.001 + 0.1 * torch.rand(b, d, l, device=dev, generator=gen)).to(dt_)
    z = torch.randn(b, d, l, device=dev, generator=gen, dtype=dt_)
    A = -torch.arange(1, n + 1, device=dev, dtype=torch.float32).expand(d, n).contiguous()
    B = torch.randn(b, n, l, device=dev, generator=gen, dtype=dt_)
    C = torch.randn(b, n, l, device=dev, generator=gen, dtype=dt_)
    D = torch.ones(d, device=dev)
    rows = [(b - 1, d - cd), (0, 0)]                # last batch row's last channels, first row's first
    elements = b * d * l

    def compact(x, bi, c0):
        return x[bi:bi + 1, c0:c0 + cd].contiguous()

    with torch.no_grad():
        y, last = ts.selective_scan(u, delta, A, B, C, D, z, return_last_state=True)
        for bi, c0 in rows:
            ys, ls = ts.selective_scan(compact(u, bi, c0), compact(delta, bi, c0), A[c0:c0 + cd], B[bi:bi + 1],
                                       C[bi:bi + 1], D[c0:c0 + cd], compact(z, bi, c0), return_last_state=True)
            compare(f"forward y b{bi}c{c0}", y[bi:bi + 1, c0:c0 + cd], ys, elements)
            compare(f"forward state b{bi}c{c0}", last[bi:bi + 1, c0:c0 + cd], ls, elements)
    del y, last
    gy = torch.randn(b, d, l, device=dev, generator=gen, dtype=dt_)
    leaves = [t.detach().requires_grad_() for t in (u, delta, z)]
    y = ts.selective_scan(leaves[0], leaves[1], A, B, C, D, leaves[2])
    grads = torch.autograd.grad(y, leaves, gy)
    del y, leaves
    for bi, c0 in rows:
        small = [compact(t, bi, c0).requires_grad_() for t in (u, delta, z)]
        ys = ts.selective_scan(small[0], small[1], A[c0:c0 + cd], B[bi:bi + 1], C[bi:bi + 1], D[c0:c0 + cd], small[2])
        small_grads = torch.autograd.grad(ys, small, compact(gy, bi, c0))
        for name, big_g, small_g in zip(("du", "ddelta", "dz"), grads, small_grads):
            compare(f"backward {name} b{bi}c{c0}", big_g[bi:bi + 1, c0:c0 + cd], small_g, elements)
    del grads, u, delta, z, gy, B, C

    # the step: a state of b·d·n = 2^31 + 2^21 float32 elements
    sb, sd, sn = (3, 20, 4) if smoke else (8200, 16384, 16)
    state = torch.randn(sb, sd, sn, device=dev, generator=gen)
    x, dt, zz = (torch.randn(sb, sd, device=dev, generator=gen) for _ in range(3))
    Bs, Cs = (torch.randn(sb, sn, device=dev, generator=gen) for _ in range(2))
    As = -torch.rand(sd, sn, device=dev, generator=gen) - 0.5
    Ds, bias = torch.ones(sd, device=dev), torch.zeros(sd, device=dev)
    last_row = state[-1:].clone()
    y = ts.selective_state_update(state, x, dt, As, Bs, Cs, Ds, zz, bias, True)
    ys = ts.selective_state_update(last_row, x[-1:], dt[-1:], As, Bs[-1:], Cs[-1:], Ds, zz[-1:], bias, True)
    compare("step y", y[-1:], ys, sb * sd * sn)
    compare("step state", state[-1:], last_row, sb * sd * sn)
    return dict(checks=results, ok=all(r["ok"] for r in results.values()))


def _timer(torch, smoke):
    """Milliseconds per call: do_bench (CUDA events) for fast calls, events directly for slow ones."""
    if smoke:                                       # one call: the smoke run measures nothing
        def cpu_time(fn):
            t0 = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t0), "perf_counter, one call"
        return cpu_time

    import triton.testing

    def events(fn, reps):
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    def gpu_time(fn):
        fn()                                        # compile, warm up
        torch.cuda.synchronize()
        first = events(fn, 1)
        if first > 50:
            return events(fn, 3), "cuda events, median of 3"
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")), "do_bench"
    return gpu_time


def _inputs(torch, dev, b, d, n, l, dtype, gen):
    """Mamba's initialisation: A = -(1..n), dt log-uniform in [1e-3, 0.1] through softplus."""
    dtv = torch.exp(math.log(1e-3) + (math.log(0.1) - math.log(1e-3)) * torch.rand(b, d, l, device=dev, generator=gen))
    bias = 0.1 * torch.randn(d, device=dev, generator=gen)
    return dict(u=torch.randn(b, d, l, device=dev, generator=gen).to(dtype),
                delta=(torch.log(torch.expm1(dtv)) - bias[:, None]).to(dtype),
                A=-torch.arange(1, n + 1, device=dev, dtype=torch.float32).expand(d, n).contiguous(),
                B=torch.randn(b, n, l, device=dev, generator=gen).to(dtype),
                C=torch.randn(b, n, l, device=dev, generator=gen).to(dtype),
                D=torch.ones(d, device=dev), z=torch.randn(b, d, l, device=dev, generator=gen).to(dtype),
                delta_bias=bias, delta_softplus=True)


def phase_bench(smoke):
    torch, impls, ts, dev = _setup(smoke)
    started = time.time()
    measure = _timer(torch, smoke)
    gen = torch.Generator(device=dev).manual_seed(0)
    names = ["triton"] + (["parallel"] if "parallel" in impls.names() else []) + ["loop"]
    out = dict(names=names, scan=[], step=[], errors=[], methods={},
               notes=["backward time = (forward + backward) - forward"])

    def timed(key, fn):
        try:
            ms, method = measure(fn)
            out["methods"][method] = out["methods"].get(method, 0) + 1
            return ms
        except Exception as e:  # an out-of-memory reference, say: recorded, the rest goes on
            out["errors"].append(f"{key}: {type(e).__name__}: {str(e)[:300]}")
            if dev == "cuda":
                torch.cuda.empty_cache()
            return None

    # device copy bandwidth: read + write of a 1 GiB buffer (1 MiB in smoke mode)
    numel = 2**18 if smoke else 2**28
    src = torch.empty(numel, device=dev)
    dst = torch.empty_like(src)
    ms = timed("copy", lambda: dst.copy_(src))
    bandwidth = 2 * 4 * numel / (ms * 1e-3) if ms else None
    out["copy_bandwidth_gbs"] = bandwidth / 1e9 if bandwidth else None
    del src, dst

    for size, dtype in [(s, torch.float32) for s in (SMOKE_BENCH_SIZES if smoke else BENCH_SIZES)] + \
                       ([] if smoke else [(MAIN_SIZE, torch.bfloat16)]):
        b, d, n, l = size["b"], size["d"], size["n"], size["l"]
        x = _inputs(torch, dev, b, d, n, l, dtype, gen)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        fwd = dict(size, dtype=str(dtype).replace("torch.", ""), op="forward", ms={},
                   bytes=forward_bytes(b, d, n, l, itemsize=itemsize))
        fb = dict(size, dtype=fwd["dtype"], op="forward+backward", ms={},
                  bytes=forward_bytes(b, d, n, l, itemsize=itemsize) + backward_bytes(b, d, n, l, itemsize=itemsize))
        bwd = dict(size, dtype=fwd["dtype"], op="backward", ms={}, bytes=backward_bytes(b, d, n, l, itemsize=itemsize))
        gy = torch.randn(b, d, l, device=dev, generator=gen).to(dtype)
        for name in (names if dtype == torch.float32 else ["triton"]):
            with torch.no_grad():
                fwd["ms"][name] = timed(f"{name} forward {size}", lambda: impls.selective_scan(**x, impl=name))
            if not impls.get(name).supports["gradients"]:
                continue
            leaves = {k: (v.detach().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
            wrt = [v for v in leaves.values() if isinstance(v, torch.Tensor)]

            def fwd_bwd():
                torch.autograd.grad(impls.selective_scan(**leaves, impl=name), wrt, gy)
            fb["ms"][name] = timed(f"{name} forward+backward {size}", fwd_bwd)
            if fb["ms"][name] is not None and fwd["ms"][name] is not None:
                bwd["ms"][name] = fb["ms"][name] - fwd["ms"][name]
            del leaves, wrt
        for row in (fwd, bwd, fb):
            row["floor_ms"] = 1e3 * row["bytes"] / bandwidth if bandwidth else None
            out["scan"].append(row)
        del x, gy

    # the step: triton against recurrent (the torch step) and parallel's step, if it has one
    s = SMOKE_STEP_SIZE if smoke else STEP_SIZE
    step_names = [nm for nm in ["triton", "parallel", "recurrent"] if nm in impls.names() and impls.get(nm).step]
    for nm in step_names:
        if nm not in out["names"]:
            out["names"].append(nm)
    b, d, n = s["b"], s["d"], s["n"]
    x = _inputs(torch, dev, b, d, n, 1, torch.float32, gen)
    state = torch.zeros(b, d, n, device=dev)
    row = dict(s, op="step", ms={}, bytes=step_bytes(b, d, n))
    for nm in step_names:
        args = (state, x["u"][..., 0], x["delta"][..., 0], x["A"], x["B"][..., 0], x["C"][..., 0], x["D"],
                x["z"][..., 0], x["delta_bias"], True)
        row["ms"][nm] = timed(f"{nm} step", lambda: impls.selective_state_update(*args, impl=nm))
    row["floor_ms"] = 1e3 * row["bytes"] / bandwidth if bandwidth else None
    out["step"].append(row)

    # launch configurations of the triton kernels at the main size (float32)
    size = SMOKE_BENCH_SIZES[0] if smoke else MAIN_SIZE
    x = _inputs(torch, dev, size["b"], size["d"], size["n"], size["l"], torch.float32, gen)
    gy = torch.randn(size["b"], size["d"], size["l"], device=dev, generator=gen)
    config = ts.INTERPRETER_CONFIG if ts.INTERPRETED else ts.GPU_CONFIG
    default = dict(config)
    out["default_config"] = default
    out["fwd_configs"], out["bwd_configs"] = [], []
    try:
        for block_d, warps, stages in (SMOKE_FWD_CONFIGS if smoke else FWD_CONFIGS):
            if time.time() - started > BENCH_TIMEOUT_S - 60:
                out["errors"].append("forward config sweep cut short: time budget")
                break
            config.update(block_d=block_d, num_warps=warps, num_stages=stages)
            with torch.no_grad():
                ms = timed(f"forward config {block_d, warps, stages}", lambda: ts.selective_scan(**x))
            out["fwd_configs"].append(dict(config=dict(block_d=block_d, num_warps=warps, num_stages=stages), ms=ms))
        config.update(default)
        leaves = {k: (v.detach().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
        wrt = [v for v in leaves.values() if isinstance(v, torch.Tensor)]
        for block_d, warps in (SMOKE_BWD_CONFIGS if smoke else BWD_CONFIGS):
            if time.time() - started > BENCH_TIMEOUT_S - 40:
                out["errors"].append("backward config sweep cut short: time budget")
                break
            config.update(bwd_block_d=block_d, bwd_num_warps=warps)
            ms = timed(f"backward config {block_d, warps}",
                       lambda: torch.autograd.grad(ts.selective_scan(**leaves), wrt, gy))
            out["bwd_configs"].append(dict(config=dict(bwd_block_d=block_d, bwd_num_warps=warps), ms=ms))
    finally:
        config.update(default)
    for key in ("fwd", "bwd"):
        measured = [c for c in out[f"{key}_configs"] if c["ms"] is not None]
        out[f"best_{key}_config"] = min(measured, key=lambda c: c["ms"]) if measured else None
    out["ok"] = not any("triton" in e and "config" not in e for e in out["errors"])
    return out


# ---- the SSD phases (impls/ssd/triton.py) -------------------------------------------------------

def _compare_into(torch, results, name, big, small, elements):
    """Record whether ``big`` (rows of a run past 2^31 elements) equals ``small`` (the same rows from
    a compact copy) to within 1e-6 of its scale: a wrapped offset reads another row entirely."""
    diff = (big.double() - small.double()).abs()
    scale = float(small.double().abs().max()) or 1.0
    max_diff = float(diff.max())
    results[name] = dict(ok=bool(torch.isfinite(big).all()) and max_diff <= 1e-6 * scale,
                         bitwise_equal=bool(torch.equal(big, small)), max_abs_diff=max_diff, elements=elements)


def phase_ssd_big(smoke):
    torch, impls, _, dev = _setup(smoke)
    from impls.ssd import triton as tss
    gen = torch.Generator(device=dev).manual_seed(0)
    results = {}
    # the scan: x and z of b·l·h·p = 2^31 + 2^16 bfloat16 elements; the last heads against a compact copy
    b, l, h, p, n = (1, 40, 4, 4, 4) if smoke else (1, 2**20 + 32, 32, 64, 16)
    chunk, ch = (8 if smoke else 256), 2
    bf = torch.bfloat16
    x = torch.randn(b, l, h, p, device=dev, generator=gen, dtype=bf)
    z = torch.randn(b, l, h, p, device=dev, generator=gen, dtype=bf)
    dt = (0.001 + 0.1 * torch.rand(b, l, h, device=dev, generator=gen)).to(bf)
    A = -(1 + 15 * torch.rand(h, device=dev, generator=gen))
    B = torch.randn(b, l, 1, n, device=dev, generator=gen, dtype=bf)
    C = torch.randn(b, l, 1, n, device=dev, generator=gen, dtype=bf)
    D = torch.ones(h, device=dev)
    elements = b * l * h * p

    def last_heads(t):
        return t[:, :, h - ch:].contiguous()

    with torch.no_grad():
        out, final = tss.ssd_scan(x, dt, A, B, C, chunk, D, z, return_final_states=True)
        small, small_final = tss.ssd_scan(last_heads(x), last_heads(dt), A[h - ch:], B, C, chunk, D[h - ch:],
                                          last_heads(z), return_final_states=True)
        _compare_into(torch, results, "ssd forward out", out[:, :, h - ch:], small, elements)
        _compare_into(torch, results, "ssd forward final_states", final[:, h - ch:], small_final, elements)
    del out, final, small, small_final
    gy = torch.randn(b, l, h, p, device=dev, generator=gen, dtype=bf)
    leaves = [t.detach().requires_grad_() for t in (x, z)]
    grads = torch.autograd.grad(tss.ssd_scan(leaves[0], dt, A, B, C, chunk, D, leaves[1]), leaves, gy)
    del leaves
    compact = [last_heads(t).requires_grad_() for t in (x, z)]
    small_grads = torch.autograd.grad(tss.ssd_scan(compact[0], last_heads(dt), A[h - ch:], B, C, chunk, D[h - ch:],
                                                   compact[1]), compact, last_heads(gy))
    for name, big_g, small_g in zip(("dx", "dz"), grads, small_grads):
        _compare_into(torch, results, f"ssd backward {name}", big_g[:, :, h - ch:], small_g, elements)
    del grads, x, z, gy, B, C

    # the step: a state of b·h·p·n = 2^31 + 2^21 float32 elements (mamba2-130m's layer, 10,924 rows)
    sb, sh, sp, sn = (3, 2, 4, 4) if smoke else (10924, 24, 64, 128)
    state = torch.randn(sb, sh, sp, sn, device=dev, generator=gen)
    xs, zs = (torch.randn(sb, sh, sp, device=dev, generator=gen) for _ in range(2))
    dts = torch.rand(sb, sh, device=dev, generator=gen)
    Bs, Cs = (torch.randn(sb, 1, sn, device=dev, generator=gen) for _ in range(2))
    As = -(1 + 15 * torch.rand(sh, device=dev, generator=gen))
    Ds, bias = torch.ones(sh, device=dev), torch.zeros(sh, device=dev)
    last_row = state[-1:].clone()
    y = tss.ssd_state_update(state, xs, dts, As, Bs, Cs, Ds, zs, bias, True)
    ys = tss.ssd_state_update(last_row, xs[-1:], dts[-1:], As, Bs[-1:], Cs[-1:], Ds, zs[-1:], bias, True)
    _compare_into(torch, results, "ssd step y", y[-1:], ys, sb * sh * sp * sn)
    _compare_into(torch, results, "ssd step state", state[-1:], last_row, sb * sh * sp * sn)
    return dict(checks=results, ok=all(r["ok"] for r in results.values()))


def _ssd_inputs(torch, dev, b, l, h, p, n, g, dtype, gen):
    """Mamba-2's initialisation: A = -U(1, 16) per head, dt log-uniform in [1e-3, 0.1] through softplus."""
    dtv = torch.exp(math.log(1e-3) + (math.log(0.1) - math.log(1e-3)) * torch.rand(b, l, h, device=dev, generator=gen))
    bias = 0.1 * torch.randn(h, device=dev, generator=gen)
    return dict(x=torch.randn(b, l, h, p, device=dev, generator=gen).to(dtype),
                dt=(torch.log(torch.expm1(dtv)) - bias).to(dtype),
                A=-(1 + 15 * torch.rand(h, device=dev, generator=gen)),
                B=torch.randn(b, l, g, n, device=dev, generator=gen).to(dtype),
                C=torch.randn(b, l, g, n, device=dev, generator=gen).to(dtype),
                D=torch.ones(h, device=dev), z=torch.randn(b, l, h, p, device=dev, generator=gen).to(dtype),
                dt_bias=bias, dt_softplus=True)


def phase_ssd_bench(smoke):
    torch, impls, _, dev = _setup(smoke)
    started = time.time()
    measure = _timer(torch, smoke)
    gen = torch.Generator(device=dev).manual_seed(0)
    ssd_names = impls.names(family="ssd")
    names = [nm for nm in ("triton", "chunked", "mamba_ssm") if nm in ssd_names]
    chunk = SMOKE_SSD_CHUNK if smoke else SSD_CHUNK
    out = dict(names=names, rows=[], step=[], errors=[], methods={}, chunk_size=chunk, dtype="bfloat16",
               notes=["backward = (forward + backward) - forward",
                      "TFLOP/s: ssd_flops for the forward, 3x it for forward + backward, 2x for the backward",
                      "GB/s: the memory floor's bytes (ssd_forward_bytes, ssd_backward_bytes) over the time"])

    def timed(key, fn):
        try:
            ms, method = measure(fn)
            out["methods"][method] = out["methods"].get(method, 0) + 1
            return ms
        except Exception as e:  # an out-of-memory peer, say: recorded, the rest goes on
            out["errors"].append(f"{key}: {type(e).__name__}: {str(e)[:300]}")
            if dev == "cuda":
                torch.cuda.empty_cache()
            return None

    numel = 2**18 if smoke else 2**28
    src = torch.empty(numel, device=dev)
    dst = torch.empty_like(src)
    ms = timed("copy", lambda: dst.copy_(src))
    bandwidth = 2 * 4 * numel / (ms * 1e-3) if ms else None
    out["copy_bandwidth_gbs"] = bandwidth / 1e9 if bandwidth else None
    del src, dst

    dtype = torch.bfloat16
    for shape_name, shape in (SMOKE_SSD_SHAPES if smoke else SSD_SHAPES).items():
        h, p, n, g = shape["h"], shape["p"], shape["n"], shape["g"]
        for l in (SMOKE_SSD_LENGTHS if smoke else SSD_LENGTHS):
            if time.time() - started > SSD_BENCH_TIMEOUT_S - 40:
                out["errors"].append(f"{shape_name} l={l} and later: not measured, time budget")
                break
            b = 1
            x = _ssd_inputs(torch, dev, b, l, h, p, n, g, dtype, gen)
            gy = torch.randn(b, l, h, p, device=dev, generator=gen).to(dtype)
            flops = ssd_flops(b, l, h, p, n, chunk)
            fbytes, bbytes = ssd_forward_bytes(b, l, h, p, n, g, 2), ssd_backward_bytes(b, l, h, p, n, g, 2)
            rows = {op: dict(shape=shape_name, b=b, l=l, h=h, p=p, n=n, g=g, op=op, ms={}, bytes=nb, flops=fl)
                    for op, nb, fl in (("forward", fbytes, flops), ("backward", bbytes, 2 * flops),
                                       ("forward+backward", fbytes + bbytes, 3 * flops))}
            for name in names:
                with torch.no_grad():
                    rows["forward"]["ms"][name] = timed(f"{name} forward {shape_name} l={l}",
                                                        lambda: impls.ssd_scan(**x, chunk_size=chunk, impl=name))
                if not impls.get(name, family="ssd").supports["gradients"]:
                    continue
                leaves = {k: (v.detach().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
                wrt = [v for v in leaves.values() if isinstance(v, torch.Tensor)]

                def fwd_bwd():
                    torch.autograd.grad(impls.ssd_scan(**leaves, chunk_size=chunk, impl=name), wrt, gy)
                fb = timed(f"{name} forward+backward {shape_name} l={l}", fwd_bwd)
                rows["forward+backward"]["ms"][name] = fb
                if fb is not None and rows["forward"]["ms"][name] is not None:
                    rows["backward"]["ms"][name] = fb - rows["forward"]["ms"][name]
                del leaves, wrt
            for row in rows.values():
                row["floor_ms"] = 1e3 * row["bytes"] / bandwidth if bandwidth else None
                tri = row["ms"].get("triton")
                row["triton_gbs"] = row["bytes"] / (tri * 1e-3) / 1e9 if tri else None
                row["triton_tflops"] = row["flops"] / (tri * 1e-3) / 1e12 if tri else None
                out["rows"].append(row)
            del x, gy

    # the step at each shape, a batch of SSD_STEP_BATCH sequences
    step_names = [nm for nm in ("triton", "recurrent", "mamba_ssm") if nm in ssd_names and impls.get(nm, "ssd").step]
    out["step_names"] = step_names
    for shape_name, shape in (SMOKE_SSD_SHAPES if smoke else SSD_SHAPES).items():
        h, p, n, g = shape["h"], shape["p"], shape["n"], shape["g"]
        b = 2 if smoke else SSD_STEP_BATCH
        x = _ssd_inputs(torch, dev, b, 1, h, p, n, g, dtype, gen)
        state = torch.zeros(b, h, p, n, device=dev)
        row = dict(shape=shape_name, b=b, h=h, p=p, n=n, g=g, op="step", ms={}, bytes=ssd_step_bytes(b, h, p, n, g, 2))
        for nm in step_names:
            args = (state, x["x"][:, 0], x["dt"][:, 0], x["A"], x["B"][:, 0], x["C"][:, 0], x["D"], x["z"][:, 0],
                    x["dt_bias"], True)
            row["ms"][nm] = timed(f"{nm} step {shape_name}", lambda: impls.ssd_state_update(*args, impl=nm))
        row["floor_ms"] = 1e3 * row["bytes"] / bandwidth if bandwidth else None
        out["step"].append(row)
    out["ok"] = not any(e.startswith("triton") for e in out["errors"])
    return out


def ssd_targets(ssd_bench):
    """Issue 17's targets for the SSD forward at mamba2-2.7b's layer, l = 8192: at least 20x faster
    than chunked on the same GPU, and within 1.5x of the official kernel's time. Reported, not enforced."""
    row = next((r for r in ssd_bench.get("rows", []) if r["op"] == "forward" and r["shape"] == "mamba2-2.7b"
                and r["l"] == 8192), None)
    ms = row["ms"] if row else {}
    tri, chunked, official = ms.get("triton"), ms.get("chunked"), ms.get("mamba_ssm")
    out = {}
    out["ssd_forward_speedup_vs_chunked"] = (
        dict(value=chunked / tri, target=20.0, met=chunked / tri >= 20.0) if tri and chunked
        else dict(value=None, target=20.0, met=False, note="not measured"))
    out["ssd_forward_over_official"] = (
        dict(value=tri / official, target=1.5, met=tri / official <= 1.5) if tri and official
        else dict(value=None, target=1.5, met=False, note="mamba_ssm not importable here" if tri else "not measured"))
    return out


def format_ssd_table(results):
    """The SSD part of the printed table."""
    out = []
    big = results.get("ssd_big", {})
    for k, r in big.get("checks", {}).items():
        out.append(f"  past 2^31: {k:<24} {'ok  ' if r.get('ok') else 'FAIL'} {r.get('elements', '')} elements, "
                   f"max |diff| {r.get('max_abs_diff', '?')}")
    if big.get("error"):
        out.append(f"  ssd past 2^31: FAIL {big['error']}")
    bench = results.get("ssd_bench", {})
    if bench.get("error"):
        out.append(f"  ssd bench: FAIL {bench['error']}")
    names = bench.get("names", [])
    if bench.get("rows"):
        out.append("")
        out.append(f"  {'SSD scan, bfloat16 (ms, median)':<36}" + "".join(f"{nm:>11}" for nm in names)
                   + f"{'floor':>9}{'GB/s':>9}{'TFLOP/s':>9}")
        for row in bench["rows"]:
            label = f"{row['shape']} l{row['l']} {row['op']}"
            cells = "".join(f"{_fmt_ms(row['ms'].get(nm)):>11}" for nm in names)
            rates = "".join(f"{(format(v, '.3g') if v else '-'):>9}" for v in (row.get("triton_gbs"), row.get("triton_tflops")))
            out.append(f"  {label:<36}{cells}{_fmt_ms(row.get('floor_ms')):>9}{rates}")
    step_names = bench.get("step_names", [])
    for row in bench.get("step", []):
        out.append(f"  {'step ' + row['shape'] + ' b' + str(row['b']):<36}"
                   + "".join(f"{nm}={_fmt_ms(row['ms'].get(nm))} " for nm in step_names) + f"floor={_fmt_ms(row.get('floor_ms'))}")
    for key, label, fmt in (("ssd_forward_speedup_vs_chunked", "SSD forward, chunked / triton", ">= {:g}x"),
                            ("ssd_forward_over_official", "SSD forward, triton / official", "<= {:g}x")):
        r = results.get("ssd_targets", {}).get(key, {})
        if r.get("value") is not None:
            out.append(f"  {label:<32} {r['value']:.2f}x  (target {fmt.format(r['target'])}: {'met' if r['met'] else 'not met'})")
        elif r:
            out.append(f"  {label:<32} -  ({r.get('note', 'not measured')})")
    return out


# ---- the driver ----------------------------------------------------------------------------------

def _run_phase(phase, smoke, timeout):
    """Run one phase in a fresh process; its JSON result, or an error record."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--phase", phase, result] + (["--smoke"] if smoke else [])
        t0 = time.time()
        try:
            run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return dict(ok=False, error=f"timed out after {timeout} s", output_tail=str(e.stdout or "")[-2000:])
        if run.returncode != 0 or not os.path.exists(result):
            return dict(ok=False, error=f"exit status {run.returncode} (a negative status is a signal)",
                        output_tail=(run.stdout + run.stderr)[-3000:])
        with open(result) as f:
            out = json.load(f)
        out["duration_s"] = time.time() - t0
        return out


def _run_suite(smoke):
    env = dict(os.environ, CI="true")
    if smoke:
        jobs = {"smoke": ["--impl", "triton", *SMOKE_SUITE], "smoke_ssd": ["--ssd-impl", "triton", *SMOKE_SSD_SUITE]}
    else:
        jobs = {**{f: ["--impl", "triton", f] for f in SUITE_FILES},
                **{f: ["--ssd-impl", "triton", f] for f in SSD_SUITE_FILES}}

    def one(args):
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
        t0 = time.time()
        try:
            run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=SUITE_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            return dict(ok=False, error=f"timed out after {SUITE_TIMEOUT_S} s", output_tail=str(e.stdout or "")[-2000:])
        counts = pytest_summary(run.stdout)
        return dict(ok=run.returncode == 0 and counts.get("passed", 0) > 0, returncode=run.returncode,
                    counts=counts, duration_s=time.time() - t0, output_tail=run.stdout[-3000:])

    with concurrent.futures.ThreadPoolExecutor(min(len(jobs), 5)) as pool:
        files = dict(zip(jobs, pool.map(one, jobs.values())))
    return dict(files=files, ok=all(r["ok"] for r in files.values()))


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.phase:                                    # internal: one phase, in this process
        result = dict(big=phase_big, bench=phase_bench, ssd_big=phase_ssd_big, ssd_bench=phase_ssd_bench)[args.phase](args.smoke)
        with open(args.output_dir, "w") as f:         # here output_dir is the result file
            json.dump(result, f, default=str)
        return EXIT_OK

    try:
        import torch
        import triton
    except ImportError as e:
        print(NO_CUDA.format(why=f"cannot import {e.name}", code=EXIT_NO_CUDA), file=sys.stderr)
        return EXIT_NO_CUDA
    if not args.smoke and not torch.cuda.is_available():
        print(NO_CUDA.format(why=f"torch {torch.__version__} sees no CUDA device", code=EXIT_NO_CUDA), file=sys.stderr)
        return EXIT_NO_CUDA

    started = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    results = dict(smoke=args.smoke, started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), torch=torch.__version__,
                   triton=triton.__version__, python=sys.version.split()[0],
                   device="CPU (smoke)" if args.smoke else torch.cuda.get_device_name(0),
                   cuda=None if args.smoke else torch.version.cuda)
    print(f"gpu_check: suite and big (2^31) phases, then bench and ssd_bench; about "
          f"{(max(SUITE_TIMEOUT_S, BIG_TIMEOUT_S, SSD_BIG_TIMEOUT_S) + BENCH_TIMEOUT_S + SSD_BENCH_TIMEOUT_S) // 60} min at most",
          flush=True)
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        suite = pool.submit(_run_suite, args.smoke)
        big = pool.submit(_run_phase, "big", args.smoke, BIG_TIMEOUT_S)
        ssd_big = pool.submit(_run_phase, "ssd_big", args.smoke, SSD_BIG_TIMEOUT_S)
        if args.smoke:  # nothing is measured in a smoke run: no need to keep the timings alone
            bench = pool.submit(_run_phase, "bench", args.smoke, BENCH_TIMEOUT_S)
            ssd_bench = pool.submit(_run_phase, "ssd_bench", args.smoke, SSD_BENCH_TIMEOUT_S)
        results["suite"], results["big"], results["ssd_big"] = suite.result(), big.result(), ssd_big.result()
    results["bench"] = bench.result() if args.smoke else _run_phase("bench", args.smoke, BENCH_TIMEOUT_S)
    results["ssd_bench"] = (ssd_bench.result() if args.smoke
                            else _run_phase("ssd_bench", args.smoke, SSD_BENCH_TIMEOUT_S))
    results["targets"] = targets(results["bench"]) if results["bench"].get("scan") else {}
    results["ssd_targets"] = ssd_targets(results["ssd_bench"])
    results["ok"] = all(results[k].get("ok") for k in ("suite", "big", "bench", "ssd_big", "ssd_bench"))
    results["duration_s"] = time.time() - started
    path = os.path.join(args.output_dir, RESULT_NAME)
    write_atomically(path, results)
    print(format_table(results))
    print(f"results: {path}")
    return EXIT_OK if results["ok"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
