"""An example third-party scan, registered with the suite through an entry point.

It stores the state with channels split as (g, d/g) so that B and C broadcast per group without
a copy: a layout trick kernels use. It has one deliberate, subtle bug: see docs/plugins.md.
"""

import torch
import torch.nn.functional as F


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False):
    """u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l) or (b, g, n, l); D, delta_bias: (d,);
    initial_state: (b, d, n). Returns y (b, d, l), and last_state (b, d, n) if asked."""
    b, d, l = u.shape
    n = A.shape[1]
    f = torch.float64 if u.dtype == torch.float64 else torch.float32
    dt = delta.to(f) + (delta_bias.to(f)[:, None] if delta_bias is not None else 0)
    if delta_softplus:
        dt = F.softplus(dt)
    B = (B if B.dim() == 4 else B[:, None]).to(f)
    C = (C if C.dim() == 4 else C[:, None]).to(f)
    g = B.shape[1]
    # BUG: channels are split as (d/g, g), i.e. channel c reads group c % g. The interface says
    # channel c reads group c // (d // g), a (g, d/g) split. The fix is these two lines, as
    #     split = lambda x: x.reshape(b, g, d // g, *x.shape[2:])
    #     per_group = lambda X: X[:, :, None]
    split = lambda x: x.reshape(b, d // g, g, *x.shape[2:])      # noqa: E731  (b, d, ...) -> split channels
    per_group = lambda X: X[:, None]                             # noqa: E731  (b, g, ...) against them
    h = split(torch.zeros(b, d, n, dtype=f) if initial_state is None else initial_state.to(f))
    dA = torch.exp(split(dt)[..., None] * split(A.to(f).expand(b, d, n))[..., None, :])   # (b, *split, l, n)
    dBu = (split(dt) * split(u.to(f)))[..., None] * per_group(B.transpose(-1, -2))      # (b, *split, l, n)
    C = per_group(C.transpose(-1, -2))
    ys = []
    for t in range(l):
        h = dA[..., t, :] * h + dBu[..., t, :]
        ys.append((h * C[..., t, :]).sum(-1).reshape(b, d))
    y = torch.stack(ys, -1) if ys else u.new_zeros(b, d, 0, dtype=f)
    if D is not None:
        y = y + D.to(f)[:, None] * u.to(f)
    if z is not None:
        y = y * F.silu(z.to(f))
    y = y.to(u.dtype)
    return (y, h.reshape(b, d, n)) if return_last_state else y


def register():
    """Called by the suite (entry point group selective_scan.implementations)."""
    import impls

    if "my_kernel" not in impls.names():
        impls.register("my_kernel", selective_scan, gradients=True)
