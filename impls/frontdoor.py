"""The front door's family-neutral pieces: the dtype policy, argument checks that name the argument,
and the checks of packed sequences, state caches and in-place arguments. Each family's front door
(impls/<family>/frontdoor.py) builds on them.

Glossary (every docstring in this package uses these letters):
    b      batch size
    l      sequence length (time)
    d      channels of Mamba-1 (the paper's D; ``d_inner`` in the official code)
    h, p   heads and head dimension of Mamba-2 and Mamba-3 (d = h p)
    n      state size (the paper's N; ``d_state``)
    g      groups of B/C (Mamba-1, Mamba-2): channel or head i reads group i // (d // g) or i // (h // g)
    h_qk   Mamba-3's heads of Q and K (its B and C), h_qk dividing h
    n_ang  Mamba-3's rotation angles per head, n_ang <= n / 2
    nseq   packed sequences (cu_seqlens); slots: a decode cache's rows (state_batch_indices)

Dtype policy: inputs share an *input dtype* (float16, bfloat16, float32 or float64); the *compute
dtype* is float64 for float64 inputs and float32 otherwise; parameters and states are in the compute
dtype; outputs come back in the input dtype, states in the compute dtype.

Every check raises before anything is computed or written, with a message that names the argument,
what was expected and what was given. Which argument is wrong is decided by what the others agree on,
never by trusting the first one: ``agreed_device``, ``agreed_sizes``. Arguments written in place (a
step's state) must own their memory: ``check_no_overlap``.
"""

import itertools
import math
import numbers

import torch


INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(dtype):
    """float64 stays float64 (so the loop is the float64 oracle); everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def per_channel(X, d):
    """Spread grouped B/C over channels.

    Args:
        X: (b, g, n, ...) with g dividing d
    Returns:
        (b, d, n, ...) when g > 1; X itself, (b, 1, n, ...), when g == 1 (it broadcasts over d)
    """
    g = X.shape[1]
    return X if g == 1 else X.repeat_interleave(d // g, dim=1)


def fail(exc, where, arg, expected, got):
    raise exc(f"{where}: {arg}: expected {expected}, got {got}")


def check_tensor(where, arg, x):
    if not isinstance(x, torch.Tensor):
        fail(TypeError, where, arg, "a torch.Tensor", type(x).__name__)
    if x.is_complex():
        why = " (a complex A is S4D's; these scans are real)" if arg == "A" else ""
        fail(TypeError, where, arg, f"a real floating tensor{why}", x.dtype)
    if not x.is_floating_point():
        fail(TypeError, where, arg, "a floating tensor", x.dtype)


def check_shape(where, arg, x, expected, names, sources=None):
    """x must have shape ``expected`` (sizes named ``names``). sources: {size name: the argument it
    was taken from}; a wrong size taken from another argument is reported with that argument."""
    if tuple(x.shape) != tuple(expected):
        spelled = ", ".join(f"{k}={v}" for k, v in zip(names, expected))
        why = [] if len(x.shape) != len(expected) else [
            f"{sources[k]} has {k} = {v}" for k, v, got in zip(names, expected, x.shape)
            if got != v and (sources or {}).get(k, arg) != arg]
        fail(ValueError, where, arg, f"shape ({spelled})" + (f" as {', '.join(why)}" if why else ""), tuple(x.shape))


def check_dtype(where, arg, x, allowed, why):
    if x.dtype not in allowed:
        fail(TypeError, where, arg, f"dtype {' or '.join(str(a) for a in allowed)} ({why})", x.dtype)


def check_device(where, arg, x, device):
    if x.device != device:
        fail(ValueError, where, arg, f"a tensor on {device} (the inputs' device)", x.device)


def agreed_device(where, named):
    """The device the tensors of ``named`` ({argument: tensor or None}, in the order of the public
    signature) share: the one most of them are on (on a tie, the earliest argument's). Raises
    ValueError naming a tensor on another device and the arguments it differs from."""
    tensors = {arg: t for arg, t in named.items() if t is not None}
    devices = [t.device for t in tensors.values()]
    if devices.count(devices[0]) == len(devices):  # on every call: one device
        return devices[0]
    device = max(devices, key=devices.count)  # the first of the most common
    for arg, t in tensors.items():
        if t.device != device:
            same = ", ".join(a for a, u in tensors.items() if u.device == device)
            fail(ValueError, where, arg, f"a tensor on {device}, the device of {same}", t.device)
    return device


def _fit(shape, layout, sizes):
    """How shape reads in layout (size names; a name missing from sizes fits any size): 0 exactly,
    1 the same sizes in another order (a layout mistake), 2 neither."""
    if len(shape) != len(layout):
        return 2
    expected = [sizes.get(s) for s in layout]
    if all(e is None or e == v for e, v in zip(expected, shape)):
        return 0
    left = list(shape)
    for e in expected:
        if e is not None:
            if e not in left:
                return 2
            left.remove(e)
    return 1


def _misplaced(where, arg, shape, layout, sizes, others):
    """Raise the layout mistake of ``arg``: the layout its axes hold and the transpose that fixes it."""
    expected = [sizes.get(s) for s in layout]
    # the name of each given axis: its own where its size is right, else the first unused name of
    # its size, else (a size no other argument has, a group count) the first name left
    looks = [s if e is not None and e == v else None for s, e, v in zip(layout, expected, shape)]
    for i, v in enumerate(shape):
        if looks[i] is None:
            looks[i] = next((s for s, e in zip(layout, expected) if e == v and s not in looks), None)
    for i in range(len(shape)):
        if looks[i] is None:
            looks[i] = next(s for s in layout if s not in looks)
    perm = [looks.index(s) for s in layout]
    moved = [i for i, j in enumerate(perm) if i != j]
    fix = f"transposed: pass {arg}.transpose({moved[0]}, {moved[1]})" if len(moved) == 2 else \
        f"permuted: pass {arg}.permute{tuple(perm)}"
    spelled = ", ".join(f"{s}={shape[j]}" for s, j in zip(layout, perm))
    too = "" if not others else f" ({others[0]} holds its sizes in another order too)" if len(others) == 1 else \
        f" ({', '.join(others)} hold their sizes in another order too)"
    fail(ValueError, where, arg, f"shape ({spelled})", f"{tuple(shape)}, which looks ({', '.join(looks)}), {fix}{too}")


def _most_agreeing(given, layouts, trust, votes):
    """The sizes under which the fewest arguments are wrong, then the fewest are laid out wrongly, then
    the most believed ones are right (see agreed_sizes). Returns them (a size only one argument has
    left out) and each argument's _fit under them."""
    carriers = {s: [a for a in trust if any(s in lay for lay in layouts[a])] for s in votes}
    doubted = set()  # the arguments outvoted on a size (every voter, where the vote ties)
    for vs in votes.values():
        if len(vs) > 1:
            groups = sorted(vs.values(), key=len, reverse=True)
            doubted.update(a for args in (groups if len(groups[0]) == len(groups[1]) else groups[1:]) for a in args)
    # a size is in doubt where the readings differ or only doubted arguments have it; read in another
    # order, a doubted argument may hold its right value on any axis
    fixed, disputed = {}, []
    for s, vs in votes.items():
        if len(carriers[s]) == 1:
            continue  # a group count: whatever its argument holds
        if len(vs) == 1 and not all(a in doubted for a in carriers[s]):
            fixed[s] = next(iter(vs))
        else:
            disputed.append(s)
    candidates = [list(dict.fromkeys([*sorted(votes[s], key=lambda v: -len(votes[s][v])),
                                      *(v for a in carriers[s] if a in doubted for v in given[a])])) for s in disputed]
    while math.prod(len(c) for c in candidates) > 512:  # a call wrong everywhere: drop the least voted values
        max(candidates, key=len).pop()
    best = None
    for values in itertools.product(*candidates):
        sizes = dict(fixed, **dict(zip(disputed, values)))
        fits = [min(_fit(given[a], lay, sizes) for lay in layouts[a]) for a in trust]
        key = (fits.count(2), fits.count(1), fits)
        if best is None or key < best[0]:
            best = key, sizes
    return best[1], dict(zip(trust, best[0][2]))


def agreed_sizes(where, named, layouts, prefer):
    """The sizes the arguments agree on, and for each the argument to quote in a message.

    Args:
        where: the public function's name, for the message
        named: {argument: tensor or None}, in the order of the public signature
        layouts: {argument: its layouts}, each a tuple of size names (B's (b, n, l) and (b, g, n, l));
                 an argument is read in the layout of its rank; a size only one argument has (a
                 group count) is read from it; an argument missing here is checked by the caller
        prefer: {size: argument}: the argument each size is quoted from when it agrees, and the one
                believed first when two readings explain the call equally well
    Returns:
        sizes {name: value}, sources {name: argument}. An argument that disagrees with them (a wrong
        size, or a wrong rank) is left to the caller's shape check, which names it.
    Raises:
        ValueError naming an argument whose axes hold the right sizes in another order (u given
        (b, l, d), A given (n, d)), with the transpose that fixes it and the others that share the
        mistake.

    When the readings differ, the sizes are chosen so that the fewest arguments are wrong, then the
    fewest are laid out wrongly, then the most believed ones are right: a u, delta, B and C all
    given (b, l, ...) agree with a correct A once read that way, so they are named, not A.
    """
    sizes, sources, reading = {}, {}, {}
    for arg, t in named.items():  # on every call: the readings agree
        if t is None or arg not in layouts:
            continue
        rank, lays = t.dim(), layouts[arg]
        reading[arg] = lays[0] if len(lays[0]) == rank else next((lay for lay in lays if len(lay) == rank), ())
        for s, v in zip(reading[arg], t.shape):
            if sizes.setdefault(s, v) != v:
                return _disagreeing(where, named, layouts, prefer)
            sources.setdefault(s, arg)
    sources.update({s: a for s, a in prefer.items() if s in reading.get(a, ())})
    return sizes, sources


def _disagreeing(where, named, layouts, prefer):
    """agreed_sizes where the readings differ."""
    given = {arg: tuple(t.shape) for arg, t in named.items() if t is not None and arg in layouts}
    reading = {arg: next((lay for lay in layouts[arg] if len(lay) == len(shape)), ()) for arg, shape in given.items()}
    trust = list(dict.fromkeys([*(a for a in prefer.values() if a in given), *given]))
    votes = {}  # size -> {value: the arguments reading it so, the most believed first}
    for arg in trust:
        for s, v in zip(reading[arg], given[arg]):
            votes.setdefault(s, {}).setdefault(v, []).append(arg)
    sizes, fits = _most_agreeing(given, layouts, trust, votes)
    misplaced = [arg for arg in given if fits[arg] == 1]
    if misplaced:
        arg = misplaced[0]
        lay = next(lay for lay in layouts[arg] if _fit(given[arg], lay, sizes) == 1)
        _misplaced(where, arg, given[arg], lay, sizes, misplaced[1:])
    sizes.update({s: next(iter(vs)) for s, vs in votes.items() if s not in sizes})
    sources = {}
    for s, v in sizes.items():
        voters = [a for a in votes[s].get(v, ()) if fits[a] == 0] or next(iter(votes[s].values()))
        sources[s] = prefer[s] if prefer.get(s) in voters else voters[0]
    return sizes, sources


def _span(t):
    """Bytes from t's first element to the end of its last (strides are never negative in torch)."""
    return (sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1) * t.element_size()


def _element_bytes(t):
    """Every byte address t's elements occupy, as a flat int64 tensor (only for the rare exact check)."""
    offsets = torch.arange(_span(t) // t.element_size(), dtype=torch.int64).as_strided(t.shape, t.stride())
    starts = t.data_ptr() + offsets.reshape(-1) * t.element_size()
    return (starts[:, None] + torch.arange(t.element_size())).reshape(-1)


def _internal_overlap(t):
    """Whether two elements of t share memory (a zero stride over a size > 1, expand, as_strided)."""
    reach = 0
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride <= reach:  # not provably disjoint from the dims below: decide exactly
            return _element_bytes(t).unique().numel() < t.numel() * t.element_size()
        reach += stride * (size - 1)
    return False


def _shares_memory(a, b):
    """Whether a and b have an element byte in common (ranges first; exact only when they intersect)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    pa, pb = a.data_ptr(), b.data_ptr()
    if pa + _span(a) <= pb or pb + _span(b) <= pa:
        return False
    return bool(torch.isin(_element_bytes(a), _element_bytes(b)).any())


def check_no_overlap(where, written, read):
    """Arguments written in place must own their memory, before anything runs.

    Args:
        where: the public function's name, for the message
        written: {argument name: tensor or None} of arguments the call writes (the step's ``state``)
        read: {argument name: tensor or None} of every other tensor argument
    Raises:
        ValueError naming the argument: a written tensor with internal overlap (elements sharing
        memory, as ``torch.full(...).expand(...)`` makes: every channel's update would land in one
        row), or one sharing memory with another argument (the kernel would read what it has just
        overwritten). Disjoint views of one buffer are fine.
    """
    for arg, t in written.items():
        if t is None or t.numel() == 0:
            continue
        if _internal_overlap(t):
            fail(ValueError, where, arg, "a tensor whose elements do not share memory (it is written in place)",
                  f"internal overlap: shape {tuple(t.shape)} with strides {t.stride()}")
        for other, u in {**written, **read}.items():
            if other != arg and isinstance(u, torch.Tensor) and _shares_memory(t, u):
                fail(ValueError, where, arg, "memory of its own (it is written in place)",
                      f"memory shared with {other}")


def check_bool(where, arg, value):
    """A flag (delta_softplus, dt_softplus) must be a bool: "yes", 0 or a tensor would be read by
    truthiness, "no" as True. Raises TypeError naming the argument."""
    if not isinstance(value, bool):
        fail(TypeError, where, arg, "a bool (True or False)", f"{type(value).__name__} {value!r}")


def check_chunk_size(where, chunk_size):
    """chunk_size must be a positive integer (a bool is refused: True would read as 1). Returns it as an int."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        fail(TypeError, where, "chunk_size", "a positive integer", repr(chunk_size))
    if chunk_size < 1:
        fail(ValueError, where, "chunk_size", "a positive integer", repr(chunk_size))
    return int(chunk_size)


def check_result(where, impl, arg, x, shape, dtype):
    """An implementation's output must have the promised shape and dtype: never pass on a wrong one."""
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(shape) or x.dtype != dtype:
        got = (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
        raise RuntimeError(f"{where}: implementation {impl!r} returned {arg} {got}, "
                           f"expected shape {tuple(shape)} and dtype {dtype}")


def check_cu_seqlens(where, cu_seqlens, b, l, device):
    """Validate the offsets of packed sequences laid end to end along time.

    Args:
        where: the public function's name, for the message
        cu_seqlens: (nseq + 1,) int32 on the inputs' device: 0, then each sequence's end, the last
                    equal to l (the official ``cu_seqlens`` of varlen attention and Mamba-2)
        b: the inputs' batch size, which must be 1 (sequences are packed along time, not batch)
        l: the packed length
    Returns:
        nseq, and the offsets as a Python list (read once: on a GPU, one synchronisation)
    Raises:
        TypeError if cu_seqlens is not a tensor; ValueError naming cu_seqlens for the wrong dtype or
        rank, another device, b != 1, a first offset other than 0, a decrease, or a last offset
        other than l.
    """
    arg = "cu_seqlens"
    if not isinstance(cu_seqlens, torch.Tensor):
        fail(TypeError, where, arg, "a torch.Tensor", type(cu_seqlens).__name__)
    if cu_seqlens.dtype != torch.int32:
        fail(ValueError, where, arg, "dtype torch.int32", cu_seqlens.dtype)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        fail(ValueError, where, arg, "shape (nseq + 1,), at least one offset", tuple(cu_seqlens.shape))
    check_device(where, arg, cu_seqlens, device)
    if b != 1:
        fail(ValueError, where, arg, "packed inputs with batch size b=1 (sequences laid end to end in time)", f"b={b}")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        fail(ValueError, where, arg, "a first offset of 0", offsets[0])
    for i, (s, e) in enumerate(zip(offsets, offsets[1:])):
        if e < s:
            fail(ValueError, where, arg, "non-decreasing offsets", f"cu_seqlens[{i + 1}]={e} < cu_seqlens[{i}]={s}")
    if offsets[-1] != l:
        fail(ValueError, where, arg, f"a last offset equal to the packed length l={l}", offsets[-1])
    return len(offsets) - 1, offsets


def check_state_batch_indices(where, state_batch_indices, b, slots, device):
    """Validate the cache slot of each row of a batch-indexed decoding step.

    Args:
        state_batch_indices: (b,) int32 on the inputs' device; row i reads and writes cache slot
                             state_batch_indices[i]; a negative value marks a padding row (its
                             output is zeros, no slot is touched), as in the official step
        b: the batch size of the step's inputs; slots: the state cache's first dimension
    Returns:
        the indices as a Python list
    Raises:
        TypeError if not a tensor; ValueError naming state_batch_indices for the wrong dtype or
        shape, another device, an index >= slots, or a slot given to two rows (the result would
        depend on the order of the writes).
    """
    arg = "state_batch_indices"
    if not isinstance(state_batch_indices, torch.Tensor):
        fail(TypeError, where, arg, "a torch.Tensor", type(state_batch_indices).__name__)
    if state_batch_indices.dtype != torch.int32:
        fail(ValueError, where, arg, "dtype torch.int32", state_batch_indices.dtype)
    if tuple(state_batch_indices.shape) != (b,):
        fail(ValueError, where, arg, f"shape (b={b},)", tuple(state_batch_indices.shape))
    check_device(where, arg, state_batch_indices, device)
    indices = state_batch_indices.tolist()
    for i, s in enumerate(indices):
        if s >= slots:
            fail(ValueError, where, arg, f"slots below the cache's {slots} (negative: a padding row)",
                  f"state_batch_indices[{i}]={s}")
    used = [s for s in indices if s >= 0]
    if len(set(used)) != len(used):
        fail(ValueError, where, arg, "each cache slot at most once", indices)
    return indices
