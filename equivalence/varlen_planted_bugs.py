"""Plausible packed-sequence bugs, planted on purpose: the varlen properties must reject each one,
in every family. The family-neutral part; each family's folder plants them in its own packed scan
(a loop over tokens, chunks of CHUNK tokens laid over the whole packed sequence, as the official
kernels lay them) and its batch-indexed decoding step, through the helpers here.

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

from .varlen import run_sequences

CHUNK = 8

BUGS = ("leak_across_boundary", "decay_from_chunk_start", "final_state_at_chunk_end", "boundary_ignored_in_dB",
        "padding_rows_updated")


def run_packed(bug, offsets, h0s, advance, decay_over, reset=True):
    """The packed recurrence (equivalence/varlen.py: run_sequences) with ``bug`` planted: returns
    (the state after each token, each sequence's last state). decay_over(a, e): the decay of a state
    through tokens a..e-1; reset=False: no sequence but the first starts from its own state."""
    def start(i, a, h):
        if i > 0 and (not reset or bug == "leak_across_boundary"):
            return h
        if bug == "decay_from_chunk_start" and a % CHUNK:
            return h0s[i:i + 1] * decay_over(a - a % CHUNK, a)      # the wrong tokens' decay
        return h0s[i:i + 1]

    states, _, lasts = run_sequences(offsets, h0s, advance, start)
    if bug == "final_state_at_chunk_end":   # the state after the chunk's last token, whoever's it is
        l = offsets[-1]
        lasts = [states[min(-(-e // CHUNK) * CHUNK, l) - 1] if e > a else last
                 for last, a, e in zip(lasts, offsets, offsets[1:])]
    return states, lasts


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
    frozen = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    frozen[b_index] = args[b_index]
    y_leak, last_leak = tokens(None, *frozen, reset=False)
    return y + zero_valued(y_leak), last + zero_valued(last_leak)


def indexed_step(bug, state, y, state_batch_indices, step_rows):
    """A batch-indexed decoding step: gather the rows' slots of ``state``, step_rows(their states,
    rows) -> (the rows' outputs, their new states), scatter back. y: the outputs (rows, ...), zeros;
    a padding row's (index -1) stays zero."""
    index = torch.arange(y.shape[0]) if state_batch_indices is None else state_batch_indices.long()
    rows = torch.arange(y.shape[0]) if bug == "padding_rows_updated" else (index >= 0).nonzero().squeeze(1)
    slots = index[rows]                                      # -1 is the last slot, in torch as in Python
    if rows.numel():
        y[rows], state[slots] = step_rows(state[slots], rows)
        y[index < 0] = 0
    return y


def planted(scan, step):
    """The module-level names of a family's planted bugs: correct and correct_step (the controls),
    and ``bug`` and ``bug``_step for each of BUGS, from scan(bug, ...) and step(bug, ...)."""
    out = dict(correct=functools.partial(scan, None), correct_step=functools.partial(step, None))
    for bug in BUGS:
        out[bug] = functools.partial(scan, bug)
        out[bug + "_step"] = functools.partial(step, bug)
    return out
