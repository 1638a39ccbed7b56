"""The language-model machinery every model here shares: the residual stack with the mixer as a
parameter, one forward / prefill / step / generate path, sampling, and the argument checks.

A model (impls/models/mamba.py, mamba2.py) is a mixer class and a config; ``LanguageModel`` does the
rest. The official stack (mamba_ssm/models/mixer_seq_simple.py, MixerModel and MambaLMHeadModel):

    h = embedding(ids);  h = h + mixer(norm(h)) per layer;  logits = lm_head(norm_f(h))

with the LM head tied to the embedding unless the config says otherwise, and the residual stream
kept in float32 for half-precision models with residual_in_fp32 (as the official code does).

Letters: b batch, l sequence length, m d_model, v the vocabulary padded to a multiple of
``pad_vocab_size_multiple`` (logits have v columns; ids past the real vocabulary are never chosen).

Two ways to generate (``LanguageModel.generate``, greedy or sampling with transformers' semantics):
    "reforward"  every new token re-runs ``forward`` over the whole sequence so far (what a model
                 without a cache does): time per token grows with l, quadratic in total;
    "recurrent"  ``prefill`` (one scan over the prompt, keeping each layer's state), then one
                 ``step`` per token: constant time and memory per token.

A mixer gives (each model's file documents its shapes):
    forward(hidden (b, l, m), mask (b, l) or None, impl, cache or None) -> (b, l, m); with a cache,
        it leaves its state after the last token there (prefill)
    new_cache(b, dtype, device, fused) -> its layer cache, with ``tensors()`` for the cache's size
    step(hidden (b, m), cache, phase, step_fn, impl, residual (b, m)) -> residual + its output
    fused_step(same arguments) -> None: adds its output into residual in place, every intermediate
        in the cache's buffers (float32/float64 RMSNorm models)
step_fn is the implementation's step function once the front door has passed the cache's buffers
(InferenceCache.checked); until then it is None, and the step goes through the front door.

Left padding: pass ``attention_mask`` (b, l), 1 for a real token and 0 for padding, every row of the
form 0...0 1...1. The mixers zero padded positions before their conv and their scan, so a row decodes
exactly as if it had not been padded. Right padding or holes in the mask raise ValueError.
"""

import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

import impls
from . import checkpoints

# token ids: a set lookup, since a decoding step checks its token every time
INTEGER_DTYPES = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64})


# ---------------------------------------------------------------------------- argument checks

def check_mask(attention_mask, input_ids, where):
    """attention_mask: (b, l) of exactly 0 and 1, in any dtype (0.5 is refused, not rounded), with every
    row 0...0 1...1 (left padding, at least one real token). Returns it as int64, or None if all ones.
    Errors start with ``where`` (the calling method: "generate", "forward", "prefill")."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"{where}: attention_mask: expected a tensor, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"{where}: attention_mask: expected shape {tuple(input_ids.shape)} (that of input_ids), "
                         f"got {tuple(attention_mask.shape)}")
    if not ((attention_mask == 0) | (attention_mask == 1)).all():
        bad = attention_mask[(attention_mask != 0) & (attention_mask != 1)]
        raise ValueError(f"{where}: attention_mask: expected only 0 (padding) and 1 (real token), got values such as "
                         f"{bad[:4].tolist()}")
    m = attention_mask.to(torch.long)
    if m.shape[1] and not (m[:, 1:] >= m[:, :-1]).all():
        raise ValueError(f"{where}: attention_mask: only left padding is supported (every row 0...0 1...1); "
                         "pad prompts of different lengths on the left")
    if m.shape[1] and not m[:, -1].all():
        raise ValueError(f"{where}: attention_mask: every row needs at least one real token")
    return None if m.all() else m


def check_ids(input_ids, where, vocab_size):
    """input_ids: an integer tensor (b, l) with l >= 1 and every id a token, in [0, vocab_size): the
    embedding's rows past vocab_size are padding (to a multiple of pad_vocab_size_multiple), no token's."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"{where}: input_ids: expected a tensor, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"{where}: input_ids: expected integer ids, got {input_ids.dtype}")
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"{where}: input_ids: expected shape (b, l >= 1), got {tuple(input_ids.shape)}")
    if input_ids.numel():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{where}: input_ids: ids must be in [0, vocab_size = {vocab_size}), got id "
                             f"{lo if lo < 0 else hi}")


