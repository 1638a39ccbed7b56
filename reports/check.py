"""The kernel regression check: numbers against stored float64 golden results, speed against a baseline.

Numeric: every implementation runs a fixed, versioned set of cases; its outputs are compared with
float64 golden outputs stored in the baseline, under the suite's tolerance policy
(equivalence/tolerance.py; the loop in the same dtype, run now, is the policy's yardstick). The
float64 loop itself is compared with the golden results too, with the floor only, so a change to
the spec shows up as well.

Speed here is history, not the gate: the gate is `scanbench continuous` (reports/continuous.py),
which measures both versions of the code side by side in one run. A baseline's speed section is
valid on the machine it was measured on only: it records the machine's fingerprint (CPU model,
core count, torch, BLAS: benchmarks.common.fingerprint) and the load average while measured, and
results of another fingerprint are "not comparable": shown, never failing the run nor passing it
(unchanged code on a second machine of the same kind failed with 8 "regressions" against a
baseline of another machine, every ratio to the floor doubled together).

On the machine of the baseline: ratios whose two sides were measured interleaved in one process
(benchmarks/common.py), of two kinds (``gated``): each implementation to the floor in the scan
grid, and our decoding step to mamba.py's. Ratios whose sides do unlike work are reported, not gated: re-forwarding against
recurrent decoding (one 100 ms scan against one 0.1 ms step moved up to 3x between runs of unchanged
code on this shared machine), and one parallel-scan prefill against mamba.py's token-by-token
prefill (23 %). For each point the baseline keeps its per-round ratios and
each run's median. A point regresses when both hold, as asv and pyperf decide:
  - its median ratio grew by more than its tolerance over the baseline's: the threshold, or the
    spread between the baseline's own runs of that point if wider (max / min - 1 of their medians:
    the noise the baseline measured itself), and
  - the per-round log ratios now are larger than the baseline's by a one-sided Mann-Whitney U test
    (scipy.stats.mannwhitneyu) at level ALPHA.
A point marked unstable (its per-round ratios' quartiles span more than half its median, now or
in the baseline) is reported as such and never counted as a regression.
"""

import dataclasses
import datetime
import json

import numpy as np
import pandas as pd
import torch
from scipy.stats import mannwhitneyu

import impls
from benchmarks.common import fingerprint
from equivalence.selective import Case, make_inputs, reference_inputs, scales, supported
from equivalence.tolerance import compare, terms

BASELINE_VERSION = 2   # 2: speed holds per-round paired ratios (1 held single ratios to a floor measured apart)
ALPHA = 0.01           # significance level of the one-sided test
CASESET_VERSION = 1
CASES = (  # fixed forever for CASESET_VERSION 1: change the version to change them
    Case(b=1, d=1, n=1, l=1, seed=11),
    Case(b=2, d=6, n=4, l=37, g=2, dtype="f32", regime="mamba", initial_state=True, seed=12),
    Case(b=1, d=5, n=3, l=70, g=0, dtype="f32", regime="stress", D=False, seed=13),
    Case(b=2, d=4, n=5, l=41, g=4, dtype="bf16", regime="official", softplus=False, initial_state=True, seed=14),
    Case(b=1, d=3, n=2, l=65, g=1, dtype="f16", regime="slow", z=False, seed=15),
    Case(b=2, d=6, n=3, l=29, g=3, dtype="f64", regime="stress", initial_state=True, seed=16),
)


def golden():
    """Float64 loop outputs of CASES, as JSON-ready lists."""
    out = []
    for case in CASES:
        y, state = impls.selective_scan(**reference_inputs(case), return_last_state=True, impl="loop")
        out.append(dict(case=dataclasses.asdict(case), y=y.tolist(), last_state=state.tolist()))
    return out


def gated(record):
    """Whether a record's paired ratio is one the speed check judges (see the module docstring)."""
    if record.get("benchmark") == "scan_grid":
        return True
    # a step against a step only: re-forward / recurrent (cumulative) and prefill (one scan against
    # mamba.py's token-by-token loop) do unlike work on their two sides
    return (record.get("benchmark") == "time_per_token" and record.get("ratio_to") == "mambapy"
            and record.get("kind") == "per_token" and record.get("mode") == "recurrent")


