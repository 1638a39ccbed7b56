"""The models' front door (impls/models/lm.py, checkpoints.py; Mamba-1's config tables in
impls/models/mamba.py): configs and weight files checked before anything is built, another model's
folder named,
generation arguments checked and named, a refused step leaving the cache as it was, and sampling
with transformers' semantics (checked against transformers' own warpers and generate where it is
installed, a dev dependency).

Tiny models throughout: the file takes about 20 s here.
"""

import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import impls.models.checkpoints as checkpoints
from impls.models.lm import sampling_scores
from impls.models.mamba import MambaConfig, MambaLM, config_from_dict, parameter_shapes
from .model_helpers import (TINY, TINY_IDS, mamba_official_layout as official_layout, one_thread,  # noqa: F401
                            never_built, randomize_, tiny_mamba, tiny_mamba2, tiny_mamba3)


# ---------------------------------------------------------------------------- configs

def test_missing_size_fields_are_named():
    with pytest.raises(ValueError, match="d_model, n_layer, vocab_size"):
        MambaConfig()
    with pytest.raises(ValueError, match=r"n_layer\b.*transformers"):   # a transformers dict passed as official
        MambaConfig(d_model=16, vocab_size=50, hidden_size=16, num_hidden_layers=2)
    with pytest.raises(ValueError, match="official needs d_model, n_layer; transformers needs hidden_size, "
                                         "num_hidden_layers"):
        config_from_dict({"vocab_size": 50})
    with pytest.raises(ValueError, match="missing size field.*num_hidden_layers"):
        config_from_dict({"hidden_size": 16, "vocab_size": 50})
    with pytest.raises(ValueError, match=r"\(transformers layout\): missing size field\(s\) hidden_size, "
                                         r"num_hidden_layers"):
        config_from_dict({"model_type": "mamba", "state_size": 16, "vocab_size": 50})
    with pytest.raises(ValueError, match="missing size field.*vocab_size"):
        config_from_dict({"d_model": 16, "n_layer": 2})
    with pytest.raises(ValueError, match="disagree: d_model: 16 .official fields. against 24 .transformers"):
        config_from_dict({"d_model": 16, "n_layer": 2, "vocab_size": 50, "hidden_size": 24})
    with pytest.raises(ValueError, match="d_state: 8 .official fields. against 16"):
        config_from_dict({"d_model": 16, "n_layer": 2, "vocab_size": 50, "ssm_cfg": {"d_state": 8},
                          "hidden_size": 16, "state_size": 16})


def test_a_config_with_both_layouts_fields_in_agreement_is_read():
    """A converted checkpoint may keep its original fields beside transformers' (transformers ignores
    them): read when both give the same model, the official-only ones (rms_norm, ...) included."""
    config, layout = config_from_dict({
        "d_model": 24, "n_layer": 2, "ssm_cfg": {}, "rms_norm": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": 8, "hidden_size": 24, "num_hidden_layers": 2, "state_size": 16,
        "time_step_rank": 2, "vocab_size": 56, "model_type": "mamba", "d_inner": 48, "eos_token_id": 0})
    assert layout == "transformers"
    assert (config.d_model, config.n_layer, config.d_state, config.dt_rank, config.padded_vocab_size) == (
        24, 2, 16, 2, 56)
    assert config.transformers_extra == {"d_inner": 48, "eos_token_id": 0}
    with pytest.raises(ValueError, match="dt_rank: 2 .official fields. against 5"):
        config_from_dict({"d_model": 24, "n_layer": 2, "hidden_size": 24, "num_hidden_layers": 2,
                          "time_step_rank": 5, "vocab_size": 56})


