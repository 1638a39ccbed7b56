"""Bad input is refused at the front door, with a message naming the argument; odd-but-valid input works."""

import pytest
import torch

import impls
from .selective import Case, make_inputs


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
    "u-delta-in-b-l-d": (dict(u=torch.randn(2, 5, 6), delta=torch.rand(2, 5, 6)), ValueError,
                         ["u: expected shape (b=2, d=6, l=5), got (2, 5, 6), which looks (b, l, d)", "u.transpose(1, 2)",
                          "(delta holds its sizes in another order too)"]),
    "A-transposed": (dict(A=-torch.rand(4, 6)), ValueError, ["A: expected shape (d=6, n=4)", "transposed", "(4, 6)"]),
}


@pytest.mark.parametrize("change, exc, words", BAD_SCANS.values(), ids=BAD_SCANS.keys())
@pytest.mark.parametrize("name", ["loop", "recurrent"])
def test_scan_refuses_bad_input(name, change, exc, words):
    with pytest.raises(exc) as info:
        impls.selective_scan(**scan_args(**change), impl=name)
    assert all(w in str(info.value) for w in words), str(info.value)


BAD_STEPS = {
    "state-shape": (dict(state=torch.zeros(2, 6, 5)), ValueError, ["state", "(b=2, d=6, n=4)"]),
    "state-transposed": (dict(state=torch.zeros(2, 4, 6)), ValueError, ["state: expected shape (b=2, d=6, n=4)",
                                                                        "looks (b, n, d)", "(2, 4, 6)"]),
    "state-dtype": (dict(state=torch.zeros(2, 6, 4, dtype=torch.float64)), TypeError, ["state", "float64"]),
    "x-rank": (dict(x=torch.randn(2, 6, 1)), ValueError, ["x", "rank 2"]),
    "B-groups": (dict(B=torch.randn(2, 5, 4)), ValueError, ["B", "divides d=6"]),
    "dt-shape": (dict(dt=torch.randn(2, 5)), ValueError, ["dt", "(b=2, d=6)"]),
}


def refused_leaving_state_untouched(step, args, exc, words):
    """step(**args) raises exc with every one of words in its message, and args["state"] is unchanged
    (every family's step: a refused call writes nothing)."""
    before = args["state"].clone()
    with pytest.raises(exc) as info:
        step(**args)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert torch.equal(args["state"], before)


@pytest.mark.parametrize("change, exc, words", BAD_STEPS.values(), ids=BAD_STEPS.keys())
def test_step_refuses_bad_input_and_leaves_state_untouched(change, exc, words):
    refused_leaving_state_untouched(impls.selective_state_update, step_args(**change), exc, words)


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


# ---- aliasing: an argument written in place must own its memory ------------------------------------

def _expanded_state():
    """Every channel's state is one shared row (a broadcast view): each channel's update would land there."""
    return torch.full((2, 1, 4), 0.5).expand(2, 6, 4)


def _state_inside(name):
    """state and another argument as views of one buffer, overlapping."""
    def change(args):
        buf = torch.zeros(2, 6, 4)
        other = {"x": buf[:, :, 0], "dt": buf[:, :, 1], "B": buf[:, 0, :], "C": buf[:, 1, :]}[name]
        other.copy_(args[name])
        return dict(state=buf, **{name: other})
    return change


ALIASED = {
    "state-expanded": (lambda args: dict(state=_expanded_state()), "internal overlap"),
    "state-as_strided": (lambda args: dict(state=torch.zeros(50).as_strided((2, 6, 4), (1, 4, 1))), "internal overlap"),
    "state-shares-x": (_state_inside("x"), "shared with x"),
    "state-shares-dt": (_state_inside("dt"), "shared with dt"),
    "state-shares-B": (_state_inside("B"), "shared with B"),
    "state-shares-C": (_state_inside("C"), "shared with C"),
}


PLUGGED_CALLS = []  # calls that reached the plugged-in step below: there must be none


def _plugged_in():
    """A step from outside the package, registered as a user would: the front door guards it too."""
    if "test-plugged-step" not in impls.names():
        impls.register("test-plugged-step", impls.get("loop").scan, step=lambda *a: PLUGGED_CALLS.append(a))
    return "test-plugged-step"


@pytest.mark.parametrize("change, words", ALIASED.values(), ids=ALIASED.keys())
@pytest.mark.parametrize("name", [n for n in impls.names() if impls.get(n).step is not None] + ["plugged-in"])
def test_step_refuses_a_state_that_shares_memory_before_anything_runs(name, change, words):
    name = _plugged_in() if name == "plugged-in" else name
    ran = PLUGGED_CALLS
    args = step_args()
    args.update(change(args))
    state = args["state"]
    before = state.clone()
    with pytest.raises(ValueError) as info:
        impls.selective_state_update(**args, impl=name)
    assert "selective_state_update: state:" in str(info.value) and words in str(info.value), str(info.value)
    assert torch.equal(state, before) and not ran


def test_disjoint_views_of_one_buffer_are_accepted():
    """Views that interleave without sharing an element, and odd strides that do not overlap, pass."""
    from impls.frontdoor import check_no_overlap

    buf = torch.zeros(2, 6, 8)
    check_no_overlap("f", dict(state=buf[..., ::2]), dict(x=buf[..., 1::2], other=buf[:1, :1, 1]))
    check_no_overlap("f", dict(state=torch.zeros(20).as_strided((3, 2), (2, 3))), {})   # offsets 0 3 2 5 4 7
    check_no_overlap("f", dict(state=torch.zeros(0, 3).expand(0, 3)), dict(x=None))
    with pytest.raises(ValueError, match="f: state: .*shared with out"):
        check_no_overlap("f", dict(state=buf[..., :4], out=buf[..., 3:5]), {})


