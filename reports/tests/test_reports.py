"""scanbench report / check / sweep on small result files written here, with known answers."""

import json
import os

import numpy as np
import pytest

import impls
from benchmarks import runner
from benchmarks.common import append_jsonl, paired_ratio
from equivalence.selective import planted_bugs
from reports import cli
from reports.load import load
from reports.report import scan_grid_table, slope_label, slope_table, targets_table

MACHINE = dict(host="testhost", machine="x86_64", cpus=2, threads=1, torch="2.13.0", commit="abc1234")
ROUNDS = 15


def _point(benchmark, **fields):
    params = {k: v for k, v in fields.items() if k not in ("median_s", "iqr_s", "times_s") and not k.startswith("ratio")
              and k != "unstable"}
    return dict(benchmark=benchmark, key=runner.point_key(benchmark, params), machine=MACHINE, commit="abc1234",
                dirty=False, settings=dict(size="quick", env={}), shard=None, load_avg=0.5,
                finished="2026-11-29T10:00:00", **fields)


def _rounds(t, rng, noise):
    """ROUNDS per-round times around t: a shared load factor per round (what interleaving cancels)
    times a small independent jitter of each side."""
    return t * np.exp(rng.normal(0, noise, ROUNDS))


def write_results(path, speed=1.0, slow_point=None, seed=0, noise=0.03, load_noise=0.3):
    """Synthetic results with known laws: re-forward per-token time ∝ L, recurrent constant;
    a scan grid where parallel = 2x floor, loop = 5x, mambapy = 4x, each measured in rounds with a
    per-round load factor shared by both sides of a pair (``load_noise``) and independent jitter
    (``noise``). ``speed`` scales every time (a slower machine); ``slow_point`` doubles one
    implementation's time (a kernel regression)."""
    rng = np.random.default_rng(seed)
    records = []
    for L in (64, 128, 256, 512, 1024):
        for impl in ("loop", "parallel"):
            records.append(_point("time_per_token", kind="per_token", level="scan", impl=impl, mode="reforward", L=L,
                                  median_s=speed * 1e-5 * L * (1 if impl == "parallel" else 3), threads=1))
            records.append(_point("time_per_token", kind="per_token", level="scan", impl=impl, mode="recurrent", L=L,
                                  median_s=speed * 2e-5, threads=1))
    for L in (16, 32, 64, 128):
        records.append(_point("time_per_token", kind="cumulative", level="model", impl="parallel", mode="reforward", L=L,
                              median_s=speed * 1e-6 * L * L, threads=1))
        records.append(_point("time_per_token", kind="cumulative", level="model", impl="recurrent", mode="recurrent", L=L,
                              median_s=speed * 1e-4 * L, threads=1))
    for l in (512, 2048):
        load = np.exp(rng.normal(0, load_noise, ROUNDS))
        times = {impl: speed * factor * 1e-6 * l * (2 if impl == slow_point else 1) * load * _rounds(1, rng, noise)
                 for impl, factor in (("floor", 1), ("parallel", 2), ("loop", 5), ("mambapy", 4))}
        for impl, t in times.items():
            extra = {} if impl == "floor" else paired_ratio(t, times["floor"], to="floor")
            records.append(_point("scan_grid", impl=impl, b=1, d=64, n=16, l=l, dtype="float32", threads=1,
                                  direction="forward", median_s=float(np.median(t)), times_s=t.tolist(), **extra))
    records.append(_point("time_per_token", kind="per_token", level="model_small", impl="recurrent", mode="recurrent",
                          L=256, median_s=speed * 1e-3, threads=1,
                          **paired_ratio([0.6] * ROUNDS, [1.0] * ROUNDS, to="mambapy")))
    records.append(_point("scan_grid", kind="skipped", impl="triton", reason="interpreted (case_limits ...)"))
    records.append(_point("decode_split", level="model_small", impl="recurrent", median_s=speed * 1e-3, total_s=speed * 1e-3,
                          share_projections=0.4, share_scan_step=0.35, share_conv=0.1, share_norm=0.1, share_overhead=0.05))
    for r in records:
        append_jsonl(path, r)
    return records


