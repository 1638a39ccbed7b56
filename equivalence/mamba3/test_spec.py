"""Mamba-3 (SISO): the implementations against the float64 loop, and the family's own properties.

Run: .venv/bin/pytest -q -p no:cacheprovider equivalence/mamba3
"""

import dataclasses
import itertools
import math

import pytest
import torch
from hypothesis import given, settings

import impls
from equivalence.mamba3.cases import Case, as_f64, case_strategy, check, inputs, tight, token, window
from equivalence.mamba3.cases import run as run_scan
from equivalence.mamba3 import test_mimo
from impls.mamba3 import chunked, loop, mamba3_scan, mamba3_state_update, recurrent

# the family's plain tests of its own: in a run with no implementation named (they run none of them)
pytestmark = pytest.mark.family("mamba3")

SCANS = {
    "loop": loop.mamba3_scan,
    "chunked": chunked.mamba3_scan,
    "recurrent": recurrent.scan_by_stepping,
}


def run(scan, args, case=None, **kw):
    return run_scan(scan, args, case.chunk_size if case else 4, **kw)


@pytest.mark.parametrize("name", ["chunked", "recurrent"])
@settings(max_examples=20)
@given(case=case_strategy())
def test_matches_float64_loop(name, case):
    """Outputs and all four final states within the tolerance policy (float64: rounding only)."""
    args = inputs(case)
    check(f"{name} {case.id}", run(SCANS[name], args, case), args, repro=repr(case))


@pytest.mark.parametrize("name", list(SCANS))
@settings(max_examples=8)
@given(case=case_strategy(dtypes=("f64",), max_l=10))
def test_split_and_continue(name, case):
    """Splitting at every point with all four states carried equals one call (the trapezoid's
    beta term crosses the split through the k and v states)."""
    args = inputs(case)
    whole = run(SCANS[name], args, case)
    for s in range(case.l + 1):
        first = run(SCANS[name], window(args, 0, s, args["Input_States"]), case)
        second = run(SCANS[name], window(args, s, case.l, tuple(first[1:])), case)
        tight(torch.cat((first[0], second[0]), 1), whole[0])
        for i, (x, y) in enumerate(zip(second[1:], whole[1:])):
            tight(x, y, angle=i == 0)


@settings(max_examples=8)
@given(case=case_strategy(dtypes=("f64",), max_l=10))
def test_prefill_then_decode(case):
    """The chunked scan over a prefix, then the public step token by token, equals the scan."""
    args = inputs(case)
    whole = run(chunked.mamba3_scan, args, case)
    s = case.l // 2
    pre = window(args, 0, s, args["Input_States"])
    _, *states = mamba3_scan(**pre, return_final_states=True, chunk_size=case.chunk_size)
    for t in range(s, case.l):
        tok = token(args, t)
        given_states, before = tuple(states), [x.clone() for x in states]
        y, states = mamba3_state_update(**tok, Input_States=given_states)
        tight(y, whole[0][:, t])
        assert all(torch.equal(a, b) for a, b in zip(given_states, before))  # inputs untouched
    for i, (x, y) in enumerate(zip(states, whole[1:])):
        tight(x, y, angle=i == 0)


def test_step_leaves_inputs_untouched_and_indexed_cache():
    """The plain step returns new tensors; the indexed step advances slot idx[i] in place, padding
    rows (-1) output zeros and touch no slot, and agrees with the plain step on the rows' slots."""
    case = Case(b=3, l=1, states=True)
    args = inputs(case)
    tok = token(args, 0)
    states = args["Input_States"]
    kept = [s.clone() for s in states]
    y, new = mamba3_state_update(**tok, Input_States=states)
    assert all(torch.equal(a, b) for a, b in zip(states, kept))
    assert all(a is not b for a, b in zip(new, states))
    # a cache of 5 slots; rows 0 and 2 in slots 4 and 1, row 1 padding
    cache = tuple(torch.randn(5, *s.shape[1:], dtype=s.dtype) for s in states)
    for c, s in zip(cache, states):
        c[4], c[1] = s[0], s[2]
    untouched = [c.clone() for c in cache]
    idx = torch.tensor([4, -1, 1], dtype=torch.int32)
    yi, _ = mamba3_state_update(**tok, Input_States=cache, state_batch_indices=idx)
    tight(yi[[0, 2]], y[[0, 2]])  # a smaller batch may round differently (another matmul path)
    assert torch.equal(yi[1], torch.zeros_like(yi[1]))
    for c, u, s in zip(cache, untouched, new):
        tight(c[4], s[0])
        tight(c[1], s[2])
        for slot in (0, 2, 3):
            assert torch.equal(c[slot], u[slot])


