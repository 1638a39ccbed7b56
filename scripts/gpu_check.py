"""GPU check of the Triton kernels (impls/selective/triton.py, impls/ssd/triton.py,
impls/mamba3/triton.py), for when a machine with a GPU is lent. None of it has run on a GPU yet.
Run it through scripts/gpu_check.sh:

    scripts/gpu_check.sh OUTPUT_DIR            # on a machine with a CUDA device
    scripts/gpu_check.sh --budget 560 OUTPUT_DIR   # given more time (seconds; default 480)
    scripts/gpu_check.sh --smoke OUTPUT_DIR    # every phase at tiny sizes on the CPU, in Triton's
                                               # interpreter: tests this script, measures nothing

Phases, each in its own process (a crash, say an illegal address from a wrapped offset, or a hang
is recorded and the other phases still run): the suite, beside it the big phases one after another
(each needs most of a GPU's memory), then the bench phases alone, all within --budget seconds
(default 480: a lent GPU's 15 minutes must leave room to run it again). A phase's limit is cut to
what is left; a bench phase gets its share of it and measures what fits (the rest is listed as not
measured); a phase left under 20 s is recorded as not run, which fails the run. Every phase but
the suite is written once and run for each family of FAMILIES (in scripts/gpu_families.py: Mamba-1 "selective", its results under big and bench;
Mamba-2 "ssd", under ssd_big and ssd_bench; Mamba-3 SISO "mamba3", under mamba3_big and
mamba3_bench), which says what differs: inputs, shapes, names, bytes and targets.
  suite  the equivalence suite for triton, natively, every family's files in parallel. On a GPU
         the triton entries have no case limits, so the property tests draw their full sizes.
  big    forward, backward and step on more than 2^31 elements, each checked against the same rows
         computed on a compact copy: a wrapped 32-bit offset reads or writes the wrong row.
         selective: b·d·l = 2^31 + 2^18 for the scan, b·d·n > 2^31 for the step's state;
         ssd: x of b·l·h·p = 2^31 + 2^17 elements, the step on a state of b·h·p·n > 2^31;
         mamba3: V of b·l·h·p = 2^31 + 2^17 (no Z), the last two heads; the step on an ssm
         state of b·h·p·n = 2^31 + 2^18, its last row (the step returns new states).
  bench  CUDA-event timings (triton.testing.do_bench; calls slower than 50 ms are timed with CUDA
         events directly, median of 3) of the scan forward, forward + backward and the step, with
         the device copy bandwidth and the memory floor.
         selective: triton against parallel (when registered) and loop (recurrent for the step) at
         b=8, d=1536, n=16, l=8192 and a smaller size; a sweep of launch configurations.
         ssd: at mamba2-130m's (h=24) and mamba2-2.7b's (h=80) layer shapes (p=64, n=128, g=1,
         chunk_size=256), l = 2048, 8192, 65536, bfloat16: triton against chunked (the torch SSD,
         same GPU) and the official mamba_chunk_scan_combined when mamba_ssm imports (registered as
         mamba_ssm), in ms, GB/s and TFLOP/s.
         mamba3: at the official SISO kernel's tuned shape (h=32, h_qk=1, p=64, n=128, n_ang=32,
         chunk_size=64), b=16 l=2048, b=1 l=8192 and 65536, bfloat16, the step at b=128: triton
         against chunked (the torch scan; recurrent for the step) and the official
         mamba3_siso_combined and mamba3_siso_step when mamba_ssm imports (registered as mamba_ssm).

Writes OUTPUT_DIR/gpu_check.json (complete or not at all) and prints a short table.
Exit status: 0 every check passed; 1 a check failed, or a phase crashed or ran out of time (the
JSON says which); 2 usage error; 3 no CUDA device, or no torch or triton: nothing is written.
The speed targets (selective, at b=8, d=1536, n=16, l=8192: forward at least 20x faster than
parallel and within 2x of the memory floor; ssd, at mamba2-2.7b's layer and l = 8192: forward at
least 20x faster than chunked and within 1.5x of the official kernel; mamba3, at b=16, l=2048: the
same two) are reported, not enforced.
"""