def test_report_from_two_files_with_malformed_lines(tmp_path, capsys):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_results(a)
    good = len(write_results(b, speed=2.0))
    with open(b, "a") as f:
        f.write('{"benchmark": "time_per_token", "L": 4\n')     # cut off mid-line
        f.write("[1, 2]\n")                                       # JSON, not an object
        f.write(json.dumps(dict(_point("scan_grid", impl="parallel", l=1), error="RuntimeError: out of memory")) + "\n")
    out = tmp_path / "report"
    assert cli.main(["report", "--results", str(a), str(b), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    for png in ("cumulative.png", "scan_grid.png"):
        assert (out / png).stat().st_size > 1000 and f"]({png})" in md
    assert "](time_per_token_scan.png)" in md            # one figure per level, legible at the page's width
    assert f"b.jsonl:{good + 1}: not JSON" in md and f"b.jsonl:{good + 2}: not a JSON object" in md
    assert "scan_grid" in md and "RuntimeError: out of memory" in md
    assert "<table" in (out / "report.html").read_text()
    assert "Against mamba.py" in md and "Where a decoding step's time goes" in md and "scan_step" in md
    data, problems = load([str(a), str(b)])
    slopes = slope_table(data)
    fitted = slopes[slopes["fit"] == "fitted"]   # each file's one-point model_small series: a 'not fitted' row
    assert len(fitted) == 8 and (slopes["fit"] == "not fitted: 1 stable point").sum() == 2
    assert data["source"].nunique() == 2
    for _, row in fitted.iterrows():  # the laws the files were written with
        assert row["slope"] == pytest.approx(1.0 if row["mode"] == "reforward" else 0.0, abs=1e-9)
    grid = scan_grid_table(data)
    par = grid[grid["impl"] == "parallel"]
    # the paired ratios cancel the per-round load (30 %), leaving the 3 % jitter
    assert par["vs_floor"].tolist() == pytest.approx([2.0] * 4, rel=0.06)


def test_report_reads_pytest_benchmark_json(tmp_path):
    doc = dict(machine_info=dict(node="h"), commit_info=dict(id="deadbeef00"), benchmarks=[
        dict(name="test_scan[parallel]", group="scan-forward", params=dict(impl="parallel"),
             stats=dict(median=0.002, iqr=0.0001, rounds=20))])
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(doc))
    data, problems = load([str(path)])
    assert not problems and data.loc[0, "median_s"] == 0.002 and data.loc[0, "source"] == "bench @ deadbee @ h"
    assert cli.main(["report", "--results", str(path), "--out", str(tmp_path / "r")]) == 0
    assert "test_scan[parallel]" in (tmp_path / "r" / "report.md").read_text()


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]


