"""The SSD adapters (impls/adapters/transformers_ssd.py, impls/adapters/mamba_ssm.py).

transformers: registered on request (importing its adapter registers it), because two known bugs
would fail the default run; ``pytest --ssd-impl impls.adapters.transformers_ssd --xfails-file
impls/adapters/xfails/transformers_ssd.txt`` runs the whole SSD suite on it. Here, in every run: its
scan's values on the cases away from those bugs, its step (the entry's one dt_limit capability
cannot say that the scan has a dt_limit and the step has none, so the entry carries the scan only,
and the step is checked here on the cases it can serve), and each finding behind a gap or a known
bug, checked against transformers itself, so that a fixed transformers shows as a failure here.

mamba_ssm: without a GPU the adapter's translation is still checked, through a stand-in
``mamba_ssm`` package whose ``mamba_chunk_scan_combined`` is the SSD loop (same signature) and whose
``selective_state_update`` takes the official tied form and runs Mamba-1's recurrent step on
d = h p channels (which is what the official step is), registered through the same
``impls.register_mamba_ssm_ssd``.
"""

import dataclasses
import importlib.util

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import impls
from impls.adapters import mamba_ssm as mamba_ssm_ssd_adapter
from impls.ssd import loop as ssd_loop
from impls.adapters import transformers_ssd as tf_adapter

from .ssd import SSDCase, cases, make_inputs, reference_inputs
from .ssd import check_step_equals_scan, check_values
from .test_mamba_ssm import uncached_mamba_ssm  # noqa: F401  (a fixture)
from .tolerance import assert_close, ssd_terms

pytestmark = pytest.mark.family("ssd")

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="needs transformers (a dev dependency)")


@pytest.fixture(autouse=True)
def _only_when_under_test(request):
    """These tests run when their implementation is under test: transformers' when it is selected
    (as by default), the official kernels' (or their stand-in's) when the run is not restricted to
    other SSD implementations."""
    name = "transformers" if "transformers" in request.node.name else "mamba_ssm"
    restricted = request.config.getoption("ssd_impl") or request.config.getoption("ssd_impl_step")
    if restricted and name not in request.config.selected_ssd_impls:
        pytest.skip(f"{name} is not under test")


def _scratch_ssd_registry(monkeypatch):
    """Registrations made by a test stay in that test."""
    family = impls.get_family("ssd")
    monkeypatch.setitem(impls.FAMILIES, "ssd", dataclasses.replace(family, registry=dict(family.registry)))


def _without_step_clamp(case):
    """The official step and transformers' have no dt_limit, nor the clamp of a negative dt to 0 that
    the default limit makes: the cases where the clamp does nothing (the default limit, and softplus,
    so that dt > 0; without softplus even a rounded dt - dt_bias, as in the slow regime, goes negative)."""
    return dataclasses.replace(case, dt_limit="default", softplus=True)


# ---- transformers ------------------------------------------------------------------------------

@pytest.fixture
def transformers_step(monkeypatch):
    """'transformers_step': transformers' step under a scratch name, its gaps declared. Its scan is
    the loop's, so that prefill-then-step checks the step (transformers' scan is checked by the
    suite under 'transformers', and its own imprecision below)."""
    _scratch_ssd_registry(monkeypatch)
    impls.register("transformers_step", ssd_loop.ssd_scan, step=tf_adapter.ssd_state_update, family="ssd",
                   dtypes=(torch.float32,), dt_limit=False)
    return "transformers_step"


@needs_transformers
@example(case=SSDCase(b=2, l=150, h=8, p=5, n=9, g=2, regime="stress", initial_states=True, chunk_size=64, seed=3))
@example(case=SSDCase(b=1, l=129, h=2, p=16, n=32, regime="slow", dt_limit="tight", softplus=False, strided=True, seed=4))
@given(case=cases(dtypes=("f32",), max_l=64).map(lambda c: dataclasses.replace(c, extreme_dt=False)))
def test_transformers_scan_values(case):
    """out and final_states against the float64 loop, away from its large-dt bug (no extreme dt)."""
    check_values("transformers", case)