def paired_points(data):
    """{point key: dict(ratio, ratio_q1, ratio_q3, pairs, runs, ratio_to, unstable, benchmark, impl)} for
    every gated record with a paired ratio; a key recorded in several runs (sources) pools their
    rounds, and ``runs`` holds each run's median."""
    if data is None or data.empty or "ratio_pairs" not in data:
        return {}
    out = {}
    rows = data[data["ratio_pairs"].apply(lambda v: isinstance(v, list) and len(v) > 0)]
    rows = rows[[gated(r) for _, r in rows.iterrows()]]
    for key, g in rows.groupby("key", sort=False):
        pairs = [float(x) for v in g["ratio_pairs"] for x in v]
        q1, med, q3 = np.percentile(pairs, [25, 50, 75])
        first = g.iloc[0]
        runs = ([float(np.median([x for v in part["ratio_pairs"] for x in v])) for _, part in g.groupby("source")]
                if "source" in g else [float(med)])
        out[key] = dict(ratio=float(med), ratio_q1=float(q1), ratio_q3=float(q3), pairs=pairs, runs=runs,
                        ratio_to=first.get("ratio_to"), benchmark=first.get("benchmark"), impl=first.get("impl"),
                        unstable=bool(g["unstable"].fillna(False).astype(bool).any()) if "unstable" in g else False)
    return out


def numeric_rows(baseline, names):
    rows = []
    cases = [(Case(**g["case"]), torch.tensor(g["y"], dtype=torch.float64), torch.tensor(g["last_state"], dtype=torch.float64))
             for g in baseline["golden"]]
    for case, y_gold, s_gold in cases:  # the spec itself, float64, against its stored results
        y, s = impls.selective_scan(**reference_inputs(case), return_last_state=True, impl="loop")
        for what, got, gold in (("y", y, y_gold), ("last_state", s, s_gold)):
            c = compare(got, gold, None, terms(what, case.l, case.n))
            rows.append(dict(impl="loop (float64 spec)", case=case.id, output=what, error=c.error, bound=c.bound, ok=c.ok))
    for name in names:
        for case, y_gold, s_gold in cases:
            case = case.within(impls.get(name).supports["case_limits"])
            if (case.l, case.d, case.b, case.n) != (y_gold.shape[2], y_gold.shape[1], y_gold.shape[0], s_gold.shape[2]):
                continue  # folded to a smaller size: no golden result for it
            if not supported(impls.get(name), case):
                continue  # a declared gap
            x = make_inputs(case)
            scale = dict(zip(("y", "last_state"), scales(case)))   # the floor's scale, as in the tests
            try:
                y, s = impls.selective_scan(**x, return_last_state=True, impl=name)
            except Exception as e:  # noqa: BLE001 (a kernel that raises fails the check; it is not a crash)
                rows.append(dict(impl=name, case=case.id, output=f"raised {type(e).__name__}: {e}",
                                 error=float("nan"), bound=float("nan"), ok=False))
                continue
            y_loop, s_loop = impls.selective_scan(**x, return_last_state=True, impl="loop")
            for what, got, gold, loop in (("y", y, y_gold, y_loop), ("last_state", s, s_gold, s_loop)):
                c = compare(got, gold, loop, terms(what, case.l, case.n), scale=scale[what])
                rows.append(dict(impl=name, case=case.id, output=what, error=c.error, bound=c.bound, ok=c.ok))
    return pd.DataFrame(rows)


def verdict(change, tolerance, p_up, p_down, unstable, alpha=ALPHA):
    """The gate's rule for one point (see the module docstring): REGRESSION, faster, ok or unstable.
    change: now / before - 1 of the median ratios; p_up, p_down: one-sided Mann-Whitney p-values of
    "now is slower" and "now is faster"."""
    if unstable:
        return "unstable"
    if change > tolerance and p_up < alpha:
        return "REGRESSION"
    if change < -tolerance and p_down < alpha:
        return "faster"
    return "ok"


