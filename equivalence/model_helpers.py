"""What the language-model tests (equivalence/test_model*.py) share: tiny models, a fixture for one
thread, parameters moved off their initial constants, one tolerance assertion, the Mamba-1 official
layout written out by hand, each model's test case, and the checks every model passes alike (each
takes a case, whose ``build`` says which model it is).

The oracle for logits is the float64 model through the family's loop (the spec) over the whole
token sequence; the baseline is the float32 model through the loop. ``length`` for the policy is
tolerance.terms("y", l, n): the logits are y passed through projections and norms whose rounding
the loop run shares. Where the rest of the model amplifies the scan's roundings (a norm over a
head's few outputs near zero), the bound also allows ``rounding_spread``."""

import contextlib
import dataclasses
import inspect
import json
import math
import os
from unittest import mock

import pytest
import torch

import impls

from impls.models.mamba import MambaConfig, MambaLM
from impls.models.mamba2 import Mamba2Config, Mamba2LM
from impls.models.mamba3 import Mamba3Config, Mamba3LM
from . import mamba3, selective, ssd
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
    the dt bias (Mamba-1's dt_proj.bias, Mamba-2's and Mamba-3's dt_bias) shifted by N(0, 0.5) (A
    stays negative), Mamba-3's B_bias and C_bias (initialised to 1) 1 + N(0, 0.3), D ~ N(0, 1), other
    biases ~ N(0, 0.3). Weights keep their draws. Ours and transformers' names end alike. gen: a
    torch.Generator or a seed. Returns the model."""
    if not isinstance(gen, torch.Generator):
        gen = torch.Generator().manual_seed(gen)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        if name.endswith(("norm.weight", "norm_f.weight", "A_log", "dt_proj.bias", "dt_bias")):
            p.add_(0.5 * noise)
        elif name.endswith(("B_bias", "C_bias")):
            p.add_(0.3 * noise)
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


def check(what, case, got, oracle, baseline, l, n, spread=0.0):
    """Assert the tolerance policy for logits against the float64 oracle (length: terms("y", l, n);
    spread: rounding_spread's, at the same positions)."""
    result = compare(got, oracle, baseline, terms("y", l, n), spread=float(torch.as_tensor(spread).max()))
    assert result.ok, f"{what}, {case!r}: {result.describe()}"
    return result


# Each scan front door -> the sums of |terms| of its output's elements, from its float64 arguments
# (named as in its signature, SIGNATURES: taken from the family's own, which a test may wrap)
SIGNATURES = {f: inspect.signature(getattr(impls, f)) for f in ("selective_scan", "ssd_scan", "mamba3_scan")}
SCAN_SCALES = {
    "selective_scan": lambda x: selective.magnitudes(None, x=x)[0],
    "ssd_scan": lambda x: ssd.magnitudes(None, x=x)[0],
    "mamba3_scan": lambda x: mamba3.cases.magnitudes(x)[0],
}


def rounding_spread(model64, ids, dtype=torch.float32, draws=8, seed=0):
    """The largest change, over ``draws`` random draws of signs, of the logits (b, l, V) when every
    element of every scan output moves by one rounding in ``dtype`` of its sum of |terms| (the
    family's magnitudes): a first-order estimate of what a sound scan that sums in another order
    than the loop does to the logits, after the rest of the model has amplified it. A per-head norm
    over outputs that cancel to near zero divides their rounding by a small rms: measured, a Mamba-3
    model with headdim 1 moved the logits 4x as far with the chunked scan as with the loop. The
    loop's error is one such draw; this is the spread of several.
    model64: a float64 model; ids: (b, l)."""
    gen = torch.Generator().manual_seed(seed)
    unit = torch.finfo(dtype).eps / 2

    def forward(sign):
        def spied(front, real):
            def scan(*args, **kwargs):
                out = real(*args, **kwargs)
                if sign:
                    x = SIGNATURES[front].bind(*args, **kwargs)
                    x.apply_defaults()
                    y = out[0] if isinstance(out, tuple) else out
                    r = torch.randint(0, 2, y.shape, generator=gen, dtype=y.dtype) * 2 - 1
                    y = y + unit * SCAN_SCALES[front](x.arguments).reshape(y.shape) * r
                    out = (y, *out[1:]) if isinstance(out, tuple) else y
                return out
            return scan

        with contextlib.ExitStack() as stack, torch.no_grad():
            for f in SCAN_SCALES:   # every family's front door, so that any model's scans are spied on
                stack.enter_context(mock.patch.object(impls, f, spied(f, getattr(impls, f))))
            return model64(ids)

    base = forward(False)
    return torch.stack([(forward(True) - base).abs() for _ in range(draws)]).amax(0)


def tiny_mamba(seed=0, **overrides):
    """A MambaLM with d_model 16, 2 layers, vocabulary 45 (padded to 48 rows), official initialisation."""
    torch.manual_seed(seed)
    return MambaLM(MambaConfig(**{"d_model": 16, "n_layer": 2, "vocab_size": 45, **overrides}))


def tiny_mamba2(**overrides):
    """A one-layer Mamba2LM with d_model 16, vocabulary 45, official initialisation."""
    torch.manual_seed(0)
    return Mamba2LM(Mamba2Config(**{"d_model": 16, "n_layer": 1, "vocab_size": 45,
                                    "ssm_cfg": dict(d_state=8, headdim=8, chunk_size=8), **overrides}))


def tiny_mamba3(**overrides):
    """A one-layer Mamba3LM with d_model 16, vocabulary 45, official initialisation."""
    torch.manual_seed(0)
    return Mamba3LM(Mamba3Config(**{"d_model": 16, "n_layer": 1, "vocab_size": 45,
                                    "ssm_cfg": dict(d_state=8, headdim=8, chunk_size=8), **overrides}))


# Every model, for the tests of what they do alike: pytest.mark.parametrize("make", TINY, ids=TINY_IDS)
TINY = (tiny_mamba, tiny_mamba2, tiny_mamba3)
TINY_IDS = ("MambaLM", "Mamba2LM", "Mamba3LM")


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


@dataclasses.dataclass(frozen=True)
class Mamba3Case:
    """A Mamba3LM test case: its config fields, the ids' shape (b, l) and a seed."""
    d_model: int = 16
    n_layer: int = 2
    vocab: int = 40
    l: int = 12
    b: int = 1
    d_state: int = 8
    headdim: int = 8
    ngroups: int = 1
    rope_fraction: float = 0.5
    A_floor: float = 1e-4
    A_activation: str = "heavy_tail"
    is_outproj_norm: bool = False
    chunk_size: int = 8
    tie: bool = True
    seed: int = 0

    def config(self):
        return Mamba3Config(d_model=self.d_model, n_layer=self.n_layer, vocab_size=self.vocab, tie_embeddings=self.tie,
                            ssm_cfg=dict(d_state=self.d_state, headdim=self.headdim, ngroups=self.ngroups,
                                         rope_fraction=self.rope_fraction, A_floor=self.A_floor,
                                         A_activation=self.A_activation, is_outproj_norm=self.is_outproj_norm,
                                         chunk_size=self.chunk_size))

    def build(self):
        """(float32 model with every parameter randomised, float64 copy, ids (b, l))."""
        return randomized_pair(Mamba3LM, self.config(), self.seed, (self.b, self.l), self.vocab)


# ---------------------------------------------------------------------------- the checks every model passes

def step_by_step(model, ids, impl=None, prefix=1, scan_impl=None):
    """Logits at positions prefix-1 .. l-1: prefill of ``prefix`` tokens through ``scan_impl``, then one
    step per token through ``impl`` (None: each the model's default)."""
    logits, cache = model.prefill(ids[:, :prefix], impl=scan_impl)
    out = [logits]
    for t in range(prefix, ids.shape[1]):
        out.append(model.step(ids[:, t], cache, impl=impl))
    return torch.stack(out, 1)


def check_forward_and_steps(case):
    """The full forward through the default scan, and prefill + steps, give the float64 oracle's
    logits within the tolerance policy."""
    model, model64, ids = case.build()
    l, n = ids.shape[1], case.d_state
    spread = rounding_spread(model64, ids)
    with torch.no_grad():
        oracle = model64(ids, impl="loop")
        baseline = model(ids, impl="loop")
        check("forward (default scan)", case, model(ids), oracle, baseline, l, n, spread)
        prefix = max(1, l // 2)
        got = step_by_step(model, ids, prefix=prefix)
        check("prefill + steps", case, got, oracle[:, prefix - 1:], baseline[:, prefix - 1:], l, n,
              spread[:, prefix - 1:])


def check_generation_modes_agree(case, T=6):
    """Greedy tokens agree between recurrent decoding and re-forwarding (through the loop), and so do
    the logits each was chosen from (within policy of the float64 re-forward oracle on those tokens);
    no token past the real vocabulary is chosen."""
    model, model64, ids = case.build()
    with torch.no_grad():
        rec, rec_logits = model.generate(ids, T, mode="recurrent", return_logits=True)
        ref, ref_logits = model.generate(ids, T, mode="reforward", impl="loop", return_logits=True)
        assert torch.equal(rec, ref)
        oracle = model64(rec[:, :-1], impl="loop")[:, case.l - 1:]
        baseline = model(rec[:, :-1], impl="loop")[:, case.l - 1:]
        check("recurrent", case, rec_logits, oracle, baseline, case.l + T, case.d_state)
        check("reforward", case, ref_logits, oracle, baseline, case.l + T, case.d_state)
        assert (rec[:, case.l:] < case.vocab).all()


def check_left_padding(case):
    """A left-padded batch (rows of 13, 4 and 1 real tokens) gives each row the logits and tokens of
    that row alone, unpadded, in forward, prefill + steps and both generate modes."""
    model, model64, _ = case.build()
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, case.vocab, (1, k), generator=gen) for k in (13, 4, 1)]
    ids = torch.zeros(len(rows), 13, dtype=torch.long)
    mask = torch.zeros(len(rows), 13, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 13 - r.shape[1]:], mask[i, 13 - r.shape[1]:] = r, 1
    with torch.no_grad():
        full = model64(ids, impl="loop", attention_mask=mask)
        rec = model.generate(ids, 5, attention_mask=mask, return_logits=True)
        ref = model.generate(ids, 5, mode="reforward", attention_mask=mask)
        assert torch.equal(rec[0], ref)
        for i, r in enumerate(rows):
            k = r.shape[1]
            torch.testing.assert_close(full[i, 13 - k:], model64(r, impl="loop")[0], rtol=0, atol=1e-12)
            tokens, logits = model.generate(r, 5, return_logits=True)
            assert torch.equal(rec[0][i, 13:], tokens[0, k:]), f"row {i}"
            torch.testing.assert_close(rec[1][i], logits[0], rtol=1e-5, atol=1e-5)


