"""The Triton Mamba-3 kernels (impls/mamba3/triton.py) against the float64 loop, and what is specific
to them: p and n that are not tile sizes (p = 1, 3, 17; n = 2, 6, 10), chunks of 1, odd and past l,
every gradient including the four initial states, the decode step and its state_batch_indices, that
nothing outside an output is written and every element of one is, the launch grids' CUDA limits
(those of the Triton SSD kernels too), and the compiled (not interpreted) kernels.

Without a GPU the kernels run in Triton's interpreter: the cases are tiny.
Run: .venv/bin/pytest -q -p no:cacheprovider equivalence/mamba3/test_triton.py
"""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import impls  # noqa: E402
from equivalence.mamba3.cases import Case, as_f64, check, inputs  # noqa: E402
from impls.mamba3 import loop, mamba3_scan, mamba3_state_update  # noqa: E402
from impls.mamba3 import triton as m3  # noqa: E402  (impls.registry has set TRITON_INTERPRET without CUDA)
from impls.ssd import triton as ssd_triton  # noqa: E402

# the Triton Mamba-3 kernels' tests: collected with --mamba3-impl triton, and not with another family's option
pytestmark = [pytest.mark.family("mamba3"), pytest.mark.only_for("triton", family="mamba3")]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIME_LAST, TIME_SECOND = ("ADT", "DT", "Trap"), ("Q", "K", "V", "Angles", "Z")


def token(args, t):
    """The step's arguments for token t (no Input_States)."""
    pick = lambda k, v: (None if v is None else v[..., t] if k in TIME_LAST else v[:, t] if k in TIME_SECOND else v)
    return {k: pick(k, v) for k, v in args.items() if k != "Input_States"}


def window(args, a, e, states):
    cut = lambda k, v: (None if v is None else v[..., a:e] if k in TIME_LAST else v[:, a:e] if k in TIME_SECOND else v)
    return dict({k: cut(k, v) for k, v in args.items()}, Input_States=states)


def scan(args, case, **kw):
    return mamba3_scan(**args, chunk_size=case.chunk_size, return_final_states=True, impl="triton", **kw)


