"""Plausible SSD kernel bugs, planted on purpose: the SSD suite must reject every one of them.

Each function here has the ``ssd_scan`` signature (without ``impl``) and is one small, realistic
mistake away from a correct chunked SSD scan: the quadratic form inside each chunk of chunk_size
tokens, then a state carried from chunk to chunk (Dao & Gu 2024, §6). ``correct`` has no mistake:
the control. Several come from bugs reported against real kernels (see FIELD-NOTES.md, "Known SSD
bugs"). Use them from the command line too:

    pytest --ssd-impl equivalence.ssd.planted_bugs:carry_lost_at_chunk

The chunked form here is written for reading, not speed: one chunk at a time, segment sums taken
as sums over each segment (never a difference of cumulative sums, never exp of a positive sum), in
the compute dtype, so that the control is as accurate as the loop.
"""

import functools
import itertools

import torch
import torch.nn.functional as F

from impls.frontdoor import compute_dtype

BUGS = (
    "wrong_group_mapping",            # head i reads group i % g instead of i // (h // g)
    "dt_limit_ignored",               # no clamp to dt_limit at all
    "dt_limit_before_softplus",       # clamps dt + dt_bias, then applies softplus
    "clamp_only_with_softplus",       # a negative dt without softplus is not clamped at 0 (as the official step)
    "dt_bias_after_softplus",         # softplus(dt) + dt_bias
    "softplus_overflow",              # log1p(exp(dt)) without the threshold: inf past exp's overflow
    "D_hp_as_h",                      # D of shape (h, p) read as (h,): its first column for every channel
    "gate_before_D",                  # y silu(z) + D x: the skip connection left ungated
    "next_token_leak",                # inside a chunk, y_t also reads token t + 1 (a mask off by one)
    "carry_lost_at_chunk",            # each chunk starts from zero instead of the carried state
    "carry_undecayed_readout",        # the carried state read out without its decay to token t
    "final_state_of_last_full_chunk",  # when chunk_size does not divide l: the state after the last full chunk
    "states_bf16_between_chunks",     # the state carried between chunks rounded to bfloat16
    "nan_for_non_power_of_two_chunk",  # the chunk padded to a power of two with uninitialised (NaN) memory, masked by a multiply
    "ignored_initial_states",         # always starts from zeros
    # each caught by one of the properties of equivalence/properties.py only
    "gradient_order_by_call",         # dA summed over time in an order that turns with every call (as atomics would)
    "chunk_size_by_batch",            # with more than one batch row, chunks of half the size
    "unwritten_chunk_padding",        # the last chunk padded to chunk_size in torch.empty memory, never written, masked by * 0
    "guarded_path_on_nonfinite_chunk",  # a NaN or inf in a chunk's dt x sends the whole chunk down a masked sum
)

# What a bug needs declared to be tested where it shows (test_planted_bugs.py registers each so)
CAPABILITIES = {"gradient_order_by_call": dict(gradients=True)}

_CALLS = itertools.count()


class _SharedOverTime(torch.autograd.Function):
    """A parameter (h,) broadcast to every (b, l, h) token; its gradient summed back over batch and
    time in an order rotated by a call counter, as an atomic add across programs would."""

    @staticmethod
    def forward(ctx, A, b, l):
        return A.expand(b, l, -1).clone()

    @staticmethod
    def backward(ctx, grad):
        turn = next(_CALLS) % max(grad.shape[1], 1)
        return grad.roll(turn, 1).sum((0, 1)), None, None


def _dt(bug, dt, dt_bias, dt_softplus, dt_limit, f):
    dt = dt.to(f)
    lo, hi = dt_limit
    if dt_bias is not None and bug != "dt_bias_after_softplus":
        dt = dt + dt_bias.to(f)
    if bug == "dt_limit_before_softplus":
        dt = dt.clamp(lo, hi)
    if dt_softplus:
        dt = torch.log1p(torch.exp(dt)) if bug == "softplus_overflow" else F.softplus(dt)
    if bug == "dt_bias_after_softplus" and dt_bias is not None:
        dt = dt + dt_bias.to(f)
    if bug in ("dt_limit_ignored", "dt_limit_before_softplus"):
        return dt
    if bug == "clamp_only_with_softplus" and not dt_softplus:
        return dt
    return dt.clamp(lo, hi)


def _segment_sums(a, leak):
    """a: (b, T, h) log decays of one chunk -> (b, T, T, h) with [t, s] = a_{s+1} + ... + a_t for
    s <= t, -inf above the diagonal (exp gives the causal decay mask). leak: one diagonal more."""
    T = a.shape[1]
    keep = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)   # r > s enters segment [t, s]
    terms = a[:, :, None, :].expand(-1, T, T, -1).masked_fill(~keep[None, :, :, None], 0)   # [r, s]
    seg = terms.cumsum(1)                                                  # [t, s] = sum over s < r <= t
    causal = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(1 if leak else 0)
    return seg.masked_fill(~causal[None, :, :, None], float("-inf"))


def _scan(bug, x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
          cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False,
          return_varlen_states=False):
    if seq_idx is not None or cu_seqlens is not None or return_varlen_states:
        raise NotImplementedError("ssd_planted_bugs: no packed sequences")
    # one batch row at a time: torch's batched CPU kernels (softplus, silu, the einsums' matmuls)
    # round a row differently with other rows around it, and the control must be batch invariant
    outs, finals = [], []
    for i in range(x.shape[0]):
        x_i, dt_i, B_i, C_i, z_i, h0_i = (t if t is None else t[i:i + 1] for t in (x, dt, B, C, z, initial_states))
        out, final = _scan_row(bug, x.shape[0], x_i, dt_i, A, B_i, C_i, chunk_size, D, z_i, dt_bias, h0_i,
                               dt_softplus, dt_limit)
        outs.append(out)
        finals.append(final)
    out, final = torch.cat(outs), torch.cat(finals)
    return (out, final) if return_final_states else out