def check_sampling_modes_agree(case):
    """Sampling with one seed gives the same tokens in both modes, and another seed other tokens."""
    model, model64, ids = case.build()
    kw = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    a = model64.generate(ids, 8, generator=torch.Generator().manual_seed(5), **kw)
    b = model64.generate(ids, 8, mode="reforward", impl="loop", generator=torch.Generator().manual_seed(5), **kw)
    c = model64.generate(ids, 8, generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)   # the draws do depend on the generator (8 tokens, 2 rows)


def check_refused_ids_and_tokens(case):
    """Bad ids in forward and prefill, and bad tokens in step, raise naming them; a refused step
    leaves every cache tensor and the conv phase as they were."""
    model, _, ids = case.build()
    for bad in (torch.zeros(1, 0, dtype=torch.long), torch.full((1, 2), case.vocab)):
        with pytest.raises(ValueError, match="input_ids"):
            model(bad)
    with pytest.raises(ValueError, match="input_ids"):
        model.prefill(torch.zeros(3, dtype=torch.long))
    _, cache = model.prefill(ids)
    before, phase = [t.clone() for c in cache.layers for t in c.tensors()], cache.phase
    for bad, error in ((torch.zeros(ids.shape[0] + 1, dtype=torch.long), ValueError),
                       (torch.zeros(ids.shape[0], 1, dtype=torch.long), ValueError),
                       (torch.zeros(ids.shape[0]), TypeError), (torch.full((ids.shape[0],), case.vocab), ValueError)):
        with pytest.raises(error, match="token"):
            model.step(bad, cache)
    # bit for bit, NaN equal to NaN: the step's scratch buffers hold whatever torch.empty gave them
    for x, y in zip(before, [t for c in cache.layers for t in c.tensors()]):
        torch.testing.assert_close(y, x, rtol=0, atol=0, equal_nan=True)
    assert cache.phase == phase


