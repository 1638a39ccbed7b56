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
WEIGHT_PREFIXES: plain dicts, read by plain functions). Nothing is built before the config's size
fields are found (no default stands in for a size) and every parameter's name and shape, read from
the weight file's header, matches the config. Nothing is ever fetched from a hub.

Letters as in impls/frontdoor.py: b batch, l sequence length, d channels of the scan (the official
``d_inner`` = expand * d_model), n state size (``d_state``); also m = d_model, r = dt_rank,
k = d_conv, v = the vocabulary padded to a multiple of ``pad_vocab_size_multiple`` (the official
model pads it too: mamba-130m's vocab_size 50277 gives v = 50280 logits).

Two ways to generate (``MambaLM.generate``: greedy by default, or sampling with transformers'
semantics, temperature, top_k, top_p, a torch.Generator, and eos_token_id stopping):
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
benchmarks/decode_split.py measures where the remaining time goes; impls/adapters/mambapy_model.py holds the
same model in mamba.py, for parity tests and as the peer the decoding speed is measured against.

Batches of prompts of different lengths: left-pad them and pass ``attention_mask`` (b, l), 1 for a
real token and 0 for padding, every row of the form 0...0 1...1. Padding is made exact, not
approximate: the conv input and the scan input are zeroed at padded positions, so the SSM state is
exactly zero when a row's first real token arrives and its conv window sees zeros, as if the prompt
had not been padded at all. Right padding or holes in the mask raise ValueError.
"""

import json
import math
import numbers
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import impls
from ..frontdoor import compute_dtype

# selective_state_update's default implementation (a keyword default there), for MambaLM.step's impl=None
STEP_DEFAULT = impls.selective_state_update.__kwdefaults__["impl"]
CONFIG_NAME = "config.json"
MAMBA2_HINT = "; a Mamba-2 checkpoint: load it with impls.models.mamba2.Mamba2LM"
# token ids: a set lookup, since a decoding step checks its token every time
INTEGER_DTYPES = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64})
WEIGHTS_BIN = "pytorch_model.bin"
WEIGHTS_SAFETENSORS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"   # sharded safetensors (large transformers checkpoints)

# ssm_cfg keys of the official Mamba-1 mixer (mamba_simple.Mamba.__init__) and their defaults.
SSM_DEFAULTS = dict(d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                    dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False,
                    use_fast_path=True)


def check_int(where, name, value):
    """value if it is an int (bool excluded: True is no size); ValueError naming the field otherwise.
    config.json sizes are read as given: 2.5 or "2" is refused, not truncated to 2."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{where}: {name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


class MambaConfig:
    """The fields of an official Mamba ``config.json`` (mamba_ssm.models.config_mamba.MambaConfig),
    with the official defaults except for the sizes d_model, n_layer and vocab_size, which must be
    given (ValueError naming the missing ones). Unknown fields are accepted and kept (``to_dict``
    writes them back). A transformers ``config.json`` is read by ``config_from_dict``.

    ``ssm_cfg`` is kept exactly as given (mamba-130m's is ``{}``); the resolved mixer sizes are
    attributes: d_state, d_conv, expand, dt_rank (``"auto"`` -> ceil(d_model / 16)), d_inner,
    conv_bias, bias, and padded_vocab_size (v).
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
        self.ssm_cfg = dict(ssm_cfg or {})
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
            raise NotImplementedError(f"MambaConfig: ssm_cfg.layer = {self.ssm_cfg['layer']!r}: "
                                      f"only the Mamba-1 block is implemented here"
                                      + MAMBA2_HINT * (self.ssm_cfg["layer"] == "Mamba2"))
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
        self.d_state = check_int("MambaConfig", "ssm_cfg.d_state", s["d_state"])
        self.d_conv = check_int("MambaConfig", "ssm_cfg.d_conv", s["d_conv"])
        self.expand = s["expand"]
        self.d_inner = int(self.expand * self.d_model)
        self.dt_rank = (math.ceil(self.d_model / 16) if s["dt_rank"] == "auto"
                        else check_int("MambaConfig", "ssm_cfg.dt_rank", s["dt_rank"]))
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


# ---------------------------------------------------------------------------- checkpoint layouts
#
# Two layouts of the same Mamba-1 weights exist: the official one (state-spaces/mamba-*, the
# mamba_ssm code) and transformers' (state-spaces/mamba-*-hf, transformers' MambaForCausalLM).
# Everything that differs between them is in the tables below, plain dicts, so that a Mamba-2 model
# can keep its own tables and pass them to the same functions: layout_markers / config_layout (which
# layout a config.json is in), map_config (rename its fields), rename_weights / weights_layout
# (weight names), weight_files / stored_shapes (names and shapes from the file headers, nothing
# loaded) and check_weight_shapes (against the shapes its config implies, before building).

LAYOUTS = ("official", "transformers")

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


def layout_markers(official_fields, table=CONFIG_FIELDS,
                   transformers_extra=(*TRANSFORMERS_FIXED, *TRANSFORMERS_FILE_FIELDS)):
    """The top-level fields found in one layout's config.json only: {"official": set, "transformers": set}
    (official_fields: the official config's top-level fields; table: official -> transformers)."""
    official = set(official_fields) | {k for k in table if "." not in k}
    hf = set(table.values()) | set(transformers_extra)
    return {"official": official - hf, "transformers": hf - official}


def config_layout(d, markers=None, size_fields=SIZE_FIELDS):
    """Which layout a config.json dict is in, told by the fields only one of them has
    (layout_markers: d_model, ssm_cfg, ... against hidden_size, state_size, model_type, ...):
    "official", "transformers", or "both" (a converted checkpoint may keep its original fields
    beside transformers' ones, which transformers ignores; config_from_dict requires them to agree).

    Raises ValueError if it has neither layout's fields (naming each layout's size fields). A dict
    that picks a layout but lacks some of its size fields is refused by ``config_from_dict``.
    """
    markers = layout_markers(MambaConfig.FIELDS) if markers is None else markers
    found = [layout for layout, fields in markers.items() if any(k in fields for k in d)]
    if len(found) > 1:
        return "both"
    if not found:
        raise ValueError("config: neither layout's size fields: " + "; ".join(
            f"{layout} needs {', '.join(k for k in fields if k not in d)}" for layout, fields in size_fields.items()))
    return found[0]


def _require_fields(d, layout, size_fields=SIZE_FIELDS):
    missing = [k for k in size_fields[layout] if d.get(k) is None]
    if missing:
        raise ValueError(f"config ({layout} layout): missing size field(s) {', '.join(missing)}; "
                         f"a checkpoint must state them (no default stands in for a size)")


def map_config(d, table):
    """Rename a flat config dict's fields by ``table`` (source name -> target name; a dotted target,
    "ssm_cfg.d_state", goes into a nested dict). Returns (mapped dict, the fields not in the table)."""
    out, rest = {}, dict(d)
    for src, dst in table.items():
        if src not in rest:
            continue
        *path, key = dst.split(".")
        target = out
        for part in path:
            target = target.setdefault(part, {})
        target[key] = rest.pop(src)
    return out, rest


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
    _require_fields(d, "transformers")
    for key, value in TRANSFORMERS_FIXED.items():
        if d.get(key, value) != value:
            raise ValueError(f"config (transformers layout): {key} = {d[key]!r}: only {value!r} is implemented"
                             + MAMBA2_HINT * (d[key] == "mamba2"))
    mapped, rest = map_config(d, {v: k for k, v in CONFIG_FIELDS.items()})
    expand = mapped.get("ssm_cfg", {}).get("expand", SSM_DEFAULTS["expand"])
    if rest.get("intermediate_size") not in (None, int(expand * d["hidden_size"])):
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


def _read_both(d):
    """A config with fields of both layouts: the official reading (the official fields, each
    layout's defaults for the rest) and the transformers reading must give the same model. Returns
    the official reading, with the transformers fields outside the table kept for that layout."""
    official_only = layout_markers(MambaConfig.FIELDS)["official"]
    official = {k: v for k, v in d.items() if k in official_only or k in SIZE_FIELDS["official"]}
    hf = {k: v for k, v in d.items() if k not in official_only}
    for o, h in CONFIG_FIELDS.items():   # a size given in one form only stands for both
        if o in SIZE_FIELDS["official"] and h in SIZE_FIELDS["transformers"]:
            official.setdefault(o, hf.get(h))
            hf.setdefault(h, official[o])
    _require_fields(official, "official")
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
    layout = config_layout(d)
    if layout == "both":
        return _read_both(d), "transformers"
    if layout == "transformers":
        official, rest = transformers_to_official(d)
        config = MambaConfig(**official)
        config.transformers_extra = rest
        return config, layout
    _require_fields(d, layout)
    return MambaConfig(**d), layout


def rename_weights(names, src, dst, prefixes=WEIGHT_PREFIXES):
    """Checkpoint names in layout src -> {name: name in layout dst} (prefixes: official -> transformers)."""
    if src == dst:
        return {k: k for k in names}
    pairs = prefixes.items() if src == "official" else [(b, a) for a, b in prefixes.items()]
    out = {}
    for k in names:
        for a, b in pairs:
            if k.startswith(a):
                k_new = b + k[len(a):]
                break
        else:
            k_new = k
        out[k] = k_new
    return out


def weights_layout(names, prefixes=WEIGHT_PREFIXES):
    """"official" or "transformers" from the names (the embedding's), or None if neither shows."""
    for official, hf in prefixes.items():
        if any(k.startswith(hf) for k in names):
            return "transformers"
        if any(k.startswith(official) for k in names):
            return "official"
    return None


def parameter_shapes(config):
    """Official checkpoint name -> shape for a MambaConfig, from the config alone (no tensor made):
    what ``check_weight_shapes`` compares a weight file's header against. lm_head.weight included."""
    m, d, n, r, k, v = (config.d_model, config.d_inner, config.d_state, config.dt_rank, config.d_conv,
                        config.padded_vocab_size)
    shapes = {"backbone.embedding.weight": (v, m)}
    for i in range(config.n_layer):
        p = f"backbone.layers.{i}."
        shapes.update({p + "norm.weight": (m,), p + "mixer.in_proj.weight": (2 * d, m),
                       p + "mixer.conv1d.weight": (d, 1, k), p + "mixer.x_proj.weight": (r + 2 * n, d),
                       p + "mixer.dt_proj.weight": (d, r), p + "mixer.dt_proj.bias": (d,),
                       p + "mixer.A_log": (d, n), p + "mixer.D": (d,), p + "mixer.out_proj.weight": (m, d)})
        if config.conv_bias:
            shapes[p + "mixer.conv1d.bias"] = (d,)
        if config.bias:
            shapes[p + "mixer.in_proj.bias"] = (2 * d,)
            shapes[p + "mixer.out_proj.bias"] = (m,)
        if not config.rms_norm:
            shapes[p + "norm.bias"] = (m,)
    shapes["backbone.norm_f.weight"] = (m,)
    if not config.rms_norm:
        shapes["backbone.norm_f.bias"] = (m,)
    shapes["lm_head.weight"] = (v, m)
    return shapes


def check_weight_shapes(config, stored, layout, expected=None, optional=None, prefixes=WEIGHT_PREFIXES):
    """Check a checkpoint's names and shapes (stored: name in ``layout`` -> shape, read from the file's
    header) against the config, before any model is built.

    expected: official name -> shape (default parameter_shapes(config)); optional: official names that
    may be absent (default: lm_head.weight when the embeddings are tied); prefixes: the weight-name table.
    Raises KeyError naming missing and unexpected names, ValueError naming each shape that differs.
    """
    expected = parameter_shapes(config) if expected is None else expected
    if optional is None:
        optional = {"lm_head.weight"} if config.tie_embeddings else set()
    to_official = rename_weights(stored, layout, "official", prefixes)
    have = {to_official[k]: tuple(s) for k, s in stored.items()}
    missing = [k for k in expected if k not in have and k not in optional]
    unexpected = [k for k in have if k not in expected]
    if missing or unexpected:
        raise KeyError(f"checkpoint (names read in the {layout} layout): "
                       f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                       f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    wrong = [f"{k}: config gives {expected[k]}, file has {s}" for k, s in have.items() if s != expected[k]]
    if wrong:
        raise ValueError(f"checkpoint: {len(wrong)} shape(s) differ from the config: "
                         + "; ".join(wrong[:8]) + (" ..." if len(wrong) > 8 else ""))


def config_path(folder):
    """folder/config.json: FileNotFoundError if either is absent; ValueError if ``folder`` is a file
    (its config.json, or a weight file, given where the folder is expected)."""
    if os.path.isfile(folder):
        raise ValueError(f"from_pretrained: folder: expected a checkpoint folder (config.json beside the weights), "
                         f"got the file {os.fspath(folder)!r}; pass its folder {os.path.dirname(folder) or '.'!r}")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"from_pretrained: folder: no such folder {os.fspath(folder)!r}")
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"from_pretrained: no {CONFIG_NAME} in {folder!r}")
    return path


def read_config(folder):
    """config.json of a checkpoint folder -> (MambaConfig, layout). FileNotFoundError if absent."""
    with open(config_path(folder)) as f:
        return config_from_dict(json.load(f))


def check_dtype_arg(where, dtype):
    """from_pretrained's dtype: None or a torch.dtype (a string such as "float16" is refused, not guessed)."""
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"{where}: dtype: expected a torch.dtype (e.g. torch.float16) or None, got {dtype!r}")