import argparse
import concurrent.futures
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_NAME = "gpu_check.json"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_CUDA = 0, 1, 2, 3
SUITE_TIMEOUT_S = 240
# A lent GPU comes with 15 minutes for everything, starting it included, and one command may run
# 10 minutes: the run must end well inside one call, with time left to run it again.
DEFAULT_BUDGET_S = 480
MIN_PHASE_S = 20      # a phase given less is recorded as not run
BIG_SHARE = 0.5        # of the budget, for the suite and (beside it, one after another) the big phases
PHASE_KINDS = ("big", "bench")

# the families' own parts live beside this file (loaded by path, as the tests load this one, it is
# not on sys.path by itself)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_families import FAMILIES  # noqa: E402

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
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help=f"folder for {RESULT_NAME} (created if missing)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, to test this script")
    p.add_argument("--budget", type=int, default=DEFAULT_BUDGET_S,
                   help=f"seconds the whole run may take (default {DEFAULT_BUDGET_S}); each phase's limit is cut to fit")
    p.add_argument("--phase-budget", type=float, help=argparse.SUPPRESS)  # internal: the phase's own limit
    p.add_argument("--phase", choices=[f["key"] + k for f in FAMILIES.values() for k in PHASE_KINDS],
                   help=argparse.SUPPRESS)  # internal
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error(f"--budget {args.budget}: the run's time in seconds must be positive")
    return args


# ---- pure helpers (tested on the CPU) ------------------------------------------------------------

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


def _fmt_rate(x):
    return "-" if not x else format(x, ".3g")


def format_table(results):
    """The short table printed at the end, from the JSON results."""
    out = [f"GPU check on {results.get('device', '?')} (torch {results.get('torch', '?')}, "
           f"triton {results.get('triton', '?')}){'  [SMOKE: tiny sizes on the CPU, not measurements]' if results.get('smoke') else ''}"]
    suite = results.get("suite", {})
    for f, r in suite.get("files", {}).items():
        counts = ", ".join(f"{v} {k}" for k, v in r.get("counts", {}).items()) or r.get("error", "no summary")
        out.append(f"  suite {f.split(':')[0] + ' ' if ':' in f else ''}{os.path.basename(f):<22} {'ok  ' if r.get('ok') else 'FAIL'} {counts}")
    for family in FAMILIES.values():
        out.extend(format_family(results, family))
    out.append(f"  {'PASSED' if results.get('ok') else 'FAILED'} in {results.get('duration_s', 0):.0f} s")
    return "\n".join(out)


