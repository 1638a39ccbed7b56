"""Mamba-3 MIMO: the implementations against the float64 loop, and MIMO's own properties.

Run: .venv/bin/pytest -q -p no:cacheprovider equivalence/mamba3/test_mimo.py
"""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings

import impls
from equivalence import properties
from equivalence.mamba3.cases import as_f64, case_strategy, check, inputs, magnitudes, tight, token, window
from equivalence.mamba3.cases import TIME_LAST, TIME_SECOND, Case
from equivalence.mamba3.cases import run as run_scan
from impls.mamba3 import chunked, loop, mamba3_mimo, mamba3_mimo_state_update, recurrent

# plain tests of their own, run when Mamba-3 MIMO is under test (--mamba3-mimo-impl, or no family chosen)
pytestmark = pytest.mark.family("mamba3_mimo")

SCANS = {
    "loop": loop.mamba3_mimo,
    "chunked": chunked.mamba3_mimo,
    "recurrent": recurrent.mimo_scan_by_stepping,
}


def mimo_strategy(dtypes=("f64", "f32"), max_l=10):
    return case_strategy(dtypes=dtypes, max_l=max_l, chunk_sizes=(1, 5), ranks=(1, 3))


def run(scan, args, case=None, **kw):
    return run_scan(scan, args, case.chunk_size if case else 4, **kw)


@pytest.mark.parametrize("name", ["chunked", "recurrent"])
@settings(max_examples=15, deadline=None)
@given(case=mimo_strategy())
def test_matches_float64_loop(name, case):
    """Outputs and all four final states within the tolerance policy (float64: rounding only)."""
    args = inputs(case)
    check(f"{name} {case.id}", run(SCANS[name], args, case), args, repro=repr(case))


@settings(max_examples=10, deadline=None)
@given(case=mimo_strategy(dtypes=("f64",)))
def test_magnitudes_bound_the_oracle(case):
    """The tolerance's scales (sums of |terms|) never fall below |oracle|: out, ssm, k and v states."""
    args = inputs(case)
    out, states, _ = magnitudes(args)
    oracle = loop.mamba3_mimo(**args, return_state=True)
    for s, o in zip((out, *states), (oracle[0], *oracle[2:])):
        assert (s >= o.abs() * (1 - 1e-12)).all()


@pytest.mark.parametrize("name", list(SCANS))
@settings(max_examples=6, deadline=None)
@given(case=mimo_strategy(dtypes=("f64",), max_l=8))
def test_split_and_continue(name, case):
    """Splitting at every point with all four states carried equals one call (the beta term's
    sum over r of v~_{t-1,r} k~_{t-1,r} crosses the split through the k (all ranks) and v states)."""
    args = inputs(case)
    whole = run(SCANS[name], args, case)
    for s in range(case.l + 1):
        first = run(SCANS[name], window(args, 0, s, args["Input_States"]), case)
        second = run(SCANS[name], window(args, s, case.l, tuple(first[1:])), case)
        tight(torch.cat((first[0], second[0]), 1), whole[0])
        for i, (x, y) in enumerate(zip(second[1:], whole[1:])):
            tight(x, y, angle=i == 0)


@settings(max_examples=6, deadline=None)
@given(case=mimo_strategy(dtypes=("f64",), max_l=8))
def test_prefill_then_decode(case):
    """The public chunked scan over a prefix, then the public step token by token, equals the scan;
    the step leaves the states it is given untouched."""
    args = inputs(case)
    whole = run(chunked.mamba3_mimo, args, case)
    s = case.l // 2
    _, *states = mamba3_mimo(**window(args, 0, s, args["Input_States"]), return_state=True, chunk_size=case.chunk_size)
    for t in range(s, case.l):
        given_states, before = tuple(states), [x.clone() for x in states]
        y, states = mamba3_mimo_state_update(**token(args, t), Input_States=given_states)
        tight(y, whole[0][:, t])
        assert all(torch.equal(a, b) for a, b in zip(given_states, before))
    for i, (x, y) in enumerate(zip(states, whole[1:])):
        tight(x, y, angle=i == 0)


@pytest.mark.parametrize("case", [Case(b=3, l=1, R=3, n=8, n_ang=3), Case(b=3, l=1, R=2, n=6, n_ang=1, norm=True,
                                                                         per_rank=True)], ids=lambda c: c.id)
