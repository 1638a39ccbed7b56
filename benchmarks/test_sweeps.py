"""What the default sweeps measure: every implementation an installed package registers."""

from importlib import metadata

import impls
from benchmarks import accuracy, scan_grid
from equivalence.test_plugins import EXAMPLE, fake_entry_points


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
