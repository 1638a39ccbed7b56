"""mamba.py's selective scan and step behind our interface: the pure-PyTorch peer.

mamba.py (https://github.com/alxndrTL/mamba.py, ``pip install mambapy``) computes the Mamba-1
scan with ``mambapy.pscan.pscan``, a Blelloch parallel scan over full (b, l, d, n) tensors of the
decays Ā = exp(dt A) and inputs X = dt B u (``MambaBlock.selective_scan``), and decodes with
``MambaBlock.ssm_step``. This adapter runs that scan, the package's own ``pscan``, on our arguments,
so the equivalence suite checks it and the benchmarks time it like any registered implementation.

What is translated, explicitly (letters as in impls/frontdoor.py):

- layout: ours is (b, d, l) and (b, n, l); mamba.py's is (b, l, d) and (b, l, n): transposed views
  in, one transposed copy of y out.
- delta_bias, delta_softplus, D, z: mamba.py applies them around its scan (dt_proj's bias, then
  softplus; y + D u; y * silu(z)); so does this adapter, in the same order.
- initial_state: ``pscan`` starts from h = 0. The first step is h_0 = Ā_0 h_init + X_0, so adding
  Ā_0 h_init to X_0 before the scan is exact algebra and the same rounding as the loop's first
  step (one product, one sum): mamba.py's scan continuing from a state, not an approximation.
- last_state: the scan's last hidden state, hs[:, -1].
- dtype: float16/bfloat16 inputs are computed in float32 (the interface's compute dtype, as the
  official kernel does); mamba.py itself would run a half-precision model's scan in half.
- grouped B/C (b, g, n, l): mamba.py has one B and one C per token; a declared gap
  (``grouped=False``), so the suite skips those cases with that reason instead of this adapter
  expanding the groups itself and testing our code under mamba.py's name.

The step. mamba.py's ``ssm_step`` is a method of its block that also runs the block's projections
(x_proj, dt_proj) on the token and rebuilds A from A_log; its recurrence is
h = exp(dt A) h + dt B x; y = h @ C + D x. Given dt, B, C already projected, that recurrence is the
whole step; ``selective_state_update`` below is those lines, in its order of operations, on the
interface's arguments (the model-level peer in impls/adapters/mambapy_model.py runs the real method).

mambapy is imported on first call: it is a dev dependency, and the adapter is registered only when
it is installed (impls/__init__.py).
"""

import torch
import torch.nn.functional as F

from ..frontdoor import compute_dtype

WRAPS = "mambapy"   # the package whose version the pytest header shows beside ours


def _dt(delta, delta_bias, softplus, f):
    """dt in the compute dtype f, as mamba.py's dt_proj (bias) and softplus produce it."""
    dt = delta.to(f)
    if delta_bias is not None:
        bias = delta_bias.to(f)
        dt = dt + (bias[:, None] if dt.dim() == 3 else bias)             # over l in a scan
    return F.softplus(dt) if softplus else dt


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False):
    """The selective scan through mamba.py's ``pscan``.

    Args:
        u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l); D, delta_bias: (d,); initial_state: (b, d, n)
    Returns:
        y: (b, d, l) in u's dtype, or (y, last_state (b, d, n) in the compute dtype)
    """
    from mambapy.pscan import pscan

    f = compute_dtype(u.dtype)
    dt = _dt(delta, delta_bias, delta_softplus, f).transpose(1, 2)      # (b, l, d)
    x = u.to(f).transpose(1, 2)                                         # (b, l, d)
    deltaA = torch.exp(dt.unsqueeze(-1) * A.to(f))                      # (b, l, d, n)
    BX = dt.unsqueeze(-1) * B.to(f).transpose(1, 2).unsqueeze(2) * x.unsqueeze(-1)   # (b, l, d, n)
    if initial_state is not None:
        BX = torch.cat([(deltaA[:, :1] * initial_state.to(f).unsqueeze(1)) + BX[:, :1], BX[:, 1:]], 1)
    hs = pscan(deltaA, BX)                                              # (b, l, d, n)
    y = (hs @ C.to(f).transpose(1, 2).unsqueeze(-1)).squeeze(3)         # (b, l, d)
    if D is not None:
        y = y + D.to(f) * x
    y = y.transpose(1, 2)
    if z is not None:
        y = y * F.silu(z.to(f))
    y = y.to(u.dtype)
    # a copy: a view would keep the whole (b, l, d, n) hs alive as long as the caller holds the state
    return (y, hs[:, -1].clone()) if return_last_state else y


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One token of mamba.py's ``ssm_step`` recurrence, updating ``state`` in place.

    Args:
        state: (b, d, n) in the compute dtype; x, dt, z: (b, d); A: (d, n); B, C: (b, n); D, dt_bias: (d,)
    Returns:
        y: (b, d) in x's dtype
    """
    f = state.dtype
    delta = _dt(dt, dt_bias, dt_softplus, f)                            # (b, d)
    xf = x.to(f)
    deltaA = torch.exp(delta.unsqueeze(-1) * A.to(f))                   # (b, d, n)
    BX = delta.unsqueeze(-1) * B.to(f).unsqueeze(1) * xf.unsqueeze(-1)  # (b, d, n)
    state.copy_(deltaA * state + BX)
    y = (state @ C.to(f).unsqueeze(-1)).squeeze(2)                      # (b, d)
    if D is not None:
        y = y + D.to(f) * xf
    if z is not None:
        y = y * F.silu(z.to(f))
    return y.to(x.dtype)
