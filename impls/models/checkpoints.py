"""Checkpoint folders, in the two layouts every model here reads and writes: what is the same for all models.

A checkpoint folder is ``config.json`` beside the weights (``model.safetensors``, its shards listed
in ``model.safetensors.index.json``, or ``pytorch_model.bin``). Two layouts of the same weights exist:
the official one (state-spaces/mamba-*, the mamba_ssm code) and transformers' (its MambaForCausalLM,
Mamba2ForCausalLM). Each model keeps its own table of what differs between them (config field names,
weight names) beside its config, in its own file; the functions here read those tables:

    folder_model / check_folder_model   which model a config.json is for; another model's is named
    OFFICIAL_DEFAULTS / set_official_fields / read_official_config   the official MambaConfig's
                                     top-level fields, checked, for every model with heads
    stack_shapes                     the stack's parameter shapes around a mixer's
    layout_markers / config_layout   which layout a config.json is in, from the fields only one has
    require_fields / map_config      its size fields present; its fields renamed by a table
    rename_weights / weights_layout  weight names between layouts; which layout a file's names are in
    weight_files / stored_shapes     the files of a folder; every tensor's shape from the file headers
    check_weight_shapes              names and shapes against those a config implies, before building
    load_weights / write_checkpoint  the tensors in; a folder out

Nothing here builds a model, and nothing runs pickled code (torch.load with weights_only=True) or
fetches anything from a hub. Errors name the file, the field or the weight.
"""

import json
import numbers
import os

import torch

from ..frontdoor import INPUT_DTYPES

CONFIG_NAME = "config.json"
WEIGHTS_BIN = "pytorch_model.bin"
WEIGHTS_SAFETENSORS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"   # sharded safetensors (large transformers checkpoints)
LAYOUTS = ("official", "transformers")


def check_int(where, name, value):
    """value if it is an int (bool excluded: True is no size); ValueError naming the field otherwise.
    config.json sizes are read as given: 2.5 or "2" is refused, not truncated to 2."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{where}: {name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def check_dtype_arg(where, dtype):
    """from_pretrained's dtype: None or one of the scans' input dtypes (INPUT_DTYPES). A string such as
    "float16" is refused, not guessed, and so is a dtype the models cannot run in (int64 would fail
    inside nn.Module.to, complex64 in the first scan, float8 in the first norm)."""
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{where}: dtype: expected a torch.dtype (e.g. torch.float16) or None, got {dtype!r}")
    if dtype not in INPUT_DTYPES:
        raise TypeError(f"{where}: dtype: expected one of {', '.join(str(d) for d in INPUT_DTYPES)} or None, "
                        f"got {dtype}")


def few(items, k=8):
    """The first k items of a list, with " ..." when there are more: for error messages."""
    return f"{list(items)[:k]}{' ...' if len(items) > k else ''}"


def ssm_cfg_dict(where, ssm_cfg):
    """An official config's ssm_cfg as a new dict (None: {}); ValueError naming it for anything else."""
    if ssm_cfg is None:
        return {}
    if not isinstance(ssm_cfg, dict):
        raise ValueError(f"{where}: ssm_cfg must be a dict of the mixer's options, got {ssm_cfg!r}")
    return dict(ssm_cfg)


