"""Read result files into one pandas DataFrame, one row per measured point.

Two formats are read: this project's JSON lines (benchmarks/runner.py) and pytest-benchmark's
JSON (``--benchmark-json`` / ``--benchmark-save``). Each row gets a ``source`` column naming the
file it came from with the commit (``+dirty`` for uncommitted changes) and host it was measured on,
so several files, say two machines or two commits, sit side by side. Lines that cannot be read are
reported and skipped.

No silent mixing: a file holds one run. When a file holds points of several runs (another commit,
tree, machine or settings, as `scanbench sweep --resume` leaves after a code change), only its
latest run's points are kept and the others are reported as left out, with how many. Shards
(`scanbench sweep --shard I/N`, one file each, possibly from several machines) of one commit and
settings are merged into one source, "shards @ COMMIT". A point recorded twice in one source (a
file given twice, a copied shard) is kept once, with a note.
"""

import json
import os

import pandas as pd

from benchmarks.common import machine_key, read_jsonl


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


def _commit(record):
    m = record.get("machine") if isinstance(record.get("machine"), dict) else {}
    commit = record.get("commit", m.get("commit")) or "?"
    return commit + ("+dirty" if record.get("dirty") else "")


def _run_of(record):
    """What makes a run within one file: commit, tree, machine and settings, exactly what
    `scanbench sweep --resume` requires to reuse a point (benchmarks.runner.same_provenance), so a
    point resume reused is never left out here. Shards of several machines are several files."""
    m = record.get("machine") if isinstance(record.get("machine"), dict) else {}
    return json.dumps([record.get("commit", m.get("commit")), record.get("dirty"), machine_key(m),
                       record.get("settings")], sort_keys=True, default=str)


def _label(path, record):
    m = record.get("machine") if isinstance(record.get("machine"), dict) else {}
    if record.get("shard"):
        size = (record.get("settings") or {}).get("size")
        return f"shards @ {_commit(record)}" + (f" ({size})" if size else "")
    stem = os.path.splitext(os.path.basename(path))[0]
    return " @ ".join([stem, _commit(record)] + ([str(m["host"])] if m.get("host") else []))


def latest_run(path, records):
    """(records of the file's latest run, problem lines for the points of other runs left out)."""
    runs = {}
    for r in records:
        runs.setdefault(_run_of(r), []).append(r)
    if len(runs) <= 1:
        return records, []
    latest = _run_of(records[-1])   # files are appended to: the last line is the latest run's
    problems = []
    for k, rs in runs.items():
        if k != latest:
            problems.append(f"{path}: {len(rs)} point(s) of an earlier run (commit {_commit(rs[0])}, "
                            f"or another machine or settings) left out; this file's latest run is commit "
                            f"{_commit(runs[latest][0])} ({len(runs[latest])} points)")
    return runs[latest], problems


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
        records, left_out = latest_run(path, records)
        problems += left_out
        frame = pd.DataFrame(records)
        frame["source"] = _label(path, records[-1])   # one run, one name (a resumed shard file included)
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
    if "shard" in data:  # a shard set that is not complete says which parts it lacks
        for source, g in data[data["shard"].notna()].groupby("source"):
            if not source.startswith("shards @"):
                continue
            parts = {tuple(int(x) for x in str(v).split("/")) for v in g["shard"].unique()}
            n = max(n for _, n in parts)
            missing = [f"{i}/{n}" for i in range(1, n + 1) if (i, n) not in parts]
            if missing:
                problems.append(f"{source}: shard(s) {', '.join(missing)} missing: this report covers part of the sweep")
    if "key" in data:   # the same file passed twice, or a copied shard: one run measured each point once
        dup = data["key"].notna() & data.duplicated(subset=["source", "key"], keep="last")
        if dup.any():
            problems.append(f"{int(dup.sum())} duplicate point(s) (same key in the same run, e.g. a file given "
                            "twice or a copied shard) counted once, the last kept")
            data = data[~dup].reset_index(drop=True)
    return data, problems
