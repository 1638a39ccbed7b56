"""Read result files into one pandas DataFrame, one row per measured point.

Two formats are read: this project's JSON lines (benchmarks/runner.py) and pytest-benchmark's
JSON (``--benchmark-json`` / ``--benchmark-save``). Each row gets a ``source`` column naming the
file it came from (with the commit and host it was measured on), so several files, say two
machines or two commits, sit side by side. Lines that cannot be read are reported and skipped.
"""

import json
import os

import pandas as pd

from benchmarks.common import read_jsonl


def _pytest_benchmark_rows(doc, path):
    machine = dict(host=doc.get("machine_info", {}).get("node"),
                   commit=(doc.get("commit_info") or {}).get("id", "")[:7] or None)
    rows = []
    for b in doc.get("benchmarks", []):
        stats = b.get("stats", {})
        rows.append(dict(benchmark="pytest-benchmark", name=b.get("name"), group=b.get("group"),
                         median_s=stats.get("median"), iqr_s=stats.get("iqr"), runs=stats.get("rounds"),
                         params=json.dumps(b.get("params")) if b.get("params") else None, machine=machine))
    return rows


def read(path):
    """(records, problems) from one file of either format."""
    with open(path) as f:
        text = f.read()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        doc = None
    if isinstance(doc, dict) and "benchmarks" in doc:
        return _pytest_benchmark_rows(doc, path), []
    return read_jsonl(path)


def _label(path, records):
    machine = next((r["machine"] for r in records if isinstance(r.get("machine"), dict)), {})
    stem = os.path.splitext(os.path.basename(path))[0]
    parts = [stem] + [str(machine[k]) for k in ("commit", "host") if machine.get(k)]
    return " @ ".join(parts)


def load(paths):
    """(DataFrame of every readable record from ``paths``, list of problem messages)."""
    frames, problems = [], []
    for path in paths:
        if not os.path.exists(path):
            problems.append(f"{path}: no such file; skipped")
            continue
        records, bad = read(path)
        problems += bad
        if not records:
            problems.append(f"{path}: no readable results")
            continue
        frame = pd.DataFrame(records)
        frame["source"] = _label(path, records)
        if "error" in frame:
            for _, row in frame[frame["error"].notna()].iterrows():
                what = " ".join(str(row[k]) for k in ("benchmark", "key") if k in row and pd.notna(row[k]))
                problems.append(f"{path}: {what}: {row['error']}")
            frame = frame[frame["error"].isna()]
        if "benchmark" not in frame:
            problems.append(f"{path}: records without a 'benchmark' field; skipped")
            continue
        missing = frame["benchmark"].isna()
        if missing.any():
            problems.append(f"{path}: {int(missing.sum())} record(s) without a 'benchmark' field; skipped")
        frames.append(frame[~missing])
    data = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["benchmark", "source"])
    return data, problems
