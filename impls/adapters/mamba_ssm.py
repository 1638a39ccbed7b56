"""The official kernels (the ``mamba_ssm`` package) behind our interfaces: Mamba-1 first, then
Mamba-2's SSD. Both are registered by impls/adapters/__init__.py only where ``mamba_ssm``
imports and CUDA is available; on any other machine the names are absent.

## Mamba-1

    selective_scan           mamba_ssm.ops.selective_scan_interface.selective_scan_fn (CUDA)
    selective_state_update   mamba_ssm.ops.triton.selective_state_update.selective_state_update (Triton)

The official signatures are ours (the interface was modelled on them), so little is translated:

- device: the suite builds its inputs on the CPU; they are copied to DEVICE, and the results (and
  the stepped state) copied back. The copies are outside the kernels and do not change a value.
- D and delta_bias: the kernel requires float32; they are cast (exact for every input dtype).
- initial_state: ``selective_scan_fn`` has none (Mamba-1 has no chunked prefill): a declared gap,
  ``initial_state=False``; the suite skips those cases with that reason.
- float64: the CUDA kernel is compiled for float32, float16 and bfloat16 only: a declared gap.

Known official limitations, run and reported as expected failures by
``--xfails-file impls/adapters/xfails/mamba_ssm.txt`` (one line each, with the reason): last_state is
wrong when B is constant, a (d, n) tensor, because the kernel folds B into the output term
(equivalence/test_mamba_ssm.py checks it against the loop, channel by channel).

## Mamba-2 SSD

    ssd_scan          mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined (Triton)
    ssd_state_update  mamba_ssm.ops.triton.selective_state_update.selective_state_update (Triton)

equivalence/test_ssd_adapters.py checks the translation on the CPU through a stand-in package.

Our SSD signatures are the official ones, so little is translated:

- device: the suite builds its inputs on the CPU; they are copied to DEVICE, and the results (and
  the stepped state) copied back. The copies are outside the kernels and change no value.
- A, D, dt_bias: passed as float32 (exact for every accepted input dtype); the kernels compute in
  float32.
- the step: the official step is Mamba-1's ``selective_state_update`` with a head dimension, and
  takes the "tied" form ``Mamba2.step`` builds (A (h, p, n), dt (b, h, p), dt_bias and D (h, p));
  our untied arguments are expanded to it with zero strides, as ``Mamba2.step`` does.

Declared gaps (the suite skips those cases, naming the gap):

- float64: the Triton kernels are written for float32, float16 and bfloat16.
- dt_limit in the step: the official step has none (``Mamba2.step`` ignores dt_limit while the
  forward applies it); any dt_limit other than the default is refused.
- packed sequences (seq_idx, cu_seqlens, return_varlen_states): not yet in our interface; and there
  are no per-sequence initial states in the official kernel (initial_states reaches only the first
  sequence of a row).

Known official bugs, run and reported as expected failures by ``--xfails-file
impls/adapters/xfails/mamba_ssm_ssd.txt`` (one line each, with the reason).
"""

import torch

DEVICE = "cuda"   # tests of the adapter's translation without a GPU set "cpu" (with a stand-in package)

WRAPS = "mamba_ssm"   # the package whose version the pytest header shows beside ours


def _to(t, dtype=None):
    return None if t is None else t.to(device=DEVICE, dtype=dtype or t.dtype)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False):
    """The official CUDA selective scan.

    Args:
        u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l) or (b, g, n, l); D, delta_bias: (d,)
        initial_state: must be None (a declared gap)
    Returns:
        y: (b, d, l) in u's dtype on u's device, or (y, last_state (b, d, n) float32)
    """
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    if initial_state is not None:  # the registry refuses it first; a direct call must not drop it
        raise NotImplementedError("mamba_ssm: selective_scan_fn has no initial_state")
    out = selective_scan_fn(_to(u), _to(delta), _to(A), _to(B), _to(C), _to(D, torch.float32), _to(z),
                            _to(delta_bias, torch.float32), delta_softplus, return_last_state)
    if return_last_state:
        y, last = out
        return y.to(u.device), last.to(u.device)
    return out.to(u.device)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """The official Triton decoding step, updating ``state`` in place.

    Args:
        state: (b, d, n) float32; x, dt, z: (b, d); A: (d, n); B, C: (b, n) or (b, g, n); D, dt_bias: (d,)
    Returns:
        y: (b, d) in x's dtype
    """
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update as step

    s = _to(state)
    y = step(s, _to(x), _to(dt), _to(A), _to(B), _to(C), _to(D, torch.float32), _to(z),
             _to(dt_bias, torch.float32), dt_softplus)
    if s is not state:
        state.copy_(s)
    return y.to(x.device)