def is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_ssm_cfg(where, ssm_cfg, ssm_defaults, int_keys, d_model):
    """Check an official ssm_cfg (a dict, its layer already checked) against its mixer's keys and
    defaults, before anything is built, the same way for every model: a misspelled key would
    otherwise leave its default in place silently, and expand "2" would make d_inner "2" * d_model.

    Args:
        ssm_defaults: the mixer's ssm_cfg keys and their official defaults (expand among them); a key
            whose default is a bool must be a bool ("false" is no false), one whose default is a
            float a number
        int_keys: the keys that are sizes: integers (check_int), at least 1
        d_model: m, checked >= 1 already
    Returns:
        (ssm_cfg merged over ssm_defaults with int_keys as ints, d_inner = expand * d_model as an int)
    Raises:
        ValueError naming the key: an unknown key, a size that is not an int or is below 1, a bool or
        number of another type, an expand with expand * d_model not a positive integer (1.3 * 4 is
        refused, not truncated).
    """
    unknown = set(ssm_cfg) - set(ssm_defaults) - {"layer"}
    if unknown:
        raise ValueError(f"{where}: unknown ssm_cfg keys {sorted(unknown)}; known: {sorted(ssm_defaults)}")
    s = {**ssm_defaults, **ssm_cfg}
    for k, default in ssm_defaults.items():
        if isinstance(default, bool) and not isinstance(s[k], bool):
            raise ValueError(f"{where}: ssm_cfg.{k} must be true or false, got {s[k]!r}")
        if (k == "expand" or isinstance(default, float)) and not is_number(s[k]):
            raise ValueError(f"{where}: ssm_cfg.{k} must be a number, got {s[k]!r} ({type(s[k]).__name__})")
    sizes = {k: check_int(where, f"ssm_cfg.{k}", s[k]) for k in int_keys}
    small = {k: v for k, v in sizes.items() if v < 1}
    if small:
        raise ValueError(f"{where}: sizes must be >= 1, got {small}")
    d_inner = int(s["expand"] * d_model)
    if d_inner < 1 or d_inner != s["expand"] * d_model:
        raise ValueError(f"{where}: d_inner = expand * d_model = {s['expand']} * {d_model} must be a positive "
                         f"integer")
    return {**s, **sizes}, d_inner


# ---------------------------------------------------------------------------- which model a folder is

# The models here, by the official config's ssm_cfg.layer: what a folder of each is called in
# another model's errors, and its loader.
MODELS = {"Mamba1": ("Mamba-1", "impls.models.mamba.MambaLM"),
          "Mamba2": ("Mamba-2", "impls.models.mamba2.Mamba2LM"),
          "Mamba3": ("Mamba-3", "impls.models.mamba3.Mamba3LM")}
# transformers' model_type of each that transformers has (5.24.0 has no Mamba-3 model)
TRANSFORMERS_MODEL_TYPES = {"mamba": "Mamba1", "mamba2": "Mamba2"}
DEFAULT_LAYER = "Mamba1"   # the official MambaConfig's, when ssm_cfg names no layer (mamba-130m's is {})


def model_hint(layer):
    """"a Mamba-2 checkpoint (load it with impls.models.mamba2.Mamba2LM)" for an official layer name."""
    if layer not in MODELS:
        return f"a layer no model here implements (known: {', '.join(MODELS)})"
    name, loader = MODELS[layer]
    return f"a {name} checkpoint (load it with {loader})"


def folder_model(cfg):
    """The official layer name ("Mamba1", "Mamba2", ...) of the model a config.json dict is for, from
    transformers' model_type or the official ssm_cfg.layer (DEFAULT_LAYER when ssm_cfg names none);
    None when it says neither (another model's fields, or none)."""
    if cfg.get("model_type") is not None:
        return TRANSFORMERS_MODEL_TYPES.get(cfg["model_type"])
    if "ssm_cfg" in cfg and isinstance(cfg["ssm_cfg"] or {}, dict):
        return (cfg["ssm_cfg"] or {}).get("layer", DEFAULT_LAYER)
    return None


def check_folder_model(cfg, folder, layer):
    """ValueError naming the model and its loader when the config.json dict of ``folder`` is another
    model's than the official layer ``layer``'s (folder_model); nothing when it is, or says neither."""
    other = folder_model(cfg)
    if other is None or other == layer:
        return
    if cfg.get("model_type") is not None:
        said = f"model_type {cfg['model_type']!r}"
    else:
        said = f"ssm_cfg.layer is {other!r}" + ("" if "layer" in (cfg["ssm_cfg"] or {}) else " (the official default)")
    raise ValueError(f"from_pretrained({folder!r}): {said}: {model_hint(other)}, not a {MODELS[layer][0]} one")


# ---------------------------------------------------------------------------- the official config

# The official MambaConfig's top-level fields (mamba_ssm/models/config_mamba.py), in its order,
# with its defaults; ssm_cfg holds the mixer's own keys and its layer name.
OFFICIAL_DEFAULTS = dict(d_model=2560, d_intermediate=0, n_layer=64, vocab_size=50277, ssm_cfg=None,
                         attn_layer_idx=None, attn_cfg=None, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                         pad_vocab_size_multiple=8, tie_embeddings=True, norm_epsilon=1e-5)
