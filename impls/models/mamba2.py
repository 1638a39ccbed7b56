"""A small, real Mamba-2 language model whose SSD scan runs through any registered implementation.

The Mamba-2 block of the paper (Dao & Gu 2024, "Transformers are SSMs", Section 7 and Figure 6) and
of the official code (https://github.com/state-spaces/mamba: mamba_ssm/modules/mamba2.py for the
block, mamba_ssm/models/mixer_seq_simple.py for the stack, mamba_ssm/models/config_mamba.py for the
config, mamba_ssm/ops/triton/layernorm_gated.py for the gated norm):

    in_proj -> z, xBC, dt                     (one projection: the "parallel" block of the paper)
    xBC -> causal depthwise conv1d (d_conv taps) -> SiLU -> x, B, C
    y = ssd_scan(x, dt, A = -exp(A_log), B, C, chunk_size, D, dt_bias, dt_softplus, dt_limit)
    y = norm(y, z)   the gated RMSNorm: RMSNorm(y * silu(z)) per group of d/g channels
                     (RMSNorm(y) * silu(z) with norm_before_gate; y * silu(z) inside the scan
                     when rmsnorm is off)
    out_proj(y)

stacked as a pre-norm residual stream (h = h + mixer(RMSNorm(h)) per layer, then norm_f), with the
embedding tied to the LM head by default. Parameter names and shapes are those of the official
checkpoints (state-spaces/mamba2-130m ...), and transformers' Mamba2ForCausalLM layout is read and
written too (LAYOUT below: the one table of field and weight names). Nothing is fetched from a hub.

Letters as in the SSD interface (impls.ssd_scan): b batch, l sequence length, h heads (``nheads``),
p head dimension (``headdim``), n state size (``d_state``), g groups of B/C (``ngroups``); also
m = d_model, d = d_inner = expand * m = h * p, k = d_conv, c = d + 2 g n (the conv's channels,
``conv_dim``), v = the vocabulary padded to a multiple of ``pad_vocab_size_multiple``.

Forward, the two ways to generate, sampling and left padding are the shared machinery of
impls/models/lm.py; "recurrent" here is ``prefill``, one ``impls.ssd_scan`` over the prompt with
return_final_states (the SSM state) plus the conv state, the last k-1 columns of xBC before the conv,
then one ``step`` per token through ``impls.ssd_state_update``.

Left padding: pass ``attention_mask`` (b, l), 1 for a real token, 0 for padding, every row 0...0 1...1.
xBC is zeroed at padded positions before the conv and x, B, C after it, so the SSM state is exactly
zero when a row's first real token arrives and its conv window sees zeros: as if unpadded.

D of shape (h, p) (``D_has_hdim``): the official checkpoint stores it flat, (h * p,); the official
``Mamba2.step`` repeats it as if it were (h,), which is wrong (a decode bug of state-spaces/mamba's,
read in its source); here prefill, forward and step all pass D as (h, p).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import impls
from ..frontdoor import compute_dtype
from . import checkpoints
from .checkpoints import config_layout, layout_markers, read_config_json
from .lm import LanguageModel, conv_buffer, dt_bias_init, keep_prefill_state, rotated_conv_taps

NORM_GATED_EPS = 1e-5  # the official Mamba2 builds its gated norm with eps=1e-5, whatever norm_epsilon is

# ssm_cfg keys of the official Mamba-2 mixer (mamba2.Mamba2.__init__) and their defaults.
SSM_DEFAULTS = dict(d_state=128, d_conv=4, conv_init=None, expand=2, headdim=64, d_ssm=None, ngroups=1,
                    A_init_range=(1, 16), D_has_hdim=False, rmsnorm=True, norm_before_gate=False, dt_min=0.001,
                    dt_max=0.1, dt_init_floor=1e-4, dt_limit=(0.0, float("inf")), bias=False, conv_bias=True,
                    chunk_size=256, use_mem_eff_path=True)

# The two checkpoint layouts, in one table. Config: official name (top level, or in ssm_cfg) ->
# transformers' Mamba2Config name; weights: the one name that differs. transformers has no field for
# these official options, and its model behaves as their values here (so other values cannot be
# written in its layout): rmsnorm True, norm_before_gate False, D_has_hdim False (its D is (h,)),
# d_ssm None, d_intermediate 0, no attention layers, a gated-norm eps equal to layer_norm_epsilon.
LAYOUT = dict(
    top={"d_model": "hidden_size", "n_layer": "num_hidden_layers", "vocab_size": "vocab_size",
         "norm_epsilon": "layer_norm_epsilon", "residual_in_fp32": "residual_in_fp32",
         "tie_embeddings": "tie_word_embeddings"},
    ssm={"d_state": "state_size", "d_conv": "conv_kernel", "expand": "expand", "headdim": "head_dim",
         "ngroups": "n_groups", "chunk_size": "chunk_size", "dt_min": "time_step_min", "dt_max": "time_step_max",
         "dt_init_floor": "time_step_floor", "dt_limit": "time_step_limit", "bias": "use_bias",
         "conv_bias": "use_conv_bias"},
    derived={"num_heads": "d_inner // headdim"},
    fixed_in_transformers=dict(rmsnorm=True, norm_before_gate=False, D_has_hdim=False, d_ssm=None),
    weights={"backbone.embedding.weight": "backbone.embeddings.weight"},
)
# Size fields a checkpoint's config must state (defaults never stand in for them), per layout.
REQUIRED = dict(official=checkpoints.OFFICIAL_SIZES,
                transformers=("hidden_size", "num_hidden_layers", "vocab_size", "num_heads", "head_dim",
                              "state_size", "n_groups", "expand", "conv_kernel"))


class Mamba2Config:
    """The fields of an official Mamba-2 ``config.json`` (mamba_ssm.models.config_mamba.MambaConfig with
    ``ssm_cfg = {"layer": "Mamba2", ...}``), official defaults. Checked on construction: nothing is
    built from an invalid config.

    Resolved attributes: every ssm_cfg key (d_state, headdim, ngroups, chunk_size, dt_limit, ...),
    d_inner (d), nheads (h), conv_dim (c), padded_vocab_size (v).

    Raises:
        ValueError: a size that is not an int (bool, float or string: the field named), a size below 1,
            d_inner not a multiple of headdim, nheads not a multiple of ngroups, a dt_limit that is not
            a pair lo <= hi, an A_init_range not 0 < lo <= hi, an unknown ssm_cfg key;
        NotImplementedError: another layer (named, with its loader), attention layers, MLP layers
            (d_intermediate), d_ssm.
    """

    FIELDS = checkpoints.OFFICIAL_FIELDS
    to_dict, __eq__, __repr__ = checkpoints.official_dict, checkpoints.same_config, checkpoints.config_repr

    def __init__(self, **fields):
        """fields: the official config.json's (checkpoints.OFFICIAL_DEFAULTS), ssm_cfg with SSM_DEFAULTS' keys."""
        s = checkpoints.set_official_fields(self, "Mamba2", SSM_DEFAULTS,
                                            ("d_state", "d_conv", "headdim", "ngroups", "chunk_size"), fields)
        where = "Mamba2Config"
        if s["d_ssm"] is not None and s["d_ssm"] != s["expand"] * self.d_model:
            raise NotImplementedError(f"{where}: ssm_cfg.d_ssm = {s['d_ssm']}: a gated-MLP part beside the SSM is "
                                      f"not implemented")
        self.d_state, self.d_conv, self.headdim, self.ngroups, self.chunk_size = (
            s[k] for k in ("d_state", "d_conv", "headdim", "ngroups", "chunk_size"))
        self.d_ssm, self.conv_init = s["d_ssm"], s["conv_init"]
        self.A_init_range = tuple(float(a) for a in s["A_init_range"])
        self.D_has_hdim, self.rmsnorm = bool(s["D_has_hdim"]), bool(s["rmsnorm"])
        self.norm_before_gate = bool(s["norm_before_gate"])
        self.dt_min, self.dt_max, self.dt_init_floor = float(s["dt_min"]), float(s["dt_max"]), float(s["dt_init_floor"])
        self.dt_limit = tuple(float(a) for a in s["dt_limit"])
        self.bias, self.conv_bias, self.use_mem_eff_path = bool(s["bias"]), bool(s["conv_bias"]), s["use_mem_eff_path"]
        if len(self.dt_limit) != 2 or not self.dt_limit[0] <= self.dt_limit[1]:
            raise ValueError(f"{where}: dt_limit must be a pair (lo, hi) with lo <= hi, got {s['dt_limit']}")
        if len(self.A_init_range) != 2 or not 0 < self.A_init_range[0] <= self.A_init_range[1]:
            raise ValueError(f"{where}: A_init_range must be a pair 0 < lo <= hi, got {s['A_init_range']}")
        self.conv_dim = self.d_inner + 2 * self.ngroups * self.d_state

    def to_transformers_dict(self):
        """The same model as transformers' Mamba2Config fields (LAYOUT), for save_pretrained(layout="transformers").
        vocab_size is the padded v (transformers' embedding has vocab_size rows).

        Raises:
            ValueError: an official option transformers' model cannot represent (LAYOUT's fixed_in_transformers,
                a norm_epsilon other than the gated norm's 1e-5, LayerNorm blocks).
        """
        fixed = {k: v for k, v in LAYOUT["fixed_in_transformers"].items() if getattr(self, k) != v}
        if not self.rms_norm:
            fixed["rms_norm"] = True
        if self.norm_epsilon != NORM_GATED_EPS:
            fixed["norm_epsilon"] = NORM_GATED_EPS
        if fixed:
            raise ValueError(f"to_transformers_dict: transformers' Mamba2 has no field for these official options and "
                             f"needs the values {fixed}; this config has "
                             f"{ {k: getattr(self, k) for k in fixed} }")
        out = dict(model_type="mamba2", architectures=["Mamba2ForCausalLM"], hidden_act="silu",
                   num_heads=self.nheads, time_step_rank=math.ceil(self.d_model / 16))
        out.update({t: getattr(self, o) for o, t in {**LAYOUT["top"], **LAYOUT["ssm"]}.items()})
        out["vocab_size"] = self.padded_vocab_size
        out["time_step_limit"] = list(self.dt_limit)   # json writes inf as Infinity, which transformers reads
        return out

    @classmethod
    def from_transformers_dict(cls, cfg):
        """The official config of a transformers Mamba2Config dict (LAYOUT), checked; v = vocab_size (no padding).

        Raises:
            ValueError: missing size fields (REQUIRED), num_heads != hidden_size * expand / head_dim,
                a hidden_act other than silu, a layer_norm_epsilon other than 1e-5 (the official gated norm's).
        """
        missing = [k for k in REQUIRED["transformers"] if k not in cfg]
        if missing:
            raise ValueError(f"Mamba2 config (transformers layout): missing size fields {missing}")
        if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"Mamba2 config (transformers layout): hidden_act = {cfg['hidden_act']!r}: expected 'silu'")
        eps = float(cfg.get("layer_norm_epsilon", NORM_GATED_EPS))
        if eps != NORM_GATED_EPS:
            raise ValueError(f"Mamba2 config (transformers layout): layer_norm_epsilon = {eps}: transformers uses it in "
                             f"the gated norm too, where the official block has {NORM_GATED_EPS}")
        # transformers' own default where a field is absent; the only one that differs from the
        # official default is tie_word_embeddings (False there, tie_embeddings True here)
        top = {o: cfg.get(t, False) if t == "tie_word_embeddings" else cfg[t]
               for o, t in LAYOUT["top"].items() if t in cfg or t == "tie_word_embeddings"}
        ssm = {o: cfg[t] for o, t in LAYOUT["ssm"].items() if t in cfg}
        if "dt_limit" in ssm:   # transformers' encoding of non-finite floats: {"__float__": "Infinity"}
            ssm["dt_limit"] = [float(a["__float__"]) if isinstance(a, dict) else a for a in ssm["dt_limit"]]
        config = cls(**top, ssm_cfg=ssm, pad_vocab_size_multiple=1)
        if config.nheads != int(cfg["num_heads"]):
            raise ValueError(f"Mamba2 config (transformers layout): num_heads = {cfg['num_heads']} but hidden_size * "
                             f"expand / head_dim = {config.nheads}")
        return config



def parameter_shapes(config, layout="official"):
    """Parameter name -> shape of a checkpoint of this config in ``layout`` ("official" or "transformers"),
    computed from the config alone (nothing is built). lm_head.weight is included (a tied or
    safetensors checkpoint may omit it)."""
    c = config
    m, d, h, k, cdim = c.d_model, c.d_inner, c.nheads, c.d_conv, c.conv_dim
    d_in_proj = 2 * d + 2 * c.ngroups * c.d_state + h
    mixer = {"in_proj.weight": (d_in_proj, m), "conv1d.weight": (cdim, 1, k), "dt_bias": (h,), "A_log": (h,),
             "D": (d,) if c.D_has_hdim else (h,), "out_proj.weight": (m, d)}
    if c.bias:
        mixer.update({"in_proj.bias": (d_in_proj,), "out_proj.bias": (m,)})
    if c.conv_bias:
        mixer["conv1d.bias"] = (cdim,)
    if c.rmsnorm:
        mixer["norm.weight"] = (d,)
    emb = "backbone.embedding.weight"
    return checkpoints.stack_shapes(c, mixer, LAYOUT["weights"][emb] if layout == "transformers" else emb)


class GatedRMSNorm(nn.Module):
    """The official RMSNormGated (layernorm_gated.rms_norm_ref, upcast to float32 for half inputs):

        norm_before_gate=False:  RMSNorm(y * silu(z)) * weight
        norm_before_gate=True:   RMSNorm(y) * weight * silu(z)

    with the mean of squares taken over each group of d / ngroups consecutive channels.
    Args of forward: y, z (..., d). Returns (..., d) in y's dtype.
    """

    def __init__(self, d, ngroups, norm_before_gate, eps=NORM_GATED_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.group, self.norm_before_gate, self.eps = d // ngroups, norm_before_gate, eps

    def forward(self, y, z):
        f = compute_dtype(y.dtype)
        x = y.to(f)
        if not self.norm_before_gate:
            x = x * F.silu(z.to(f))
        if self.group == x.shape[-1]:
            out = F.rms_norm(x, (self.group,), self.weight.to(f), self.eps)
        else:
            out = F.rms_norm(x.unflatten(-1, (-1, self.group)), (self.group,), None, self.eps).flatten(-2)
            out = out * self.weight.to(f)
        if self.norm_before_gate:
            out = out * F.silu(z.to(f))
        return out.to(y.dtype)


class LayerCache:
    """What one layer keeps between decoding steps (constant size, whatever the position).

    ssm_state: (b, h, p, n) in the compute dtype, advanced in place by impls.ssd_state_update
    conv_store: (c, b, k + 1): slots 0..k-1 a rolling buffer of the last k conv inputs (xBC), slot
        ``phase`` written next; slot k a constant 1 that multiplies the conv bias, so that the conv
        with its bias is one bmm by conv_taps[phase] (c, k + 1, 1), the taps rotated for that phase
    A, dt_bias: (h,), D: (h,) or (h, p), in the compute dtype, computed once per cache
    zxbcdt: (b, 2d + 2gn + h) the in_proj output buffer; z (b, d), xBC (b, c), dt (b, h) its views
    conv_out: (c, b, 1) the conv's output buffer; x (b, h, p), B, C (b, g, n) its views
    """

    __slots__ = ("ssm_state", "conv_store", "conv_slots", "conv_taps", "A", "D", "dt_bias", "zxbcdt", "z", "xBC_t",
                 "dt", "conv_out", "x", "B", "C", "norm_eps", "norm_sq")

    def __init__(self, mixer, b, dtype, device):
        c, k, d, h, p, g, n = mixer.conv_dim, mixer.d_conv, mixer.d_inner, mixer.nheads, mixer.headdim, mixer.ngroups, mixer.d_state
        f = compute_dtype(dtype)
        self.ssm_state = torch.zeros(b, h, p, n, dtype=f, device=device)
        self.A, self.D, self.dt_bias = mixer.ssm_params(f)
        self.conv_store = conv_buffer(c, b, k, dtype, device)
        self.conv_slots = self.conv_store[..., :k].unbind(-1)                     # k of (c, b)
        bias = (torch.zeros(c, dtype=dtype, device=device) if mixer.conv1d.bias is None
                else mixer.conv1d.bias.detach().to(dtype))
        taps = torch.cat([rotated_conv_taps(mixer.conv1d, dtype), bias.expand(k, c)[..., None]], -1)  # (k, c, k + 1)
        self.conv_taps = taps[..., None].contiguous().unbind(0)                   # k of (c, k + 1, 1)
        self.zxbcdt = torch.empty(b, 2 * d + 2 * g * n + h, dtype=dtype, device=device)
        self.z, xBC, self.dt = self.zxbcdt.split([d, c, h], dim=-1)
        self.xBC_t = xBC.t()                                                      # (c, b)
        self.conv_out = torch.empty(c, b, 1, dtype=dtype, device=device)
        xbc = self.conv_out[..., 0].t()                                           # (b, c)
        x, B, C = xbc.split([d, g * n, g * n], dim=-1)
        # views where the strides allow (b = 1), copies otherwise (made at each step by reshape)
        self.x, self.B, self.C = (x, (b, h, p)), (B, (b, g, n)), (C, (b, g, n))
        # the fused step's gated norm (Mamba2Mixer.gated_norm_): eps and the per-group mean of squares
        self.norm_eps = torch.full((1, 1, 1), NORM_GATED_EPS, dtype=dtype, device=device)
        self.norm_sq = torch.empty(b * g, 1, 1, dtype=dtype, device=device)

    def tensors(self):
        return (self.ssm_state, self.conv_store, *self.conv_taps, self.A, self.D, self.dt_bias, self.zxbcdt,
                self.conv_out, self.norm_eps, self.norm_sq)


class Mamba2Mixer(nn.Module):
    """The Mamba-2 block (official name: ``Mamba2``, stored as ``mixer``), parameters as in the checkpoints:

    in_proj.weight (2d + 2gn + h, m) producing [z, xBC, dt], conv1d.weight (c, 1, k), conv1d.bias (c,),
    dt_bias (h,), A_log (h,), D (h,) or (d,) with D_has_hdim, norm.weight (d,) with rmsnorm,
    out_proj.weight (m, d); in_proj.bias, out_proj.bias with bias.
    """

    def __init__(self, config):
        super().__init__()
        c = config
        self.d_inner, self.d_state, self.d_conv, self.headdim = c.d_inner, c.d_state, c.d_conv, c.headdim
        self.nheads, self.ngroups, self.conv_dim, self.chunk_size = c.nheads, c.ngroups, c.conv_dim, c.chunk_size
        self.dt_limit, self.D_has_hdim = c.dt_limit, c.D_has_hdim
        self.in_proj = nn.Linear(c.d_model, 2 * c.d_inner + 2 * c.ngroups * c.d_state + c.nheads, bias=c.bias)
        self.conv1d = nn.Conv1d(c.conv_dim, c.conv_dim, kernel_size=c.d_conv, groups=c.conv_dim, padding=c.d_conv - 1,
                                bias=c.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(c.nheads))
        self.A_log = nn.Parameter(torch.empty(c.nheads))
        self.D = nn.Parameter(torch.empty(c.d_inner if c.D_has_hdim else c.nheads))
        self.norm = GatedRMSNorm(c.d_inner, c.ngroups, c.norm_before_gate) if c.rmsnorm else None
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=c.bias)
        self.reset_ssm_parameters(c)

    @torch.no_grad()
    def reset_ssm_parameters(self, c):
        """The official initialisation (mamba2.Mamba2.__init__): dt log-uniform in [dt_min, dt_max] (floored),
        stored through the inverse of softplus in dt_bias; A = U(A_init_range) stored as A_log; D = 1."""
        if c.conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -c.conv_init, c.conv_init)
        self.dt_bias.copy_(dt_bias_init(self.nheads, c))
        self.A_log.copy_(torch.log(torch.empty(self.nheads).uniform_(*c.A_init_range)))
        self.D.fill_(1.0)

    def ssm_params(self, f):
        """A = -exp(A_log) (h,), D (h,) or (h, p), dt_bias (h,), in the compute dtype f."""
        D = self.D.detach().to(f)
        return (-torch.exp(self.A_log.detach().to(f)), D.view(self.nheads, self.headdim) if self.D_has_hdim else D,
                self.dt_bias.detach().to(f))

    def forward(self, hidden, mask=None, impl=None, cache=None):
        """The block over a whole sequence.

        Args:
            hidden: (b, l, m)
            mask: (b, l) 1 for a real token, 0 for left padding, in hidden's dtype, or None
            impl: the registered SSD implementation for impls.ssd_scan (None: its default)
            cache: a LayerCache to fill with the state after the last token (prefill), or None
        Returns:
            (b, l, m)
        """
        b, l, _ = hidden.shape
        d, h, p, g, n = self.d_inner, self.nheads, self.headdim, self.ngroups, self.d_state
        zxbcdt = self.in_proj(hidden)                                 # (b, l, 2d + 2gn + h)
        z, xBC, dt = zxbcdt.split([d, self.conv_dim, h], dim=-1)
        if mask is not None:
            xBC = xBC * mask[..., None]                               # padding enters the conv as zeros
        conv_in = xBC.transpose(1, 2)                                 # (b, c, l)
        xBC = F.silu(self.conv1d(conv_in)[..., :l]).transpose(1, 2)   # causal: the first l outputs of the padded conv
        if mask is not None:
            xBC = xBC * mask[..., None]                               # and the scan as zeros: the state stays 0
        x, B, C = xBC.split([d, g * n, g * n], dim=-1)
        A, D, dt_bias = self.ssm_params(compute_dtype(hidden.dtype))
        kw = {} if impl is None else {"impl": impl}
        out = impls.ssd_scan(x.unflatten(-1, (h, p)), dt, A, B.unflatten(-1, (g, n)), C.unflatten(-1, (g, n)),
                             self.chunk_size, D=D, z=None if self.norm is not None else z.unflatten(-1, (h, p)),
                             dt_bias=dt_bias, dt_softplus=True, dt_limit=self.dt_limit,
                             return_final_states=cache is not None, **kw)
        y = keep_prefill_state(out, cache, conv_in)
        y = y.flatten(-2)                                             # (b, l, d)
        if self.norm is not None:
            y = self.norm(y, z)
        return self.out_proj(y)

    def new_cache(self, b, dtype, device, fused):
        """An empty LayerCache for b rows in the model dtype (states in the compute dtype); its buffers
        serve both steps, so ``fused`` changes nothing."""
        return LayerCache(self, b, dtype, device)

    def step_y(self, hidden, cache, phase, step_fn, impl):
        """in_proj, the conv and one SSD step for one token, into the cache's buffers: y (b, d)."""
        if self.in_proj.bias is None:
            torch.mm(hidden, self.in_proj.weight.t(), out=cache.zxbcdt)
        else:
            torch.addmm(self.in_proj.bias, hidden, self.in_proj.weight.t(), out=cache.zxbcdt)
        cache.conv_slots[phase].copy_(cache.xBC_t)
        torch.bmm(cache.conv_store, cache.conv_taps[phase], out=cache.conv_out)   # the conv with its bias
        F.silu(cache.conv_out, inplace=True)
        x, B, C = (t.reshape(shape) for t, shape in (cache.x, cache.B, cache.C))
        z = None if self.norm is not None else cache.z.unflatten(-1, (self.nheads, self.headdim))
        if step_fn is None:
            y = impls.ssd_state_update(cache.ssm_state, x, cache.dt, cache.A, B, C, cache.D, z, cache.dt_bias,
                                       dt_softplus=True, dt_limit=self.dt_limit, impl=impl)
        else:
            y = step_fn(cache.ssm_state, x, cache.dt, cache.A, B, C, cache.D, z, cache.dt_bias, True, self.dt_limit)
        return y.reshape(y.shape[0], self.d_inner)

    def step(self, hidden, cache, phase, step_fn, impl, residual):
        """The block for one new token, from the cache, which it advances in place.

        Args:
            hidden: (b, m) normed; cache: this layer's LayerCache; phase: the conv buffer slot for this token
            step_fn: the implementation's step, called directly, or None: through impls.ssd_state_update
            impl: the registered SSD implementation's name
            residual: (b, m)
        Returns:
            residual + the block's output (b, m), a new tensor
        """
        y = self.step_y(hidden, cache, phase, step_fn, impl)
        return residual + self.out_proj(self.norm(y, cache.z) if self.norm is not None else y)

    def fused_step(self, hidden, cache, phase, step_fn, impl, residual):
        """``step`` for float32/float64 RMSNorm models: the gated norm in place in fewer ops
        (gated_norm_), and the block's output added into residual (b, m) in place by out_proj's own addmm."""
        y = self.step_y(hidden, cache, phase, step_fn, impl)
        if self.norm is not None:
            y = self.gated_norm_(y, cache)
        residual.addmm_(y, self.out_proj.weight.t())
        if self.out_proj.bias is not None:
            residual.add_(self.out_proj.bias)

    def gated_norm_(self, y, cache):
        """GatedRMSNorm's formula on y (b, d), in place, for float32/float64: the per-group mean of
        squares as one baddbmm of y by itself (b g, 1, d/g) @ (b g, d/g, 1) with eps as its input, then
        rsqrt_, and the multiplies (F.rms_norm on a CPU dispatches about eight ops). Returns y."""
        norm, b = self.norm, y.shape[0]
        gate = F.silu(cache.z)
        if not norm.norm_before_gate:
            y.mul_(gate)
        rows = y.view(b * self.ngroups, 1, norm.group)
        torch.baddbmm(cache.norm_eps, rows, rows.transpose(1, 2), alpha=1.0 / norm.group, out=cache.norm_sq)
        rows.mul_(cache.norm_sq.rsqrt_())
        y.mul_(norm.weight)
        if norm.norm_before_gate:
            y.mul_(gate)
        return y


class Mamba2LM(LanguageModel):
    """The Mamba-2 language model (official ``MambaLMHeadModel`` with Mamba2 layers): backbone + LM head.

    ``Mamba2LM(Mamba2Config(d_model=64, n_layer=2, vocab_size=256, ssm_cfg=dict(d_state=16, headdim=16)))``
    builds a tiny random model with the official initialisation; ``state_dict()`` keys are the
    official checkpoint's. Forward, prefill, step, generate, save_pretrained and from_pretrained:
    impls/models/lm.py (LanguageModel).
    """

    family = "ssd"
    mixer = Mamba2Mixer
    step_default = impls.ssd_state_update.__kwdefaults__["impl"]
    weight_names = LAYOUT["weights"]

    @staticmethod
    def read_config(folder):
        return read_config(folder)

    @staticmethod
    def parameter_shapes(config):
        return parameter_shapes(config)

    def checkpoint_config(self, layout, safe_serialization):
        """The config.json dict of ``layout`` (to_transformers_dict for transformers'). Raises
        ValueError for safe_serialization=False with the transformers layout (safetensors only here)."""
        if layout == "official":
            return self.config.to_dict()
        if safe_serialization is False:
            raise ValueError("save_pretrained: layout='transformers' is written as model.safetensors only; "
                             "pass safe_serialization=None or True")
        return self.config.to_transformers_dict()


def read_config(folder):
    """(Mamba2Config, layout) from ``folder``/config.json, checked (see Mamba2LM.from_pretrained)."""
    cfg = read_config_json(folder)
    checkpoints.check_folder_model(cfg, folder, "Mamba2")
    try:   # another model_type is another model, whatever fields it shares
        layout = config_layout(cfg, MARKERS, REQUIRED) if cfg.get("model_type", "mamba2") == "mamba2" else None
    except ValueError:
        layout = None
    if layout == "both":
        return read_both_layouts(cfg, folder), "transformers"
    if layout == "transformers":
        return Mamba2Config.from_transformers_dict(cfg), "transformers"
    if layout == "official":
        return checkpoints.read_official_config(cfg, folder, Mamba2Config), "official"
    model_type = cfg.get("model_type")
    raise ValueError(f"from_pretrained({folder!r}): config.json is in neither layout: expected the official fields "
                     f"{list(REQUIRED['official'])} (with ssm_cfg.layer 'Mamba2') or transformers' Mamba2 fields "
                     f"{list(REQUIRED['transformers'])}"
                     + (f"; its model_type is {model_type!r}" if model_type else ""))


# The top-level fields found in one layout's config.json only (checkpoints.layout_markers): the
# transformers fields outside LAYOUT's table are markers too, except rms_norm, which both layouts have.
MARKERS = layout_markers(Mamba2Config.FIELDS,
                         {**LAYOUT["top"], **{f"ssm_cfg.{k}": v for k, v in LAYOUT["ssm"].items()}},
                         ("model_type", "architectures", "num_heads", "hidden_act", "time_step_rank", "rms_norm"))


def read_both_layouts(cfg, folder):
    """A config.json with both layouts' fields (a converted checkpoint may keep its original fields):
    the official reading (each field given in one form only stands for both) and the transformers
    reading must be the same model. Returns the official reading; ValueError naming each disagreement,
    as impls.models.mamba.config_from_dict does for Mamba-1."""
    hf = Mamba2Config.from_transformers_dict({k: v for k, v in cfg.items() if k not in MARKERS["official"]})
    official = {k: v for k, v in cfg.items() if k in Mamba2Config.FIELDS}
    # vocab_size is both layouts' field; unless an official pad_vocab_size_multiple is stated beside
    # it, it is transformers' row count, which no padding follows
    official.setdefault("pad_vocab_size_multiple", 1)
    for o in LAYOUT["top"]:
        official.setdefault(o, getattr(hf, o))
    official["ssm_cfg"] = {**{o: getattr(hf, o) for o in LAYOUT["ssm"]}, **(official.get("ssm_cfg") or {})}
    ours = Mamba2Config(**official)
    attrs = [o for o in (*LAYOUT["top"], *LAYOUT["ssm"]) if o != "vocab_size"] + ["padded_vocab_size", "nheads"]
    conflicts = [f"{k}: {getattr(ours, k)!r} (official fields) against {getattr(hf, k)!r} (transformers fields)"
                 for k in attrs if getattr(ours, k) != getattr(hf, k)]
    if conflicts:
        raise ValueError(f"from_pretrained({folder!r}): config.json: the official and the transformers fields "
                         f"disagree: " + "; ".join(conflicts))
    return ours