def format_family(results, family):
    """One family's lines of the table: its checks past 2^31, its timings and its targets."""
    key, title, label = family["key"], family["title"], family["label"]
    out = []
    big = results.get(key + "big", {})
    for k, r in big.get("checks", {}).items():
        out.append(f"  past 2^31: {k:<24} {'ok  ' if r.get('ok') else 'FAIL'} {r.get('elements', '')} elements, "
                   f"max |diff| {r.get('max_abs_diff', '?')}")
    if big.get("error"):
        out.append(f"  {title} past 2^31: FAIL {big['error']}")
    bench = results.get(key + "bench", {})
    if bench.get("error"):
        out.append(f"  {title} bench: FAIL {bench['error']}")
    for rows, names, what in ((bench.get("rows"), bench.get("names", []), "scan"),
                              (bench.get("step"), bench.get("step_names", []), "step")):
        if not rows:
            continue
        out.append("")
        out.append(f"  {f'{title} {what} (ms, median)':<42}" + "".join(f"{nm:>11}" for nm in names)
                   + f"{'floor':>9}{'GB/s':>9}{'TFLOP/s':>9}")
        for row in rows:
            cells = "".join(f"{_fmt_ms(row['ms'].get(nm)):>11}" for nm in names)
            rates = "".join(f"{_fmt_rate(row.get(k)):>9}" for k in ("triton_gbs", "triton_tflops"))
            out.append(f"  {label(row) + ' ' + row['op']:<42}{cells}{_fmt_ms(row.get('floor_ms')):>9}{rates}")
    if bench.get("copy_bandwidth_gbs"):
        out.append(f"  device copy bandwidth {bench['copy_bandwidth_gbs']:.4g} GB/s")
    t = results.get(key + "targets", {})
    if t:
        out.append("")
    for name, ref, kind, _ in family["targets"]:
        r = t.get(name, {})
        what = f"{title} forward, " + (f"{ref} / triton" if kind == "speedup" else f"triton / {ref}")
        if r.get("value") is not None:
            bound = (">= " if kind == "speedup" else "<= ") + f"{r['target']:g}x"
            out.append(f"  {what:<40} {r['value']:.2f}x  (target {bound}: {'met' if r['met'] else 'not met'})")
        elif r:
            out.append(f"  {what:<40} -  ({r.get('note', 'not measured')})")
    for name in ("forward", "backward"):
        best = bench.get(f"best_{name[:3]}_config")
        if best:
            out.append(f"  best {name} launch config: {best['config']} at {_fmt_ms(best['ms'])} ms")
    return out


def targets(bench, family):
    """The family's speed targets, from its bench results: reported, not enforced. A "speedup"
    target is (the reference's time) / triton's, at least the target; an "over" target is triton's
    time / the reference's (or the memory floor's), at most the target."""
    row = next((r for r in bench.get("rows", []) if all(r.get(k) == v for k, v in family["target_row"].items())), None)
    tri = row["ms"].get("triton") if row else None
    out = {}
    for name, ref, kind, target in family["targets"]:
        other = row and (row.get("floor_ms") if ref == "floor" else row["ms"].get(ref))
        if tri and other:
            value = other / tri if kind == "speedup" else tri / other
            out[name] = dict(value=value, target=target, met=value >= target if kind == "speedup" else value <= target)
        else:
            note = ("not measured" if not tri else "no copy bandwidth measured" if ref == "floor"
                    else f"{ref} not registered, not importable here or not measured")
            out[name] = dict(value=None, target=target, met=False, note=note)
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


# ---- the phases, written once over a family (each runs in its own process) -----------------------

def _setup(family, smoke):
    """Import the family's kernels; returns (torch, the kernel module, device)."""
    sys.path.insert(0, ROOT)
    import torch
    return torch, importlib.import_module(family["kernels"]), ("cpu" if smoke else "cuda")


def _scan(family, kernels, x):
    """(output, last state) of the family's Triton scan on the keyword arguments x."""
    return getattr(kernels, family["scan"])(**x, **{family["return_state"]: True})


def _window(take, x):
    return {k: take(k, v) if hasattr(v, "shape") else v for k, v in x.items()}


def _compare(torch, big, small, elements):
    """Whether ``big`` (rows of a run past 2^31 elements) equals ``small`` (the same rows from a
    compact copy) to within 1e-6 of its scale: a wrapped offset reads another row entirely."""
    diff = (big.double() - small.double()).abs()
    scale = float(small.double().abs().max()) or 1.0
    max_diff = float(diff.max())
    return dict(ok=bool(torch.isfinite(big).all()) and max_diff <= 1e-6 * scale,
                bitwise_equal=bool(torch.equal(big, small)), max_abs_diff=max_diff, elements=elements)


