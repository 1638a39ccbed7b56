"""The same Mamba language model in mamba.py (the ``mambapy`` package), with our weights: a peer.

mamba.py (https://github.com/alxndrTL/mamba.py, ``pip install mambapy``) is an independent
PyTorch Mamba written from the paper and the official code. Loading one set of weights into both
it and ``impls.models.mamba.MambaLM`` gives two things:

- a parity check at the model level (equivalence/test_model_parity.py): the same tokens give the
  same logits from both, over a whole sequence and step by step, which checks our block (conv,
  projections, dt, gating, norm) against another reading of the paper, not only our scans
  against each other;
- a peer to time (benchmarks/time_per_token.py): mamba.py's ``step`` (one token from a cache of
  the SSM state and the last d_conv - 1 conv inputs) and its prompt prefill, a loop of ``step``.

Why the language model is assembled here. ``mambapy.lm.LM`` (embedding -> Mamba -> norm_f ->
lm_head) cannot be imported on a CPU machine without the official kernels: ``mambapy/lm.py``
imports ``mambapy.mamba2`` at module level, and that module imports ``einops`` and, with no
fallback, ``mamba_ssm.ops.triton.ssd_combined``. ``mambapy.mamba`` (the Mamba-1 backbone, its
``RMSNorm``, ``pscan``) imports only torch. So the backbone and the final norm are mamba.py's own
classes (``mambapy.mamba.Mamba`` and ``mambapy.mamba.RMSNorm``), and the embedding and LM head are
plain ``nn.Embedding`` / ``nn.Linear`` wired as ``LM`` wires them (its ``forward`` and ``step``),
including LM's untied head: ``lm_head`` holds its own copy of our tied embedding, in the usual
(vocab, d_model) storage, which is what a mamba.py user holding these weights would run. We do not
put a stub ``mambapy.mamba2`` into ``sys.modules`` to make ``mambapy.lm`` import: that would change
what every later import in the process sees.

Why this file sits in impls/ and not in benchmarks/: the parity tests (equivalence/, a layer
below the benchmarks) and the benchmarks both use it, and nothing may import from a layer above it. Like impls/models/mamba.py it uses the registered scans; no scan implementation imports it.
mambapy is imported on first use only (it is a dev extra).

Letters as in impls/models/mamba.py: b batch, l length, m d_model, d d_inner, n d_state, k d_conv,
v the padded vocabulary.
"""

import torch
import torch.nn as nn


def _mambapy():
    try:
        import mambapy.mamba as mamba
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("impls.adapters.mambapy_model needs the mambapy package (pip install mambapy==1.2.0)") from e
    return mamba


def mambapy_config(config, pscan=True):
    """mamba.py's ``MambaConfig`` for our ``impls.models.mamba.MambaConfig``.

    pscan: mamba.py's full-sequence scan, its parallel ``pscan`` (True, its default) or its
    sequential loop (False). Raises NotImplementedError for a model mamba.py cannot express
    (LayerNorm instead of RMSNorm).
    """
    if not config.rms_norm:
        raise NotImplementedError("mambapy: rms_norm=False (LayerNorm) has no mamba.py counterpart")
    mamba = _mambapy()
    return mamba.MambaConfig(d_model=config.d_model, n_layers=config.n_layer, dt_rank=config.dt_rank,
                             d_state=config.d_state, expand_factor=config.expand, d_conv=config.d_conv,
                             rms_norm_eps=config.norm_epsilon, bias=config.bias, conv_bias=config.conv_bias,
                             pscan=pscan)


