"""What is specific to the Triton kernels (impls/selective/triton.py), beyond the shared property tests:
odd sizes over several channel blocks, the backward's B/C partial sums, 64-bit offsets, and the
pitfalls of Triton's interpreter, which runs these kernels in CI when there is no GPU."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import impls  # noqa: E402
from impls.triton_common import softplus  # noqa: E402
from impls.selective import triton as ts  # noqa: E402  (conftest has set TRITON_INTERPRET without CUDA)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .selective import Case, make_inputs, reference_inputs  # noqa: E402
from .selective import check_gradients, check_prefill_then_decode, check_split, check_values  # noqa: E402
from .tolerance import assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# collected only when triton is under test (conftest.py deselects it otherwise: no skip line per test)
pytestmark = pytest.mark.only_for("triton")


@pytest.fixture(params=[8, 32], ids=lambda b: f"block{b}")
def block_d(request, monkeypatch):
    """Channel blocks of this size in every kernel: d = 37 spans 5 blocks of 8 (the last with 5
    channels) or 2 of 32. The kernels are the same; only the launch changes."""
    config = ts.CONFIG
    for key in ("block_d", "bwd_block_d"):
        monkeypatch.setitem(config, key, request.param)
    return request.param


ODD = [
    Case(b=2, d=37, n=5, l=20, g=0, dtype="f32", regime="stress", initial_state=True, seed=11),
    Case(b=1, d=37, n=5, l=20, g=37, dtype="bf16", regime="mamba", strided=True, seed=12),
    Case(b=1, d=37, n=5, l=17, g=1, dtype="f16", regime="official", softplus=False, seed=13),
    Case(b=1, d=37, n=5, l=17, g=0, dtype="f64", regime="slow", initial_state=True, z=False, seed=14),
]


@pytest.mark.parametrize("case", ODD, ids=lambda c: c.id)
def test_odd_sizes_values_split_and_decode(block_d, case):
    """d = 37 and n = 5 (neither a power of two), l past one 16-token checkpoint chunk."""
    check_values("triton", case)
    check_split("triton", case, 9)
    check_prefill_then_decode("triton", case, case.l - 5)


@pytest.mark.parametrize("case", [c for c in ODD if c.dtype in ("f32", "f64")], ids=lambda c: c.id)
def test_odd_sizes_gradients(block_d, case):
    check_gradients("triton", case)


@pytest.mark.parametrize("case", [
    Case(b=2, d=16, n=3, l=20, g=2, regime="stress", initial_state=True, seed=21),   # blocks of 8 tile each group
    Case(b=2, d=12, n=3, l=20, g=3, regime="official", initial_state=True, seed=22),  # blocks straddle groups
    Case(b=1, d=24, n=4, l=18, g=0, regime="mamba", seed=23),                         # one group, three blocks
], ids=lambda c: c.id)
def test_backward_partial_sums_of_grouped_B_and_C(monkeypatch, case):
    """dB, dC are summed over the channels of a group: per block when blocks tile the groups,
    per channel when a block straddles two groups. Both paths against the float64 loop."""
    config = ts.CONFIG
    monkeypatch.setitem(config, "bwd_block_d", 8)
    monkeypatch.setitem(config, "block_d", 8)
    check_gradients("triton", case)


# ---- 64-bit offsets -----------------------------------------------------------------------------

@triton.jit
def _offsets_probe(out_ptr, i_b, s_b, s_d, d, n):
    o_d = tl.arange(0, 2) + 1
    o_n = tl.arange(0, 2)
    tl.store(out_ptr + tl.arange(0, 2), ts.row_offsets(i_b, o_d, s_b, s_d))
    tl.store(out_ptr + 2 + tl.arange(0, 4), tl.reshape(ts.state_offsets(i_b, o_d, o_n, d, n), [4]))


@triton.jit
def _int32_probe(out_ptr, i_b, s_b):
    tl.store(out_ptr, tl.cast(i_b * s_b, tl.int64))   # what the kernels must not do


def _run_probe(kernel, size, *args):
    out = torch.zeros(size, dtype=torch.int64, device=DEVICE)
    kernel[(1,)](out, *args)
    return out.cpu().tolist()


def test_offset_helpers_compute_in_64_bits():
    """The helpers every kernel builds its offsets with: past 2^31 they must not wrap."""
    i_b, s_b, s_d, d, n = 5, 2**30 + 3, 2**20 + 1, 2**17 + 1, 2**15 + 1   # every factor fits in int32
    got = _run_probe(_offsets_probe, 6, i_b, s_b, s_d, d, n)
    rows = [i_b * s_b + c * s_d for c in (1, 2)]
    states = [(i_b * d + c) * n + k for c in (1, 2) for k in (0, 1)]
    assert got == rows + states
    assert min(rows + states) > 2**31


@pytest.mark.skipif(not ts.INTERPRETED, reason="shows the interpreter's int32 arithmetic")
def test_int32_products_do_wrap_so_the_helper_test_has_teeth():
    assert _run_probe(_int32_probe, 1, 5, 2**30 + 3)[0] != 5 * (2**30 + 3)


_PAST_2_31 = """
import torch
from impls.selective import triton as ts
dev = "cuda" if torch.cuda.is_available() else "cpu"
b, d, l, n = 3, 2, 3, 2
S = 2**30 + 64          # batch stride of u: batch row 2 starts 2^31 + 128 elements in
try:
    buf = torch.empty(2 * S + d * l, dtype=torch.float16, device=dev)   # 4 GiB, untouched but 3 rows