def _scan_row(bug, batch, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus, dt_limit):
    """One batch row (b = 1) of a batch of ``batch`` rows: (out, final_states)."""
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    f = compute_dtype(x.dtype)
    dt = _dt(bug, dt, dt_bias, dt_softplus, dt_limit, f)                      # (b, l, h)
    head = torch.arange(h, device=x.device)
    group = head % g if bug == "wrong_group_mapping" else head // (h // g)
    B, C = B.to(f)[:, :, group], C.to(f)[:, :, group]                        # (b, l, h, n)
    u = dt[..., None] * x.to(f)                                              # dt x: (b, l, h, p)
    if bug == "gradient_order_by_call":
        A = _SharedOverTime.apply(A.to(f), b, l)                             # (b, l, h): the same values
    a = dt * A.to(f)                                                         # log decays: (b, l, h)

    state = torch.zeros(b, h, p, n, dtype=f, device=x.device)
    if initial_states is not None and bug != "ignored_initial_states":
        state = initial_states.to(f)
    Q = chunk_size if bug != "chunk_size_by_batch" or batch == 1 else (chunk_size + 1) // 2
    ys, last_full = [], state
    for start in range(0, l, Q):
        a_c, u_c, B_c, C_c = (t[:, start:start + Q] for t in (a, u, B, C))
        T = a_c.shape[1]
        seg = _segment_sums(a_c, leak=bug == "next_token_leak")             # (b, T, T, h)
        scores = torch.einsum("bthn,bshn->btsh", C_c, B_c)
        if bug == "nan_for_non_power_of_two_chunk" and Q & (Q - 1):
            P = 1 << (Q - 1).bit_length()                                    # the block a kernel pads to
            pad = P - T
            mask = torch.exp(seg)
            scores = F.pad(scores, (0, 0, 0, pad, 0, pad), value=float("nan"))
            mask = F.pad(mask, (0, 0, 0, pad, 0, pad), value=0.0)
            u_p = F.pad(u_c, (0, 0, 0, 0, 0, pad), value=float("nan"))
            y = torch.einsum("btsh,bshp->bthp", scores * mask, u_p)[:, :T]
        else:
            # within the chunk; tl.where-style masks, never a product with 0, so that a NaN or inf
            # at token s reaches no earlier token, not even by a rounding: the finite part is one
            # einsum whatever the input, the non-finite entries are added under the mask
            causal = seg != float("-inf")
            w = torch.where(causal, scores * torch.exp(seg), 0.0)           # (b, t, s, h)
            bad = ~torch.isfinite(u_c)                                       # (b, s, h, p)
            if bug == "unwritten_chunk_padding" and T < Q:
                u_p = torch.empty(b, Q, h, p, dtype=f, device=x.device)     # padding never written
                u_p[:, :T] = u_c
                y = torch.einsum("btsh,bshp->bthp", F.pad(w, (0, 0, 0, Q - T)), u_p)
            elif bug == "guarded_path_on_nonfinite_chunk" and bad.any():
                y = torch.where(causal[..., None], w[..., None] * u_c[:, None], 0.0).sum(2)
            else:
                y = torch.einsum("btsh,bshp->bthp", w, u_c.masked_fill(bad, 0.0))
                if bad.any():
                    y = y + torch.where(causal[..., None] & bad[:, None], w[..., None] * u_c[:, None], 0.0).sum(2)
        into = a_c.cumsum(1)                                                 # decay from chunk start to t
        carried = torch.einsum("bthn,bhpn->bthp", C_c, state)
        y = y + (carried if bug == "carry_undecayed_readout" else carried * torch.exp(into)[..., None])
        ys.append(y)
        to_end = torch.exp(seg[:, -1])                                       # decay from s to the chunk's end: (b, T, h)
        local = torch.einsum("bsh,bshp,bshn->bhpn", to_end, u_c, B_c)
        if bug == "carry_lost_at_chunk":
            state = local
        else:
            state = torch.exp(into[:, -1])[..., None, None] * state + local
        if bug == "states_bf16_between_chunks":
            state = state.to(torch.bfloat16).to(f)
        if T == Q:
            last_full = state
    y = torch.cat(ys, 1) if ys else x.new_zeros(b, 0, h, p, dtype=f)
    if D is not None:
        D = D.to(f)
        Dx = (D[:, :1] if bug == "D_hp_as_h" and D.dim() == 2 else (D[:, None] if D.dim() == 1 else D)) * x.to(f)
        if bug == "gate_before_D" and z is not None:
            y = y * F.silu(z.to(f)) + Dx
            z = None
        else:
            y = y + Dx
    if z is not None:
        y = y * F.silu(z.to(f))
    final = last_full if bug == "final_state_of_last_full_chunk" else state
    return y.to(x.dtype), final


correct = functools.partial(_scan, None)
for _bug in BUGS:
    globals()[_bug] = functools.partial(_scan, _bug)

# The bugs that only one property catches, and that property (test_planted_bugs.py)
ONLY = {"gradient_order_by_call": "determinism", "chunk_size_by_batch": "batch invariance",
        "unwritten_chunk_padding": "unwritten memory", "guarded_path_on_nonfinite_chunk": "non-finite causality"}
