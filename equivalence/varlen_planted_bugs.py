"""Plausible packed-sequence bugs, planted on purpose: the varlen properties must reject each one,
in every family. The family-neutral part; each family's folder plants them in its own packed scan
(a loop over tokens, chunks of CHUNK tokens laid over the whole packed sequence, as the official
kernels lay them) and its batch-indexed decoding step, through the helpers here, and may add bugs
of its own (Mamba-3's angle and v state). A state is one tensor or a tuple of parts (Mamba-3's).

Each bug is one realistic mistake reported publicly for some kernel. ``correct`` is the same code
without a mistake: the control.

    leak_across_boundary      a sequence starts from the state the one before it ended in
    decay_from_chunk_start    a sequence starting mid-chunk has its initial state decayed from the
                              chunk's start, through the tokens of the sequence before it
    final_state_at_chunk_end  the last state of sequence i read at the end of the chunk holding its
                              last token, not at that token
    boundary_ignored_in_dB    values right; dL/dB from an adjoint that crosses the boundaries (the
                              official SSD backward's wrong dB with seq_idx)
    padding_rows_updated      decoding: a padding row (index -1) advances slot -1, the last slot
"""

import functools

import torch

from .varlen import row, run_sequences

CHUNK = 8

BUGS = ("leak_across_boundary", "decay_from_chunk_start", "final_state_at_chunk_end", "boundary_ignored_in_dB",
        "padding_rows_updated")


def run_packed(bug, offsets, h0s, advance, decay_over, reset=True):
    """The packed recurrence (equivalence/varlen.py: run_sequences) with ``bug`` planted: returns
    (the state after each token, each sequence's last state). decay_over(h, a, e): the state h
    decayed through tokens a..e-1; reset=False: no sequence but the first starts from its own state."""
    def start(i, a, h):
        if i > 0 and (not reset or bug == "leak_across_boundary"):
            return h
        if bug == "decay_from_chunk_start" and a % CHUNK:
            return decay_over(row(h0s, i), a - a % CHUNK, a)      # the wrong tokens' decay
        return row(h0s, i)

    states, _, lasts = run_sequences(offsets, h0s, advance, start)
    if bug == "final_state_at_chunk_end":   # the state after the chunk's last token, whoever's it is
        l = offsets[-1]
        lasts = [states[min(-(-e // CHUNK) * CHUNK, l) - 1] if e > a else last
                 for last, a, e in zip(lasts, offsets, offsets[1:])]
    return states, lasts


def each_part(f, *states):
    """f applied to states, or to each part of states that are tuples of parts."""
    if isinstance(states[0], tuple):
        return tuple(f(*p) for p in zip(*states))
    return f(*states)


def detached(a):
    """A tensor, or each tensor of a tuple of them (a state's parts), detached; anything else as it is."""
    if isinstance(a, torch.Tensor):
        return a.detach()
    if isinstance(a, tuple) and a and all(isinstance(t, torch.Tensor) for t in a):
        return tuple(t.detach() for t in a)
    return a


def zero_valued(t):
    """A term whose value is exactly 0 and whose gradient is t's (non-finite values dropped)."""
    return torch.nan_to_num(t - t.detach(), nan=0.0, posinf=0.0, neginf=0.0)


def scan_packed(bug, tokens, args, b_index):
    """(y, last states) of tokens(bug, *args) with ``bug``; boundary_ignored_in_dB: values from the
    correct scan with B (args[b_index]) held constant, dL/dB alone from a scan that never resets (its
    adjoint crosses every boundary), added as a term whose value is exactly zero."""
    if bug != "boundary_ignored_in_dB":
        return tokens(bug, *args)
    held = list(args)
    held[b_index] = args[b_index].detach()
    y, last = tokens(None, *held)
    frozen = [detached(a) for a in args]
    frozen[b_index] = args[b_index]
    y_leak, last_leak = tokens(None, *frozen, reset=False)
    return y + zero_valued(y_leak), each_part(lambda s, leak: s + zero_valued(leak), last, last_leak)


def indexed_step(bug, state, y, state_batch_indices, step_rows):
    """A batch-indexed decoding step: gather the rows' slots of ``state`` (a tensor or a tuple of
    parts), step_rows(their states, rows) -> (the rows' outputs, their new states), scatter back.
    y: the outputs (rows, ...), zeros; a padding row's (index -1) stays zero."""
    index = torch.arange(y.shape[0]) if state_batch_indices is None else state_batch_indices.long()
    rows = torch.arange(y.shape[0]) if bug == "padding_rows_updated" else (index >= 0).nonzero().squeeze(1)
    slots = index[rows]                                      # -1 is the last slot, in torch as in Python
    if rows.numel():
        y[rows], new = step_rows(each_part(lambda s: s[slots], state), rows)
        for s, n in zip(*(x if isinstance(x, tuple) else (x,) for x in (state, new))):
            s[slots] = n
        y[index < 0] = 0
    return y


def planted(scan, step, bugs=BUGS):
    """The module-level names of a family's planted bugs: correct and correct_step (the controls),
    and ``bug`` and ``bug``_step for each of ``bugs`` (BUGS, and a family's own), from scan(bug, ...)
    and step(bug, ...)."""
    out = dict(correct=functools.partial(scan, None), correct_step=functools.partial(step, None))
    for bug in bugs:
        out[bug] = functools.partial(scan, bug)
        out[bug + "_step"] = functools.partial(step, bug)
    return out