@pytest.mark.parametrize("name", list(SCANS))
def test_packed_equals_per_sequence(name):
    """cu_seqlens: each sequence scanned alone from its own initial states, lengths 0 and 1 included,
    chunks not multiples of the lengths (the loop run per sequence is the oracle)."""
    lens = [3, 0, 7, 1, 9, 0]
    case = Case(b=1, l=sum(lens), chunk_size=4)
    args = inputs(case, S=len(lens))
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)
    packed = run(SCANS[name], args, case, cu_seqlens=cu)
    for i, (s, e) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        one = window(args, s, e, tuple(x[i:i + 1] for x in args["Input_States"]))
        alone = run(loop.mamba3_scan, one, case)
        tight(packed[0][:, s:e], alone[0])
        for j, (x, y) in enumerate(zip(packed[1:], alone[1:])):
            tight(x[i:i + 1], y, angle=j == 0)


@pytest.mark.parametrize("name", list(SCANS))
def test_cross_family_equals_ssd_loop(name):
    """lambda = 1 (Trap = +inf), no rotation (n_ang = 0 and zero angles), zero biases and ADT = A DT
    is Mamba-2's SSD: Q plays C, K plays B, V plays x, h_qk plays g."""
    case = Case(b=2, l=9, h_qk=2, groups=2, p=3, n=4, n_ang=2, states=False)
    args = as_f64(inputs(case))
    A = -torch.rand(case.h, dtype=torch.float64) * 2
    args.update(Trap=torch.full_like(args["Trap"], math.inf), Angles=torch.zeros_like(args["Angles"]),
                Q_bias=torch.zeros_like(args["Q_bias"]), K_bias=torch.zeros_like(args["K_bias"]),
                ADT=A[None, :, None] * args["DT"])
    out = run(SCANS[name], args, case)[0]
    ssd = impls.get("loop", family="ssd").scan
    ref = ssd(args["V"], args["DT"].transpose(1, 2), A, args["K"], args["Q"], 4, D=args["D"], z=args["Z"])
    tight(out, ref)


