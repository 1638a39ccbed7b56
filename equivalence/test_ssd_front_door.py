"""Bad SSD input is refused at the front door with a message naming the argument, what was
expected and what was given; the step leaves its state untouched whenever it raises."""

import pytest
import torch

import impls

from .ssd import SSDCase, make_inputs
from .test_front_door import refused_leaving_state_untouched

pytestmark = pytest.mark.family("ssd")

CASE = SSDCase(b=2, l=5, h=4, p=3, n=6, g=2, initial_states=True)


def scan_args(**change):
    x = make_inputs(CASE)
    x.update(change)
    return x


def step_args(**change):
    x = make_inputs(CASE)
    args = dict(state=x["initial_states"].clone(), x=x["x"][:, 0], dt=x["dt"][:, 0], A=x["A"], B=x["B"][:, 0],
                C=x["C"][:, 0], D=x["D"], z=x["z"][:, 0], dt_bias=x["dt_bias"], dt_softplus=True)
    args.update(change)
    return args


BAD_SCANS = {
    "x-rank": (dict(x=torch.randn(2, 5, 12)), ValueError, ["x", "rank 4", "rank 3"]),
    "dt-shape": (dict(dt=torch.randn(2, 5, 3)), ValueError, ["dt", "(b=2, l=5, h=4)", "(2, 5, 3)"]),
    "A-shape": (dict(A=torch.randn(4, 6)), ValueError, ["A", "(h=4)", "(4, 6)"]),
    "A-dtype": (dict(A=torch.randn(4, dtype=torch.float64)), TypeError, ["A", "float32", "float64"]),
    "groups-not-dividing-h": (dict(B=torch.randn(2, 5, 3, 6), C=torch.randn(2, 5, 3, 6)), ValueError,
                              ["B", "divides h=4", "g=3"]),
    "C-groups-differ": (dict(C=torch.randn(2, 5, 1, 6)), ValueError, ["C", "(b=2, l=5, g=2, n=6)", "(2, 5, 1, 6)"]),
    "D-shape": (dict(D=torch.randn(4, 2)), ValueError, ["D", "(h=4, p=3)", "(4, 2)"]),
    "D-shape-1d": (dict(D=torch.randn(5)), ValueError, ["D", "(h=4) or (h=4, p=3)", "(5,)"]),
    "D-flat-h-p": (dict(D=torch.randn(12)), ValueError, ["D", "(h=4) or (h=4, p=3)", "D.view(4, 3)", "(12,)"]),
    "dt_bias-shape": (dict(dt_bias=torch.randn(4, 3)), ValueError, ["dt_bias", "(h=4)", "(4, 3)"]),
    "z-dtype": (dict(z=torch.randn(2, 5, 4, 3, dtype=torch.float16)), TypeError, ["z", "float16"]),
    "states-shape": (dict(initial_states=torch.randn(2, 4, 3, 5)), ValueError,
                     ["initial_states", "(b=2, h=4, p=3, n=6)", "(2, 4, 3, 5)"]),
    "dt_limit-reversed": (dict(dt_limit=(0.1, 0.01)), ValueError, ["dt_limit", "lo <= hi", "(0.1, 0.01)"]),
    "dt_limit-not-a-pair": (dict(dt_limit=(0.1,)), ValueError, ["dt_limit", "pair", "(0.1,)"]),
    "dt_limit-nan": (dict(dt_limit=(float("nan"), 1.0)), ValueError, ["dt_limit", "lo <= hi"]),
    "x-int": (dict(x=torch.ones(2, 5, 4, 3, dtype=torch.int64)), TypeError, ["x", "floating", "int64"]),
    "B-not-tensor": (dict(B=[[1.0]]), TypeError, ["B", "torch.Tensor", "list"]),
    "device-mix": (dict(D=torch.randn(4, device="meta")), ValueError, ["D", "meta"]),
    "dt_softplus-not-bool": (dict(dt_softplus="no"), TypeError, ["dt_softplus", "bool", "'no'"]),
}


@pytest.mark.parametrize("change, exc, words", BAD_SCANS.values(), ids=BAD_SCANS.keys())
def test_scan_refuses_bad_input(change, exc, words):
    with pytest.raises(exc) as info:
        impls.ssd_scan(**scan_args(**change), chunk_size=4, impl="chunked")
    assert all(w in str(info.value) for w in words), str(info.value)