def test_transformers_fields_this_block_cannot_compute_are_refused():
    sizes = {"hidden_size": 16, "num_hidden_layers": 2, "vocab_size": 50}
    with pytest.raises(ValueError, match="hidden_act = 'gelu'"):
        config_from_dict({**sizes, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="intermediate_size = 48"):
        config_from_dict({**sizes, "intermediate_size": 48})
    with pytest.raises(ValueError, match="rms_norm"):
        MambaLM(MambaConfig(d_model=8, n_layer=1, vocab_size=16, rms_norm=False)).save_pretrained(
            "/nonexistent", layout="transformers")
    with pytest.raises(ValueError, match="layout"):
        tiny_mamba().save_pretrained("/nonexistent", layout="hf")


def test_a_transformers_dict_maps_through_the_table():
    """The fields written out by hand from transformers' MambaConfig docs, read into the official ones."""
    config, layout = config_from_dict({
        "model_type": "mamba", "hidden_size": 24, "num_hidden_layers": 3, "vocab_size": 50, "state_size": 5,
        "conv_kernel": 3, "expand": 1, "time_step_rank": 4, "use_bias": True, "use_conv_bias": False,
        "layer_norm_epsilon": 1e-6, "residual_in_fp32": False, "tie_word_embeddings": False,
        "intermediate_size": 24, "eos_token_id": 0, "architectures": ["MambaForCausalLM"]})
    assert layout == "transformers"
    assert (config.d_model, config.n_layer, config.vocab_size, config.padded_vocab_size) == (24, 3, 50, 50)
    assert (config.d_state, config.d_conv, config.expand, config.dt_rank, config.d_inner) == (5, 3, 1, 4, 24)
    assert (config.bias, config.conv_bias, config.norm_epsilon, config.residual_in_fp32,
            config.tie_embeddings) == (True, False, 1e-6, False, False)
    assert config.extra == {} and config.transformers_extra == {"eos_token_id": 0}   # not the file fields


def test_a_transformers_folder_saved_in_the_official_layout_has_only_official_fields(tmp_path):
    """The official loader (mamba_ssm: MambaConfig(**config.json), a dataclass) refuses fields it does
    not know, so transformers' own fields go back to the transformers layout only."""
    model = tiny_mamba()
    model.save_pretrained(tmp_path / "hf", layout="transformers")
    _rewrite_config(tmp_path / "hf", eos_token_id=0, use_cache=True, initializer_range=0.1)
    loaded = MambaLM.from_pretrained(tmp_path / "hf")
    loaded.save_pretrained(tmp_path / "official")
    with open(tmp_path / "official" / "config.json") as f:
        official = json.load(f)
    assert set(official) == {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx",
                             "attn_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm",
                             "pad_vocab_size_multiple", "tie_embeddings", "norm_epsilon"}
    loaded.save_pretrained(tmp_path / "hf2", layout="transformers")
    with open(tmp_path / "hf2" / "config.json") as f:
        again = json.load(f)
    assert (again["eos_token_id"], again["use_cache"], again["initializer_range"]) == (0, True, 0.1)


@pytest.mark.parametrize("overrides", [{}, {"ssm_cfg": {"bias": True, "conv_bias": False, "d_state": 3}},
                                       {"rms_norm": False, "tie_embeddings": False}])
def test_parameter_shapes_are_the_models(overrides):
    """parameter_shapes (what weight files are checked against, before building) from the config
    alone: the model's own state_dict shapes, and the official layout."""
    config = MambaConfig(d_model=20, n_layer=2, vocab_size=61, **overrides)
    model = MambaLM(config)
    assert parameter_shapes(config) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if not overrides:
        assert parameter_shapes(config) == official_layout(20, 2, 61)


def _rewrite_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del config[k]
    with open(path, "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize("layout", ["official", "transformers"])
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_bad_folders_are_refused_before_anything_is_built(tmp_path, layout, safe):
    good = tiny_mamba(ssm_cfg={"d_state": 8})
    sizes = {"official": ("d_model", "n_layer"), "transformers": ("hidden_size", "num_hidden_layers")}[layout]
    folders = {}
    for name in ("missing", "shape", "names", "dropped", "ok"):
        folders[name] = tmp_path / name
        good.save_pretrained(folders[name], layout=layout, safe_serialization=safe)
    _rewrite_config(folders["missing"], **{sizes[1]: None})
    state_key = {"official": "ssm_cfg", "transformers": "state_size"}[layout]
    _rewrite_config(folders["shape"], **{state_key: {"d_state": 16} if layout == "official" else 16})
    other = "transformers" if layout == "official" else "official"   # the weights under the other layout's names
    good.save_pretrained(tmp_path / "other", layout=other, safe_serialization=safe)
    weights = "model.safetensors" if safe else "pytorch_model.bin"
    os.replace(tmp_path / "other" / weights, folders["names"] / weights)
    state = {k: v for k, v in good.state_dict().items() if k not in ("backbone.layers.1.mixer.D", "lm_head.weight")}
    if layout == "transformers":
        state = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in state.items()}
    if safe:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, folders["dropped"] / weights)
    else:
        torch.save(state, folders["dropped"] / weights)

    with pytest.MonkeyPatch.context() as mp:
        def refuse(*args, **kwargs):
            raise AssertionError("a model was built or a weight file read before the checks")
        mp.setattr(MambaLM, "__init__", refuse)
        mp.setattr(checkpoints, "load_weights", refuse)
        with pytest.raises(ValueError, match=f"missing size field.*{sizes[1]}"):
            MambaLM.from_pretrained(folders["missing"])
        with pytest.raises(ValueError, match=r"A_log: config gives \(32, 16\), file has \(32, 8\)"):
            MambaLM.from_pretrained(folders["shape"])
        with pytest.raises(KeyError, match=r"missing \['backbone.layers.1.mixer.D'\]"):
            MambaLM.from_pretrained(folders["dropped"])
        for name in ("ok", "names"):   # these get through the checks
            with pytest.raises(AssertionError, match="before the checks"):
                MambaLM.from_pretrained(folders[name])
    for name in ("ok", "names"):      # weights under the other layout's names load too (transformers' loader
        loaded = MambaLM.from_pretrained(folders[name])   # also accepts both)
        for k, v in good.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), (name, k)


