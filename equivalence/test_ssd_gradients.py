"""Gradients of every SSD input against float64 autograd through the SSD loop."""

import torch
from hypothesis import example, given

from .ssd_cases import SSDCase, cases
from .ssd_checks import check_gradients, gradient_magnitudes, magnitudes


@example(case=SSDCase(b=1, l=1, h=1, p=1, n=1, dtype="f64"))
@example(case=SSDCase(b=2, l=70, h=4, p=3, n=5, g=2, regime="stress", D="hp", initial_states=True, chunk_size=17, seed=7))
@example(case=SSDCase(b=1, l=40, h=2, p=2, n=3, dt_limit="tight", extreme_dt=True, chunk_size=2, seed=8))
@given(case=cases(dtypes=("f32", "f64"), max_h=6, max_p=8, max_n=8, max_l=64))
def test_gradients_match_float64_loop(ssd_gradient_impl, case):
    check_gradients(ssd_gradient_impl, case)


@given(case=cases(dtypes=("f64",), max_h=4, max_p=4, max_n=4, max_l=30))
def test_magnitudes_bound_the_oracle(case):
    """The policy's scales are sums of |terms|: never below the |value| they scale, for out,
    final_states and every gradient (else the floor would be tighter than the values' own size)."""
    import impls
    from .ssd_cases import reference_inputs
    from .ssd_checks import _gradients

    x = reference_inputs(case)
    out, final = impls.ssd_scan(**x, chunk_size=case.chunk_size, return_final_states=True, impl="loop")
    m_out, m_final = magnitudes(case)
    assert (out.abs() <= m_out * (1 + 1e-12) + 1e-300).all() and (final.abs() <= m_final * (1 + 1e-12) + 1e-300).all()
    gen = torch.Generator().manual_seed(case.seed + 3)
    weights = (torch.randn(case.b, case.l, case.h, case.p, generator=gen, dtype=torch.float64),
               torch.randn(case.b, case.h, case.p, case.n, generator=gen, dtype=torch.float64))
    grads = _gradients("loop", case, x, weights)
    sums = gradient_magnitudes(case, weights)
    for k, g in grads.items():
        assert (g.abs() <= sums[k] * (1 + 1e-9) + 1e-300).all(), k