def speed_rows(baseline, data, threshold, alpha=ALPHA):
    """One row per point with a paired ratio in both the baseline and data: point, what it is a ratio
    of, baseline and now (median ratios), change (now / baseline - 1), tolerance (the threshold, or
    the baseline's run-to-run spread of the point if wider), p (one-sided Mann-Whitney U, now
    greater), status: REGRESSION, faster, ok or unstable. Points of the baseline missing from
    data are left out (a sweep of some implementations only)."""
    now, base = paired_points(data), baseline.get("speed", {})
    rows = []
    for key, b in base.items():
        if key not in now:
            continue
        n = now[key]
        change = n["ratio"] / b["ratio"] - 1
        runs = b.get("runs") or [b["ratio"]]
        tolerance = max(threshold, max(runs) / min(runs) - 1)
        logs_now, logs_base = np.log(n["pairs"]), np.log(b["pairs"])
        p_up = float(mannwhitneyu(logs_now, logs_base, alternative="greater").pvalue)
        p_down = float(mannwhitneyu(logs_now, logs_base, alternative="less").pvalue)
        status = verdict(change, tolerance, p_up, p_down, n["unstable"] or b.get("unstable"), alpha)
        rows.append(dict(point=key, of=f"{n['impl']} / {n['ratio_to']}", baseline=b["ratio"], now=n["ratio"],
                         now_q1=n["ratio_q1"], now_q3=n["ratio_q3"], change=change, tolerance=tolerance, p=p_up,
                         status=status))
    return pd.DataFrame(rows, columns=["point", "of", "baseline", "now", "now_q1", "now_q3", "change", "tolerance", "p",
                                       "status"])


def fingerprints(data):
    """The distinct machine fingerprints of results (a list of dicts)."""
    if data is None or "machine" not in data:
        return []
    found = {json.dumps(fingerprint(m), sort_keys=True) for m in data["machine"] if isinstance(m, dict)}
    return [json.loads(f) for f in sorted(found)]


def comparable(baseline, data):
    """Whether the speed of data can be judged against the baseline: measured on a machine of the
    baseline's fingerprint (an old baseline without one is comparable with nothing)."""
    found = fingerprints(data)
    return "fingerprint" in baseline and found == [baseline["fingerprint"]]


def make_baseline(data):
    """The golden results and every paired ratio of data (with its per-round ratios), with the
    fingerprint of the machine that measured them. ValueError if data come from several machines."""
    speed = {k: {f: v[f] for f in ("ratio", "ratio_q1", "ratio_q3", "pairs", "runs", "ratio_to", "unstable")}
             for k, v in paired_points(data).items()}
    runs = sorted(data["source"].unique()) if data is not None and not data.empty and "source" in data else []
    loads = data["load_avg"].dropna() if data is not None and "load_avg" in data else pd.Series(dtype=float)
    found = fingerprints(data)
    if len(found) != 1:
        raise ValueError(f"a speed baseline is one machine's: these results have {len(found)} machine fingerprints")
    machine = next(m for m in data["machine"] if isinstance(m, dict))
    return dict(version=BASELINE_VERSION, caseset_version=CASESET_VERSION,
                created=datetime.datetime.now().isoformat(timespec="seconds"), machine=machine, fingerprint=found[0],
                from_runs=runs, load_avg=[float(loads.min()), float(loads.max())] if len(loads) else None,
                golden=golden(), speed=speed)


def read_baseline(path):
    """The baseline at path; ValueError (a usage error) if it is unreadable, of another case set or
    written by an older format."""
    try:
        with open(path) as f:
            baseline = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a baseline (not JSON: {e.msg})") from None
    if not isinstance(baseline, dict) or "golden" not in baseline:
        raise ValueError(f"{path}: not a baseline (no golden results)")
    if baseline.get("version") != BASELINE_VERSION:
        raise ValueError(f"{path}: baseline format {baseline.get('version')}, this code reads {BASELINE_VERSION} "
                         "(paired ratios); write a new one with --update-baseline")
    if baseline.get("caseset_version") != CASESET_VERSION:
        raise ValueError(f"{path}: case set version {baseline.get('caseset_version')}, this code has {CASESET_VERSION}; "
                         "write a new baseline deliberately with --update-baseline")
    return baseline


def write_baseline(path, baseline):
    with open(path, "w") as f:
        json.dump(baseline, f, indent=1)
