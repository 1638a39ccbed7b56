"""A small, real Mamba language model whose selective scan runs through any registered implementation.

The Mamba-1 block of the paper (Gu & Dao 2023, Section 3.4 and Figure 3) and of the official code
(https://github.com/state-spaces/mamba: mamba_ssm/modules/mamba_simple.py for the block,
mamba_ssm/models/mixer_seq_simple.py for the stack, mamba_ssm/models/config_mamba.py for the config):

    in_proj -> x, z;  x -> causal depthwise conv1d (d_conv taps) -> SiLU -> x_proj -> (dt, B, C);
    dt -> dt_proj (its bias is the scan's delta_bias, softplus on);
    y = selective_scan(x, dt, A = -exp(A_log), B, C, D, z)   (the gate y * silu(z) is inside the scan);
    out_proj(y)

stacked as a pre-norm residual stream (h = h + mixer(RMSNorm(h)) per layer, then norm_f), with the
embedding tied to the LM head. Parameter names and shapes are those of the official checkpoints, so
``MambaLM.from_pretrained(folder)`` loads a downloaded ``state-spaces/mamba-130m`` folder
(config.json plus pytorch_model.bin or model.safetensors). Nothing is ever fetched from a hub.

Letters as in impls/frontdoor.py: b batch, l sequence length, d channels of the scan (the official
``d_inner`` = expand * d_model), n state size (``d_state``); also m = d_model, r = dt_rank,
k = d_conv, v = the vocabulary padded to a multiple of ``pad_vocab_size_multiple`` (the official
model pads it too: mamba-130m's vocab_size 50277 gives v = 50280 logits).

Two ways to generate (``MambaLM.generate``):
    "reforward"  every new token re-runs the whole sequence so far through ``forward`` (what a minimal
                 Mamba without a cache does): time per token grows with l, quadratic in total;
    "recurrent"  one scan over the prompt (``prefill``: the SSM state from ``return_last_state`` and
                 the conv state, the last k-1 conv inputs), then one ``step`` per token through
                 ``impls.selective_state_update``: constant time and memory per token.

What a decoding step does per layer, and what it leaves out (the per-token fixed cost): A = -exp(A_log),
D and the dt bias are computed once per cache, not per token; the conv input goes into a preallocated
rolling buffer (no concatenation) and the conv uses taps pre-rotated for the buffer's phase (no padded
conv1d call); the SSM state is preallocated and advanced in place; the residual add rides on the
output projection's matrix multiply; matrices with more outputs than inputs are stored transposed,
where this CPU's matrix-vector product is faster (``_transposed_storage``).
Most of a small model's step is the fixed cost of each torch call (a few µs inside a step, several
times what the same call costs repeated alone: benchmarks/decode_split.py), so float32/float64
RMSNorm models take a fused step (``MambaLM._fused_step``, LayerDecode): the same arithmetic in about
half the calls, every intermediate in a buffer the cache made once, the conv and its bias one bmm,
the dt bias inside dt_proj's addmm, the RMSNorm in four ops, and the scan step straight to the
implementation once the front door has passed its (fixed) buffers. Other models take the
module-by-module step (``MambaMixer.step``).
benchmarks/decode_split.py measures where the remaining time goes; impls/mambapy_model.py holds the
same model in mamba.py, for parity tests and as the peer the decoding speed is measured against.

Batches of prompts of different lengths: left-pad them and pass ``attention_mask`` (b, l), 1 for a
real token and 0 for padding, every row of the form 0...0 1...1. Padding is made exact, not
approximate: the conv input and the scan input are zeroed at padded positions, so the SSM state is
exactly zero when a row's first real token arrives and its conv window sees zeros, as if the prompt
had not been padded at all. Right padding or holes in the mask raise ValueError.
"""

import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import impls
from .frontdoor import compute_dtype

# selective_state_update's default implementation (a keyword default there), for MambaLM.step's impl=None
STEP_DEFAULT = impls.selective_state_update.__kwdefaults__["impl"]
CONFIG_NAME = "config.json"
WEIGHTS_BIN = "pytorch_model.bin"
WEIGHTS_SAFETENSORS = "model.safetensors"

# ssm_cfg keys of the official Mamba-1 mixer (mamba_simple.Mamba.__init__) and their defaults.
SSM_DEFAULTS = dict(d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                    dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False,
                    use_fast_path=True)