OFFICIAL_FIELDS = tuple(OFFICIAL_DEFAULTS)
OFFICIAL_SIZES = ("d_model", "n_layer", "vocab_size", "ssm_cfg")   # what a checkpoint's config must state


def set_official_fields(config, layer, ssm_defaults, int_keys, fields):
    """Check the official config ``fields`` (a dict of OFFICIAL_FIELDS; OFFICIAL_DEFAULTS for those
    absent) of a model with heads (Mamba-2, Mamba-3) and set them on ``config``, with the sizes every
    such model resolves: d_inner (d = expand * d_model), nheads (h = d / headdim), padded_vocab_size (v).

    Args:
        config: the object to set them on (its class name starts the errors)
        layer: the official ssm_cfg.layer of the model ("Mamba2", ...)
        ssm_defaults: the mixer's ssm_cfg keys and their official defaults (expand, headdim, ngroups among them)
        int_keys: the ssm_cfg keys that are sizes: integers, at least 1
    Returns:
        the ssm_cfg merged over ssm_defaults, for the caller's own keys
    Raises:
        TypeError: a field that is not an official one;
        ValueError: a size that is not an int (the field named), a size below 1, an ssm_cfg that is
            not a dict or fails check_ssm_cfg (an unknown key, a key of the wrong type), d_inner not a
            multiple of headdim, nheads not a multiple of ngroups;
        NotImplementedError: another layer (named, with its loader), attention or MLP layers.
    """
    where = type(config).__name__
    unknown = set(fields) - set(OFFICIAL_FIELDS)
    if unknown:
        raise TypeError(f"{where}: unexpected field(s) {sorted(unknown)}; the official fields: {list(OFFICIAL_FIELDS)}")
    f = {**OFFICIAL_DEFAULTS, **fields}
    # sizes as given: 2.5 or "2" in a config.json is refused, not truncated (check_int)
    for k in ("d_model", "d_intermediate", "n_layer", "vocab_size", "pad_vocab_size_multiple"):
        setattr(config, k, check_int(where, k, f[k]))
    # tuples as lists, as config.json gives them back, so a saved config loads equal
    config.ssm_cfg = {"layer": layer, **{k: list(v) if isinstance(v, tuple) else v
                                         for k, v in ssm_cfg_dict(where, f["ssm_cfg"]).items()}}
    config.attn_layer_idx, config.attn_cfg = list(f["attn_layer_idx"] or []), dict(f["attn_cfg"] or {})
    config.rms_norm, config.residual_in_fp32 = bool(f["rms_norm"]), bool(f["residual_in_fp32"])
    config.fused_add_norm, config.tie_embeddings = bool(f["fused_add_norm"]), bool(f["tie_embeddings"])
    config.norm_epsilon = float(f["norm_epsilon"])

    if config.ssm_cfg["layer"] != layer:
        raise NotImplementedError(f"{where}: ssm_cfg.layer = {config.ssm_cfg['layer']!r}: this is the {MODELS[layer][0]} "
                                  f"model; that is {model_hint(config.ssm_cfg['layer'])}")
    if config.attn_layer_idx or config.d_intermediate:
        raise NotImplementedError(f"{where}: attn_layer_idx = {config.attn_layer_idx}, d_intermediate = "
                                  f"{config.d_intermediate}: hybrid attention and MLP layers are not implemented")
    small = {k: getattr(config, k) for k in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple")
             if getattr(config, k) < 1}
    if small:
        raise ValueError(f"{where}: sizes must be >= 1, got {small}")
    s, config.d_inner = check_ssm_cfg(where, config.ssm_cfg, ssm_defaults, int_keys, config.d_model)
    config.expand = s["expand"]
    if config.d_inner % s["headdim"]:
        raise ValueError(f"{where}: d_inner = expand * d_model = {config.expand} * {config.d_model} = "
                         f"{config.d_inner} must be a multiple of headdim = {s['headdim']}")
    config.nheads = config.d_inner // s["headdim"]
    if config.nheads % s["ngroups"]:
        raise ValueError(f"{where}: nheads = {config.nheads} (d_inner / headdim) must be a multiple of "
                         f"ngroups = {s['ngroups']}")
    m = config.pad_vocab_size_multiple
    config.padded_vocab_size = config.vocab_size + (-config.vocab_size) % m
    return s