@needs_transformers
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(case=SSDCase(b=2, l=40, h=4, p=3, n=5, g=2, D="hp", initial_states=True, seed=1), k=17)
@example(case=SSDCase(b=1, l=17, h=1, p=1, n=1, D="none", z=False, dt_bias=False, extreme_dt=True, chunk_size=2), k=4)
@given(case=cases(dtypes=("f32",), max_l=60).map(_without_step_clamp), k=st.integers(0, 80))
def test_transformers_step_equals_scan(transformers_step, case, k):
    check_step_equals_scan(transformers_step, case, k)


@needs_transformers
def test_transformers_gaps_are_refused():
    case = SSDCase(b=1, l=3, h=2, p=2, n=2, D="hp", seed=3)
    x = make_inputs(case)
    with pytest.raises(NotImplementedError, match=r"D of shape \(h, p\)"):
        impls.ssd_scan(**x, chunk_size=2, impl="transformers")
    with pytest.raises(NotImplementedError, match="D of shape"):       # called directly, too
        tf_adapter.ssd_scan(**x, chunk_size=2)
    x64 = make_inputs(dataclasses.replace(case, D="h", dtype="f64"))
    with pytest.raises(NotImplementedError, match="float64"):
        impls.ssd_scan(**x64, chunk_size=2, impl="transformers")
    state = torch.zeros(1, 2, 2, 2)
    with pytest.raises(NotImplementedError, match="dt_limit"):
        tf_adapter.ssd_state_update(state, x["x"][:, 0], x["dt"][:, 0], x["A"], x["B"][:, 0], x["C"][:, 0],
                                    dt_limit=(0.01, 0.05))
    assert not state.any()


@needs_transformers
def test_transformers_decays_from_cumulative_sums_are_within_the_conditioning():
    """transformers' scan takes a token's decay to its chunk's end as exp(cumsum_end - cumsum_s): after
    a token with a large dt A (dt = 100 here, a raw dt past the softplus threshold, or none) the
    difference of two large cumulative sums loses the small decay's digits, as the official kernels'
    do. chunked (which sums each segment's own terms) keeps them. This was once listed as a
    transformers bug; it is the amplification through exp that the tolerance's conditioning counts
    (equivalence/tolerance.py), which a sound kernel may show, so both pass. Pinned: rare in drawn
    cases (a large dt, then a chunk end)."""
    case = SSDCase(b=1, l=2, h=2, p=1, n=1, g=2, D="none", z=False, dt_bias=False, softplus=False,
                   extreme_dt=True, chunk_size=2, seed=2)
    ref = impls.ssd_scan(**reference_inputs(case), chunk_size=2, return_final_states=True, impl="loop")[1]
    error = {name: float((impls.ssd_scan(**make_inputs(case), chunk_size=2, return_final_states=True,
                                         impl=name)[1].double() - ref).abs().max()) for name in ("chunked", "transformers")}
    assert error["transformers"] > 10 * error["chunked"]   # the digits are lost
    check_values("chunked", case)
    check_values("transformers", case)


@needs_transformers
def test_finding_transformers_nan_in_a_later_token_reaches_earlier_outputs():
    """transformers masks the within-chunk scores by multiplying with exp(segment sums), 0 above the
    diagonal: a NaN in B at token 20 makes 0 x NaN = NaN at earlier tokens, which the loop (and
    causality) keep finite. chunked, on the same input, is NaN exactly where the loop is."""
    case = SSDCase(b=1, l=40, h=2, p=3, n=2, chunk_size=17, seed=0)
    x = make_inputs(case)
    x["B"] = x["B"].clone()
    x["B"][:, 20] = float("nan")
    loop = ssd_loop.ssd_scan(**x, chunk_size=17)
    assert torch.isfinite(loop[:, :20]).all()
    assert torch.equal(torch.isnan(impls.ssd_scan(**x, chunk_size=17, impl="chunked")), torch.isnan(loop))
    assert torch.isnan(impls.ssd_scan(**x, chunk_size=17, impl="transformers")[:, :20]).any()


