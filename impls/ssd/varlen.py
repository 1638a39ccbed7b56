"""Packed variable-length sequences for the SSD (Mamba-2) family: the front door's checks, the
sequences a packed call holds, and the two generic ways an SSD implementation serves them.

Two ways to mark sequences, as the official ``mamba_chunk_scan_combined``:

    cu_seqlens (nseq + 1,) int32, with b = 1: 0, then each sequence's end (the last equal to l).
        Sequence i is tokens cu_seqlens[i]:cu_seqlens[i + 1]; it starts from initial_states[i]
        (initial_states (nseq, h, p, n)); final_states and varlen_states are (nseq, h, p, n), each
        sequence's state after its last token (its initial state, or zeros, when it is empty).
    seq_idx (b, l) int32: in each row a new sequence starts wherever seq_idx changes; a negative
        value marks padding, whose tokens contribute to no state and output zeros. As the
        official kernel, initial_states (b, h, p, n) reaches a row's first sequence only (the rest
        start from zeros) and final_states (b, h, p, n) is the state after the row's last sequence.
        Given with cu_seqlens, seq_idx must mark the same boundaries (the official callers pass both).

``return_varlen_states`` (the official name) needs cu_seqlens and returns the per-sequence states
(nseq, h, p, n) after the others: out, [final_states], [varlen_states], the official order.

Letters (b, l, h, p, n, g) as in impls/ssd/frontdoor.py.
"""

import functools

import torch

from ..frontdoor import check_device, check_dtype, fail, check_shape, check_tensor, check_cu_seqlens, check_state_batch_indices


def check_packed(x, initial_states, seq_idx, cu_seqlens, return_varlen_states, dims):
    """Front-door checks of the varlen arguments of ssd_scan (dims: frontdoor._check's dict,
    computed without initial_states). Returns dims with ``nseq`` (None without cu_seqlens) and
    ``runs``: for each row, a list of (start, end) token ranges, one per sequence (padding left out).

    Raises ValueError naming the argument: cu_seqlens malformed (impls/frontdoor.py); seq_idx not
    int32 (b, l) on x's device or marking other boundaries than cu_seqlens; return_varlen_states
    without cu_seqlens; initial_states not (nseq, h, p, n) with cu_seqlens or (b, h, p, n) without.
    """
    where = "ssd_scan"
    b, l, h, p, n = dims["b"], dims["l"], dims["h"], dims["p"], dims["n"]
    if return_varlen_states and cu_seqlens is None:
        fail(ValueError, where, "return_varlen_states", "cu_seqlens to go with it (per-sequence states)", True)
    nseq = offsets = None
    if cu_seqlens is not None:
        nseq, offsets = check_cu_seqlens(where, cu_seqlens, b, l, x.device)
    if seq_idx is not None:
        if not isinstance(seq_idx, torch.Tensor):
            fail(TypeError, where, "seq_idx", "a torch.Tensor", type(seq_idx).__name__)
        if seq_idx.dtype != torch.int32:
            fail(ValueError, where, "seq_idx", "dtype torch.int32", seq_idx.dtype)
        check_shape(where, "seq_idx", seq_idx, (b, l), ("b", "l"))
        check_device(where, "seq_idx", seq_idx, x.device)
    if offsets is not None:
        runs = [[(a, e) for a, e in zip(offsets, offsets[1:])]]
        if seq_idx is not None and seq_idx.numel():
            s = seq_idx[0].tolist()
            starts = {0} | {t for t in range(1, l) if s[t] != s[t - 1]}
            if min(s) < 0 or starts != {a for a, e in runs[0] if e > a}:
                fail(ValueError, where, "seq_idx", "the boundaries of cu_seqlens, no padding (negative value)",
                      f"seq_idx starting sequences at {sorted(starts)}, cu_seqlens={offsets}")
    else:
        runs = [_runs(row) for row in seq_idx.tolist()]
    states = nseq if nseq is not None else b
    if initial_states is not None:
        check_tensor(where, "initial_states", initial_states)
        check_device(where, "initial_states", initial_states, x.device)
        names = ("nseq", "h", "p", "n") if nseq is not None else ("b", "h", "p", "n")
        check_shape(where, "initial_states", initial_states, (states, h, p, n), names)
        check_dtype(where, "initial_states", initial_states, (dims["compute_dtype"],),
               f"the compute dtype for x in {dims['input_dtype']}")
    return dict(dims, nseq=nseq, runs=runs)