def test_report_with_nothing_readable_is_a_usage_error(tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text("not json\n")
    assert cli.main(["report", "--results", str(path), "--out", str(tmp_path / "r")]) == 2
    _one_line_error(capsys, "no readable results")


@pytest.fixture
def baseline(tmp_path):
    results = tmp_path / "base.jsonl"
    write_results(results, seed=1)
    path = tmp_path / "baseline.json"
    assert cli.main(["check", "--baseline", str(path), "--results", str(results), "--update-baseline"]) == 0
    return path


def test_check_passes_unchanged_and_on_a_uniformly_slower_machine(tmp_path, baseline, capsys):
    same, slower = tmp_path / "same.jsonl", tmp_path / "slower.jsonl"
    write_results(same, seed=2)
    write_results(slower, speed=2.0, seed=3)  # everything, the floor included, twice as slow: not a regression
    for results in (same, slower):
        assert cli.main(["check", "--baseline", str(baseline), "--results", str(results), "--impl", "loop"]) == 0
    out = capsys.readouterr().out
    assert "0 regression(s)" in out and "7 paired ratios" in out


def test_check_fails_on_a_planted_2x_slowdown(tmp_path, baseline, capsys):
    slow = tmp_path / "slow.jsonl"
    write_results(slow, slow_point="parallel", seed=4)
    assert cli.main(["check", "--baseline", str(baseline), "--results", str(slow), "--impl", "loop"]) == 1
    out = capsys.readouterr().out
    assert "2 regression(s)" in out and "REGRESSION" in out and "parallel / floor" in out


def test_check_a_significant_change_below_the_threshold_and_an_unstable_point_pass(tmp_path, baseline, capsys):
    wide = [1.0, 2.0, 4.0, 8.0, 1.0, 2.0, 4.0, 8.0, 2.0]   # quartiles 2 and 4 around a median of 2: unstable
    for name, factor, pairs in (("small", 1.1, None), ("unstable", 2.0, wide)):
        path = tmp_path / f"{name}.jsonl"
        for r in write_results(tmp_path / f"{name}.tmp", seed=5):
            if r["benchmark"] == "scan_grid" and r["impl"] == "parallel":
                # small: 10 % slower in every round, significant but under the 20 % threshold
                r.update(paired_ratio([x * factor for x in (pairs or r["ratio_pairs"])], [1.0] * len(pairs or r["ratio_pairs"]),
                                      to="floor"))
            append_jsonl(path, r)
        assert cli.main(["check", "--baseline", str(baseline), "--results", str(path), "--impl", "loop"]) == 0
    out = capsys.readouterr().out
    assert "0 regression(s), 2 unstable" in out  # the two 2x points with a wide spread: reported, not counted


def test_check_fails_on_a_planted_numeric_change(baseline, capsys):
    name = "check:lost_D_skip"
    if name not in impls.names():
        impls.register(name, planted_bugs.lost_D_skip)
    assert cli.main(["check", "--baseline", str(baseline), "--impl", name]) == 1
    assert "outside the tolerance policy" in capsys.readouterr().out


def test_check_accepts_module_colon_function(baseline, capsys):
    assert cli.main(["check", "--baseline", str(baseline), "--impl", "impls.selective.loop:selective_scan"]) == 0
    assert "impls.selective.loop:selective_scan" in impls.names()


@pytest.mark.parametrize("case", ["missing", "empty", "unreadable", "unknown_impl", "covers_none", "old_baseline",
                                  "bad_module"])
def test_check_usage_errors_exit_2_in_one_line(tmp_path, baseline, capsys, case):
    results = tmp_path / "r.jsonl"
    write_results(results, seed=6)
    argv = ["check", "--baseline", str(baseline), "--results", str(results), "--impl", "loop"]
    if case == "missing":
        argv[4], words = str(tmp_path / "typo.jsonl"), ("no such file",)
    elif case == "empty":
        results.write_text("")
        words = ("empty",)
    elif case == "unreadable":
        results.write_text("garbage\n")
        words = ("no readable results",)
    elif case == "unknown_impl":
        argv[-1], words = "no_such_impl", ("no_such_impl", "not a registered implementation")
    elif case == "bad_module":
        argv[-1], words = "impls.selective.loop:no_such_function", ("has no function",)
    elif case == "covers_none":
        other = tmp_path / "other.jsonl"
        append_jsonl(other, _point("scan_grid", impl="parallel", l=3, median_s=1.0, **paired_ratio([1.0] * 5, [1.0] * 5)))
        argv[4], words = str(other), ("covers none",)
    else:
        doc = json.loads(baseline.read_text())
        doc["version"] = 1
        baseline.write_text(json.dumps(doc))
        words = ("baseline format",)
    assert cli.main(argv) == 2
    _one_line_error(capsys, "scanbench check: error:", *words)


def test_check_refuses_a_baseline_of_another_case_set(tmp_path, baseline, capsys):
    doc = json.loads(baseline.read_text())
    doc["caseset_version"] = 0
    baseline.write_text(json.dumps(doc))
    assert cli.main(["check", "--baseline", str(baseline)]) == 2
    _one_line_error(capsys, "case set version")


ACCURACY = ["sweep", "--quick", "--sweep", "accuracy", "--impl", "loop"]


def test_sweep_resumes_after_an_interruption_without_duplicates(tmp_path, monkeypatch):
    from benchmarks import accuracy

    out = tmp_path / "r.jsonl"
    real, calls = accuracy.measure, []

    def interrupted(point):
        calls.append(point)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(point)

    monkeypatch.setattr(accuracy, "measure", interrupted)
    argv = ACCURACY + ["--out", str(out)]
    assert cli.main(argv) == 130                                   # Ctrl-C: reported, not a traceback
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(kept) == 2                                          # the two finished points were kept
    monkeypatch.setattr(accuracy, "measure", real)
    assert cli.main(argv + ["--resume"]) == 0
    keys = [json.loads(line)["key"] for line in out.read_text().splitlines()]
    expected = len(accuracy.points("quick", ["loop"]))
    assert len(keys) == len(set(keys)) == expected
    assert cli.main(argv) == 2                                     # no silent overwrite or append


def test_resume_reuses_only_points_of_the_same_commit_tree_machine_and_settings(tmp_path, monkeypatch, capsys):
    from benchmarks import accuracy

    out = tmp_path / "r.jsonl"
    n = len(accuracy.points("quick", ["loop"]))
    state = dict(commit="aaaaaaa", dirty=False)
    monkeypatch.setattr(runner, "code_state", lambda: dict(state))
    monkeypatch.setattr(accuracy, "measure", lambda point: dict(y_error=0.0))   # what is measured does not matter here
    argv = ACCURACY + ["--out", str(out), "--resume"]
    assert cli.main(argv) == 0
    assert cli.main(argv) == 0                                    # same state: everything reused
    assert f"reused {n} point(s)" in capsys.readouterr().err and len(out.read_text().splitlines()) == n
    changed = [dict(commit="bbbbbbb", dirty=False), dict(commit="bbbbbbb", dirty="1234abcd")]
    for i, new in enumerate(changed):                             # a new commit, then uncommitted changes on it
        state.update(new)
        assert cli.main(argv) == 0
        err = capsys.readouterr().err
        assert "reused 0 point(s)" in err and f"{n * (i + 1)} recorded under another commit" in err
    monkeypatch.setenv("SCAN_GRID_THREADS", "2")                   # other settings
    assert cli.main(argv) == 0
    assert "reused 0 point(s)" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 4 * n
    data, problems = load([str(out)])                              # the report keeps the latest run only
    assert len(data) == n and sum("left out" in p for p in problems) == 3
    assert data["source"].str.contains("bbbbbbb\\+dirty").all()


def test_sweep_usage_errors_exit_2_in_one_line(tmp_path, capsys):
    for argv, words in ((ACCURACY + ["--out", str(tmp_path), "--resume"], ("is a directory",)),
                        (["sweep", "--quick", "--sweep", "accuracy", "--impl", "nope", "--out", str(tmp_path / "x")],
                         ("nope",)),
                        (ACCURACY + ["--shard", "3/2", "--out", str(tmp_path / "y")], ("--shard 3/2",))):
        assert cli.main(argv) == 2
        _one_line_error(capsys, "scanbench sweep: error:", *words)


def test_sweep_accepts_module_colon_function_and_usage_says_scanbench(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert cli.main(["sweep", "--quick", "--sweep", "accuracy", "--impl", "impls.selective.loop:selective_scan",
                     "--out", str(out)]) == 0
    impls_seen = {json.loads(line)["impl"] for line in out.read_text().splitlines()}
    assert impls_seen == {"impls.selective.loop:selective_scan"}
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["sweep", "--help"])
    assert capsys.readouterr().out.startswith("usage: scanbench sweep")


def test_shards_are_disjoint_keep_groups_whole_and_merge_in_the_report(tmp_path):
    from benchmarks import scan_grid

    full = runner.plan(["scan_grid", "accuracy"], "quick", ["parallel", "loop"])
    parts = [runner.plan(["scan_grid", "accuracy"], "quick", ["parallel", "loop"], shard=(i, 3)) for i in (1, 2, 3)]
    keys = [[runner.point_key(s, p) for s, _, p in part] for part in parts]
    assert sorted(sum(keys, [])) == sorted(runner.point_key(s, p) for s, _, p in full)   # disjoint, complete
    assert all(keys)
    for part in parts:   # a scan-grid group (one grid point, every implementation) is never split
        groups = {scan_grid.group(p) for s, _, p in part if s == "scan_grid"}
        assert all(sum(scan_grid.group(p) == g for s, _, p in full if s == "scan_grid") ==
                   sum(scan_grid.group(p) == g for s, _, p in part if s == "scan_grid") for g in groups)
    files = []
    for i in (1, 2):   # two shard files from two machines: one source in the report
        path = tmp_path / f"shard{i}.jsonl"
        for r in write_results(tmp_path / f"tmp{i}.jsonl", seed=i):
            if hash(r["key"]) % 2 == i - 1:   # shards are disjoint: each point in one of them
                append_jsonl(path, dict(r, shard=f"{i}/2", machine=dict(MACHINE, host=f"node{i}")))
        files.append(str(path))
    data, problems = load(files)
    assert data["source"].nunique() == 1 and data["source"].iloc[0] == "shards @ abc1234 (quick)" and not problems


def test_planted_slowdown_does_the_work_again():
    from benchmarks import planted

    calls = []

    def scan(u, *rest):
        calls.append(u.shape[-1])
        return u

    class T:
        shape = (1, 2, 100)

        def dim(self):
            return 3

        def __getitem__(self, index):
            out = T()
            out.shape = (1, 2, index[-1].stop)
            return out

    u = T()
    for factor, expected in ((2, [100, 100]), (1.3, [100, 30]), (3.5, [100, 100, 100, 50])):
        calls.clear()
        assert planted.slowed(scan, factor)(u, u, None, u, u) is u and calls == expected
    for bad in ("parallel", "parallel=0.5", "=2", "parallel=x"):
        with pytest.raises(ValueError):
            planted.parse(bad)


def test_paired_ratio_and_the_unstable_flag():
    r = paired_ratio([2.0, 2.2, 1.8, 2.0, 2.0], [1.0, 1.1, 0.9, 1.0, 1.0], to="floor")
    assert r["ratio"] == pytest.approx(2.0) and r["ratio_q1"] == r["ratio_q3"] == pytest.approx(2.0)
    assert not r["unstable"] and r["ratio_to"] == "floor"
    wide = paired_ratio([1.0, 3.0, 1.0, 3.0, 2.0], [1.0] * 5)
    assert wide["ratio"] == 2.0 and wide["unstable"]                # quartiles 1 and 3 around a median of 2
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])