def _transformers_functions():
    return tf_adapter.torch_functions()


@needs_transformers
def test_transformers_functions_are_its_own_torch_code():
    """The adapter runs transformers' PyTorch code, never a kernel its hub decorator might pick."""
    for fn in _transformers_functions():
        assert fn.__code__.co_filename.endswith("transformers/models/mamba2/modeling_mamba2.py")
        assert not hasattr(fn, "__wrapped__")


@needs_transformers
def test_finding_transformers_scan_ignores_z_and_rejects_D_h_p():
    """Why the adapter gates itself and declares D (h, p): transformers' own scan swallows a z passed
    by keyword (**kwargs), and a (h, p) D fails inside it."""
    scan, _ = _transformers_functions()
    case = SSDCase(b=1, l=5, h=2, p=3, n=2, seed=4)
    x = make_inputs(case)
    args = dict(x=x["x"], dt=x["dt"], A=x["A"], B=x["B"], C=x["C"], chunk_size=2)
    assert torch.equal(scan(*args.values(), z=x["z"]), scan(*args.values()))
    with pytest.raises(RuntimeError):
        scan(*args.values(), D=torch.ones(2, 3))


@needs_transformers
def test_finding_transformers_scan_computes_dt_in_half_precision():
    """Why the entry declares float32 only: for bfloat16 inputs transformers adds dt_bias and applies
    softplus in bfloat16, so its final states are far outside the tolerance policy, while the same
    call with dt and dt_bias handed over in float32 (all else bfloat16) is within it."""
    case = SSDCase(b=2, l=65, h=4, p=3, n=5, g=2, dtype="bf16", z=False, initial_states=True, seed=1)
    scan, _ = _transformers_functions()
    x, ref = make_inputs(case), reference_inputs(case)
    _, s_ref = ssd_loop.ssd_scan(**ref, chunk_size=64, return_final_states=True)
    _, s_same = ssd_loop.ssd_scan(**x, chunk_size=64, return_final_states=True)

    def final_states(dt):
        return scan(x["x"], dt, x["A"], x["B"], x["C"], 64, D=x["D"], dt_bias=x["dt_bias"].to(dt.dtype),
                    initial_states=x["initial_states"], dt_softplus=True, return_final_states=True)[1]

    where = repr(case)
    assert_close("dt in float32", final_states(x["dt"].float()), s_ref, s_same, ssd_terms("final_states", case.l, case.n), where)
    with pytest.raises(AssertionError):
        assert_close("dt in bfloat16", final_states(x["dt"]), s_ref, s_same, ssd_terms("final_states", case.l, case.n), where)


# ---- mamba_ssm, through a stand-in package on the CPU -----------------------------------------

STAND_IN = {
    "mamba_ssm/__init__.py": "",
    "mamba_ssm/ops/__init__.py": "",
    "mamba_ssm/ops/triton/__init__.py": "",
    "mamba_ssm/ops/triton/ssd_combined.py":
        "from impls.ssd.loop import ssd_scan\n"
        "def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,\n"
        "                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float('inf')),\n"
        "                              return_final_states=False, return_varlen_states=False, state_dtype=None):\n"
        "    return ssd_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,\n"
        "                    dt_softplus, dt_limit, return_final_states, return_varlen_states)\n",
    # the official step is Mamba-1's on d = h p channels, taking the tied form (A (h, p, n), dt (b, h, p),
    # D and dt_bias (h, p)); Mamba-1's recurrent step is that, with no dt_limit, as the official one
    "mamba_ssm/ops/triton/selective_state_update.py":
        "from impls.selective.recurrent import selective_state_update as step\n"
        "def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):\n"
        "    b, h, p, n = state.shape\n"
        "    flat = lambda t, *shape: None if t is None else t.reshape(*shape)\n"
        "    y = step(state.view(b, h * p, n), x.reshape(b, h * p), dt.reshape(b, h * p), A.reshape(h * p, n), B, C,\n"
        "             flat(D, h * p), flat(z, b, h * p), flat(dt_bias, h * p), dt_softplus)\n"
        "    return y.view(b, h, p)\n",
}