# ---------------------------------------------------------------------------- generation arguments

@pytest.mark.parametrize("value", [0.5, 0.9, 1.7, -1.0])
def test_attention_mask_must_be_exactly_zero_or_one(value):
    model = tiny_mamba()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    mask[0, 0] = value
    for call in (lambda: model.generate(ids, 2, attention_mask=mask), lambda: model(ids, attention_mask=mask),
                 lambda: model.prefill(ids, attention_mask=mask)):
        with pytest.raises(ValueError, match=r"attention_mask: expected only 0 \(padding\) and 1"):
            call()


def test_attention_mask_in_any_dtype():
    model = tiny_mamba()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    expected = model.generate(ids, 3, attention_mask=mask)
    for dtype in (torch.bool, torch.float32, torch.float64, torch.int8):
        assert torch.equal(model.generate(ids, 3, attention_mask=mask.to(dtype)), expected), dtype


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (-7, ValueError), (2.7, TypeError), (2.0, TypeError),
                                        ("3", TypeError), (True, TypeError), (None, TypeError),
                                        (torch.tensor(2.0), TypeError)])
def test_max_new_tokens_must_be_a_non_negative_int(bad, error):
    model = tiny_mamba()
    with pytest.raises(error, match="max_new_tokens"):
        model.generate(torch.tensor([[1, 2]]), bad)


def test_max_new_tokens_integers():
    model = tiny_mamba()
    ids = torch.tensor([[1, 2]])
    expected = model.generate(ids, 3)
    assert expected.shape == (1, 5)
    for n in (np.int64(3), torch.tensor(3)):
        assert torch.equal(model.generate(ids, n), expected)
    tokens, logits = model.generate(ids, 0, return_logits=True)
    assert torch.equal(tokens, ids) and logits.shape == (1, 0, model.config.padded_vocab_size)


@pytest.mark.parametrize("ids, error, match", [
    (torch.zeros(2, 0, dtype=torch.long), ValueError, r"expected shape \(b, l >= 1\), got \(2, 0\)"),
    (torch.tensor([1, 2, 3]), ValueError, r"expected shape \(b, l >= 1\), got \(3,\)"),
    (torch.tensor([[1.0, 2.0]]), TypeError, "expected integer ids"),
    (torch.tensor([[1, 48]]), ValueError, r"ids must be in \[0, vocab_size = 45\), got id 48"),
    (torch.tensor([[1, 46]]), ValueError, r"ids must be in \[0, vocab_size = 45\), got id 46"),   # a padding row
    (torch.tensor([[-1, 2]]), ValueError, r"ids must be in \[0, vocab_size = 45\), got id -1"),
])
def test_bad_ids_are_named_in_forward_prefill_and_generate(ids, error, match):
    model = tiny_mamba()   # vocab 45, padded to 48 rows: rows 45-47 are padding, not tokens
    for where, call in (("forward", lambda: model(ids)), ("prefill", lambda: model.prefill(ids)),
                        ("generate", lambda: model.generate(ids, 2))):
        with pytest.raises(error, match=f"{where}: input_ids: {match}"):
            call()


def _snapshot(cache):
    return ([t.clone() for c in cache.layers for t in (c.ssm_state, c.conv_store)], cache.phase)


def _same(cache, snapshot):
    tensors, phase = snapshot
    return cache.phase == phase and all(torch.equal(a, b) for a, b in zip(
        [t for c in cache.layers for t in (c.ssm_state, c.conv_store)], tensors))


STEP_PATHS = {"fused": dict(), "module-by-module (LayerNorm)": dict(rms_norm=False),
              "module-by-module (bfloat16)": dict()}


