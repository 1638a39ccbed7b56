"""transformers' Mamba-2 pure-PyTorch chunked SSD behind our interface: the CPU peer of ``chunked``.

transformers (5.24, ``transformers/models/mamba2/modeling_mamba2.py``) ships two pure-PyTorch
functions with the official signatures, used by ``Mamba2Mixer`` when mamba_ssm is not installed:

    mamba2_chunk_scan              the chunked SSD scan (the torch path of Mamba2Mixer.forward)
    mamba2_selective_state_update  the decode step (the torch path of Mamba2Mixer's recurrent form)

Both are wrapped by ``use_kernel_func_from_hub_with_fallback``, which would hand the call to
mamba_ssm's kernels where that package imports, and drops keyword arguments the chosen function
does not name. This adapter calls the undecorated torch functions (``inspect.unwrap``), so what is
under test is always transformers' own PyTorch code, on any machine.

What is translated, explicitly (letters as in impls/ssd/loop.py):

- layout: the same as ours ((b, l, h, p), (b, l, h), (b, l, g, n)); nothing is transposed.
- z: ``mamba2_chunk_scan`` has no z parameter and swallows one passed by keyword (``**kwargs``):
  transformers gates in its own ``MambaRMSNormGated`` (y · silu(z), in float32, before the norm).
  The adapter applies that gate, in the same order and dtype, to the scan's float32 output.
- out: the scan returns float32 whatever the input; it is cast to x's dtype here.
- final_states: always requested from the scan (``return_final_states=True``), returned when asked.
- the step: transformers' step takes the official "tied" form (A (h, p, n), dt (b, h, p), dt_bias
  and D (h, p)), as ``Mamba2Mixer`` builds it; the adapter expands our untied arguments to that
  form with zero strides, exactly as the mixer does. Its y · silu(z) is its own.

Declared gaps (the suite skips those cases, naming the gap, instead of this adapter filling in):

- D of shape (h, p) in the scan: ``D[..., None] * x`` broadcasts only a (h,) D (a (h, p) D raises a
  RuntimeError inside transformers). The step takes (h, p) and is not affected.
- float64: the scan casts x, B and C to float32 (``hidden_states.float()``); it never computes in
  float64.
- dt_limit in the step: ``mamba2_selective_state_update`` has none (as the official step).
- seq_idx, cu_seqlens, return_varlen_states: transformers' torch path refuses packed sequences.

Registered on request: importing this module registers it as ``transformers`` in the ssd family
(``pytest --ssd-impl impls.adapters.transformers_ssd``), not by default, because of its known bugs
(impls/adapters/xfails/transformers_ssd.txt, each with its reason; equivalence/test_ssd_adapters.py
pins them): a NaN or inf in a later token's input reaches earlier outputs (its within-chunk mask is
a multiplication, and 0 x NaN is NaN), and after a token with a large dt A the decays to a chunk's
end lose their digits (taken as exp(cumsum_end - cumsum_s)). transformers itself is imported on
first call (a dev dependency).
"""

import functools
import inspect

import torch
import torch.nn.functional as F

import impls

WRAPS = "transformers"   # the package whose version the pytest header shows beside ours


@functools.lru_cache(maxsize=None)
def torch_functions():
    """transformers' two torch functions, without the hub/mamba_ssm dispatching decorator."""
    from transformers.models.mamba2 import modeling_mamba2 as m

    return inspect.unwrap(m.mamba2_chunk_scan), inspect.unwrap(m.mamba2_selective_state_update)


def _refuse(where, D, x, no_varlen=(), dt_limit=None):
    if any(v is not None and v is not False for v in no_varlen):
        raise NotImplementedError(f"transformers {where}: no packed sequences (seq_idx, cu_seqlens, "
                                  "return_varlen_states)")
    if x.dtype == torch.float64:
        raise NotImplementedError(f"transformers {where}: computes in float32 only (float64 input given)")
    if where == "mamba2_chunk_scan" and D is not None and D.dim() == 2:
        raise NotImplementedError(f"transformers {where}: D of shape (h,) only (D of shape {tuple(D.shape)} given)")
    if dt_limit is not None and tuple(dt_limit) != (0.0, float("inf")):
        raise NotImplementedError(f"transformers {where}: no dt_limit (dt_limit={tuple(dt_limit)} given)")


def ssd_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
             cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False,
             return_varlen_states=False):
    """The SSD scan through transformers' ``mamba2_chunk_scan`` (pure PyTorch).

    Args:
        x, z: (b, l, h, p); dt: (b, l, h); A: (h,); B, C: (b, l, g, n); D: (h,) (not (h, p): a gap);
        dt_bias: (h,); initial_states: (b, h, p, n); chunk_size: positive int
    Returns:
        out: (b, l, h, p) in x's dtype, or (out, final_states (b, h, p, n) float32)
    Raises:
        NotImplementedError: for the declared gaps listed in the module docstring.
    """
    _refuse("mamba2_chunk_scan", D, x, (seq_idx, cu_seqlens, return_varlen_states))
    scan, _ = torch_functions()
    out, final_states = scan(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, initial_states=initial_states,
                             dt_softplus=dt_softplus, dt_limit=tuple(dt_limit), return_final_states=True)
    if z is not None:  # as MambaRMSNormGated: in float32, y * silu(z)
        out = out * F.silu(z.to(torch.float32))
    out = out.to(x.dtype)
    return (out, final_states) if return_final_states else out


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                     dt_limit=(0.0, float("inf"))):
    """One decoding step through transformers' ``mamba2_selective_state_update``, in place.

    Args:
        state: (b, h, p, n); x, z: (b, h, p); dt: (b, h); A: (h,); B, C: (b, g, n); D: (h,) or (h, p);
        dt_bias: (h,); dt_limit: the default only (a gap)
    Returns:
        y: (b, h, p) in x's dtype
    Raises:
        NotImplementedError: for a dt_limit other than the default, and float64 inputs.
    """
    _refuse("mamba2_selective_state_update", D, x, dt_limit=dt_limit)
    _, step = torch_functions()
    h, p, n = state.shape[1], state.shape[2], state.shape[3]
    # the tied form Mamba2Mixer passes: zero-stride views over p (and n for A)
    A_tied = A[:, None, None].expand(h, p, n)
    dt_tied = dt[..., None].expand(*dt.shape, p)
    bias_tied = None if dt_bias is None else dt_bias[:, None].expand(h, p)
    D_tied = None if D is None else (D[:, None].expand(h, p) if D.dim() == 1 else D)
    y = step(state, x, dt_tied, A_tied, B, C, D_tied, dt_bias=bias_tied, dt_softplus=dt_softplus, z=z)
    return y.to(x.dtype)


if "transformers" not in impls.names("ssd"):
    impls.adapters.register_transformers_ssd()