def _safetensors_error(path, e):
    return ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})")


def weight_files(folder):
    """The weight files of a folder, in the order they are preferred: model.safetensors, the shards of
    model.safetensors.index.json, or pytorch_model.bin. FileNotFoundError if none."""
    st, index, bin_ = (os.path.join(folder, n) for n in (WEIGHTS_SAFETENSORS, WEIGHTS_INDEX, WEIGHTS_BIN))
    if os.path.isfile(st):
        return [st]
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, s) for s in shards]
    if os.path.isfile(bin_):
        return [bin_]
    raise FileNotFoundError(f"from_pretrained: none of {WEIGHTS_SAFETENSORS}, {WEIGHTS_INDEX}, {WEIGHTS_BIN} "
                            f"in {folder!r}")


def stored_shapes(files):
    """name -> shape of every tensor in the weight files, without reading the tensors: a safetensors
    header (safe_open ... get_slice(name).get_shape()), or a pytorch_model.bin memory-mapped
    (torch.load(mmap=True): nothing is read until a tensor is used)."""
    shapes = {}
    for path in files:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            from safetensors import SafetensorError

            try:
                with safe_open(path, framework="pt") as f:
                    shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
            except SafetensorError as e:
                raise _safetensors_error(path, e) from e
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            shapes.update({k: tuple(v.shape) for k, v in state.items()})
    return shapes