class MambaConfig:
    """The fields of an official Mamba ``config.json`` (mamba_ssm.models.config_mamba.MambaConfig),
    with the official defaults. Unknown fields are accepted and kept (``to_dict`` writes them back).

    ``ssm_cfg`` is kept exactly as given (mamba-130m's is ``{}``); the resolved mixer sizes are
    attributes: d_state, d_conv, expand, dt_rank (``"auto"`` -> ceil(d_model / 16)), d_inner,
    conv_bias, bias, and padded_vocab_size (v).
    """

    def __init__(self, d_model=2560, d_intermediate=0, n_layer=64, vocab_size=50277, ssm_cfg=None,
                 attn_layer_idx=None, attn_cfg=None, rms_norm=True, residual_in_fp32=True,
                 fused_add_norm=True, pad_vocab_size_multiple=8, tie_embeddings=True, norm_epsilon=1e-5,
                 **extra):
        self.d_model = int(d_model)
        self.d_intermediate = int(d_intermediate)
        self.n_layer = int(n_layer)
        self.vocab_size = int(vocab_size)
        self.ssm_cfg = dict(ssm_cfg or {})
        self.attn_layer_idx = list(attn_layer_idx or [])
        self.attn_cfg = dict(attn_cfg or {})
        self.rms_norm = bool(rms_norm)
        self.residual_in_fp32 = bool(residual_in_fp32)
        self.fused_add_norm = bool(fused_add_norm)
        self.pad_vocab_size_multiple = int(pad_vocab_size_multiple)
        self.tie_embeddings = bool(tie_embeddings)
        self.norm_epsilon = float(norm_epsilon)
        self.extra = dict(extra)  # fields this code does not know: kept, written back, otherwise ignored

        if self.ssm_cfg.get("layer", "Mamba1") != "Mamba1":
            raise NotImplementedError(f"MambaConfig: ssm_cfg.layer = {self.ssm_cfg['layer']!r}: "
                                      f"only the Mamba-1 block is implemented")
        if self.attn_layer_idx:
            raise NotImplementedError(f"MambaConfig: attn_layer_idx = {self.attn_layer_idx}: "
                                      f"hybrid attention layers are not implemented")
        if self.d_intermediate:
            raise NotImplementedError(f"MambaConfig: d_intermediate = {self.d_intermediate}: "
                                      f"MLP layers are not implemented (0 = none, as in mamba-130m)")
        if self.d_model < 1 or self.n_layer < 1 or self.vocab_size < 1 or self.pad_vocab_size_multiple < 1:
            raise ValueError(f"MambaConfig: d_model, n_layer, vocab_size and pad_vocab_size_multiple must be >= 1, "
                             f"got {self.d_model}, {self.n_layer}, {self.vocab_size}, {self.pad_vocab_size_multiple}")

        s = {**SSM_DEFAULTS, **self.ssm_cfg}
        self.d_state, self.d_conv, self.expand = int(s["d_state"]), int(s["d_conv"]), s["expand"]
        self.d_inner = int(self.expand * self.d_model)
        self.dt_rank = math.ceil(self.d_model / 16) if s["dt_rank"] == "auto" else int(s["dt_rank"])
        self.dt_min, self.dt_max, self.dt_init = float(s["dt_min"]), float(s["dt_max"]), s["dt_init"]
        self.dt_scale, self.dt_init_floor = float(s["dt_scale"]), float(s["dt_init_floor"])
        self.conv_bias, self.bias = bool(s["conv_bias"]), bool(s["bias"])
        m = self.pad_vocab_size_multiple
        self.padded_vocab_size = self.vocab_size + (-self.vocab_size) % m

    FIELDS = ("d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx", "attn_cfg",
              "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings",
              "norm_epsilon")

    def to_dict(self):
        """The config.json contents: every official field, then the unknown ones kept from loading."""
        return {**{k: getattr(self, k) for k in self.FIELDS}, **self.extra}

    def __repr__(self):
        return "MambaConfig(" + ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()) + ")"

    def __eq__(self, other):
        return isinstance(other, MambaConfig) and self.to_dict() == other.to_dict()


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


class LayerCache:
    """What one layer keeps between decoding steps: constant size, whatever the position.

    ssm_state: (b, d, n) in the compute dtype, advanced in place by selective_state_update
    conv_buf: (b, d, k) rolling buffer of the last k conv inputs; slot ``phase`` is written next. A
        view of conv_store (d, b, k + 1), whose extra slot k holds a constant 1 that multiplies the
        conv bias (see LayerDecode)
    A, D, dt_bias: (d, n), (d,), (d,) in the compute dtype, computed once (A = -exp(A_log))
    conv_w: (k, d, k) the conv taps rotated for each phase, so the conv is one multiply-and-sum
    conv_b: (d,) or None
    slots, taps: views of conv_buf (k of (b, d), one per slot) and of conv_w (k of (d, k), one per
        phase), made once, so a step writes its input and picks its taps with no indexing call
    decode: the fused step's buffers and weight views (LayerDecode), or None where the model takes
        the module-by-module step (MambaLM._fused_decoding)
    """

    __slots__ = ("ssm_state", "conv_store", "conv_buf", "A", "D", "dt_bias", "conv_w", "conv_b", "slots", "taps",
                 "decode")

    def __init__(self, ssm_state, conv_store, A, D, dt_bias, conv_w, conv_b):
        k = conv_w.shape[0]
        self.ssm_state, self.conv_store, self.A, self.D = ssm_state, conv_store, A, D
        self.conv_buf = conv_store.permute(1, 0, 2)[..., :k]         # (b, d, k)
        self.dt_bias, self.conv_w, self.conv_b = dt_bias, conv_w, conv_b
        self.slots, self.taps = self.conv_buf.unbind(-1), conv_w.unbind(0)
        self.decode = None


