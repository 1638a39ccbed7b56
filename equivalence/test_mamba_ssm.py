"""The official kernels' adapter (impls/adapters/mamba_ssm.py).

Without a GPU the adapter's translation is still checked: a stand-in ``mamba_ssm`` package whose
two functions are the loop and the recurrent step (the official pure-PyTorch reference has the
same signatures) is registered through the same ``impls.register_mamba_ssm``, on the CPU, and must
pass the value, gradient and decode checks. With a GPU and mamba_ssm installed, the real kernels
are under test in every other file, and the known constant-B bug is checked here.
"""

import sys

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings

import impls
from impls.adapters import mamba_ssm as mamba_ssm_adapter
from .selective import Case, cases, make_inputs, reference_inputs
from .selective import check_gradients, check_prefill_then_decode, check_values
from .tolerance import assert_close, terms

STAND_IN = {
    "mamba_ssm/__init__.py": "",
    "mamba_ssm/ops/__init__.py": "",
    "mamba_ssm/ops/triton/__init__.py": "",
    "mamba_ssm/ops/selective_scan_interface.py":
        "from impls.selective.loop import selective_scan\n"
        "def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,\n"
        "                      return_last_state=False):\n"
        "    return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, None, return_last_state)\n",
    "mamba_ssm/ops/triton/selective_state_update.py": "from impls.selective.recurrent import selective_state_update\n",
}


def _cached_mamba_ssm():
    return [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]


@pytest.fixture
def uncached_mamba_ssm(monkeypatch):
    """No ``mamba_ssm`` module cached before or after the test: the Mamba-1 and the SSD stand-in
    packages differ, and a worker that ran one test would otherwise import the other's from
    sys.modules (seen under pytest -n 2: ModuleNotFoundError for the SSD one's ssd_combined)."""
    for name in _cached_mamba_ssm():
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in _cached_mamba_ssm():
        del sys.modules[name]


@pytest.fixture
def stand_in(tmp_path, monkeypatch, uncached_mamba_ssm):
    """'mamba_ssm_standin': the adapter over a stand-in package, on the CPU, for this test only."""
    if "mamba_ssm" in impls.names():
        pytest.skip("the real mamba_ssm is installed: the adapter is tested through it")
    for path, text in STAND_IN.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(mamba_ssm_adapter, "DEVICE", "cpu")
    impls.register_mamba_ssm("mamba_ssm_standin")
    yield "mamba_ssm_standin"
    impls.unregister("mamba_ssm_standin")  # for this test only: the next one registers it afresh


# the stand-in is set up once and is the same for every drawn case: nothing in it is per-case state
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases(max_l=64))
@example(case=Case(b=2, d=3, n=4, l=5, g=0, dtype="bf16", D=True, z=True, delta_bias=True, softplus=True))
@example(case=Case(b=1, d=4, n=2, l=3, g=2, dtype="f32", initial_state=True))
def test_adapter_translates_every_option(stand_in, case):
    """Values, gradients and prefill-then-step through the adapter; declared gaps refused."""
    check_values(stand_in, case)                 # also: initial_state and float64 must be refused
    check_gradients(stand_in, case)
    check_prefill_then_decode(stand_in, case, case.l // 2)


def test_adapter_refuses_initial_state_even_called_directly(stand_in):
    x = make_inputs(Case(b=1, d=2, n=2, l=3, initial_state=True))
    with pytest.raises(NotImplementedError, match="initial_state"):
        mamba_ssm_adapter.selective_scan(**x)


@pytest.mark.skipif("mamba_ssm" not in impls.names(), reason="needs the mamba_ssm package and a GPU")
@given(case=cases(dtypes=("f32",), max_l=256))
def test_official_last_state_with_constant_B(case):
    """selective_scan_fn with a constant B (d, n): y and last_state against the loop run channel by
    channel (channel c sees B[c] at every token)."""
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    case = Case(**{**case.__dict__, "g": 0, "initial_state": False})
    x, ref = make_inputs(case), reference_inputs(case)
    Bc = torch.randn(case.d, case.n, generator=torch.Generator().manual_seed(case.seed))
    dev = lambda t: None if t is None else t.cuda()  # noqa: E731
    y, last = selective_scan_fn(dev(x["u"]), dev(x["delta"]), dev(x["A"]), dev(Bc), dev(x["C"]), dev(x["D"]),
                                dev(x["z"]), dev(x["delta_bias"]), x["delta_softplus"], True)
    for c in range(case.d):
        one = {k: (v[:, c:c + 1] if k in ("u", "delta", "z") and v is not None else v) for k, v in ref.items()}
        one.update(A=ref["A"][c:c + 1], B=Bc[c].double()[None, :, None].expand(case.b, case.n, case.l),
                   D=None if ref["D"] is None else ref["D"][c:c + 1],
                   delta_bias=None if ref["delta_bias"] is None else ref["delta_bias"][c:c + 1])
        y_ref, s_ref = impls.selective_scan(**one, return_last_state=True, impl="loop")
        where = f"channel {c} of {case!r} with B constant"
        assert_close("mamba_ssm: y", y[:, c:c + 1].cpu(), y_ref, None, terms("y", case.l, case.n), where)
        assert_close("mamba_ssm: last_state", last[:, c:c + 1].cpu(), s_ref, None, terms("last_state", case.l, case.n), where)