def check_official_round_trip(case, folder, safe):
    """save_pretrained in the official layout and from_pretrained give the same config, logits and
    tokens; returns the config.json written."""
    model, _, ids = case.build()
    model.save_pretrained(folder, safe_serialization=safe)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    loaded = type(model).from_pretrained(folder)
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(ids, impl="loop"), model(ids, impl="loop"))
        assert torch.equal(loaded.generate(ids, 4), model.generate(ids, 4))
    return cfg


def never_built(monkeypatch, cls):
    """Make building a ``cls`` model fail the test: the checks that come first must raise before."""
    def refuse(self, config):
        raise AssertionError("a model was built before the checkpoint was checked")
    monkeypatch.setattr(cls, "__init__", refuse)


def refused_before_building(model, folder, monkeypatch):
    """Save ``model`` (safetensors) into ``folder`` and make its class refuse to be built. Returns
    (the config.json dict written, refuse(cfg, match, error=ValueError)): refuse writes cfg as
    config.json and asserts from_pretrained raises ``error`` matching ``match`` before any model is
    allocated."""
    cls = type(model)
    model.save_pretrained(folder, safe_serialization=True)
    never_built(monkeypatch, cls)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        good = json.load(f)

    def refuse(cfg, match, error=ValueError):
        with open(path, "w") as f:
            json.dump(cfg, f)
        with pytest.raises(error, match=match):
            cls.from_pretrained(folder)

    return good, refuse