# p = 17 spans two 16-wide tiles of the interpreter's forward; n = 10 and 6 are not powers of two;
# p = 1 and 3 are far below any tile; chunks of 20 hold two 16-token tiles, the second partial; l = 23
# ends in a partial chunk; chunk sizes 1 (a state pass per token) and past l (one chunk).
CASES = [
    Case(b=2, l=7, h_qk=1, groups=2, p=1, n=6, n_ang=2, dtype="f64", chunk_size=3, seed=1),
    Case(b=1, l=9, h_qk=2, groups=1, p=3, n=2, n_ang=1, dtype="f32", chunk_size=4, states=False, seed=2),
    Case(b=1, l=23, h_qk=1, groups=2, p=17, n=10, n_ang=3, dtype="f32", chunk_size=20, seed=3),
    Case(b=2, l=5, h_qk=1, groups=1, p=3, n=6, n_ang=0, dtype="f64", chunk_size=1, D=False, Z=False, seed=4),
    Case(b=1, l=6, h_qk=1, groups=3, p=3, n=4, n_ang=2, dtype="f32", chunk_size=64, seed=5),
    Case(b=1, l=1, h_qk=1, groups=1, p=1, n=2, n_ang=1, dtype="f64", chunk_size=4, seed=6),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_float64_loop(case):
    """Outputs and the four final states within the tolerance policy of the float64 loop."""
    args = inputs(case)
    check(f"triton {case.id}", scan(args, case), args, repro=repr(case))


def test_bfloat16_inputs():
    """bfloat16 V, Z, Q, K, Angles (the official kernel's casts), float32 ADT, DT and states."""
    case = Case(b=1, l=9, h_qk=1, groups=2, p=3, n=6, n_ang=2, dtype="f32", chunk_size=4, seed=7)
    args = inputs(case)
    for k in ("Q", "K", "V", "Z", "Angles", "Trap"):
        args[k] = args[k].bfloat16()
    res = scan(args, case)
    assert res[0].dtype == torch.bfloat16
    check(f"triton bf16 {case.id}", res, args, repro=repr(case) + " (Q K V Z Angles Trap in bfloat16)")


def test_empty_and_refusals():
    """l = 0 returns the input states; p = 0 (no output, no ssm state) still advances the angle and k
    states as the loop does; packed sequences are a declared gap (refused at the front door)."""
    case = Case(b=2, l=0, p=3, n=4, n_ang=1)
    args = inputs(case)
    out, *states = scan(args, case)
    assert out.shape == (2, 0, case.h, 3)
    assert all(torch.equal(a, b) for a, b in zip(states, args["Input_States"]))
    narrow = dataclasses.replace(case, l=5, p=0, dtype="f64")
    args = inputs(narrow)
    for a, b in zip(scan(args, narrow), loop.mamba3_scan(**args, return_final_states=True)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    one = inputs(dataclasses.replace(case, b=1, l=4))
    with pytest.raises(NotImplementedError, match="packed sequences"):
        mamba3_scan(**one, cu_seqlens=torch.tensor([0, 4], dtype=torch.int32), impl="triton")


def test_split_and_continue():
    """Split at several points with all four states carried (the trapezoid's shifted term crosses the
    split through the k and v states, the angle through the angle state): the pieces end to end, and
    the last piece's states, within the tolerance policy of the float64 loop over the whole."""
    case = Case(b=2, l=10, h_qk=1, groups=2, p=3, n=6, n_ang=2, dtype="f32", chunk_size=3, seed=19)
    args = inputs(case)
    for cuts in ([0, 1, 10], [0, 4, 5, 10], [0, 7, 10]):
        states, outs = args["Input_States"], []
        for a, e in zip(cuts, cuts[1:]):
            out, *states = scan(window(args, a, e, None if states is None else tuple(states)), case)
            outs.append(out)
        check(f"triton split at {cuts[1:-1]} {case.id}", (torch.cat(outs, 1), *states), args, repro=repr(case))


def test_cross_family_equals_ssd_loop():
    """lambda = 1 (Trap = +inf), no rotation, zero biases and ADT = A DT is Mamba-2's SSD (Q plays C, K
    plays B, V plays x, h_qk plays g): the Triton scan against the SSD loop, float64, to rounding."""
    case = Case(b=2, l=9, h_qk=2, groups=2, p=3, n=4, n_ang=2, states=False, chunk_size=4, seed=20)
    args = as_f64(inputs(case))
    A = -torch.rand(case.h, dtype=torch.float64) * 2
    args.update(Trap=torch.full_like(args["Trap"], float("inf")), Angles=torch.zeros_like(args["Angles"]),
                Q_bias=torch.zeros_like(args["Q_bias"]), K_bias=torch.zeros_like(args["K_bias"]),
                ADT=A[None, :, None] * args["DT"])
    out = scan(args, case)[0]
    ssd = impls.get("loop", family="ssd").scan
    ref = ssd(args["V"], args["DT"].transpose(1, 2), A, args["K"], args["Q"], 4, D=args["D"], z=args["Z"])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12 * (1 + ref.abs().max().item()))


def test_strided_views():
    """Inputs that are views into wider tensors (time-major ADT, DT, Trap; every other column of a
    projection), and a step cache whose slots are strided views: the same bits as compact copies."""
    case = Case(b=2, l=7, h_qk=1, groups=2, p=3, n=6, n_ang=2, dtype="f32", chunk_size=3, seed=21)
    args = inputs(case)
    wide = {k: torch.stack((v, torch.full_like(v, float("nan"))), -1)[..., 0] for k, v in args.items()
            if k in ("Q", "K", "V", "Z", "Angles")}
    time_major = {k: args[k].transpose(1, 2).contiguous().transpose(1, 2) for k in TIME_LAST}
    strided = dict(args, **wide, **time_major)
    assert not strided["V"].is_contiguous() and not strided["ADT"].is_contiguous()
    assert all(torch.equal(a, b) for a, b in zip(scan(strided, case), scan(args, case)))
    tok, states = token(args, 0), args["Input_States"]
    y, new = mamba3_state_update(**tok, Input_States=states, impl="triton")
    cache = tuple(torch.stack((s, torch.full_like(s, float("nan"))), -1)[..., 0] for s in states)   # strided slots
    yi, _ = mamba3_state_update(**tok, Input_States=cache, state_batch_indices=torch.tensor([0, 1], dtype=torch.int32),
                                impl="triton")
    assert torch.equal(yi, y) and all(torch.equal(c, s) for c, s in zip(cache, new))


GRAD_CASES = [
    Case(b=2, l=7, h_qk=1, groups=2, p=3, n=4, n_ang=1, chunk_size=3, seed=8),
    Case(b=1, l=19, h_qk=1, groups=1, p=17, n=6, n_ang=2, chunk_size=18, seed=9),
    Case(b=1, l=5, h_qk=1, groups=1, p=1, n=10, n_ang=5, chunk_size=1, Z=False, seed=10),
]


def _grads(scan_fn, args, chunk_size):
    leaves = {k: (None if v is None else tuple(s.clone().requires_grad_() for s in v) if k == "Input_States"
                  else v.clone().requires_grad_()) for k, v in args.items()}
    out = scan_fn(**leaves, chunk_size=chunk_size, return_final_states=True)
    w = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=w, dtype=torch.float64).to(o.dtype)).sum() for o in out)
    names = [k for k, v in leaves.items() if k != "Input_States" and v is not None] + ["angle", "ssm", "k", "v"]
    flat = [v for k, v in leaves.items() if k != "Input_States" and v is not None] + list(leaves["Input_States"])
    return names, torch.autograd.grad(loss, flat)


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: c.id)
def test_gradients_match_float64_loop(case):
    """Every input's gradient, the four initial states' included, from a loss on the output and all
    four final states, against the float64 loop's autograd: float64 agreement up to rounding (1e-12
    of the larger of 1 and the gradient's magnitude; the cases' values are O(1), their sequences short)."""
    args = as_f64(inputs(case))
    names, ours = _grads(lambda **kw: mamba3_scan(**kw, impl="triton"), args, case.chunk_size)
    _, ref = _grads(loop.mamba3_scan, args, case.chunk_size)
    for name, a, b in zip(names, ours, ref):
        big = b.abs().max().item() if b.numel() else 0.0
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12 * (1 + big), msg=lambda m: f"d{name}, {case!r}: {m}")


