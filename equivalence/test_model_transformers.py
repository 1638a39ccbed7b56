"""impls/models/mamba.py against transformers' own Mamba (MambaForCausalLM, pure-PyTorch path, 5.24): code
nobody here wrote, and the layout of the state-spaces/mamba-*-hf checkpoints.

- A random MambaForCausalLM saved by its own save_pretrained loads into MambaLM (from_pretrained reads
  its config fields and weight names through the table in impls/models/mamba.py) and gives the same logits
  in a full forward and step by step with transformers' cache, and the same greedy tokens as its
  generate, in both of our modes.
- The reverse: MambaLM.save_pretrained(layout="transformers") loads in MambaForCausalLM.from_pretrained
  with the same logits and tokens.
- A padded vocabulary (vocab_size 50277 in 50280 rows, as mamba-130m): the rows beyond the vocabulary
  are never chosen by us; transformers, which has no notion of them, agrees once told to suppress them.
- Both layouts' defaults agree on every field of the table, so a transformers config.json that leaves
  fields at transformers' defaults is read as transformers reads it.

"Same logits" is the tolerance policy (equivalence/tolerance.py) against the float64 oracle, our
model in float64 through the loop over the same tokens, with the float32 loop as the baseline: the
same check the mamba.py parity tests make. "Same tokens" allows a different token only where the
oracle's top two logits are closer than the policy's bound (a tie decided by rounding).

Everything runs offline (HF_HUB_OFFLINE=1) on tiny models: the whole file takes about 15 s here,
5 s of it importing transformers.
"""

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from impls.models.mamba import CONFIG_FIELDS, MambaLM, config_from_dict  # noqa: E402
from .model_helpers import one_thread, randomize_, tiny_mamba  # noqa: E402, F401
from .tolerance import compare, terms  # noqa: E402

transformers.utils.logging.set_verbosity_error()   # its "falling back to the PyTorch path" notes


def hf_model(seed=0, **config):
    """A random transformers MambaForCausalLM (tiny unless config says otherwise), in eval mode."""
    torch.manual_seed(seed)
    sizes = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, state_size=8)   # 50: no multiple of 8
    model = transformers.MambaForCausalLM(transformers.MambaConfig(**{**sizes, **config})).eval()
    return randomize_(model, seed)


@torch.no_grad()
def hf_step_by_step(model, ids):
    """transformers' logits (b, l, v) one token at a time with its cache (its recurrent path from the
    second token: causal_conv1d_update and selective_state_update)."""
    out = model(ids[:, :1], use_cache=True)
    cache, logits = out.cache, [out.logits[:, -1]]
    for t in range(1, ids.shape[1]):
        out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


@torch.no_grad()
def oracle_and_baseline(ours, ids):
    """Our model in float64 and in float32, both through the loop: (oracle, baseline) logits (b, l, v)."""
    model64 = MambaLM(ours.config)
    model64.load_state_dict(ours.state_dict())
    return model64.double()(ids, impl="loop"), ours(ids, impl="loop")


def check_logits(what, got, oracle, baseline, n):
    result = compare(got, oracle, baseline, terms("y", oracle.shape[1], n))
    assert result.ok, f"{what}: {result.describe()}"
    return result


def check_same_tokens(what, ours, theirs, l, oracle_of, bound):
    """Equal tokens, or a first difference where the float64 oracle's two logits tie within 2 bounds."""
    assert ours.shape == theirs.shape, f"{what}: {tuple(ours.shape)} against {tuple(theirs.shape)}"
    for row in range(ours.shape[0]):
        diff = (ours[row, l:] != theirs[row, l:]).nonzero()
        if len(diff):
            s = int(diff[0])
            a, b = int(ours[row, l + s]), int(theirs[row, l + s])
            oracle = oracle_of(ours[:, :l + s])[row]
            gap = abs(float(oracle[a] - oracle[b]))
            assert gap <= 2 * bound, f"{what}: row {row} step {s}: {a} against {b}, float64 logits {gap:.3g} apart"