def load_weights(files):
    """name -> tensor of every tensor in the weight files."""
    state = {}
    for path in files:
        if path.endswith(".safetensors"):
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                state.update(load_file(path))
            except SafetensorError as e:
                raise _safetensors_error(path, e) from e
        else:
            state.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    return state


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
    """Pre-norm residual: h + mixer(norm(h)). Official names: ``norm``, ``mixer``. ``mixer`` is the
    layer's class (Mamba-1's MambaMixer, or impls/models/mamba2.py's Mamba2Mixer), built from the config."""

    def __init__(self, config, mixer=None):
        super().__init__()
        self.norm = (RMSNorm(config.d_model, config.norm_epsilon) if config.rms_norm
                     else nn.LayerNorm(config.d_model, eps=config.norm_epsilon))
        self.mixer = (mixer or MambaMixer)(config)


class Backbone(nn.Module):
    """Official ``MixerModel``: embedding, layers, norm_f; ``mixer`` as for Block."""

    def __init__(self, config, mixer=None):
        super().__init__()
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, mixer) for _ in range(config.n_layer))
        self.norm_f = (RMSNorm(config.d_model, config.norm_epsilon) if config.rms_norm
                       else nn.LayerNorm(config.d_model, eps=config.norm_epsilon))


def _check_mask(attention_mask, input_ids, where):
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