except RuntimeError as e:
    print("SKIP", e); raise SystemExit(0)
gen = torch.Generator().manual_seed(0)
u_small = torch.randn(b, d, l, generator=gen).half().to(dev)
u = torch.as_strided(buf, (b, d, l), (S, l, 1))
u.copy_(u_small)
delta = (0.1 * torch.rand(b, d, l, generator=gen)).half().to(dev)
A = (-0.5 - torch.rand(d, n, generator=gen)).to(dev)
B, C = (torch.randn(b, n, l, generator=gen).half().to(dev) for _ in range(2))
gy = torch.randn(b, d, l, generator=gen).half().to(dev)
results = []
for x in (u, u_small):
    leaf = x.detach().requires_grad_()
    y, s = ts.selective_scan(leaf, delta, A, B, C, return_last_state=True)
    (du,) = torch.autograd.grad((y * gy).sum() + s.sum(), [leaf])
    state = torch.zeros(b, d, n, device=dev)
    ys = ts.selective_state_update(state, x[..., 2], delta[..., 2], A, B[..., 2], C[..., 2])
    results.append((y, s, du, ys, state))
assert all(torch.equal(p, q) for p, q in zip(*results)), "indexing past 2^31 elements differs"
print("OK")
"""


def test_kernels_index_past_2_31_elements():
    """Forward, backward and step read a u whose last batch row starts past 2^31 elements (a 4 GiB
    view, almost all of it never touched): the same results as the compact copy. A wrapped int32
    offset crashes or reads the wrong row, hence a separate process."""
    run = subprocess.run([sys.executable, "-c", _PAST_2_31], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if run.stdout.startswith("SKIP"):
        pytest.skip(f"cannot reserve 4 GiB of address space: {run.stdout}")
    assert run.returncode == 0 and "OK" in run.stdout, (
        f"exit {run.returncode} (a negative exit is a signal: a wrapped offset)\n{run.stdout}\n{run.stderr[-3000:]}")


# ---- the interpreter's pitfalls ------------------------------------------------------------------

@triton.jit
def _to_bfloat16(x_ptr, y_ptr):
    o = tl.arange(0, 256)
    tl.store(y_ptr + o, tl.load(x_ptr + o).to(tl.bfloat16))


@triton.jit
def _softplus_probe(x_ptr, y_ptr, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(y_ptr + o, softplus(tl.load(x_ptr + o)))


def test_interpreter_is_on_without_a_gpu():
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1" and ts.INTERPRETED
    else:
        assert not ts.INTERPRETED


def test_importing_impls_compiles_nothing():
    """triton is registered lazily: `import impls` imports neither the kernels nor triton itself."""
    code = ("import sys, torch; before = 'triton' in sys.modules; import impls; "
            "print('impls.selective.triton' in sys.modules, 'triton' in sys.modules and not before, 'triton' in impls.names())")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.stdout.split() == ["False", "False", "True"], run.stdout + run.stderr[-2000:]


_COMPILE = """
import os
os.environ["TRITON_INTERPRET"] = "0"            # compile for real, whatever this machine has
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import triton.language as tl
from impls.triton_common import compile_for_a_gpu as build
from impls.selective import triton as ts
assert not ts.INTERPRETED