@pytest.mark.parametrize("path", STEP_PATHS)
def test_a_refused_step_names_the_token_and_leaves_the_cache_as_it_was(path):
    model = tiny_mamba(**STEP_PATHS[path])
    if "bfloat16" in path:
        model = model.to(torch.bfloat16)
    assert (model.new_cache(1).stream is not None) == (path == "fused")
    ids = torch.tensor([[3, 1, 4], [1, 5, 9]])
    _, cache = model.prefill(ids)
    _, twin = model.prefill(ids)
    bad_steps = [
        (torch.tensor([[2], [6]]), ValueError, r"step: token: expected shape \(b=2,\).*got \(2, 1\)"),
        (torch.tensor([2, 6, 5]), ValueError, r"step: token: expected shape \(b=2,\).*got \(3,\)"),
        (torch.tensor(2), ValueError, r"step: token: expected shape \(b=2,\).*got \(\)"),
        (torch.tensor([2.0, 6.0]), TypeError, "step: token: expected integer ids"),
        ([2, 6], TypeError, "step: token: expected a tensor"),
        (torch.tensor([2, 48]), ValueError, r"step: token: ids must be in \[0, 48\)"),
        (torch.tensor([-1, 6]), ValueError, r"step: token: ids must be in \[0, 48\)"),
    ]
    for first in (True, False):   # before and after the first good step (the fused path checks once)
        for token, error, match in bad_steps:
            before = _snapshot(cache)
            with pytest.raises(error, match=match):
                model.step(token, cache)
            assert _same(cache, before), f"{path}: a refused step ({match}) changed the cache"
        for impl, error in (("loop", NotImplementedError), ("no-such-impl", ValueError)):
            before = _snapshot(cache)
            with pytest.raises(error, match="no step function" if error is NotImplementedError else "unknown"):
                model.step(torch.tensor([2, 6]), cache, impl=impl)
            assert _same(cache, before)
        if first:
            got, expected = model.step(torch.tensor([2, 6]), cache), model.step(torch.tensor([2, 6]), twin)
            assert torch.equal(got, expected), f"{path}: refused steps changed what a good step computes"
    assert torch.equal(model.step(torch.tensor([7, 7]), cache), model.step(torch.tensor([7, 7]), twin))


def test_generate_refuses_a_step_implementation_without_a_step_before_prefilling(monkeypatch):
    model = tiny_mamba()
    monkeypatch.setattr(MambaLM, "prefill", lambda *a, **k: pytest.fail("prefilled before checking step_impl"))
    with pytest.raises(NotImplementedError, match="'parallel' has no step function"):
        model.generate(torch.tensor([[1, 2]]), 3, step_impl="parallel")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(temperature=0.7), ValueError, "temperature given but do_sample=False"),
    (dict(top_k=5, top_p=0.9), ValueError, "top_k, top_p given but do_sample=False"),
    (dict(generator=torch.Generator()), ValueError, "generator given but do_sample=False"),
    (dict(do_sample=1), TypeError, "do_sample"),
    (dict(do_sample=True, temperature=0.0), ValueError, "temperature: expected a positive finite"),
    (dict(do_sample=True, temperature=-1.0), ValueError, "temperature"),
    (dict(do_sample=True, temperature=math.inf), ValueError, "temperature"),
    (dict(do_sample=True, temperature="hot"), TypeError, "temperature"),
    (dict(do_sample=True, top_k=-1), ValueError, "top_k"),
    (dict(do_sample=True, top_k=2.5), TypeError, "top_k"),
    (dict(do_sample=True, top_p=1.5), ValueError, "top_p"),
    (dict(do_sample=True, top_p=-0.1), ValueError, "top_p"),
    (dict(do_sample=True, generator=123), TypeError, "generator"),
    (dict(eos_token_id=48), ValueError, r"eos_token_id: expected ids in \[0, 48\)"),
    (dict(eos_token_id=[1, "x"]), ValueError, "eos_token_id"),
    (dict(eos_token_id=[]), ValueError, "eos_token_id: an empty list"),
    (dict(eos_token_id=1, pad_token_id=-1), ValueError, "pad_token_id"),
    (dict(pad_token_id=0), ValueError, "pad_token_id pads rows finished by eos_token_id"),
])
def test_decoding_arguments_are_checked(kwargs, error, match):
    model = tiny_mamba()
    with pytest.raises(error, match=match):
        model.generate(torch.tensor([[1, 2]]), 3, **kwargs)


# ---------------------------------------------------------------------------- sampling

def _hf_warpers(temperature, top_k, top_p):
    """transformers' own warpers, in its generate's order (utils.py, _get_logits_processor)."""
    gen = pytest.importorskip("transformers.generation.logits_process")
    chain = []
    if temperature != 1.0:
        chain.append(gen.TemperatureLogitsWarper(temperature))
    if top_k:
        chain.append(gen.TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        chain.append(gen.TopPLogitsWarper(top_p))

    def apply(scores):
        for w in chain:
            scores = w(None, scores)
        return scores
    return apply


@settings(deadline=None)
@example(seed=0, b=1, V=7, temperature=1.0, top_k=3, top_p=None, ties=True)
@example(seed=1, b=2, V=5, temperature=0.5, top_k=None, top_p=0.0, ties=False)
@example(seed=2, b=2, V=9, temperature=2.0, top_k=9, top_p=1.0, ties=True)
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 3), V=st.integers(1, 40),
       temperature=st.sampled_from([1.0, 0.3, 0.7, 1.5, 4.0]), top_k=st.one_of(st.none(), st.integers(0, 45)),
       top_p=st.one_of(st.none(), st.floats(0.0, 1.0)), ties=st.booleans())