class LayerDecode:
    """One layer's fused decoding step (MambaLM._fused_step): every intermediate in a buffer made once
    per cache, every view of it and of the weights made once, so a token costs only the arithmetic
    ops, about half of what the module-by-module step dispatched (each op has a fixed cost of a few µs
    in a step, which is most of a small model's step).

    norm_w, eps: the RMSNorm gain (m,) and its epsilon as a (1, 1, 1) tensor (for baddbmm)
    w_in (m, 2d), w_x (d, r + 2n), w_dt (r, d), w_out (d, m): the projections' weights transposed
        (views, no copies: a step multiplies activations on the left); b_in, b_out: (2d,), (m,) or None
    xz (b, 2d): in_proj's output; x_t (d, b) its x half transposed, copied into the conv buffer's slot;
        z (b, d) the gate
    conv_slots: k views (d, b) of conv_store, one per slot; conv_taps: k views (d, k + 1, 1), one per
        phase: the taps for the slots followed by the conv bias (0 without one), so that one bmm of
        conv_store (d, b, k + 1) by conv_taps[phase] is the conv with its bias: (d, b, 1) into conv_out
    xc (b, d): conv_out as the conv's (then SiLU's, in place) output
    dbc (b, r + 2n): x_proj's output, with views dt_low (b, r), B (b, n), C (b, n)
    delta (b, d): dt_proj's output with its bias already added (so the step gets dt_bias=None)

    The weight views are taken when the cache is made, as A, D and dt_bias are computed then: a cache
    belongs to the weights it was made with (``load_state_dict`` copies into them in place, which the
    views see; a model moved or converted with ``.to`` after that needs a new cache).
    """

    __slots__ = ("norm_w", "eps", "w_in", "b_in", "w_x", "w_dt", "w_out", "b_out", "xz", "x_t", "z",
                 "conv_slots", "conv_taps", "conv_out", "xc", "dbc", "dt_low", "B", "C", "delta")

    def __init__(self, block, cache, b):
        mixer, norm = block.mixer, block.norm
        d, n, r, k = mixer.d_inner, mixer.d_state, mixer.dt_rank, mixer.d_conv
        w = mixer.in_proj.weight
        self.norm_w, self.eps = norm.weight, torch.full((1, 1, 1), norm.eps, dtype=w.dtype, device=w.device)
        self.w_in, self.b_in = w.t(), mixer.in_proj.bias
        self.w_x, self.w_dt = mixer.x_proj.weight.t(), mixer.dt_proj.weight.t()
        self.w_out, self.b_out = mixer.out_proj.weight.t(), mixer.out_proj.bias
        self.xz = w.new_empty(b, 2 * d)
        self.x_t, self.z = self.xz[:, :d].t(), self.xz[:, d:]
        store = cache.conv_store                                     # (d, b, k + 1)
        self.conv_slots = store[..., :k].unbind(-1)
        bias = torch.zeros(d) if cache.conv_b is None else cache.conv_b
        taps = torch.cat([cache.conv_w, bias.to(cache.conv_w).expand(k, d)[..., None]], -1)  # (k, d, k + 1)
        self.conv_taps = taps[..., None].contiguous().unbind(0)      # k of (d, k + 1, 1), one per phase
        self.conv_out = w.new_empty(d, b, 1)
        self.xc = self.conv_out[..., 0].t()                          # (b, d)
        self.dbc = w.new_empty(b, r + 2 * n)
        self.dt_low, self.B, self.C = self.dbc.split([r, n, n], dim=-1)
        self.delta = w.new_empty(b, d)

    # The parts of the fused step, in order (MambaLM._fused_step); each writes its buffer.

    def in_proj(self, normed):
        """normed (b, m) -> xz (b, 2d): x, z."""
        if self.b_in is None:
            torch.mm(normed, self.w_in, out=self.xz)
        else:
            torch.addmm(self.b_in, normed, self.w_in, out=self.xz)

    def conv(self, cache, phase):
        """x into the rolling buffer's slot ``phase``, then the causal depthwise conv with its bias as
        one bmm, (d, b, k + 1) @ (d, k + 1, 1), and SiLU in place: xc (b, d)."""
        self.conv_slots[phase].copy_(self.x_t)
        torch.bmm(cache.conv_store, self.conv_taps[phase], out=self.conv_out)
        F.silu(self.conv_out, inplace=True)

    def x_dt_proj(self, cache):
        """xc -> dbc (b, r + 2n) = (dt_low, B, C) by x_proj, then delta (b, d) = dt_bias + dt_proj(dt_low)."""
        torch.mm(self.xc, self.w_x, out=self.dbc)
        torch.addmm(cache.dt_bias, self.dt_low, self.w_dt, out=self.delta)

    def scan(self, cache, step_fn, impl):
        """The layer's selective_state_update (softplus on delta, whose bias is already in): through the
        front door (impls.selective_state_update) when step_fn is None, else step_fn directly. Returns y (b, d)."""
        if step_fn is None:
            return impls.selective_state_update(cache.ssm_state, self.xc, self.delta, cache.A, self.B, self.C,
                                                cache.D, self.z, dt_softplus=True, impl=impl)
        return step_fn(cache.ssm_state, self.xc, self.delta, cache.A, self.B, self.C, cache.D, self.z, None, True)

    def out_proj(self, y, residual):
        """residual (b, m) += out_proj(y), in place: the residual add rides on the product."""
        residual.addmm_(y, self.w_out)
        if self.b_out is not None:
            residual.add_(self.b_out)

    def tensors(self):
        """The buffers this layer's fused step allocated (not the weight views): for nbytes."""
        return (self.eps, self.xz, *self.conv_taps, self.conv_out, self.dbc, self.delta)  # the taps: k disjoint views


