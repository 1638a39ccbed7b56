"""What is specific to the Triton SSD kernels (impls/ssd/triton.py), beyond the shared SSD suite
(which runs them too, as ``triton`` in the ssd family): sizes that cross several tiles of every
kind, chunk sizes of 1 and past l, growth (A > 0), padded lanes and strided views into a wider
tensor, a NaN or inf inside a chunk, 64-bit offsets past 2^31 elements, the decode step's tied form
and state_batch_indices, and the compiled (not interpreted) kernels."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import impls  # noqa: E402
from impls.ssd import triton as ts  # noqa: E402  (conftest has set TRITON_INTERPRET without CUDA)
import triton  # noqa: E402

from .ssd import SSDCase, make_inputs  # noqa: E402
from .ssd import check_gradients, check_step_equals_scan, check_values  # noqa: E402
from .tolerance import assert_close, ssd_terms  # noqa: E402

pytestmark = [pytest.mark.family("ssd"), pytest.mark.only_for("triton", family="ssd")]   # the Triton SSD kernel's tests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _only_when_triton_is_under_test(request):
    if "triton" not in request.config.selected_ssd_impls:
        pytest.skip("triton is not among the SSD implementations under test (--ssd-impl)")


@pytest.fixture
def full_sizes(monkeypatch):
    """These cases are chosen to cross tiles: lift the property tests' folding for them."""
    monkeypatch.setitem(impls.get("triton", family="ssd").supports, "case_limits", None)


# p = 17, n = 20 span two 16-wide tiles of the interpreter's forward (and one padded tile of the
# backward); chunks of 40 hold three 16-token tiles, the last one partial; l = 45 ends in a partial
# chunk; g = 2 with 4 heads, two heads per group.
TILED = [
    SSDCase(b=2, l=45, h=4, p=17, n=20, g=2, dtype="f32", regime="stress", D="hp", initial_states=True,
            chunk_size=40, seed=1),
    SSDCase(b=1, l=45, h=2, p=17, n=20, g=1, dtype="f64", regime="slow", D="h", dt_limit="tight", chunk_size=40,
            strided=True, seed=2),
    SSDCase(b=1, l=37, h=2, p=3, n=5, g=2, dtype="bf16", regime="mamba2", D="none", z=False, extreme_dt=True,
            chunk_size=16, seed=3),
]


@pytest.mark.parametrize("case", TILED, ids=lambda c: c.id)
def test_tiled_sizes_values(full_sizes, case):
    check_values("triton", case)


@pytest.mark.parametrize("case", TILED[:2], ids=lambda c: c.id)
def test_tiled_sizes_gradients(full_sizes, case):
    check_gradients("triton", case)


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 1000], ids=lambda q: f"cs{q}")
def test_chunk_sizes_of_one_odd_and_past_l(full_sizes, chunk_size):
    """Any positive chunk size: 1 (a state pass per token), odd, one tile, and longer than l (one chunk)."""
    case = SSDCase(b=1, l=20, h=2, p=3, n=4, g=1, regime="stress", initial_states=True, chunk_size=chunk_size, seed=4)
    check_values("triton", case)
    check_gradients("triton", case)


def _against_loop(what, inputs, chunk_size, grads=False):
    """out, final_states (and every gradient) against the float64 loop under the tolerance policy."""
    ref_in = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    ref = impls.ssd_scan(**ref_in, chunk_size=chunk_size, return_final_states=True, impl="loop")
    same = impls.ssd_scan(**inputs, chunk_size=chunk_size, return_final_states=True, impl="loop")
    got = impls.ssd_scan(**inputs, chunk_size=chunk_size, return_final_states=True, impl="triton")
    l, n = inputs["x"].shape[1], inputs["B"].shape[-1]
    assert_close(f"{what}: out", got[0], ref[0], same[0], ssd_terms("out", l, n))
    assert_close(f"{what}: final_states", got[1], ref[1], same[1], ssd_terms("final_states", l, n))


def test_growth_where_A_is_positive_is_not_clamped():
    """A > 0 makes every segment sum inside a chunk positive: the state grows, as in the loop. The
    official kernels' exp(min(x, 0)) would turn that growth into 1 (and fail this)."""
    case = SSDCase(b=1, l=40, h=2, p=3, n=4, regime="mamba2", chunk_size=16, seed=5)
    x = make_inputs(case)
    x["A"] = torch.tensor([0.5, 2.0])
    _against_loop("A > 0", x, 16)


