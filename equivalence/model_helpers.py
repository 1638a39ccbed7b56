"""What the language-model tests (equivalence/test_model*.py) share: tiny models, a fixture for one
thread, parameters moved off their initial constants, one tolerance assertion, and the Mamba-1
official layout written out by hand."""

import dataclasses
import math

import pytest
import torch

from impls.models.mamba import MambaConfig, MambaLM
from impls.models.mamba2 import Mamba2Config, Mamba2LM
from .tolerance import compare, terms


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: every op is far below torch's parallel grain, and a second OpenMP
    thread only adds synchronisation, which on a busy 2-core machine made test_model.py 14x slower
    (77 s against 5.5 s). One thread in each module that imports this fixture, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@torch.no_grad()
def randomize_(model, gen):
    """Move every parameter the official initialisation leaves at a constant away from it, so a
    swapped or missing term cannot hide behind a one or a zero: norm gains 1 + N(0, 0.5), A_log and
    the dt bias (Mamba-1's dt_proj.bias, Mamba-2's dt_bias) shifted by N(0, 0.5) (A stays negative),
    D ~ N(0, 1), other biases ~ N(0, 0.3). Weights keep their draws. Ours and transformers' names
    end alike. gen: a torch.Generator or a seed. Returns the model."""
    if not isinstance(gen, torch.Generator):
        gen = torch.Generator().manual_seed(gen)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        if name.endswith(("norm.weight", "norm_f.weight", "A_log", "dt_proj.bias", "dt_bias")):
            p.add_(0.5 * noise)
        elif name.endswith(".D"):
            p.copy_(noise)
        elif name.endswith(".bias"):
            p.copy_(0.3 * noise)
    return model


def randomized_pair(model_class, config, seed, shape, vocab):
    """(float32 model built under ``seed`` with every parameter randomised (randomize_), its float64
    copy, ids of ``shape`` (b, l) below ``vocab``), all drawn from one generator seeded by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_class(config).eval()
    randomize_(model, gen)
    model64 = model_class(model.config)
    model64.load_state_dict(model.state_dict())
    ids = torch.randint(0, vocab, shape, generator=gen)
    return model, model64.double().eval(), ids


def check(what, case, got, oracle, baseline, l, n):
    """Assert the tolerance policy for logits against the float64 oracle (length: terms("y", l, n))."""
    result = compare(got, oracle, baseline, terms("y", l, n))
    assert result.ok, f"{what}, {case!r}: {result.describe()}"
    return result


def tiny_mamba(seed=0, **overrides):
    """A MambaLM with d_model 16, 2 layers, vocabulary 45 (padded to 48 rows), official initialisation."""
    torch.manual_seed(seed)
    return MambaLM(MambaConfig(**{"d_model": 16, "n_layer": 2, "vocab_size": 45, **overrides}))


def tiny_mamba2():
    """A one-layer Mamba2LM with d_model 16, vocabulary 45, official initialisation."""
    torch.manual_seed(0)
    return Mamba2LM(Mamba2Config(d_model=16, n_layer=1, vocab_size=45, ssm_cfg=dict(d_state=8, headdim=8, chunk_size=8)))


def mamba_official_layout(d_model, n_layer, vocab_size, d_state=16, d_conv=4, expand=2, pad_multiple=8):
    """Parameter name -> shape of an official Mamba-1 checkpoint (state-spaces/mamba-*: MambaLMHeadModel's
    state_dict), written out from the official layout, not from impls/models/mamba.py."""
    d_inner = expand * d_model
    dt_rank = math.ceil(d_model / 16)
    v = vocab_size + (-vocab_size) % pad_multiple
    layout = {"backbone.embedding.weight": (v, d_model)}
    for i in range(n_layer):
        p = f"backbone.layers.{i}."
        layout.update({
            p + "mixer.A_log": (d_inner, d_state),
            p + "mixer.D": (d_inner,),
            p + "mixer.in_proj.weight": (2 * d_inner, d_model),
            p + "mixer.conv1d.weight": (d_inner, 1, d_conv),
            p + "mixer.conv1d.bias": (d_inner,),
            p + "mixer.x_proj.weight": (dt_rank + 2 * d_state, d_inner),
            p + "mixer.dt_proj.weight": (d_inner, dt_rank),
            p + "mixer.dt_proj.bias": (d_inner,),
            p + "mixer.out_proj.weight": (d_model, d_inner),
            p + "norm.weight": (d_model,),
        })
    layout["backbone.norm_f.weight"] = (d_model,)
    layout["lm_head.weight"] = (v, d_model)
    return layout


@dataclasses.dataclass(frozen=True)
class Mamba2Case:
    """A Mamba2LM test case: its config fields, the ids' shape (b, l) and a seed."""
    d_model: int = 16
    n_layer: int = 2
    vocab: int = 40
    l: int = 12
    b: int = 1
    d_state: int = 8
    headdim: int = 8
    ngroups: int = 1
    d_conv: int = 4
    chunk_size: int = 8
    D_has_hdim: bool = False
    rmsnorm: bool = True
    norm_before_gate: bool = False
    bias: bool = False
    conv_bias: bool = True
    dt_limit: tuple = (0.0, float("inf"))
    tie: bool = True
    seed: int = 0

    def config(self):
        return Mamba2Config(d_model=self.d_model, n_layer=self.n_layer, vocab_size=self.vocab, tie_embeddings=self.tie,
                            ssm_cfg=dict(d_state=self.d_state, headdim=self.headdim, ngroups=self.ngroups,
                                         d_conv=self.d_conv, chunk_size=self.chunk_size, D_has_hdim=self.D_has_hdim,
                                         rmsnorm=self.rmsnorm, norm_before_gate=self.norm_before_gate, bias=self.bias,
                                         conv_bias=self.conv_bias, dt_limit=self.dt_limit))

    def build(self):
        """(float32 model with every parameter randomised, float64 copy, ids (b, l))."""
        return randomized_pair(Mamba2LM, self.config(), self.seed, (self.b, self.l), self.vocab)