def test_rotation_invariants():
    """2 pi added to the angle state changes nothing; rotating both q and k (an angle state shift at
    the first token, with zero ssm, k and v states) leaves q~ . k~ and so the output unchanged;
    n_ang pairs equal n/2 pairs whose extra angles are zero (pairs past n_ang are left alone)."""
    case = Case(b=2, l=6, n=8, n_ang=2, chunk_size=4)
    args = as_f64(inputs(case))
    base = run(chunked.mamba3_scan, args, case)
    turned = dict(args, Input_States=(args["Input_States"][0] + 2 * math.pi, *args["Input_States"][1:]))
    torch.testing.assert_close(run(chunked.mamba3_scan, turned, case)[0], base[0], rtol=0, atol=1e-12)

    one = window(args, 0, 1)
    ang, ssm, k, v = args["Input_States"]
    zero = (ang, torch.zeros_like(ssm), torch.zeros_like(k), torch.zeros_like(v))
    shifted = (ang + torch.rand_like(ang) * 6, *zero[1:])
    a = run(loop.mamba3_scan, dict(one, Input_States=zero), case)[0]
    b = run(loop.mamba3_scan, dict(one, Input_States=shifted), case)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)

    full = dict(args, Angles=torch.cat((args["Angles"], torch.zeros(2, 6, case.h, 2, dtype=torch.float64)), -1),
                Input_States=(torch.cat((ang, torch.zeros(2, case.h, 2, dtype=torch.float64)), -1), ssm, k, v))
    wide = run(loop.mamba3_scan, full, case)
    torch.testing.assert_close(wide[0], base[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(wide[1][..., :2], base[1], rtol=0, atol=1e-12)


def test_hand_worked_l1_l2():
    """One head, p = 1, n = 2, one angle, worked by hand. Token 1: y1 = gamma1 v1 (q1 . k1) + D v1 (the
    rotation cancels in q~1 . k~1). Token 2: y2 = (alpha2 gamma1 + beta2) v1 (q~2 . k~1) + gamma2 v2
    (q2 . k2) + D v2, where q~2 . k~1 = q2^T Rot(theta1 - theta2) k1, i.e. with q2 = k1 = (1, 0),
    cos(phi2), phi2 = pi tanh(a2) dt2 the second token's angle increment."""
    f = torch.float64
    t = lambda *x: torch.tensor(x, dtype=f)
    q1, q2, k1, k2 = (1.0, 2.0), (1.0, 0.0), (1.0, 0.0), (0.5, -1.0)
    v1, v2, dt1, dt2, adt2, tr1, tr2, a1, a2, D = 2.0, -1.0, 0.3, 0.5, -0.4, 0.7, -0.2, 0.9, -0.6, 0.25
    args = dict(Q=t(q1, q2).view(1, 2, 1, 2), K=t(k1, k2).view(1, 2, 1, 2), V=t(v1, v2).view(1, 2, 1, 1),
                ADT=t(-0.1, adt2).view(1, 1, 2), DT=t(dt1, dt2).view(1, 1, 2), Trap=t(tr1, tr2).view(1, 1, 2),
                Q_bias=torch.zeros(1, 2, dtype=f), K_bias=torch.zeros(1, 2, dtype=f),
                Angles=t(a1, a2).view(1, 2, 1, 1), D=t(D), Z=None)
    sig = lambda x: 1 / (1 + math.exp(-x))
    g1, g2 = sig(tr1) * dt1, sig(tr2) * dt2
    beta2 = (1 - sig(tr2)) * dt2 * math.exp(adt2)
    phi2 = math.pi * math.tanh(a2) * dt2
    y1 = g1 * v1 * (q1[0] * k1[0] + q1[1] * k1[1]) + D * v1
    y2 = (math.exp(adt2) * g1 + beta2) * v1 * math.cos(phi2) + g2 * v2 * (q2[0] * k2[0] + q2[1] * k2[1]) + D * v2
    theta2 = (math.pi * math.tanh(a1) * dt1 + phi2) % (2 * math.pi)
    for name, scan in SCANS.items():
        out, angle, ssm, k, v = scan(**args, chunk_size=1 if name == "chunked" else 64, return_final_states=True)
        torch.testing.assert_close(out.flatten(), t(y1, y2), rtol=0, atol=1e-14, msg=name)
        torch.testing.assert_close(angle.flatten(), t(theta2), rtol=0, atol=1e-14, msg=name)
        torch.testing.assert_close(v.flatten(), t(v2), rtol=0, atol=0, msg=name)
        c, s = math.cos(theta2), math.sin(theta2)
        torch.testing.assert_close(k.flatten(), t(k2[0] * c - k2[1] * s, k2[0] * s + k2[1] * c), rtol=0, atol=1e-14)


def gradients(scan, args, case, **kw):
    """Autograd's gradients of every floating input, the four states included, of a fixed random
    functional of the output and the final ssm, k and v states (float64 args)."""
    leaves = {k: (v if not isinstance(v, (torch.Tensor, tuple)) or (isinstance(v, torch.Tensor) and not v.is_floating_point())
                  else tuple(s.clone().requires_grad_() for s in v) if k == "Input_States"
                  else v.clone().requires_grad_()) for k, v in args.items() if v is not None}
    out = run(scan, leaves, case, **kw)
    w = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=w, dtype=torch.float64)).sum() for o in (out[0], *out[2:]))
    flat = [v for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad] + list(leaves["Input_States"])
    return torch.autograd.grad(loss, flat)