def _refuse(where, x, no_varlen=(), dt_limit=None):
    if any(v is not None and v is not False for v in no_varlen):
        raise NotImplementedError(f"mamba_ssm {where}: seq_idx, cu_seqlens and return_varlen_states are not "
                                  "in this interface yet")
    if x.dtype == torch.float64:
        raise NotImplementedError(f"mamba_ssm {where}: no float64 kernels (float64 input given)")
    if dt_limit is not None and tuple(dt_limit) != (0.0, float("inf")):
        raise NotImplementedError(f"mamba_ssm {where}: the official step has no dt_limit "
                                  f"(dt_limit={tuple(dt_limit)} given)")


def ssd_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
             cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False,
             return_varlen_states=False):
    """The official chunked SSD scan, ``mamba_chunk_scan_combined``.

    Args:
        x, z: (b, l, h, p); dt: (b, l, h); A: (h,); B, C: (b, l, g, n); D: (h,) or (h, p); dt_bias: (h,);
        initial_states: (b, h, p, n); chunk_size: positive int
    Returns:
        out: (b, l, h, p) in x's dtype on x's device, or (out, final_states (b, h, p, n) float32)
    Raises:
        NotImplementedError: float64 inputs, packed sequences.
    """
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    _refuse("mamba_chunk_scan_combined", x, (seq_idx, cu_seqlens, return_varlen_states))
    f = torch.float32
    result = mamba_chunk_scan_combined(_to(x), _to(dt), _to(A, f), _to(B), _to(C), chunk_size, D=_to(D, f),
                                       z=_to(z), dt_bias=_to(dt_bias, f), initial_states=_to(initial_states),
                                       dt_softplus=dt_softplus, dt_limit=tuple(dt_limit),
                                       return_final_states=return_final_states)
    if return_final_states:
        out, final_states = result
        return out.to(x.device), final_states.to(x.device)
    return result.to(x.device)


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                     dt_limit=(0.0, float("inf"))):
    """The official Triton decoding step, updating ``state`` in place.

    Args:
        state: (b, h, p, n) float32; x, z: (b, h, p); dt: (b, h); A: (h,); B, C: (b, g, n);
        D: (h,) or (h, p); dt_bias: (h,); dt_limit: the default only (a gap)
    Returns:
        y: (b, h, p) in x's dtype
    Raises:
        NotImplementedError: a dt_limit other than the default, float64 inputs.
    """
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update as step

    _refuse("selective_state_update", x, dt_limit=dt_limit)
    h, p, n = state.shape[1:]
    f = torch.float32
    # the tied form Mamba2.step passes: zero-stride views over p (and n for A)
    A_tied = _to(A, f)[:, None, None].expand(h, p, n)
    dt_tied = _to(dt)[..., None].expand(*dt.shape, p)
    bias_tied = None if dt_bias is None else _to(dt_bias, f)[:, None].expand(h, p)
    D_tied = None if D is None else (_to(D, f)[:, None].expand(h, p) if D.dim() == 1 else _to(D, f))
    s = _to(state)
    y = step(s, _to(x), dt_tied, A_tied, _to(B), _to(C), D_tied, _to(z), bias_tied, dt_softplus)
    if s is not state:
        state.copy_(s)
    return y.to(x.device)
