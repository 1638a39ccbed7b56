"""A small, real Mamba language model whose selective scan runs through any registered implementation.

The Mamba-1 block of the paper (Gu & Dao 2023, Section 3.4 and Figure 3) and of the official code
(https://github.com/state-spaces/mamba: mamba_ssm/modules/mamba_simple.py for the block,
mamba_ssm/models/mixer_seq_simple.py for the stack, mamba_ssm/models/config_mamba.py for the config):

    in_proj -> x, z;  x -> causal depthwise conv1d (d_conv taps) -> SiLU -> x_proj -> (dt, B, C);
    dt -> dt_proj (its bias is the scan's delta_bias, softplus on);
    y = selective_scan(x, dt, A = -exp(A_log), B, C, D, z)   (the gate y * silu(z) is inside the scan);
    out_proj(y)

stacked as a pre-norm residual stream (h = h + mixer(RMSNorm(h)) per layer, then norm_f), with the
embedding tied to the LM head. Parameter names and shapes are those of the official checkpoints.

Checkpoints, in both layouts: ``MambaLM.from_pretrained(folder)`` loads a downloaded official folder
(``state-spaces/mamba-130m``) or a transformers one (``state-spaces/mamba-130m-hf``, or anything
``MambaForCausalLM.save_pretrained`` wrote), and ``save_pretrained(folder, layout="official" |
"transformers")`` writes either. What differs between the layouts is in one table (CONFIG_FIELDS,
WEIGHT_PREFIXES below: plain dicts, read by the functions of impls/models/checkpoints.py). Nothing is
built before the config's size fields are found (no default stands in for a size) and every
parameter's name and shape, read from the weight file's header, matches the config. Nothing is ever
fetched from a hub.

Letters as in impls/frontdoor.py: b batch, l sequence length, d channels of the scan (the official
``d_inner`` = expand * d_model), n state size (``d_state``); also m = d_model, r = dt_rank,
k = d_conv, v = the vocabulary padded to a multiple of ``pad_vocab_size_multiple`` (the official
model pads it too: mamba-130m's vocab_size 50277 gives v = 50280 logits).

Forward, the two ways to generate ("reforward" and "recurrent"), sampling and left padding are the
shared machinery of impls/models/lm.py; "recurrent" here is one selective scan over the prompt
(``prefill``: the SSM state from ``return_last_state`` and the conv state, the last k-1 conv inputs),
then one ``step`` per token through ``impls.selective_state_update``. Padding is made exact: the
conv input and the scan input are zeroed at padded positions, so the SSM state is exactly zero when
a row's first real token arrives and its conv window sees zeros, as if the prompt were unpadded.

What a decoding step does per layer, and what it leaves out (the per-token fixed cost): A = -exp(A_log),
D and the dt bias are computed once per cache, not per token; the conv input goes into a preallocated
rolling buffer (no concatenation) and the conv uses taps pre-rotated for the buffer's phase (no padded
conv1d call); the SSM state is preallocated and advanced in place; the residual add rides on the
output projection's matrix multiply; matrices with more outputs than inputs are stored transposed,
where this CPU's matrix-vector product is faster (``lm.transposed_storage``).
Most of a small model's step is the fixed cost of each torch call (a few µs inside a step, several
times what the same call costs repeated alone: benchmarks/decode_split.py), so float32/float64
RMSNorm models take a fused step (``MambaMixer.fused_step``, LayerDecode): the same arithmetic in about
half the calls, every intermediate in a buffer the cache made once, the conv and its bias one bmm,
the dt bias inside dt_proj's addmm, the RMSNorm in four ops, and the scan step straight to the
implementation once the front door has passed its (fixed) buffers. Other models take the
module-by-module step (``MambaMixer.step``).
benchmarks/decode_split.py measures where the remaining time goes; impls/adapters/mambapy_model.py holds the
same model in mamba.py, for parity tests and as the peer the decoding speed is measured against.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import impls
from ..frontdoor import compute_dtype
from . import checkpoints
from .checkpoints import check_int, config_layout, layout_markers, map_config, read_config_json, require_fields
from .lm import LanguageModel, conv_buffer, dt_bias_init, keep_prefill_state, rotated_conv_taps

# ssm_cfg keys of the official Mamba-1 mixer (mamba_simple.Mamba.__init__) and their defaults.
SSM_DEFAULTS = dict(d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                    dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False,
                    use_fast_path=True)
DT_INITS = ("random", "constant")   # the official dt_proj.weight initialisations


class MambaConfig:
    """The fields of an official Mamba ``config.json`` (mamba_ssm.models.config_mamba.MambaConfig),
    with the official defaults except for the sizes d_model, n_layer and vocab_size, which must be
    given (ValueError naming the missing ones). Unknown fields are accepted and kept (``to_dict``
    writes them back). A transformers ``config.json`` is read by ``config_from_dict``.

    ``ssm_cfg`` is kept exactly as given (mamba-130m's is ``{}``); the resolved mixer sizes are
    attributes: d_state, d_conv, expand, dt_rank (``"auto"`` -> ceil(d_model / 16)), d_inner,
    conv_bias, bias, and padded_vocab_size (v). ssm_cfg is checked as Mamba-2's and Mamba-3's are
    (checkpoints.check_ssm_cfg): ValueError naming an unknown key (nothing misspelled falls back to
    its default), a size that is not an int >= 1 (d_state, d_conv, dt_rank unless "auto"), a bool or
    number of another type, an expand with expand * d_model not a positive integer, a dt_init
    other than "random" or "constant".
    """

    def __init__(self, d_model=None, d_intermediate=0, n_layer=None, vocab_size=None, ssm_cfg=None,
                 attn_layer_idx=None, attn_cfg=None, rms_norm=True, residual_in_fp32=True,
                 fused_add_norm=True, pad_vocab_size_multiple=8, tie_embeddings=True, norm_epsilon=1e-5,
                 **extra):
        # The sizes have no defaults (the official dataclass's, d_model 2560 and n_layer 64, once
        # filled in for a transformers folder's missing fields and built a 2.6B-parameter model)
        missing = [k for k, v in (("d_model", d_model), ("n_layer", n_layer), ("vocab_size", vocab_size)) if v is None]
        if missing:
            hint = ""
            if "hidden_size" in extra or "num_hidden_layers" in extra:
                hint = (" (these fields are transformers' MambaConfig: read such a dict with "
                        "impls.models.mamba.config_from_dict, or the folder with MambaLM.from_pretrained)")
            raise ValueError(f"MambaConfig: missing size field(s) {', '.join(missing)}{hint}")
        self.d_model = check_int("MambaConfig", "d_model", d_model)
        self.d_intermediate = check_int("MambaConfig", "d_intermediate", d_intermediate)
        self.n_layer = check_int("MambaConfig", "n_layer", n_layer)
        self.vocab_size = check_int("MambaConfig", "vocab_size", vocab_size)
        self.ssm_cfg = checkpoints.ssm_cfg_dict("MambaConfig", ssm_cfg)
        self.attn_layer_idx = list(attn_layer_idx or [])
        self.attn_cfg = dict(attn_cfg or {})
        self.rms_norm = bool(rms_norm)
        self.residual_in_fp32 = bool(residual_in_fp32)
        self.fused_add_norm = bool(fused_add_norm)
        self.pad_vocab_size_multiple = check_int("MambaConfig", "pad_vocab_size_multiple", pad_vocab_size_multiple)
        self.tie_embeddings = bool(tie_embeddings)
        self.norm_epsilon = float(norm_epsilon)
        self.extra = dict(extra)  # fields this code does not know: kept, written back, otherwise ignored
        # the transformers fields outside the table, when read from that layout (config_from_dict):
        # written back to that layout only, since the official loader refuses fields it does not know
        self.transformers_extra = {}

        if self.ssm_cfg.get("layer", "Mamba1") != "Mamba1":
            raise NotImplementedError(f"MambaConfig: ssm_cfg.layer = {self.ssm_cfg['layer']!r}: this is the Mamba-1 "
                                      f"model; that is {checkpoints.model_hint(self.ssm_cfg['layer'])}")
        if self.attn_layer_idx:
            raise NotImplementedError(f"MambaConfig: attn_layer_idx = {self.attn_layer_idx}: "
                                      f"hybrid attention layers are not implemented")
        if self.d_intermediate:
            raise NotImplementedError(f"MambaConfig: d_intermediate = {self.d_intermediate}: "
                                      f"MLP layers are not implemented (0 = none, as in mamba-130m)")
        if self.d_model < 1 or self.n_layer < 1 or self.vocab_size < 1 or self.pad_vocab_size_multiple < 1:
            raise ValueError(f"MambaConfig: d_model, n_layer, vocab_size and pad_vocab_size_multiple must be >= 1, "
                             f"got {self.d_model}, {self.n_layer}, {self.vocab_size}, {self.pad_vocab_size_multiple}")

        s, self.d_inner = checkpoints.check_ssm_cfg("MambaConfig", self.ssm_cfg, SSM_DEFAULTS, ("d_state", "d_conv"),
                                                    self.d_model)
        self.d_state, self.d_conv, self.expand = s["d_state"], s["d_conv"], s["expand"]
        if s["dt_rank"] == "auto":
            self.dt_rank = math.ceil(self.d_model / 16)
        else:
            self.dt_rank = check_int("MambaConfig", "ssm_cfg.dt_rank", s["dt_rank"])
            if self.dt_rank < 1:
                raise ValueError(f"MambaConfig: ssm_cfg.dt_rank = {self.dt_rank}: expected 'auto' or an integer >= 1")
        if s["dt_init"] not in DT_INITS:
            raise ValueError(f"MambaConfig: ssm_cfg.dt_init = {s['dt_init']!r}: expected one of {DT_INITS}")
        self.dt_min, self.dt_max, self.dt_init = float(s["dt_min"]), float(s["dt_max"]), s["dt_init"]
        self.dt_scale, self.dt_init_floor = float(s["dt_scale"]), float(s["dt_init_floor"])
        self.conv_bias, self.bias = bool(s["conv_bias"]), bool(s["bias"])
        m = self.pad_vocab_size_multiple
        self.padded_vocab_size = self.vocab_size + (-self.vocab_size) % m

    FIELDS = checkpoints.OFFICIAL_FIELDS

    def to_dict(self):
        """The config.json contents: every official field, then the unknown ones kept from loading."""
        return {**{k: getattr(self, k) for k in self.FIELDS}, **self.extra}

    def __repr__(self):
        return "MambaConfig(" + ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()) + ")"

    def __eq__(self, other):
        return isinstance(other, MambaConfig) and self.to_dict() == other.to_dict()


# ---------------------------------------------------------------------------- checkpoint layout
#
# Two layouts of the same Mamba-1 weights exist: the official one (state-spaces/mamba-*, the
# mamba_ssm code) and transformers' (state-spaces/mamba-*-hf, transformers' MambaForCausalLM).
# Everything that differs between them is in the table below, plain dicts read by the functions of
# impls/models/checkpoints.py.

# The one config table: official field (a mixer field written "ssm_cfg.<key>") -> transformers'
# MambaConfig field (transformers/models/mamba/configuration_mamba.py, 5.24). Where a field is
# missing, each layout's own default applies, and the two agree on every one of these (tested).
# vocab_size is special: transformers' is the embedding's row count, the official one is the real
# vocabulary, padded to a multiple of pad_vocab_size_multiple (see official_to_transformers).
CONFIG_FIELDS = {
    "d_model": "hidden_size",
    "n_layer": "num_hidden_layers",
    "vocab_size": "vocab_size",
    "ssm_cfg.d_state": "state_size",
    "ssm_cfg.d_conv": "conv_kernel",
    "ssm_cfg.expand": "expand",
    "ssm_cfg.dt_rank": "time_step_rank",
    "ssm_cfg.bias": "use_bias",
    "ssm_cfg.conv_bias": "use_conv_bias",
    "ssm_cfg.dt_min": "time_step_min",
    "ssm_cfg.dt_max": "time_step_max",
    "ssm_cfg.dt_init": "time_step_init_scheme",
    "ssm_cfg.dt_scale": "time_step_scale",
    "ssm_cfg.dt_init_floor": "time_step_floor",
    "norm_epsilon": "layer_norm_epsilon",
    "residual_in_fp32": "residual_in_fp32",
    "tie_embeddings": "tie_word_embeddings",
}
# The fields that size the model: a config.json must state them; no default stands in for them.
SIZE_FIELDS = {"official": ("d_model", "n_layer", "vocab_size"),
               "transformers": ("hidden_size", "num_hidden_layers", "vocab_size")}
# transformers fields fixed by the block implemented here: another value is refused, not ignored.
TRANSFORMERS_FIXED = {"model_type": "mamba", "hidden_act": "silu"}
# official fields transformers' model cannot express, with the value it always computes.
OFFICIAL_FIXED_FOR_TRANSFORMERS = {"rms_norm": True}
# transformers fields that describe the file, not the model: rewritten when saving, not kept.
TRANSFORMERS_FILE_FIELDS = ("architectures", "dtype", "torch_dtype", "transformers_version", "intermediate_size")
# Weight names: the only difference (official prefix -> transformers prefix).
WEIGHT_PREFIXES = {"backbone.embedding.": "backbone.embeddings."}
# The top-level fields found in one layout's config.json only.
MARKERS = layout_markers(MambaConfig.FIELDS, CONFIG_FIELDS, (*TRANSFORMERS_FIXED, *TRANSFORMERS_FILE_FIELDS))


def transformers_to_official(d):
    """A transformers MambaConfig dict -> (official config.json dict, the transformers fields
    outside the table).

    The vocabulary is transformers' vocab_size rows with no further padding (pad_vocab_size_multiple
    1): transformers has no notion of padding rows, so every row is a token, as its generate treats
    it. The fields outside the table (token ids, initializer_range, use_cache, ...) come back
    separately, to be written back to the transformers layout only; architectures, dtype,
    transformers_version and intermediate_size describe the file and are dropped (intermediate_size
    after checking it is expand * hidden_size).

    Raises ValueError for a missing size field or a field whose value this block cannot compute.
    """
    require_fields(d, "transformers", SIZE_FIELDS)
    for key, value in TRANSFORMERS_FIXED.items():
        if d.get(key, value) != value:
            other = checkpoints.TRANSFORMERS_MODEL_TYPES.get(d[key]) if key == "model_type" else None
            raise ValueError(f"config (transformers layout): {key} = {d[key]!r}: only {value!r} is implemented"
                             + (f"; that is {checkpoints.model_hint(other)}" if other else ""))
    mapped, rest = map_config(d, {v: k for k, v in CONFIG_FIELDS.items()})
    expand = mapped.get("ssm_cfg", {}).get("expand", SSM_DEFAULTS["expand"])
    width = d["hidden_size"]
    # a non-numeric expand or width is left for MambaConfig to name ("2" * 16 is no width)
    if (checkpoints.is_number(expand) and checkpoints.is_number(width)
            and rest.get("intermediate_size") not in (None, int(expand * width))):
        raise ValueError(f"config (transformers layout): intermediate_size = {rest['intermediate_size']} is not "
                         f"expand * hidden_size = {expand} * {d['hidden_size']}")
    for key in (*TRANSFORMERS_FIXED, *TRANSFORMERS_FILE_FIELDS):
        rest.pop(key, None)
    return {**mapped, "pad_vocab_size_multiple": 1}, rest


def official_to_transformers(config):
    """A MambaConfig -> transformers' MambaConfig dict (what its save_pretrained writes), with the
    resolved sizes (dt_rank as a number) and vocab_size = the padded row count. Unknown fields kept
    from loading, official (config.extra) or transformers' own (config.transformers_extra), are
    written too. Raises ValueError for what transformers' model cannot express."""
    for key, value in OFFICIAL_FIXED_FOR_TRANSFORMERS.items():
        if getattr(config, key) != value:
            raise ValueError(f"layout='transformers': {key} = {getattr(config, key)!r} has no counterpart in "
                             f"transformers' MambaForCausalLM (only {value!r})")
    out = {"architectures": ["MambaForCausalLM"], **TRANSFORMERS_FIXED}
    for official, hf in CONFIG_FIELDS.items():
        out[hf] = getattr(config, official.split(".")[-1])
    out["vocab_size"] = config.padded_vocab_size
    out["intermediate_size"] = config.d_inner
    return {**out, **config.transformers_extra, **config.extra}