def test_sampling_scores_are_transformers_warpers(seed, b, V, temperature, top_k, top_p, ties):
    """The same scores, -inf where a token is filtered, as transformers' warpers give, bit for bit,
    on the same float32 logits (tied logits drawn too: a top-k cut inside a tie keeps all of it)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, V, generator=gen) * 3
    if ties:
        logits = logits.round()
    expected = _hf_warpers(temperature, top_k, top_p)(logits.clone())
    got = sampling_scores(logits, temperature, top_k, top_p)
    assert torch.equal(got, expected), (got, expected)


def test_sampling_scores_by_hand():
    """Written from the definitions, not from either implementation."""
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.1]]))
    inf = -math.inf
    assert torch.equal(sampling_scores(logits, top_k=1), torch.tensor([[logits[0, 0], inf, inf, inf]]))
    assert torch.equal(sampling_scores(logits, top_k=2), logits.masked_fill(torch.tensor([[0, 0, 0, 1]]).bool(), inf))
    kept = sampling_scores(logits, top_p=0.6).isfinite()   # 0.5 < 0.6: one 0.2 more reaches 0.7
    assert kept.sum() == 2 and kept[0, 0] and not kept[0, 3]
    assert sampling_scores(logits, top_p=0.0).isfinite().sum() == 1   # the most probable always stays
    assert torch.allclose(sampling_scores(logits, temperature=0.5), logits * 2)


def _sampled(model, ids, mode, seed, **kw):
    return model.generate(ids, 12, mode=mode, do_sample=True, generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.6, top_k=8), dict(top_p=0.8), dict(top_k=5, top_p=0.9)])
def test_sampling_is_reproducible_and_the_same_in_both_modes(kw):
    """Float64 so the two modes' logits agree to ~1e-15 and no draw can fall between them."""
    model = tiny_mamba(seed=2, d_model=24).double()
    ids = torch.tensor([[3, 1, 4, 1], [5, 9, 2, 6]])
    a = _sampled(model, ids, "recurrent", 7, **kw)
    assert torch.equal(a, _sampled(model, ids, "recurrent", 7, **kw))
    assert torch.equal(a, _sampled(model, ids, "reforward", 7, **kw))
    others = [_sampled(model, ids, "recurrent", s, **kw) for s in (8, 9, 10)]
    assert any(not torch.equal(a, o) for o in others), "sampling gave the same tokens for every seed"
    assert (a[:, 4:] < model.config.vocab_size).all()


def test_sampling_matches_transformers_generate_under_the_same_seed(tmp_path):
    """Our sampling and transformers' generate, same weights, same global seed (both draw with
    torch.multinomial from softmax of float32 scores): the same tokens."""
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ours = tiny_mamba(seed=3, d_model=24, vocab_size=64).eval()
    ours.save_pretrained(tmp_path, layout="transformers")
    theirs = transformers.MambaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[3, 1, 4, 1], [5, 9, 2, 6]])
    for kw in (dict(temperature=0.8, top_k=0), dict(top_k=6), dict(top_k=0, top_p=0.7)):
        torch.manual_seed(11)
        expected = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=True,
                                   eos_token_id=None, **kw)
        for mode in ("recurrent", "reforward"):
            torch.manual_seed(11)
            got = ours.generate(ids, 10, mode=mode, do_sample=True, **kw)
            assert torch.equal(got, expected), (kw, mode, got, expected)


def test_eos_stops_as_in_transformers(tmp_path):
    """A row that emits eos_token_id gets pad_token_id after it (default: the first eos id), and
    generation stops once every row has: against transformers' generate (greedy: exact tokens)."""
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ours = randomize_(tiny_mamba(seed=1, d_model=24, vocab_size=64, tie_embeddings=False).eval(), 1)
    ours.save_pretrained(tmp_path, layout="transformers")
    theirs = transformers.MambaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[3, 1, 4, 1], [5, 9, 2, 6]])
    free = ours.generate(ids, 10)
    eos = int(free[0, 6])                                      # row 0's third new token
    assert len(set(free[0, 4:].tolist())) > 3, free            # a test of stopping needs varied tokens
    for kw in (dict(eos_token_id=eos, pad_token_id=1), dict(eos_token_id=[63, eos])):
        stops = set(kw["eos_token_id"]) if isinstance(kw["eos_token_id"], list) else {kw["eos_token_id"]}
        stop = 4 + next(i for i, t in enumerate(free[0, 4:].tolist()) if t in stops) + 1
        pad = kw.get("pad_token_id", 63)
        expected = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                   **kw)
        for mode in ("recurrent", "reforward"):
            tokens, logits = ours.generate(ids, 10, mode=mode, return_logits=True, **kw)
            assert torch.equal(tokens, expected), (kw, mode, tokens, expected)
            assert logits.shape[1] == tokens.shape[1] - 4
            assert torch.equal(tokens[0, :stop], free[0, :stop]) and (tokens[0, stop:] == pad).all(), (kw, tokens)
    stop = 4 + free[0, 4:].tolist().index(eos) + 1
    single = ours.generate(ids[:1], 10, eos_token_id=eos)   # its only row finishes: the output is shorter
    assert torch.equal(single, free[:1, :stop]) and stop < 14