def _check_ids(input_ids, where, vocab_size):
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


def _check_impl_gradients(model, impl, family, where):
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


def _check_token(token, cache, impl):
    """A step's token: an integer tensor (b,) for the cache's batch, on its device; and an
    implementation with a step. Checked before the cache changes, so a refused step leaves it as it
    was. The id range is not checked here (a min/max per token would cost several µs of a step of
    about 100): the embedding lookup, the first thing a step does and before the cache changes,
    raises IndexError for it, which ``_embed_token`` names."""
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
        _check_step_impl(impl)


def _embed_token(lookup, token, v):
    """lookup() (the step's embedding of token), with an out-of-range id named as a ValueError."""
    try:
        return lookup()
    except IndexError:
        raise ValueError(f"step: token: ids must be in [0, {v}), got {token.tolist()}") from None


def _check_step_impl(impl):
    """ValueError for an unknown implementation, NotImplementedError for one without a step."""
    if impls.get(impl).step is None:
        raise NotImplementedError(f"step: implementation {impl!r} has no step function; those with one: "
                                  f"{', '.join(n for n in impls.names() if impls.get(n).step is not None)}")


def _check_count(value, where):
    """A non-negative int (a bool or a float such as 2.7 is refused, not truncated)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if not (isinstance(value, torch.Tensor) and value.dim() == 0 and not value.dtype.is_floating_point
                and not value.dtype.is_complex and value.dtype != torch.bool):
            raise TypeError(f"{where}: expected a non-negative int, got {value!r}")
    value = int(value)
    if value < 0:
        raise ValueError(f"{where}: expected a non-negative int, got {value}")
    return value


def _check_sampling(v, do_sample, temperature, top_k, top_p, generator, eos_token_id, pad_token_id):
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
        _check_count(top_k, "generate: top_k")
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
    """The token loop both models' ``generate`` share.

    Args:
        input_ids: (b, l) int64 prompt; max_new_tokens: T >= 0 (checked by the caller)
        logits_at: (tokens (b, l + T), t) -> logits (b, v) that choose tokens[:, t]
        vocab_size: V, the real vocabulary: padded rows beyond it are never chosen
        eos, pad: from _check_sampling (eos None: no stop token); sampling: None (greedy) or a dict
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
        Raises:
            ValueError for ids that are not (b, l >= 1) or outside the vocabulary, or a bad attention_mask;
            TypeError for ids that are not integers;
            NotImplementedError for an impl without gradients while autograd is on (call it under
            torch.no_grad() for inference)
        """
        _check_ids(input_ids, "forward", self.config.vocab_size)
        _check_impl_gradients(self, impl, "selective", "forward")
        return self._forward(input_ids, impl, _check_mask(attention_mask, input_ids, "forward"), num_last_tokens)

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
        _check_ids(input_ids, "prefill", self.config.vocab_size)
        mask = _check_mask(attention_mask, input_ids, "prefill")
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
        Raises:
            before the cache changes: ValueError for a token that is not (b,) for the cache's batch
            (or on another device, or outside the vocabulary), TypeError for a non-integer token,
            ValueError for an unknown implementation, NotImplementedError for one without a step
        """
        impl = STEP_DEFAULT if impl is None else impl
        v = self.config.padded_vocab_size
        _check_token(token, cache, impl)
        if cache.stream is not None:
            return self._fused_step(token, cache, impl)
        h = _embed_token(lambda: self.backbone.embedding(token), token, v)   # (b, m)
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
        # The scan step's arguments are the same buffers at every token, so the front door's checks,
        # which read only their types, shapes, dtypes and devices, cannot change their verdict after
        # the first call: that call goes through impls.selective_state_update, later ones straight to
        # the implementation (a wrong output shape or dtype would still make out_proj's addmm_ raise).
        step_fn = cache.checked.get(impl)
        residual = stream.residual
        try:
            torch.index_select(self.backbone.embedding.weight, 0, token, out=residual)   # (b, m)
        except IndexError:   # before the cache changes (the residual buffer is rewritten every step)
            _embed_token(lambda: self.backbone.embedding(token), token, self.config.padded_vocab_size)
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
                  "recurrent" runs ``prefill`` (one scan) then one ``step`` per token
            impl: the scan implementation (None: the interface default); in "recurrent" mode also the
                  step implementation unless step_impl is given
            step_impl: the step implementation for "recurrent" (None: impl, or "recurrent" when impl is None);
                  an implementation without a step raises NotImplementedError naming those with one
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
        _check_ids(input_ids, "generate", self.config.vocab_size)
        T = _check_count(max_new_tokens, "generate: max_new_tokens")
        eos, pad = _check_sampling(self.config.padded_vocab_size, do_sample, temperature, top_k, top_p,
                                   generator, eos_token_id, pad_token_id)
        b, l = input_ids.shape
        mask = _check_mask(attention_mask, input_ids, "generate")
        if mode == "recurrent":
            step_impl = impl if step_impl is None else step_impl
            _check_step_impl(STEP_DEFAULT if step_impl is None else step_impl)
        if mode == "reforward":
            full_mask = None
            if mask is not None:
                full_mask = torch.ones(b, l + T, dtype=mask.dtype, device=mask.device)
                full_mask[:, :l] = mask

            def logits_at(tokens, t):   # the logits that choose tokens[:, t]
                return self._forward(tokens[:, :t], impl, None if full_mask is None else full_mask[:, :t],
                                     num_last_tokens=1)[:, -1]
        else:
            cache = None

            def logits_at(tokens, t):
                nonlocal cache
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

        "official": ``config.json`` (the official fields, then the unknown ones kept from loading) and
            ``pytorch_model.bin`` (torch.save of the state dict, lm_head.weight included, as the
            official save_pretrained does), or ``model.safetensors`` with safe_serialization=True;
        "transformers": ``config.json`` in transformers' MambaConfig fields (official_to_transformers)
            and the weights under transformers' names (backbone.embeddings.*), ``model.safetensors``
            unless safe_serialization=False: a folder transformers' MambaForCausalLM.from_pretrained loads.

        safetensors stores no shared tensors, so a tied lm_head.weight is left out of it.
        layout and safe_serialization are keyword-only (as in Mamba2LM.save_pretrained): a positional
        second argument is a TypeError, never silently taken for the other one.
        Raises ValueError for an unknown layout, or a model transformers cannot express (LayerNorm).
        """
        if layout not in LAYOUTS:
            raise ValueError(f"save_pretrained: layout: expected one of {LAYOUTS}, got {layout!r}")
        if safe_serialization is None:
            safe_serialization = layout == "transformers"   # what each layout's own save_pretrained writes
        if layout == "official":
            config = self.config.to_dict()
        else:
            config = {**official_to_transformers(self.config), "dtype": str(self.dtype).removeprefix("torch.")}
        state = self.state_dict()
        if safe_serialization and self.config.tie_embeddings:
            state.pop("lm_head.weight")
        names = rename_weights(state, "official", layout)
        state = {names[k]: v for k, v in state.items()}
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2)
        if safe_serialization:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, WEIGHTS_SAFETENSORS),
                      metadata={"format": "pt"})
        else:
            torch.save(state, os.path.join(folder, WEIGHTS_BIN))

    @classmethod
    def from_pretrained(cls, folder, dtype=None):
        """Load a local checkpoint folder in either layout, official (state-spaces/mamba-*) or
        transformers' (state-spaces/mamba-*-hf, or any MambaForCausalLM.save_pretrained): config.json
        plus model.safetensors (preferred), sharded safetensors (model.safetensors.index.json) or
        pytorch_model.bin. Nothing is downloaded.

        Everything is checked before any tensor is allocated: the config's layout and size fields
        (config_from_dict), then every parameter's name and shape, read from the weight file's header
        (stored_shapes), against those the config implies (check_weight_shapes).

        Args:
            folder: path of the folder; dtype: build the model in this dtype, so the weights are copied
                into it without passing through float32 (None: float32)
        Raises:
            FileNotFoundError if the folder lacks config.json or a weight file; ValueError for a file
            given for the folder, a config
            in neither layout, a missing size field, a size that is not an integer, a weight file that
            cannot be read (named), or a shape the config does not imply; KeyError on missing or
            unexpected parameter names; TypeError for a dtype that is not a torch.dtype. A Mamba-2
            config (NotImplementedError in the official layout, ValueError in transformers') names
            impls.models.mamba2.Mamba2LM.
        """
        check_dtype_arg("from_pretrained", dtype)
        config, layout = read_config(folder)
        files = weight_files(folder)
        shapes = stored_shapes(files)
        # The names say their own layout (backbone.embedding against backbone.embeddings), so weights
        # under either name load with either config, as transformers' own loader also accepts both.
        names_layout = weights_layout(shapes) or layout
        check_weight_shapes(config, shapes, names_layout)
        model = cls(config) if dtype is None else cls(config).to(dtype)   # before the copy: no float32 on the way
        state = load_weights(files)
        names = rename_weights(state, names_layout, "official")
        model.load_official_state_dict({names[k]: v for k, v in state.items()})
        return model

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
