"""The tolerance policy itself: it accepts sound results and rejects the errors it must."""

import subprocess
import sys

import pytest
import torch
from hypothesis import assume, example, given, strategies as st

import impls
from .selective import Case, cases, make_inputs, reference_inputs
from .selective import magnitudes
from .model_helpers import TINY, TINY_IDS, rounding_spread
from .tolerance import compare, conditioning, dt_ulps, polynomial_magnitudes, terms


def runs(case):
    ref = impls.selective_scan(**reference_inputs(case), impl="loop")
    same = impls.selective_scan(**make_inputs(case), impl="loop")
    return ref, same


def comparable(r, m):
    """Where a sum of |terms| m can be held to |r| up to a relative rounding: both finite and |r| a
    normal float. Below the smallest normal (2.2e-308) a rounding is an absolute 2^-1075, so a value
    reached through subnormals (a decay exp(-729) of an extreme step) can be 1e-4 relatively off."""
    return torch.isfinite(r) & torch.isfinite(m) & (r.abs() >= torch.finfo(torch.float64).tiny)


def representable(ref, dtype):
    """A result a relative error in ``dtype`` can move: its largest finite |y| at least tiny / eps
    of the dtype, where every element that underflows (at most tiny) is below one ulp of it. The
    extreme regime can make every y exactly 0 (2 % of 0 is 0) or 9e-298, which float32 rounds to 0."""
    finite = ref[torch.isfinite(ref)].abs()
    info = torch.finfo(dtype)
    return bool(finite.numel()) and float(finite.max()) >= info.tiny / info.eps


@given(case=cases(dtypes=("bf16",), max_l=64))
@example(case=Case(b=1, d=1, n=13, l=1, g=0, dtype="bf16", regime="extreme", D=False, z=True, delta_bias=False,
                   softplus=False, seed=35))   # y = 9e-298, 0 in bfloat16
def test_two_percent_off_in_bfloat16_fails(case):
    ref, same = runs(case)
    assume(representable(ref, same.dtype))
    assert compare(same, ref, same, terms("y", case.l, case.n)).ok
    assert not compare((same.double() * 1.02).to(torch.bfloat16), ref, same, terms("y", case.l, case.n)).ok


@given(case=cases(dtypes=("f32",), max_l=64))
def test_float32_result_rounded_from_the_oracle_passes_and_one_percent_fails(case):
    ref, same = runs(case)
    assert compare(ref.float(), ref, same, terms("y", case.l, case.n)).ok  # the correctly rounded answer is always acceptable
    assume(representable(ref, same.dtype))
    assert not compare((ref * 1.01).float(), ref, same, terms("y", case.l, case.n)).ok


def test_float64_allows_rounding_only():
    case = Case(b=1, d=4, n=3, l=50, dtype="f64")
    ref, _ = runs(case)
    assert compare(ref * (1 + 1e-15), ref, None, terms("y", case.l, case.n)).ok
    assert not compare(ref * (1 + 1e-9), ref, None, terms("y", case.l, case.n)).ok


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_must_match(bad):
    ref = torch.ones(3, dtype=torch.float64)
    poisoned = ref.float().clone()
    poisoned[1] = bad
    assert not compare(poisoned, ref, ref.float(), 1).ok           # appears where the loop is finite
    assert compare(poisoned, torch.tensor([1.0, bad, 1.0], dtype=torch.float64), poisoned, 1).ok  # kept where expected
    assert not compare(ref.float(), torch.tensor([1.0, bad, 1.0], dtype=torch.float64), poisoned, 1).ok  # never vanishes


