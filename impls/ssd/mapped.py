"""Mamba-1 implementations serving the SSD scan through the exact mapping d = h p.

An SSD head is p Mamba-1 channels that share one decay rate and one step size, so the SSD scan is
a Mamba-1 selective scan with (as the official ``ssd_selective_scan`` maps it onto the Mamba-1 kernel)

    u      = x arranged as (b, d, l), channel c = head * p + c_p
    delta  = the effective dt (dt + dt_bias, softplus, dt_limit clamp) repeated over the p channels
             of each head; the Mamba-1 kernel is given no bias and no softplus, since it has no clamp
    A      = A_h repeated over the p channels and the n states: (d, n)
    B, C   = (b, g, n, l): g groups of d / g = (h / g) p consecutive channels, which are exactly the
             channels of the h / g heads of each SSD group
    D      = D repeated over p, or D (h, p) flattened; z as u; initial_states (b, h, p, n) as (b, d, n)

Everything is handed over in the compute dtype (x, z, B, C upcast exactly), so the Mamba-1
implementation computes what it would from the half inputs, and out is cast back to x's dtype.

``register_all()`` registers, in the "ssd" family and under its Mamba-1 name, every Mamba-1
implementation that supports grouped B/C, except names the SSD family keeps for its own
implementations (``RESERVED``: loop, recurrent and triton mean the native SSD ones there).
"""

import torch

from . import varlen
from ..frontdoor import INPUT_DTYPES, compute_dtype
from .loop import effective_dt

RESERVED = ("loop", "chunked", "recurrent", "triton")


def _channels(t):
    """(b, [l,] h, p) -> (b, h p, [l]): the Mamba-1 layout, channels first, time last."""
    return t.flatten(-2, -1).movedim(1, -1) if t.dim() == 4 else t.flatten(-2, -1)


def to_selective(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, dt_limit):
    """The Mamba-1 arguments of an SSD scan (x: (b, l, h, p) ...) or step (x: (b, h, p) ...).

    Returns a dict of selective_scan keyword arguments (u, delta, A, B, C, D, z, initial_state)
    for the scan, or of selective_state_update ones (x, dt, A, B, C, D, z) for the step, all in the
    compute dtype.
    """
    f = compute_dtype(x.dtype)
    h, p = x.shape[-2:]
    n = B.shape[-1]
    dt = effective_dt(dt, dt_bias, dt_softplus, dt_limit, f)                  # (b, [l,] h)
    delta = dt[..., None].expand(*dt.shape, p)                                # (b, [l,] h, p)
    args = dict(
        delta=_channels(delta).contiguous(),
        A=A.to(f)[:, None, None].expand(h, p, n).reshape(h * p, n),
        B=B.to(f).movedim(1, -1) if B.dim() == 4 else B.to(f),                # (b, g, n, l) or (b, g, n)
        C=C.to(f).movedim(1, -1) if C.dim() == 4 else C.to(f),
        D=None if D is None else (D.to(f)[:, None].expand(h, p) if D.dim() == 1 else D.to(f)).reshape(h * p),
        z=None if z is None else _channels(z.to(f)),
    )
    if x.dim() == 4:
        args.update(u=_channels(x.to(f)), initial_state=None if initial_states is None
                    else initial_states.to(f).reshape(-1, h * p, n))   # (b or nseq, d, n)
    else:
        args.update(x=_channels(x.to(f)), dt=args.pop("delta"))
    return args


def mapped_scan(name):
    """An ssd_scan (positional signature) that runs the Mamba-1 implementation ``name``."""
    import impls

    def ssd_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                 seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                 return_final_states=False, return_varlen_states=False):
        if seq_idx is not None or cu_seqlens is not None or return_varlen_states:
            # packed sequences: seq_idx rows packed into one cu_seqlens call of the Mamba-1 kernel
            return varlen.through_cu_seqlens(packed, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states,
                                                 seq_idx, cu_seqlens, dt_softplus, dt_limit, return_final_states,
                                                 return_varlen_states)
        b, l, h, p = x.shape
        args = to_selective(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, dt_limit)
        y, last = impls.selective_scan(**args, return_last_state=True, impl=name)
        out = y.movedim(-1, 1).reshape(b, l, h, p).to(x.dtype)
        return (out, last.reshape(b, h, p, -1)) if return_final_states else out

    def packed(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, cu_seqlens, dt_softplus, dt_limit):
        b, l, h, p = x.shape
        args = to_selective(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, dt_limit)
        y, last = impls.selective_scan(**args, return_last_state=True, cu_seqlens=cu_seqlens, impl=name)
        return y.movedim(-1, 1).reshape(b, l, h, p).to(x.dtype), last.reshape(-1, h, p, last.shape[-1])

    ssd_scan.__qualname__ = ssd_scan.__name__ = f"ssd_scan (through the d = h p mapping onto {name})"
    return ssd_scan


def mapped_step(name):
    """An ssd_state_update (positional signature) that runs the Mamba-1 step of ``name`` on the
    state seen as (b, h p, n): a view when it can be, else a copy written back."""
    import impls

    def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                         dt_limit=(0.0, float("inf")), state_batch_indices=None):
        b, h, p, n = state.shape           # b: the cache's slots with state_batch_indices
        args = to_selective(x, dt, A, B, C, D, z, dt_bias, None, dt_softplus, dt_limit)
        flat = state.view(b, h * p, n) if state.is_contiguous() else state.reshape(b, h * p, n).clone()
        indexed = {} if state_batch_indices is None else dict(state_batch_indices=state_batch_indices)
        y = impls.selective_state_update(flat, **args, **indexed, impl=name)
        if flat.data_ptr() != state.data_ptr():
            state.copy_(flat.view(b, h, p, n))
        return y.reshape(x.shape[0], h, p).to(x.dtype)

    return ssd_state_update


def _limits(limits):
    """Mamba-1 case limits (b, d, n, l) as SSD ones (b, l, h, p, n), with h p <= d."""
    if not limits:
        return None
    out = {k: limits[k] for k in ("b", "n", "l") if k in limits}
    if "d" in limits:
        out["h"] = min(8, limits["d"])
        out["p"] = max(1, limits["d"] // out["h"])
    return out


def register_all():
    """Register every grouped Mamba-1 implementation in the "ssd" family under its own name
    (names taken there already, and RESERVED ones, are left alone). Returns the names registered."""
    import impls

    added = []
    for name in impls.names():
        e = impls.get(name)
        if not e.supports["grouped"] or name in RESERVED or name in impls.names("ssd"):
            continue
        # an SSD input dtype maps to a Mamba-1 call in its compute dtype
        dtypes = tuple(t for t in INPUT_DTYPES if compute_dtype(t) in e.supports["dtypes"])
        impls.register(name, mapped_scan(name), step=mapped_step(name) if e.step else None, family="ssd",
                       dtypes=dtypes, gradients=e.supports["gradients"], initial_states=e.supports["initial_state"],
                       varlen=e.supports["varlen"], state_batch_indices=e.supports["state_batch_indices"],
                       deterministic=e.supports["deterministic"], batch_invariant=e.supports["batch_invariant"],
                       case_limits=_limits(e.supports["case_limits"]))
        added.append(name)
    return added