def read_both_layouts(d):
    """A config with fields of both layouts: the official reading (the official fields, each
    layout's defaults for the rest) and the transformers reading must give the same model. Returns
    the official reading, with the transformers fields outside the table kept for that layout."""
    official_only = MARKERS["official"]
    official = {k: v for k, v in d.items() if k in official_only or k in SIZE_FIELDS["official"]}
    hf = {k: v for k, v in d.items() if k not in official_only}
    for o, h in CONFIG_FIELDS.items():   # a size given in one form only stands for both
        if o in SIZE_FIELDS["official"] and h in SIZE_FIELDS["transformers"]:
            official.setdefault(o, hf.get(h))
            hf.setdefault(h, official[o])
    require_fields(official, "official", SIZE_FIELDS)
    hf_reading, rest = transformers_to_official(hf)
    a, b = MambaConfig(**official), MambaConfig(**hf_reading)
    attrs = [o.split(".")[-1] for o in CONFIG_FIELDS if o != "vocab_size"] + ["padded_vocab_size", "d_inner"]
    conflicts = [f"{k}: {getattr(a, k)!r} (official fields) against {getattr(b, k)!r} (transformers fields)"
                 for k in attrs if getattr(a, k) != getattr(b, k)]
    if conflicts:
        raise ValueError("config: the official and the transformers fields disagree: " + "; ".join(conflicts))
    a.transformers_extra = rest
    return a


