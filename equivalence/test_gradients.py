"""Gradients of every input of every family's scan against float64 autograd through its loop."""

import dataclasses
import functools

import pytest
from hypothesis import given
from hypothesis import strategies as st

import impls

from .properties import (READS, check_gradients, check_partial_gradients, gradient_weights, gradients,
                         partial_gradient_inputs, per_part, state_parts)
from .test_invariants import pinned


@given(data=st.data())
def test_gradients_match_float64_loop(family, gradient_impl, data):
    check_gradients(family, gradient_impl, data.draw(family.STRATEGIES["gradients"], label="case"))


@given(data=st.data())
def test_partial_gradients_match_float64_loop(family, gradient_impl, data):
    """One input alone requiring grad, the loss reading y, the last state or both, drawn."""
    case = data.draw(family.STRATEGIES["gradients"], label="case")
    leaf = data.draw(st.sampled_from(partial_gradient_inputs(family, case)), label="input")
    check_partial_gradients(family, gradient_impl, case, leaf, data.draw(st.sampled_from(READS), label="reads"))


def test_every_partial_gradient_of_a_tiny_case(family, gradient_impl):
    """Every input alone with each of the three losses, on the family's tiny case with a state and
    its options on, in float64: a drawn case tries one pair, and a bug that one input alone shows
    (of some fifteen) could go unseen by a run's draws."""
    case = dataclasses.replace(family.PROBES[family.STATE_ARG], dtype="f64")
    for leaf in partial_gradient_inputs(family, case):
        for reads in READS:
            check_partial_gradients(family, gradient_impl, case, leaf, reads)


def test_pinned_gradients(family, gradient_impl):
    """Long grouped cases from an initial state, as tests of their own (never pre-empting a drawn one)."""
    for case in pinned(family, "gradients"):
        check_gradients(family, gradient_impl, case)


@given(data=st.data())
def test_magnitudes_bound_the_oracle(family, data):
    """The policy's scales are sums of |terms|: never below the |value| they scale, for y, the last
    state and every gradient (else the floor would be tighter than the values' own size)."""
    case = data.draw(family.STRATEGIES["magnitudes"], label="case")
    x = family.reference_inputs(case)
    y, last = family.scan("loop", case, x)
    weights = gradient_weights(family, case)
    m_y, m_last, sums = family.magnitudes(case, weights)
    assert (y.abs() <= m_y * (1 + 1e-12) + 1e-300).all()
    for (label, s), m in zip(state_parts(family, last), per_part(family, m_last)):
        assert (s.abs() <= m * (1 + 1e-12) + 1e-300).all(), label
    for k, g in gradients(family, "loop", case, x, weights).items():
        assert (g.abs() <= sums[k] * (1 + 1e-9) + 1e-300).all(), k


def test_an_input_left_out_of_the_graph_is_compared_as_zeros():
    """A kernel may leave out of its graph what it has no use for (Mamba-3's Angles when n_ang = 0,
    an empty tensor): it passes. One that leaves out what it needs (Angles detached when n_ang > 0)
    fails the comparison by the input's name, not with autograd's own error."""
    import equivalence.mamba3 as fam
    from impls.mamba3 import chunked

    def scan(*args, detach_always):
        args = list(args)
        if detach_always or args[8].shape[-1] == 0:
            args[8] = args[8].detach()
        return chunked.mamba3_scan(*args)

    names = {"needs_none": False, "detaches": True}
    for name, always in names.items():
        impls.register(name, functools.partial(scan, detach_always=always), family="mamba3", gradients=True)
    try:
        case = fam.Case(b=1, l=3, h_qk=1, groups=1, p=2, n=4, n_ang=0, dtype="f64", states=True, D=True, Z=True,
                        seed=0, chunk_size=2)
        check_gradients(fam, "needs_none", case)
        check_gradients(fam, "detaches", case)
        case = dataclasses.replace(case, n_ang=1)
        check_gradients(fam, "needs_none", case)
        with pytest.raises(AssertionError, match="detaches: grad Angles: error"):
            check_gradients(fam, "detaches", case)
    finally:
        for name in names:
            impls.unregister(name, "mamba3")
