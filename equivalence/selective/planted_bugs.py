"""Plausible kernel bugs, planted on purpose: the suite must reject every one of them.

Each function here has the selective_scan signature and is one small, realistic mistake away from
the loop. ``correct`` has no mistake: the control. Use them from the command line too:

    pytest --impl equivalence.selective.planted_bugs:wrong_group_mapping
"""

import functools
import itertools

import torch
import torch.nn.functional as F

from impls.frontdoor import compute_dtype

CHUNK = 64  # for the bug that forgets the state at chunk boundaries
SHORT_LOG2E = 1.4427  # log2(e) to five digits: exp2(dt A SHORT_LOG2E) is 29 float32 ulps off per unit of |dt A|

BUGS = (
    "wrong_group_mapping",      # channel c reads group c % g instead of c // (d // g)
    "missing_softplus",         # ignores delta_softplus
    "state_lost_at_chunk",      # restarts the state from zero every CHUNK tokens
    "one_token_shift",          # y_t read from h_{t-1}
    "ignored_initial_state",    # always starts from zeros
    "lost_D_skip",              # forgets D u
    "wrong_gate",               # y * sigmoid(z) instead of y * silu(z)
    "low_precision_state",      # keeps the state in the input dtype (bfloat16/float16 accumulation)
    "batch_leak",               # every batch row reads B of row 0
    "last_state_one_early",     # returns h_{l-1} instead of h_l
    "overflowing_softplus",     # softplus as log1p(exp(x)), no threshold: inf once exp(x) overflows (x > 88.7 in float32)
    "padded_lanes",             # pads n to a power of two with B = C = 0 and reads out every lane: 0 * inf = NaN
    # each caught by one of the properties of equivalence/properties.py only
    "gradient_order_by_call",   # dA summed over time in an order that turns with every call (as atomics would)
    "readout_order_by_batch",   # with more than one batch row, the readout sums the lanes in another order
    "unwritten_padded_lanes",   # pads n to a power of two in a torch.empty state, never writes the padding, masks it by * 0
    "guarded_path_on_nonfinite_dt",  # a non-finite dt anywhere sends every token's readout down another summation order
)

# Near the bound: a few tens of ulps off, past the bound only in a corner that random draws seldom
# reach (an initial state, one or two tokens, |dt A| around 1). The search with hypothesis' target
# phase finds it (equivalence/test_targeted_search.py); the search of test_planted_bugs.py, random
# draws only, is not asked to.
NEAR_THE_BOUND = (
    "decay_via_short_log2e",    # a float32 kernel: exp(dt A) as exp2(dt A SHORT_LOG2E)
)

# What a bug needs declared to be tested where it shows (test_planted_bugs.py registers each so)
CAPABILITIES = {"gradient_order_by_call": dict(gradients=True),
                "decay_via_short_log2e": dict(dtypes=(torch.float32,))}

_CALLS = itertools.count()


class _SharedOverTime(torch.autograd.Function):
    """A parameter (d, n) broadcast to every (b, d, l, n) step; its gradient summed back over batch
    and time in an order rotated by a call counter, as an atomic add across programs would."""

    @staticmethod
    def forward(ctx, A, b, l):
        return A[None, :, None, :].expand(b, -1, l, -1).clone()

    @staticmethod
    def backward(ctx, grad):
        turn = next(_CALLS) % grad.shape[2]
        return grad.roll(turn, 2).sum((0, 2)), None, None


def _rowwise(fn, X):
    """fn on each batch row alone: torch's CPU softplus and silu round the last elements of a
    tensor (its scalar tail) differently from the rest, so on the whole batch a row's bits would
    depend on the batch around it, and the control would not be batch invariant."""
    return torch.cat([fn(X[i:i + 1]) for i in range(X.shape[0])]) if X.shape[0] else fn(X)


