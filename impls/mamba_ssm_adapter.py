"""The official Mamba-1 kernels (the ``mamba_ssm`` package) behind our interface.

    selective_scan           mamba_ssm.ops.selective_scan_interface.selective_scan_fn (CUDA)
    selective_state_update   mamba_ssm.ops.triton.selective_state_update.selective_state_update (Triton)

Registered by impls/__init__.py only where ``mamba_ssm`` imports and CUDA is available; on any
other machine the name is absent and ``pytest --impl mamba_ssm`` says so.

The official signatures are ours (the interface was modelled on them), so little is translated:

- device: the suite builds its inputs on the CPU; they are copied to DEVICE, and the results (and
  the stepped state) copied back. The copies are outside the kernels and do not change a value.
- D and delta_bias: the kernel requires float32; they are cast (exact for every input dtype).
- initial_state: ``selective_scan_fn`` has none (Mamba-1 has no chunked prefill): a declared gap,
  ``initial_state=False``; the suite skips those cases with that reason.
- float64: the CUDA kernel is compiled for float32, float16 and bfloat16 only: a declared gap.

Known official limitations, run and reported as expected failures by
``--xfails-file equivalence/xfails/mamba_ssm.txt`` (one line each, with the reason): last_state is
wrong when B is constant, a (d, n) tensor, because the kernel folds B into the output term
(equivalence/test_mamba_ssm.py checks it against the loop, channel by channel).
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