@pytest.fixture
def mamba_ssm_ssd(tmp_path, monkeypatch, uncached_mamba_ssm):
    """The official kernels where they are registered (mamba_ssm and a GPU); elsewhere
    'mamba_ssm_standin': the adapter over the stand-in package, on the CPU, for this test only."""
    if "mamba_ssm" in impls.names("ssd"):
        return "mamba_ssm"
    for path, text in STAND_IN.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(mamba_ssm_ssd_adapter, "DEVICE", "cpu")
    _scratch_ssd_registry(monkeypatch)
    impls.register_mamba_ssm_ssd("mamba_ssm_standin")
    return "mamba_ssm_standin"


# the stand-in is set up once and is the same for every drawn case: nothing in it is per-case state
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(case=SSDCase(b=2, l=65, h=4, p=3, n=5, g=2, dtype="bf16", D="hp", initial_states=True, seed=1), k=20)
@example(case=SSDCase(b=1, l=9, h=2, p=2, n=3, dtype="f64", seed=2), k=4)
@given(case=cases(max_l=64), k=st.integers(0, 64))
def test_mamba_ssm_adapter_translates_every_option(mamba_ssm_ssd, case, k):
    """Values and prefill-then-step through the adapter (the step on the cases it can serve: the
    official step has no dt_limit); declared gaps (float64) refused."""
    check_values(mamba_ssm_ssd, case)
    check_step_equals_scan(mamba_ssm_ssd, _without_step_clamp(case), k)


@pytest.mark.skipif("mamba_ssm" not in impls.names("ssd"), reason="needs the mamba_ssm package and a GPU")
@pytest.mark.parametrize("chunk_size", [17, 40, 50, 100])
def test_mamba_ssm_official_chunk_size_not_a_power_of_two(chunk_size):
    """Reported: NaN for chunk sizes that are not powers of two. The official scan against the
    float64 loop at such chunk sizes, across several chunks (l not a multiple)."""
    case = SSDCase(b=2, l=3 * chunk_size + 5, h=4, p=8, n=16, g=2, D="hp", initial_states=True,
                   chunk_size=chunk_size, seed=chunk_size)
    check_values("mamba_ssm", case)


def test_mamba_ssm_adapter_refuses_its_gaps_called_directly(mamba_ssm_ssd):
    x = make_inputs(SSDCase(b=1, l=3, h=2, p=2, n=2, dtype="f64"))
    with pytest.raises(NotImplementedError, match="float64"):
        mamba_ssm_ssd_adapter.ssd_scan(**x, chunk_size=2)
    x = make_inputs(SSDCase(b=1, l=3, h=2, p=2, n=2, initial_states=True))
    state = x["initial_states"].clone()
    with pytest.raises(NotImplementedError, match="dt_limit"):
        mamba_ssm_ssd_adapter.ssd_state_update(state, x["x"][:, 0], x["dt"][:, 0], x["A"], x["B"][:, 0],
                                               x["C"][:, 0], dt_limit=(0.01, 0.05))
    assert torch.equal(state, x["initial_states"])
    with pytest.raises(NotImplementedError, match="seq_idx"):
        mamba_ssm_ssd_adapter.ssd_scan(**x, chunk_size=2, seq_idx=torch.zeros(1, 3, dtype=torch.int32))