def test_gradients_float32():
    """float32 compute: gradients within 1e-4 relative of the float64 loop's (a rounding-level bound for
    these O(1) cases, 100 times float32's own loop error here), every input."""
    case = Case(b=1, l=11, h_qk=1, groups=2, p=3, n=6, n_ang=2, chunk_size=4, dtype="f32", seed=11)
    args = inputs(case)
    names, ours = _grads(lambda **kw: mamba3_scan(**kw, impl="triton"), args, case.chunk_size)
    _, ref = _grads(loop.mamba3_scan, as_f64(args), case.chunk_size)
    for name, a, b in zip(names, ours, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-4 * (1 + b.abs().max().item()),
                                   msg=lambda m: f"d{name}, {case!r}: {m}")


# ---- the decode step ----------------------------------------------------------------------------

STEP_CASES = [
    Case(b=2, l=5, h_qk=1, groups=2, p=1, n=6, n_ang=2, dtype="f64", seed=12),
    Case(b=1, l=4, h_qk=1, groups=1, p=17, n=10, n_ang=3, dtype="f32", seed=13),
    Case(b=2, l=3, h_qk=2, groups=1, p=3, n=2, n_ang=1, dtype="f32", states=False, D=False, Z=False, seed=14),
]


@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: c.id)
def test_step_token_by_token_matches_float64_loop(case):
    """The step run over the sequence (outputs and final states) within the tolerance policy; its
    inputs untouched and its states new tensors."""
    args = inputs(case)
    states, ys = args["Input_States"], []
    for t in range(case.l):
        given = None if states is None else tuple(states)
        kept = None if given is None else [s.clone() for s in given]
        y, states = mamba3_state_update(**token(args, t), Input_States=given, impl="triton")
        if given is not None:
            assert all(torch.equal(a, b) for a, b in zip(given, kept))
            assert all(a is not b for a, b in zip(states, given))
        ys.append(y)
    check(f"triton step {case.id}", (torch.stack(ys, 1), *states), args, repro=repr(case))