def check_impl_gradients(model, impl, family, where):
    """Refuse a scan implementation without gradients while autograd is on and the model's own
    parameters require grad (any nn.Module's default): the scan would blame "an input", and running
    it without a graph would hand back logits that silently cannot be trained through."""
    if impl is None or not torch.is_grad_enabled() or impls.get(impl, family).supports["gradients"]:
        return
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    if trainable:
        with_grads = [k for k in impls.names(family) if impls.get(k, family).supports["gradients"]]
        raise NotImplementedError(
            f"{where}: impl {impl!r} has no gradients, and autograd is on with the model's parameters "
            f"requiring grad ({len(trainable)}, e.g. {trainable[0]}): for inference call it under "
            f"torch.no_grad() (or torch.inference_mode()); to train, pick an implementation with "
            f"gradients: {', '.join(with_grads)}")


def check_step_impl(impl, family):
    """ValueError for an unknown implementation of ``family``, NotImplementedError for one without a step."""
    if impls.get(impl, family).step is None:
        raise NotImplementedError(f"step: {family} implementation {impl!r} has no step function; those with one: "
                                  f"{', '.join(n for n in impls.names(family) if impls.get(n, family).step)}")


def check_token(token, cache, impl, family):
    """A step's token: an integer tensor (b,) for the cache's batch, on its device; and an
    implementation with a step. Checked before the cache changes, so a refused step leaves it as it
    was. The id range is not checked here (a min/max per token would cost several µs of a step of
    about 100): the embedding lookup, the first thing a step does and before the cache changes,
    raises IndexError for it, which the step names (token_range_error)."""
    state = cache.layers[0].ssm_state
    b = state.shape[0]
    if not isinstance(token, torch.Tensor):
        raise TypeError(f"step: token: expected a tensor of shape (b={b},), got {type(token).__name__}")
    if token.dim() != 1 or token.shape[0] != b:  # index_select would resize a buffer, not fail
        raise ValueError(f"step: token: expected shape (b={b},) (the cache's batch), got {tuple(token.shape)}")
    if token.dtype not in INTEGER_DTYPES:
        raise TypeError(f"step: token: expected integer ids, got {token.dtype}")
    if token.device != state.device:
        raise ValueError(f"step: token: on {token.device}, the cache on {state.device}")
    if impl not in cache.checked:
        check_step_impl(impl, family)


def token_range_error(token, v):
    return ValueError(f"step: token: ids must be in [0, {v}), got {token.tolist()}")


