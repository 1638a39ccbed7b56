"""benchmarks/model2_speed.py end to end at tiny settings: what each record holds (no time is asserted)."""

import pytest

pytest.importorskip("transformers")  # its peer


def test_speed_benchmark_runs(tmp_path):
    """benchmarks/model2_speed.py end to end at tiny settings (no time is asserted): records for both
    sides with a paired ratio, the slope fits and the decode split."""
    from benchmarks import model2_speed

    out = tmp_path / "r.jsonl"
    records = model2_speed.main(["--sizes", "small", "--L", "4", "--prefill-L", "8", "--rounds", "1", "--block-s", "0",
                                 "--out", str(out)])
    assert [r["what"] for r in records] == ["decode", "prefill"] and len(out.read_text().splitlines()) == 2
    assert all(r["ours_median_s"] > 0 and r["transformers_median_s"] > 0 and r["ratio"] > 0 for r in records)
    slopes = model2_speed.slope_records([4, 8], "recurrent", "chunked", min_run_s=0)
    assert {(r["level"], r["mode"]) for r in slopes if r["kind"] == "model2_slope"} == {
        (lv, m) for lv in ("scan", "model") for m in ("reforward", "recurrent")}
    split = model2_speed.split_records("small", L=4, min_run_s=0)
    assert abs(sum(r["share"] for r in split) - 1) < 1e-9 and "ssd_step" in {r["part"] for r in split}
    # the Mamba-2 rows of time_per_token: every (level, L) group measures both modes
    pts = model2_speed.per_token_points("quick")
    assert {(p["level"], p["mode"]) for p in pts} == {(lv, m) for lv in model2_speed.LEVELS for m in ("reforward", "recurrent")}
    for level in model2_speed.LEVELS:
        point = dict(next(p for p in pts if p["level"] == level), L=4)
        ran = model2_speed.per_token_group(point, [("reforward", "chunked"), ("recurrent", "recurrent")],
                                           lambda calls, ref: {k: fn() for k, fn in calls.items()})
        assert set(ran) == {("reforward", "chunked"), ("recurrent", "recurrent")}
    kinds = [p["kind"] for p in model2_speed.points("default")]    # as a runner sweep
    assert kinds.count("model2_vs_transformers") == 6 and kinds.count("model2_decode_split") == 2