def test_prefill_then_decode():
    """The Triton scan over a prefix, then the Triton step token by token, equals the loop over the whole."""
    case = Case(b=2, l=9, h_qk=1, groups=2, p=3, n=6, n_ang=2, dtype="f32", chunk_size=4, seed=15)
    args = inputs(case)
    out, *states = scan(window(args, 0, 5, args["Input_States"]), case)
    ys = [out]
    for t in range(5, case.l):
        y, states = mamba3_state_update(**token(args, t), Input_States=tuple(states), impl="triton")
        ys.append(y[:, None])
    check(f"triton prefill+decode {case.id}", (torch.cat(ys, 1), *states), args, repro=repr(case))


def test_step_state_batch_indices():
    """A cache of 6 slots: rows 0, 2, 3 advance slots 4, 1, 5 in place and agree with the plain step;
    row 1 is padding (zeros out, no slot touched); slots no row names keep their bits (NaN here)."""
    case = Case(b=4, l=1, h_qk=1, groups=2, p=17, n=6, n_ang=2, dtype="f32", seed=16)
    args = inputs(case)
    tok, states = token(args, 0), args["Input_States"]
    y, new = mamba3_state_update(**tok, Input_States=states, impl="triton")
    cache = tuple(torch.full((6, *s.shape[1:]), float("nan"), dtype=s.dtype) for s in states)
    slots = {0: 4, 2: 1, 3: 5}
    for c, s in zip(cache, states):
        for row, slot in slots.items():
            c[slot] = s[row]
    idx = torch.tensor([4, -1, 1, 5], dtype=torch.int32)
    yi, returned = mamba3_state_update(**tok, Input_States=cache, state_batch_indices=idx, impl="triton")
    assert all(a is b for a, b in zip(returned, cache))
    rows = list(slots)
    assert torch.equal(yi[rows], y[rows])                          # one program per (row, head): same bits
    assert torch.equal(yi[1], torch.zeros_like(yi[1]))
    for c, s in zip(cache, new):
        for row, slot in slots.items():
            assert torch.equal(c[slot], s[row])
        for slot in (0, 2, 3):
            assert c[slot].isnan().all()


# ---- what the kernels write ---------------------------------------------------------------------

GUARD = 64


@pytest.fixture
def guarded_allocations(monkeypatch):
    """Every torch.empty during the call is a NaN-filled view into a larger NaN-filled buffer: an
    element a kernel should write but does not stays NaN (and fails the comparison), and an element
    written past the view's ends shows in the guard bands. Returns the list of (buffer, numel)."""
    made = []
    real_empty = torch.empty

    def empty(*size, dtype=None, device=None, **kw):
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        dtype = dtype or torch.get_default_dtype()
        numel = 1
        for s in shape:
            numel *= s
        if not dtype.is_floating_point:
            return real_empty(*shape, dtype=dtype, device=device, **kw)
        buf = torch.full((numel + 2 * GUARD,), float("nan"), dtype=dtype, device=device)
        made.append((buf, numel))
        return buf[GUARD:GUARD + numel].view(shape)

    monkeypatch.setattr(torch, "empty", empty)
    return made


def _guards_intact(made):
    for buf, numel in made:
        assert buf[:GUARD].isnan().all() and buf[GUARD + numel:].isnan().all(), \
            f"a kernel wrote outside a buffer of {numel} elements"


