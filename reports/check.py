"""The kernel regression check: numbers against stored float64 golden results, speed against a baseline.

Numeric: every implementation runs a fixed, versioned set of cases; its outputs are compared with
float64 golden outputs stored in the baseline, under the suite's tolerance policy
(equivalence/tolerance.py; the loop in the same dtype, run now, is the policy's yardstick). The
float64 loop itself is compared with the golden results too, with the floor only, so a change to
the spec shows up as well.

Speed: every timed point of a results file becomes a ratio to a unit of work measured in the same
run (the floor at the same grid point for the scan grid, the calibration floor otherwise), so a
slower or busier machine is not a regression; a point regresses when its ratio grew by more than
the threshold over the baseline's.
"""

import dataclasses
import datetime
import json

import pandas as pd
import torch

import impls
from benchmarks.common import machine_info
from equivalence.cases import Case, make_inputs, reference_inputs
from equivalence.checks import scales, supported
from equivalence.tolerance import compare, terms

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


def _point_of(key):
    """A point's key without its implementation: what the floor and an implementation share."""
    sweep, _, params = key.partition(":")
    params = json.loads(params)
    params.pop("impl", None)
    return sweep + ":" + json.dumps(params, sort_keys=True)


def speed_ratios(data):
    """{point key: median / unit of work measured in the same run} for every timed point."""
    if data.empty or "median_s" not in data:
        return {}
    ratios = {}
    for source, rows in data.groupby("source"):
        calibration = rows.loc[rows["benchmark"] == "calibration", "median_s"].median()
        floors = {_point_of(r["key"]): r["median_s"] for _, r in rows.iterrows()
                  if r["benchmark"] == "scan_grid" and r.get("impl") == "floor"}
        for _, r in rows.iterrows():
            if r["benchmark"] == "calibration" or pd.isna(r.get("median_s")) or not isinstance(r.get("key"), str):
                continue
            unit = floors.get(_point_of(r["key"]), calibration)
            if pd.notna(unit) and unit > 0:
                ratios[r["key"]] = r["median_s"] / unit
    return ratios


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
            y, s = impls.selective_scan(**x, return_last_state=True, impl=name)
            y_loop, s_loop = impls.selective_scan(**x, return_last_state=True, impl="loop")
            for what, got, gold, loop in (("y", y, y_gold, y_loop), ("last_state", s, s_gold, s_loop)):
                c = compare(got, gold, loop, terms(what, case.l, case.n), scale=scale[what])
                rows.append(dict(impl=name, case=case.id, output=what, error=c.error, bound=c.bound, ok=c.ok))
    return pd.DataFrame(rows)


def speed_rows(baseline, data, threshold):
    now = speed_ratios(data)
    rows = []
    for key, base in baseline.get("speed", {}).items():
        if key not in now:
            rows.append(dict(point=key, baseline=base, now=None, change=None, status="not measured"))
            continue
        change = now[key] / base - 1
        status = "REGRESSION" if change > threshold else ("faster" if change < -threshold else "ok")
        rows.append(dict(point=key, baseline=base, now=now[key], change=change, status=status))
    return pd.DataFrame(rows, columns=["point", "baseline", "now", "change", "status"])


def make_baseline(data):
    return dict(version=1, caseset_version=CASESET_VERSION, created=datetime.datetime.now().isoformat(timespec="seconds"),
                machine=machine_info(), golden=golden(), speed=speed_ratios(data))


def read_baseline(path):
    with open(path) as f:
        baseline = json.load(f)
    if baseline.get("caseset_version") != CASESET_VERSION:
        raise ValueError(f"{path}: case set version {baseline.get('caseset_version')}, this code has {CASESET_VERSION}; "
                         "write a new baseline deliberately with --update-baseline")
    return baseline


def write_baseline(path, baseline):
    with open(path, "w") as f:
        json.dump(baseline, f, indent=1)
