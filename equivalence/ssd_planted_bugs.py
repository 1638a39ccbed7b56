"""Plausible SSD kernel bugs, planted on purpose: the SSD suite must reject every one of them.

Each function here has the ``ssd_scan`` signature (without ``impl``) and is one small, realistic
mistake away from a correct chunked SSD scan: the quadratic form inside each chunk of chunk_size
tokens, then a state carried from chunk to chunk (Dao & Gu 2024, §6). ``correct`` has no mistake:
the control. Several come from bugs reported against real kernels (see FIELD-NOTES.md, "Known SSD
bugs"). Use them from the command line too:

    pytest --ssd-impl equivalence.ssd_planted_bugs:carry_lost_at_chunk

The chunked form here is written for reading, not speed: one chunk at a time, segment sums taken
as sums over each segment (never a difference of cumulative sums, never exp of a positive sum), in
the compute dtype, so that the control is as accurate as the loop.
"""

import functools

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
)


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
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    f = compute_dtype(x.dtype)
    dt = _dt(bug, dt, dt_bias, dt_softplus, dt_limit, f)                      # (b, l, h)
    head = torch.arange(h, device=x.device)
    group = head % g if bug == "wrong_group_mapping" else head // (h // g)
    B, C = B.to(f)[:, :, group], C.to(f)[:, :, group]                        # (b, l, h, n)
    u = dt[..., None] * x.to(f)                                              # dt x: (b, l, h, p)
    a = dt * A.to(f)                                                         # log decays: (b, l, h)

    state = torch.zeros(b, h, p, n, dtype=f, device=x.device)
    if initial_states is not None and bug != "ignored_initial_states":
        state = initial_states.to(f)
    Q = chunk_size
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
            y = torch.einsum("btsh,bshp->bthp", scores * torch.exp(seg), u_c)  # within the chunk
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
    out = y.to(x.dtype)
    return (out, final) if return_final_states else out


correct = functools.partial(_scan, None)
for _bug in BUGS:
    globals()[_bug] = functools.partial(_scan, _bug)
