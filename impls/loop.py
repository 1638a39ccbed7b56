"""The spec: the Mamba-1 selective scan as a plain loop over time.

Read beside the paper: Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces" (2023), Section 3.2 and Algorithm 2 (SSM + Selection, "S6"). Official code:
https://github.com/state-spaces/mamba, ``selective_scan_ref`` in mamba_ssm/ops/selective_scan_interface.py.
Letters (b, d, l, n, g) are defined once, in impls/frontdoor.py.

Every other implementation is checked against this function run in float64.
"""

import torch
import torch.nn.functional as F

from .frontdoor import compute_dtype, per_channel


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False):
    """Selective scan, one time step after another.

    Args:
        u: (b, d, l) input x of the paper
        delta: (b, d, l) step size before bias and softplus (the paper's Δ = τ_Δ(...))
        A: (d, n) real, negative for a decaying state
        B, C: (b, n, l) or grouped (b, g, n, l)
        D: (d,) skip connection, optional
        z: (b, d, l) gate, optional: out = y * silu(z)
        delta_bias: (d,) added to delta before softplus, optional
        delta_softplus: apply softplus (threshold 20, as the official kernel) to delta + delta_bias
        initial_state: (b, d, n) state before the first token, optional (zeros)
        return_last_state: also return the state after the last token
    Returns:
        y: (b, d, l) in u's dtype; with return_last_state, (y, last_state) with last_state (b, d, n)
        in the compute dtype (float32, or float64 for float64 inputs)
    """
    b, d, l = u.shape
    n = A.shape[1]
    f = compute_dtype(u.dtype)

    # Δ = softplus(delta + bias): Algorithm 2, line 5 (τ_Δ = softplus).
    dt = delta.to(f)
    if delta_bias is not None:
        dt = dt + delta_bias.to(f)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)  # torch's threshold is 20: identity above it, like the official kernel

    A = A.to(f)
    B = per_channel(B.to(f) if B.dim() == 4 else B.to(f)[:, None], d)  # (b, d or 1, n, l)
    C = per_channel(C.to(f) if C.dim() == 4 else C.to(f)[:, None], d)
    u_f = u.to(f)

    h = torch.zeros(b, d, n, dtype=f, device=u.device) if initial_state is None else initial_state.to(f)
    ys = []
    for dt_t, u_t, B_t, C_t in zip(dt.unbind(-1), u_f.unbind(-1), B.unbind(-1), C.unbind(-1)):
        # Discretise (Section 2, eq. 4): Ā = exp(ΔA) (zero-order hold); B̄ ≈ ΔB, the Euler
        # simplification the official kernels use (Section 3.6 / footnote on discretisation).
        dA = torch.exp(dt_t[:, :, None] * A)                    # (b, d, n)
        dBu = (dt_t * u_t)[:, :, None] * B_t                    # (b, d, n)
        # Recurrence (eq. 2a): h_t = Ā h_{t-1} + B̄ x_t
        h = dA * h + dBu
        # Readout (eq. 2b): y_t = C_t h_t, summed over the n states of each channel
        ys.append((h * C_t).sum(-1))                            # (b, d)

    y = torch.stack(ys, dim=-1) if ys else u_f.new_zeros(b, d, 0)
    if D is not None:
        y = y + D.to(f)[:, None] * u_f                          # skip connection, D u
    if z is not None:
        y = y * F.silu(z.to(f))                                 # gating of the Mamba block
    y = y.to(u.dtype)
    return (y, h) if return_last_state else y