def hf_greedy(model, ids, new_tokens, suppress=None):
    """transformers' generate, greedy, no stop token. The all-ones attention_mask is needed: without
    one, transformers takes every id equal to pad_token_id (0 in MambaConfig) for padding."""
    kw = {} if suppress is None else {"suppress_tokens": suppress}
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                          eos_token_id=None, **kw)


def compare_models(ours, theirs, ids, new_tokens, suppress=None):
    """Full forward, step by step and greedy tokens (ours in both modes against transformers' generate)."""
    n = ours.config.d_state
    oracle, baseline = oracle_and_baseline(ours, ids)
    with torch.no_grad():
        theirs_full = theirs(ids).logits
        result = check_logits("transformers' full forward", theirs_full, oracle, baseline, n)
        check_logits("transformers step by step (its cache)", hf_step_by_step(theirs, ids), oracle, baseline, n)
        check_logits("our full forward", ours(ids), oracle, baseline, n)
        cache = ours.new_cache(ids.shape[0])
        ours_steps = torch.stack([ours.step(ids[:, t], cache) for t in range(ids.shape[1])], 1)
        check_logits("our step by step", ours_steps, oracle, baseline, n)

        their_tokens = hf_greedy(theirs, ids, new_tokens, suppress)
        model64 = MambaLM(ours.config)
        model64.load_state_dict(ours.state_dict())
        model64.double()
        oracle_of = lambda tokens: model64(tokens, impl="loop")[:, -1]  # noqa: E731
        for mode in ("recurrent", "reforward"):
            our_tokens = ours.generate(ids, new_tokens, mode=mode)
            check_same_tokens(f"greedy tokens, {mode}", our_tokens, their_tokens, ids.shape[1], oracle_of,
                              result.bound)
    return theirs_full


HF_CASES = {
    "tied": dict(),
    "untied": dict(tie_word_embeddings=False),
    "bias-noconvbias-rank3-k3": dict(use_bias=True, use_conv_bias=False, time_step_rank=3, conv_kernel=3,
                                     expand=1, state_size=5),
}


@pytest.mark.parametrize("case", HF_CASES, ids=list(HF_CASES))
def test_a_transformers_checkpoint_loads_with_the_same_logits_and_tokens(tmp_path, case):
    theirs = hf_model(seed=len(case), **HF_CASES[case])
    theirs.save_pretrained(tmp_path)
    ours = MambaLM.from_pretrained(tmp_path).eval()
    c = theirs.config
    assert (ours.config.d_model, ours.config.n_layer, ours.config.padded_vocab_size, ours.config.d_state,
            ours.config.d_conv, ours.config.dt_rank, ours.config.bias, ours.config.conv_bias,
            ours.config.tie_embeddings) == (c.hidden_size, c.num_hidden_layers, c.vocab_size, c.state_size,
                                            c.conv_kernel, c.time_step_rank, c.use_bias, c.use_conv_bias,
                                            c.tie_word_embeddings)
    assert (ours.lm_head.weight is ours.backbone.embedding.weight) == c.tie_word_embeddings
    ids = torch.randint(0, c.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    compare_models(ours, theirs, ids, new_tokens=6)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_our_checkpoint_loads_in_transformers(tmp_path, tied, safe):
    ours = tiny_mamba(seed=4, d_model=24, vocab_size=40, tie_embeddings=tied, ssm_cfg={"d_state": 6}).eval()
    randomize_(ours, 4)
    ours.save_pretrained(tmp_path, layout="transformers", safe_serialization=safe)
    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    assert "d_model" not in written and written["hidden_size"] == 24 and written["model_type"] == "mamba"
    theirs = transformers.MambaForCausalLM.from_pretrained(tmp_path).eval()
    assert (theirs.lm_head.weight.data_ptr() == theirs.backbone.embeddings.weight.data_ptr()) == tied
    for name, p in theirs.state_dict().items():   # every parameter arrived, under transformers' names
        ours_name = name.replace("backbone.embeddings.", "backbone.embedding.")
        assert torch.equal(p, ours.state_dict()[ours_name]), name
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(2))
    compare_models(ours, theirs, ids, new_tokens=5)
    # and back: the transformers folder into MambaLM again, the same weights
    again = MambaLM.from_pretrained(tmp_path)
    for k, v in ours.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