def test_gradients_chunked_match_loop():
    """Autograd through the chunked scan, every input including the four states, against the loop's (float64)."""
    case = Case(b=2, l=7, h_qk=1, groups=2, n=4, n_ang=1, chunk_size=3)
    args = as_f64(inputs(case))
    for a, b in zip(gradients(SCANS["chunked"], args, case), gradients(SCANS["loop"], args, case)):
        tight(a, b)


# The chunked scan runs a few chunks at a time (BLOCK_TOKENS tokens, GRAD_BLOCK_TOKENS under autograd),
# carrying (angle, H', k~, v) from block to block, and makes the per-token scalars SCALAR_TOKENS at a
# time. The drawn cases are shorter than one block, so here the blocks are made one or two chunks long.
BLOCK_SETTINGS = ("BLOCK_TOKENS", "GRAD_BLOCK_TOKENS", "SCALAR_TOKENS")


def blocks_match_loop(interface, chunks_per_block, monkeypatch):
    """Values, final states and gradients of the chunked scan in blocks of ``chunks_per_block`` chunks
    against the float64 loop's: one call of 2 sequences of 23 tokens (chunks of 3, the last one short),
    and a pack of sequences of 5, 0, 1 and 17 tokens."""
    mimo = interface == "mimo"
    scans = test_mimo.SCANS if mimo else SCANS
    case = Case(b=2, l=23, groups=2, n=4, n_ang=2, chunk_size=3, R=2 if mimo else None)
    for name in BLOCK_SETTINGS:
        monkeypatch.setattr(chunked, name, chunks_per_block * case.chunk_size)
    lens = [5, 0, 1, 17]
    packed = dataclasses.replace(case, b=1, l=sum(lens))
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)
    for c, args, kw in ((case, inputs(case), {}), (packed, inputs(packed, S=len(lens)), dict(cu_seqlens=cu))):
        for j, (a, b) in enumerate(zip(run(scans["chunked"], args, c, **kw), run(scans["loop"], args, c, **kw))):
            tight(a, b, angle=j == 1)
        for a, b in zip(gradients(scans["chunked"], args, c, **kw), gradients(scans["loop"], args, c, **kw)):
            tight(a, b)


@pytest.mark.parametrize("chunks_per_block", [1, 2])
@pytest.mark.parametrize("interface", ["siso", "mimo"])
def test_blocks_match_loop(interface, chunks_per_block, monkeypatch):
    blocks_match_loop(interface, chunks_per_block, monkeypatch)


def test_blocks_planted_bug(monkeypatch):
    """Per-token scalars made a window at a time that drop the token after their window where a whole
    chunk follows (its delta, as if the sequence ended there) are caught with small blocks, and unseen
    with the default blocks at the drawn cases' lengths (one window, followed by no whole chunk)."""
    defaults = {name: getattr(chunked, name) for name in BLOCK_SETTINGS}
    block_scalars = chunked.block_scalars
    monkeypatch.setattr(chunked, "block_scalars", lambda ADT, DT, Trap, t0, t1, e, T, f: block_scalars(
        ADT, DT, Trap, t0, t1, t1 if e - t1 >= T else e, T, f))
    with pytest.raises(AssertionError):
        blocks_match_loop("siso", 1, monkeypatch)
    for name, value in defaults.items():
        monkeypatch.setattr(chunked, name, value)
    case = Case(b=2, l=40, groups=2, n=4, n_ang=2, chunk_size=3)
    args = inputs(case)
    for j, (a, b) in enumerate(zip(run(SCANS["chunked"], args, case), run(SCANS["loop"], args, case))):
        tight(a, b, angle=j == 1)


