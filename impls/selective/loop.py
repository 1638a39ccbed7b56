"""The spec: the Mamba-1 selective scan as a plain loop over time.

Read beside the paper: Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces" (2023), Section 3.2 and Algorithm 2 (SSM + Selection, "S6"). Official code:
https://github.com/state-spaces/mamba, ``selective_scan_ref`` in mamba_ssm/ops/selective_scan_interface.py.
Letters (b, d, l, n, g) are defined once, in impls/frontdoor.py.

Every other implementation is checked against this function run in float64.
"""

import torch
import torch.nn.functional as F

from ..frontdoor import compute_dtype, per_channel


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False, cu_seqlens=None):
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
        cu_seqlens: (nseq + 1,) int32, optional: packed sequences (b = 1), each scanned alone from
            initial_state[i], initial_state (nseq, d, n); see _packed
    Returns:
        y: (b, d, l) in u's dtype; with return_last_state, (y, last_state) with last_state (b, d, n)
        in the compute dtype (float32, or float64 for float64 inputs); (nseq, d, n) with cu_seqlens
    """
    if cu_seqlens is not None:
        return _packed(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_last_state,
                       cu_seqlens)
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


def _packed(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_last_state, cu_seqlens):
    """Packed sequences, by definition: each sequence cut out and scanned alone by the loop above.

    u, delta, z: (1, d, l); B, C: (1, n, l) or (1, g, n, l); cu_seqlens: (nseq + 1,) int32 offsets
    (checked by the front door); initial_state: (nseq, d, n) or None. Returns y (1, d, l) and,
    with return_last_state, last_state (nseq, d, n): a length-0 sequence passes its initial state
    (or zeros) through.
    """
    offsets = cu_seqlens.tolist()

    def cut(X, s, e):
        return None if X is None else X[..., s:e]

    ys, lasts = [], []
    for i, (s, e) in enumerate(zip(offsets, offsets[1:])):
        y, last = selective_scan(u[..., s:e], delta[..., s:e], A, cut(B, s, e), cut(C, s, e), D, cut(z, s, e),
                                 delta_bias, delta_softplus,
                                 None if initial_state is None else initial_state[i:i + 1], True)
        ys.append(y)
        lasts.append(last)
    y = torch.cat(ys, -1) if ys else u[..., :0].clone()
    last = torch.cat(lasts) if lasts else u.new_zeros(0, u.shape[1], A.shape[1], dtype=compute_dtype(u.dtype))
    return (y, last) if return_last_state else y
