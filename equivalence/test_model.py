"""The Mamba language model (impls/models/mamba.py): recurrent decoding and re-forwarding give the same greedy
tokens for every implementation, their per-step logits meet the tolerance policy, left-padded batches
decode as if unpadded, and checkpoints use the exact official layout.

The oracle for logits is the float64 model run through the loop over the whole token sequence (one
forward: the logits at every generated position at once); the baseline is the same forward of the
float32 model through the loop. ``length`` for the policy is that of the scan's output y over the
whole sequence, tolerance.terms("y", l, n): the logits are y passed through the projections, whose
own rounding the loop run shares (it does the very same projections), so the loop's error covers it.
"""

import dataclasses
import json
import os

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import impls
from impls.models.mamba import MambaConfig, MambaLM
from .model_helpers import mamba_official_layout as official_layout, one_thread, tiny_mamba  # noqa: F401
from .tolerance import compare, terms


# ---------------------------------------------------------------------------- the official layout

# mamba-130m's config.json as published (state-spaces/mamba-130m), and a few of its shapes, literally.
MAMBA_130M_CONFIG = {"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {}, "rms_norm": True,
                     "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8}
MAMBA_130M_SHAPES = {
    "backbone.embedding.weight": (50280, 768),
    "backbone.layers.0.mixer.in_proj.weight": (3072, 768),
    "backbone.layers.0.mixer.conv1d.weight": (1536, 1, 4),
    "backbone.layers.0.mixer.x_proj.weight": (80, 1536),
    "backbone.layers.0.mixer.dt_proj.weight": (1536, 48),
    "backbone.layers.0.mixer.A_log": (1536, 16),
    "backbone.layers.23.mixer.out_proj.weight": (768, 1536),
    "backbone.norm_f.weight": (768,),
    "lm_head.weight": (50280, 768),
}


def test_parameter_names_and_shapes_match_the_official_layout():
    with torch.device("meta"):  # the real mamba-130m size, without allocating it
        model = MambaLM(MambaConfig(**MAMBA_130M_CONFIG))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == official_layout(768, 24, 50277)
    assert all(shapes[k] == v for k, v in MAMBA_130M_SHAPES.items())
    assert model.lm_head.weight is model.backbone.embedding.weight  # tied
    assert sum(p.numel() for p in model.parameters()) == 129_135_360  # "130m", counted once though tied

    tiny = MambaLM(MambaConfig(d_model=20, n_layer=3, vocab_size=61))
    assert {k: tuple(v.shape) for k, v in tiny.state_dict().items()} == official_layout(20, 3, 61)


def test_official_initialisation():
    torch.manual_seed(0)
    c = MambaConfig(d_model=32, n_layer=2, vocab_size=64, ssm_cfg={"d_state": 8})
    mixer = MambaLM(c).backbone.layers[1].mixer
    assert torch.equal(mixer.A_log, torch.log(torch.arange(1, 9, dtype=torch.float32)).expand(64, 8))
    assert torch.equal(mixer.D, torch.ones(64))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias.double())
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert c.dt_rank == 2 and c.d_inner == 64 and c.padded_vocab_size == 64


def test_config_defaults_and_unknown_fields():
    c = MambaConfig(**MAMBA_130M_CONFIG, some_future_field=[1, 2])
    assert (c.d_state, c.d_conv, c.expand, c.dt_rank, c.d_inner) == (16, 4, 2, 48, 1536)
    assert (c.conv_bias, c.bias, c.tie_embeddings, c.norm_epsilon, c.padded_vocab_size) == (True, False, True, 1e-5, 50280)
    assert c.to_dict()["some_future_field"] == [1, 2] and c.to_dict()["ssm_cfg"] == {}
    with pytest.raises(NotImplementedError, match="attn_layer_idx"):
        MambaConfig(d_model=8, n_layer=2, vocab_size=16, attn_layer_idx=[1])