def official_dict(config):
    """A config's official config.json contents (OFFICIAL_FIELDS)."""
    return {k: getattr(config, k) for k in OFFICIAL_FIELDS}


def same_config(config, other):
    """Configs of one class with the same official fields."""
    return type(other) is type(config) and config.to_dict() == other.to_dict()


def config_repr(config):
    return f"{type(config).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in config.to_dict().items()) + ")"


def read_official_config(cfg, folder, config_class):
    """``config_class(**cfg)`` for a config.json dict in the official layout, its size fields
    (OFFICIAL_SIZES) and only official fields present: ValueError naming what is missing or unknown
    (and the model_type it has, if any) before anything is built."""
    missing = [k for k in OFFICIAL_SIZES if k not in cfg]
    if missing:
        model_type = cfg.get("model_type")
        raise ValueError(f"from_pretrained({folder!r}): config.json: missing the official size fields {missing} "
                         f"(a {config_class.__name__} needs {list(OFFICIAL_SIZES)})"
                         + (f"; its model_type is {model_type!r}" if model_type else ""))
    unknown = set(cfg) - set(OFFICIAL_FIELDS)
    if unknown:
        raise ValueError(f"from_pretrained({folder!r}): unknown official config fields {sorted(unknown)}")
    return config_class(**cfg)


def stack_shapes(config, mixer, embedding="backbone.embedding.weight"):
    """Parameter name -> shape of the official stack (MixerModel and the LM head) of ``config``, from
    the config alone: the embedding (under the name ``embedding``), per layer its norm and the mixer's
    parameters (``mixer``: name under "mixer." -> shape), norm_f, and lm_head.weight (a tied or
    safetensors checkpoint may omit it); with LayerNorm blocks (rms_norm false), their biases."""
    m, v = config.d_model, config.padded_vocab_size
    shapes = {embedding: (v, m)}
    for i in range(config.n_layer):
        p = f"backbone.layers.{i}."
        shapes[p + "norm.weight"] = (m,)
        shapes.update({p + "mixer." + k: shape for k, shape in mixer.items()})
    shapes.update({"backbone.norm_f.weight": (m,), "lm_head.weight": (v, m)})
    if not config.rms_norm:
        shapes.update({k[:-len("weight")] + "bias": shape for k, shape in shapes.items()
                       if k.endswith(("norm.weight", "norm_f.weight")) and ".mixer." not in k})
    return shapes


# ---------------------------------------------------------------------------- configs

def layout_markers(official_fields, table, transformers_extra):
    """The top-level fields found in one layout's config.json only: {"official": set, "transformers": set}.

    Args:
        official_fields: the official config's top-level fields
        table: official name -> transformers name (a mixer field written "ssm_cfg.<key>")
        transformers_extra: transformers' top-level fields outside the table
    """
    official = set(official_fields) | {k for k in table if "." not in k}
    hf = set(table.values()) | set(transformers_extra)
    return {"official": official - hf, "transformers": hf - official}


def config_layout(d, markers, size_fields):
    """Which layout a config.json dict is in, told by the fields only one of them has (``markers``,
    from layout_markers): "official", "transformers", or "both" (a converted checkpoint may keep its
    original fields beside transformers' ones, which transformers ignores; the model's reader then
    requires them to agree).

    Raises ValueError if it has neither layout's fields, naming each layout's missing ``size_fields``.
    """
    found = [layout for layout, fields in markers.items() if any(k in fields for k in d)]
    if len(found) > 1:
        return "both"
    if not found:
        raise ValueError("config: neither layout's size fields: " + "; ".join(
            f"{layout} needs {', '.join(k for k in fields if k not in d)}" for layout, fields in size_fields.items()))
    return found[0]


def require_fields(d, layout, size_fields):
    """ValueError naming the size fields (size_fields[layout]) that a config dict lacks or has as null."""
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


