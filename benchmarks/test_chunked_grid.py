"""The chunked families' benchmark (benchmarks/chunked_grid.py, as benchmarks/ssd_grid.py and
benchmarks/mamba3_grid.py bind it) end to end at tiny settings: every kind of point measures and
tabulates, and each sweep's plan is what the runner takes. No time is asserted."""

import pytest

from benchmarks import mamba3_grid, ssd_grid

COMMON = dict(chunk_size=8, dtype="float32", threads=1, rounds=2)
TINY = {mamba3_grid: dict(COMMON, b=1, h_qk=1, h=2, p=16, n=16, n_ang=4),
        ssd_grid: dict(COMMON, b=1, h=2, p=16, n=16, g=1)}
GRIDS = pytest.mark.parametrize("grid", list(TINY), ids=lambda g: g.BENCHMARK)


def forward_impls(grid):
    """The implementations the family's forward points measure (those registered, and the floor)."""
    return grid.points("long", None)[0]["impls"]


def test_mamba3_plan_measures_every_implementation_at_the_official_shape():
    default = mamba3_grid.points("default", None)
    assert {p["direction"] for p in default} == {"forward", "forward+backward"}
    forward = [p for p in default if p["direction"] == "forward"][0]
    assert set(forward["impls"]) == set(mamba3_grid.IMPLS)
    assert all((p["h_qk"], p["h"], p["n"], p["p"], p["chunk_size"]) == (1, 32, 128, 64, 64) for p in default)
    assert [p["l"] for p in mamba3_grid.points("long", None) if p["direction"] == "memory"] == list(mamba3_grid.MEMORY_LS)
    assert mamba3_grid.points("quick", ["loop"])[0]["impls"] == ["chunked", "loop"]


@GRIDS
@pytest.mark.parametrize("direction", ["forward", "forward+backward"])
def test_measure_and_table(grid, direction):
    chosen = forward_impls(grid) if direction == "forward" else ["chunked"]
    point = dict(TINY[grid], l=20, direction=direction, impls=chosen)
    results = grid.measure(point)["results"]
    assert set(chosen) <= set(results)
    chunked = results["chunked"]
    keys = ({"over_floor"} | ({"per_token_over_step"} if "step" in chosen else set())
            if direction == "forward" else {"forward_backward_over_forward"})
    assert all(chunked[k]["ratio"] > 0 for k in keys)
    assert len(grid.table(point, {"results": results})) == len(results) + 1


@GRIDS
def test_memory_points_in_fresh_processes(grid):
    records = []
    for l in (16, 48):
        point = dict(TINY[grid], l=l, direction="memory", impls=["chunked"], rounds=1)
        measured = grid.measure(point)
        r = measured["results"]["chunked"]
        assert r["peak_rss_bytes"] >= r["rss_before_bytes"] > 0 and r["inputs_bytes"] > 0
        assert grid.table(point, measured)[1].strip().startswith("chunked")
        records.append(dict(point, **measured))
    if grid is mamba3_grid:
        growth = grid.memory_growth(records)
        assert growth["ls"] == [16, 48] and set(growth) >= {"bytes_per_token", "at_MEMORY_L_bytes"}


@GRIDS
def test_the_sweep_runs_it_and_the_report_shows_it(grid):
    """`scanbench sweep` plans its points, and the report's grid table reads the records."""
    import pandas as pd

    from benchmarks import runner
    from reports.report import ssd_grid_table

    assert grid.BENCHMARK in runner.available_sweeps()
    assert {s for s, _, _ in runner.plan([grid.BENCHMARK], "quick", None)} == {grid.BENCHMARK}
    chosen = ["chunked", "floor"] + (["step"] if grid is mamba3_grid else [])
    point = dict(TINY[grid], l=12, direction="forward", impls=chosen)
    record = dict(benchmark=grid.BENCHMARK, **point, **grid.measure(point))
    rows = ssd_grid_table(pd.DataFrame([record]), grid.BENCHMARK)
    assert set(rows["impl"]) == set(chosen)
    assert rows.set_index("impl").loc["chunked", "ms"] > 0
    if grid is mamba3_grid:
        assert rows.set_index("impl").loc["chunked", "over_floor"] > 0


@GRIDS
def test_the_command_measures_one_point(grid, capsys):
    """python -m benchmarks.<grid> at a tiny l: one point, its table printed."""
    assert grid.main(["--l", "16", "--impl", "chunked", "--rounds", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("l=16 forward") and out[1].strip().startswith("chunked")