def test_padded_lanes_not_written(guarded_allocations):
    """Forward, backward and step with p = 17, n = 10, n_ang = 3 and a partial last chunk: every output
    element written (no NaN left), nothing outside any buffer."""
    case = Case(b=1, l=19, h_qk=1, groups=2, p=17, n=10, n_ang=3, dtype="f64", chunk_size=18, seed=17)
    args = inputs(case)
    res = scan(args, case)
    check(f"triton guarded {case.id}", res, args, repro=repr(case))
    names, grads = _grads(lambda **kw: mamba3_scan(**kw, impl="triton"), args, case.chunk_size)
    for name, g in zip(names, grads):
        assert not g.isnan().any(), f"d{name} has unwritten (NaN) elements"
    y, states = mamba3_state_update(**token(args, 0), Input_States=args["Input_States"], impl="triton")
    assert not any(t.isnan().any() for t in (y, *states))
    _guards_intact(guarded_allocations)


# ---- determinism and batch invariance -------------------------------------------------------------

def test_deterministic_and_batch_invariant():
    """The same call twice gives the same bits (forward and every gradient); row 0 alone gives the same
    bits as row 0 in a batch of two (declared batch_invariant)."""
    case = Case(b=2, l=9, h_qk=1, groups=2, p=3, n=6, n_ang=2, dtype="f32", chunk_size=4, seed=18)
    args = inputs(case)
    names, a = _grads(lambda **kw: mamba3_scan(**kw, impl="triton"), args, case.chunk_size)
    _, b = _grads(lambda **kw: mamba3_scan(**kw, impl="triton"), args, case.chunk_size)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    whole = scan(args, case)
    row = {k: (None if v is None else tuple(s[:1] for s in v) if k == "Input_States"
               else v[:1] if k in TIME_LAST + TIME_SECOND else v) for k, v in args.items()}
    alone = scan(row, case)
    assert all(torch.equal(x[:1], y) for x, y in zip(whole, alone))


# ---- the angle's tanh ------------------------------------------------------------------------------

def test_tanh_to_a_few_ulp():
    """The kernels' tanh (exp and log only; the official kernel's is tanh.approx) against torch's, in
    float64, from subnormal to overflowing arguments, both signs, +-inf and NaN: within 4 ulp."""
    import triton
    import triton.language as tl

    @triton.jit
    def apply(x_ptr, y_ptr, N: tl.constexpr):
        o = tl.arange(0, N)
        tl.store(y_ptr + o, m3.tanh64(tl.load(x_ptr + o)))

    mags = [0.0, 5e-324, 1e-300, 1e-20, 1e-9, 3e-5, 1e-3, 0.1, 0.5, 0.9, 1.0, 2.0, 5.0, 18.0, 19.5, 20.0, 40.0, 400.0,
            float("inf")]
    x = torch.tensor(mags + [-m for m in mags] + [float("nan")] * (64 - 2 * len(mags)), dtype=torch.float64)
    y = torch.empty_like(x)
    apply[(1,)](x, y, N=64)
    ref = torch.tanh(x)
    ulp = torch.where(ref == 0, 5e-324, torch.abs(torch.nextafter(ref, torch.full_like(ref, 2.0)) - ref))
    finite = ~ref.isnan()
    assert torch.equal(y.isnan(), ref.isnan())
    err = ((y - ref).abs() / ulp)[finite]
    assert err.max() <= 4, f"{err.max().item()} ulp at x = {x[finite][err.argmax()].item()}"


# ---- launch grids ---------------------------------------------------------------------------------

CUDA_AXIS0, CUDA_AXES12 = 2**31 - 1, 65_535


@pytest.mark.parametrize("b,h", [(1280, 64), (81_920, 1)], ids=["b1280-h64", "b81920-h1"])
@pytest.mark.parametrize("p,n", [(64, 128), (1, 2), (256, 256)], ids=["p64-n128", "p1-n2", "p256-n256"])
@pytest.mark.parametrize("kernels", ["mamba3", "ssd"])
def test_launch_grids_within_cuda_limits(kernels, b, h, p, n):
    """b x h = 81,920 (a serving batch) at l = 4096: every kernel's grid (as the launchers compute it,
    nothing launched) has at most 65,535 programs on axes 1 and 2 and at most 2^31 - 1 on axis 0."""
    grids = (m3 if kernels == "mamba3" else ssd_triton).launch_grids(b, 4096, h, p, n, 64)
    for kernel, grid in grids.items():
        assert 1 <= len(grid) <= 3
        assert grid[0] <= CUDA_AXIS0, (kernel, grid)
        assert all(g <= CUDA_AXES12 for g in grid[1:]), (kernel, grid)