# ---------------------------------------------------------------------------- a newcomer's findings

def test_save_pretrained_options_are_keyword_only(tmp_path):
    """save_pretrained(folder, "transformers") once wrote the official layout here (the second
    argument was safe_serialization, and in Mamba2LM layout): now a TypeError in both."""
    with pytest.raises(TypeError):
        tiny_mamba().save_pretrained(tmp_path, "transformers")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("field, value", [
    ("d_model", 32.9), ("n_layer", "2"), ("vocab_size", 45.0), ("n_layer", True), ("pad_vocab_size_multiple", 8.5),
    ("ssm_cfg.d_state", 2.5), ("ssm_cfg.d_conv", "4"), ("ssm_cfg.dt_rank", 1.5),
])
def test_sizes_must_be_integers(field, value):
    """Sizes are not truncated: d_model 32.9 once built a 32-wide model, n_layer "2" two layers."""
    cfg = {"d_model": 16, "n_layer": 2, "vocab_size": 45, "ssm_cfg": {}}
    if field.startswith("ssm_cfg."):
        cfg["ssm_cfg"][field.split(".")[1]] = value
    else:
        cfg[field] = value
    with pytest.raises(ValueError, match=f"{field} must be an integer"):
        config_from_dict(cfg)


@pytest.mark.parametrize("hf_field, official", [("hidden_size", "d_model"), ("state_size", "ssm_cfg.d_state"),
                                                ("num_hidden_layers", "n_layer")])
def test_transformers_sizes_must_be_integers(hf_field, official):
    cfg = {"model_type": "mamba", "hidden_size": 16, "num_hidden_layers": 2, "vocab_size": 48, "state_size": 8}
    with pytest.raises(ValueError, match=f"{official} must be an integer"):
        config_from_dict({**cfg, hf_field: cfg[hf_field] + 0.5})


@pytest.mark.parametrize("make", TINY, ids=TINY_IDS)
def test_from_pretrained_dtype_and_a_corrupt_weight_file(tmp_path, make):
    model = make()
    model.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(TypeError, match="dtype: expected a torch.dtype"):
        type(model).from_pretrained(tmp_path, dtype="float16")
    assert type(model).from_pretrained(tmp_path, dtype=torch.float16).dtype == torch.float16
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        type(model).from_pretrained(tmp_path)


@pytest.mark.parametrize("make", TINY, ids=TINY_IDS)
def test_a_float64_checkpoint_loads_bit_for_bit(tmp_path, make):
    """from_pretrained(dtype=float64) builds in float64: no weight passes through float32 on the way."""
    model = make().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)                 # digits float32 cannot hold
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, dtype=torch.float64)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


@pytest.mark.parametrize("make", TINY, ids=TINY_IDS)
def test_an_implementation_without_gradients_names_the_models_parameters(make):
    """Autograd on and the model's own parameters requiring grad, not an input: said so, with the way out."""
    model, ids = make(), torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(NotImplementedError, match=r"model's parameters requiring grad.*torch.no_grad\(\)"):
        model(ids, impl="recurrent")
    with torch.no_grad():
        assert model(ids, impl="recurrent").shape == (1, 3, model.config.padded_vocab_size)


# Each model's folders, in each layout it writes: (writer, layout, what a reader must call it)
FOLDERS = [(tiny_mamba, "official", r"ssm_cfg.layer is 'Mamba1' \(the official default\): a Mamba-1 checkpoint "
                                    r"\(load it with impls.models.mamba.MambaLM\)"),
           (tiny_mamba, "transformers", r"model_type 'mamba': a Mamba-1 checkpoint \(load it with impls.models.mamba.MambaLM\)"),
           (tiny_mamba2, "official", r"ssm_cfg.layer is 'Mamba2': a Mamba-2 checkpoint "
                                     r"\(load it with impls.models.mamba2.Mamba2LM\)"),
           (tiny_mamba2, "transformers", r"model_type 'mamba2': a Mamba-2 checkpoint "
                                         r"\(load it with impls.models.mamba2.Mamba2LM\)"),
           (tiny_mamba3, "official", r"ssm_cfg.layer is 'Mamba3': a Mamba-3 checkpoint "
                                     r"\(load it with impls.models.mamba3.Mamba3LM\)")]


