"""What every benchmark shares: timing, peak memory, the machine's description, JSON-lines results.

Benchmarks write data (one JSON object per line, appended and flushed as soon as a point is
measured, so an interrupted run keeps everything finished); reports read it. Nothing else is shared.

Timing statistics come from torch.utils.benchmark (median and interquartile range over blocked
runs) and numpy's quantiles, not from code of ours.

Ratios (an implementation to the floor, ours to a peer, re-forward to recurrent) are measured
interleaved (``interleaved``): rounds in which each side runs one block of calls, the order rotated
every round, so a change of the machine's load lands on both sides of a pair. A ratio is the
median of the per-round ratios of the process's CPU time (time.process_time: time spent
descheduled while another process runs does not count), with its quartiles (``paired_ratio``); a
point whose quartiles span more than UNSTABLE_SPREAD of the median is marked ``unstable``: it
supports no conclusion, is never drawn as a figure and never counted as a regression. Absolute
times (median_s) are wall-clock.
"""

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time

import numpy as np
import torch
import torch.utils.benchmark as tb

# A paired ratio whose interquartile range is wider than this fraction of its median is unstable.
UNSTABLE_SPREAD = 0.5


def time_call(fn, min_run_time=0.2, warmup=1):
    """Median and IQR seconds of fn() over as many runs as fit in min_run_time (after warm-up)."""
    for _ in range(warmup):
        fn()
    m = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    return dict(median_s=m.median, iqr_s=m.iqr, runs=len(m.times), times_s=list(m.times))


def interleaved(fns, rounds=21, block_s=0.04, budget_s=None, min_rounds=5, warm=None):
    """Time several callables against each other on a shared, noisy machine.

    Each is called once (warm-up, and to size its block: as many calls as fill block_s, at least
    one); then ``rounds`` rounds, in each of which every callable runs one timed block, the order
    rotated from round to round (A B, B A, ...), so the pairs of any two see the same load.

    Args:
        fns: {name: callable}; rounds: timed blocks per callable; block_s: seconds per block;
        budget_s: if given, fewer rounds (not below min_rounds) when ``rounds`` of them would take
        longer (slow calls); warm: {name: seconds of a warm-up call already made}, skipping its own
    Returns:
        {name: dict(median_s, iqr_s, min_s, runs, times_s, cpu_s, cpu_median_s, calls_per_block)}:
        seconds per call, wall-clock (times_s) and CPU time of this process (cpu_s,
        time.process_time); times_s[r] and cpu_s[r] are round r, so ratios can be taken round by
        round (``paired_ratio``, on cpu_s: a process descheduled by another does not accumulate CPU
        time, so the load of a shared machine reaches a ratio only through caches and memory).
    """
    names = list(fns)
    calls, once = {}, {}
    for name in names:
        if warm and name in warm:
            once[name] = warm[name]
        else:
            t0 = time.perf_counter()
            fns[name]()
            once[name] = time.perf_counter() - t0
        calls[name] = max(1, int(block_s / max(once[name], 1e-9)))
    if budget_s is not None:
        per_round = sum(calls[n] * once[n] for n in names)
        rounds = max(min_rounds, min(rounds, int(budget_s / max(per_round, 1e-9))))
    times = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        order = names[k:] + names[:k]
        for name in (order if r % 2 == 0 else order[::-1]):
            fn, n = fns[name], calls[name]
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - t0) / n)
            cpu[name].append((time.process_time() - c0) / n)
    out = {}
    for name, ts in times.items():
        q1, med, q3 = np.percentile(ts, [25, 50, 75])
        out[name] = dict(median_s=float(med), iqr_s=float(q3 - q1), min_s=min(ts), runs=len(ts), times_s=ts,
                         cpu_s=cpu[name], cpu_median_s=float(np.median(cpu[name])), calls_per_block=calls[name])
    return out