flags = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True)
off = {k: False for k in flags}
half = {a: "*bf16" for a in ("u_ptr", "delta_ptr", "z_ptr", "B_ptr", "C_ptr", "y_ptr", "gy_ptr", "x_ptr", "dt_ptr")}
for dtype, ptr, f in ((tl.float32, {"*": "*fp32"}, flags), (tl.float32, {"*": "*fp32", **half}, off),
                      (tl.float64, {"*": "*fp64"}, flags)):
    build(ts.scan_fwd_kernel, ptr, dict(f, HAS_H0=True, SAVE_CKPT=True, CHUNK=ts.CHUNK, BLOCK_D=16, BLOCK_N=16,
                                         COMPUTE=dtype, NUM_STAGES=3), num_warps=1, num_stages=3)
    build(ts.scan_bwd_kernel, ptr, dict(f, HAS_GLAST=True, REDUCE_B=True, REDUCE_C=False, CHUNK=ts.CHUNK,
                                         BLOCK_D=16, BLOCK_N=8, COMPUTE=dtype), num_warps=1)
    build(ts.step_kernel, ptr, dict(f, BLOCK_D=16, BLOCK_N=16, COMPUTE=dtype), num_warps=1)
print("OK")
"""


def test_kernels_compile_for_a_gpu():
    """The kernels CI runs in the interpreter also compile, down to a cubin for sm_90 (Hopper), with
    Triton's own compiler and ptxas: no GPU needed. The interpreter accepts things the compiler
    rejects (Python ints where tensors are needed, say), so this runs in CI too."""
    run = subprocess.run([sys.executable, "-c", _COMPILE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout + run.stderr[-4000:]


@pytest.mark.skipif(not ts.INTERPRETED, reason="the interpreter's float32 -> bfloat16 conversion")
def test_interpreter_truncates_bfloat16_conversions():
    """Why impls.triton_common.result_dtype exists. If this fails, the interpreter now rounds and the
    workaround can go."""
    x = torch.randn(256, generator=torch.Generator().manual_seed(0))
    y = torch.empty(256, dtype=torch.bfloat16)
    _to_bfloat16[(1,)](x, y)
    assert not torch.equal(y, x.to(torch.bfloat16))
    assert torch.equal(y.view(torch.int16), (x.view(torch.int32) >> 16).to(torch.int16))  # truncation


def test_bfloat16_results_are_rounded_to_nearest():
    """bfloat16 in: the result must be the float32 computation on the same values, rounded to
    nearest even (as on a GPU), not truncated (as the interpreter's own conversion would)."""
    case = Case(b=2, d=37, n=5, l=20, g=0, dtype="bf16", regime="official", initial_state=True, seed=5)
    x = make_inputs(case)
    x32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 else v) for k, v in x.items()}
    y, s = ts.selective_scan(**x, return_last_state=True)
    y32, s32 = ts.selective_scan(**x32, return_last_state=True)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y32.to(torch.bfloat16)) and torch.equal(s, s32)

    step = dict(x=x["u"][..., 0], dt=x["delta"][..., 0], A=x["A"], B=x["B"][..., 0], C=x["C"][..., 0],
                D=x["D"], z=x["z"][..., 0], dt_bias=x["delta_bias"], dt_softplus=True)
    step32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 else v) for k, v in step.items()}
    h, h32 = x["initial_state"].clone(), x["initial_state"].clone()
    y1 = ts.selective_state_update(h, **step)
    y1_32 = ts.selective_state_update(h32, **step32)
    assert torch.equal(y1, y1_32.to(torch.bfloat16)) and torch.equal(h, h32)


