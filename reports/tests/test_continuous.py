"""scanbench continuous (the speed gate between two versions) and check's per-machine speed history."""

import os
import subprocess
import sys

import pytest

from benchmarks import continuous_worker
from equivalence.selective import planted_bugs
from reports import cli, continuous

import impls

from .test_reports import MACHINE, write_results

ROOT = continuous.repository(continuous.__file__.rsplit("/", 2)[0])
# tiny points of both families: a few milliseconds a call, so a whole comparison takes seconds
TINY = [dict(section="scan", family="selective", op="scan", impl="parallel", b=1, d=16, n=4, l=256),
        dict(section="scan", family="ssd", op="scan", impl="chunked", b=1, h=2, p=8, n=8, g=1, l=128, chunk_size=32)]


def _git_repo(path, commit=True):
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    if commit:
        (path / "README").write_text("no code here\n")
        subprocess.run(["git", "-C", str(path), "add", "README"], check=True)
        subprocess.run(["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one"],
                       check=True)


@pytest.mark.parametrize("case", ["not_a_repo", "bad_ref", "no_base", "impl_without_base_path", "impl_not_module_function",
                                  "base_path_not_a_dir", "base_path_without_impl", "bad_threshold", "bad_plant",
                                  "tree_without_impls"])
def test_continuous_usage_errors_exit_2_in_one_line(tmp_path, monkeypatch, capsys, case):
    repo = tmp_path / "repo"
    _git_repo(repo, commit=case == "tree_without_impls")
    monkeypatch.chdir(tmp_path if case == "not_a_repo" else repo)
    argv = dict(not_a_repo=["HEAD"], bad_ref=["no-such-ref"], no_base=[],
                impl_without_base_path=["--impl", "mine:scan"], impl_not_module_function=["--impl", "mine", "--base-path", "."],
                base_path_not_a_dir=["--impl", "mine:scan", "--base-path", "nowhere"],
                base_path_without_impl=["HEAD", "--base-path", "."], bad_threshold=["HEAD", "--threshold", "-1"],
                bad_plant=["HEAD"], tree_without_impls=["HEAD", "HEAD"])[case]
    if case == "bad_plant":
        monkeypatch.setenv("SCANBENCH_PLANT", "parallel=0.5")
    assert cli.main(["continuous", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("scanbench continuous: error:") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err


def test_a_plugged_in_kernel_is_gated_on_the_running_suite_outside_any_git_repository(tmp_path, monkeypatch):
    """A kernel's CI checks out BASE and HEAD side by side in a folder that is no git repository, and
    runs an installed suite: both versions of the kernel are measured on that suite's own tree."""
    for side in ("base", "head"):
        (tmp_path / side).mkdir()
    monkeypatch.chdir(tmp_path)
    seen = {}

    def compare(base_tree, head_tree, *args, **kw):
        seen.update(base=base_tree, head=head_tree, paths=args[5:7])
        raise continuous.UsageError("measured nothing")

    monkeypatch.setattr(continuous, "compare", compare)
    assert cli.main(["continuous", "--impl", "mine:scan", "--base-path", "base", "--head-path", "head", "--quick"]) == 2
    suite = os.path.dirname(os.path.dirname(os.path.abspath(impls.__file__)))
    assert seen["base"] == seen["head"] == suite, seen
    assert seen["paths"] == (str(tmp_path / "base"), str(tmp_path / "head")), seen


def test_each_side_imports_its_own_copy_of_a_kernel_already_loaded_by_its_entry_point(tmp_path, monkeypatch):
    """A kernel's CI installs the kernel (for its dependencies), so importing impls loads the installed
    copy through the entry point; each worker still measures its own side's copy."""
    for side in ("installed", "base"):
        (tmp_path / side / "gate_kernel_xyz").mkdir(parents=True)
        (tmp_path / side / "gate_kernel_xyz" / "__init__.py").write_text(f"SIDE = {side!r}\ndef scan(*args):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "installed"))
    import gate_kernel_xyz  # noqa: F401 (as the entry point would)
    monkeypatch.setattr(sys, "path", list(sys.path))   # load_plugin puts base first: undone after
    try:
        where = continuous_worker.load_plugin("gate_kernel_xyz:scan", str(tmp_path / "base"), "selective")
        assert where == os.path.realpath(tmp_path / "base" / "gate_kernel_xyz" / "__init__.py")
        assert impls.get("gate_kernel_xyz:scan").scan.__globals__["SIDE"] == "base"
    finally:
        impls.unregister("gate_kernel_xyz:scan")
        sys.modules.pop("gate_kernel_xyz", None)


def test_every_family_with_a_default_is_gated():
    gated = {(p["family"], p["op"], p["impl"]) for p in continuous.points(continuous_worker.defaults(), "quick")}
    assert {("selective", "scan", "parallel"), ("selective", "step", "recurrent"),
            ("ssd", "scan", "chunked"), ("ssd", "step", "recurrent")} <= gated


def test_a_planted_2x_slowdown_is_flagged_and_unchanged_code_passes():
    """Both sides are this tree, parallel slowed 2x on HEAD's side, chunked unchanged; only the paired
    ratio HEAD / BASE is asserted, with a wide margin."""
    rows, _ = continuous.compare(ROOT, ROOT, plant="parallel=2", chosen=TINY, rounds=9, block_s=0.01, progress=False)
    parallel, chunked = rows.iloc[0], rows.iloc[1]
    assert parallel["status"] == "REGRESSION" and 1.5 < parallel["ratio"] < 3, rows
    assert chunked["status"] in ("ok", "faster") and 0.7 < chunked["ratio"] < 1.4, rows


def test_check_speed_of_another_machine_is_not_comparable_and_never_decides(tmp_path, capsys):
    here, there = tmp_path / "here.jsonl", tmp_path / "there.jsonl"
    write_results(here, seed=1)
    baseline = tmp_path / "baseline.json"
    assert cli.main(["check", "--baseline", str(baseline), "--results", str(here), "--update-baseline"]) == 0
    for r in write_results(tmp_path / "slow.tmp", slow_point="parallel", seed=4):   # 2x slower parallel...
        r["machine"] = dict(MACHINE, cpu_model="another CPU")                       # ...on another machine
        continuous.append_jsonl(there, r)
    assert cli.main(["check", "--baseline", str(baseline), "--results", str(there), "--impl", "loop"]) == 0
    out = capsys.readouterr().out
    assert "speed: not comparable" in out and "another CPU" in out and "REGRESSION" not in out
    # nor does it pass the run: a numeric regression still fails it
    name = "continuous:lost_D_skip"
    if name not in impls.names():
        impls.register(name, planted_bugs.lost_D_skip)
    assert cli.main(["check", "--baseline", str(baseline), "--results", str(there), "--impl", name]) == 1
    out = capsys.readouterr().out
    assert "outside the tolerance policy" in out and "not comparable" in out


def test_a_baseline_is_one_machines(tmp_path, capsys):
    mixed = tmp_path / "mixed.jsonl"
    for i, r in enumerate(write_results(tmp_path / "r.tmp", seed=1)):
        r["machine"] = dict(MACHINE, cpu_model=f"cpu {i % 2}")
        continuous.append_jsonl(mixed, r)
    assert cli.main(["check", "--baseline", str(tmp_path / "b.json"), "--results", str(mixed), "--update-baseline"]) == 2
    assert "2 machine fingerprints" in capsys.readouterr().err


def test_the_committed_baseline_has_no_fingerprint_so_it_decides_no_speed():
    from reports.check import comparable, read_baseline
    import pandas as pd
    baseline = read_baseline(f"{ROOT}/reports/baselines/cpu-2core.json")
    data = pd.DataFrame([dict(machine=dict(baseline["machine"]))])   # even its own machine record
    assert not comparable(baseline, data)



def test_a_changed_default_is_gated_as_each_trees_public_call():
    """Where BASE's default differs from HEAD's, the point is each tree's public call with its own
    default (never left ungated): here BASE runs loop and HEAD parallel, and the loop's Python steps
    make BASE far slower, which the measured ratio shows."""
    head = {"selective": {"scan": "parallel", "step": "recurrent"}}
    base = {"selective": {"scan": "loop", "step": "recurrent"}}
    gated = continuous.points(head, "quick", base_defaults=base)
    scans = [p for p in gated if p["op"] == "scan"]
    assert scans and all(p["base_impl"] == "loop" and p["impl"] == "parallel" for p in scans)
    assert all("base_impl" not in p for p in gated if p["op"] == "step")
    assert "loop->parallel" in continuous.point_id(scans[0])
    point = dict(TINY[0], base_impl="loop")
    rows, _ = continuous.compare(ROOT, ROOT, chosen=[point], rounds=3, block_s=0.01, progress=False)
    assert rows.iloc[0]["ratio"] < 0.5, rows


def test_an_unwritable_out_is_refused_before_measuring(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["continuous", "HEAD", "--quick", "--out", str(blocker / "x.jsonl")]) == 2
    assert "--out" in capsys.readouterr().err