@pytest.mark.parametrize("writer, layout, named", FOLDERS, ids=[f"{w.__name__}-{lay}" for w, lay, _ in FOLDERS])
@pytest.mark.parametrize("reader", TINY, ids=TINY_IDS)
def test_another_models_folder_is_named(tmp_path, monkeypatch, reader, writer, layout, named):
    """Every model's from_pretrained given another model's folder says which model it is and which
    loader reads it, before building anything."""
    if reader is writer:
        pytest.skip("a model's own folder")
    writer().save_pretrained(tmp_path, layout=layout)
    model = reader()
    own = checkpoints.MODELS[model.config.ssm_cfg.get("layer", "Mamba1")][0]     # "Mamba-2", ...
    never_built(monkeypatch, type(model))
    with pytest.raises(ValueError, match=f"{named}, not a {own} one"):
        type(model).from_pretrained(tmp_path)


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2", "Mamba3"])
@pytest.mark.parametrize("make", TINY, ids=TINY_IDS)
def test_another_models_layer_is_named_by_each_config(make, layer):
    config = make().config
    if config.ssm_cfg.get("layer", "Mamba1") == layer:
        pytest.skip("the model's own layer")
    name, loader = checkpoints.MODELS[layer]
    with pytest.raises(NotImplementedError, match=rf"that is a {name} checkpoint \(load it with {loader}\)"):
        type(config)(d_model=16, n_layer=1, vocab_size=20, ssm_cfg={"layer": layer})


@pytest.mark.parametrize("make", TINY, ids=TINY_IDS)
def test_layernorm_checkpoints_round_trip(tmp_path, make):
    """A model with LayerNorm blocks (rms_norm false) carries their biases, norm_f's included: its
    parameter_shapes (what a weight file is checked against) are its own, and its folder loads."""
    model = make(rms_norm=False)
    assert type(model).parameter_shapes(model.config) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert "backbone.norm_f.bias" in model.state_dict()
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