def check_count(value, where):
    """A non-negative int (a bool or a float such as 2.7 is refused, not truncated)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if not (isinstance(value, torch.Tensor) and value.dim() == 0 and not value.dtype.is_floating_point
                and not value.dtype.is_complex and value.dtype != torch.bool):
            raise TypeError(f"{where}: expected a non-negative int, got {value!r}")
    value = int(value)
    if value < 0:
        raise ValueError(f"{where}: expected a non-negative int, got {value}")
    return value


def check_sampling(v, do_sample, temperature, top_k, top_p, generator, eos_token_id, pad_token_id):
    """Check generate's decoding arguments (each named in the error). Returns (eos ids as a tensor or
    None, the pad id)."""
    if not isinstance(do_sample, bool):
        raise TypeError(f"generate: do_sample: expected True or False, got {do_sample!r}")
    given = [name for name, value, default in (("temperature", temperature, 1.0), ("top_k", top_k, None),
                                               ("top_p", top_p, None), ("generator", generator, None))
             if value is not default and value != default]
    if given and not do_sample:
        raise ValueError(f"generate: {', '.join(given)} given but do_sample=False: greedy decoding would ignore "
                         f"them; pass do_sample=True to sample")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"generate: temperature: expected a positive number, got {temperature!r}")
    if not (0 < temperature < math.inf):
        raise ValueError(f"generate: temperature: expected a positive finite number, got {temperature!r} "
                         f"(for the most probable token use greedy decoding, do_sample=False)")
    if top_k is not None:
        check_count(top_k, "generate: top_k")
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real):
            raise TypeError(f"generate: top_p: expected a number in [0, 1], got {top_p!r}")
        if not 0 <= top_p <= 1:
            raise ValueError(f"generate: top_p: expected a number in [0, 1], got {top_p!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generate: generator: expected a torch.Generator, got {type(generator).__name__}")
    if eos_token_id is None:
        if pad_token_id is not None:
            raise ValueError("generate: pad_token_id pads rows finished by eos_token_id, which is not given")
        return None, None
    ids = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    for name, values in (("eos_token_id", ids), ("pad_token_id", [] if pad_token_id is None else [pad_token_id])):
        for i in values:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < v:
                raise ValueError(f"generate: {name}: expected ids in [0, {v}), got {i!r}")
    if not ids:
        raise ValueError("generate: eos_token_id: an empty list; pass None for no stop token")
    return torch.tensor(ids), torch.tensor(ids[0] if pad_token_id is None else pad_token_id)


# ---------------------------------------------------------------------------- sampling and the token loop

def sampling_scores(logits, temperature=1.0, top_k=None, top_p=None):
    """The scores generate samples from (softmax of them), with the semantics of transformers'
    TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper applied in generate's order.

    Args:
        logits: (b, V) float
        temperature: > 0; top_k: None or 0 (off) or k >= 1; top_p: None or in [0, 1] (1: off)
    Returns:
        scores (b, V) float32 (transformers samples in float32 too): logits / temperature, with every
        filtered token at -inf. top-k keeps the tokens scoring at least the k-th highest score (ties
        kept); top-p keeps, from the most probable down, the tokens until their probability reaches
        top_p: a token goes when the total probability of the tokens no more probable than it
        (itself included, in sorted order) is at most 1 - top_p; the most probable always stays.
    """
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        kth = torch.topk(scores, min(int(top_k), scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        ascending, order = torch.sort(scores, dim=-1)     # the same sort as transformers, so ties fall alike
        mass_up_to = ascending.softmax(-1).cumsum(-1)
        drop = mass_up_to <= 1 - top_p
        drop[..., -1] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return scores


def decode_tokens(input_ids, max_new_tokens, logits_at, vocab_size, eos, pad, sampling, return_logits,
                  logits_width, logits_dtype):
    """The token loop of ``generate``, in both modes.

    Args:
        input_ids: (b, l) int64 prompt; max_new_tokens: T >= 0 (checked by the caller)
        logits_at: (tokens (b, l + T), t) -> logits (b, v) that choose tokens[:, t]
        vocab_size: V, the real vocabulary: padded rows beyond it are never chosen
        eos, pad: from check_sampling (eos None: no stop token); sampling: None (greedy) or a dict
              of sampling_scores' arguments plus ``generator``
        logits_width, logits_dtype: v and the dtype of the empty logits returned when T = 0
    Returns:
        tokens (b, l + t) int64, t <= T (every row finished at an eos id stops the loop early);
        with return_logits, (tokens, logits (b, t, v))
    """
    b, l = input_ids.shape
    tokens = torch.empty(b, l + max_new_tokens, dtype=torch.long, device=input_ids.device)
    tokens[:, :l] = input_ids
    finished = None if eos is None else torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    kept, end = [], l + max_new_tokens
    for t in range(l, l + max_new_tokens):
        logits = logits_at(tokens, t)
        kept.append(logits)
        if sampling is not None:
            scores = sampling_scores(logits[:, :vocab_size], sampling["temperature"], sampling["top_k"],
                                     sampling["top_p"])
            chosen = torch.multinomial(torch.softmax(scores, -1), 1, generator=sampling["generator"])[:, 0]
        else:
            chosen = logits[:, :vocab_size].argmax(-1)
        if finished is not None:
            chosen = torch.where(finished, pad, chosen)
            finished |= torch.isin(chosen, eos)
        tokens[:, t] = chosen
        if finished is not None and bool(finished.all()):
            end = t + 1
            break
    tokens = tokens[:, :end]
    if return_logits:
        return tokens, (torch.stack(kept, 1) if kept else torch.empty(b, 0, logits_width, dtype=logits_dtype))
    return tokens


# ---------------------------------------------------------------------------- the residual stack

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (the official rms_norm_ref)."""

    def __init__(self, m, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(m))

    def forward(self, x):
        # torch's rms_norm: the same formula in one call where x * rsqrt(...) * weight made six (a
        # decoding step calls it n_layer + 1 times); for float16/bfloat16 it computes in float32 and
        # rounds once, as the official rms_norm_ref does with its default upcast
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def block_norm(config):
    """The config's norm over d_model: RMSNorm, or LayerNorm with rms_norm false."""
    if config.rms_norm:
        return RMSNorm(config.d_model, config.norm_epsilon)
    return nn.LayerNorm(config.d_model, eps=config.norm_epsilon)


class Block(nn.Module):
    """Pre-norm residual: h + mixer(norm(h)). Official names: ``norm``, ``mixer``; ``mixer`` is the
    layer's class (MambaMixer, Mamba2Mixer, ...), built from the config."""

    def __init__(self, config, mixer):
        super().__init__()
        self.norm = block_norm(config)
        self.mixer = mixer(config)


class Backbone(nn.Module):
    """Official ``MixerModel``: embedding (v, m), layers, norm_f; ``mixer`` as for Block."""

    def __init__(self, config, mixer):
        super().__init__()
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, mixer) for _ in range(config.n_layer))
        self.norm_f = block_norm(config)