def test_step_indexed_cache(case):
    """The serving form: with state_batch_indices the step advances slot idx[i] of a cache in place
    (k: (slots, R, h, n)), padding rows (-1) output zeros and touch no slot, the returned states are
    the cache itself, and the rows agree with the plain step on the same states."""
    args = inputs(case)
    tok, states = token(args, 0), args["Input_States"]
    y, new = mamba3_mimo_state_update(**tok, Input_States=states)
    cache = tuple(torch.randn(5, *s.shape[1:], dtype=s.dtype) for s in states)
    for c, s in zip(cache, states):
        c[4], c[1] = s[0], s[2]
    untouched = [c.clone() for c in cache]
    idx = torch.tensor([4, -1, 1], dtype=torch.int32)
    yi, returned = mamba3_mimo_state_update(**tok, Input_States=cache, state_batch_indices=idx)
    assert all(r is c for r, c in zip(returned, cache))
    tight(yi[[0, 2]], y[[0, 2]])
    assert torch.equal(yi[1], torch.zeros_like(yi[1]))
    for c, u, s in zip(cache, untouched, new):
        tight(c[4], s[0])
        tight(c[1], s[2])
        for slot in (0, 2, 3):
            assert torch.equal(c[slot], u[slot])


def test_decode_through_the_cache_equals_the_scan():
    """Prefill each row's sequence into its own slot, then decode token by token through the cache
    with the rows in another order and a padding row between them: each row's outputs and final
    states are the scan's (float64, to rounding)."""
    case = Case(b=2, l=6, R=2, n=6, n_ang=2, norm=True)
    args = inputs(case)
    whole = run(loop.mamba3_mimo, args, case)
    _, *pre = run(loop.mamba3_mimo, window(args, 0, 2, args["Input_States"]), case)
    cache = tuple(torch.zeros(4, *s.shape[1:], dtype=s.dtype) for s in pre)
    for c, s in zip(cache, pre):
        c[3], c[0] = s[0], s[1]               # row 0 in slot 3, row 1 in slot 0
    order = torch.tensor([1, 0, 0])           # the step's batch: row 1, row 0, a padding row (row 0's inputs)
    idx = torch.tensor([0, 3, -1], dtype=torch.int32)
    for t in range(2, case.l):
        tok = {k: v[order] if k in TIME_LAST + TIME_SECOND and v is not None else v for k, v in token(args, t).items()}
        y, _ = mamba3_mimo_state_update(**tok, Input_States=cache, state_batch_indices=idx)
        tight(y[0], whole[0][1, t])
        tight(y[1], whole[0][0, t])
        assert torch.equal(y[2], torch.zeros_like(y[2]))
    for i, (c, w) in enumerate(zip(cache, whole[1:])):
        tight(c[3], w[0], angle=i == 0)
        tight(c[0], w[1], angle=i == 0)
        assert torch.equal(c[1], torch.zeros_like(c[1])) and torch.equal(c[2], torch.zeros_like(c[2]))