def paired_ratio(times_a, times_b, to=None):
    """The ratio a / b from two interleaved series (``interleaved``'s times_s), round by round.

    Returns dict(ratio: median of the per-round ratios, ratio_q1, ratio_q3: their quartiles,
    ratio_pairs: the per-round ratios, ratio_to: ``to`` (what b is), unstable: the quartiles span
    more than UNSTABLE_SPREAD of the median)."""
    if len(times_a) != len(times_b) or not len(times_a):
        raise ValueError(f"paired_ratio: need two series of the same non-zero length, got {len(times_a)} and {len(times_b)}")
    r = np.asarray(times_a, dtype=float) / np.asarray(times_b, dtype=float)
    q1, med, q3 = np.percentile(r, [25, 50, 75])
    return dict(ratio=float(med), ratio_q1=float(q1), ratio_q3=float(q3), ratio_pairs=r.tolist(), ratio_to=to,
                unstable=bool((q3 - q1) > UNSTABLE_SPREAD * med))


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_during(fn, interval_s=0.001):
    """(fn's result, peak resident bytes of this process while fn ran, resident bytes before).

    Sampled from /proc/self/statm on a thread: resident memory is what the issue targets measure
    (torch's CPU allocator has no peak counter of its own)."""
    before = _rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    return result, max(peak[0], _rss_bytes()), before


def status_bytes(field):
    """A /proc/self/status size in bytes: VmRSS now, VmHWM the peak resident memory since exec. Not
    ru_maxrss: Linux carries that over from the forking parent, whose memory a fresh process does
    not hold."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def in_fresh_process(module, function, point):
    """``module.function(point)`` (a sweep's memory point) run in a new Python process, with
    point["threads"] OpenMP threads: its peak resident memory (VmHWM) is then the arguments, the
    output and the scan's own, nothing left over from earlier points. Returns what it returned
    (JSON-serialisable)."""
    code = f"import json, {module} as g; print(json.dumps(g.{function}({point!r})))"
    env = dict(os.environ, OMP_NUM_THREADS=str(point["threads"]))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"child process failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _git(*args):
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _git_commit():
    out = _git("rev-parse", "--short", "HEAD")
    return out.strip() if out else None


def code_state():
    """dict(commit, dirty) of the checkout the benchmarks run from: the short commit, and False for a
    clean tree or a short hash of its uncommitted changes to tracked files (two different edits on
    one commit are two different states). Both None outside a git checkout."""
    commit = _git_commit()
    if commit is None:
        return dict(commit=None, dirty=None)
    diff = _git("diff", "HEAD", "--no-color") or ""
    return dict(commit=commit, dirty=hashlib.sha1(diff.encode()).hexdigest()[:8] if diff.strip() else False)


def machine_key(machine):
    """The part of machine_info that makes timings comparable: host, hardware and versions."""
    return {k: machine.get(k) for k in ("host", "machine", "processor", "cpus", "python", "torch", "triton", "cuda")}


def cpu_model():
    """The CPU's model name (/proc/cpuinfo), or platform.processor() where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def blas():
    """The BLAS torch was built with (BLAS_INFO in torch.__config__.show(): mkl, open, ...)."""
    found = re.search(r"BLAS_INFO=([^,\s]+)", torch.__config__.show())
    return found.group(1) if found else None


FINGERPRINT = ("cpu_model", "cpus", "torch", "blas")


def fingerprint(machine):
    """The part of a machine description that decides whether speeds are comparable: CPU model,
    core count, torch and BLAS (a field an old record lacks is None, so it matches no new record)."""
    return {k: machine.get(k) for k in FINGERPRINT}


def machine_info():
    """Where and with what a result was measured: recorded beside every result file."""
    try:  # from the package metadata: importing triton here would fix its interpreter setting too early
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    return dict(host=platform.node(), machine=platform.machine(), processor=platform.processor(),
                cpu_model=cpu_model(), blas=blas(), cpus=os.cpu_count(), threads=torch.get_num_threads(), python=platform.python_version(),
                torch=torch.__version__, triton=triton_version,
                cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                commit=_git_commit())


def append_jsonl(path, record):
    """Append one result line and make it durable before returning."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path):
    """(records, problems): every well-formed JSON object line, and a message for each line that is not."""
    records, problems = [], []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{number}: not JSON ({e.msg}); skipped")
                continue
            if not isinstance(record, dict):
                problems.append(f"{path}:{number}: not a JSON object; skipped")
                continue
            records.append(record)
    return records, problems
