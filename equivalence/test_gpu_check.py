"""scripts/gpu_check.sh on a machine without a GPU: its arguments, a clean and explained exit when
there is no CUDA device (nothing written), its pure parts, and one smoke run of every phase."""

import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
if not os.path.exists(SCRIPT):  # an installed suite (pip install, --pyargs) has no scripts/
    pytest.skip("scripts/gpu_check.sh is part of a checkout, not of the installed package", allow_module_level=True)

_spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "scripts", "gpu_check.py"))
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)
import gpu_families  # noqa: E402  (beside gpu_check.py, which put its folder on sys.path)

SELECTIVE, SSD, MAMBA3 = (gpu_families.FAMILIES[name] for name in ("selective", "ssd", "mamba3"))


def run(*args, timeout=120, cwd=None):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


@pytest.mark.parametrize("args", [(), ("a", "b", "c"), ("--budget",), ("--budget", "-5", "out"), ("--budget", "0", "out")],
                         ids=["no-argument", "three-arguments", "budget-without-value", "negative-budget", "zero-budget"])
def test_usage_error(args):
    r = run(*args)
    assert r.returncode == gpu_check.EXIT_USAGE and "usage:" in r.stderr and "OUTPUT_DIR" in r.stderr


@pytest.mark.parametrize("where", ["/proc/no_such_folder", "a_file"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_anything_runs(where, tmp_path):
    (tmp_path / "a_file").write_text("")
    r = run("--smoke", "--budget", "1", where, cwd=tmp_path, timeout=60)
    assert r.returncode == gpu_check.EXIT_USAGE and "cannot write into" in r.stderr, r.stdout + r.stderr
    assert "suite" not in r.stdout


def test_help():
    r = run("--help")
    assert r.returncode == 0 and "usage:" in r.stdout


def test_unknown_option_is_a_usage_error(tmp_path):
    r = run("--fast", str(tmp_path / "out"))
    assert r.returncode == gpu_check.EXIT_USAGE and "usage:" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_cuda_exits_with_an_explanation_and_writes_nothing(tmp_path):
    r = run(str(tmp_path / "new"))
    assert r.returncode == gpu_check.EXIT_NO_CUDA, r.stderr
    assert "no CUDA device" in r.stderr and "nothing was written" in r.stderr and "--smoke" in r.stderr
    assert list(tmp_path.iterdir()) == []          # not even the output folder


def test_memory_floor_bytes_at_the_target_size():
    """About 1.6 GB for the forward at b=8, d=1536, n=16, l=8192 in float32 (the field notes' figure)."""
    b, d, n, l = 8, 1536, 16, 8192
    assert gpu_families.forward_bytes(b, d, n, l) == 4 * (4 * b * d * l + 2 * b * n * l) + 4 * (d * n + 2 * d)
    assert 1.6e9 < gpu_families.forward_bytes(b, d, n, l) < 1.7e9
    assert gpu_families.forward_bytes(b, d, n, l, itemsize=2) < gpu_families.forward_bytes(b, d, n, l)
    assert gpu_families.backward_bytes(b, d, n, l) > gpu_families.forward_bytes(b, d, n, l)


def test_ssd_memory_floor_and_flops_at_mamba2_shapes():
    """The SSD floor counts x, z, out (b·l·h·p each) and B, C (b·l·g·n each) plus dt; the FLOP count
    is the chunked algorithm's products, dominated by the state terms 4 p n per token and head."""
    b, l, h, p, n = 1, 8192, 80, 64, 128
    fwd = gpu_families.ssd_forward_bytes(b, l, h, p, n, itemsize=2)
    assert fwd == 2 * (3 * b * l * h * p + 2 * b * l * n + b * l * h) + 12 * h
    assert 250e6 < fwd < 260e6                                   # about a quarter GB in bfloat16
    assert gpu_families.ssd_backward_bytes(b, l, h, p, n, itemsize=2) > fwd
    assert gpu_families.ssd_forward_bytes(b, l, h, p, n, has_z=False) < gpu_families.ssd_forward_bytes(b, l, h, p, n)
    flops = gpu_families.ssd_flops(b, l, h, p, n, 256)
    assert flops == 2 * b * l * h * (2 * p * n + 256 * (n + p) / 2)
    assert gpu_families.ssd_flops(b, 100, h, p, n, 256) == 2 * b * 100 * h * (2 * p * n + 100 * (n + p) / 2)  # Q = l
    assert gpu_families.ssd_step_bytes(64, 24, 64, 128) > 2 * 4 * 64 * 24 * 64 * 128


def test_mamba3_memory_floor_by_hand_at_the_official_shape():
    """Each tensor's bytes counted by hand at b=16, l=2048, h=32, h_qk=1, p=64, n=128, n_ang=32, in
    bfloat16 but ADT, DT, D and the step's states (float32)."""
    fwd = (2 * 8_388_608          # Q, K: 16·2048·1·128 x 2 bytes each
           + 3 * 134_217_728      # V, Z read, out written: 16·2048·32·64 x 2
           + 67_108_864           # Angles: 16·2048·32·32 x 2
           + 2_097_152            # Trap: 16·32·2048 x 2
           + 2 * 4_194_304        # ADT, DT: 16·32·2048 x 4
           + 2 * 8_192            # Q_bias, K_bias: 32·128 x 2
           + 128)                 # D: 32 x 4
    assert fwd == 497_041_536
    args = (16, 2048, 32, 64, 128, 32)
    assert gpu_families.mamba3_forward_bytes(*args) == fwd
    assert gpu_families.mamba3_forward_bytes(*args, has_z=False) == fwd - 134_217_728
    # the backward: the forward's inputs read again and their gradients written, d out read
    assert gpu_families.mamba3_backward_bytes(*args) == 2 * (fwd - 134_217_728) + 134_217_728
    step = (2 * (524_288          # the states, read and written: angle 128·32·32 x 4,
                 + 134_217_728    # ssm 128·32·64·128 x 4,
                 + 2_097_152      # k 128·32·128 x 4,
                 + 1_048_576)     # v 128·32·64 x 4
            + 2 * 32_768          # q, k: 128·128 x 2
            + 3 * 524_288         # v, z, out: 128·32·64 x 2
            + 8_192               # trap: 128·32 x 2
            + 262_144             # angles: 128·32·32 x 2
            + 2 * 16_384          # adt, dt: 128·32 x 4
            + 2 * 8_192 + 128)    # Q_bias, K_bias, D
    assert gpu_families.mamba3_step_bytes(128, 32, 64, 128, 32) == step == 277_733_504


@pytest.mark.parametrize("name", list(gpu_families.FAMILIES))
def test_every_target_row_is_a_benchmarked_row(name):
    """A target read from a row the bench never measures would always say "not measured"."""
    family = gpu_families.FAMILIES[name]
    rows = [dict(case, op="forward") for case in family["bench_cases"](False)]
    assert any(all(row.get(k) == v for k, v in family["target_row"].items()) for row in rows), family["target_row"]


def test_big_phase_catches_a_far_row_of_a_returned_state(monkeypatch):
    """The big phase on stand-in Mamba-3 kernels (the torch chunked scan and step) that corrupt, in
    the big call only, out at the last head's last token and the last row of the ssm state the
    step returns, where a wrapped offset lands: exactly those two checks fail. A phase that read the
    step's input states (an in-place step's) instead of the returned ones would miss the second."""
    from impls.mamba3 import chunked, recurrent

    def scan(**kw):
        out, *states = chunked.mamba3_scan(**kw)
        if kw["V"].shape[2] > 2:                   # more heads than the compact window's two
            out = out.clone()
            out[:, -1, -1] += 1
        return (out, *states)

    def step(**kw):
        out, (angle, ssm, k, v) = recurrent.mamba3_state_update(**kw)
        if kw["V"].shape[0] > 1:                   # the full batch, not the last row alone
            ssm = ssm.clone()
            ssm[-1, -1, -1, -1] += 1
        return out, (angle, ssm, k, v)

    planted = types.ModuleType("planted_mamba3_kernels")
    planted.mamba3_scan, planted.mamba3_state_update = scan, step
    monkeypatch.setitem(sys.modules, planted.__name__, planted)
    result = gpu_check.phase_big(dict(MAMBA3, kernels=planted.__name__), smoke=True)
    failed = {name for name, check in result["checks"].items() if not check["ok"]}
    assert failed == {"mamba3 forward out", "mamba3 step ssm"}, result["checks"]
    assert len(result["checks"]) == 15 and not result["ok"]


def test_ssd_targets_and_table():
    row = dict(shape="mamba2-2.7b", b=1, l=8192, h=80, p=64, n=128, g=1, op="forward",
               ms={"triton": 0.5, "chunked": 20.0, "mamba_ssm": 0.4}, floor_ms=0.1, triton_gbs=500.0, triton_tflops=3.0)
    bench = dict(names=["triton", "chunked", "mamba_ssm"], rows=[row], step=[], step_names=[])
    t = gpu_check.targets(bench, SSD)
    assert t["ssd_forward_speedup_vs_chunked"]["value"] == pytest.approx(40) and t["ssd_forward_speedup_vs_chunked"]["met"]
    assert t["ssd_forward_over_official"]["value"] == pytest.approx(1.25) and t["ssd_forward_over_official"]["met"]
    t = gpu_check.targets(dict(bench, rows=[dict(row, ms={"triton": 0.5, "chunked": 5.0})]), SSD)
    assert not t["ssd_forward_speedup_vs_chunked"]["met"] and t["ssd_forward_over_official"]["value"] is None
    assert "mamba_ssm" in t["ssd_forward_over_official"]["note"]
    table = "\n".join(gpu_check.format_family(dict(ssd_bench=bench, ssd_targets=t,
                                                  ssd_big=dict(checks={"ssd step y": dict(ok=False, elements=2**31 + 1)})), SSD))
    for words in ("mamba2-2.7b l8192 forward", "500", "not met", "ssd step y", "FAIL"):
        assert words in table, (words, table)


def test_pytest_summary():
    text = "....F\n=== short test summary info ===\nFAILED x\n1 failed, 4 passed, 2 skipped in 3.21s\n"
    assert gpu_check.pytest_summary(text) == {"failed": 1, "passed": 4, "skipped": 2}
    assert gpu_check.pytest_summary("1 passed, 24 deselected in 9s") == {"passed": 1, "deselected": 24}
    assert gpu_check.pytest_summary("ImportError: boom") == {}


def _bench(tri, par, floor):
    row = dict(gpu_families.MAIN_SIZE, dtype="float32", op="forward", ms={"triton": tri, "parallel": par, "loop": 900.0},
               floor_ms=floor, bytes=1)
    return dict(names=["triton", "parallel", "loop"], rows=[row], step=[], copy_bandwidth_gbs=4300.0)


def test_targets_are_reported_not_enforced():
    t = gpu_check.targets(_bench(tri=0.5, par=20.0, floor=0.37), SELECTIVE)
    assert t["forward_speedup_vs_parallel"]["value"] == pytest.approx(40) and t["forward_speedup_vs_parallel"]["met"]
    assert t["forward_over_floor"]["value"] == pytest.approx(0.5 / 0.37) and t["forward_over_floor"]["met"]
    t = gpu_check.targets(_bench(tri=8.0, par=None, floor=0.37), SELECTIVE)
    assert t["forward_speedup_vs_parallel"]["value"] is None and "parallel" in t["forward_speedup_vs_parallel"]["note"]
    assert not t["forward_over_floor"]["met"]


def test_table_names_the_device_the_results_and_the_verdict():
    results = dict(device="NVIDIA H200", torch="2.11", triton="3.6", ok=False, duration_s=301,
                   suite=dict(files={"equivalence/test_values.py": dict(ok=True, counts={"passed": 1})}),
                   big=dict(checks={"forward y b3c1008": dict(ok=False, max_abs_diff=3.0, elements=2**31 + 2**18)}),
                   bench=_bench(tri=0.5, par=20.0, floor=0.37))
    results["targets"] = gpu_check.targets(results["bench"], SELECTIVE)
    table = gpu_check.format_table(results)
    for words in ("NVIDIA H200", "test_values.py", "FAIL", "b8 d1536 n16 l8192 float32 forward", "40.00x", "met", "FAILED"):
        assert words in table, (words, table)


def test_results_are_written_whole_or_not_at_all(tmp_path):
    path = tmp_path / "gpu_check.json"
    gpu_check.write_atomically(str(path), {"ok": True})
    assert json.loads(path.read_text()) == {"ok": True} and [p.name for p in tmp_path.iterdir()] == ["gpu_check.json"]
    circular = {}
    circular["self"] = circular
    with pytest.raises(ValueError):
        gpu_check.write_atomically(str(path), circular)
    assert json.loads(path.read_text()) == {"ok": True} and [p.name for p in tmp_path.iterdir()] == ["gpu_check.json"]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_on_a_gpu_the_big_phases_run_one_at_a_time_and_every_phase_within_the_budget(tmp_path, monkeypatch):
    """The GPU path's schedule, with the phases stood in for (nothing may need debugging on a lent
    GPU): the big phases never overlap (each needs most of its memory), and every phase, bench phases
    included, is given at most what is left of --budget."""
    clock, calls, running = [1000.0], [], set()

    def phase(name, smoke, timeout):
        assert not smoke and not (name.endswith("big") and any(r.endswith("big") for r in running)), running
        running.add(name)
        calls.append((name, clock[0], timeout))
        clock[0] += 30.0                                     # each phase takes 30 s of the budget
        running.discard(name)
        return dict(ok=True, rows=[], step=[], errors=[])
    monkeypatch.setattr(gpu_check, "_run_phase", phase)
    monkeypatch.setattr(gpu_check, "_run_suite", lambda smoke, timeout: dict(ok=True, files={}, timeout=timeout))
    monkeypatch.setattr(gpu_check.time, "time", lambda: clock[0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "stand-in GPU")
    monkeypatch.setattr(gpu_check, "format_table", lambda results: "")
    assert gpu_check.main([str(tmp_path), "--budget", "300"]) == gpu_check.EXIT_OK
    phases = [f["key"] + kind for f in gpu_families.FAMILIES.values() for kind in gpu_check.PHASE_KINDS]
    assert sorted(name for name, _, _ in calls) == sorted(phases)
    assert [name for name, _, _ in calls[:3]] == [n for n in phases if n.endswith("big")]
    assert all(started + timeout <= 1000.0 + 300 for _, started, timeout in calls), calls
    assert all(started + timeout <= 1000.0 + 150 for name, started, timeout in calls if name.endswith("big")), calls


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_run_ends_within_its_budget(tmp_path):
    """--budget: no phase is given more than what is left of it, one left too little is recorded as
    not run (a failed run, not a passed one), and the results are still written."""
    r = run("--smoke", "--budget", "6", str(tmp_path), timeout=120)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert not results["ok"] and results["duration_s"] < 6 + 10
    phases = [f["key"] + kind for f in gpu_families.FAMILIES.values() for kind in gpu_check.PHASE_KINDS]
    assert all(results[name]["error"].startswith("not run") for name in phases), {k: results[k] for k in phases}


@pytest.mark.long
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_smoke_run_of_every_phase(tmp_path):
    """--smoke: each phase at tiny sizes on the CPU (Triton's interpreter), the JSON and the table."""
    r = run("--smoke", "out", timeout=600, cwd=tmp_path)       # relative to the caller's directory
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert results["smoke"] and results["ok"]
    assert results["big"]["checks"] and all(c["ok"] for c in results["big"]["checks"].values())
    assert results["bench"]["rows"][0]["ms"]["triton"] > 0 and results["bench"]["fwd_configs"]
    assert results["ssd_big"]["ok"] and len(results["ssd_big"]["checks"]) == 6
    assert {r["op"] for r in results["ssd_bench"]["rows"]} == {"forward", "backward", "forward+backward"}
    assert all(r["ms"]["triton"] > 0 and r["ms"]["chunked"] > 0 for r in results["ssd_bench"]["rows"] if r["op"] == "forward")
    assert results["ssd_bench"]["step"][0]["ms"]["triton"] > 0
    # one pytest run, every family's option: a test of each family's kernels passed
    assert results["suite"]["files"]["smoke"]["ok"] and results["suite"]["files"]["smoke"]["counts"]["passed"] >= len(gpu_families.FAMILIES)
    assert results["mamba3_big"]["ok"] and len(results["mamba3_big"]["checks"]) == 15
    rows = results["mamba3_bench"]["rows"]
    assert {r["op"] for r in rows} == {"forward", "backward", "forward+backward"}
    assert all(r["ms"]["triton"] > 0 and r["ms"]["chunked"] > 0 for r in rows if r["op"] == "forward")
    assert all(results["mamba3_bench"]["step"][0]["ms"][nm] > 0 for nm in ("triton", "recurrent"))
    assert "Mamba-3 scan" in r.stdout
    assert "SMOKE" in r.stdout and "PASSED" in r.stdout
