"""The tolerance policy itself: it accepts sound results and rejects the errors it must."""

import pytest
import torch
from hypothesis import example, given, strategies as st

import impls
from .cases import Case, cases, make_inputs, reference_inputs
from .checks import magnitudes
from .tolerance import compare, terms


def runs(case):
    ref = impls.selective_scan(**reference_inputs(case), impl="loop")
    same = impls.selective_scan(**make_inputs(case), impl="loop")
    return ref, same


@given(case=cases(dtypes=("bf16",), max_l=64))
def test_two_percent_off_in_bfloat16_fails(case):
    ref, same = runs(case)
    assert compare(same, ref, same, terms("y", case.l, case.n)).ok
    assert not compare((same.double() * 1.02).to(torch.bfloat16), ref, same, terms("y", case.l, case.n)).ok


@given(case=cases(dtypes=("f32",), max_l=64))
def test_float32_result_rounded_from_the_oracle_passes_and_one_percent_fails(case):
    ref, same = runs(case)
    assert compare(ref.float(), ref, same, terms("y", case.l, case.n)).ok  # the correctly rounded answer is always acceptable
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
        finite = torch.isfinite(r) & torch.isfinite(m)
        assert (m[finite] >= r[finite].abs() * (1 - 1e-12)).all()


@given(case=cases(max_l=64))
def test_sums_of_absolute_summands_bound_the_gradients(case):
    """The gradients' sums of |summands| are at least the float64 gradients' |values|, for every
    argument (|sum| <= sum|summands|): the magnitude run's adjoint and chain rule are what they claim."""
    from .checks import SCAN_ARGS

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
        finite = torch.isfinite(ref[k]) & torch.isfinite(sums[k])
        assert (sums[k][finite] >= ref[k].abs()[finite] * (1 - 1e-9)).all(), k