def config_from_dict(d):
    """A config.json dict in either layout, or with both layouts' fields in agreement -> (MambaConfig,
    layout), layout "official" or "transformers" (for both: "transformers", the layout that keeps
    such a config). Raises ValueError naming the missing size fields, or the fields of two layouts
    that disagree, before anything is built."""
    layout = config_layout(d, MARKERS, SIZE_FIELDS)
    if layout == "both":
        return read_both_layouts(d), "transformers"
    if layout == "transformers":
        official, rest = transformers_to_official(d)
        config = MambaConfig(**official)
        config.transformers_extra = rest
        return config, layout
    require_fields(d, layout, SIZE_FIELDS)
    return MambaConfig(**d), layout


def read_config(folder):
    """config.json of a checkpoint folder -> (MambaConfig, layout). FileNotFoundError if absent;
    ValueError naming the model of another model's folder."""
    cfg = read_config_json(folder)
    checkpoints.check_folder_model(cfg, folder, "Mamba1")
    return config_from_dict(cfg)


def parameter_shapes(config):
    """Official checkpoint name -> shape for a MambaConfig, from the config alone (no tensor made):
    what ``check_weight_shapes`` compares a weight file's header against. lm_head.weight included."""
    m, d, n, r, k = config.d_model, config.d_inner, config.d_state, config.dt_rank, config.d_conv
    mixer = {"in_proj.weight": (2 * d, m), "conv1d.weight": (d, 1, k), "x_proj.weight": (r + 2 * n, d),
             "dt_proj.weight": (d, r), "dt_proj.bias": (d,), "A_log": (d, n), "D": (d,), "out_proj.weight": (m, d)}
    if config.conv_bias:
        mixer["conv1d.bias"] = (d,)
    if config.bias:
        mixer.update({"in_proj.bias": (2 * d,), "out_proj.bias": (m,)})
    return checkpoints.stack_shapes(config, mixer)


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
        the module-by-module step (LanguageModel.fused_decoding)
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

    def tensors(self):
        """What this cache allocated (conv_buf, slots and taps are views): for InferenceCache.nbytes."""
        own = (self.ssm_state, self.conv_store, self.A, self.D, self.dt_bias, self.conv_w, self.conv_b)
        return own if self.decode is None else own + self.decode.tensors()


