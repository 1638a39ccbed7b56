"""The Mamba-3 language model (impls/models/mamba3.py): a float64 block written out here from the
official module agrees to rounding, recurrent decoding and re-forwarding agree, left padding is exact,
official decoding bugs are replayed, and checkpoints round-trip the official layout through the
shared front door.

No CPU peer exists (the official module needs its Triton and CuTe kernels), so the independent
check is reference_mixer: the official Mamba3.forward (mamba_ssm/modules/mamba3.py) read line by
line and the SISO recurrence of the official mamba3_siso_step_ref, in plain torch ops, token by
token, sharing no code with impls/. The tolerance policy's oracle for logits is the float64 model
through the loop spec; its baseline the float32 model through the loop.
"""

import math
import os
from unittest import mock

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import impls
from impls.models.mamba3 import Mamba3Config, Mamba3LM, parameter_shapes
from .model_helpers import Mamba3Case as Case, one_thread  # noqa: F401
from .model_helpers import (check, check_forward_and_steps, check_generation_modes_agree, check_left_padding,
                            check_official_round_trip, check_refused_ids_and_tokens, check_sampling_modes_agree,
                            refused_before_building, step_by_step)


# ---------------------------------------------------------------------------- the written-out block

def reference_mixer(mixer, hidden):
    """The official Mamba-3 SISO block in float64, token by token, from mamba_ssm/modules/mamba3.py
    (Mamba3.forward) and the recurrence of tests/ops/triton/test_mamba3_siso.py (mamba3_siso_step_ref):

        z, x, B, C, dd_dt, dd_A, trap, angles = split(in_proj(u))
        A = clamp(-heavy_tail(dd_A) or -softplus(dd_A), max=-A_floor); DT = softplus(dd_dt + dt_bias)
        B, C = rms_norm over n (eps 1e-5) * B_norm.weight, C_norm.weight; head i reads group i // (h / g)
        theta = (theta + pi tanh(angles) DT) mod 2 pi, the same angles for every head
        k = Rot(theta)(B + B_bias), q = Rot(theta)(C + C_bias): interleaved pairs, the first n_ang
        h_t = exp(A DT) h + (1 - sigmoid(trap)) DT exp(A DT) v_prev k_prev^T + sigmoid(trap) DT x k^T
        y = h q + D x;  y * silu(z), or with is_outproj_norm rms_norm per head * norm.weight * silu(z)
        out_proj(y)

    hidden: (b, l, m) float64 -> (b, l, m)."""
    P = {k: v.detach().double() for k, v in mixer.state_dict().items()}
    b, l, _ = hidden.shape
    d, h, p, g, n, a = (mixer.d_inner, mixer.nheads, mixer.headdim, mixer.ngroups, mixer.d_state,
                        mixer.num_rope_angles)
    proj = hidden @ P["in_proj.weight"].T
    z, x, B, C, dd_dt, dd_A, trap, angles = proj.split([d, d, g * n, g * n, h, h, h, a], dim=-1)
    act = (dd_A.clamp_min(0) + 1 / (1 - dd_A.clamp_max(0)) if mixer.A_activation == "heavy_tail"
           else torch.log1p(torch.exp(dd_A)))
    A = torch.minimum(-act, torch.tensor(-mixer.A_floor, dtype=torch.float64))
    DT = torch.log1p(torch.exp(dd_dt + P["dt_bias"]))                        # softplus, (b, l, h)

    def rms(v, w):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    B = rms(B.view(b, l, g, n), P["B_norm.weight"])
    C = rms(C.view(b, l, g, n), P["C_norm.weight"])
    x = x.view(b, l, h, p)
    theta = torch.zeros(b, h, a, dtype=torch.float64)
    state = torch.zeros(b, h, p, n, dtype=torch.float64)
    k_prev = torch.zeros(b, h, n, dtype=torch.float64)
    v_prev = torch.zeros(b, h, p, dtype=torch.float64)
    ys = torch.zeros(b, l, h, p, dtype=torch.float64)
    for t in range(l):
        for i in range(h):
            grp = i // (h // g)
            dt = DT[:, t, i]
            theta[:, i] = torch.remainder(theta[:, i] + math.pi * torch.tanh(angles[:, t]) * dt[:, None], 2 * math.pi)
            turned = []
            for vec in (B[:, t, grp] + P["B_bias"][i, 0], C[:, t, grp] + P["C_bias"][i, 0]):
                out = vec.clone()
                for j in range(a):
                    c, s = torch.cos(theta[:, i, j]), torch.sin(theta[:, i, j])
                    out[:, 2 * j] = vec[:, 2 * j] * c - vec[:, 2 * j + 1] * s
                    out[:, 2 * j + 1] = vec[:, 2 * j] * s + vec[:, 2 * j + 1] * c
                turned.append(out)
            k, q = turned
            lam = torch.sigmoid(trap[:, t, i])
            alpha = torch.exp(A[:, t, i] * dt)
            beta, gamma = (1 - lam) * dt * alpha, lam * dt
            state[:, i] = (alpha[:, None, None] * state[:, i]
                           + beta[:, None, None] * v_prev[:, i, :, None] * k_prev[:, i, None, :]
                           + gamma[:, None, None] * x[:, t, i, :, None] * k[:, None, :])
            ys[:, t, i] = (state[:, i] @ q[:, :, None])[..., 0] + P["D"][i] * x[:, t, i]
            k_prev[:, i], v_prev[:, i] = k, x[:, t, i]
    gate = (z * torch.sigmoid(z)).view(b, l, h, p)
    if "norm.weight" in P:
        y = rms(ys, P["norm.weight"].view(h, p)) * gate
    else:
        y = ys * gate
    return y.reshape(b, l, d) @ P["out_proj.weight"].T


