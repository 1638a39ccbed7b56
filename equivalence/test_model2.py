"""The Mamba-2 language model (impls/models/mamba2.py): recurrent decoding and re-forwarding agree with the
float64 spec, left-padded batches decode as if unpadded, sampling is reproducible across modes,
configs and checkpoints are checked before anything is built, and the official layout is exact.

Oracle, baseline and the checks every model passes alike: equivalence/model_helpers.py. Parity with
transformers' Mamba2ForCausalLM: test_model2_parity.py.
"""

import json
import os

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import impls
from impls.models.mamba2 import Mamba2Config, Mamba2LM, parameter_shapes
from .model_helpers import Mamba2Case as Case, one_thread  # noqa: F401
from .model_helpers import (check, check_forward_and_steps, check_generation_modes_agree, check_left_padding,
                            check_official_round_trip, check_refused_ids_and_tokens, check_sampling_modes_agree,
                            never_built, refused_before_building, step_by_step)

pytestmark = pytest.mark.family("ssd")


cases = st.builds(
    Case, d_model=st.sampled_from([8, 12, 16]), n_layer=st.integers(1, 2), vocab=st.integers(8, 40),
    l=st.integers(1, 30), b=st.integers(1, 2), d_state=st.integers(1, 8), headdim=st.sampled_from([1, 2, 4, 8]),
    ngroups=st.sampled_from([1, 2]), d_conv=st.integers(1, 4), chunk_size=st.sampled_from([1, 3, 8, 64]),
    D_has_hdim=st.booleans(), rmsnorm=st.booleans(), norm_before_gate=st.booleans(), bias=st.booleans(),
    conv_bias=st.booleans(), dt_limit=st.sampled_from([(0.0, float("inf")), (0.01, 0.05)]), tie=st.booleans(),
    seed=st.integers(0, 2**31 - 1)).filter(lambda c: (2 * c.d_model // c.headdim) % c.ngroups == 0)


@given(case=cases)
@example(case=Case(l=1))
@example(case=Case(l=21, b=2, ngroups=2, D_has_hdim=True, chunk_size=8, bias=True))  # l not a multiple of chunk_size
def test_forward_and_steps_match_the_float64_spec(case):
    """The full forward through the chunked default, and prefill + steps (D of shape (h, p) included:
    the official step mishandles it), give the float64 oracle's logits."""
    check_forward_and_steps(case)


def reference_mixer(mixer, hidden):
    """The Mamba-2 block written out token by token in float64 from the official module
    (mamba_ssm/modules/mamba2.py, Mamba2.step, and layernorm_gated.rms_norm_ref), sharing no code
    with impls/models/mamba2.py: in_proj -> [z, xBC, dt]; causal conv over xBC (k taps) + SiLU; dt =
    clamp(softplus(dt + dt_bias), dt_limit); state = exp(dt A) state + dt x B^T per head (head i
    reads group i // (h / g)); y = state C + D x; then RMSNorm(y * silu(z)) per group (or
    RMSNorm(y) * silu(z) with norm_before_gate, or y * silu(z) without rmsnorm); out_proj.
    hidden: (b, l, m) float64 -> (b, l, m)."""
    P = {k: v.detach().double() for k, v in mixer.state_dict().items()}
    c = mixer
    b, l, _ = hidden.shape
    d, h, p, g, n, k = c.d_inner, c.nheads, c.headdim, c.ngroups, c.d_state, c.d_conv
    proj = hidden @ P["in_proj.weight"].T + (P["in_proj.bias"] if "in_proj.bias" in P else 0)
    z, xBC, dt = proj[..., :d], proj[..., d:d + c.conv_dim], proj[..., d + c.conv_dim:]
    w = P["conv1d.weight"][:, 0]                                       # (c, k)
    padded = torch.cat([torch.zeros(b, k - 1, c.conv_dim, dtype=torch.float64), xBC], 1)
    conv = sum(padded[:, j:j + l] * w[:, j] for j in range(k)) + (P["conv1d.bias"] if "conv1d.bias" in P else 0)
    conv = conv * torch.sigmoid(conv)
    x, B, C = conv[..., :d], conv[..., d:d + g * n], conv[..., d + g * n:]
    A = -torch.exp(P["A_log"])
    D = P["D"].view(h, p) if P["D"].numel() == d else P["D"][:, None].expand(h, p)
    lo, hi = c.dt_limit
    dt = torch.nn.functional.softplus(dt + P["dt_bias"]).clamp(lo, hi)   # (b, l, h)
    state = torch.zeros(b, h, p, n, dtype=torch.float64)
    ys = []
    for t in range(l):
        for i in range(h):
            grp = i // (h // g)
            Bt, Ct = B[:, t, grp * n:(grp + 1) * n], C[:, t, grp * n:(grp + 1) * n]
            xi = x[:, t, i * p:(i + 1) * p]
            state[:, i] = torch.exp(dt[:, t, i] * A[i])[:, None, None] * state[:, i] + \
                dt[:, t, i][:, None, None] * xi[:, :, None] * Bt[:, None, :]
        y = torch.stack([state[:, i] @ C[:, t, (i // (h // g)) * n:(i // (h // g) + 1) * n, None]
                         for i in range(h)], 1)[..., 0] + D * x[:, t].view(b, h, p)
        ys.append(y.reshape(b, d))
    y = torch.stack(ys, 1)
    gate = z * torch.sigmoid(z)
    if "norm.weight" not in P:
        y = y * gate
    else:
        before = c.norm.norm_before_gate
        v = y if before else y * gate
        grouped = v.view(b, l, g, d // g)
        v = (grouped / torch.sqrt(grouped.pow(2).mean(-1, keepdim=True) + 1e-5)).view(b, l, d) * P["norm.weight"]
        y = v * gate if before else v
    return y @ P["out_proj.weight"].T + (P["out_proj.bias"] if "out_proj.bias" in P else 0)


@pytest.mark.parametrize("case", [
    Case(l=11, b=2, ngroups=2, D_has_hdim=True, chunk_size=4, bias=True, dt_limit=(0.01, 0.05), seed=21),
    Case(l=9, d_conv=3, norm_before_gate=True, ngroups=2, chunk_size=8, conv_bias=False, seed=22),
    Case(l=7, rmsnorm=False, headdim=4, chunk_size=2, seed=23),
], ids=["grouped-Dhp-bias-dtlimit", "norm_before_gate", "no-rmsnorm"])
def test_mixer_matches_a_written_out_reference(case):
    """Each block's forward, and its prefill + steps, against reference_mixer in float64 (an
    independent reading of the official block: the options transformers lacks are covered here)."""
    model, model64, _ = case.build()
    mixer = model64.backbone.layers[0].mixer
    hidden = torch.randn(case.b, case.l, case.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference_mixer(mixer, hidden)
        torch.testing.assert_close(mixer(hidden, impl="loop"), want, rtol=1e-10, atol=1e-10)
        cache = model64.new_cache(case.b)
        half = case.l // 2
        mixer(hidden[:, :half], impl="loop", cache=cache.layers[0])
        steps, phase = [], case.d_conv - 1
        zero = torch.zeros(case.b, case.d_model, dtype=torch.float64)   # the residual: the block's output alone
        for t in range(half, case.l):
            steps.append(mixer.step(hidden[:, t], cache.layers[0], phase, None, "recurrent", zero))
            phase = (phase + 1) % case.d_conv
        torch.testing.assert_close(torch.stack(steps, 1), want[:, half:], rtol=1e-10, atol=1e-10)


def test_every_ssd_implementation_drives_the_model(ssd_impl):
    """Each registered SSD implementation (``--ssd-impl``) as the model's scan, and with a step as its
    decoding step, gives the float64 oracle's logits."""
    entry = impls.get(ssd_impl, family="ssd")
    s = entry.supports
    if torch.float32 not in s["dtypes"]:
        pytest.skip(f"{ssd_impl}: declared gap: no float32")
    # the hardest case its declared capabilities allow (a gap is declared, and tested, by the SSD suite);
    # an interpreted implementation (case_limits) gets a one-layer model within its limits
    lim = s["case_limits"] or {}
    h, p = min(4, lim.get("h", 4)), min(8, lim.get("p", 8))
    h -= h % 2                                   # d_inner = 2 d_model = h p
    case = Case(d_model=h * p // 2, headdim=p, n_layer=1 if lim else 2, l=9 if lim else 19,
                b=1 if lim else 2, d_state=min(8, lim.get("n", 8)), ngroups=2 if s["grouped"] else 1,
                D_has_hdim=s["D_hp"], chunk_size=8, seed=4)
    model, model64, ids = case.build()
    with torch.no_grad():
        oracle, baseline = model64(ids, impl="loop"), model(ids, impl="loop")
        check(f"forward impl={ssd_impl}", case, model(ids, impl=ssd_impl), oracle, baseline, case.l, case.d_state)
        if entry.step is not None:
            prefix = case.l - 2 if lim else case.l // 2     # interpreted: two steps
            got = step_by_step(model, ids, impl=ssd_impl, prefix=prefix, scan_impl=ssd_impl)
            check(f"prefill + steps impl={ssd_impl}", case, got, oracle[:, prefix - 1:], baseline[:, prefix - 1:],
                  case.l, case.d_state)


@pytest.mark.parametrize("case", [Case(l=9, b=1), Case(l=17, b=3, ngroups=2, D_has_hdim=True, d_conv=2, seed=2)],
                         ids=["plain", "grouped-Dhp"])
def test_recurrent_and_reforward_generate_the_same_tokens(case):
    check_generation_modes_agree(case)


def test_left_padding_is_exact():
    """The conv window and the state see zeros at padded positions; an in_proj bias must not leak into xBC."""
    check_left_padding(Case(l=13, b=1, ngroups=2, bias=True, seed=7))


@pytest.mark.parametrize("dtype, rms_norm", [(torch.float32, False), (torch.bfloat16, True)], ids=["layernorm-f32", "bf16"])
def test_module_by_module_step(dtype, rms_norm):
    """Models the fused step does not take (LayerNorm blocks; half precision, whose residual stream is
    float32) decode through the module-by-module step: prefill + steps give the float64 oracle's logits."""
    case = Case(l=14, b=2, ngroups=2, D_has_hdim=True, chunk_size=4, seed=31)
    model, _, ids = case.build()
    config = Mamba2Config(**{**model.config.to_dict(), "rms_norm": rms_norm})
    ours = Mamba2LM(config)
    state = ours.state_dict()
    state.update({k: v for k, v in model.state_dict().items() if k in state})
    ours.load_state_dict(state)
    model64 = Mamba2LM(config)
    model64.load_state_dict(state)
    model, model64 = ours.to(dtype).eval(), model64.double().eval()
    assert model.new_cache(2).stream is None     # the module-by-module path
    with torch.no_grad():
        oracle, baseline = model64(ids, impl="loop"), model(ids, impl="loop")
        check("prefill + steps", case, step_by_step(model, ids, prefix=5, scan_impl="loop"), oracle[:, 4:],
              baseline[:, 4:], case.l, case.d_state)


# ---------------------------------------------------------------------------- sampling and arguments

def test_sampling_same_seed_same_tokens_in_both_modes():
    check_sampling_modes_agree(Case(l=5, b=2, seed=11))


def test_eos_stops_rows_and_generation():
    case = Case(l=4, b=2, seed=1)
    model, _, ids = case.build()
    free = model.generate(ids, 6)
    eos = int(free[0, case.l + 1])                                   # row 0's second new token
    out = model.generate(ids, 6, eos_token_id=eos)
    assert torch.equal(out[0, :case.l + 2], free[0, :case.l + 2])
    assert (out[0, case.l + 2:] == eos).all()
    row1 = (free[1, case.l:] == eos).nonzero()
    if len(row1) == 0:
        assert out.shape[1] == case.l + 6
    assert model.generate(ids, 0).shape == (2, case.l)


@pytest.mark.parametrize("kw, error", [
    (dict(max_new_tokens=-1), ValueError), (dict(max_new_tokens=2.7), TypeError), (dict(max_new_tokens=True), TypeError),
    (dict(mode="fast"), ValueError), (dict(do_sample=True, temperature=0), ValueError),
    (dict(do_sample=True, top_k=-1), ValueError), (dict(do_sample=True, top_p=1.5), ValueError),
    (dict(eos_token_id=1.0), ValueError), (dict(temperature=0.5), ValueError),
    (dict(attention_mask=torch.full((1, 3), 0.5)), ValueError), (dict(attention_mask=torch.tensor([[1, 0, 1]])), ValueError),
    (dict(step_impl="chunked"), NotImplementedError), (dict(impl="nonesuch"), ValueError),
])
def test_generation_arguments_are_checked(kw, error):
    model, _, _ = Case(n_layer=1).build()
    kw = {"max_new_tokens": 2, **kw}
    with pytest.raises(error):
        model.generate(torch.zeros(1, 3, dtype=torch.long), **kw)


def test_bad_ids_and_tokens_raise_and_leave_the_cache():
    check_refused_ids_and_tokens(Case(n_layer=1, l=5))


# ---------------------------------------------------------------------------- config and checkpoints

def official_layout(d_model, n_layer, vocab_size, d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1,
                    D_has_hdim=False, pad_multiple=8):
    """Parameter name -> shape of an official Mamba-2 checkpoint, written out from the official
    module (mamba_ssm/modules/mamba2.py: in_proj out = 2 d_inner + 2 ngroups d_state + nheads;
    conv over d_inner + 2 ngroups d_state; D (d_inner,) with D_has_hdim), not from impls/models/mamba2.py."""
    d_inner = expand * d_model
    nheads = d_inner // headdim
    conv_dim = d_inner + 2 * ngroups * d_state
    v = vocab_size + (-vocab_size) % pad_multiple
    layout = {"backbone.embedding.weight": (v, d_model), "backbone.norm_f.weight": (d_model,),
              "lm_head.weight": (v, d_model)}
    for i in range(n_layer):
        p = f"backbone.layers.{i}."
        layout.update({p + "norm.weight": (d_model,), p + "mixer.in_proj.weight": (2 * d_inner + 2 * ngroups * d_state + nheads, d_model),
                       p + "mixer.conv1d.weight": (conv_dim, 1, d_conv), p + "mixer.conv1d.bias": (conv_dim,),
                       p + "mixer.dt_bias": (nheads,), p + "mixer.A_log": (nheads,),
                       p + "mixer.D": (d_inner,) if D_has_hdim else (nheads,), p + "mixer.norm.weight": (d_inner,),
                       p + "mixer.out_proj.weight": (d_model, d_inner)})
    return layout


def test_mamba2_130m_layout_and_size():
    """mamba2-130m's config.json (d_model 768, 24 layers, vocab 50277 padded to a multiple of 16):
    the official names and shapes, and its 129M parameters (tied head counted once)."""
    config = Mamba2Config(d_model=768, n_layer=24, vocab_size=50277, ssm_cfg={"layer": "Mamba2"},
                          pad_vocab_size_multiple=16)
    shapes = parameter_shapes(config)
    assert shapes == official_layout(768, 24, 50277, pad_multiple=16)
    assert shapes["backbone.embedding.weight"] == (50288, 768)
    total = sum(torch.Size(s).numel() for k, s in shapes.items() if k != "lm_head.weight")
    assert 128e6 < total < 130e6


def test_state_dict_is_the_official_layout():
    model = Mamba2LM(Mamba2Config(d_model=32, n_layer=2, vocab_size=50, ssm_cfg=dict(d_state=16, headdim=16, ngroups=2,
                                                                                     D_has_hdim=True)))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_layout(32, 2, 50, d_state=16, headdim=16, ngroups=2, D_has_hdim=True)
    assert model.lm_head.weight is model.backbone.embedding.weight


@pytest.mark.parametrize("kw, error, match", [
    (dict(ssm_cfg=dict(headdim=7)), ValueError, "headdim"),
    (dict(ssm_cfg=dict(headdim=4, ngroups=3)), ValueError, "ngroups"),
    (dict(ssm_cfg=dict(dt_limit=(0.1, 0.01))), ValueError, "dt_limit"),
    (dict(ssm_cfg=dict(A_init_range=(0, 16))), ValueError, "A_init_range"),
    (dict(ssm_cfg=dict(chunk_size=0)), ValueError, "chunk_size"),
    (dict(ssm_cfg=dict(d_stat=16)), ValueError, "d_stat"),
    (dict(ssm_cfg=dict(layer="Mamba1")), NotImplementedError, "Mamba-1"),
    (dict(d_intermediate=64), NotImplementedError, "MLP"),
    (dict(ssm_cfg=dict(d_ssm=16)), NotImplementedError, "d_ssm"),
    (dict(n_layer=0), ValueError, "n_layer"),
])
def test_config_is_checked(kw, error, match):
    base = dict(d_model=16, n_layer=1, vocab_size=20)
    kw = {**base, **kw, "ssm_cfg": {"headdim": 8, **kw.get("ssm_cfg", {})}}
    with pytest.raises(error, match=match):
        Mamba2Config(**kw)


@pytest.mark.parametrize("safe", [False, True], ids=["bin", "safetensors"])
def test_official_round_trip(tmp_path, safe):
    cfg = check_official_round_trip(Case(D_has_hdim=True, ngroups=2, bias=True, vocab=45, l=9, b=2), tmp_path, safe)
    assert cfg["ssm_cfg"]["layer"] == "Mamba2" and cfg["ssm_cfg"]["D_has_hdim"] is True


def test_checkpoint_checked_before_building(tmp_path, monkeypatch):
    """Wrong shapes, missing or unknown names, a Mamba-1 config, a config in neither layout, missing
    size fields: each a ValueError naming the problem, raised before a model is allocated."""
    good, refuse = refused_before_building(Case().build()[0], tmp_path, monkeypatch)
    refuse({**good, "ssm_cfg": {**good["ssm_cfg"], "d_state": 16}}, "shape")
    refuse({**good, "n_layer": 3}, "missing")
    refuse({**good, "n_layer": 1}, "unexpected")
    refuse({**good, "ssm_cfg": {}}, "Mamba-1")
    refuse({k: v for k, v in good.items() if k != "d_model"}, "d_model")
    refuse({"hidden_size": 16, "num_hidden_layers": 2, "vocab_size": 40}, "num_heads")
    refuse({"model_type": "llama", "dim": 4}, "neither layout")
    os.remove(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError):
        Mamba2LM.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------- a newcomer's findings

def test_save_pretrained_options_are_keyword_only(tmp_path):
    """m.save_pretrained("out", "transformers") once meant layout here and safe_serialization in MambaLM."""
    model, _, _ = Case(n_layer=1).build()
    with pytest.raises(TypeError):
        model.save_pretrained(tmp_path, "transformers")
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path, layout="transformers", safe_serialization=False)
    assert not os.listdir(tmp_path)   # nothing written by a refused call
    model.save_pretrained(tmp_path / "hf", layout="transformers")
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    model.save_pretrained(tmp_path / "official")   # the official format by default, as MambaLM's
    assert sorted(os.listdir(tmp_path / "official")) == ["config.json", "pytorch_model.bin"]


@pytest.mark.parametrize("extra, named", [
    # nheads = 2 * d_model / headdim follows: 2 * 64 / 8 = 16 and 2 * 64 / 4 = 32 against 2 * 16 / 8 = 4
    ({"d_model": 64}, ["d_model: 64 (official fields) against 16", "nheads: 16 (official fields) against 4"]),
    ({"d_model": 64, "ssm_cfg": {"layer": "Mamba2", "headdim": 4}},
     ["d_model: 64 (official fields) against 16", "headdim: 4 (official fields) against 8",
      "nheads: 32 (official fields) against 4"]),
    ({"ssm_cfg": {"layer": "Mamba2", "chunk_size": 4}}, ["chunk_size: 4 (official fields) against 8"]),
    # 40 rows (Case.vocab): an official padding to a multiple of 16 makes 48 of them
    ({"pad_vocab_size_multiple": 16}, ["padded_vocab_size: 48 (official fields) against 40"]),
], ids=["d_model", "d_model-and-headdim", "chunk_size", "vocab-padding"])
def test_official_and_transformers_fields_that_disagree_are_refused(tmp_path, monkeypatch, extra, named):
    """A transformers config.json with official fields beside it: both must describe the same model,
    as for Mamba-1 (impls.models.mamba.config_from_dict); each disagreement is named."""
    model, _, _ = Case(n_layer=1).build()
    model.save_pretrained(tmp_path, layout="transformers")
    cfg_path = tmp_path / "config.json"
    hf = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**hf, **extra}))
    with monkeypatch.context() as mp:
        never_built(mp, Mamba2LM)
        with pytest.raises(ValueError, match="disagree") as info:
            Mamba2LM.from_pretrained(tmp_path)
    for words in named:
        assert words in str(info.value)
    assert str(info.value).count("against") == len(named)


def test_official_and_transformers_fields_in_agreement_are_read(tmp_path):
    torch.manual_seed(0)   # 45 rows, unpadded: transformers' layout stores the row count
    model = Mamba2LM(Mamba2Config(d_model=16, n_layer=1, vocab_size=45, pad_vocab_size_multiple=1,
                                  ssm_cfg=dict(d_state=8, headdim=8, chunk_size=8))).eval()
    ids = torch.randint(0, 45, (1, 7))
    model.save_pretrained(tmp_path, layout="transformers")
    cfg_path = tmp_path / "config.json"
    hf = json.loads(cfg_path.read_text())
    # vocab_size 45 is not a multiple of the official default padding (8 would make 48 rows and
    # disagree): beside transformers' fields it is their row count unless pad_vocab_size_multiple is stated
    for extra in ({"d_model": 16}, {"d_model": 16, "n_layer": 1, "pad_vocab_size_multiple": 5},
                  {"n_layer": 1, "ssm_cfg": {"layer": "Mamba2", "headdim": 8, "chunk_size": 8}}):
        cfg_path.write_text(json.dumps({**hf, **extra}))
        loaded = Mamba2LM.from_pretrained(tmp_path)
        assert loaded.config.padded_vocab_size == 45 and loaded.config.d_model == 16
        with torch.no_grad():
            assert torch.equal(loaded(ids, impl="loop"), model(ids, impl="loop"))


@pytest.mark.parametrize("field, value", [
    ("d_model", 32.9), ("n_layer", "2"), ("vocab_size", 40.0), ("n_layer", True),
    ("ssm_cfg.chunk_size", 2.5), ("ssm_cfg.headdim", "8"), ("ssm_cfg.d_state", 8.0),
])
def test_sizes_must_be_integers(tmp_path, field, value):
    """config.json sizes are not truncated: 2.5 once loaded as chunk_size 2, "2" as n_layer 2."""
    model, _, _ = Case(n_layer=1).build()
    model.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if field.startswith("ssm_cfg."):
        cfg["ssm_cfg"][field.split(".")[1]] = value
    else:
        cfg[field] = value
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"{field} must be an integer"):
        Mamba2LM.from_pretrained(tmp_path)


@pytest.mark.parametrize("hf_field, official", [("hidden_size", "d_model"), ("chunk_size", "ssm_cfg.chunk_size")])
def test_transformers_sizes_must_be_integers(tmp_path, hf_field, official):
    model, _, _ = Case(n_layer=1).build()
    model.save_pretrained(tmp_path, layout="transformers")
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, hf_field: cfg[hf_field] + 0.5}))
    with pytest.raises(ValueError, match=f"{official} must be an integer"):
        Mamba2LM.from_pretrained(tmp_path)


def test_generate_with_a_scan_only_impl_asks_for_step_impl():
    """impl is the step implementation too unless step_impl is given (README): an impl without a
    step is an error naming step_impl, not a silent switch to another implementation."""
    model, _, ids = Case(n_layer=1, l=5).build()
    with pytest.raises(NotImplementedError, match=r"generate: impl 'chunked' has no step.*pass step_impl=\.\.\."):
        model.generate(ids, 2, impl="chunked")
    got = model.generate(ids, 2, impl="chunked", step_impl="recurrent")
    assert torch.equal(got, model.generate(ids, 2, mode="reforward", impl="chunked"))
    assert torch.equal(model.generate(ids, 2, mode="reforward", impl="chunked"),
                       model.generate(ids, 2, mode="reforward", impl="loop"))