@pytest.mark.parametrize("workspace", [True, False], ids=["workspace", "autograd"])
@pytest.mark.parametrize("column", [False, True], ids=["E", "E-coef"])
@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 6, 12, 17, 36, 64, 100])
def test_segment_decays_match_their_definition(T, column, workspace):
    """chunked.segment_decays (exp of each within-chunk segment sum, formed by sub-blocks of
    decay_block(T) tokens, optionally times a column factor coef_s) against the definition
    exp(a_{s+1} + ... + a_t) (coef_s) in float64 on and below the diagonal (above it a finite
    placeholder), on float32 decays: within a relative eps32 (2 K + 3 + (G + K) sum_{s<r<=t} |a_r|),
    K sub-blocks of G tokens (each sum over at most G terms, the sum between sub-blocks over at most
    K of them; three exps, the factor and two products). A term too many or too few is off by
    |a_r| (at least 0.05 here), which that bound rejects. A NaN, inf or -inf decay reaches exactly
    the entries whose segment holds it (NaN where the definition has NaN)."""
    g = torch.Generator().manual_seed(T)
    a = -(0.05 + torch.rand(2, 3, 2, T, generator=g))                        # (b, h, C, T)
    coef = 0.5 + torch.rand(a.shape, generator=g) if column else None
    ws = chunked.Workspace(a.device) if workspace else chunked.NO_WORKSPACE
    G = chunked.decay_block(T)
    t, s = torch.arange(T)[:, None], torch.arange(T)[None, :]
    span = (s < torch.arange(T)[:, None, None]) & (torch.arange(T)[:, None, None] <= t)   # [r, t, s]: s < r <= t

    def definition(a, slip=False):   # slip: a_s summed too, one term too many
        terms = torch.where(span, a.double()[..., :, None, None], 0.0)     # (b, h, C, r, t, s)
        seg = terms.sum(-3) + (a.double()[..., None, :] if slip else 0)
        return torch.where(t >= s, torch.exp(seg) * (1 if coef is None else coef.double()[..., None, :]), 1.0)

    E = chunked.segment_decays(a, ws, coef).double()
    below = (t >= s).expand(E.shape)
    def bound(a):
        K = T // G
        return torch.finfo(torch.float32).eps * (2 * K + 3 + (G + K) * torch.where(span, a.abs().double()[..., :, None, None], 0.0).sum(-3))

    ref = definition(a)
    assert ((E - ref).abs() <= bound(a) * ref)[below].all(), float(((E - ref).abs() / (bound(a) * ref))[below].max())
    assert torch.isfinite(E[~below]).all()
    slipped = definition(a, slip=True)
    assert ((slipped - ref).abs() > bound(a) * ref)[..., t > s].all()
    for poison in (math.nan, math.inf, -math.inf):
        for r in {0, T // 2, T - 1}:
            bad = a.clone()
            bad[0, 1, 1, r] = poison
            E, ref = chunked.segment_decays(bad, ws, coef), definition(bad)
            assert torch.equal(torch.isfinite(E) | ~below, torch.isfinite(ref) | ~below), (poison, r)
            assert torch.equal(torch.isnan(E) & below, torch.isnan(ref) & below), (poison, r)
            E = E.double()
            assert (E[below & (ref == 0)] == 0).all(), (poison, r)          # a segment holding -inf
            fine = below & torch.isfinite(ref) & (ref > 0)                   # the segments without the poison
            assert ((E - ref).abs() <= bound(bad) * ref)[fine].all(), (poison, r)


@pytest.mark.parametrize("T", [1, 2, 3, 5, 16, 64])
def test_segment_sums_match_their_definition(T):
    """chunked.segment_sums (each a_r's gradient from those of the segments: the sum of g[t, s] over
    s < r <= t, g zero on and above the diagonal) against that definition in float64, on float32
    entries of magnitude 0.05 to 1.05: within the summation bound 2 T eps32 sum |g[t, s]| over the
    span (at most T terms along s, then at most T rows). A term too many or too few is off by at
    least 0.05, which that bound rejects. A NaN, inf or -inf at g[t0, s0] reaches exactly the
    entries whose span holds it, s0 < r <= t0 (the product with 0 that would spread it everywhere
    is not taken there)."""
    gen = torch.Generator().manual_seed(T)
    g = ((0.05 + torch.rand(2, 3, 2, T, T, generator=gen)) * torch.sign(torch.randn(2, 3, 2, T, T, generator=gen)))
    g = g.tril(-1)
    r, t, s = (torch.arange(T).view(*shape) for shape in ((T, 1, 1), (1, T, 1), (1, 1, T)))

    def definition(g, slip=False):   # slip: s <= r, one term too many
        span = ((s <= r) if slip else (s < r)) & (r <= t) & (t > s)
        return torch.where(span, g.double()[..., None, :, :], 0.0).sum((-1, -2))   # (b, h, C, r)

    def bound(g):
        span = (s < r) & (r <= t)
        return 2 * T * torch.finfo(torch.float32).eps * torch.where(span, g.abs().double()[..., None, :, :], 0.0).sum((-1, -2))

    for ws in (chunked.Workspace(g.device), chunked.NO_WORKSPACE):
        sums = chunked.segment_sums(g, ws).double()
        assert ((sums - definition(g)).abs() <= bound(g)).all()
    if T > 1:
        pos = g.abs()   # of one sign, so that the extra terms cannot cancel
        assert ((definition(pos, slip=True) - definition(pos)).abs() > bound(pos))[..., :-1].all()
    for poison in (math.nan, math.inf, -math.inf):
        for t0, s0 in {(T - 1, 0), (T - 1, T - 2), (T // 2, T // 2 - 1)} if T > 1 else ():
            bad = g.clone()
            bad[0, 1, 1, t0, s0] = poison
            sums, ref = chunked.segment_sums(bad, chunked.NO_WORKSPACE).double(), definition(bad)
            assert torch.equal(torch.isfinite(sums), torch.isfinite(ref)), (poison, t0, s0)
            assert torch.equal(torch.isnan(sums), torch.isnan(ref)), (poison, t0, s0)
            fine = torch.isfinite(ref)
            assert ((sums - ref).abs() <= bound(bad))[fine].all(), (poison, t0, s0)


# ---- the front door ---------------------------------------------------------------------------

def _bad(**change):
    case = Case(b=2, l=5, h_qk=1, groups=2, n=4, n_ang=2, dtype="f32")
    args = inputs(case)
    for k, v in change.items():
        args[k] = v(args) if callable(v) else v
    return args


FRONT_DOOR = [
    ("Q rank", dict(Q=lambda a: a["Q"][0]), ValueError, "Q"),
    ("K shape", dict(K=lambda a: a["K"][:, :4]), ValueError, "K"),
    ("V dtype", dict(V=lambda a: a["V"].int()), TypeError, "V"),
    ("Z dtype", dict(Z=lambda a: a["Z"].double()), TypeError, "Z"),
    ("ADT time first", dict(ADT=lambda a: a["ADT"].transpose(1, 2)), ValueError, "ADT"),
    ("n odd", dict(Q=lambda a: a["Q"][..., :3], K=lambda a: a["K"][..., :3]), ValueError, "Q"),
    ("n_ang > n/2", dict(Angles=lambda a: torch.zeros(2, 5, 2, 3)), ValueError, "Angles"),
    ("h_qk not dividing h", dict(Q=lambda a: torch.zeros(2, 5, 3, 4), K=lambda a: torch.zeros(2, 5, 3, 4)), ValueError, "Q"),
    ("D shape", dict(D=lambda a: a["D"][:1]), ValueError, "D"),
    ("D dtype", dict(D=lambda a: a["D"].half()), TypeError, "D"),
    ("bias shape", dict(K_bias=lambda a: a["K_bias"][:, :2]), ValueError, "K_bias"),
    ("incomplete states", dict(Input_States=lambda a: (*a["Input_States"][:3], None)), ValueError, "Input_States"),
    ("three states", dict(Input_States=lambda a: a["Input_States"][:3]), TypeError, "Input_States"),
    ("state dtype", dict(Input_States=lambda a: (a["Input_States"][0].double(), *a["Input_States"][1:])), TypeError, "angle"),
    ("state shape", dict(Input_States=lambda a: (*a["Input_States"][:2], a["Input_States"][2][:, :, :2], a["Input_States"][3])), ValueError, "(k)"),
    ("not a tensor", dict(Trap=3.0), TypeError, "Trap"),
    ("device", dict(DT=lambda a: a["DT"].to("meta")), ValueError, "DT"),
]


@pytest.mark.parametrize("label,change,exc,arg", FRONT_DOOR, ids=[f[0] for f in FRONT_DOOR])
def test_front_door_scan(label, change, exc, arg):
    with pytest.raises(exc, match=f"mamba3_scan: .*{arg}"):
        mamba3_scan(**_bad(**change))


def test_front_door_names_V_given_as_b_h_l_p():
    """V (b, h, l, p) makes a correct Q look wrong when l is read from V: V is the odd one out."""
    args = inputs(Case(b=1, l=2, h_qk=1, groups=3, n=4, n_ang=2, dtype="f32"))
    with pytest.raises(ValueError, match=r"^mamba3_scan: V: expected shape \(b=1, l=2, h=3, p=3\), got \(1, 3, 2, 3\), "
                                         r"which looks \(b, h, l, p\), transposed: pass V\.transpose\(1, 2\)$"):
        mamba3_scan(**dict(args, V=args["V"].transpose(1, 2)))


def test_front_door_names_Q_and_K_with_n_and_h_qk_swapped():
    """Q and K (b, l, n, h_qk): only they have h_qk, so it is read in doubt too; read the other way
    they agree with Q_bias and K_bias, which are not blamed (nor is h_qk = 4 said not to divide h)."""
    args = _bad(Q=lambda a: a["Q"].transpose(2, 3), K=lambda a: a["K"].transpose(2, 3))
    with pytest.raises(ValueError, match=r"^mamba3_scan: Q: expected shape \(b=2, l=5, h_qk=1, n=4\), got \(2, 5, 4, 1\), "
                                         r"which looks \(b, l, n, h_qk\), transposed: pass Q\.transpose\(2, 3\) "
                                         r"\(K holds its sizes in another order too\)$"):
        mamba3_scan(**args)


@pytest.mark.parametrize("arg", ["Q", "V", "Z"])
def test_front_door_names_the_argument_on_another_device(arg):
    """Q on meta is Q's fault though Q is the first input: the device is the one the others share."""
    args = _bad(**{arg: lambda a: a[arg].to("meta")})
    others = ", ".join(k for k in ("Q", "K", "V", "ADT", "DT", "Trap", "Q_bias", "K_bias", "Angles", "D", "Z") if k != arg)
    with pytest.raises(ValueError) as info:
        mamba3_scan(**args)
    assert str(info.value) == f"mamba3_scan: {arg}: expected a tensor on cpu, the device of {others}, got meta"


def test_front_door_scan_options():
    args = _bad()
    with pytest.raises(ValueError, match="chunk_size"):
        mamba3_scan(**args, chunk_size=0)
    with pytest.raises(TypeError, match="return_final_states"):
        mamba3_scan(**args, return_final_states="yes")
    with pytest.raises(ValueError, match="cu_seqlens"):
        mamba3_scan(**args, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))  # b = 2
    with pytest.raises(ValueError, match="impl"):
        mamba3_scan(**args, impl="nope")


def test_front_door_step():
    args = _bad()
    tok = token(args, 0)
    states = args["Input_States"]
    with pytest.raises(ValueError, match="mamba3_state_update: Q"):
        mamba3_state_update(**dict(tok, Q=tok["Q"][:, :, :3], K=tok["K"][:, :, :3]), Input_States=states)
    with pytest.raises(ValueError, match="Input_States"):
        mamba3_state_update(**tok, state_batch_indices=torch.tensor([0, 1], dtype=torch.int32))
    # aliased written arguments: the cache's v state is V's memory; a refused step touches nothing
    cache = tuple(s.clone() for s in states)
    aliased = (*cache[:3], tok["V"])
    kept = [s.clone() for s in aliased]
    with pytest.raises(ValueError, match=r"Input_States\[3\] \(v\).*memory shared with V"):
        mamba3_state_update(**tok, Input_States=aliased, state_batch_indices=torch.tensor([0, 1], dtype=torch.int32))
    assert all(torch.equal(a, b) for a, b in zip(aliased, kept))
    with pytest.raises(ValueError, match="state_batch_indices"):
        mamba3_state_update(**tok, Input_States=cache, state_batch_indices=torch.tensor([0, 0], dtype=torch.int32))