class MambapyLM(nn.Module):
    """mamba.py's language model as ``mambapy.lm.LM`` builds it: embedding, ``mambapy.mamba.Mamba``,
    ``mambapy.mamba.RMSNorm``, untied LM head. Build it with ``from_mamba_lm``."""

    def __init__(self, config, pscan=True):
        super().__init__()
        mamba = _mambapy()
        vocab = config.padded_vocab_size
        self.vocab_size = config.vocab_size  # generate chooses among these; the rest is padding
        self.config = mambapy_config(config, pscan)
        self.embedding = nn.Embedding(vocab, config.d_model, padding_idx=0)
        self.mamba = mamba.Mamba(self.config)
        self.norm_f = mamba.RMSNorm(config.d_model, self.config.rms_norm_eps)
        self.lm_head = nn.Linear(config.d_model, vocab, bias=False)

    def forward(self, tokens):
        """tokens (b, l) -> logits (b, l, v), through mamba.py's full-sequence path."""
        return self.lm_head(self.norm_f(self.mamba(self.embedding(tokens))))

    def new_caches(self, b):
        """mamba.py's empty decoding cache, as ``LM.generate`` makes it: per layer (h, inputs) with h None
        (its step starts from zeros) and inputs the last k - 1 conv inputs (b, d, k - 1), oldest first."""
        c = self.config
        w = self.embedding.weight
        return [(None, torch.zeros(b, c.d_inner, c.d_conv - 1, dtype=w.dtype, device=w.device))
                for _ in range(c.n_layers)]

    def step(self, token, caches):
        """One token: token (b,) -> (logits (b, v), caches), through ``mambapy.mamba.Mamba.step``."""
        x, caches = self.mamba.step(self.embedding(token), caches)
        return self.lm_head(self.norm_f(x)), caches

    @torch.no_grad()
    def prefill(self, input_ids):
        """mamba.py's prompt processing: ``step`` once per prompt token (``LM.generate`` does exactly
        this; mamba.py has no parallel prefill into its cache). input_ids (b, l >= 1) ->
        (logits of the last position (b, v), caches)."""
        caches = self.new_caches(input_ids.shape[0])
        for t in range(input_ids.shape[1]):
            logits, caches = self.step(input_ids[:, t], caches)
        return logits, caches

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens):
        """Greedy decoding (argmax over the first ``vocab_size`` logits, as MambaLM.generate), from the
        token-by-token prefill. Returns (tokens (b, l + T), logits each new token was chosen from (b, T, v))."""
        logits, caches = self.prefill(input_ids)
        return greedy(logits, caches, self.step, input_ids, max_new_tokens, self.vocab_size)


@torch.no_grad()
def greedy(logits, caches, step, input_ids, max_new_tokens, vocab_size):
    """Greedy decoding from the logits of the last prompt position and a cache, ``step(token, caches)
    -> (logits, caches)`` per new token. Returns (tokens (b, l + T), logits (b, T, v))."""
    tokens, kept = [input_ids], []
    for t in range(max_new_tokens):
        kept.append(logits)
        tokens.append(logits[:, :vocab_size].argmax(-1, keepdim=True))
        if t + 1 < max_new_tokens:
            logits, caches = step(tokens[-1][:, 0], caches)
    return torch.cat(tokens, 1), torch.stack(kept, 1)


@torch.no_grad()
def from_mamba_lm(model, pscan=True):
    """A MambapyLM holding the weights of ``model`` (an impls.models.mamba.MambaLM), in its dtype and device.

    The mapping: ``backbone.layers.{i}.{norm, mixer}.*`` -> ``mamba.layers.{i}.{norm, mixer}.*``
    (mamba.py's ResidualBlock and MambaBlock use the official parameter names and shapes: in_proj,
    conv1d, x_proj, dt_proj, A_log, D, out_proj, norm), ``backbone.embedding.weight`` -> embedding
    and (our tied head) lm_head, ``backbone.norm_f.weight`` -> norm_f. Every parameter of the peer is
    set (load_state_dict with strict=True).
    """
    c = model.config
    peer = MambapyLM(c, pscan)
    ours = model.state_dict()
    state = {"mamba." + k[len("backbone."):]: v for k, v in ours.items() if k.startswith("backbone.layers.")}
    state["embedding.weight"] = ours["backbone.embedding.weight"]
    state["norm_f.weight"] = ours["backbone.norm_f.weight"]
    state["lm_head.weight"] = ours["lm_head.weight"]
    peer.to(device=model.backbone.embedding.weight.device, dtype=model.dtype)
    peer.load_state_dict(state, strict=True)   # copies into the peer's own (usual, row-major) storage
    return peer.eval()


def caches_from(cache):
    """mamba.py's decoding cache holding the same state as our InferenceCache ``cache``: per layer
    (h, inputs) with h a copy of the SSM state (b, d, n) and inputs the last k - 1 conv inputs
    (b, d, k - 1), oldest first (our rolling buffer's slots phase+1, ..., phase+k-1 modulo k)."""
    k, p = cache.k, cache.phase
    order = [(p + j) % k for j in range(1, k)]
    return [(layer.ssm_state.clone(), layer.conv_buf[..., order]) for layer in cache.layers]  # indexing copies
