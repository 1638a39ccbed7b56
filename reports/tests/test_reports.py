"""scanbench report / check / sweep on small result files written here, with known answers."""

import json

import pytest

import impls
from benchmarks import runner
from benchmarks.common import append_jsonl
from equivalence import planted_bugs
from reports import cli
from reports.load import load
from reports.report import scan_grid_table, slope_table

MACHINE = dict(host="testhost", cpus=2, threads=2, torch="2.13.0", commit="abc1234")


def _point(benchmark, **fields):
    params = {k: v for k, v in fields.items() if k not in ("median_s", "iqr_s")}
    return dict(benchmark=benchmark, key=runner.point_key(benchmark, params), machine=MACHINE, **fields)


def write_results(path, speed=1.0, slow_point=None):
    """Synthetic results with known laws: re-forward per-token time ∝ L, recurrent constant;
    a scan grid where parallel = 2x floor, loop = 5x, mambapy = 4x. ``speed`` scales every time
    (a slower machine); ``slow_point`` doubles one implementation's time (a kernel regression)."""
    records = [_point("calibration", op="floor", b=1, d=256, n=16, l=2048, median_s=0.01 * speed)]
    for L in (64, 128, 256, 512, 1024):
        for impl in ("loop", "parallel"):
            records.append(_point("time_per_token", kind="per_token", level="scan", impl=impl, mode="reforward", L=L,
                                  median_s=speed * 1e-5 * L * (1 if impl == "parallel" else 3)))
            records.append(_point("time_per_token", kind="per_token", level="scan", impl=impl, mode="recurrent", L=L,
                                  median_s=speed * 2e-5))
        records.append(_point("time_per_token", kind="cumulative", level="model", impl="parallel", mode="reforward", L=L,
                              median_s=speed * 1e-6 * L * L))
        records.append(_point("time_per_token", kind="cumulative", level="model", impl="recurrent", mode="recurrent", L=L,
                              median_s=speed * 1e-4 * L))
    for l in (512, 2048):
        for impl, factor in (("floor", 1), ("parallel", 2), ("loop", 5), ("mambapy", 4)):
            t = speed * factor * 1e-6 * l * (2 if impl == slow_point else 1)
            records.append(_point("scan_grid", impl=impl, b=1, d=64, n=16, l=l, dtype="float32", threads=2, median_s=t))
    records.append(_point("time_per_token", kind="per_token", level="model_small", impl="recurrent", mode="recurrent",
                          L=256, median_s=speed * 1e-3, ratio_to_mambapy=0.6, ratio_q1=0.55, ratio_q3=0.65))
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
        f.write(json.dumps(dict(benchmark="scan_grid", impl="parallel", error="RuntimeError: out of memory")) + "\n")
    out = tmp_path / "report"
    assert cli.main(["report", "--results", str(a), str(b), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    for png in ("time_per_token.png", "cumulative.png", "scan_grid.png"):
        assert (out / png).stat().st_size > 1000 and f"]({png})" in md
    assert f"b.jsonl:{good + 1}: not JSON" in md and f"b.jsonl:{good + 2}: not a JSON object" in md
    assert "scan_grid: RuntimeError: out of memory" in md
    assert "<table" in (out / "report.html").read_text()
    assert "Against mamba.py" in md and "Where a decoding step's time goes" in md and "scan_step" in md
    data, problems = load([str(a), str(b)])
    slopes = slope_table(data)
    assert len(slopes) == 8 and data["source"].nunique() == 2
    for _, row in slopes.iterrows():  # the laws the files were written with
        assert row["slope"] == pytest.approx(1.0 if row["mode"] == "reforward" else 0.0, abs=1e-9)
    grid = scan_grid_table(data)
    par = grid[grid["impl"] == "parallel"]
    assert par["vs_floor"].tolist() == pytest.approx([2.0] * 4) and par["vs_best_peer"].tolist() == pytest.approx([0.5] * 4)


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


def test_report_with_nothing_readable_says_so(tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text("not json\n")
    assert cli.main(["report", "--results", str(path), "--out", str(tmp_path / "r")]) == 1
    assert "nothing to report" in capsys.readouterr().err


@pytest.fixture
def baseline(tmp_path):
    results = tmp_path / "base.jsonl"
    write_results(results)
    path = tmp_path / "baseline.json"
    assert cli.main(["check", "--baseline", str(path), "--results", str(results), "--update-baseline"]) == 0
    return path


def test_check_passes_unchanged_and_on_a_uniformly_slower_machine(tmp_path, baseline, capsys):
    same, slower = tmp_path / "same.jsonl", tmp_path / "slower.jsonl"
    write_results(same)
    write_results(slower, speed=2.0)  # everything, the floor included, twice as slow: not a regression
    for results in (same, slower):
        assert cli.main(["check", "--baseline", str(baseline), "--results", str(results), "--impl", "loop", "--impl", "recurrent"]) == 0
    assert "0 regression(s)" in capsys.readouterr().out


def test_check_fails_on_a_planted_2x_slowdown(tmp_path, baseline, capsys):
    slow = tmp_path / "slow.jsonl"
    write_results(slow, slow_point="parallel")
    assert cli.main(["check", "--baseline", str(baseline), "--results", str(slow), "--impl", "loop"]) == 1
    out = capsys.readouterr().out
    assert "2 regression(s)" in out and "REGRESSION" in out and '"impl": "parallel"' in out


def test_check_fails_on_a_planted_numeric_change(baseline, capsys):
    name = "check:lost_D_skip"
    if name not in impls.names():
        impls.register(name, planted_bugs.lost_D_skip)
    assert cli.main(["check", "--baseline", str(baseline), "--impl", name]) == 1
    assert "outside the tolerance policy" in capsys.readouterr().out


def test_check_refuses_a_baseline_of_another_case_set(tmp_path, baseline, capsys):
    doc = json.loads(baseline.read_text())
    doc["caseset_version"] = 0
    baseline.write_text(json.dumps(doc))
    assert cli.main(["check", "--baseline", str(baseline)]) == 2
    assert "case set version" in capsys.readouterr().err


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
    argv = ["sweep", "--quick", "--sweep", "accuracy", "--impl", "loop", "--out", str(out)]
    assert cli.main(argv) == 130                                   # Ctrl-C: reported, not a traceback
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(kept) == 2                                          # the two finished points were kept
    monkeypatch.setattr(accuracy, "measure", real)
    assert cli.main(argv + ["--resume"]) == 0
    keys = [json.loads(line)["key"] for line in out.read_text().splitlines()]
    expected = len(accuracy.points("quick", ["loop"]))
    assert len(keys) == len(set(keys)) == expected
    with pytest.raises(SystemExit):                                 # no silent overwrite or append
        cli.main(argv)