@given(k=st.integers(2, 200), seed=st.integers(0, 2**31 - 1))
@example(k=14, seed=1823)
def test_a_sum_under_cancellation_is_bounded_by_its_summands(k, seed):
    """A float32 sum of float32-rounded summands, in any order, is within the floor relative to
    sum|summands| (what dL/ddelta_bias needs), and four times that floor off still fails."""
    s = torch.randn(k, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    s -= s.mean()                                             # cancel: the sum is ~0, summands ~1
    oracle, scale = s.sum(), float(s.abs().sum())
    forward, backward = torch.zeros((), dtype=torch.float32), torch.zeros((), dtype=torch.float32)
    for a, b in zip(s.float(), s.float().flip(0)):            # two orders of the rounded summands
        forward, backward = forward + a, backward + b
    assert compare(backward, oracle, forward, k, scale=scale).ok
    off = backward + 4 * torch.finfo(torch.float32).eps * k * scale
    assert not compare(off, oracle, forward, k, scale=scale).ok


@given(case=cases(max_l=64))
def test_sums_of_absolute_terms_bound_the_oracle(case):
    """The magnitude run bounds what it claims to: every element at least |oracle| (|sum| <= sum|terms|)."""
    ref = impls.selective_scan(**reference_inputs(case), return_last_state=True, impl="loop")
    mag = magnitudes(case)[:2]
    for r, m in zip(ref, mag):
        normal = comparable(r, m)
        assert (m[normal] >= r[normal].abs() * (1 - 1e-12)).all()


@given(case=cases(max_l=64))
@example(case=Case(b=1, d=1, n=1, l=4, regime="extreme", D=False, z=False, delta_bias=False, softplus=True))
@example(case=Case(b=1, d=32, n=1, l=45, g=2, regime="extreme", D=False, z=True, delta_bias=False, softplus=True,
                   seed=4294967295))   # a subnormal gradient of delta, 7.2e-319
def test_sums_of_absolute_summands_bound_the_gradients(case):
    """The gradients' sums of |summands| are at least the float64 gradients' |values|, for every
    argument (|sum| <= sum|summands|): the magnitude run's adjoint and chain rule are what they claim."""
    from .selective import SCAN_ARGS

    gen = torch.Generator().manual_seed(case.seed + 3)
    w = (torch.randn(case.b, case.d, case.l, generator=gen, dtype=torch.float64),
         torch.randn(case.b, case.d, case.n, generator=gen, dtype=torch.float64))
    x = {k: (v.requires_grad_() if k in SCAN_ARGS and isinstance(v, torch.Tensor) else v)
         for k, v in reference_inputs(case).items()}
    y, s = impls.selective_scan(**x, return_last_state=True, impl="loop")
    names = [k for k in SCAN_ARGS if x[k] is not None]
    ref = dict(zip(names, torch.autograd.grad((y * w[0]).sum() + (s * w[1]).sum(), [x[k] for k in names])))
    sums = magnitudes(case, w)[2]
    assert set(sums) == set(names)
    for k in names:
        normal = comparable(ref[k], sums[k])
        assert (sums[k][normal] >= ref[k].abs()[normal] * (1 - 1e-9)).all(), k


def test_polynomial_magnitudes_are_the_sums_of_absolute_terms_worked_by_hand():
    """h_t = a_t h_{t-1} + x_t over two tokens: y_2 = a_2 x_1 + x_2 has |terms| |a_2 x_1| + |x_2|, and
    the gradients of y_1 + y_2 + h_2 have |summands| d/dx_1: 1 + 2|a_2|, d/da_2: 2|x_1|."""
    def loop(x, a):
        h1 = x[0]
        h2 = a[1] * h1 + x[1]
        return torch.stack([h1, h2]), h2

    x, a = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.5, -0.25], dtype=torch.float64)
    y, state, grads = polynomial_magnitudes(loop, dict(x=x, a=a), (torch.ones(2), -torch.ones(())))
    assert y.tolist() == [1.0, 2.25] and state.item() == 2.25
    assert grads["x"].tolist() == [1.5, 2.0] and grads["a"].tolist() == [0.0, 2.0]


