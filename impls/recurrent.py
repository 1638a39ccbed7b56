"""Recurrent decoding: an explicit state, one token per call.

``selective_state_update`` is what a generating model calls once per new token: it reads the
state (b, d, n), advances it by one token in place and returns that token's output. Its cost does
not depend on how many tokens came before. ``selective_scan`` here is nothing more than that step
run over a sequence, starting from ``initial_state``: exactly the decode path, so checking it
against the loop checks decoding against the full scan.

Same equations as impls/loop.py (Algorithm 2 of the Mamba paper), letters in impls/frontdoor.py.
"""

import torch
import torch.nn.functional as F

from .frontdoor import compute_dtype, per_channel


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """Advance the state by one token, in place, and return the token's output.

    Args:
        state: (b, d, n) in the compute dtype; overwritten with the new state
        x: (b, d) the token's input (u at one time step)
        dt: (b, d) its step size before bias and softplus
        A: (d, n)
        B, C: (b, n) or grouped (b, g, n)
        D: (d,) optional skip; z: (b, d) optional gate; dt_bias: (d,) optional
        dt_softplus: apply softplus (threshold 20) to dt + dt_bias
    Returns:
        y: (b, d) in x's dtype
    """
    d = x.shape[1]
    f = compute_dtype(x.dtype)
    dt = dt.to(f)
    if dt_bias is not None:
        dt = dt + dt_bias.to(f)
    if dt_softplus:
        dt = F.softplus(dt)
    B = per_channel(B.to(f) if B.dim() == 3 else B.to(f)[:, None], d)  # (b, d or 1, n)
    C = per_channel(C.to(f) if C.dim() == 3 else C.to(f)[:, None], d)
    x_f = x.to(f)

    dA = torch.exp(dt[:, :, None] * A.to(f))                   # Ā = exp(ΔA)
    dBu = (dt * x_f)[:, :, None] * B                           # B̄ x = Δ B x
    h = dA * state.to(f) + dBu                                 # h_t = Ā h_{t-1} + B̄ x_t
    state.copy_(h)
    y = (h * C).sum(-1)                                        # y_t = C_t h_t
    if D is not None:
        y = y + D.to(f) * x_f
    if z is not None:
        y = y * F.silu(z.to(f))
    return y.to(x.dtype)


def scan_by_stepping(step):
    """Build a scan (the impls.selective_scan signature) that calls ``step`` once per token."""

    def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       initial_state=None, return_last_state=False):
        b, d, l = u.shape
        f = compute_dtype(u.dtype)
        state = (torch.zeros(b, d, A.shape[1], dtype=f, device=u.device) if initial_state is None
                 else initial_state.to(f).clone())  # clone: the caller's initial_state is never written
        ys = [step(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D,
                   None if z is None else z[..., t], delta_bias, delta_softplus)
              for t in range(l)]
        y = torch.stack(ys, dim=-1) if ys else u.new_zeros(b, d, 0)
        return (y, state) if return_last_state else y

    selective_scan.__doc__ = f"Selective scan by calling {getattr(step, '__qualname__', step)} once per token."
    return selective_scan


selective_scan = scan_by_stepping(selective_state_update)