def _runs(row):
    """Sequences of one seq_idx row: maximal runs of one non-negative value, as (start, end)."""
    out = []
    for t, v in enumerate(row):
        if v < 0:
            continue
        if out and out[-1][1] == t and row[t - 1] == v:
            out[-1] = (out[-1][0], t + 1)
        else:
            out.append((t, t + 1))
    return out


def runs_of(x, seq_idx, cu_seqlens):
    """The runs of check_packed, for implementations (the inputs are already checked)."""
    if cu_seqlens is not None:
        o = cu_seqlens.tolist()
        return [list(zip(o, o[1:]))]
    return [_runs(row) for row in seq_idx.tolist()]


def each_alone(scan, x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
               seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
               return_final_states=False, return_varlen_states=False):
    """A packed call served by cutting each sequence out and scanning it alone with ``scan`` (an
    ssd_scan without varlen): the definition of the packed semantics (module docstring), and
    vLLM's layout for a chunked scan (no chunk straddles a sequence, so each sequence's chunks
    start at its first token and its state decays from its own start). Differentiable where
    ``scan`` is. Shapes and returns as impls.ssd_scan with varlen."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    f = torch.float64 if x.dtype == torch.float64 else torch.float32
    runs = runs_of(x, seq_idx, cu_seqlens)
    per_sequence = cu_seqlens is not None
    rows_out, finals, lasts = [], [], []
    for r in range(b):
        pieces, t = [], 0
        h0_row = None if initial_states is None or per_sequence else initial_states[r:r + 1]
        final = h0_row if h0_row is not None else x.new_zeros(1, h, p, n, dtype=f)
        for i, (a, e) in enumerate(runs[r]):
            if a > t:   # padding (seq_idx < 0): outputs zeros, touches no state
                pieces.append(x.new_zeros(1, a - t, h, p))
            if per_sequence:
                h0 = None if initial_states is None else initial_states[i:i + 1]
            else:
                h0 = h0_row if i == 0 else None
            if e == a:
                final = h0 if h0 is not None else x.new_zeros(1, h, p, n, dtype=f)
            else:
                def cut(X):
                    return None if X is None else X[r:r + 1, a:e]
                out, final = scan(cut(x), cut(dt), A, cut(B), cut(C), chunk_size, D, cut(z), dt_bias, h0,
                                  dt_softplus=dt_softplus, dt_limit=dt_limit, return_final_states=True)
                pieces.append(out)
            lasts.append(final.to(f))
            t = e
        if l > t:
            pieces.append(x.new_zeros(1, l - t, h, p))
        rows_out.append(torch.cat(pieces, 1) if pieces else x.new_zeros(1, l, h, p))
        finals.append(final.to(f))
    out = torch.cat(rows_out, 0)
    per_seq = torch.cat(lasts) if lasts else x.new_zeros(0, h, p, n, dtype=f)
    res = [out]
    if return_final_states:
        res.append(per_seq if per_sequence else torch.cat(finals))
    if return_varlen_states:
        res.append(per_seq)
    return res[0] if len(res) == 1 else tuple(res)


def by_sequence(scan):
    """``scan`` (an ssd_scan) serving packed calls through each_alone; unpacked calls go to it unchanged."""

    @functools.wraps(scan)
    def packed_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                    seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                    return_final_states=False, return_varlen_states=False):
        if seq_idx is None and cu_seqlens is None and not return_varlen_states:
            return scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, None, None, dt_softplus,
                        dt_limit, return_final_states, False)
        return each_alone(scan, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
                          dt_softplus, dt_limit, return_final_states, return_varlen_states)

    return packed_scan


def through_cu_seqlens(packed_scan, x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                       seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                       return_final_states=False, return_varlen_states=False):
    """A packed call served by ``packed_scan``, which takes cu_seqlens only: called as
    packed_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states (nseq, h, p, n), cu_seqlens)
    on b = 1 inputs, returning (out (1, l, h, p), final states (nseq, h, p, n)). seq_idx rows are
    packed into one such call: each row's sequences (padding dropped) laid end to end, the row's
    initial state given to its first sequence, zeros to the others; outputs scattered back, zeros
    at padding. Differentiable where ``packed_scan`` is. Shapes and returns as impls.ssd_scan."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    f = torch.float64 if x.dtype == torch.float64 else torch.float32
    if cu_seqlens is not None:
        out, per_seq = packed_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, cu_seqlens,
                                   dt_softplus, dt_limit)
        finals = per_seq
    else:
        runs = runs_of(x, seq_idx, None)
        rows = [r for r in range(b) for a, e in runs[r] for _ in range(a, e)]
        times = [t for r in range(b) for a, e in runs[r] for t in range(a, e)]
        index = (torch.tensor(rows, dtype=torch.long, device=x.device),
                 torch.tensor(times, dtype=torch.long, device=x.device))
        offsets = [0]
        for a, e in (run for r in range(b) for run in runs[r]):
            offsets.append(offsets[-1] + e - a)
        h0 = None
        if initial_states is not None:
            first = [i == 0 for r in range(b) for i in range(len(runs[r]))]
            owner = [r for r in range(b) for _ in runs[r]]
            h0 = torch.stack([initial_states[r] if is_first else torch.zeros_like(initial_states[r])
                              for r, is_first in zip(owner, first)]) if owner else initial_states[:0]

        def pack(X):
            return None if X is None else X[index][None]

        packed_out, per_run = packed_scan(pack(x), pack(dt), A, pack(B), pack(C), chunk_size, D, pack(z), dt_bias, h0,
                                          torch.tensor(offsets, dtype=torch.int32, device=x.device), dt_softplus,
                                          dt_limit)
        out = x.new_zeros(b, l, h, p).index_put(index, packed_out[0])
        finals, k = [], 0
        for r in range(b):
            k += len(runs[r])
            if runs[r]:
                finals.append(per_run[k - 1])
            else:
                finals.append(initial_states[r].to(f) if initial_states is not None
                              else x.new_zeros(h, p, n, dtype=f))
        finals = torch.stack(finals)
        per_seq = None
    res = [out]
    if return_final_states:
        res.append(finals)
    if return_varlen_states:
        res.append(per_seq)
    return res[0] if len(res) == 1 else tuple(res)