def test_one_rounding_of_the_decay_argument_grows_by_its_magnitude():
    """Closed form, one step from an initial state: h = exp(dt A) h0. A kernel that rounds dt A
    once more (exp2 with a rounded log2(e), say) is off by |dt A| ulps of h: at dt A = -34 in
    float64, 34 ulps, which the old floor (its terms alone, loop error 0) refused. The conditioning
    allows it, and a result 100 times further off still fails."""
    dt, A, h0 = torch.tensor([2.0], dtype=torch.float64), -17.0, 1.5
    oracle = torch.exp(dt * A) * h0
    sound = torch.exp(dt * A * (1 + torch.finfo(torch.float64).eps)) * h0
    k = conditioning((dt * A)[:, None], dt_ulps(dt, softplus=False, biased=False)[:, None], 0)[-1]
    assert not compare(sound, oracle, None, 1).ok
    assert compare(sound, oracle, None, 1, conditioning=k).ok
    assert not compare(oracle * (1 + 100 * 34 * torch.finfo(torch.float64).eps), oracle, None, 1, conditioning=k).ok


def test_a_decay_from_cumulative_sums_is_within_the_conditioning():
    """Closed form, no inputs after the first token: h_t = exp(sum_{r<=t} dt_r A) x_0. A chunked
    kernel forms the window's decay as exp(cs_t - cs_0) from float32 cumulative sums; after one
    strong step (dt A = -300) the small steps' digits are lost in the sum (a relative error of
    about eps |cs_t| in the decay), where the loop's product keeps them. Sound, and allowed."""
    dtA = torch.tensor([-300.0] + [-1e-3] * 7, dtype=torch.float64)
    oracle = torch.exp(dtA.cumsum(0) - dtA[0])                    # the window after the first step
    cs = dtA.float().cumsum(0)
    chunked = torch.exp(cs - cs[0])
    loop = torch.cat([torch.ones(1), torch.cumprod(torch.exp(dtA[1:].float()), 0)])
    k = conditioning(dtA, torch.zeros(()), 0)
    assert (chunked.double() - oracle).abs().max() > 5 * (loop.double() - oracle).abs().max()   # it does lose digits
    assert not compare(chunked, oracle, loop, 8).ok
    assert compare(chunked, oracle, loop, 8, conditioning=k).ok


@pytest.mark.parametrize("make", TINY, ids=TINY_IDS)
def test_every_models_rounding_spread_moves_its_scan_outputs_by_one_rounding(make):
    """model_helpers.rounding_spread perturbs every scan output of each model (through the family's
    front door and magnitudes): the logits move, and, the move being first order in the rounding,
    a float16 rounding moves them 2^13 times as far as a float32 one (the same signs drawn; 1 %:
    the second-order part, through the norms)."""
    model = make().double()
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    f32, f16 = (rounding_spread(model, ids, dtype) for dtype in (torch.float32, torch.float16))
    assert f32.shape == (2, 7, model.config.vocab_size + (-model.config.vocab_size) % 8) and bool(f32.max() > 0)
    torch.testing.assert_close(f16.max() / f32.max(), torch.tensor(2.0**13, dtype=torch.float64), rtol=1e-2, atol=0)


FAILING_TEST = """
import torch
from equivalence import tolerance

def test_fails():
    tolerance.assert_close("y", torch.ones(3), torch.zeros(3, dtype=torch.float64))
"""


def test_a_first_failure_is_told_before_the_test_ends(tmp_path):
    """The unshrunk first failure reaches the terminal while the test still runs (a long shrink
    follows it), not in the captured output that pytest shows only once the test has ended."""
    (tmp_path / "test_f.py").write_text(FAILING_TEST)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--scan-summary",
                          str(tmp_path / "s.md"), "test_f.py"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    text = out.stdout   # stderr and stdout through one pipe, in the order they were written
    told, report = text.find("first failure, unshrunk"), text.find("= FAILURES =")
    assert out.returncode == 1 and 0 <= told < report, text
