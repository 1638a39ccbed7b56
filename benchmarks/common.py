"""What every benchmark shares: timing, peak memory, the machine's description, JSON-lines results.

Benchmarks write data (one JSON object per line, appended and flushed as soon as a point is
measured, so an interrupted run keeps everything finished); reports read it. Nothing else is shared.

Timing statistics come from torch.utils.benchmark (median and interquartile range over blocked
runs), not from code of ours.
"""

import importlib.metadata
import json
import os
import platform
import subprocess
import threading
import time

import torch
import torch.utils.benchmark as tb


def time_call(fn, min_run_time=0.2, warmup=1):
    """Median and IQR seconds of fn() over as many runs as fit in min_run_time (after warm-up)."""
    for _ in range(warmup):
        fn()
    m = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    return dict(median_s=m.median, iqr_s=m.iqr, runs=len(m.times), times_s=list(m.times))


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


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info():
    """Where and with what a result was measured: recorded beside every result file."""
    try:  # from the package metadata: importing triton here would fix its interpreter setting too early
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    return dict(host=platform.node(), machine=platform.machine(), processor=platform.processor(),
                cpus=os.cpu_count(), threads=torch.get_num_threads(), python=platform.python_version(),
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