def test_front_door_indexed_step():
    """The indexed step needs the cache, refuses a cache sharing memory with an input (touching
    nothing), a slot given twice, and a step registered without the capability."""
    args = _bad()
    tok = token(args, 0)
    cache = tuple(s.clone() for s in args["Input_States"])
    two = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="mamba3_mimo_state_update: Input_States"):
        mamba3_mimo_state_update(**tok, state_batch_indices=two)
    aliased = (*cache[:3], tok["V"])
    kept = [s.clone() for s in aliased]
    with pytest.raises(ValueError, match=r"Input_States\[3\] \(v\).*memory shared with V"):
        mamba3_mimo_state_update(**tok, Input_States=aliased, state_batch_indices=two)
    assert all(torch.equal(a, b) for a, b in zip(aliased, kept))
    with pytest.raises(ValueError, match="state_batch_indices"):
        mamba3_mimo_state_update(**tok, Input_States=cache, state_batch_indices=torch.tensor([1, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"Input_States\[2\] \(k\)"):   # a SISO-shaped k cache
        mamba3_mimo_state_update(**tok, Input_States=(*cache[:2], cache[2][:, 0], cache[3]), state_batch_indices=two)
    impls.register("test-unindexed", recurrent.mimo_scan_by_stepping, step=recurrent.mamba3_mimo_state_update,
                   family="mamba3_mimo", state_batch_indices=False)
    try:
        with pytest.raises(NotImplementedError, match="state_batch_indices"):
            mamba3_mimo_state_update(**tok, Input_States=cache, state_batch_indices=two, impl="test-unindexed")
    finally:
        impls.unregister("test-unindexed", family="mamba3_mimo")


def test_family_is_wired():
    """The shared properties run on MIMO: its module has the whole family contract."""
    assert properties.missing_contract("mamba3_mimo") == []


@pytest.mark.parametrize("name", list(SCANS))
def test_packed_equals_per_sequence(name):
    """cu_seqlens: each sequence scanned alone from its own initial states, lengths 0 and 1 included,
    chunks not multiples of the lengths; every sequence's final v state is its own last token."""
    lens = [3, 0, 7, 1, 9, 0]
    case = Case(b=1, l=sum(lens), R=3, n=8, n_ang=2, chunk_size=4)
    args = inputs(case, S=len(lens))
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)
    packed = run(SCANS[name], args, case, cu_seqlens=cu)
    for i, (s, e) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        alone = run(loop.mamba3_mimo, window(args, s, e, tuple(x[i:i + 1] for x in args["Input_States"])), case)
        tight(packed[0][:, s:e], alone[0])
        for j, (x, y) in enumerate(zip(packed[1:], alone[1:])):
            tight(x[i:i + 1], y, angle=j == 0)
        v_last = args["V"][0, e - 1] if e > s else args["Input_States"][3][i]
        assert torch.equal(packed[4][i], v_last)


@pytest.mark.parametrize("name", list(SCANS))
@pytest.mark.parametrize("states", [False, True], ids=["zero-states", "states"])
def test_length_one(name, states):
    """l = 1 (the official MIMO forward fails there): the scan equals the loop and the step, with
    and without input states; l = 0 returns the input states."""
    case = Case(b=2, l=1, R=3, n=8, n_ang=3, chunk_size=4, states=states)
    args = inputs(case)
    got, ref = run(SCANS[name], args, case), run(loop.mamba3_mimo, args, case)
    y, step_states = mamba3_mimo_state_update(**token(args, 0), Input_States=args["Input_States"])
    tight(got[0][:, 0], y)
    for i, (x, a, b) in enumerate(zip(got, ref, (got[0], *step_states))):
        tight(x, a, angle=i == 1)
        if i:
            tight(x, b, angle=i == 1)
    empty = run(SCANS[name], window(args, 0, 0, args["Input_States"]), case)
    assert empty[0].shape == (2, 0, case.h, case.p)
    if states:
        for x, s in zip(empty[1:], args["Input_States"]):
            assert torch.equal(x, s)


@pytest.mark.parametrize("name", list(SCANS))
def test_rank_one_is_siso_with_the_mimo_pairing(name):
    """R = 1 with MIMO_V = MIMO_Z = MIMO_Out = 1 is the SISO scan once Q, K, the biases and the
    states are permuted so that MIMO's pair (i, i + n/2) sits where SISO rotates (2i, 2i + 1)."""
    case = Case(b=2, l=9, R=1, h_qk=1, groups=2, p=3, n=8, n_ang=3, chunk_size=4)
    args = inputs(case)
    ones = torch.ones(case.h, 1, case.p, dtype=torch.float64)
    args.update(MIMO_V=ones, MIMO_Z=ones, MIMO_Out=ones)
    n = case.n
    perm = torch.stack((torch.arange(n // 2), torch.arange(n // 2) + n // 2), -1).flatten()  # SISO slot -> MIMO dim
    P = lambda x: x[..., perm]
    angle, ssm, k, v = args["Input_States"]
    siso = dict(Q=P(args["Q"][:, :, 0]), K=P(args["K"][:, :, 0]), V=args["V"], ADT=args["ADT"], DT=args["DT"],
                Trap=args["Trap"], Q_bias=P(args["Q_bias"][:, 0]), K_bias=P(args["K_bias"][:, 0]),
                Angles=args["Angles"], D=args["D"], Z=args["Z"], Input_States=(angle, P(ssm), P(k[:, 0]), v))
    want = {"loop": loop.mamba3_scan, "chunked": chunked.mamba3_scan, "recurrent": recurrent.scan_by_stepping}[name](
        **siso, chunk_size=4, return_final_states=True)
    got = run(SCANS[name], args, case)
    tight(got[0], want[0])
    tight(got[1], want[1], angle=True)
    tight(P(got[2]), want[2])
    tight(P(got[3][:, 0]), want[3])
    tight(got[4], want[4])


def test_rotation_pairs_hand_worked():
    """One token, n = 4, one angle theta, R = 1, worked by hand. q = e_0 rotates to
    q~ = (cos theta, 0, sin theta, 0) (pair (0, 2), not SISO's (0, 1)); the input k state e_2 (stored
    rotated, read as is) gives y = beta v_prev (q~ . e_2) + gamma v (q~ . k~) + D v with
    q~ . e_2 = sin theta; k = (1, 2, 3, 4) rotates to (cos - 3 sin, 2, sin + 3 cos, 4)."""
    f = torch.float64
    theta0, a, dt, adt, trap, v, v_prev, D = 0.4, 0.8, 0.5, -0.3, 0.6, 1.5, -2.0, 0.25
    t = lambda *x: torch.tensor(x, dtype=f)
    one = torch.ones(1, 1, 1, dtype=f)
    args = dict(Q=t(1, 0, 0, 0).view(1, 1, 1, 1, 4), K=t(1, 2, 3, 4).view(1, 1, 1, 1, 4), V=t(v).view(1, 1, 1, 1),
                ADT=t(adt).view(1, 1, 1), DT=t(dt).view(1, 1, 1), Trap=t(trap).view(1, 1, 1),
                Q_bias=torch.zeros(1, 1, 4, dtype=f), K_bias=torch.zeros(1, 1, 4, dtype=f), MIMO_V=one, MIMO_Z=one,
                MIMO_Out=one, Angles=t(a).view(1, 1, 1, 1), D=t(D), Z=None,
                Input_States=(t(theta0).view(1, 1, 1), torch.zeros(1, 1, 1, 4, dtype=f), t(0, 0, 1, 0).view(1, 1, 1, 4),
                              t(v_prev).view(1, 1, 1)))
    theta = theta0 + math.pi * math.tanh(a) * dt
    c, s = math.cos(theta), math.sin(theta)
    lam = 1 / (1 + math.exp(-trap))
    beta, gamma = (1 - lam) * dt * math.exp(adt), lam * dt
    k_rot = (c - 3 * s, 2.0, s + 3 * c, 4.0)
    y = beta * v_prev * s + gamma * v * (c * k_rot[0] + s * k_rot[2]) + D * v
    for name, scan in SCANS.items():
        out, angle, _, k, _ = scan(**args, chunk_size=1, return_state=True)
        torch.testing.assert_close(out.flatten(), t(y), rtol=0, atol=1e-14, msg=name)
        torch.testing.assert_close(angle.flatten(), t(theta), rtol=0, atol=1e-14, msg=name)
        torch.testing.assert_close(k.flatten(), t(*k_rot), rtol=0, atol=1e-14, msg=name)


@pytest.mark.parametrize("name", list(SCANS))
def test_rank_outputs_contract_to_out(name):
    """MIMO_Out = None returns y per rank (after the norm and gate); sum_r MIMO_Out[r] * y_r is out."""
    case = Case(b=2, l=6, R=3, n=6, n_ang=2, norm=True)
    args = inputs(case)
    out = run(SCANS[name], args, case)[0]
    per_rank = run(SCANS[name], dict(args, MIMO_Out=None), case)[0]
    assert per_rank.shape == (2, 6, 3, case.h, case.p)
    tight((per_rank * args["MIMO_Out"].transpose(0, 1)).sum(2), out)


def test_gradients_chunked_match_loop():
    """Autograd through the chunked MIMO scan, every input (the projections, the norm weight and the
    four states included), against the loop's (float64)."""
    case = Case(b=2, l=7, R=2, n=6, n_ang=2, chunk_size=3, norm=True)
    args = as_f64(inputs(case))
    grads = {}
    for name in ("loop", "chunked"):
        leaf = lambda v: v.clone().requires_grad_() if isinstance(v, torch.Tensor) else v
        leaves = {k: tuple(map(leaf, v)) if isinstance(v, tuple) else leaf(v) for k, v in args.items()}
        out = run(SCANS[name], leaves, case)
        w = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=w, dtype=torch.float64)).sum() for o in (out[0], *out[2:]))
        flat = [v for k, v in leaves.items() if isinstance(v, torch.Tensor)] + list(leaves["Input_States"])
        grads[name] = torch.autograd.grad(loss, flat)
    for a, b in zip(grads["chunked"], grads["loop"]):
        tight(a, b)


# ---- the front door ---------------------------------------------------------------------------

def _bad(**change):
    args = inputs(Case(b=2, l=5, R=2, h_qk=1, groups=2, n=4, n_ang=2, dtype="f32", norm=True))
    for k, v in change.items():
        args[k] = v(args) if callable(v) else v
    return args


FRONT_DOOR = [
    ("Q without R", dict(Q=lambda a: a["Q"][:, :, 0]), ValueError, "Q"),
    ("K rank mismatch", dict(K=lambda a: a["K"][:, :, :1]), ValueError, "K"),
    ("Q_bias SISO shape", dict(Q_bias=lambda a: a["Q_bias"][:, 0]), ValueError, "Q_bias"),
    ("K_bias wrong R", dict(K_bias=lambda a: a["K_bias"][:, :1]), ValueError, "K_bias"),
    ("MIMO_V missing", dict(MIMO_V=None), TypeError, "MIMO_V"),
    ("MIMO_V shape", dict(MIMO_V=lambda a: a["MIMO_V"][..., :2]), ValueError, "MIMO_V"),
    ("MIMO_Out wrong R", dict(MIMO_Out=lambda a: a["MIMO_Out"][:, :1]), ValueError, "MIMO_Out"),
    ("MIMO_Z missing with Z", dict(MIMO_Z=None), ValueError, "MIMO_Z"),
    ("MIMO_Z dtype", dict(MIMO_Z=lambda a: a["MIMO_Z"].half()), TypeError, "MIMO_Z"),
    ("norm weight shape", dict(outproj_norm_weight=lambda a: a["outproj_norm_weight"][:, :2]), ValueError,
     "outproj_norm_weight"),
    ("norm weight without norm", dict(fuse_pregate_headwise_rms_norm=False), ValueError, "outproj_norm_weight"),
    ("norm flag not bool", dict(fuse_pregate_headwise_rms_norm="yes"), TypeError, "fuse_pregate_headwise_rms_norm"),
    ("n_ang > n/2", dict(Angles=lambda a: torch.zeros(2, 5, 2, 3)), ValueError, "Angles"),
    ("n odd", dict(Q=lambda a: a["Q"][..., :3], K=lambda a: a["K"][..., :3]), ValueError, "Q"),
    ("k state without R", dict(Input_States=lambda a: (*a["Input_States"][:2], a["Input_States"][2][:, 0],
                                                       a["Input_States"][3])), ValueError, "(k)"),
    ("three states", dict(Input_States=lambda a: a["Input_States"][:3]), TypeError, "Input_States"),
]


@pytest.mark.parametrize("label,change,exc,arg", FRONT_DOOR, ids=[f[0] for f in FRONT_DOOR])
def test_front_door_mimo(label, change, exc, arg):
    with pytest.raises(exc, match=f"mamba3_mimo: .*{arg}"):
        mamba3_mimo(**_bad(**change))


def test_front_door_mimo_options_and_step():
    args = _bad()
    with pytest.raises(ValueError, match="rotary_dim_divisor"):
        mamba3_mimo(**args, rotary_dim_divisor=4)     # n = 4, n_ang = 2: the divisor is 2
    mamba3_mimo(**args, rotary_dim_divisor=2)
    with pytest.raises(TypeError, match="dtype"):
        mamba3_mimo(**args, dtype="bf16")
    with pytest.raises(ValueError, match="outproj_norm_eps"):
        mamba3_mimo(**args, outproj_norm_eps=-1.0)
    with pytest.raises(TypeError, match="return_state"):
        mamba3_mimo(**args, return_state=1)
    with pytest.raises(ValueError, match="cu_seqlens"):
        mamba3_mimo(**args, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))  # b = 2
    with pytest.raises(ValueError, match="impl"):
        mamba3_mimo(**args, impl="nope")
    tok = token(args, 0)
    with pytest.raises(ValueError, match="mamba3_mimo_state_update: Q"):
        mamba3_mimo_state_update(**dict(tok, Q=tok["Q"][:, 0]), Input_States=args["Input_States"])
    with pytest.raises(ValueError, match=r"mamba3_mimo_state_update: Input_States\[2\] \(k\)"):
        mamba3_mimo_state_update(**tok, Input_States=(*args["Input_States"][:2], args["Input_States"][2][:, :1],
                                                      args["Input_States"][3]))