# silu(z) = z / (1 + exp(-z)), torch's formula, wherever z lies: 0 far below -80 (where exp(-z)
# overflows), NaN at -inf (-inf / inf, as the loop's F.silu), inf at +inf.
EXTREME_Z = [-float("inf"), -1e35, -1e4, -100.0, -88.0, -80.0, -1.0, 0.0, 1.0, 100.0, float("inf")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_gate_is_silu_for_every_z(dtype):
    """The gate far below -80 and at the infinities, in the scan and in the step, is the loop's."""
    case = SSDCase(b=1, l=len(EXTREME_Z), h=1, p=2, n=3, regime="mamba2", D="h", chunk_size=4, seed=12)
    x = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in make_inputs(case).items()}
    x["z"] = torch.tensor(EXTREME_Z, dtype=dtype)[None, :, None, None].expand(1, -1, 1, 2).contiguous()
    _against_loop(f"z from -inf to inf, {dtype}", x, 4)
    args, _ = _step_args(case)
    args = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    for zt in EXTREME_Z:
        step = dict(args, z=torch.full((1, 1, 2), zt, dtype=dtype))
        y = impls.ssd_state_update(torch.full((1, 1, 2, 3), 0.5, dtype=dtype), **step, impl="triton")
        same = impls.ssd_state_update(torch.full((1, 1, 2, 3), 0.5, dtype=dtype), **step, impl="recurrent")
        assert_close(f"step with z = {zt}, {dtype}", y, same.double(), same, ssd_terms("out", 1, 3))


def _wide_views(x, fill=float("nan")):
    """The same values as views into a wider NaN-filled buffer, the way in_proj's output is split
    (x, z, B, C, dt side by side on the last axis): a kernel reading one element past any edge or
    through a wrong stride reads NaN."""
    parts = [k for k in ("z", "x", "B", "C", "dt") if x.get(k) is not None]
    b, l = x["x"].shape[:2]
    widths = {k: x[k][0, 0].numel() for k in parts}
    dtype = x["x"].dtype
    buf = torch.full((b, l, sum(widths.values()) + 7), fill, dtype=dtype)
    out, start = dict(x), 3
    for k in parts:
        v = buf[:, :, start:start + widths[k]].view(b, l, *x[k].shape[2:])
        v.copy_(x[k])
        out[k] = v
        start += widths[k] + (1 if k != parts[-1] else 0)
    return out