def check_step_indexed(state, x, state_batch_indices, dims):
    """Front-door checks of ssd_state_update's (slots, h, p, n) cache and its state_batch_indices (b,)
    int32 (impls/frontdoor.py's check_state_batch_indices: an index >= slots or a slot used twice
    is a ValueError; negative marks a padding row). Returns dims with ``slots`` and ``indices``."""
    where = "ssd_state_update"
    check_tensor(where, "state", state)
    check_device(where, "state", state, x.device)
    h, p, n = dims["h"], dims["p"], dims["n"]
    if state.dim() != 4:
        fail(ValueError, where, "state", f"a cache (slots, h={h}, p={p}, n={n})", tuple(state.shape))
    check_shape(where, "state", state, (state.shape[0], h, p, n), ("slots", "h", "p", "n"))
    check_dtype(where, "state", state, (dims["compute_dtype"],), f"the compute dtype for x in {dims['input_dtype']}")
    indices = check_state_batch_indices(where, state_batch_indices, dims["b"], state.shape[0], x.device)
    return dict(dims, slots=state.shape[0], indices=indices)


def indexed_step(step, cache, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                 dt_limit=(0.0, float("inf")), state_batch_indices=None):
    """One decoding step of ``step`` (an ssd_state_update) over a (slots, h, p, n) cache: row r reads
    and writes slot state_batch_indices[r]; a negative index is a padding row, output zeros, no slot
    touched. The rows' slots are gathered, stepped together, and scattered back. x: (b, h, p);
    dt: (b, h); B, C: (b, g, n); z: (b, h, p). Returns y (b, h, p) in x's dtype."""
    rows = (state_batch_indices >= 0).nonzero().squeeze(1)
    slots = state_batch_indices[rows].long()
    y = x.new_zeros(x.shape)
    if rows.numel():
        def take(X):
            return None if X is None else X[rows]
        s = cache[slots]
        y[rows] = step(s, take(x), take(dt), A, take(B), take(C), D, take(z), dt_bias, dt_softplus, dt_limit)
        cache[slots] = s
    return y