class ResidualStream:
    """The fused step's residual stream and RMSNorm buffers, with every view the norm needs made once.

    residual (b, m): h, updated in place; normed (b, m): the last RMSNorm's output; mean_sq (b, 1, 1)
    """

    __slots__ = ("residual", "normed", "mean_sq", "_row", "_col", "_scale")

    def __init__(self, b, m, like):
        self.residual, self.normed, self.mean_sq = like.new_empty(b, m), like.new_empty(b, m), like.new_empty(b, 1, 1)
        self._row, self._col = self.residual[:, None, :], self.residual[:, :, None]   # (b, 1, m), (b, m, 1)
        self._scale = self.mean_sq[:, 0]                                               # (b, 1)

    def normalize(self, weight, eps):
        """RMSNorm of the residual into ``normed``, in four ops where F.rms_norm dispatches about eight
        on a CPU: x * rsqrt(mean(x^2) + eps) * weight, the official formula, with mean(x^2) + eps as
        one baddbmm of x by itself (eps a (1, 1, 1) tensor). Returns normed (b, m)."""
        torch.baddbmm(eps, self._row, self._col, alpha=1.0 / self.residual.shape[1], out=self.mean_sq)
        self.mean_sq.rsqrt_()
        return torch.mul(self.residual, self._scale, out=self.normed).mul_(weight)

    def tensors(self):
        return (self.residual, self.normed, self.mean_sq)