# ---- the compiled kernels ------------------------------------------------------------------------

_COMPILE = r"""
import os
os.environ["TRITON_INTERPRET"] = "0"            # compile for real, whatever this machine has
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import triton.language as tl
from impls.triton_common import compile_for_a_gpu as build
from impls.mamba3 import triton as m3
assert not m3.INTERPRETED
# float32 compute from bfloat16 inputs, every optional path on; small tiles keep the compile short
ptr = {"*": "*fp32", "cs_ptr": "*fp64", "cs_lo_ptr": "*fp64", "dcs_ptr": "*fp64", "dend_ptr": "*fp64",
       "rpart_ptr": "*fp64", "consts_ptr": "*fp64", "idx_ptr": "*i32",
       **{a: "*bf16" for a in ("Q_ptr", "K_ptr", "v_ptr", "z_ptr", "out_ptr", "q_ptr", "k_ptr", "y_ptr")}}
T, P = tl.float32, "ieee"
build(m3.prep_kernel, ptr, dict(HAS_ANGLE0=True, BLOCK_T=16, BLOCK_A=16, COMPUTE=T))
build(m3.chunk_scan_kernel, ptr, dict(COMPENSATED=False, HAS_D=True, HAS_Z=True, SAVE_Y=True, BLOCK_M=16, BLOCK_K=16,
                                      BLOCK_P=16, BLOCK_N=16, COMPUTE=T, DOT_PRECISION=P))
build(m3.chunk_bwd_kernel, ptr, dict(COMPENSATED=False, BLOCK=16, BLOCK_P=16, BLOCK_N=16, COMPUTE=T, DOT_PRECISION=P))
step = build(m3.step_kernel, ptr, dict(HAS_STATE=True, HAS_D=True, HAS_Z=True, HAS_IDX=True, BLOCK_P=16, BLOCK_N=16,
                                       COMPUTE=T))
# no approximate function in the step (tanh, sigmoid and silu are taken in float64); a float64
# division's rcp.approx seed, refined to the rounded quotient, is not one
import re
approx = re.findall(r"(?:ex2|lg2|sin|cos|tanh)\.approx\S*|div\.(?:approx|full)\S*", step.asm["ptx"])
assert not approx, f"approximate instructions in the step: {sorted(set(approx))}"
p64 = {"*": "*fp64", "idx_ptr": "*i32"}
build(m3.chunk_scan_kernel, p64, dict(COMPENSATED=True, HAS_D=False, HAS_Z=False, SAVE_Y=False, BLOCK_M=16, BLOCK_K=16,
                                      BLOCK_P=16, BLOCK_N=16, COMPUTE=tl.float64, DOT_PRECISION=P))
# Mamba-2's chunk-state kernel as the float64 path launches it (step 2 and the backward's own-state
# gradient): its exps stay float64 on the GPU (libdevice's exp), never a float32 conversion and ex2.approx,
# which the interpreter, computing in numpy, could not show
for from_start in (False, True):
    ptx = build(m3.chunk_state_kernel, p64, dict(COMPENSATED=True, FROM_START=from_start, BLOCK_K=16, BLOCK_P=16,
                                                 BLOCK_N=16, COMPUTE=tl.float64, DOT_PRECISION=P)).asm["ptx"]
    single = re.findall(r"ex2\.approx\S*|cvt\.\S*f32\.f64", ptx)
    assert not single and "__nv_exp" in ptx, f"float64 chunk states through float32: {sorted(set(single))}"
print("OK")
"""


def test_kernels_compile_for_a_gpu():
    """The kernels the interpreter runs also compile down to a cubin for sm_90 (Hopper) with Triton's
    compiler and ptxas, no GPU needed (the interpreter accepts what the compiler rejects)."""
    run = subprocess.run([sys.executable, "-c", _COMPILE], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout + run.stderr[-4000:]