def _scan(bug, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
          initial_state=None, return_last_state=False):
    b, d, l = u.shape
    f = compute_dtype(u.dtype)
    acc = u.dtype if bug == "low_precision_state" else f
    dt = delta.to(f) + (delta_bias.to(f)[:, None] if delta_bias is not None else 0)
    if delta_softplus and bug == "overflowing_softplus":
        dt = torch.log1p(torch.exp(dt))
    elif delta_softplus and bug != "missing_softplus":
        dt = _rowwise(F.softplus, dt)
    B = (B if B.dim() == 4 else B[:, None]).to(f)
    C = (C if C.dim() == 4 else C[:, None]).to(f)
    channel = torch.arange(d)

    def spread(X):
        g = X.shape[1]
        group = channel % g if bug == "wrong_group_mapping" else channel // (d // g)
        return X[:, group]                                     # (b, d, n, l)

    B, C = spread(B), spread(C)
    n = A.shape[1]
    if bug == "padded_lanes":  # a kernel's block of 2^k state lanes, the padding loaded as 0
        pad = (1 << (n - 1).bit_length()) - n
        A, B, C = F.pad(A, (0, pad)), F.pad(B, (0, 0, 0, pad)), F.pad(C, (0, 0, 0, pad))
        if initial_state is not None:
            initial_state = F.pad(initial_state, (0, pad))
    if bug == "unwritten_padded_lanes":  # a kernel's block of 2^k lanes whose padding is masked by a multiply
        pad = (1 << (n - 1).bit_length()) - n
        A, B, C = F.pad(A, (0, pad)), F.pad(B, (0, 0, 0, pad)), F.pad(C, (0, 0, 0, pad))
    if bug == "batch_leak":
        B = B[:1].expand_as(B)
    h = torch.zeros(b, d, A.shape[1], dtype=acc)
    if bug == "unwritten_padded_lanes":
        h = torch.empty(b, d, A.shape[1], dtype=acc)
        h[..., :n] = 0 if initial_state is None else initial_state.to(acc)
    elif initial_state is not None and bug != "ignored_initial_state":
        h = initial_state.to(acc)
    if bug == "gradient_order_by_call":
        A = _SharedOverTime.apply(A, b, l)                     # (b, d, l, n): the same values
    # the guarded path: taken for the whole call when any dt is not finite
    reordered = (bug == "readout_order_by_batch" and b > 1) or (
        bug == "guarded_path_on_nonfinite_dt" and not torch.isfinite(dt).all())
    previous, ys = h, []
    for t in range(l):
        if bug == "state_lost_at_chunk" and t and t % CHUNK == 0:
            h = torch.zeros_like(h)
        previous = h
        A_t = A[:, :, t] if bug == "gradient_order_by_call" else A
        x = dt[:, :, t, None] * A_t
        decay = torch.exp2(x * SHORT_LOG2E) if bug == "decay_via_short_log2e" else torch.exp(x)
        h = (decay * h + (dt[:, :, t] * u[:, :, t].to(f))[:, :, None] * B[..., t]).to(acc)
        read = previous if bug == "one_token_shift" else h
        terms = read.to(f) * C[..., t]
        ys.append(terms.flip(-1).sum(-1) if reordered else terms.sum(-1))
    y = torch.stack(ys, -1)
    if D is not None and bug != "lost_D_skip":
        y = y + D[:, None] * u.to(f)
    if z is not None:
        y = y * (torch.sigmoid(z.to(f)) if bug == "wrong_gate" else _rowwise(F.silu, z.to(f)))
    last = (previous if bug == "last_state_one_early" else h)[..., :n].to(f)
    return (y.to(u.dtype), last) if return_last_state else y.to(u.dtype)


correct = functools.partial(_scan, None)
for _bug in BUGS + NEAR_THE_BOUND:
    globals()[_bug] = functools.partial(_scan, _bug)

# The bugs that only one property catches, and that property (test_planted_bugs.py)
ONLY = {"gradient_order_by_call": "determinism", "readout_order_by_batch": "batch invariance",
        "unwritten_padded_lanes": "unwritten memory", "guarded_path_on_nonfinite_dt": "non-finite causality"}