class InferenceCache:
    """The decoding state of the whole model: one LayerCache per layer and the conv buffer phase.

    For the fused step (MambaLM._fused_step) also ``stream`` (ResidualStream) and ``final_eps``, the
    final norm's epsilon as a (1, 1, 1) tensor; otherwise None. ``checked``: the step
    implementations whose first call on this cache's buffers went through the front door."""

    def __init__(self, layers, k):
        self.layers = layers
        self.k = k
        self.phase = k - 1  # the slot of the next token; prefill leaves the last k-1 inputs in slots 0..k-2
        self.stream = self.final_eps = None
        self.checked = {}

    def nbytes(self):
        tensors = [t for c in self.layers for t in (c.ssm_state, c.conv_store, c.A, c.D, c.dt_bias, c.conv_w, c.conv_b)]
        tensors += [t for c in self.layers if c.decode is not None for t in c.decode.tensors()]
        if self.stream is not None:
            tensors += [*self.stream.tensors(), self.final_eps]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class MambaMixer(nn.Module):
    """The Mamba-1 block (official name: ``Mamba``, stored as ``mixer``), parameters as in the checkpoints:

    in_proj.weight (2d, m), conv1d.weight (d, 1, k), conv1d.bias (d,), x_proj.weight (r + 2n, d),
    dt_proj.weight (d, r), dt_proj.bias (d,), A_log (d, n), D (d,), out_proj.weight (m, d).
    """

    def __init__(self, config):
        super().__init__()
        c = config
        d, n, r, k = c.d_inner, c.d_state, c.dt_rank, c.d_conv
        self.d_inner, self.d_state, self.dt_rank, self.d_conv = d, n, r, k
        self.in_proj = nn.Linear(c.d_model, 2 * d, bias=c.bias)
        self.conv1d = nn.Conv1d(d, d, kernel_size=k, groups=d, padding=k - 1, bias=c.conv_bias)
        self.x_proj = nn.Linear(d, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, d, bias=True)
        self.A_log = nn.Parameter(torch.empty(d, n))
        self.D = nn.Parameter(torch.empty(d))
        self.out_proj = nn.Linear(d, c.d_model, bias=c.bias)
        self.reset_ssm_parameters(c)

    @torch.no_grad()
    def reset_ssm_parameters(self, c):
        """The official initialisation of the SSM parameters (mamba_simple.Mamba.__init__)."""
        std = self.dt_rank ** -0.5 * c.dt_scale
        if c.dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        elif c.dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        else:
            raise NotImplementedError(f"ssm_cfg.dt_init = {c.dt_init!r}: expected 'random' or 'constant'")
        # dt log-uniform in [dt_min, dt_max], stored through the inverse of softplus in dt_proj.bias
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min))
        dt = dt.clamp(min=c.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real: A = -(1..n) per channel, stored as A_log = log(1..n); D = 1
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand(self.d_inner, -1))
        self.D.fill_(1.0)

    def _ssm_params(self, f):
        """A = -exp(A_log), D and the dt bias in the compute dtype f."""
        return -torch.exp(self.A_log.to(f)), self.D.to(f), self.dt_proj.bias.to(f)

    def _project(self, x):
        """x (..., d) after the conv -> delta (..., d), B (..., n), C (..., n): x_proj, then dt_proj
        without its bias."""
        # F.linear, not self.x_proj(x): a decoding step calls this per layer per token, and the
        # module call's own overhead (hooks machinery) cost about as much as this small product
        dt, B, C = F.linear(x, self.x_proj.weight).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C  # the bias goes to the scan as delta_bias

    def forward(self, hidden, mask=None, impl=None, cache=None):
        """The block over a whole sequence.

        Args:
            hidden: (b, l, m)
            mask: (b, l) with 1 for a real token, 0 for left padding, or None
            impl: the registered implementation for impls.selective_scan (None: the interface default)
            cache: a LayerCache to fill with the state after the last token (prefill), or None
        Returns:
            (b, l, m)
        """
        l = hidden.shape[1]
        k, d, n, r = self.d_conv, self.d_inner, self.d_state, self.dt_rank
        # Everything the scan reads is made directly in its (b, d, l) layout, time innermost and
        # contiguous, by multiplying weight @ activations instead of activations @ weight^T: no
        # transposed views for the scan to copy or stride through (prefilling 1024 tokens into the
        # small peer model, d_model 256, 4 layers: median 253 ms against 271 ms, 10 rounds, one thread).
        xz = torch.matmul(self.in_proj.weight, hidden.transpose(1, 2))   # (b, 2d, l)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias[:, None]
        x, z = xz[:, :d], xz[:, d:]                                  # (b, d, l) each
        if mask is not None:
            x = x * mask[:, None, :]                                 # padding enters the conv as zeros
        conv_in = x
        x = F.silu(self.conv1d(x)[..., :l])                          # causal: the first l outputs of the padded conv
        if mask is not None:
            x = x * mask[:, None, :]                                 # and the scan as zeros: the state stays 0
        dbc = torch.matmul(self.x_proj.weight, x)                    # (b, r + 2n, l)
        delta = torch.matmul(self.dt_proj.weight, dbc[:, :r])        # (b, d, l); its bias goes to the scan
        B, C = dbc[:, r:r + n], dbc[:, r + n:]                       # (b, n, l) each
        A, D, dt_bias = self._ssm_params(compute_dtype(x.dtype))
        kw = {} if impl is None else {"impl": impl}
        out = impls.selective_scan(x, delta, A, B, C, D, z, delta_bias=dt_bias, delta_softplus=True,
                                   return_last_state=cache is not None, **kw)
        if cache is not None:
            y, last_state = out
            cache.ssm_state.copy_(last_state)
            tail = conv_in[..., max(l - (k - 1), 0):]                # the last k-1 conv inputs, fewer if l < k-1
            cache.conv_buf.zero_()
            cache.conv_buf[..., k - 1 - tail.shape[-1]:k - 1] = tail
        else:
            y = out
        return self.out_proj(y.transpose(1, 2))

    def new_cache(self, b, dtype, device):
        """An empty LayerCache for b rows in the model dtype (states in the compute dtype)."""
        k, d = self.d_conv, self.d_inner
        f = compute_dtype(dtype)
        A, D, dt_bias = self._ssm_params(f)
        w = self.conv1d.weight[:, 0, :].to(dtype)                    # (d, k): w[:, j] multiplies x_{t-k+1+j}
        # at phase p (the slot the current token is written to), slot s holds x_{t-k+1+j}, j = (s-p-1) mod k
        idx = torch.tensor([[(s - p - 1) % k for s in range(k)] for p in range(k)], device=device)
        conv_w = w[:, idx].permute(1, 0, 2).contiguous()             # (k phases, d, k slots)
        conv_b = None if self.conv1d.bias is None else self.conv1d.bias.to(dtype)
        conv_store = torch.zeros(d, b, k + 1, dtype=dtype, device=device)
        conv_store[..., k] = 1                                       # multiplies the bias in the fused step's conv
        return LayerCache(torch.zeros(b, d, self.d_state, dtype=f, device=device), conv_store, A, D, dt_bias,
                          conv_w, conv_b)

    def step(self, hidden, cache, phase, impl=None, residual=None):
        """The block for one new token, from the cache, which it advances in place.

        Args:
            hidden: (b, m); cache: this layer's LayerCache; phase: the conv buffer slot for this token
            impl: the registered implementation for impls.selective_state_update (None: its default)
            residual: (b, m) or None; if given, the result is residual + the block's output, added
                by the output projection's own matrix multiply (one op fewer per layer)
        Returns:
            (b, m)
        """
        x, z = self.step_in_proj(hidden)
        x = self.step_conv(x, cache, phase)
        delta, B, C = self._project(x)                               # (b, d), (b, n), (b, n)
        y = self.step_scan(cache, x, delta, B, C, z, impl)
        return self.step_out_proj(y, residual)

    # The parts of ``step``, in order; benchmarks/decode_split.py times each of them inside a step.
    # (The module-by-module step: MambaLM.step takes it for LayerNorm and float16/bfloat16 models;
    # float32/float64 RMSNorm models take the fused step, whose parts are LayerDecode's methods.)

    def step_in_proj(self, hidden):
        """(b, m) -> x, z: (b, d) each (views of one (b, 2d) product)."""
        return F.linear(hidden, self.in_proj.weight, self.in_proj.bias).chunk(2, dim=-1)

    @staticmethod
    def step_conv(x, cache, phase):
        """The causal depthwise conv at this position, then SiLU: x (b, d) is written into the rolling
        buffer's slot ``phase`` (no concatenation, no allocation), and the conv is one multiply by the
        taps rotated for that phase and one sum over the k slots (no padded conv1d call). Returns (b, d)."""
        cache.slots[phase].copy_(x)
        x = torch.mul(cache.conv_buf, cache.taps[phase]).sum(-1)
        if cache.conv_b is not None:
            x.add_(cache.conv_b)
        return F.silu(x, inplace=True)

    @staticmethod
    def step_scan(cache, x, delta, B, C, z, impl=None):
        """One impls.selective_state_update on the layer's state (A, D and the dt bias from the cache,
        computed once per cache, not per token). Returns y (b, d), gated by silu(z)."""
        kw = {} if impl is None else {"impl": impl}
        return impls.selective_state_update(cache.ssm_state, x, delta, cache.A, B, C, cache.D, z.contiguous(),
                                            dt_bias=cache.dt_bias, dt_softplus=True, **kw)

    def step_out_proj(self, y, residual=None):
        """out_proj(y) (b, m); with residual (b, m) of the same dtype and no bias, residual + out_proj(y)
        as one addmm."""
        w, bias = self.out_proj.weight, self.out_proj.bias
        if residual is None:
            return F.linear(y, w, bias)
        if bias is None and residual.dtype == y.dtype:
            return torch.addmm(residual, y, w.t())
        return residual + F.linear(y, w, bias)