class LayerDecode:
    """One layer's fused decoding step (MambaMixer.fused_step): every intermediate in a buffer made once
    per cache, every view of it and of the weights made once, so a token costs only the arithmetic
    ops, about half of what the module-by-module step dispatched (each op has a fixed cost of a few µs
    in a step, which is most of a small model's step).

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

    __slots__ = ("w_in", "b_in", "w_x", "w_dt", "w_out", "b_out", "xz", "x_t", "z",
                 "conv_slots", "conv_taps", "conv_out", "xc", "dbc", "dt_low", "B", "C", "delta")

    def __init__(self, mixer, cache, b):
        d, n, r, k = mixer.d_inner, mixer.d_state, mixer.dt_rank, mixer.d_conv
        w = mixer.in_proj.weight
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

    # The parts of the fused step, in order (MambaMixer.fused_step); each writes its buffer.

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
        return (self.xz, *self.conv_taps, self.conv_out, self.dbc, self.delta)  # the taps: k disjoint views


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
        else:   # "random", the only other value MambaConfig accepts
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        self.dt_proj.bias.copy_(dt_bias_init(self.d_inner, c))
        # S4D-real: A = -(1..n) per channel, stored as A_log = log(1..n); D = 1
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand(self.d_inner, -1))
        self.D.fill_(1.0)

    def ssm_params(self, f):
        """A = -exp(A_log), D and the dt bias in the compute dtype f."""
        return -torch.exp(self.A_log.to(f)), self.D.to(f), self.dt_proj.bias.to(f)

    def project(self, x):
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
        d, n, r = self.d_inner, self.d_state, self.dt_rank
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
        A, D, dt_bias = self.ssm_params(compute_dtype(x.dtype))
        kw = {} if impl is None else {"impl": impl}
        out = impls.selective_scan(x, delta, A, B, C, D, z, delta_bias=dt_bias, delta_softplus=True,
                                   return_last_state=cache is not None, **kw)
        y = keep_prefill_state(out, cache, conv_in)
        return self.out_proj(y.transpose(1, 2))

    def new_cache(self, b, dtype, device, fused):
        """An empty LayerCache for b rows in the model dtype (states in the compute dtype), with the
        fused step's buffers (LayerDecode) when ``fused``."""
        k, d = self.d_conv, self.d_inner
        f = compute_dtype(dtype)
        A, D, dt_bias = self.ssm_params(f)
        conv_w = rotated_conv_taps(self.conv1d, dtype)              # (k phases, d, k slots)
        conv_b = None if self.conv1d.bias is None else self.conv1d.bias.detach().to(dtype)
        cache = LayerCache(torch.zeros(b, d, self.d_state, dtype=f, device=device),
                           conv_buffer(d, b, k, dtype, device), A, D, dt_bias, conv_w, conv_b)
        if fused:
            cache.decode = LayerDecode(self, cache, b)
        return cache

    def step(self, hidden, cache, phase, step_fn, impl, residual):
        """The block for one new token, module by module, from the cache, which it advances in place.

        Args:
            hidden: (b, m) normed; cache: this layer's LayerCache; phase: the conv buffer slot for this token
            step_fn: the implementation's step, called directly, or None: through impls.selective_state_update
            impl: the registered implementation's name
            residual: (b, m); the block's output is added to it by the output projection's own matrix
                multiply where the dtypes allow (one op fewer per layer)
        Returns:
            residual + the block's output (b, m), a new tensor
        """
        x, z = self.step_in_proj(hidden)
        x = self.step_conv(x, cache, phase)
        delta, B, C = self.project(x)                                # (b, d), (b, n), (b, n)
        y = self.step_scan(cache, x, delta, B, C, z, impl, step_fn)
        return self.step_out_proj(y, residual)

    def fused_step(self, hidden, cache, phase, step_fn, impl, residual):
        """``step`` for float32/float64 RMSNorm models: the same arithmetic in about half the torch
        calls, every intermediate in the cache's buffers (LayerDecode, whose methods are the parts, in
        order): the conv and its bias one bmm, the dt bias inside dt_proj's addmm, no F.linear, chunk
        or split (views made once). Adds the block's output into residual (b, m) in place."""
        dc = cache.decode
        dc.in_proj(hidden)
        dc.conv(cache, phase)
        dc.x_dt_proj(cache)
        dc.out_proj(dc.scan(cache, step_fn, impl), residual)

    # The parts of ``step``, in order; benchmarks/decode_split.py times each of them inside a step.
    # (The module-by-module step: taken for LayerNorm and float16/bfloat16 models; float32/float64
    # RMSNorm models take the fused step, whose parts are LayerDecode's methods.)

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
    def step_scan(cache, x, delta, B, C, z, impl, step_fn=None):
        """One selective_state_update on the layer's state (A, D and the dt bias from the cache, computed
        once per cache, not per token): through the front door (impls.selective_state_update) when
        step_fn is None, else step_fn directly. Returns y (b, d), gated by silu(z)."""
        if step_fn is None:
            return impls.selective_state_update(cache.ssm_state, x, delta, cache.A, B, C, cache.D, z.contiguous(),
                                                dt_bias=cache.dt_bias, dt_softplus=True, impl=impl)
        return step_fn(cache.ssm_state, x, delta, cache.A, B, C, cache.D, z.contiguous(), cache.dt_bias, True)

    def step_out_proj(self, y, residual):
        """residual (b, m) + out_proj(y): one addmm when the dtypes agree and there is no bias."""
        w, bias = self.out_proj.weight, self.out_proj.bias
        if bias is None and residual.dtype == y.dtype:
            return torch.addmm(residual, y, w.t())
        return residual + F.linear(y, w, bias)


class MambaLM(LanguageModel):
    """The Mamba language model (official ``MambaLMHeadModel``): backbone of MambaMixer blocks + tied LM head.

    ``MambaLM(MambaConfig(d_model=64, n_layer=2, vocab_size=256))`` builds a tiny random model with
    the official initialisation. ``state_dict()`` keys are the official checkpoint's. Forward, prefill,
    step, generate, save_pretrained and from_pretrained: impls/models/lm.py (LanguageModel).
    """

    family = "selective"
    mixer = MambaMixer
    step_default = impls.selective_state_update.__kwdefaults__["impl"]
    weight_names = WEIGHT_PREFIXES
    read_config = staticmethod(read_config)
    parameter_shapes = staticmethod(parameter_shapes)

    def checkpoint_config(self, layout, safe_serialization):
        """The config.json dict of ``layout``: the official fields (then the unknown ones kept from
        loading), or transformers' (official_to_transformers) with the model's dtype."""
        if layout == "official":
            return self.config.to_dict()
        return {**official_to_transformers(self.config), "dtype": str(self.dtype).removeprefix("torch.")}
