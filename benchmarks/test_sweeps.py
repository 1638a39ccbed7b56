"""What the default sweeps measure: every implementation an installed package registers."""

from importlib import metadata

import impls
from benchmarks import accuracy, scan_grid
from equivalence.test_plugins import EXAMPLE, groups_read, fake_entry_points


def test_default_sweeps_measure_an_installed_plugin(monkeypatch):
    monkeypatch.syspath_prepend(EXAMPLE)
    monkeypatch.setattr(metadata, "entry_points", fake_entry_points("my_kernel:register"))
    if "my_kernel" not in impls.names():   # another test in this process may have loaded it
        assert impls.load_plugins() == {"my_kernel": None}
    grid = {p["impl"] for p in scan_grid.points("quick", None)}
    assert {"loop", "parallel", "mambapy", "floor", "my_kernel"} <= grid
    assert "my_kernel" in {p["impl"] for p in accuracy.points("quick", None)}
    # the floor is every group's denominator, so it comes with any choice
    assert {p["impl"] for p in scan_grid.points("quick", ["parallel"])} == {"parallel", "floor"}


def test_accuracy_sweep_catches_the_grouped_bug_of_the_example_plugin(monkeypatch):
    """my_kernel as shipped is right for ungrouped B/C and wrong for g > 1: the accuracy sweep (and
    so the report) must say it fails, not "within policy". Once a reader makes the fix docs/plugins.md describes,
    both variants must be within policy; which of the two holds is measured independently of the
    sweep (groups_read)."""
    monkeypatch.syspath_prepend(EXAMPLE)
    monkeypatch.setattr(metadata, "entry_points", fake_entry_points("my_kernel:register"))
    if "my_kernel" not in impls.names():
        assert impls.load_plugins() == {"my_kernel": None}
    pts = [p for p in accuracy.points("quick", ["my_kernel"]) if p.get("dtype") == "f32" and p["regime"] == "mamba"]
    by_variant = {p["variant"]: p for p in pts}
    assert by_variant["grouped+initial_state"]["g"] > 1 and by_variant["grouped+initial_state"]["initial_state"]
    assert accuracy.measure(by_variant["plain"])["within_policy"]
    fixed = groups_read(impls.get("my_kernel").scan) == [0, 0, 1, 1]   # the interface: c // (d // g)
    assert accuracy.measure(by_variant["grouped+initial_state"])["within_policy"] == fixed


def test_accuracy_sweep_names_declared_gaps():
    gaps = [p for p in accuracy.points("quick", ["mambapy"]) if p.get("kind") == "skipped"]
    assert len(gaps) == 1 and "grouped B/C" in gaps[0]["reason"]
    measured = [p for p in accuracy.points("quick", ["mambapy"])
                if p.get("variant") == "grouped+initial_state" and p.get("kind") != "skipped"]
    assert measured and all(p["g"] == 0 and p["initial_state"] for p in measured)   # still tests initial_state


def test_cumulative_generation_is_measured_for_every_family(monkeypatch):
    """Every family's small model has cumulative points in both modes, enough lengths for the fit of
    a + b L + c L^2, and each (level, L) group generates L tokens through that family's model in both
    modes (timed here by a stand-in that calls each once)."""
    from benchmarks import time_per_token as tpt
    from impls.models.mamba import MambaLM
    from impls.models.mamba2 import Mamba2LM
    from impls.models.mamba3 import Mamba3LM

    pts = [p for p in tpt.points("quick", None) if p["kind"] == "cumulative"]
    lengths = {}
    for p in pts:
        lengths.setdefault((p["level"], p["mode"]), set()).add(p["L"])
    assert set(lengths) == {(lv, m) for lv in ("model", "model2", "model3") for m in ("reforward", "recurrent")}
    assert all(len(Ls) >= 4 for Ls in lengths.values())
    assert {p["level"] for p in tpt.points("quick", ["parallel", "recurrent"]) if p["kind"] == "cumulative"} == {"model"}
    ran = {}

    def once(fns, **timing):
        ran.update({k: fn() for k, fn in fns.items()})
        return {k: dict(median_s=1.0, cpu_s=[1.0]) for k in fns}
    monkeypatch.setattr(tpt, "interleaved", once)
    for level, family in (("model", MambaLM), ("model2", Mamba2LM), ("model3", Mamba3LM)):
        assert type(tpt.small_model(level)) is family
        modes = [next(p for p in pts if p["level"] == level and p["mode"] == mode) for mode in ("reforward", "recurrent")]
        for p in modes:
            assert tpt.measure(dict(p, L=5))["per_token_mean_s"] == 1.0 / 5
        tokens = [ran.pop((p["mode"], p["impl"])) for p in modes]
        assert tokens[0].shape == (1, 6) and tokens[0].tolist() == tokens[1].tolist()   # greedy: the same tokens