def reference_logits(model, ids):
    """The official stack around reference_mixer, float64: embedding, h + mixer(RMSNorm(h)) per layer,
    norm_f, tied LM head (mixer_seq_simple.MixerModel / MambaLMHeadModel)."""
    P = {k: v.detach().double() for k, v in model.state_dict().items()}
    eps = model.config.norm_epsilon

    def rms(v, w):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps) * w

    h = P["backbone.embedding.weight"][ids]
    for i, block in enumerate(model.backbone.layers):
        h = h + reference_mixer(block.mixer, rms(h, P[f"backbone.layers.{i}.norm.weight"]))
    return rms(h, P["backbone.norm_f.weight"]) @ P["lm_head.weight"].T


SCAN_IMPLS = impls.names(family="mamba3")


@pytest.mark.parametrize("case", [
    Case(l=11, b=2, seed=21),
    Case(l=9, b=1, ngroups=2, rope_fraction=1.0, A_activation="softplus", is_outproj_norm=True, chunk_size=4, seed=22),
    Case(l=13, b=2, d_state=6, headdim=4, A_floor=0.5, chunk_size=5, seed=23),   # n_ang = 1 of 3 pairs; A clamped
], ids=["heavy_tail", "grouped-rope1-softplus-outproj_norm", "odd-pairs-A_floor"])
@pytest.mark.parametrize("scan_impl", SCAN_IMPLS)
def test_mixer_matches_the_written_out_official_block(case, scan_impl):
    """Each block's forward through every Mamba-3 implementation, and its prefill + steps, against
    reference_mixer in float64: agreement to rounding."""
    _, model64, _ = case.build()
    mixer = model64.backbone.layers[0].mixer
    hidden = torch.randn(case.b, case.l, case.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference_mixer(mixer, hidden)
        torch.testing.assert_close(mixer(hidden, impl=scan_impl), want, rtol=1e-10, atol=1e-10)
        cache = model64.new_cache(case.b)
        half = case.l // 2
        mixer(hidden[:, :half], impl=scan_impl, cache=cache.layers[0])
        zero = torch.zeros(case.b, case.d_model, dtype=torch.float64)   # the residual: the block's output alone
        steps = [mixer.step(hidden[:, t], cache.layers[0], 0, None, "recurrent", zero) for t in range(half, case.l)]
        torch.testing.assert_close(torch.stack(steps, 1), want[:, half:], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", [Case(l=10, b=2, seed=5), Case(l=7, ngroups=2, is_outproj_norm=True, seed=6)],
                         ids=["plain", "grouped-outproj_norm"])
def test_model_logits_match_the_written_out_official_stack_in_float64(case):
    _, model64, ids = case.build()
    with torch.no_grad():
        torch.testing.assert_close(model64(ids), reference_logits(model64, ids), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- the tolerance policy

cases = st.builds(
    Case, d_model=st.sampled_from([8, 12, 16]), n_layer=st.integers(1, 2), vocab=st.integers(8, 40),
    l=st.integers(1, 30), b=st.integers(1, 2), d_state=st.sampled_from([2, 4, 6, 8]),
    headdim=st.sampled_from([1, 2, 4, 8]), ngroups=st.sampled_from([1, 2]), rope_fraction=st.sampled_from([0.5, 1.0]),
    A_activation=st.sampled_from(["heavy_tail", "softplus"]), is_outproj_norm=st.booleans(),
    chunk_size=st.sampled_from([1, 3, 8, 64]), tie=st.booleans(), seed=st.integers(0, 2**31 - 1),
).filter(lambda c: (2 * c.d_model // c.headdim) % c.ngroups == 0 and int(c.d_state * c.rope_fraction) >= 2)


@settings(deadline=None)
@given(case=cases)
@example(case=Case(l=1))
@example(case=Case(l=21, b=2, ngroups=2, chunk_size=8))   # l past a chunk boundary, not a multiple of it
def test_forward_and_steps_match_the_float64_spec(case):
    """The full forward through the chunked default, and prefill + steps, give the float64 oracle's logits."""
    check_forward_and_steps(case)


def test_a_rounding_the_head_norm_amplifies_is_not_an_error():
    """headdim 1 with the output norm: each head's norm divides one scan output, here a sum that
    cancels to near zero, by its own rms, so a rounding of its terms grows about 300x. The chunked
    scan's logits were 4x as far from the oracle as the loop's (5.0e-6 against 1.2e-6), past
    2 x the loop's error; model_helpers.rounding_spread measures how far such roundings reach."""
    check_forward_and_steps(Case(d_model=8, n_layer=2, vocab=16, l=2, b=1, d_state=6, headdim=1, is_outproj_norm=True,
                                 chunk_size=1, tie=False, seed=396572))


def test_a_scan_output_rounded_to_bfloat16_still_fails():
    """The spread leaves room for float32 roundings, not for a precision bug: the same case with the
    default scan's output rounded through bfloat16 (a kernel that stores y in half precision) fails."""
    real = impls.mamba3_scan

    def half_precision_out(*args, **kwargs):
        out = real(*args, **kwargs)
        if "impl" in kwargs:                                 # the loop's runs, for the oracle and the baseline
            return out
        return out.bfloat16().to(out.dtype) if torch.is_tensor(out) else (out[0].bfloat16().to(out[0].dtype), *out[1:])

    case = Case(d_model=8, n_layer=2, vocab=16, l=9, b=1, d_state=6, headdim=1, is_outproj_norm=True, seed=396572)
    with mock.patch.object(impls, "mamba3_scan", half_precision_out), pytest.raises(AssertionError, match="forward"):
        check_forward_and_steps(case)


@pytest.mark.parametrize("case", [Case(l=9, b=1), Case(l=17, b=3, ngroups=2, is_outproj_norm=True, seed=2)],
                         ids=["plain", "grouped-outproj_norm"])
def test_recurrent_and_reforward_generate_the_same_tokens(case):
    check_generation_modes_agree(case)


def test_sampling_same_seed_same_tokens_in_both_modes():
    check_sampling_modes_agree(Case(l=5, b=2, seed=11))


def test_left_padding_is_exact():
    """DT and x are zeroed at padded positions: every state stays zero until a row's first real token."""
    check_left_padding(Case(l=13, b=1, ngroups=2, seed=7))


# ---------------------------------------------------------------------------- official bugs, replayed

def test_decoding_after_a_one_token_prompt():
    """The official Mamba3.forward hands its (b, 1, d) input to step, which expects (b, d), so
    generate() fails on the first decoded token. Here a one-token prompt is prefilled and decoded in
    both modes, to the same tokens, and step's logits equal the forward's."""
    case = Case(l=8, b=2, seed=12)
    model, model64, ids = case.build()
    with torch.no_grad():
        rec = model.generate(ids[:, :1], 7)
        assert torch.equal(rec, model.generate(ids[:, :1], 7, mode="reforward"))
        oracle, baseline = model64(ids, impl="loop"), model(ids, impl="loop")
        check("prefill of 1 + steps", case, step_by_step(model, ids, prefix=1), oracle, baseline, case.l, case.d_state)
    with pytest.raises(ValueError, match=r"token: expected shape \(b=2,\)"):
        model.step(ids[:, :1], model.new_cache(2))


@pytest.mark.parametrize("headdim", [1, 3, 17])
def test_step_with_small_headdim(headdim):
    """The official step (mamba3_step_fn, tile_D=64) differs from forward by about 1 and is
    nondeterministic below headdim 64: an out-of-bounds write corrupts dt_bias. Here the step is
    right at p = 1, 3, 17 (against the float64 oracle), deterministic, and writes no parameter."""
    case = Case(d_model=headdim * 2, headdim=headdim, l=10, b=2, seed=headdim)
    model, model64, ids = case.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        oracle, baseline = model64(ids, impl="loop"), model(ids, impl="loop")
        first = step_by_step(model, ids, prefix=3)
        check("prefill + steps", case, first, oracle[:, 2:], baseline[:, 2:], case.l, case.d_state)
        assert torch.equal(step_by_step(model, ids, prefix=3), first)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ---------------------------------------------------------------------------- config and checkpoints

def official_layout(d_model, n_layer, vocab_size, d_state=128, expand=2, headdim=64, ngroups=1, rope_fraction=0.5,
                    is_outproj_norm=False, pad_multiple=8):
    """Parameter name -> shape of an official Mamba-3 SISO checkpoint, written out from the official module
    (Mamba3.__init__: in_proj out = 2 d_inner + 2 d_state ngroups + 3 nheads + num_rope_angles,
    num_rope_angles = (int(d_state rope_fraction) rounded down to even) / 2; B_bias, C_bias (h, 1, n))."""
    d_inner = expand * d_model
    h = d_inner // headdim
    split = int(d_state * rope_fraction)
    angles = (split - split % 2) // 2
    v = vocab_size + (-vocab_size) % pad_multiple
    layout = {"backbone.embedding.weight": (v, d_model), "backbone.norm_f.weight": (d_model,),
              "lm_head.weight": (v, d_model)}
    for i in range(n_layer):
        p = f"backbone.layers.{i}."
        layout.update({p + "norm.weight": (d_model,),
                       p + "mixer.in_proj.weight": (2 * d_inner + 2 * d_state * ngroups + 3 * h + angles, d_model),
                       p + "mixer.dt_bias": (h,), p + "mixer.B_bias": (h, 1, d_state),
                       p + "mixer.C_bias": (h, 1, d_state),
                       p + "mixer.B_norm.weight": (d_state,), p + "mixer.C_norm.weight": (d_state,),
                       p + "mixer.D": (h,), p + "mixer.out_proj.weight": (d_model, d_inner)})
        if is_outproj_norm:
            layout[p + "mixer.norm.weight"] = (d_inner,)
    return layout


def test_state_dict_and_shapes_are_the_official_layout():
    config = Mamba3Config(d_model=32, n_layer=2, vocab_size=50,
                          ssm_cfg=dict(d_state=14, headdim=16, ngroups=2, is_outproj_norm=True))
    want = official_layout(32, 2, 50, d_state=14, headdim=16, ngroups=2, is_outproj_norm=True)
    assert parameter_shapes(config) == want
    model = Mamba3LM(config)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == want
    assert config.num_rope_angles == 3   # int(14 * 0.5) = 7, rounded down to 6 dimensions: 3 pairs
    mixer = model.backbone.layers[0].mixer
    assert (mixer.D == 1).all() and (mixer.B_bias == 1).all() and (mixer.C_bias == 1).all()
    default = Mamba3Config(d_model=768, n_layer=1, vocab_size=50277, ssm_cfg={"layer": "Mamba3"})
    assert parameter_shapes(default) == official_layout(768, 1, 50277)


@pytest.mark.parametrize("kw, error, match", [
    (dict(ssm_cfg=dict(headdim=7)), ValueError, "headdim"),
    (dict(ssm_cfg=dict(headdim=4, ngroups=3)), ValueError, "ngroups"),
    (dict(ssm_cfg=dict(d_state=7)), ValueError, "even"),
    (dict(ssm_cfg=dict(d_state=2, rope_fraction=0.5)), ValueError, "no pair"),
    (dict(ssm_cfg=dict(rope_fraction=0.25)), ValueError, "rope_fraction"),
    (dict(ssm_cfg=dict(A_activation="exp")), ValueError, "A_activation"),
    (dict(ssm_cfg=dict(A_floor=-1.0)), ValueError, "A_floor"),
    (dict(ssm_cfg=dict(chunk_size=0)), ValueError, "chunk_size"),
    (dict(ssm_cfg=dict(d_conv=4)), ValueError, "d_conv"),
    (dict(ssm_cfg=dict(headdim=2.5)), ValueError, "headdim must be an integer"),
    (dict(ssm_cfg=dict(is_mimo=True, mimo_rank=4)), NotImplementedError, "rank-R Mamba-3 scan"),
    (dict(ssm_cfg=dict(layer="Mamba2")), NotImplementedError, "Mamba-2 checkpoint"),
    (dict(d_intermediate=64), NotImplementedError, "MLP"),
    (dict(n_layer=0), ValueError, "n_layer"),
])
def test_config_is_checked(kw, error, match):
    base = dict(d_model=16, n_layer=1, vocab_size=20)
    kw = {**base, **kw, "ssm_cfg": {"headdim": 8, "d_state": 8, **kw.get("ssm_cfg", {})}}
    with pytest.raises(error, match=match):
        Mamba3Config(**kw)


def test_siso_ignores_mimo_rank_as_the_official_module():
    """The official default ssm_cfg has mimo_rank 4 with is_mimo False: a SISO model (rank 1)."""
    config = Mamba3Config(d_model=16, n_layer=1, vocab_size=20, ssm_cfg=dict(headdim=8, d_state=8, mimo_rank=4))
    assert config.mimo_rank == 1 and parameter_shapes(config)["backbone.layers.0.mixer.B_bias"] == (4, 1, 8)


@pytest.mark.parametrize("safe", [False, True], ids=["bin", "safetensors"])
def test_official_round_trip(tmp_path, safe):
    case = Case(ngroups=2, A_activation="softplus", is_outproj_norm=True, vocab=45, l=9, b=2)
    cfg = check_official_round_trip(case, tmp_path, safe)
    assert cfg["ssm_cfg"]["layer"] == "Mamba3" and cfg["ssm_cfg"]["A_activation"] == "softplus"


def test_transformers_layout_is_refused():
    model, _, _ = Case(n_layer=1).build()
    with pytest.raises(ValueError, match="transformers .* has no Mamba-3 model"):
        model.save_pretrained("unused", layout="transformers")
    assert not os.path.exists("unused")


def test_checkpoint_checked_before_building(tmp_path, monkeypatch):
    """Wrong shapes, missing or unknown names, a Mamba-1 or Mamba-2 config, a config of another model,
    missing size fields, MIMO: each an error naming the problem, raised before a model is allocated."""
    good, refuse = refused_before_building(Case().build()[0], tmp_path, monkeypatch)
    refuse({**good, "ssm_cfg": {**good["ssm_cfg"], "d_state": 16}}, "shape")
    refuse({**good, "ssm_cfg": {**good["ssm_cfg"], "rope_fraction": 1.0}}, "in_proj.weight")
    refuse({**good, "n_layer": 3}, "missing")
    refuse({**good, "n_layer": 1}, "unexpected")
    refuse({**good, "ssm_cfg": {}}, "'Mamba1'.*a Mamba-1 checkpoint")
    refuse({**good, "ssm_cfg": {"layer": "Mamba2"}}, "a Mamba-2 checkpoint")
    refuse({**good, "ssm_cfg": {**good["ssm_cfg"], "is_mimo": True}}, "MIMO", NotImplementedError)
    refuse({k: v for k, v in good.items() if k != "d_model"}, "d_model")
    refuse({**good, "d_model": 16.0}, "d_model must be an integer")
    refuse({"model_type": "mamba2", "hidden_size": 16}, "a Mamba-2 checkpoint")
    refuse({"model_type": "llama", "dim": 4}, "model_type is 'llama'")
    with pytest.raises(ValueError, match="expected a checkpoint folder"):
        Mamba3LM.from_pretrained(tmp_path / "config.json")
    os.remove(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError):
        Mamba3LM.from_pretrained(tmp_path)


def test_bad_ids_and_tokens_raise_and_leave_the_cache():
    check_refused_ids_and_tokens(Case(n_layer=1, l=5))


def test_module_by_module_step_in_bfloat16():
    """A half-precision model decodes through the module-by-module step (float32 residual stream):
    prefill + steps give the float64 oracle's logits within policy."""
    case = Case(l=10, b=2, ngroups=2, seed=31)
    model, model64, ids = case.build()
    model = model.to(torch.bfloat16)
    assert model.new_cache(2).stream is None
    with torch.no_grad():
        oracle, baseline = model64(ids, impl="loop"), model(ids, impl="loop")
        check("prefill + steps", case, step_by_step(model, ids, prefix=4), oracle[:, 3:], baseline[:, 3:],
              case.l, case.d_state)