class Block(nn.Module):
    """Pre-norm residual: h + mixer(norm(h)). Official names: ``norm``, ``mixer``."""

    def __init__(self, config):
        super().__init__()
        self.norm = (RMSNorm(config.d_model, config.norm_epsilon) if config.rms_norm
                     else nn.LayerNorm(config.d_model, eps=config.norm_epsilon))
        self.mixer = MambaMixer(config)


class Backbone(nn.Module):
    """Official ``MixerModel``: embedding, layers, norm_f."""

    def __init__(self, config):
        super().__init__()
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = (RMSNorm(config.d_model, config.norm_epsilon) if config.rms_norm
                       else nn.LayerNorm(config.d_model, eps=config.norm_epsilon))


def _check_mask(attention_mask, input_ids):
    """attention_mask: (b, l) of 0/1 with every row 0...0 1...1 (left padding, at least one real token)."""
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)} (that of input_ids), "
                         f"got {tuple(attention_mask.shape)}")
    m = attention_mask.to(torch.long)
    if not ((m == 0) | (m == 1)).all():
        raise ValueError("attention_mask: expected only 0 (padding) and 1 (real token)")
    if m.shape[1] and not (m[:, 1:] >= m[:, :-1]).all():
        raise ValueError("attention_mask: only left padding is supported (every row 0...0 1...1); "
                         "pad prompts of different lengths on the left")
    if m.shape[1] and not m[:, -1].all():
        raise ValueError("attention_mask: every row needs at least one real token")
    return None if m.all() else m


def _transposed_storage(weight):
    """The same (out, in) parameter, its values unchanged, stored transposed in memory (strides (1, out)).

    Used for the matrices with more outputs than inputs: in_proj (2d, m), dt_proj (d, r) and the
    embedding / LM head (v, m). Decoding multiplies every weight matrix by one vector per token,
    which is what a step spends most of its time on at mamba-130m's size (its 516 MB of weights are
    read once per token). With torch 2.13's MKL on this project's CPU (AMD EPYC, AVX2, one thread)
    that product runs much faster on this storage when out > in, measured over 24 distinct matrices
    (read from memory, as in a real step): in_proj 12 ms against 20 ms, the (50280, 768) LM head
    7.6 ms against 14 ms. With out < in (x_proj, out_proj) the usual storage was as fast or faster,
    so they keep it. Names, shapes, values and state_dict() are the official ones; ``.to(dtype)``,
    ``load_state_dict`` and ``from_pretrained`` keep the storage (their copies preserve strides), and
    ``save_pretrained`` writes contiguous tensors to safetensors. Products over a whole sequence
    (prefill, re-forwarding) are matrix-matrix and barely notice the storage.
    """
    return nn.Parameter(weight.detach().t().contiguous().t(), requires_grad=weight.requires_grad)