def phase_big(family, smoke):
    """Forward, backward and step past 2^31 elements against compact copies of some of their rows.
    The family gives the inputs (big_scan: inputs, elements, and windows: a label and how to take
    the window's part of an input, output or gradient by name) and the step's (big_step: the state,
    a tensor or a tuple of tensors passed as the argument step_state, and the other arguments, of
    which those named in step_batched have a batch row each)."""
    torch, kernels, dev = _setup(family, smoke)
    gen = torch.Generator(device=dev).manual_seed(0)
    results = {}

    def check(what, got, want, elements):
        name = " ".join(w for w in (family["check_prefix"], what) if w)
        results[name] = _compare(torch, got, want, elements)

    big = family["big_scan"](torch, dev, gen, smoke)
    x, elements = big["inputs"], big["elements"]
    with torch.no_grad():
        outputs = _scan(family, kernels, x)
        for label, take in big["windows"]:
            small = _scan(family, kernels, _window(take, x))
            for name, got, want in zip(family["outputs"], outputs, small):
                check(f"forward {name} {label}".strip(), take(name, got), want, elements)
    del outputs, small
    leaf_names = family["leaves"]
    gy = torch.randn(x[leaf_names[0]].shape, device=dev, generator=gen, dtype=x[leaf_names[0]].dtype)
    leaves = {k: x[k].detach().requires_grad_() for k in leaf_names}
    grads = torch.autograd.grad(_scan(family, kernels, {**x, **leaves})[0], list(leaves.values()), gy)
    del leaves
    for label, take in big["windows"]:
        small = _window(take, x)
        wrt = [small[k].requires_grad_() for k in leaf_names]
        small_grads = torch.autograd.grad(_scan(family, kernels, small)[0], wrt, take(leaf_names[0], gy))
        for k, big_g, small_g in zip(leaf_names, grads, small_grads):
            check(f"backward d{k} {label}".strip(), take(k, big_g), small_g, elements)
    del grads, x, gy, small, wrt

    # the step: its last batch row against the same row updated alone. A step that returns (y, new
    # states) is read as such; one that returns y alone has updated its state in place.
    state, args = family["big_step"](torch, dev, gen, smoke)
    states = state if isinstance(state, tuple) else (state,)
    last_rows = tuple(s[-1:].clone() for s in states)
    step, batched = getattr(kernels, family["step"]), family["step_batched"]
    as_given = lambda rows: rows if isinstance(state, tuple) else rows[0]
    read = lambda res, rows: res if isinstance(res, tuple) else (res, rows)
    y, new = read(step(**args, **{family["step_state"]: state}), states)
    ys, new_rows = read(step(**{k: (v[-1:] if k in batched else v) for k, v in args.items()},
                             **{family["step_state"]: as_given(last_rows)}), last_rows)
    elements = max(s.numel() for s in states)
    check("step y", y[-1:], ys, elements)
    for name, big_s, small_s in zip(family["step_states"], new, new_rows):
        check(f"step {name}", big_s[-1:], small_s, elements)
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