def test_softplus_matches_torch_across_the_threshold_and_keeps_nan():
    """The kernels' softplus (threshold 20, log1p without libdevice): a few ulp from torch's, the
    identity above 20 (no overflow), NaN kept (a clamp by tl.minimum would have dropped it)."""
    for dtype in (torch.float32, torch.float64):
        x = torch.cat([torch.linspace(-40, 40, 1000, dtype=dtype), torch.tensor([19.99, 20.0, 20.01, 100.0, 1e30, -1e30], dtype=dtype)])
        x = torch.cat([x, torch.full((1024 - x.numel(),), float("nan"), dtype=dtype)]).to(DEVICE)
        y = torch.empty_like(x)
        _softplus_probe[(1,)](x, y, N=1024)
        expected = torch.nn.functional.softplus(x.double())
        finite = ~torch.isnan(x)
        rel = ((y.double() - expected).abs() / expected.abs().clamp_min(torch.finfo(dtype).tiny))[finite]
        assert float(rel.max()) <= 4 * torch.finfo(dtype).eps, (dtype, float(rel.max()))
        assert torch.isnan(y[~finite]).all()


def test_nan_in_delta_reaches_its_channels_future_only():
    case = Case(b=2, d=5, n=3, l=12, regime="mamba", seed=8)
    x = make_inputs(case)
    delta = x["delta"].clone()
    delta[1, 3, 4] = float("nan")
    y = ts.selective_scan(**{**x, "delta": delta})
    clean = ts.selective_scan(**x)
    assert torch.isnan(y[1, 3, 4:]).all()
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[1, 3, 4:] = False
    assert torch.equal(y[mask], clean[mask])


def test_step_is_not_autotuned_and_updates_a_strided_state_once():
    """Autotuning would run the in-place update once per config; a strided state is written through its strides."""
    assert not isinstance(ts.step_kernel, triton.runtime.Autotuner)
    case = Case(b=2, d=37, n=5, l=1, g=37, initial_state=True, strided=True, seed=9)
    x = make_inputs(case)
    args = dict(x=x["u"][..., 0], dt=x["delta"][..., 0], A=x["A"], B=x["B"][..., 0], C=x["C"][..., 0],
                D=x["D"], z=x["z"][..., 0], dt_bias=x["delta_bias"], dt_softplus=True)
    state = x["initial_state"]                      # a non-contiguous view, updated in place
    assert not state.is_contiguous()
    y = impls.selective_state_update(state, **args, impl="triton")
    ref = impls.selective_scan(**reference_inputs(case), return_last_state=True, impl="loop")
    same = impls.selective_scan(**make_inputs(case), return_last_state=True, impl="loop")
    assert_close("step y", y, ref[0][..., 0], same[0][..., 0], 1)
    assert_close("step state", state, ref[1], same[1], 1)


def test_triton_runs_whatever_is_imported_first(tmp_path):
    # scanbench imports impls and benchmarks in some order; without a GPU the kernels must still run
    # in the interpreter (a too-early `import triton` once made every call fail).
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from benchmarks.common import machine_info; machine_info(); import impls, torch; "
            "from equivalence.selective import Case, make_inputs; "
            "impls.selective_scan(**make_inputs(Case(b=1, d=3, n=2, l=4)), impl='triton'); print('ran')")
    # from the suite's root: its own benchmarks package, whatever a kernel's folder has of that name
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=os.path.join(os.path.dirname(__file__), os.pardir))
    assert run.stdout.strip().endswith("ran"), run.stderr[-2000:]