def test_strided_views_into_a_wide_nan_filled_projection():
    """Views into one wide tensor with NaN in every gap give bit for bit the results of compact
    copies: no padded lane or position past an edge is ever read into a result, forward or backward."""
    case = SSDCase(b=2, l=21, h=3, p=5, n=6, g=1, regime="mamba2", D="hp", initial_states=True, chunk_size=8, seed=6)
    compact = make_inputs(case)
    wide = _wide_views(compact)
    assert not wide["x"].is_contiguous() and wide["x"].stride(1) > case.h * case.p
    results = []
    for x in (wide, compact):
        leaves = {k: (v.detach().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
        out, final = impls.ssd_scan(**leaves, chunk_size=8, return_final_states=True, impl="triton")
        wrt = [k for k, v in leaves.items() if isinstance(v, torch.Tensor)]
        grads = torch.autograd.grad(out.sum() + final.sum(), [leaves[k] for k in wrt])
        results.append([out, final, *grads])
    for a, b in zip(*results):
        assert torch.isfinite(a).all() and torch.equal(a, b)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_x_inside_a_chunk_reaches_only_later_tokens(poison):
    """A NaN or inf in x at token 5 of a 40-token chunk: in a tl.dot the 0 above the diagonal times
    it would be NaN at tokens 0-4. Those outputs stay bit for bit the clean ones; later ones are not finite."""
    case = SSDCase(b=1, l=40, h=2, p=3, n=4, regime="mamba2", chunk_size=40, seed=7)
    x = make_inputs(case)
    clean = impls.ssd_scan(**x, chunk_size=40, impl="triton")
    x["x"] = x["x"].clone()
    x["x"][0, 5, 0, 0] = poison
    out = impls.ssd_scan(**x, chunk_size=40, impl="triton")
    assert torch.equal(out[:, :5], clean[:, :5])
    assert not torch.isfinite(out[0, 5:, 0, 0]).any()
    assert torch.equal(out[:, :, 1], clean[:, :, 1])                      # the other head


def test_packed_sequences_and_huge_states_are_declared_gaps():
    case = SSDCase(b=1, l=4, h=1, p=2, n=2, chunk_size=4)
    x = make_inputs(case)
    with pytest.raises(NotImplementedError, match="varlen"):
        ts.ssd_scan(**x, chunk_size=4, seq_idx=torch.zeros(1, 4, dtype=torch.int32))
    big = dict(x, B=torch.zeros(1, 4, 1, ts.MAX_PN + 1), C=torch.zeros(1, 4, 1, ts.MAX_PN + 1))
    with pytest.raises(NotImplementedError, match="MAX_PN|up to"):
        ts.ssd_scan(**big, chunk_size=4)


# ---- the decoding step ---------------------------------------------------------------------------

def _step_args(case, t=0):
    x = make_inputs(case)
    return dict(x=x["x"][:, t], dt=x["dt"][:, t], A=x["A"], B=x["B"][:, t], C=x["C"][:, t], D=x["D"],
                z=None if x["z"] is None else x["z"][:, t], dt_bias=x["dt_bias"], dt_softplus=x["dt_softplus"],
                dt_limit=x["dt_limit"]), x


@pytest.mark.parametrize("case", [
    SSDCase(b=3, l=9, h=4, p=5, n=7, g=2, regime="stress", D="hp", dt_limit="tight", initial_states=True, seed=8),
    SSDCase(b=2, l=9, h=3, p=17, n=3, g=3, dtype="bf16", D="h", initial_states=True, strided=True, seed=9),
], ids=lambda c: c.id)
def test_step_equals_scan(full_sizes, case):
    check_step_equals_scan("triton", case, 4)


def test_step_tied_form_and_state_batch_indices():
    """The official decode form (A (h, p, n), dt (b, h, p), dt_bias and D (h, p), broadcast with zero
    strides) is the same kernel as the untied one, bit for bit; with state_batch_indices, row i
    updates slot idx[i], and a negative index is a padding row: output zeros, no slot touched."""
    case = SSDCase(b=3, l=1, h=4, p=5, n=7, g=2, regime="stress", D="h", initial_states=True, seed=10)
    args, x = _step_args(case)
    h, p, n = case.h, case.p, case.n
    untied_state = x["initial_states"].clone()
    y = ts.ssd_state_update(untied_state, **args)
    tied = dict(args, A=args["A"][:, None, None].expand(h, p, n), dt=args["dt"][..., None].expand(-1, h, p),
                dt_bias=args["dt_bias"][:, None].expand(h, p), D=args["D"][:, None].expand(h, p))
    tied_state = x["initial_states"].clone()
    assert torch.equal(ts.ssd_state_update(tied_state, **tied), y) and torch.equal(tied_state, untied_state)
    assert not isinstance(ts.step_kernel, triton.runtime.Autotuner)          # one in-place update per call

    slots = torch.randn(5, h, p, n, generator=torch.Generator().manual_seed(1))
    slots[4], slots[1] = x["initial_states"][0], x["initial_states"][2]
    before = slots.clone()
    yi = ts.ssd_state_update(slots, **args, state_batch_indices=torch.tensor([4, -1, 1]))
    assert torch.equal(yi[0], y[0]) and torch.equal(yi[2], y[2]) and torch.equal(yi[1], torch.zeros_like(yi[1]))
    assert torch.equal(slots[4], untied_state[0]) and torch.equal(slots[1], untied_state[2])
    assert torch.equal(slots[[0, 2, 3]], before[[0, 2, 3]])


def test_state_batch_indices_through_the_front_door():
    """The kernel's state_batch_indices are declared, so impls.ssd_state_update takes them: the same
    outputs and slots as the recurrent step's."""
    case = SSDCase(b=3, l=1, h=2, p=3, n=4, regime="stress", D="h", seed=13)
    args, _ = _step_args(case)
    slots = torch.randn(5, 2, 3, 4, generator=torch.Generator().manual_seed(2))
    same_slots = slots.clone()
    idx = torch.tensor([4, -1, 1], dtype=torch.int32)
    y = impls.ssd_state_update(slots, **args, state_batch_indices=idx, impl="triton")
    same = impls.ssd_state_update(same_slots, **args, state_batch_indices=idx, impl="recurrent")
    assert_close("step with state_batch_indices: y", y, same.double(), same, ssd_terms("out", 1, case.n))
    assert_close("step with state_batch_indices: slots", slots, same_slots.double(), same_slots,
                 ssd_terms("final_states", 1, case.n))


def test_step_updates_a_strided_state_in_place():
    case = SSDCase(b=2, l=1, h=3, p=4, n=5, initial_states=True, seed=11)
    args, x = _step_args(case)
    wide = torch.full((2, 3, 4, 2 * 5), float("nan"))
    state = wide[..., ::2]
    state.copy_(x["initial_states"])
    compact = x["initial_states"].clone()
    y = ts.ssd_state_update(state, **args)
    assert torch.equal(y, ts.ssd_state_update(compact, **args)) and torch.equal(state, compact)
    assert torch.isnan(wide[..., 1::2]).all()                            # the gaps untouched
    ref = impls.ssd_state_update(x["initial_states"].double(), **{k: (v.double() if isinstance(v, torch.Tensor) else v)
                                                                 for k, v in args.items()}, impl="recurrent")
    assert_close("strided step", y, ref, impls.ssd_state_update(x["initial_states"].clone(), **args, impl="recurrent"),
                 ssd_terms("out", 1, case.n))


# ---- 64-bit offsets ------------------------------------------------------------------------------

_PAST_2_31 = """
import torch
from impls.ssd import triton as ts
dev = "cuda" if torch.cuda.is_available() else "cpu"
b, l, h, p, n = 3, 20, 2, 4, 16
S = 2**30 + 64          # batch stride of x and z: batch row 2 starts 2^31 + 128 elements in
try:
    buf = torch.empty(2 * S + l * h * p, dtype=torch.float16, device=dev)   # 4 GiB, untouched but 3 rows
    zbuf = torch.empty(2 * S + l * h * p, dtype=torch.float16, device=dev)
except RuntimeError as e:
    print("SKIP", e); raise SystemExit(0)
gen = torch.Generator().manual_seed(0)
x_small = torch.randn(b, l, h, p, generator=gen).half().to(dev)
z_small = torch.randn(b, l, h, p, generator=gen).half().to(dev)
x = torch.as_strided(buf, (b, l, h, p), (S, h * p, p, 1)); x.copy_(x_small)
z = torch.as_strided(zbuf, (b, l, h, p), (S, h * p, p, 1)); z.copy_(z_small)
dt = (0.1 * torch.rand(b, l, h, generator=gen)).half().to(dev)
A = (-0.5 - torch.rand(h, generator=gen)).to(dev)
B, C = (torch.randn(b, l, 1, n, generator=gen).half().to(dev) for _ in range(2))
D = torch.ones(h, device=dev)
gy = torch.randn(b, l, h, p, generator=gen).half().to(dev)
results = []
for xx, zz in ((x, z), (x_small, z_small)):
    leaf = xx.detach().requires_grad_()
    zl = zz.detach().requires_grad_()
    out, s = ts.ssd_scan(leaf, dt, A, B, C, 8, D, zl, return_final_states=True)
    dx, dz = torch.autograd.grad((out * gy).sum() + s.sum(), [leaf, zl])
    state = torch.zeros(b, h, p, n, device=dev)
    ys = ts.ssd_state_update(state, xx[:, 2], dt[:, 2], A, B[:, 2], C[:, 2], D, zz[:, 2])
    results.append((out, s, dx, dz, ys, state))
assert all(torch.equal(u, v) for u, v in zip(*results)), "indexing past 2^31 elements differs"
print("OK")
"""


def test_kernels_index_past_2_31_elements():
    """Forward, backward and step read x and z whose last batch row starts past 2^31 elements (4 GiB
    views, almost all never touched): the same results as compact copies. A wrapped int32 offset
    crashes or reads the wrong row, hence a separate process. Runs in the interpreter too."""
    run = subprocess.run([sys.executable, "-c", _PAST_2_31], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if run.stdout.startswith("SKIP"):
        pytest.skip(f"cannot reserve 8 GiB of address space: {run.stdout}")
    assert run.returncode == 0 and "OK" in run.stdout, (
        f"exit {run.returncode} (a negative exit is a signal: a wrapped offset)\n{run.stdout}\n{run.stderr[-3000:]}")


# ---- the compiled kernels ------------------------------------------------------------------------

_COMPILE = """
import os
os.environ["TRITON_INTERPRET"] = "0"            # compile for real, whatever this machine has
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import triton.language as tl
from impls.triton_common import compile_for_a_gpu as build
from impls.ssd import triton as ts
assert not ts.INTERPRETED

# float32 compute from bfloat16 inputs, every optional path on; small tiles keep the compile short
ptr = {"*": "*fp32", "cs_ptr": "*fp64", "cs_lo_ptr": "*fp64", "dcs_ptr": "*fp64", "dend_ptr": "*fp64", "rpart_ptr": "*fp64",
       "idx_ptr": "*i32",
       **{a: "*bf16" for a in ("x_ptr", "z_ptr", "B_ptr", "C_ptr", "out_ptr")}}
T, P, C = tl.float32, "ieee", False
build(ts.chunk_cumsum_kernel, dict(ptr, dt_ptr="*bf16"), dict(HAS_BIAS=True, SOFTPLUS=True, BLOCK_H=16, BLOCK_T=16,
                                                              COMPUTE=T, COMPENSATED=C))
for fs in (False, True):
    build(ts.chunk_state_kernel, ptr, dict(COMPENSATED=C, FROM_START=fs, BLOCK_K=16, BLOCK_P=16, BLOCK_N=16, COMPUTE=T,
                                            DOT_PRECISION=P))
build(ts.state_pass_kernel, ptr, dict(HAS_H0=True, BLOCK=64, COMPUTE=T))
build(ts.chunk_scan_kernel, ptr, dict(COMPENSATED=C, HAS_D=True, D_HP=True, HAS_Z=True, SAVE_Y=True, BLOCK_M=16,
                                       BLOCK_K=16, BLOCK_P=16, BLOCK_N=16, COMPUTE=T, DOT_PRECISION=P))
build(ts.state_pass_bwd_kernel, ptr, dict(HAS_DFINAL=True, BLOCK=64, COMPUTE=T))
build(ts.chunk_bwd_kernel, ptr, dict(COMPENSATED=C, BLOCK=16, BLOCK_P=16, BLOCK_N=16, COMPUTE=T, DOT_PRECISION=P))
build(ts.step_kernel, dict(ptr, dt_ptr="*bf16"), dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, HAS_IDX=True,
                                                      BLOCK_P=16, BLOCK_N=16, COMPUTE=T))
# float64 compute: the compensated (TwoSum) cumsum and the kernels that read it
p64 = {"*": "*fp64", "idx_ptr": "*i32"}
build(ts.chunk_cumsum_kernel, p64, dict(HAS_BIAS=False, SOFTPLUS=False, BLOCK_H=16, BLOCK_T=16, COMPUTE=tl.float64,
                                         COMPENSATED=True))
build(ts.chunk_scan_kernel, p64, dict(COMPENSATED=True, HAS_D=False, D_HP=False, HAS_Z=False, SAVE_Y=False, BLOCK_M=16,
                                       BLOCK_K=16, BLOCK_P=16, BLOCK_N=16, COMPUTE=tl.float64, DOT_PRECISION=P))
print("OK")
"""


def test_kernels_compile_for_a_gpu():
    """The kernels CI runs in the interpreter also compile down to a cubin for sm_90 (Hopper) with
    Triton's compiler and ptxas, no GPU needed: the interpreter accepts what the compiler rejects.
    (Every kernel in float64 and the GPU's 64x128 tiles were compiled too, by hand: minutes on 2 cores.)"""
    run = subprocess.run([sys.executable, "-c", _COMPILE], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout + run.stderr[-4000:]