def test_step_is_refused_when_its_state_overlaps_after_a_cached_signature():
    """The step's checks are cached by the arguments' signature; memory is checked on every call."""
    args = step_args()
    impls.selective_state_update(**args)        # this signature passes and is remembered
    buf = torch.zeros(2, 6, 4)
    aliased = dict(args, state=buf, x=buf[:, :, 0])
    with pytest.raises(ValueError, match="state: .*shared with x"):
        impls.selective_state_update(**aliased)


def test_step_blames_the_argument_that_disagrees_with_state():
    """Sizes come from a fixed order (the step: b and d from state, the argument it writes, n from
    A); the argument that disagrees is named, with where the size came from. The newcomer's case:
    state (1, 4, 3), A (4, 3), x (1, 5) blamed A."""
    args = dict(state=torch.zeros(1, 4, 3), x=torch.randn(1, 5), dt=torch.randn(1, 4), A=-torch.ones(4, 3),
                B=torch.randn(1, 3), C=torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"^selective_state_update: x: expected shape \(b=1, d=4\) as state has "
                                         r"d = 4, got \(1, 5\)$"):
        impls.selective_state_update(**args, impl="recurrent")


@pytest.mark.parametrize("change, message", [
    (dict(A=-torch.ones(5, 4)), r"A: expected shape \(d=6, n=4\) as u has d = 6, got \(5, 4\)"),
    (dict(B=torch.randn(2, 3, 5)), r"B: expected shape \(b=2, n=4, l=5\) as A has n = 4, got \(2, 3, 5\)"),
    (dict(z=torch.randn(2, 6, 4)), r"z: expected shape \(b=2, d=6, l=5\) as u has l = 5, got \(2, 6, 4\)"),
])
def test_scan_names_where_each_size_came_from(change, message):
    """The scan takes b, d and l from u and n from A (impls/selective/frontdoor.py)."""
    with pytest.raises(ValueError, match=message):
        impls.selective_scan(**scan_args(**change), impl="loop")


@pytest.mark.parametrize("flag", ["yes", "no", 1, torch.tensor(True), None])
def test_softplus_flags_must_be_bools(flag):
    """delta_softplus / dt_softplus read by truthiness would take "no" as True: a TypeError naming
    the argument instead, before anything runs (the step's state untouched)."""
    with pytest.raises(TypeError, match=r"^selective_scan: delta_softplus: expected a bool"):
        impls.selective_scan(**scan_args(delta_softplus=flag), impl="loop")
    args = step_args(dt_softplus=flag)
    before = args["state"].clone()
    with pytest.raises(TypeError, match=r"^selective_state_update: dt_softplus: expected a bool"):
        impls.selective_state_update(**args)
    assert torch.equal(args["state"], before)


# ---- the odd one out: sizes and devices are those the arguments agree on ---------------------------

def _time_axis_second(x):
    """x with every time-axis input in the model's layout: u, delta, z (b, l, d); B, C (b, l, n) or (b, l, g, n)."""
    return dict(x, **{k: x[k].movedim(-1, 1) for k in ("u", "delta", "z", "B", "C") if x.get(k) is not None})


@pytest.mark.parametrize("g, extras", [(0, False), (0, True), (2, True)], ids=["minimal", "D-z-bias", "grouped"])
def test_scan_names_a_layout_mistake_made_consistently(g, extras):
    """u, delta, B and C all given (b, l, ...): read that way they agree with A (d, n), so A is not
    blamed; u is named, with its transpose, and the other misplaced arguments listed."""
    x = make_inputs(Case(b=2, d=4, n=3, l=10, g=g, D=extras, z=extras, delta_bias=extras))
    with pytest.raises(ValueError) as info:
        impls.selective_scan(**_time_axis_second(x), impl="loop")
    message = str(info.value)
    assert message.startswith("selective_scan: u: expected shape (b=2, d=4, l=10), got (2, 10, 4), which looks "
                              "(b, l, d), transposed: pass u.transpose(1, 2)"), message
    misplaced = ["delta", "B", "C", "z"] if extras else ["delta", "B", "C"]
    assert message.endswith(f"({', '.join(misplaced)} hold their sizes in another order too)"), message


def test_scan_names_the_argument_the_others_disagree_with():
    """A u whose d no other argument has is named, not the A that agrees with delta, D, z and delta_bias."""
    with pytest.raises(ValueError, match=r"^selective_scan: u: expected shape \(b=2, d=6, l=5\) as A has d = 6, "
                                         r"got \(2, 7, 5\)$"):
        impls.selective_scan(**scan_args(u=torch.randn(2, 7, 5)), impl="loop")


@pytest.mark.parametrize("arg", ["u", "delta", "C"])
def test_scan_names_the_argument_on_another_device(arg):
    """The device is the one the tensors share, not the first input's: a lone u on meta is u's fault."""
    args = scan_args()
    args[arg] = args[arg].to("meta")
    others = ", ".join(k for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias") if k != arg)
    with pytest.raises(ValueError) as info:
        impls.selective_scan(**args, impl="loop")
    assert str(info.value) == f"selective_scan: {arg}: expected a tensor on cpu, the device of {others}, got meta"
