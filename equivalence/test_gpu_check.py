"""scripts/gpu_check.sh on a machine without a GPU: its arguments, a clean and explained exit when
there is no CUDA device (nothing written), its pure parts, and one smoke run of every phase."""

import importlib.util
import json
import os
import subprocess
import sys

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

SELECTIVE, SSD = gpu_families.FAMILIES["selective"], gpu_families.FAMILIES["ssd"]


def run(*args, timeout=120, cwd=None):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


@pytest.mark.parametrize("args", [(), ("a", "b", "c")], ids=["no-argument", "three-arguments"])
def test_usage_error(args):
    r = run(*args)
    assert r.returncode == gpu_check.EXIT_USAGE and "usage:" in r.stderr and "OUTPUT_DIR" in r.stderr


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
    assert results["suite"]["files"]["smoke_ssd"]["ok"]
    assert "SMOKE" in r.stdout and "PASSED" in r.stdout
