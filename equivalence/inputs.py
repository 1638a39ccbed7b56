"""Family-neutral pieces of a case's inputs: dtypes by name, and the drawn float64 values turned
into the tensors an implementation receives (each family's cases.py draws the values)."""

import torch

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32, "f64": torch.float64}


def strided(x):
    """The same values as a non-contiguous view (every other element of a twice-as-long last axis)."""
    wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    wide[..., ::2] = x
    return wide[..., ::2]


def materialize(values, dtype=None, strided_views=False):
    """{argument: (float64 value, the dtype it is passed in) or None} -> {argument: tensor or None}.

    Each value is rounded to the dtype the implementation receives first, so that with
    ``dtype=torch.float64`` the oracle sees the very same values; ``strided_views``: as
    non-contiguous views."""
    out = {}
    for k, v in values.items():
        if v is None:
            out[k] = None
            continue
        t = v[0].to(v[1])
        t = t if dtype is None else t.to(dtype)
        out[k] = strided(t) if strided_views else t
    return out


def chunk_size_within(chunk_size, l, limits):
    """chunk_size raised so that l tokens span at most ``limits["chunks"]`` chunks (an interpreter's
    time grows with the number of programs, one per chunk and head); unchanged without that limit."""
    if "chunks" not in limits:
        return chunk_size
    return max(chunk_size, -(-l // limits["chunks"]))
