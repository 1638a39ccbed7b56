"""Checkpoint folders, in the two layouts every model here reads and writes: what is the same for all models.

A checkpoint folder is ``config.json`` beside the weights (``model.safetensors``, its shards listed
in ``model.safetensors.index.json``, or ``pytorch_model.bin``). Two layouts of the same weights exist:
the official one (state-spaces/mamba-*, the mamba_ssm code) and transformers' (its MambaForCausalLM,
Mamba2ForCausalLM). Each model keeps its own table of what differs between them (config field names,
weight names) beside its config, in its own file; the functions here read those tables:

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
    """from_pretrained's dtype: None or a torch.dtype (a string such as "float16" is refused, not guessed)."""
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"{where}: dtype: expected a torch.dtype (e.g. torch.float16) or None, got {dtype!r}")


def few(items, k=8):
    """The first k items of a list, with " ..." when there are more: for error messages."""
    return f"{list(items)[:k]}{' ...' if len(items) > k else ''}"


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


def read_config_json(folder):
    """The dict in folder/config.json (config_path's errors for a missing folder or file)."""
    with open(config_path(folder)) as f:
        return json.load(f)


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