def phase_bench(family, smoke, budget=None):
    """Timings of the scan (forward, forward + backward, and their difference) and of the step, for
    triton and the family's other implementations, with the memory floor from the copy bandwidth.
    The family gives its cases (bench_cases, step_cases), their inputs and sizes, and whatever it
    tunes besides (tune)."""
    torch, kernels, dev = _setup(family, smoke)
    import impls
    started = time.time()
    budget = budget or family["timeouts"]["bench"]
    measure = _timer(torch, smoke)
    gen = torch.Generator(device=dev).manual_seed(0)
    registered = impls.names(family=family["name"])
    names = [nm for nm in family["bench_names"] if nm in registered]
    step_names = [nm for nm in family["step_names"] if nm in registered and impls.get(nm, family["name"]).step]
    out = dict(names=names, step_names=step_names, rows=[], step=[], errors=[], methods={},
               notes=["backward = (forward + backward) - forward",
                      "GB/s: the memory floor's bytes over triton's time",
                      "TFLOP/s (where counted): the forward's FLOPs, 3x for forward + backward, 2x for the backward",
                      *family.get("bench_notes", ())])
    scan, step = getattr(impls, family["scan"]), getattr(impls, family["step"])

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

    def add(row):
        row["floor_ms"] = 1e3 * row["bytes"] / bandwidth if bandwidth else None
        tri = row["ms"].get("triton")
        row["triton_gbs"] = row["bytes"] / (tri * 1e-3) / 1e9 if tri else None
        if row.get("flops") is not None:
            row["triton_tflops"] = row["flops"] / (tri * 1e-3) / 1e12 if tri else None
        (out["step"] if row["op"] == "step" else out["rows"]).append(row)

    for case in family["bench_cases"](smoke):
        label = family["label"](case)
        if time.time() - started > budget - 40:
            out["errors"].append(f"{label} and later: not measured, time budget")
            break
        c = family["bench_inputs"](torch, dev, gen, case, smoke)
        x, gy, (fbytes, bbytes), flops = c["inputs"], c["gy"], c["bytes"], c.get("flops")
        rows = {op: dict(case, op=op, ms={}, bytes=nb, **({} if flops is None else dict(flops=k * flops)))
                for op, nb, k in (("forward", fbytes, 1), ("backward", bbytes, 2), ("forward+backward", fbytes + bbytes, 3))}
        for name in c.get("only") or names:
            with torch.no_grad():
                rows["forward"]["ms"][name] = timed(f"{name} forward {label}", lambda: scan(**x, impl=name))
            if not impls.get(name, family["name"]).supports["gradients"]:
                continue
            leaves = {k: (v.detach().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
            wrt = [v for v in leaves.values() if isinstance(v, torch.Tensor)]

            def fwd_bwd():
                torch.autograd.grad(scan(**leaves, impl=name), wrt, gy)
            fb = timed(f"{name} forward+backward {label}", fwd_bwd)
            rows["forward+backward"]["ms"][name] = fb
            if fb is not None and rows["forward"]["ms"][name] is not None:
                rows["backward"]["ms"][name] = fb - rows["forward"]["ms"][name]
            del leaves, wrt
        for row in rows.values():
            add(row)
        del x, gy, c

    for case in family["step_cases"](smoke):
        c = family["step_inputs"](torch, dev, gen, case, smoke)
        row = dict(case, op="step", ms={}, bytes=c["bytes"])
        for nm in step_names:
            row["ms"][nm] = timed(f"{nm} step {family['label'](case)}",
                                  lambda: step(**c["inputs"], impl=nm))
        add(row)
    if family.get("tune"):
        family["tune"](torch, kernels, dev, gen, smoke, timed, out, started, budget)
    out["ok"] = not any(e.startswith("triton") for e in out["errors"])
    return out


# ---- the driver ----------------------------------------------------------------------------------

def _run_phase(phase, smoke, timeout):
    """Run one phase in a fresh process; its JSON result, or an error record."""
    if timeout < MIN_PHASE_S:
        return dict(ok=False, error=f"not run: {max(timeout, 0):.0f} s were left of the time budget (--budget), "
                                    f"under the {MIN_PHASE_S} s a phase needs")
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        # the phase's own budget leaves it time to start and to write its result before it is stopped
        cmd = [sys.executable, os.path.abspath(__file__), "--phase", phase, result, "--phase-budget", str(timeout - 15)]
        cmd += ["--smoke"] if smoke else []
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



def _run_suite(smoke, timeout=SUITE_TIMEOUT_S):
    env = dict(os.environ, CI="true")
    if smoke:
        # one pytest run with every family's option and a quick test of each family's own file: the
        # options and files are checked as the full suite uses them, and pytest starts once (on a
        # CPU, starting it is most of a smoke job's time)
        fams = FAMILIES.values()
        jobs = {"smoke": [*(a for f in fams for a in (f["option"], "triton")), *(f["smoke_tests"][0] for f in fams),
                          "-k", " or ".join(f["smoke_tests"][1] for f in fams)]}
    else:
        # the property files are shared by the families: one job per family and file, each with only
        # its family's option (so only that family's tests run in it)
        jobs = {f"{f['name']}:{path}": [f["option"], "triton", path] for f in FAMILIES.values() for path in f["suite"]}

    def one(args):
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
        t0 = time.time()
        try:
            run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return dict(ok=False, error=f"timed out after {timeout:.0f} s", output_tail=str(e.stdout or "")[-2000:])
        counts = pytest_summary(run.stdout)
        return dict(ok=run.returncode == 0 and counts.get("passed", 0) > 0, returncode=run.returncode,
                    counts=counts, duration_s=time.time() - t0, output_tail=run.stdout[-3000:])

    with concurrent.futures.ThreadPoolExecutor(min(len(jobs), 5)) as pool:
        files = dict(zip(jobs, pool.map(one, jobs.values())))
    return dict(files=files, ok=all(r["ok"] for r in files.values()))


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    phases = {f["key"] + kind: (kind, f) for f in FAMILIES.values() for kind in PHASE_KINDS}
    if args.phase:                                    # internal: one phase, in this process
        kind, family = phases[args.phase]
        result = phase_big(family, args.smoke) if kind == "big" else phase_bench(family, args.smoke, args.phase_budget)
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

    try:   # before anything runs: a result that cannot be written would lose the whole run
        os.makedirs(args.output_dir, exist_ok=True)
        write_atomically(os.path.join(args.output_dir, RESULT_NAME + ".probe"), {})
        os.unlink(os.path.join(args.output_dir, RESULT_NAME + ".probe"))
    except OSError as e:
        print(f"gpu_check: cannot write into {args.output_dir}: {e}", file=sys.stderr)
        return EXIT_USAGE
    started = time.time()
    results = dict(smoke=args.smoke, started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), torch=torch.__version__,
                   triton=triton.__version__, python=sys.version.split()[0],
                   device="CPU (smoke)" if args.smoke else torch.cuda.get_device_name(0),
                   cuda=None if args.smoke else torch.version.cuda)
    timeouts = {name: (kind, f["timeouts"][kind]) for name, (kind, f) in phases.items()}
    deadline = started + args.budget
    big_deadline = started + BIG_SHARE * args.budget
    print(f"gpu_check: the suite, beside it the big (2^31) phases one after another, then the bench phases; "
          f"at most {args.budget} s (--budget)", flush=True)

    def big_phases():
        # one after another: each needs most of a GPU's memory
        return {name: _run_phase(name, args.smoke, min(t, big_deadline - time.time()))
                for name, (kind, t) in timeouts.items() if kind == "big"}

    with concurrent.futures.ThreadPoolExecutor(2 + len(phases)) as pool:
        suite = pool.submit(_run_suite, args.smoke, min(SUITE_TIMEOUT_S, BIG_SHARE * args.budget))
        if args.smoke:     # tiny sizes on a CPU: no memory to share, and nothing is timed
            running = {name: pool.submit(_run_phase, name, True, min(t, deadline - time.time()))
                       for name, (kind, t) in timeouts.items()}
        else:
            running = {"big phases": pool.submit(big_phases)}
        results["suite"] = suite.result()
        for name, r in running.items():
            results.update({name: r.result()} if name in phases else r.result())
    benches = [name for name, (kind, t) in timeouts.items() if name not in results]
    for i, name in enumerate(benches):   # alone, each given its share of what is left
        results[name] = _run_phase(name, args.smoke, min(timeouts[name][1], (deadline - time.time()) / (len(benches) - i)))
    for f in FAMILIES.values():
        results[f["key"] + "targets"] = targets(results[f["key"] + "bench"], f)
    results["ok"] = results["suite"].get("ok") and all(results[name].get("ok") for name in phases)
    results["duration_s"] = time.time() - started
    path = os.path.join(args.output_dir, RESULT_NAME)
    write_atomically(path, results)
    print(format_table(results))
    print(f"results: {path}")
    return EXIT_OK if results["ok"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
