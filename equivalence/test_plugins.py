"""Implementations from installed packages: the entry point, its failure modes, and the xfails file."""

import os
import subprocess
import sys
from importlib import metadata

import pytest
from hypothesis import find
from hypothesis import strategies as st

import impls
from .cases import cases
from .test_planted_bugs import SEARCH, rejected

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "my_kernel")


def fake_entry_points(*values):
    eps = [metadata.EntryPoint(name=v.split(":")[0], value=v, group=impls.ENTRY_POINT_GROUP) for v in values]
    return lambda group=None, **kw: [e for e in eps if e.group == group]


def test_installed_package_registers_through_the_entry_point_and_its_bug_is_found(monkeypatch):
    monkeypatch.syspath_prepend(EXAMPLE)
    monkeypatch.setattr(metadata, "entry_points", fake_entry_points("my_kernel:register"))
    assert impls.load_plugins() == {"my_kernel": None}
    assert "my_kernel" in impls.names() and impls.get("my_kernel").module == "my_kernel"
    drawn = find(st.tuples(cases(), st.integers(0, 300)), lambda d: rejected("my_kernel", d), settings=SEARCH)
    assert drawn[0].g > 1 and drawn[0].d > drawn[0].g  # the bug is in the group mapping


def test_a_broken_plugin_warns_and_registers_nothing(monkeypatch):
    monkeypatch.setattr(metadata, "entry_points", fake_entry_points("no_such_module_xyz:register"))
    before = impls.names()
    with pytest.warns(UserWarning, match="no_such_module_xyz.*failed to load"):
        status = impls.load_plugins()
    assert "ModuleNotFoundError" in status["no_such_module_xyz"] and impls.names() == before


def test_xfails_file_marks_listed_tests(tmp_path):
    listed = tmp_path / "xfails.txt"
    listed.write_text("# a known gap\nequivalence/test_front_door.py::test_empty_sequence[loop]  # l = 0 demo\n")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rX", f"--xfails-file={listed}",
           "equivalence/test_front_door.py", "-k", "empty_sequence"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=os.path.join(EXAMPLE, os.pardir, os.pardir))
    assert "1 passed" in run.stdout and "1 xpassed" in run.stdout, run.stdout[-2000:]
    assert "l = 0 demo" in run.stdout


def test_header_names_module_version_and_wrapped_package():
    from .checks import describe

    assert f"impls.loop (selective-scan-suite {metadata.version('selective-scan-suite')})" in describe("loop")
    if "mambapy" in impls.names():
        assert f"wrapping mambapy {metadata.version('mambapy')}" in describe("mambapy")
        assert "'grouped': False" in describe("mambapy")
