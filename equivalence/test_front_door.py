"""Bad input is refused at the front door, with a message naming the argument; odd-but-valid input works."""

import pytest
import torch

import impls
from .cases import Case, make_inputs


def scan_args(**change):
    x = make_inputs(Case(b=2, d=6, n=4, l=5, g=0))
    x.update(change)
    return x


def step_args(**change):
    x = make_inputs(Case(b=2, d=6, n=4, l=1, g=0, initial_state=True))
    args = dict(state=x["initial_state"], x=x["u"][..., 0], dt=x["delta"][..., 0], A=x["A"],
                B=x["B"][..., 0], C=x["C"][..., 0], D=x["D"], z=x["z"][..., 0], dt_bias=x["delta_bias"], dt_softplus=True)
    args.update(change)
    return args


BAD_SCANS = {
    "u-rank": (dict(u=torch.randn(2, 6)), ValueError, ["u", "rank 3", "rank 2"]),
    "delta-shape": (dict(delta=torch.randn(2, 6, 4)), ValueError, ["delta", "(b=2, d=6, l=5)", "(2, 6, 4)"]),
    "A-shape": (dict(A=torch.randn(5, 4)), ValueError, ["A", "d=6", "(5, 4)"]),
    "A-complex": (dict(A=torch.randn(6, 4, dtype=torch.complex64)), TypeError, ["A", "complex"]),
    "A-dtype-mix": (dict(A=torch.randn(6, 4, dtype=torch.float64)), TypeError, ["A", "float32", "float64"]),
    "B-groups": (dict(B=torch.randn(2, 4, 4, 5)), ValueError, ["B", "divides d=6", "g=4"]),
    "C-rank": (dict(C=torch.randn(2, 4)), ValueError, ["C", "rank"]),
    "z-dtype": (dict(z=torch.randn(2, 6, 5, dtype=torch.float16)), TypeError, ["z", "float16"]),
    "D-shape": (dict(D=torch.randn(7)), ValueError, ["D", "(d=6)", "(7,)"]),
    "bias-dtype": (dict(delta_bias=torch.randn(6, dtype=torch.bfloat16)), TypeError, ["delta_bias", "bfloat16"]),
    "state-shape": (dict(initial_state=torch.randn(2, 6, 3)), ValueError, ["initial_state", "(b=2, d=6, n=4)"]),
    "u-int": (dict(u=torch.ones(2, 6, 5, dtype=torch.int64)), TypeError, ["u", "floating", "int64"]),
    "B-not-tensor": (dict(B=[[1.0]]), TypeError, ["B", "torch.Tensor", "list"]),
    "device-mix": (dict(D=torch.randn(6, device="meta")), ValueError, ["D", "meta"]),
}


@pytest.mark.parametrize("change, exc, words", BAD_SCANS.values(), ids=BAD_SCANS.keys())
@pytest.mark.parametrize("name", ["loop", "recurrent"])
def test_scan_refuses_bad_input(name, change, exc, words):
    with pytest.raises(exc) as info:
        impls.selective_scan(**scan_args(**change), impl=name)
    assert all(w in str(info.value) for w in words), str(info.value)


BAD_STEPS = {
    "state-shape": (dict(state=torch.zeros(2, 6, 5)), ValueError, ["state", "(b=2, d=6, n=4)"]),
    "state-dtype": (dict(state=torch.zeros(2, 6, 4, dtype=torch.float64)), TypeError, ["state", "float64"]),
    "x-rank": (dict(x=torch.randn(2, 6, 1)), ValueError, ["x", "rank 2"]),
    "B-groups": (dict(B=torch.randn(2, 5, 4)), ValueError, ["B", "divides d=6"]),
    "dt-shape": (dict(dt=torch.randn(2, 5)), ValueError, ["dt", "(b=2, d=6)"]),
}


@pytest.mark.parametrize("change, exc, words", BAD_STEPS.values(), ids=BAD_STEPS.keys())
def test_step_refuses_bad_input_and_leaves_state_untouched(change, exc, words):
    args = step_args(**change)
    before = args["state"].clone()
    with pytest.raises(exc) as info:
        impls.selective_state_update(**args)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert torch.equal(args["state"], before)


def test_step_updates_state_in_place():
    args = step_args()
    state = args["state"]
    before = state.clone()
    impls.selective_state_update(**args)
    assert not torch.equal(state, before)


def test_unknown_implementation_is_named():
    with pytest.raises(ValueError, match="unknown implementation 'nope'; registered: loop"):
        impls.selective_scan(**scan_args(), impl="nope")


def test_scan_without_step_is_refused_for_decoding():
    with pytest.raises(NotImplementedError, match="'loop' has no step function"):
        impls.selective_state_update(**step_args(), impl="loop")


@pytest.mark.parametrize("name", ["loop", "recurrent"])
def test_empty_sequence(name):
    x = make_inputs(Case(b=2, d=3, n=4, l=0, initial_state=True))
    y, state = impls.selective_scan(**x, return_last_state=True, impl=name)
    assert y.shape == (2, 3, 0) and torch.equal(state, x["initial_state"])


def test_undeclared_capability_is_refused_not_faked():
    impls.register("test-no-groups", impls.get("loop").scan, grouped=False, dtypes=(torch.float32,))
    with pytest.raises(NotImplementedError, match="grouped B/C"):
        impls.selective_scan(**make_inputs(Case(b=1, d=4, n=2, l=3, g=2)), impl="test-no-groups")
    with pytest.raises(NotImplementedError, match="input dtype torch.float64"):
        impls.selective_scan(**make_inputs(Case(b=1, d=4, n=2, l=3, dtype="f64")), impl="test-no-groups")
    with pytest.raises(NotImplementedError, match="gradients"):
        impls.selective_scan(**scan_args(u=torch.randn(2, 6, 5, requires_grad=True)), impl="recurrent")


def test_wrong_output_from_an_implementation_is_caught():
    impls.register("test-wrong-dtype", lambda u, *a, **k: u.double())
    with pytest.raises(RuntimeError, match="'test-wrong-dtype' returned y"):
        impls.selective_scan(**scan_args(), impl="test-wrong-dtype")


def test_register_rejects_unknown_capabilities_and_duplicates():
    with pytest.raises(TypeError, match="unknown capabilities"):
        impls.register("test-typo", impls.get("loop").scan, gradient=True)
    with pytest.raises(ValueError, match="already registered"):
        impls.register("loop", impls.get("loop").scan)
