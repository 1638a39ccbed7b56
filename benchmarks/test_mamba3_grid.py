"""The Mamba-3 benchmark (benchmarks/mamba3_grid.py) end to end at tiny settings: every kind of point
measures and tabulates, and the sweep's plan is what the runner takes. No time is asserted."""

import pytest

from benchmarks import mamba3_grid as grid

TINY = dict(b=1, h_qk=1, h=2, p=16, n=16, n_ang=4, chunk_size=8, dtype="float32", threads=1, rounds=2)


def test_plan_measures_every_implementation_at_the_official_shape():
    default = grid.points("default", None)
    assert {p["direction"] for p in default} == {"forward", "forward+backward"}
    forward = [p for p in default if p["direction"] == "forward"][0]
    assert set(forward["impls"]) == set(grid.IMPLS)
    assert all((p["h_qk"], p["h"], p["n"], p["p"], p["chunk_size"]) == (1, 32, 128, 64, 64) for p in default)
    assert [p["l"] for p in grid.points("long", None) if p["direction"] == "memory"] == list(grid.MEMORY_LS)
    assert grid.points("quick", ["loop"])[0]["impls"] == ["chunked", "loop"]


@pytest.mark.parametrize("direction", ["forward", "forward+backward"])
def test_measure_and_table(direction):
    impls = list(grid.IMPLS) if direction == "forward" else ["chunked"]
    point = dict(TINY, l=20, direction=direction, impls=impls)
    results = grid.measure(point)["results"]
    assert set(impls) <= set(results)
    chunked = results["chunked"]
    keys = ("over_floor", "per_token_over_step") if direction == "forward" else ("forward_backward_over_forward",)
    assert all(chunked[k]["ratio"] > 0 for k in keys)
    assert len(grid.table(point, {"results": results})) == len(results) + 1


def test_memory_points_in_fresh_processes_and_their_growth():
    records = []
    for l in (16, 48):
        point = dict(TINY, l=l, direction="memory", impls=["chunked"], rounds=1)
        measured = grid.measure(point)
        r = measured["results"]["chunked"]
        assert r["peak_rss_bytes"] >= r["rss_before_bytes"] > 0 and r["inputs_bytes"] > 0
        assert grid.table(point, measured)[1].strip().startswith("chunked")
        records.append(dict(point, **measured))
    growth = grid.memory_growth(records)
    assert growth["ls"] == [16, 48] and set(growth) >= {"bytes_per_token", "at_MEMORY_L_bytes"}


def test_the_sweep_runs_it_and_the_report_shows_it(tmp_path):
    """`scanbench sweep` plans its points, and the report's Mamba-3 table reads the records."""
    import pandas as pd

    from benchmarks import runner
    from reports.report import ssd_grid_table

    assert "mamba3_grid" in runner.available_sweeps()
    assert [s for s, _, _ in runner.plan(["mamba3_grid"], "quick", None)] == ["mamba3_grid"]
    point = dict(TINY, l=12, direction="forward", impls=["chunked", "step", "floor"])
    record = dict(benchmark="mamba3_grid", **point, **grid.measure(point))
    rows = ssd_grid_table(pd.DataFrame([record]), "mamba3_grid")
    assert set(rows["impl"]) == {"chunked", "step", "floor"}
    assert rows.set_index("impl").loc["chunked", "over_floor"] > 0