# ---------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("safe", [False, True], ids=["bin", "safetensors"])
def test_save_then_from_pretrained_round_trip(tmp_path, safe):
    model = tiny_mamba(ssm_cfg={"d_state": 8, "expand": 2}, some_unknown_field="kept")
    model.save_pretrained(tmp_path, safe_serialization=safe)
    weights = "model.safetensors" if safe else "pytorch_model.bin"
    assert sorted(os.listdir(tmp_path)) == sorted(["config.json", weights])

    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    assert written == {"d_model": 16, "d_intermediate": 0, "n_layer": 2, "vocab_size": 45,
                       "ssm_cfg": {"d_state": 8, "expand": 2}, "attn_layer_idx": [], "attn_cfg": {},
                       "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
                       "pad_vocab_size_multiple": 8, "tie_embeddings": True, "norm_epsilon": 1e-5,
                       "some_unknown_field": "kept"}
    layout = official_layout(16, 2, 45, d_state=8)
    if safe:
        from safetensors.torch import load_file
        stored = load_file(tmp_path / weights)
        layout.pop("lm_head.weight")  # tied: safetensors stores no shared tensors
    else:
        stored = torch.load(tmp_path / weights, weights_only=True)
    assert {k: tuple(v.shape) for k, v in stored.items()} == layout

    loaded = MambaLM.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.backbone.embedding.weight
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_from_pretrained_reads_an_official_folder(tmp_path):
    """A folder written the way the official checkpoints are (their config.json fields only, a
    torch.save'd state dict with lm_head.weight stored beside the embedding), built from the layout."""
    cfg = {**MAMBA_130M_CONFIG, "d_model": 16, "n_layer": 2, "vocab_size": 45}
    gen = torch.Generator().manual_seed(5)
    state = {k: torch.randn(shape, generator=gen) for k, shape in official_layout(16, 2, 45).items()}
    state["lm_head.weight"] = state["backbone.embedding.weight"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = MambaLM.from_pretrained(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    state.pop("backbone.norm_f.weight")
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(KeyError, match="norm_f"):
        MambaLM.from_pretrained(tmp_path)


def test_block_agrees_with_an_independent_implementation():
    """The same weights through mamba.py's Mamba blocks (mambapy, written from the paper and the
    official code independently of this project): catches a wrongly wired block, which agreement
    between our own two decoding modes cannot."""
    mambapy = pytest.importorskip("mambapy.mamba")
    model = tiny_mamba(seed=3, d_model=24)
    c = model.config
    other = mambapy.Mamba(mambapy.MambaConfig(d_model=c.d_model, n_layers=c.n_layer, pscan=False))
    other.load_state_dict({k[len("backbone."):]: v for k, v in model.state_dict().items()
                           if k.startswith("backbone.layers.")}, strict=True)
    ids = torch.randint(0, c.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        norm_f = model.backbone.norm_f
        got = norm_f(other(model.backbone.embedding(ids))) @ model.backbone.embedding.weight.T
        oracle = model.double()(ids, impl="loop")
        baseline = model.float()(ids, impl="loop")
    result = compare(got, oracle, baseline, terms("y", ids.shape[1], c.d_state))
    assert result.ok, result.describe()


# ---------------------------------------------------------------------------- decoding equivalence

@dataclasses.dataclass(frozen=True)
class ModelCase:
    d_model: int
    n_layer: int
    vocab: int
    prompt: int   # prompt length l
    new: int      # max_new_tokens T
    b: int = 1
    seed: int = 0

    @property
    def id(self):
        return f"m{self.d_model}-L{self.n_layer}-v{self.vocab}-l{self.prompt}-T{self.new}-b{self.b}-s{self.seed}"

    def build(self):
        """(float32 model, float64 copy, prompt ids (b, l))."""
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model = MambaLM(MambaConfig(d_model=self.d_model, n_layer=self.n_layer, vocab_size=self.vocab))
        model64 = MambaLM(model.config)
        model64.load_state_dict(model.state_dict())
        ids = torch.randint(0, self.vocab, (self.b, self.prompt), generator=torch.Generator().manual_seed(self.seed))
        return model, model64.double(), ids


model_cases = st.builds(ModelCase, d_model=st.integers(8, 32), n_layer=st.integers(1, 2), vocab=st.integers(16, 64),
                        prompt=st.integers(1, 12), new=st.integers(1, 8), b=st.integers(1, 2),
                        seed=st.integers(0, 2**31 - 1))
TINY = ModelCase(d_model=8, n_layer=1, vocab=16, prompt=2, new=2)


@torch.no_grad()
def teacher_forced(model, tokens, l, mask=None):
    """Logits that chose tokens[:, l:], from one forward of the loop over tokens[:, :-1]: (b, T, v)."""
    return model(tokens[:, :-1], impl="loop", attention_mask=None if mask is None else mask[:, :-1])[:, l - 1:]


def check_mode(case, model, model64, ids, mode, impl, expected_tokens, mask=None):
    """Generate in ``mode`` through ``impl``; the per-step logits meet the policy against the float64
    oracle on the same tokens, and the tokens are the expected ones. A different token is accepted
    only where the oracle's top two logits are closer than the policy's bound (a true tie, decided by
    rounding), and then the rest of that row is not comparable."""
    step_impl = impl if impls.get(impl).step is not None else "recurrent"
    tokens, logits = model.generate(ids, case.new, mode=mode, impl=impl, step_impl=step_impl,
                                    attention_mask=mask, return_logits=True)
    full_mask = None if mask is None else torch.cat([mask, torch.ones_like(tokens[:, ids.shape[1]:])], 1)
    oracle = teacher_forced(model64, tokens, ids.shape[1], full_mask)
    baseline = teacher_forced(model, tokens, ids.shape[1], full_mask)
    where = f"{case!r}, mode={mode!r}, impl={impl!r}"
    result = compare(logits, oracle, baseline, terms("y", tokens.shape[1], model.config.d_state))
    assert result.ok, f"{where}: per-step logits: {result.describe()}"
    l, V = ids.shape[1], model.config.vocab_size
    for row in range(tokens.shape[0]):
        diff = (tokens[row, l:] != expected_tokens[row, l:]).nonzero()
        if len(diff):
            s = int(diff[0])
            a, b = int(tokens[row, l + s]), int(expected_tokens[row, l + s])
            gap = abs(float(oracle[row, s, a] - oracle[row, s, b]))
            assert gap <= 2 * result.bound, (f"{where}: row {row} chose token {a} at step {s} where the float32 "
                                             f"loop chose {b}; their float64 logits differ by {gap:.3g}, more than "
                                             f"rounding can explain ({2 * result.bound:.3g})")
    return tokens, logits


def check_case(case, impl):
    model, model64, ids = case.build()
    expected = model.generate(ids, case.new, mode="reforward", impl="loop")  # the float32 loop's greedy tokens
    for mode in ("reforward", "recurrent"):
        check_mode(case, model, model64, ids, mode, impl, expected)


def skip_if_slow(impl):
    """Skip (before hypothesis draws anything) an interpreted implementation or one without float32."""
    entry = impls.get(impl)
    if entry.supports["case_limits"]:
        pytest.skip(f"{impl}: interpreted (case_limits {entry.supports['case_limits']}): one tiny case only")
    if torch.float32 not in entry.supports["dtypes"]:
        pytest.skip(f"{impl}: declared gap: no float32")


@example(case=TINY)
@example(case=ModelCase(d_model=32, n_layer=2, vocab=64, prompt=12, new=8, b=2, seed=1))
@given(case=model_cases)
def greedy_tokens_and_logits_agree(impl, case):
    check_case(case, impl)


def test_greedy_tokens_and_logits_agree_in_both_modes(impl):
    skip_if_slow(impl)
    greedy_tokens_and_logits_agree(impl)


def test_interpreted_implementation_one_tiny_case(impl):
    entry = impls.get(impl)
    if not entry.supports["case_limits"]:
        pytest.skip(f"{impl}: not interpreted; covered by the drawn cases")
    check_case(TINY, impl)


@example(lengths=[1, 12], case=TINY)
@given(lengths=st.lists(st.integers(1, 12), min_size=2, max_size=3), case=model_cases)
def left_padded_batch_decodes_as_if_unpadded(impl, lengths, case):
    """Prompts of different lengths, left-padded with an attention mask: each row's tokens and logits
    are those of its prompt alone (the oracle is the float64 model on the unpadded prompt)."""
    model, model64, _ = case.build()
    gen = torch.Generator().manual_seed(case.seed + 1)
    prompts = [torch.randint(0, case.vocab, (k,), generator=gen) for k in lengths]
    l = max(lengths)
    ids = torch.full((len(prompts), l), 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, l - len(p):], mask[i, l - len(p):] = p, 1
    step_impl = impl if impls.get(impl).step is not None else "recurrent"
    alone = [model.generate(p[None], case.new, mode="reforward", impl="loop") for p in prompts]
    oracles = [teacher_forced(model64, a, len(p)) for a, p in zip(alone, prompts)]
    baselines = [teacher_forced(model, a, len(p)) for a, p in zip(alone, prompts)]
    for mode in ("reforward", "recurrent"):
        tokens, logits = model.generate(ids, case.new, mode=mode, impl=impl, step_impl=step_impl,
                                        attention_mask=mask, return_logits=True)
        for i, (p, alone_i, oracle, baseline) in enumerate(zip(prompts, alone, oracles, baselines)):
            where = f"{case!r}, prompt lengths {lengths}, row {i}, mode={mode!r}, impl={impl!r}"
            length = terms("y", alone_i.shape[1], model.config.d_state)
            result = compare(logits[i:i + 1], oracle, baseline, length)
            if torch.equal(tokens[i, l:], alone_i[0, len(p):]):
                assert result.ok, f"{where}: logits differ from the unpadded prompt's: {result.describe()}"
            else:
                s = int((tokens[i, l:] != alone_i[0, len(p):]).nonzero()[0])
                a, b = int(tokens[i, l + s]), int(alone_i[0, len(p) + s])
                gap = abs(float(oracle[0, s, a] - oracle[0, s, b]))
                assert gap <= 2 * result.bound, f"{where}: token {a} at step {s}, unpadded gives {b} (gap {gap:.3g})"


def test_left_padded_batch_decodes_as_if_unpadded(impl):
    skip_if_slow(impl)
    left_padded_batch_decodes_as_if_unpadded(impl)


def test_padding_other_than_left_is_refused():
    model = tiny_mamba()
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    with pytest.raises(ValueError, match="left padding"):
        model.generate(ids, 2, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))
    with pytest.raises(ValueError, match="at least one real token"):
        model.generate(ids, 2, attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]))


def test_recurrent_decoding_state_has_constant_size():
    model = tiny_mamba()
    logits, cache = model.prefill(torch.tensor([[1, 2, 3, 4, 5, 6, 7]]))
    size = cache.nbytes()
    for t in range(20):
        logits = model.step(logits.argmax(-1), cache)
    assert cache.nbytes() == size