def dt_bias_init(size, config):
    """The official dt initialisation of every mixer here: dt log-uniform in [dt_min, dt_max], floored
    at dt_init_floor, returned through the inverse of softplus (what the dt bias stores): (size,)."""
    c = config
    dt = torch.exp(torch.rand(size) * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min))
    dt = dt.clamp(min=c.dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


def transposed_storage(weight):
    """The same (out, in) parameter, its values unchanged, stored transposed in memory (strides (1, out)).

    Used for the matrices with more outputs than inputs (in_proj, dt_proj, the embedding / LM head
    (v, m)). Decoding multiplies every weight matrix by one vector per token, which is what a step
    spends most of its time on at mamba-130m's size (its 516 MB of weights are read once per
    token). With torch 2.13's MKL on this project's CPU (AMD EPYC, AVX2, one thread) that product
    runs much faster on this storage when out > in, measured over 24 distinct matrices (read from
    memory, as in a real step): in_proj 12 ms against 20 ms, the (50280, 768) LM head 7.6 ms
    against 14 ms. With out < in (x_proj, out_proj) the usual storage was as fast or faster, so
    they keep it. Names, shapes, values and state_dict() are the official ones; ``.to(dtype)``,
    ``load_state_dict`` and ``from_pretrained`` keep the storage (their copies preserve strides),
    and safetensors files get contiguous tensors. Products over a whole sequence (prefill,
    re-forwarding) are matrix-matrix and barely notice the storage.
    """
    return nn.Parameter(weight.detach().t().contiguous().t(), requires_grad=weight.requires_grad)


# ---------------------------------------------------------------------------- decoding state

class ResidualStream:
    """The fused step's residual stream and RMSNorm buffers, with every view the norm needs made once.

    residual (b, m): h, updated in place; normed (b, m): the last RMSNorm's output; mean_sq (b, 1, 1)
    """

    __slots__ = ("residual", "normed", "mean_sq", "row", "col", "scale")

    def __init__(self, b, m, like):
        self.residual, self.normed, self.mean_sq = like.new_empty(b, m), like.new_empty(b, m), like.new_empty(b, 1, 1)
        self.row, self.col = self.residual[:, None, :], self.residual[:, :, None]   # (b, 1, m), (b, m, 1)
        self.scale = self.mean_sq[:, 0]                                             # (b, 1)

    def normalize(self, weight, eps):
        """RMSNorm of the residual into ``normed``, in four ops where F.rms_norm dispatches about eight
        on a CPU: x * rsqrt(mean(x^2) + eps) * weight, the official formula, with mean(x^2) + eps as
        one baddbmm of x by itself (eps a (1, 1, 1) tensor). Returns normed (b, m)."""
        torch.baddbmm(eps, self.row, self.col, alpha=1.0 / self.residual.shape[1], out=self.mean_sq)
        self.mean_sq.rsqrt_()
        return torch.mul(self.residual, self.scale, out=self.normed).mul_(weight)

    def tensors(self):
        return (self.residual, self.normed, self.mean_sq)


def conv_buffer(c, b, k, dtype, device):
    """A causal conv's decoding buffer (c, b, k + 1): slots 0..k-1 a rolling buffer of the last k conv
    inputs, zero; slot k a constant 1, which multiplies the conv bias when the conv is one bmm by taps
    followed by the bias (c, k + 1, 1)."""
    store = torch.zeros(c, b, k + 1, dtype=dtype, device=device)
    store[..., k] = 1
    return store


def rotated_conv_taps(conv1d, dtype):
    """A depthwise conv1d's taps (weight (c, 1, k)) rotated for each phase of the rolling buffer:
    (k phases, c, k slots) in ``dtype``. At phase p (the slot the current token is written to) slot s
    holds x_{t-k+1+j}, j = (s-p-1) mod k, which tap w[:, j] multiplies."""
    w = conv1d.weight[:, 0, :].detach().to(dtype)                    # (c, k)
    k = w.shape[1]
    idx = torch.tensor([[(s - p - 1) % k for s in range(k)] for p in range(k)], device=w.device)
    return w[:, idx].permute(1, 0, 2).contiguous()


def keep_prefill_state(out, cache, conv_in):
    """A mixer's scan output over a whole sequence, with the state left in ``cache`` when there is one
    (prefill): then ``out`` is (y, the scan's last state), which goes into cache.ssm_state, and the
    last k-1 columns of conv_in (b, c, l) go into slots 0..k-2 of cache.conv_store (c, b, k + 1),
    zeros before them when l < k-1, as the conv saw them (the next token goes to slot k-1, the phase
    a new cache starts at). Returns y."""
    if cache is None:
        return out
    y, last_state = out
    cache.ssm_state.copy_(last_state)
    store = cache.conv_store
    k = store.shape[-1] - 1
    tail = conv_in[..., max(conv_in.shape[-1] - (k - 1), 0):]
    store[..., :k].zero_()
    store[..., k - 1 - tail.shape[-1]:k - 1] = tail.permute(1, 0, 2)
    return y


class InferenceCache:
    """The decoding state of the whole model: constant size, whatever the position.

    layers: one layer cache per layer (the mixer's new_cache); k: the conv width, phase: the conv
    buffer slot of the next token (prefill leaves the last k-1 inputs in slots 0..k-2);
    checked: implementation name -> its step function, once its first call on these buffers passed
    the front door; stream (ResidualStream) and eps (the norms' epsilon as a (1, 1, 1) tensor) for
    the fused step, else None.
    """

    def __init__(self, layers, k):
        self.layers, self.k = layers, k
        self.phase = k - 1
        self.checked = {}
        self.stream = self.eps = None

    def nbytes(self):
        tensors = [t for c in self.layers for t in c.tensors()]
        if self.stream is not None:
            tensors += [*self.stream.tensors(), self.eps]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# ---------------------------------------------------------------------------- the model

class LanguageModel(nn.Module):
    """Backbone + LM head (official ``MambaLMHeadModel``), whatever the mixer. A model's file makes
    one by naming, as class attributes:

        family        the registry family its scans run through ("selective", "ssd", ...)
        mixer         its mixer class
        step_default  the step implementation used when step's impl is None
        weight_names  its checkpoint table of weight-name prefixes (official -> transformers)

    and by defining read_config(folder) -> (config, layout), parameter_shapes(config) (official name
    -> shape) and checkpoint_config(layout, safe_serialization) -> the config.json dict.
    ``state_dict()`` keys are the official checkpoint's.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config, self.mixer)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self.init_weights()
        for module in self.modules():  # after initialising, so a seed gives the same values as ever
            if (isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.shape[0] > module.weight.shape[1]
                    and not (config.tie_embeddings and module is self.lm_head)):
                module.weight = transposed_storage(module.weight)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    @torch.no_grad()
    def init_weights(self, initializer_range=0.02):
        """mixer_seq_simple._init_weights: embedding N(0, 0.02); the projections' biases zero;
        out_proj rescaled by 1/sqrt(n_layer) (one residual per layer). The mixers initialise their
        SSM parameters themselves (dt_proj's bias among them)."""
        nn.init.normal_(self.backbone.embedding.weight, std=initializer_range)
        for block in self.backbone.layers:
            mixer = block.mixer
            for lin in (mixer.in_proj, mixer.out_proj):
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            nn.init.kaiming_uniform_(mixer.out_proj.weight, a=math.sqrt(5))
            mixer.out_proj.weight /= math.sqrt(self.config.n_layer)

    @property
    def dtype(self):
        return self.backbone.embedding.weight.dtype

    def residual_fp32(self):
        """Whether the residual stream is kept in float32 (residual_in_fp32 and a half-precision model)."""
        return self.config.residual_in_fp32 and self.dtype in (torch.float16, torch.bfloat16)

    def fused_decoding(self):
        """Whether ``step`` takes the fused path: RMSNorm, and a float32 or float64 model (the compute
        dtype is the model's, and the residual stream needs no float32 copy). Other models (LayerNorm,
        float16/bfloat16) take the module-by-module step, the same arithmetic."""
        return self.config.rms_norm and self.dtype in (torch.float32, torch.float64)

    # ------------------------------------------------------------------ full sequence

    def forward(self, input_ids, impl=None, attention_mask=None, num_last_tokens=0):
        """Logits for every position (each from the tokens up to it).

        Args:
            input_ids: (b, l) integer token ids, l >= 1
            impl: the registered implementation of the model's scan family (None: the interface default)
            attention_mask: (b, l) 1 for real tokens, 0 for left padding; None when all are real
            num_last_tokens: a non-negative int; if > 0, the LM head runs on the last that many
                positions only (official name)
        Returns:
            logits (b, l, v), or (b, min(num_last_tokens, l), v)
        Raises:
            ValueError for ids that are not (b, l >= 1) or outside the vocabulary, a bad attention_mask,
            or a negative num_last_tokens; TypeError for ids that are not integers, or a num_last_tokens
            that is not an int (2.0 and True are refused);
            NotImplementedError for an impl without gradients while autograd is on (call it under
            torch.no_grad() for inference)
        """
        check_ids(input_ids, "forward", self.config.vocab_size)
        num_last_tokens = check_count(num_last_tokens, "forward: num_last_tokens")
        check_impl_gradients(self, impl, self.family, "forward")
        return self.logits(input_ids, impl, check_mask(attention_mask, input_ids, "forward"), num_last_tokens)

    def logits(self, input_ids, impl, mask, num_last_tokens=0, cache=None):
        """``forward`` on checked arguments (mask: int64 (b, l) or None); with ``cache``, each layer
        leaves its state after the last token there."""
        h = self.backbone.embedding(input_ids)                       # (b, l, m)
        m = None if mask is None else mask.to(h.dtype)
        residual = h.float() if self.residual_fp32() else h
        for i, block in enumerate(self.backbone.layers):
            out = block.mixer(block.norm(residual.to(h.dtype)), m, impl, None if cache is None else cache.layers[i])
            residual = residual + out
        h = self.backbone.norm_f(residual.to(h.dtype))
        if num_last_tokens > 0:
            h = h[:, -num_last_tokens:]
        return self.lm_head(h)

    # ------------------------------------------------------------------ recurrent decoding

    def new_cache(self, batch_size):
        """An empty InferenceCache for ``batch_size`` rows (state zero: decoding from no prompt), with
        the fused step's buffers where the model takes it."""
        w = self.backbone.embedding.weight
        fused = self.fused_decoding()
        cache = InferenceCache([blk.mixer.new_cache(batch_size, self.dtype, w.device, fused)
                                for blk in self.backbone.layers], getattr(self.config, "d_conv", 1))  # no conv: one phase
        if fused:
            cache.stream = ResidualStream(batch_size, self.config.d_model, w)
            cache.eps = torch.full((1, 1, 1), self.config.norm_epsilon, dtype=w.dtype, device=w.device)
        return cache

    @torch.no_grad()
    def prefill(self, input_ids, impl=None, attention_mask=None):
        """One scan per layer over the prompt, keeping the state.

        Args:
            input_ids: (b, l) with l >= 1; impl: scan implementation (None: interface default)
            attention_mask: (b, l) for left-padded prompts, or None
        Returns:
            (logits of the last position (b, v), InferenceCache ready for ``step``)
        """
        check_ids(input_ids, "prefill", self.config.vocab_size)
        mask = check_mask(attention_mask, input_ids, "prefill")
        cache = self.new_cache(input_ids.shape[0])
        logits = self.logits(input_ids, impl, mask, num_last_tokens=1, cache=cache)
        return logits[:, -1], cache

    @torch.no_grad()
    def step(self, token, cache, impl=None):
        """One new token: advance every layer's state in place.

        Args:
            token: (b,) integer ids; cache: the InferenceCache from ``prefill`` (or ``new_cache``)
            impl: the step implementation (None: the family's default, "recurrent")
        Returns:
            logits (b, v) for the next position
        Raises:
            before the cache changes: ValueError for a token that is not (b,) for the cache's batch
            (or on another device, or outside the vocabulary), TypeError for a non-integer token,
            ValueError for an unknown implementation, NotImplementedError for one without a step
        """
        impl = self.step_default if impl is None else impl
        check_token(token, cache, impl, self.family)
        # The step's arguments have the same types, shapes, dtypes and devices at every token (the
        # fused step's are the very same buffers), so the front door's verdict cannot change after
        # the first call: that call goes through it, later ones straight to the implementation.
        step_fn = cache.checked.get(impl)
        layers = zip(self.backbone.layers, cache.layers)
        embedding = self.backbone.embedding
        if cache.stream is not None:
            stream = cache.stream
            try:  # before the cache changes: an out-of-range id leaves it as it was
                torch.index_select(embedding.weight, 0, token, out=stream.residual)     # (b, m)
            except IndexError:
                raise token_range_error(token, self.config.padded_vocab_size) from None
            for block, layer_cache in layers:
                block.mixer.fused_step(stream.normalize(block.norm.weight, cache.eps), layer_cache, cache.phase,
                                       step_fn, impl, stream.residual)
            # a new tensor: callers keep the logits
            logits = torch.mm(stream.normalize(self.backbone.norm_f.weight, cache.eps), self.lm_head.weight.t())
        else:
            try:
                h = embedding(token)                                 # (b, m)
            except IndexError:
                raise token_range_error(token, self.config.padded_vocab_size) from None
            residual = h.float() if self.residual_fp32() else h
            for block, layer_cache in layers:
                residual = block.mixer.step(block.norm(residual.to(h.dtype)), layer_cache, cache.phase, step_fn,
                                            impl, residual)
            logits = self.lm_head(self.backbone.norm_f(residual.to(h.dtype)))
        if step_fn is None:
            cache.checked[impl] = impls.get(impl, self.family).step
        cache.phase = (cache.phase + 1) % cache.k
        return logits

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, mode="recurrent", impl=None, step_impl=None,
                 attention_mask=None, return_logits=False, do_sample=False, temperature=1.0, top_k=None,
                 top_p=None, generator=None, eos_token_id=None, pad_token_id=None):
        """Greedy decoding (the default) or sampling, with transformers' semantics (GenerationMixin:
        greedy is argmax, sampling draws from softmax of the scores after its temperature, top-k and
        top-p warpers, in that order: sampling_scores). Only the first vocab_size logits compete:
        padded vocabulary ids are never chosen.

        Args:
            input_ids: (b, l) integer prompt ids, l >= 1 (left-padded with ``attention_mask`` if lengths differ)
            max_new_tokens: how many tokens to add at most (T), a non-negative int
            mode: "reforward" re-runs ``forward`` over the whole sequence so far for each token;
                  "recurrent" runs ``prefill`` (one scan per layer) then one ``step`` per token
            impl: the scan implementation (None: the interface default); in "recurrent" mode also the
                  step implementation unless step_impl is given
            step_impl: the step implementation for "recurrent" (None: impl, or the step default when
                  impl is None too); an impl without a step is not replaced by another silently:
                  NotImplementedError asking for step_impl
            attention_mask: (b, l) of exactly 0 and 1 (any dtype), 1 real / 0 left padding; None when
                  every prompt fills its row
            return_logits: also return the logits each new token was chosen from (before any warper)
            do_sample: False (greedy) or True (sample); the sampling arguments need it (ValueError
                  otherwise: nothing is silently ignored)
            temperature: > 0, the scores are logits / temperature
            top_k: keep the k highest scores (ties with the k-th kept); None or 0: no filter. Unlike
                  transformers' GenerationConfig, whose default is 50, nothing is filtered unless asked
            top_p: in [0, 1]: keep the smallest set of most probable tokens whose probability reaches
                  top_p (at least one); None or 1: no filter
            generator: a torch.Generator for the draws (None: torch's global generator, as transformers);
                  the same seed gives the same tokens in both modes (one draw per new token)
            eos_token_id: an id or a list of ids that end a row; None: no stop. A finished row gets
                  pad_token_id (default: the first eos id) from then on, and generation stops when
                  every row has finished, so fewer than T tokens may come back, as in transformers
        Returns:
            tokens (b, l + t) int64, t <= T; with return_logits, (tokens, logits (b, t, v))
        Raises:
            TypeError / ValueError for a bad argument (each named), before anything runs
        """
        if mode not in ("recurrent", "reforward"):
            raise ValueError(f"generate: mode: expected 'recurrent' or 'reforward', got {mode!r}")
        check_ids(input_ids, "generate", self.config.vocab_size)
        T = check_count(max_new_tokens, "generate: max_new_tokens")
        eos, pad = check_sampling(self.config.padded_vocab_size, do_sample, temperature, top_k, top_p,
                                  generator, eos_token_id, pad_token_id)
        mask = check_mask(attention_mask, input_ids, "generate")
        b, l = input_ids.shape
        if mode == "recurrent":
            if step_impl is None and impl is not None and impls.get(impl, self.family).step is None:
                raise NotImplementedError(
                    f"generate: impl {impl!r} has no step function, and mode='recurrent' steps with impl unless "
                    f"step_impl is given: pass step_impl=... (one of "
                    f"{', '.join(n for n in impls.names(self.family) if impls.get(n, self.family).step)})")
            step_impl = impl if step_impl is None else step_impl
            check_step_impl(self.step_default if step_impl is None else step_impl, self.family)
        full_mask = None
        if mask is not None and mode == "reforward":
            full_mask = torch.ones(b, l + T, dtype=mask.dtype, device=mask.device)
            full_mask[:, :l] = mask
        cache = None

        def logits_at(tokens, t):   # the logits that choose tokens[:, t]
            nonlocal cache
            if mode == "reforward":
                return self.logits(tokens[:, :t], impl, None if full_mask is None else full_mask[:, :t],
                                   num_last_tokens=1)[:, -1]
            if cache is None:
                logits, cache = self.prefill(input_ids, impl, mask)
                return logits
            return self.step(tokens[:, t - 1], cache, step_impl)

        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator) if do_sample else None
        return decode_tokens(input_ids, T, logits_at, self.config.vocab_size, eos, pad, sampling, return_logits,
                             self.config.padded_vocab_size, self.dtype)

    # ------------------------------------------------------------------ checkpoints

    def save_pretrained(self, folder, *, layout="official", safe_serialization=None):
        """Write a checkpoint folder in ``layout``:

        "official": ``config.json`` (the official fields) and ``pytorch_model.bin`` (torch.save of the
            state dict, lm_head.weight included, as the official save_pretrained does), or
            ``model.safetensors`` with safe_serialization=True;
        "transformers": ``config.json`` in transformers' fields and the weights under transformers'
            names (the model's tables), ``model.safetensors`` unless safe_serialization=False: a folder
            transformers' from_pretrained loads.

        safetensors stores no shared tensors, so a tied lm_head.weight is left out of it. layout and
        safe_serialization are keyword-only: a positional second argument is a TypeError, never
        silently taken for the other one.
        Raises ValueError for an unknown layout, or a model that layout cannot express (named), before
        anything is written.
        """
        if layout not in checkpoints.LAYOUTS:
            raise ValueError(f"save_pretrained: layout: expected one of {checkpoints.LAYOUTS}, got {layout!r}")
        if safe_serialization is None:
            safe_serialization = layout == "transformers"   # what each layout's own save_pretrained writes
        config = self.checkpoint_config(layout, safe_serialization)
        state = self.state_dict()
        if safe_serialization and self.config.tie_embeddings:
            state.pop("lm_head.weight")
        names = checkpoints.rename_weights(state, "official", layout, self.weight_names)
        checkpoints.write_checkpoint(folder, config, {names[k]: v for k, v in state.items()}, safe_serialization)

    @classmethod
    def from_pretrained(cls, folder, dtype=None):
        """Load a local checkpoint folder in either layout, official or transformers': config.json plus
        model.safetensors (preferred), sharded safetensors (model.safetensors.index.json) or
        pytorch_model.bin. Nothing is downloaded.

        Everything is checked before any tensor is allocated: the config's layout and size fields
        (the model's read_config), then every parameter's name and shape, read from the weight file's
        header (checkpoints.stored_shapes), against those the config implies. Weights under either
        layout's names load with either config (their names say their layout), as transformers'
        own loader also accepts both.

        Args:
            folder: path of the folder; dtype: build the model in this dtype (float16, bfloat16,
                float32 or float64), so the weights are copied into it without passing through float32
                (None: float32)
        Raises:
            FileNotFoundError if the folder lacks config.json or a weight file; ValueError for a file
            given for the folder, a config in neither layout or of another model (which is named), a
            missing size field, a size that is not an integer, a weight file that cannot be read
            (named), or a shape the config does not imply; checkpoints.WeightNamesError (a KeyError
            and a ValueError) on missing or unexpected parameter names; ValueError naming config.json
            when it is not JSON or not an object; TypeError for a dtype that is not one of the scans'
            input dtypes (float16, bfloat16, float32, float64: impls.frontdoor.INPUT_DTYPES).
        """
        checkpoints.check_dtype_arg("from_pretrained", dtype)
        config, layout = cls.read_config(folder)
        files = checkpoints.weight_files(folder)
        shapes = checkpoints.stored_shapes(files)
        names_layout = checkpoints.weights_layout(shapes, cls.weight_names) or layout
        optional = {"lm_head.weight"} if config.tie_embeddings else set()
        checkpoints.check_weight_shapes(shapes, names_layout, cls.parameter_shapes(config), optional,
                                        cls.weight_names)
        model = cls(config) if dtype is None else cls(config).to(dtype)   # before the copy: no float32 on the way
        state = checkpoints.load_weights(files)
        names = checkpoints.rename_weights(state, names_layout, "official", cls.weight_names)
        model.load_official_state_dict({names[k]: v for k, v in state.items()})
        return model

    @torch.no_grad()
    def load_official_state_dict(self, state):
        """Copy a checkpoint's tensors (official names) in, converting dtype; with tied embeddings
        lm_head.weight may be absent (safetensors) or present (torch.save), and then must equal the
        embedding."""
        expected = self.state_dict()
        tied = self.config.tie_embeddings
        missing = [k for k in expected if k not in state and not (tied and k == "lm_head.weight")]
        unexpected = [k for k in state if k not in expected]
        if missing or unexpected:
            raise checkpoints.WeightNamesError(f"load_official_state_dict: missing {checkpoints.few(missing)}, "
                                               f"unexpected {checkpoints.few(unexpected)}")
        for k, v in state.items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise ValueError(f"load_official_state_dict: {k}: expected shape {tuple(expected[k].shape)}, "
                                 f"got {tuple(v.shape)}")
        if (tied and "lm_head.weight" in state
                and not torch.equal(state["lm_head.weight"], state["backbone.embedding.weight"])):
            raise ValueError("load_official_state_dict: tie_embeddings is true but lm_head.weight differs from "
                             "backbone.embedding.weight")
        for k, v in state.items():
            if not (tied and k == "lm_head.weight"):
                expected[k].copy_(v)