def read_json_object(path):
    """The dict in the JSON file at path; ValueError naming the file when it is not JSON, or JSON but
    not an object."""
    try:
        with open(path, encoding="utf-8") as f:   # JSON is UTF-8, whatever the locale
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"from_pretrained: {path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"from_pretrained: {path}: not valid JSON (not UTF-8 text: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"from_pretrained: {path}: expected a JSON object, got a {type(obj).__name__}")
    return obj


def read_config_json(folder):
    """The dict in folder/config.json (config_path's errors for a missing folder or file, and
    read_json_object's for one that is not a JSON object)."""
    return read_json_object(config_path(folder))


# ---------------------------------------------------------------------------- weights

def rename_weights(names, src, dst, prefixes):
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


def weights_layout(names, prefixes):
    """"official" or "transformers" from the names (the embedding's), or None if neither shows."""
    for official, hf in prefixes.items():
        if any(k.startswith(hf) for k in names):
            return "transformers"
        if any(k.startswith(official) for k in names):
            return "official"
    return None


class WeightNamesError(KeyError, ValueError):
    """Weight names missing from a checkpoint or unexpected in it: a KeyError (a lookup by name
    failed) and a ValueError (the file does not fit its config), so either ``except`` catches it."""

    def __str__(self):
        return str(self.args[0])


def check_weight_shapes(stored, layout, expected, optional, prefixes):
    """Check a checkpoint's names and shapes against those its config implies, before any model is built.

    Args:
        stored: name in ``layout`` -> shape, read from the files' headers (stored_shapes)
        expected: official name -> shape (the model's parameter_shapes(config))
        optional: official names that may be absent (lm_head.weight when the embeddings are tied)
        prefixes: the model's weight-name table (official -> transformers)
    Raises:
        WeightNamesError (a KeyError and a ValueError) naming missing and unexpected names;
        ValueError naming each shape that differs.
    """
    to_official = rename_weights(stored, layout, "official", prefixes)
    have = {to_official[k]: tuple(s) for k, s in stored.items()}
    missing = [k for k in expected if k not in have and k not in optional]
    unexpected = [k for k in have if k not in expected]
    if missing or unexpected:
        raise WeightNamesError(f"checkpoint (names read in the {layout} layout): missing {few(missing)}, "
                               f"unexpected {few(unexpected)}")
    wrong = [f"{k}: config gives {expected[k]}, file has {s}" for k, s in have.items() if s != expected[k]]
    if wrong:
        raise ValueError(f"checkpoint: {len(wrong)} shape(s) differ from the config: "
                         + "; ".join(wrong[:8]) + (" ..." if len(wrong) > 8 else ""))


def safetensors_error(path, e):
    return ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})")


def weight_files(folder):
    """The weight files of a folder, in the order they are preferred: model.safetensors, the shards of
    model.safetensors.index.json, or pytorch_model.bin. FileNotFoundError if none."""
    st, index, bin_ = (os.path.join(folder, n) for n in (WEIGHTS_SAFETENSORS, WEIGHTS_INDEX, WEIGHTS_BIN))
    if os.path.isfile(st):
        return [st]
    if os.path.isfile(index):
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"from_pretrained: {index}: expected a \"weight_map\" object of tensor names to "
                             f"shard files, got {str(weight_map)[:80]}")
        return [os.path.join(folder, s) for s in sorted(set(weight_map.values()))]
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
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(path, framework="pt") as f:
                    shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
            except SafetensorError as e:
                raise safetensors_error(path, e) from e
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
                raise safetensors_error(path, e) from e
        else:
            state.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    return state


def write_checkpoint(folder, config, state, safe_serialization):
    """Write ``config`` (a dict) as folder/config.json and ``state`` (name -> tensor) as
    model.safetensors (contiguous copies, since safetensors stores no strides) or, with
    safe_serialization False, pytorch_model.bin (torch.save)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    if safe_serialization:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in state.items()}, os.path.join(folder, WEIGHTS_SAFETENSORS),
                  metadata={"format": "pt"})
    else:
        torch.save(state, os.path.join(folder, WEIGHTS_BIN))