class _Runs:
    """A pickle that would run code when loaded (writes a file)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("make", TINY, ids=TINY_IDS)
def test_no_pickled_code_runs(tmp_path, make):
    model = make()
    model.save_pretrained(tmp_path)   # pytorch_model.bin
    marker = tmp_path / "ran"
    state = dict(model.state_dict())
    state["backbone.norm_f.weight"] = _Runs(str(marker))
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError):
        type(model).from_pretrained(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("make", TINY, ids=TINY_IDS)
def test_a_file_given_for_the_folder_is_named(tmp_path, make):
    model = make()
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"folder: expected a checkpoint folder .*got the file .*config.json'; "
                                         r"pass its folder"):
        type(model).from_pretrained(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        type(model).from_pretrained(tmp_path / "elsewhere")


@pytest.mark.parametrize("make", TINY, ids=TINY_IDS)
def test_ids_past_vocab_size_in_the_padding_rows_are_refused(make):
    model = make()   # vocab 45 in 48 rows
    assert model.config.padded_vocab_size == 48
    ids = torch.tensor([[3, 46]])
    for where, call in (("forward", lambda: model(ids)), ("prefill", lambda: model.prefill(ids)),
                        ("generate", lambda: model.generate(ids, 1))):
        with pytest.raises(ValueError, match=rf"^{where}: input_ids: .*vocab_size = 45\), got id 46"):
            call()


@pytest.mark.parametrize("make", TINY, ids=TINY_IDS)
def test_attention_mask_errors_name_the_method(make):
    model = make()
    ids = torch.zeros(1, 3, dtype=torch.long)
    for method, call in [("generate", lambda m: model.generate(ids, 1, attention_mask=m)),
                         ("forward", lambda m: model(ids, attention_mask=m)),
                         ("prefill", lambda m: model.prefill(ids, attention_mask=m))]:
        with pytest.raises(ValueError, match=f"^{method}: attention_mask: only left padding"):
            call(torch.tensor([[1, 0, 1]]))
        with pytest.raises(TypeError, match=f"^{method}: attention_mask: expected a tensor"):
            call([[1, 1, 1]])


@pytest.mark.parametrize("ssm_cfg, match", [
    (dict(expand="2"), r"ssm_cfg.expand must be a number, got '2' \(str\)"),     # once d_inner 2222
    (dict(expand=True), r"ssm_cfg.expand must be a number, got True"),
    (dict(expand=0), r"d_inner = expand \* d_model = 0 \* 4 must be a positive integer"),
    (dict(expand=-1), r"d_inner = expand \* d_model = -1 \* 4 must be a positive integer"),
    (dict(expand=1.3), r"d_inner = expand \* d_model = 1.3 \* 4 must be a positive integer"),   # not truncated
    (dict(d_stat=4), r"unknown ssm_cfg keys \['d_stat'\]"),
    (dict(exapnd=4), r"unknown ssm_cfg keys \['exapnd'\]"),
    (dict(d_state=0), r"sizes must be >= 1, got \{'d_state': 0\}"),
    (dict(d_conv=-2), r"sizes must be >= 1, got \{'d_conv': -2\}"),
    (dict(dt_rank=0), r"ssm_cfg.dt_rank = 0: expected 'auto' or an integer >= 1"),
    (dict(dt_min="0.001"), r"ssm_cfg.dt_min must be a number, got '0.001'"),
    (dict(bias="false"), r"ssm_cfg.bias must be true or false, got 'false'"),
    (dict(dt_init="uniform"), r"ssm_cfg.dt_init = 'uniform': expected one of \('random', 'constant'\)"),
    ([("d_state", 4)], r"ssm_cfg must be a dict"),
])
def test_mamba1_ssm_cfg_is_checked(ssm_cfg, match):
    """Mamba-1's ssm_cfg is checked as Mamba-2's and Mamba-3's are (one helper): misspelled keys once
    fell back to the defaults silently, and expand "2" made d_inner 2222."""
    with pytest.raises(ValueError, match=f"^MambaConfig: {match}"):
        MambaConfig(d_model=4, n_layer=1, vocab_size=20, ssm_cfg=ssm_cfg)
    assert MambaConfig(d_model=4, n_layer=1, vocab_size=20, ssm_cfg=dict(expand=1.5, layer="Mamba1")).d_inner == 6


@pytest.mark.parametrize("ssm, match", [
    (dict(expand="2"), r"ssm_cfg.expand must be a number, got '2' \(str\)"),
    (dict(dt_min="0.001"), r"ssm_cfg.dt_min must be a number, got '0.001'"),
    (dict(d_stat=4), r"unknown ssm_cfg keys \['d_stat'\]"),
    (dict(d_state=-8), r"sizes must be >= 1, got \{'d_state': -8\}"),
])
@pytest.mark.parametrize("make", TINY, ids=TINY_IDS)
def test_every_config_checks_its_ssm_cfg_alike(make, ssm, match):
    config = make().config
    with pytest.raises(ValueError, match=f"^{type(config).__name__}: {match}"):
        type(config)(d_model=16, n_layer=1, vocab_size=20, ssm_cfg={**config.ssm_cfg, **ssm})


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64, torch.float8_e4m3fn])
@pytest.mark.parametrize("make", TINY, ids=TINY_IDS)
def test_from_pretrained_refuses_a_dtype_the_models_do_not_run_in(tmp_path, monkeypatch, make, dtype):
    """int64 once failed deep in nn.Module.to, complex64 loaded and then blamed ``u`` in forward."""
    model = make()
    model.save_pretrained(tmp_path)
    never_built(monkeypatch, type(model))
    with pytest.raises(TypeError, match=rf"^from_pretrained: dtype: expected one of torch.float16, torch.bfloat16, "
                                        rf"torch.float32, torch.float64 or None, got {dtype}$"):
        type(model).from_pretrained(tmp_path, dtype=dtype)


@pytest.mark.parametrize("text, match", [
    ('{"d_model": 16,', r"not valid JSON \(Expecting property name.*line 1 column 16"),
    ("[16, 2, 45]", r"expected a JSON object, got a list"),
])
@pytest.mark.parametrize("make", TINY, ids=TINY_IDS)
def test_a_malformed_config_json_is_named(tmp_path, monkeypatch, make, text, match):
    """Once a bare JSONDecodeError without the file, or AttributeError: 'list' object has no attribute 'get'."""
    model = make()
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(text)
    never_built(monkeypatch, type(model))
    with pytest.raises(ValueError, match=rf"^from_pretrained: .*config.json: {match}"):
        type(model).from_pretrained(tmp_path)


@pytest.mark.parametrize("text, match", [("{not json", "not valid JSON"),
                                         ('{"weight_map": ["model-1.safetensors"]}', 'expected a "weight_map" object')])
def test_a_malformed_shard_index_is_named(tmp_path, monkeypatch, text, match):
    """Once a bare JSONDecodeError, or a TypeError from inside the loader."""
    model = TINY[0]()
    model.save_pretrained(tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(ValueError, match=rf"^from_pretrained: .*model.safetensors.index.json: {match}"):
        type(model).from_pretrained(tmp_path)


@pytest.mark.parametrize("bad, error", [(2.0, TypeError), (True, TypeError), ("2", TypeError), (-1, ValueError)])
@pytest.mark.parametrize("make", TINY, ids=TINY_IDS)
def test_num_last_tokens_must_be_a_non_negative_int(make, bad, error):
    model, ids = make(), torch.zeros(1, 3, dtype=torch.long)
    with torch.no_grad():
        with pytest.raises(error, match=r"^forward: num_last_tokens: expected a non-negative int"):
            model(ids, num_last_tokens=bad)
        assert torch.equal(model(ids, num_last_tokens=np.int64(2)), model(ids)[:, -2:])