def test_interleaved_pairs_share_the_load():
    """A load that changes from round to round (a 3x slower machine every other round) moves both
    sides of a pair, so every per-round ratio is the true 2x: no spread, not unstable."""
    from benchmarks import common

    clock = [0.0]
    state = dict(calls=0)

    def make(cost):
        def fn():
            # two warm-up calls, then two calls a round: rounds alternate between quiet and loaded
            clock[0] += cost * (3.0 if (state["calls"] // 2) % 2 else 1.0)
            state["calls"] += 1
        return fn

    real = common.time.perf_counter
    common.time.perf_counter = lambda: clock[0]
    try:
        timed = common.interleaved({"a": make(2.0), "b": make(1.0)}, rounds=8, block_s=1.0)
    finally:
        common.time.perf_counter = real
    r = paired_ratio(timed["a"]["times_s"], timed["b"]["times_s"])
    assert r["ratio_q1"] == r["ratio_q3"] == pytest.approx(2.0) and not r["unstable"]
    assert max(timed["b"]["times_s"]) == pytest.approx(3 * min(timed["b"]["times_s"]))   # the load was there
    assert len(timed["a"]["times_s"]) == 8 and timed["a"]["calls_per_block"] == 1


def test_report_sections_say_what_was_left_out_unstable_and_unresolved(tmp_path):
    path = tmp_path / "a.jsonl"
    records = write_results(path)
    noisy = [r for r in records if r.get("kind") == "per_token" and r["mode"] == "reforward" and r["impl"] == "loop"]
    append_jsonl(path, dict(noisy[0], L=2048, median_s=1.0, key=noisy[0]["key"] + "2048",
                            **paired_ratio([1.0, 5.0, 1.0, 5.0, 3.0], [1.0] * 5, to="recurrent/recurrent")))
    for L in (64, 256, 1024):   # the default step, flat
        append_jsonl(path, _point("time_per_token", kind="per_token", level="scan", impl="recurrent", mode="recurrent",
                                  L=L, median_s=1e-4 * (1 + 0.01 * (L == 256)), threads=1))
    data, _ = load([str(path)])
    slopes = slope_table(data).set_index(["impl", "mode"])
    assert slopes.loc[("loop", "reforward"), "unstable_left_out"] == 1                  # never fitted
    assert slopes.loc[("loop", "reforward"), "slope"] == pytest.approx(1.0, abs=1e-9)
    grid = scan_grid_table(data)
    assert grid[["elements_per_step", "l"]].drop_duplicates().values.tolist() == [[1024, 512], [1024, 2048]]
    assert (grid["ms"] > 0).all() and grid["threads"].eq(1).all()
    targets = targets_table(data, slope_table(data))["status"].tolist()
    # flat scan-level decoding (slope 0); no model-level, L = 8192 or 130m points; 0.6x mamba.py > 0.5
    assert targets == ["met", "not measured", "not measured (needs L = 8192: the default sweep)", "not measured",
                       "NOT met"]
    assert cli.main(["report", "--results", str(path), "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    scan = md[md.index("## Scan speed grid"):]
    assert "Left out of this section:" in scan and "triton: interpreted" in scan
    assert "threads_of_points" in md and "load_avg" in md


def test_slope_labels_carry_their_interval():
    assert slope_label(dict(slope=0.94, ci_low=0.9, ci_high=0.98)) == "slope 0.94 ± 0.04"
    assert slope_label(dict(slope=0.94, ci_low=-6.39, ci_high=8.27)) == "slope not resolved (±7.33)"
    assert slope_label(dict(slope=1.0, ci_low=float("nan"), ci_high=float("nan"))) == "slope not resolved"


def test_check_needs_significance_as_well_as_the_threshold():
    """30 % slower in each of 3 rounds: beyond the threshold, but 3 rounds against 3 cannot reach
    p < 0.01 in a Mann-Whitney test (its smallest p is 0.05), so it is not a regression; with 15
    rounds each, it is."""
    import pandas as pd

    from reports.check import speed_rows

    def frame(pairs):
        return pd.DataFrame([dict(key="k", benchmark="scan_grid", impl="parallel", ratio_to="floor", unstable=False,
                                  ratio_pairs=pairs)])
    for rounds, status in ((3, "ok"), (15, "REGRESSION")):
        base = [2.0 * (1 + 0.01 * i) for i in range(rounds)]
        baseline = dict(speed={"k": dict(ratio=float(np.median(base)), pairs=base, unstable=False)})
        rows = speed_rows(baseline, frame([1.3 * x for x in base]), threshold=0.2)
        assert rows["status"].tolist() == [status] and rows["change"].iloc[0] == pytest.approx(0.3)


def test_check_tolerance_widens_to_the_baselines_own_run_to_run_spread():
    """Two baseline runs of a point at 2.0 and 2.6 (30 % apart): a run at 2.85, 23 % over the pooled
    median (2.3) but within the spread the baseline measured itself, passes; 3.4 does not."""
    import pandas as pd

    from reports.check import paired_points, speed_rows

    def frame(runs):
        return pd.DataFrame([dict(key="k", benchmark="scan_grid", impl="parallel", ratio_to="floor", unstable=False,
                                  source=f"run{i}", ratio_pairs=[r * (1 + 0.001 * j) for j in range(15)])
                             for i, r in enumerate(runs)])
    baseline = dict(speed=paired_points(frame([2.0, 2.6])))
    assert baseline["speed"]["k"]["runs"] == pytest.approx([2.0, 2.6], rel=0.01)
    for now, status in ((2.85, "ok"), (3.4, "REGRESSION")):
        rows = speed_rows(baseline, frame([now]), threshold=0.2)
        assert rows["status"].tolist() == [status] and rows["tolerance"].iloc[0] == pytest.approx(0.3, rel=0.01)


def _raising_scan(*args, **kwargs):
    raise RuntimeError("boom")


def test_check_a_raising_kernel_is_a_numeric_failure_not_a_traceback(baseline, capsys):
    name = "check:raising"
    if name not in impls.names():
        impls.register(name, _raising_scan)
    assert cli.main(["check", "--baseline", str(baseline), "--impl", name]) == 1
    out = capsys.readouterr().out
    assert "outside the tolerance policy" in out and "RuntimeError: boom" in out


def test_check_an_ssd_name_is_a_usage_error(baseline, capsys):
    ssd = "chunked"   # an SSD (Mamba-2) name only
    assert ssd in impls.names(family="ssd") and ssd not in impls.names()
    assert cli.main(["check", "--baseline", str(baseline), "--impl", ssd]) == 2
    _one_line_error(capsys, "scanbench check: error:", ssd, "selective_scan")


def test_impl_module_in_the_current_directory_is_found_and_a_missing_one_named(tmp_path, baseline, monkeypatch, capsys):
    import sys

    (tmp_path / "cwd_plugin_3f9a.py").write_text(
        "from impls.selective.loop import selective_scan\n\ndef my_scan(*args, **kwargs):\n    return selective_scan(*args, **kwargs)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])  # as the console script
    assert cli.main(["check", "--baseline", str(baseline), "--impl", "cwd_plugin_3f9a:my_scan"]) == 0
    assert "cwd_plugin_3f9a:my_scan" in impls.names()
    capsys.readouterr()
    assert cli.main(["check", "--baseline", str(baseline), "--impl", "no_such_module_3f9a:my_scan"]) == 2
    _one_line_error(capsys, "cannot import module 'no_such_module_3f9a' (is it on PYTHONPATH?)")


def test_report_counts_a_file_given_twice_or_a_copied_shard_once(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    records = write_results(path, seed=3)
    data, problems = load([str(path), str(path)])
    assert len(data) == len(records) and any("duplicate point(s)" in p for p in problems)
    shard = tmp_path / "shard1.jsonl"
    for r in records:
        append_jsonl(shard, dict(r, shard="1/1"))
    copy = tmp_path / "shard1_copy.jsonl"
    copy.write_text(shard.read_text())
    assert cli.main(["report", "--results", str(shard), str(copy), "--out", str(tmp_path / "rep")]) == 0
    assert "duplicate point(s)" in capsys.readouterr().err
    assert (tmp_path / "rep" / "report.md").exists()


def test_resume_and_report_agree_on_one_run_and_missing_shards_are_named(tmp_path, monkeypatch, capsys):
    from benchmarks import accuracy

    out = tmp_path / "r.jsonl"
    n = len(accuracy.points("quick", ["loop"]))
    monkeypatch.setattr(runner, "code_state", lambda: dict(commit="aaaaaaa", dirty=False))
    monkeypatch.setattr(accuracy, "measure", lambda point: dict(y_error=0.0))
    assert cli.main(ACCURACY + ["--out", str(out), "--shard", "1/2"]) == 0
    half = len(out.read_text().splitlines())
    assert 0 < half < n
    data, problems = load([str(out)])
    assert len(data) == half and any("shard(s) 2/2 missing" in p for p in problems), problems
    capsys.readouterr()
    assert cli.main(ACCURACY + ["--out", str(out), "--resume"]) == 0      # the whole sweep, reusing shard 1/2
    assert f"reused {half} point(s)" in capsys.readouterr().err
    data, problems = load([str(out)])
    assert len(data) == n and data["source"].nunique() == 1 and not problems, problems


def test_an_all_error_sweep_exits_1_and_says_how_many_errored(tmp_path, monkeypatch, capsys):
    from benchmarks import accuracy

    def broken(point):
        raise RuntimeError("boom")

    monkeypatch.setattr(accuracy, "measure", broken)
    out = tmp_path / "r.jsonl"
    n = len(accuracy.points("quick", ["loop"]))
    assert cli.main(ACCURACY + ["--out", str(out)]) == 1
    assert f"{n} point(s) measured, {n} of them errors" in capsys.readouterr().out


def test_bad_output_paths_are_one_line_usage_errors_before_measuring(tmp_path, monkeypatch, capsys):
    from benchmarks import accuracy

    monkeypatch.setattr(accuracy, "measure", lambda point: pytest.fail("measured before checking --out"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert cli.main(ACCURACY + ["--out", "/proc/x.jsonl"]) == 2
    _one_line_error(capsys, "scanbench sweep: error:", "/proc/x.jsonl", "cannot write")
    assert cli.main(ACCURACY + ["--out", str(a_file / "r.jsonl")]) == 2
    _one_line_error(capsys, "scanbench sweep: error:", "cannot write")
    results = tmp_path / "r.jsonl"
    write_results(results, seed=2)
    for out, words in ((a_file, ("is a file",)), (a_file / "sub", ("cannot create",))):
        assert cli.main(["report", "--results", str(results), "--out", str(out)]) == 2
        _one_line_error(capsys, "scanbench report: error:", *words)


def test_resume_measures_again_when_a_plugged_in_kernels_source_changes(tmp_path, monkeypatch, capsys):
    import sys

    from benchmarks import accuracy

    plugin = tmp_path / "resume_plugin_7c1e.py"
    plugin.write_text("from impls.selective.loop import selective_scan as my_scan\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(runner, "code_state", lambda: dict(commit="aaaaaaa", dirty=False))   # the tree is unchanged
    monkeypatch.setattr(accuracy, "measure", lambda point: dict(y_error=0.0))
    out = tmp_path / "r.jsonl"
    argv = ["sweep", "--quick", "--sweep", "accuracy", "--impl", "resume_plugin_7c1e:my_scan", "--out", str(out), "--resume"]
    assert cli.main(argv) == 0 and cli.main(argv) == 0
    n = len(accuracy.points("quick", ["resume_plugin_7c1e:my_scan"]))
    assert f"reused {n} point(s)" in capsys.readouterr().err
    first = json.loads(out.read_text().splitlines()[0])["plugin_source"]
    plugin.write_text("from impls.selective.loop import selective_scan\n\ndef my_scan(*a, **k):\n    return 1.01 * selective_scan(*a, **k)\n")
    assert cli.main(argv) == 0
    assert "reused 0 point(s)" in capsys.readouterr().err
    last = json.loads(out.read_text().splitlines()[-1])["plugin_source"]
    assert first and last and first != last and len(out.read_text().splitlines()) == 2 * n


@pytest.mark.parametrize("extra, words", [(["--threshold", "-5"], ("--threshold -5",)),
                                          (["--threshold", "nan"], ("--threshold nan",)),
                                          (["--alpha", "2"], ("--alpha 2",)),
                                          (["--update-baseline"], ("--update-baseline needs --results",))])
def test_check_validates_threshold_alpha_and_update_baseline(tmp_path, baseline, capsys, extra, words):
    before = baseline.read_text()
    assert cli.main(["check", "--baseline", str(baseline), "--impl", "loop"] + extra) == 2
    _one_line_error(capsys, "scanbench check: error:", *words)
    assert baseline.read_text() == before


def test_resume_after_a_truncated_last_line_drops_it_with_a_warning(tmp_path, monkeypatch, capsys):
    from benchmarks import accuracy

    out = tmp_path / "r.jsonl"
    monkeypatch.setattr(runner, "code_state", lambda: dict(commit="aaaaaaa", dirty=False))
    monkeypatch.setattr(accuracy, "measure", lambda point: dict(y_error=0.0))
    n = len(accuracy.points("quick", ["loop"]))
    assert cli.main(ACCURACY + ["--out", str(out)]) == 0
    text = out.read_text()
    out.write_text(text[: len(text) - 20])        # killed while writing the last line
    capsys.readouterr()
    assert cli.main(ACCURACY + ["--out", str(out), "--resume"]) == 0
    assert "cut short" in capsys.readouterr().err
    records, problems = runner.read_jsonl(str(out))
    assert not problems and len(records) == n and len({r["key"] for r in records}) == n


def test_a_series_too_short_to_fit_is_labelled_and_has_a_table_row(tmp_path, monkeypatch):
    from reports import report

    path = tmp_path / "r.jsonl"
    for L in (64, 128, 256):
        append_jsonl(path, _point("time_per_token", kind="per_token", level="scan", impl="parallel", mode="reforward",
                                  L=L, median_s=1e-5 * L, threads=1))
    for L in (64, 128):   # two lengths only
        append_jsonl(path, _point("time_per_token", kind="per_token", level="scan", impl="recurrent", mode="recurrent",
                                  L=L, median_s=2e-5, threads=1))
    data, _ = load([str(path)])
    table = slope_table(data).set_index("impl")
    assert table.loc["recurrent", "fit"] == "not fitted: 2 stable points" and np.isnan(table.loc["recurrent", "slope"])
    assert table.loc["parallel", "fit"] == "fitted"
    labels = []
    monkeypatch.setattr(report, "_save", lambda fig, p: labels.extend(fig.axes[0].get_legend_handles_labels()[1]) or p)
    report.plot_time_per_token(data, str(tmp_path))
    assert any(lab.startswith("recurrent / recurrent") and lab.endswith("not fitted: 2 stable points") for lab in labels), labels
    assert any(lab.startswith("parallel / reforward: slope") for lab in labels), labels
    monkeypatch.undo()
    assert cli.main(["report", "--results", str(path), "--out", str(tmp_path / "rep")]) == 0
    assert "not fitted: 2 stable points" in (tmp_path / "rep" / "report.md").read_text()