class MambaLM(nn.Module):
    """The Mamba language model (official ``MambaLMHeadModel``): backbone + tied LM head.

    ``MambaLM(MambaConfig(d_model=64, n_layer=2, vocab_size=256))`` builds a tiny random model with
    the official initialisation. ``state_dict()`` keys are the official checkpoint's.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self._init_weights()
        for module in self.modules():  # after initialising, so a seed gives the same values as ever
            if (isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.shape[0] > module.weight.shape[1]
                    and not (config.tie_embeddings and module is self.lm_head)):
                module.weight = _transposed_storage(module.weight)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    @torch.no_grad()
    def _init_weights(self, initializer_range=0.02):
        """mixer_seq_simple._init_weights: embedding N(0, 0.02); Linear biases zero except dt_proj's;
        out_proj rescaled by 1/sqrt(n_layer) (one residual per layer)."""
        nn.init.normal_(self.backbone.embedding.weight, std=initializer_range)
        for block in self.backbone.layers:
            mixer = block.mixer
            for lin in (mixer.in_proj, mixer.x_proj, mixer.out_proj):
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            nn.init.kaiming_uniform_(mixer.out_proj.weight, a=math.sqrt(5))
            mixer.out_proj.weight /= math.sqrt(self.config.n_layer)

    @property
    def dtype(self):
        return self.backbone.embedding.weight.dtype

    # ------------------------------------------------------------------ full sequence

    def forward(self, input_ids, impl=None, attention_mask=None, num_last_tokens=0):
        """Logits for every position (each from the tokens up to it).

        Args:
            input_ids: (b, l) integer token ids
            impl: the registered implementation for impls.selective_scan (None: the interface default)
            attention_mask: (b, l) 1 for real tokens, 0 for left padding; None when all are real
            num_last_tokens: if > 0, the LM head runs on the last that many positions only (official name)
        Returns:
            logits (b, l, v), or (b, num_last_tokens, v)
        """
        return self._forward(input_ids, impl, _check_mask(attention_mask, input_ids), num_last_tokens)

    def _forward(self, input_ids, impl, mask, num_last_tokens=0, cache=None):
        h = self.backbone.embedding(input_ids)                       # (b, l, m)
        m = None if mask is None else mask.to(h.dtype)
        residual = h.float() if self._residual_fp32() else h
        for i, block in enumerate(self.backbone.layers):
            out = block.mixer(block.norm(residual.to(h.dtype)), m, impl, None if cache is None else cache.layers[i])
            residual = residual + out
        h = self.backbone.norm_f(residual.to(h.dtype))
        if num_last_tokens > 0:
            h = h[:, -num_last_tokens:]
        return self.lm_head(h)

    def _residual_fp32(self):
        return self.config.residual_in_fp32 and self.dtype in (torch.float16, torch.bfloat16)

    # ------------------------------------------------------------------ recurrent decoding

    def new_cache(self, batch_size):
        """An empty InferenceCache: per layer the SSM state (b, d, n) and conv buffer (b, d, k), and,
        where the model takes the fused step, its buffers (LayerDecode)."""
        device = self.backbone.embedding.weight.device
        cache = InferenceCache([blk.mixer.new_cache(batch_size, self.dtype, device) for blk in self.backbone.layers],
                               self.config.d_conv)
        if self._fused_decoding():
            m = self.config.d_model
            for block, layer_cache in zip(self.backbone.layers, cache.layers):
                layer_cache.decode = LayerDecode(block, layer_cache, batch_size)
            w = self.backbone.embedding.weight
            cache.stream = ResidualStream(batch_size, m, w)
            cache.final_eps = torch.full((1, 1, 1), self.backbone.norm_f.eps, dtype=w.dtype, device=device)
        return cache

    @torch.no_grad()
    def prefill(self, input_ids, impl=None, attention_mask=None):
        """One scan over the prompt, keeping the state.

        Args:
            input_ids: (b, l) with l >= 1; impl: scan implementation (None: interface default)
            attention_mask: (b, l) for left-padded prompts, or None
        Returns:
            (logits of the last position (b, v), InferenceCache ready for ``step``)
        """
        if input_ids.shape[1] < 1:
            raise ValueError("prefill: input_ids: expected at least one token per row (shape (b, l >= 1))")
        mask = _check_mask(attention_mask, input_ids)
        cache = self.new_cache(input_ids.shape[0])
        logits = self._forward(input_ids, impl, mask, num_last_tokens=1, cache=cache)
        return logits[:, -1], cache

    @torch.no_grad()
    def step(self, token, cache, impl=None):
        """One new token: advance every layer's state in place.

        Args:
            token: (b,) integer ids; cache: the InferenceCache from ``prefill`` (or ``new_cache``)
            impl: the implementation for impls.selective_state_update (None: its default, "recurrent")
        Returns:
            logits (b, v) for the next position
        """
        if cache.stream is not None:
            return self._fused_step(token, cache, STEP_DEFAULT if impl is None else impl)
        h = self.backbone.embedding(token)                           # (b, m)
        residual = h.float() if self._residual_fp32() else h
        for block, layer_cache in zip(self.backbone.layers, cache.layers):
            residual = block.mixer.step(block.norm(residual.to(h.dtype)), layer_cache, cache.phase, impl, residual)
        cache.phase = (cache.phase + 1) % cache.k
        return self.lm_head(self.backbone.norm_f(residual.to(h.dtype)))

    def _fused_decoding(self):
        """Whether ``step`` takes the fused path: RMSNorm, and a float32 or float64 model (the compute
        dtype is the model's, and the residual stream needs no float32 copy). Other models (LayerNorm,
        float16/bfloat16) take the module-by-module path, MambaMixer.step, which is the same arithmetic."""
        return self.config.rms_norm and self.dtype in (torch.float32, torch.float64)

    def _fused_step(self, token, cache, impl):
        """``step`` for RMSNorm float32/float64 models, the same arithmetic as MambaMixer.step in fewer
        torch calls, every intermediate written into the cache's buffers (LayerDecode).

        Per layer, against the module-by-module step: the RMSNorm is baddbmm (eps + mean of squares),
        rsqrt_, two multiplies (F.rms_norm on a CPU dispatches about eight ops); the conv and its bias
        are one bmm (not multiply, sum, add); dt_proj adds its bias in its addmm; no F.linear, chunk
        or split (views made once); the scan step is called directly after its first call.
        """
        stream, phase = cache.stream, cache.phase
        b = stream.residual.shape[0]
        if token.dim() != 1 or token.shape[0] != b:  # index_select would resize the buffer, not fail
            raise ValueError(f"step: token: expected shape (b={b},) (the cache's batch), got {tuple(token.shape)}")
        # The scan step's arguments are the same buffers at every token, so the front door's checks,
        # which read only their types, shapes, dtypes and devices, cannot change their verdict after
        # the first call: that call goes through impls.selective_state_update, later ones straight to
        # the implementation (a wrong output shape or dtype would still make out_proj's addmm_ raise).
        step_fn = cache.checked.get(impl)
        residual = stream.residual
        torch.index_select(self.backbone.embedding.weight, 0, token, out=residual)   # (b, m)
        for c in cache.layers:
            dc = c.decode
            dc.in_proj(stream.normalize(dc.norm_w, dc.eps))
            dc.conv(c, phase)
            dc.x_dt_proj(c)
            dc.out_proj(dc.scan(c, step_fn, impl), residual)
        if step_fn is None:
            cache.checked[impl] = impls.get(impl).step
        cache.phase = (phase + 1) % cache.k
        normed = stream.normalize(self.backbone.norm_f.weight, cache.final_eps)
        return torch.mm(normed, self.lm_head.weight.t())   # a new tensor: callers keep the logits

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, mode="recurrent", impl=None, step_impl=None,
                 attention_mask=None, return_logits=False):
        """Greedy decoding (argmax over the first vocab_size logits; padded vocabulary ids are never chosen).

        Args:
            input_ids: (b, l) prompt ids, l >= 1 (left-padded with ``attention_mask`` if lengths differ)
            max_new_tokens: how many tokens to add (T)
            mode: "reforward" re-runs ``forward`` over the whole sequence so far for each token;
                  "recurrent" runs ``prefill`` (one scan) then one ``step`` per token
            impl: the scan implementation (None: the interface default); in "recurrent" mode also the
                  step implementation unless step_impl is given
            step_impl: the step implementation for "recurrent" (None: impl, or "recurrent" when impl is None);
                  an implementation without a step raises NotImplementedError naming those with one
            attention_mask: (b, l), 1 real / 0 left padding; None when every prompt fills its row
            return_logits: also return the logits each new token was chosen from
        Returns:
            tokens (b, l + T) int64; with return_logits, (tokens, logits (b, T, v))
        """
        if mode not in ("recurrent", "reforward"):
            raise ValueError(f"generate: mode: expected 'recurrent' or 'reforward', got {mode!r}")
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"generate: input_ids: expected shape (b, l >= 1), got {tuple(input_ids.shape)}")
        b, l = input_ids.shape
        T = int(max_new_tokens)
        mask = _check_mask(attention_mask, input_ids)
        tokens = torch.empty(b, l + T, dtype=torch.long, device=input_ids.device)
        tokens[:, :l] = input_ids
        V = self.config.vocab_size
        kept = [] if return_logits else None

        if mode == "reforward":
            full_mask = None
            if mask is not None:
                full_mask = torch.ones(b, l + T, dtype=mask.dtype, device=mask.device)
                full_mask[:, :l] = mask
            for t in range(l, l + T):
                logits = self._forward(tokens[:, :t], impl, None if full_mask is None else full_mask[:, :t],
                                       num_last_tokens=1)[:, -1]
                tokens[:, t] = logits[:, :V].argmax(-1)
                if kept is not None:
                    kept.append(logits)
        else:
            step_impl = impl if step_impl is None else step_impl
            logits, cache = self.prefill(input_ids, impl, mask)
            for t in range(l, l + T):
                tokens[:, t] = logits[:, :V].argmax(-1)
                if kept is not None:
                    kept.append(logits)
                if t + 1 < l + T:
                    logits = self.step(tokens[:, t], cache, step_impl)
        if return_logits:
            v = self.config.padded_vocab_size
            return tokens, (torch.stack(kept, 1) if kept else torch.empty(b, 0, v, dtype=self.dtype))
        return tokens

    # ------------------------------------------------------------------ checkpoints

    def save_pretrained(self, folder, safe_serialization=False):
        """Write ``config.json`` and ``pytorch_model.bin`` (torch.save of the state dict, lm_head.weight
        included, as the official save_pretrained does) or, with safe_serialization, ``model.safetensors``
        (the tied lm_head.weight left out: safetensors stores no shared tensors)."""
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, CONFIG_NAME), "w") as f:
            json.dump(self.config.to_dict(), f, indent=2)
        state = self.state_dict()
        if safe_serialization:
            from safetensors.torch import save_file

            if self.config.tie_embeddings:
                state.pop("lm_head.weight")
            save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, WEIGHTS_SAFETENSORS),
                      metadata={"format": "pt"})
        else:
            torch.save(state, os.path.join(folder, WEIGHTS_BIN))

    @classmethod
    def from_pretrained(cls, folder, dtype=None):
        """Load a local checkpoint folder in the official layout: config.json plus model.safetensors
        (preferred when both exist) or pytorch_model.bin. Nothing is downloaded.

        Args:
            folder: path of the folder; dtype: convert the parameters to this dtype (None: float32)
        Raises:
            FileNotFoundError if the folder lacks config.json or both weight files; KeyError on
            missing or unexpected parameter names; ValueError on a shape mismatch.
        """
        cfg_path = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"from_pretrained: no {CONFIG_NAME} in {folder!r}")
        with open(cfg_path) as f:
            config = MambaConfig(**json.load(f))
        st_path, bin_path = os.path.join(folder, WEIGHTS_SAFETENSORS), os.path.join(folder, WEIGHTS_BIN)
        if os.path.isfile(st_path):
            from safetensors.torch import load_file

            state = load_file(st_path)
        elif os.path.isfile(bin_path):
            state = torch.load(bin_path, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"from_pretrained: neither {WEIGHTS_SAFETENSORS} nor {WEIGHTS_BIN} in {folder!r}")
        model = cls(config)
        model.load_official_state_dict(state)
        return model if dtype is None else model.to(dtype)

    @torch.no_grad()
    def load_official_state_dict(self, state):
        """Copy a checkpoint's tensors in (converting dtype); with tied embeddings lm_head.weight may be
        absent (safetensors) or present (torch.save), and then must equal the embedding."""
        expected = self.state_dict()
        tied = self.config.tie_embeddings
        missing = [k for k in expected if k not in state and not (tied and k == "lm_head.weight")]
        unexpected = [k for k in state if k not in expected]
        if missing or unexpected:
            raise KeyError(f"load_official_state_dict: missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                           f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
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