@pytest.mark.parametrize("chunk_size, exc", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_chunk_size_must_be_a_positive_integer(chunk_size, exc):
    with pytest.raises(exc, match="chunk_size"):
        impls.ssd_scan(**scan_args(), chunk_size=chunk_size)


BAD_STEPS = {
    "state-shape": (dict(state=torch.zeros(2, 4, 3, 5)), ValueError, ["state", "(b=2, h=4, p=3, n=6)"]),
    "state-dtype": (dict(state=torch.zeros(2, 4, 3, 6, dtype=torch.float64)), TypeError, ["state", "float64"]),
    "x-rank": (dict(x=torch.randn(2, 12)), ValueError, ["x", "rank 3"]),
    "B-groups": (dict(B=torch.randn(2, 3, 6)), ValueError, ["B", "divides h=4"]),
    "dt-shape": (dict(dt=torch.randn(2, 5)), ValueError, ["dt", "(b=2, h=4)"]),
    "D-shape": (dict(D=torch.randn(3, 4)), ValueError, ["D", "(h=4, p=3)"]),
    "dt_limit": (dict(dt_limit=(1.0, 0.0)), ValueError, ["dt_limit", "lo <= hi"]),
    "dt_softplus-not-bool": (dict(dt_softplus=1), TypeError, ["dt_softplus", "bool"]),
    "tied-A-n": (dict(A=-torch.ones(4, 3, 5)), ValueError, ["A", "n=6"]),
    # x's p (2) against the state's (3): x is checked against the state before z and D (h, p), and
    # the message names both shapes, since either may be the wrong one
    "x-p-against-state": (dict(x=torch.randn(2, 4, 2)), ValueError,
                          ["x: expected shape (b, h=4, p=3)", "state of shape (2, 4, 3, 6)", "state is not", "(2, 4, 2)"]),
    "x-p-against-state-and-D": (dict(x=torch.randn(2, 4, 2), z=None, D=torch.randn(4, 3)), ValueError,
                                ["x: expected shape (b, h=4, p=3)", "(2, 4, 2)"]),
}


@pytest.mark.parametrize("change, exc, words", BAD_STEPS.values(), ids=BAD_STEPS.keys())
def test_step_refuses_bad_input_and_leaves_state_untouched(change, exc, words):
    refused_leaving_state_untouched(impls.ssd_state_update, step_args(**change), exc, words)


def test_step_refuses_a_state_sharing_memory():
    args = step_args()
    buf = torch.zeros(2 * 4 * 3 * 6 + 2 * 4 * 3)
    state, x = buf[:144].view(2, 4, 3, 6), buf[144:].view(2, 4, 3)  # disjoint views of one buffer are fine
    state.copy_(args["state"]), x.copy_(args["x"])
    impls.ssd_state_update(**dict(args, state=state, x=x))
    aliased = torch.zeros(2, 4, 3, 6)
    before = aliased.clone()
    with pytest.raises(ValueError, match="state.*memory shared with z"):
        impls.ssd_state_update(**dict(args, state=aliased, z=aliased[..., 0]))
    with pytest.raises(ValueError, match="state.*internal overlap"):
        impls.ssd_state_update(**dict(args, state=torch.zeros(2, 4, 3, 1).expand(2, 4, 3, 6)))
    assert torch.equal(aliased, before)


def test_step_updates_state_in_place():
    args = step_args()
    before = args["state"].clone()
    impls.ssd_state_update(**args)
    assert not torch.equal(args["state"], before)


def test_unknown_implementation_and_missing_step_are_named():
    with pytest.raises(ValueError, match="unknown ssd implementation 'nope'; registered: loop, chunked"):
        impls.ssd_scan(**scan_args(), chunk_size=4, impl="nope")
    with pytest.raises(NotImplementedError, match="'chunked' has no step function"):
        impls.ssd_state_update(**step_args(), impl="chunked")


@pytest.mark.parametrize("name", ["loop", "chunked", "recurrent"])
def test_empty_sequence_passes_the_state_through(name):
    x = make_inputs(SSDCase(b=2, l=0, h=2, p=3, n=4, initial_states=True))
    out, state = impls.ssd_scan(**x, chunk_size=4, return_final_states=True, impl=name)
    assert out.shape == (2, 0, 2, 3) and torch.equal(state, x["initial_states"])


def test_undeclared_capability_is_refused_not_faked():
    impls.register("test-ssd-narrow", impls.get("loop", "ssd").scan, family="ssd", grouped=False, D_hp=False,
                   dt_limit=False, initial_states=False, dtypes=(torch.float32,))
    for change, words in [(dict(), "grouped"), (dict(D=torch.randn(4, 3)), r"D of shape \(h, p\)"),
                          (dict(dt_limit=(0.0, 1.0)), "dt_limit other than"), (dict(x=torch.randn(2, 5, 4, 3).double()), "float64")]:
        args = scan_args(**change)
        if "x" in change:
            args = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        with pytest.raises(NotImplementedError, match=words):
            impls.ssd_scan(**args, chunk_size=4, impl="test-ssd-narrow")
    with pytest.raises(NotImplementedError, match="gradients"):
        impls.ssd_scan(**scan_args(x=torch.randn(2, 5, 4, 3, requires_grad=True)), chunk_size=4, impl="recurrent")


def test_wrong_output_from_an_implementation_is_caught():
    impls.register("test-ssd-wrong-dtype", lambda x, *a: x.double(), family="ssd")
    with pytest.raises(RuntimeError, match="'test-ssd-wrong-dtype' returned out"):
        impls.ssd_scan(**scan_args(), chunk_size=4, impl="test-ssd-wrong-dtype")


def test_register_keeps_families_apart():
    with pytest.raises(TypeError, match="unknown capabilities"):
        impls.register("test-ssd-typo", impls.get("loop", "ssd").scan, family="ssd", initial_state=True)
    with pytest.raises(ValueError, match="unknown family"):
        impls.names(family="no_such_family")
    assert "chunked" in impls.names("ssd") and "chunked" not in impls.names()


def test_scan_names_x_given_as_b_h_l_p():
    """x (b, h, l, p) makes a correct A look wrong when h is read from x: x is the odd one out."""
    x = make_inputs(SSDCase(b=2, l=4, h=7, p=3, n=6))
    with pytest.raises(ValueError, match=r"^ssd_scan: x: expected shape \(b=2, l=4, h=7, p=3\), got \(2, 7, 4, 3\), "
                                         r"which looks \(b, h, l, p\), transposed: pass x\.transpose\(1, 2\)$"):
        impls.ssd_scan(**dict(x, x=x["x"].transpose(1, 2)), chunk_size=4)


def test_scan_names_x_on_another_device():
    x = make_inputs(CASE)
    with pytest.raises(ValueError, match=r"^ssd_scan: x: expected a tensor on cpu, the device of dt, A, B, C, D, z, "
                                         r"dt_bias, initial_states, got meta$"):
        impls.ssd_scan(**dict(x, x=x["x"].to("meta")), chunk_size=4)


def test_step_names_a_tied_A_on_another_device():
    """The tied form's values are compared: on another device that once failed inside torch
    (NotImplementedError from aten::equal on meta) instead of naming A."""
    r = torch.randn
    A = (-torch.rand(2, 1, 1)).expand(2, 2, 1).to("meta")
    with pytest.raises(ValueError, match=r"^ssd_state_update: A: expected a tensor on cpu, .* got meta$"):
        impls.ssd_state_update(r(1, 2, 2, 1), r(1, 2, 2), r(1, 2), A, r(1, 1, 1), r(1, 1, 1))


def test_step_names_a_state_given_as_b_h_n_p():
    """x and B agree on h, p and n; a state laid out (b, h, n, p) is named with its transpose, not x
    (the step checks x against the state first, which once blamed x)."""
    r = torch.randn
    state = r(2, 2, 3, 4)   # (b, h, p, n) = (2, 2, 3, 4)
    with pytest.raises(ValueError, match=r"^ssd_state_update: state: expected shape \(b, h=2, p=3, n=4\), got "
                                         r"\(2, 2, 4, 3\), which looks \(b, h, n, p\), transposed: pass state.transpose\(2, 3\)$"):
        impls.ssd_state_update(state.transpose(2, 3).contiguous(), r(2, 2, 3), r(2, 2), -torch.rand(2), r(2, 1, 4),
                               r(2, 1, 4))