@torch.no_grad()
def test_padded_vocabulary_both_ways(tmp_path):
    """mamba-130m's vocabulary: 50277 tokens in 50280 rows. Ours never chooses rows 50277-50279;
    saved for transformers, the rows are all its vocabulary (its vocab_size is 50280, as in
    mamba-130m-hf) and the logits match over all 50280; its greedy tokens are ours once those three
    rows are suppressed. The padding rows are made to win, so that a model choosing among them shows."""
    ours = tiny_mamba(seed=6, d_model=8, n_layer=1, vocab_size=50277).eval()
    assert ours.config.padded_vocab_size == 50280
    randomize_(ours, 6)
    w = ours.backbone.embedding.weight
    w[50277:] = 50 * torch.tensor([[1.0], [1.1], [1.2]]) * ours.backbone.norm_f.weight   # large logits, no tie
    ids = torch.randint(0, 50277, (2, 6), generator=torch.Generator().manual_seed(3))
    assert (ours(ids)[..., :50277].argmax(-1) != ours(ids).argmax(-1)).any()   # padding would win
    ours.save_pretrained(tmp_path, layout="transformers")
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["vocab_size"] == 50280
    theirs = transformers.MambaForCausalLM.from_pretrained(tmp_path).eval()
    compare_models(ours, theirs, ids, new_tokens=4, suppress=[50277, 50278, 50279])
    tokens = ours.generate(ids, 4)
    assert (tokens[:, 6:] < 50277).all()

    # and the reverse: transformers' 50280 rows are 50280 tokens to us too (pad_vocab_size_multiple 1)
    back = MambaLM.from_pretrained(tmp_path)
    assert (back.config.vocab_size, back.config.padded_vocab_size) == (50280, 50280)
    assert torch.equal(back.generate(ids, 4), hf_greedy(theirs, ids, 4))


def test_the_layouts_defaults_agree_on_every_field_of_the_table():
    """A transformers config.json states only what differs from transformers' defaults in some
    versions; reading it, our defaults fill the rest. They must be transformers' own (read from its
    MambaConfig, not from this project)."""
    sizes = dict(hidden_size=40, num_hidden_layers=3, vocab_size=64)
    theirs = transformers.MambaConfig(**sizes)
    ours, layout = config_from_dict({"model_type": "mamba", **sizes})
    assert layout == "transformers"
    for official, hf in CONFIG_FIELDS.items():
        value = ours.padded_vocab_size if official == "vocab_size" else getattr(ours, official.split(".")[-1])
        assert value == getattr(theirs, hf), f"{official} = {value!r}, transformers' {hf} = {getattr(theirs, hf)!r}"
    assert ours.d_inner == theirs.intermediate_size


def test_a_transformers_folder_builds_its_own_size(tmp_path, monkeypatch):
    """The folder that once built a 2.6B-parameter model (official defaults d_model 2560, n_layer 64
    standing in for transformers' fields) now builds the folder's own model; building anything
    larger than it fails the test."""
    hf_model(hidden_size=16, num_hidden_layers=2).save_pretrained(tmp_path)
    built = []
    original = MambaLM.__init__

    def watching_init(self, config):
        built.append((config.d_model, config.n_layer))
        assert config.d_model == 16 and config.n_layer == 2, f"built d_model {config.d_model}, n_layer {config.n_layer}"
        original(self, config)

    monkeypatch.setattr(MambaLM, "__init__", watching_init)
    model = MambaLM.from_pretrained(tmp_path)
    assert built == [(16, 2)] and sum(p.numel() for p in model.parameters()) < 20_000


def test_a_sharded_transformers_checkpoint_loads(tmp_path):
    """Large transformers checkpoints come in shards (model.safetensors.index.json and its files)."""
    theirs = hf_model(seed=8)
    theirs.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = MambaLM.from_pretrained(tmp_path)
    for name, p in theirs.state_dict().items():
        if name == "lm_head.weight":   # tied: the embedding itself
            assert ours.lm_head.weight is ours.backbone.embedding.weight
            continue
        assert torch.equal(ours.state_dict()[name.replace("backbone.embeddings.", "backbone.embedding.")], p), name
