"""The front door: argument checking and the dtype policy shared by every implementation.

Glossary (used in every docstring of this package, after the Mamba paper, Gu & Dao 2023):
    b  batch size
    d  channels (the paper's D; ``d_inner`` in the official code)
    l  sequence length (time)
    n  state size per channel (the paper's N; ``d_state``)
    g  groups of B/C: channel c reads group c // (d // g); g divides d

Dtype policy:
    u, delta, z share the *input dtype* (float16, bfloat16, float32 or float64).
    The *compute dtype* is float64 for float64 inputs and float32 otherwise.
    B and C are in the input dtype or the compute dtype; A, D, delta_bias and any state are in the
    compute dtype (float32 parameters for half inputs, as the official kernels expect).
    y comes back in the input dtype, last_state in the compute dtype.

Every check raises before anything is computed or written, with a message that names the
argument, what was expected and what was given. Arguments written in place (the step's ``state``)
must own their memory: ``check_no_overlap``, reusable by any front door with output arguments.
"""

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


def _fail(exc, where, arg, expected, got):
    raise exc(f"{where}: {arg}: expected {expected}, got {got}")


def _tensor(where, arg, x):
    if not isinstance(x, torch.Tensor):
        _fail(TypeError, where, arg, "a torch.Tensor", type(x).__name__)
    if x.is_complex():
        _fail(TypeError, where, arg, "a real floating tensor (complex A is S4D, not Mamba-1)", x.dtype)
    if not x.is_floating_point():
        _fail(TypeError, where, arg, "a floating tensor", x.dtype)


def _shape(where, arg, x, expected, names, sources=None):
    """x must have shape ``expected`` (sizes named ``names``). sources: {size name: the argument it
    was taken from}; a wrong size taken from another argument is reported with that argument."""
    if tuple(x.shape) != tuple(expected):
        spelled = ", ".join(f"{k}={v}" for k, v in zip(names, expected))
        why = [] if len(x.shape) != len(expected) else [
            f"{sources[k]} has {k} = {v}" for k, v, got in zip(names, expected, x.shape)
            if got != v and (sources or {}).get(k, arg) != arg]
        _fail(ValueError, where, arg, f"shape ({spelled})" + (f" as {', '.join(why)}" if why else ""), tuple(x.shape))


def _dtype(where, arg, x, allowed, why):
    if x.dtype not in allowed:
        _fail(TypeError, where, arg, f"dtype {' or '.join(str(a) for a in allowed)} ({why})", x.dtype)


def _device(where, arg, x, device):
    if x.device != device:
        _fail(ValueError, where, arg, f"a tensor on {device} (the device of the first input)", x.device)


def _groups(where, arg, X, b, d, n, tail, tail_names, sources=None):
    """B/C: (b, n, *tail) or (b, g, n, *tail) with g dividing d. Returns g (1 when ungrouped)."""
    if X.dim() == 2 + len(tail):
        _shape(where, arg, X, (b, n, *tail), ("b", "n", *tail_names), sources)
        return 1
    if X.dim() == 3 + len(tail):
        g = X.shape[1]
        if g < 1 or d % g != 0:
            _fail(ValueError, where, arg, f"a group count g that divides d={d}", f"g={g}")
        _shape(where, arg, X, (b, g, n, *tail), ("b", "g", "n", *tail_names), sources)
        return g
    ranks = f"rank {2 + len(tail)} (b, n{''.join(', ' + t for t in tail_names)}) or {3 + len(tail)} (b, g, n, ...)"
    _fail(ValueError, where, arg, ranks, f"rank {X.dim()} with shape {tuple(X.shape)}")


# Each argument's sizes, for the arguments sizes are taken from (the rest are checked in _check).
_LAYOUTS = {"u": ("b", "d", "l"), "x": ("b", "d"), "A": ("d", "n"), "state": ("b", "d", "n")}


def _swapped_layout(where, named, lead, has_time, d):
    """Where A's rows are not d, name a swapped layout if the other sizes show one, before the shape
    check blames A for it: the step's state given as (b, n, d), A given as (n, d) (its columns are d
    and its rows B's n), or u and delta in the model's (b, l, d) layout (u's last axis is A's d and its
    middle axis B's l)."""
    A, B, x = named["A"], named["B"], named[lead]
    B_n, B_l = (B.shape[-2], B.shape[-1]) if has_time and B.dim() >= 3 else (B.shape[-1], None)
    state = named.get("state")
    if state is not None and A.shape[1] == B_n and tuple(state.shape[1:]) == (A.shape[1], A.shape[0]):
        # the step reads d from state: a (b, n, d) state would make a correct A look wrong
        _fail(ValueError, where, "state", f"shape (b, d={A.shape[0]}, n={A.shape[1]}); it looks (b, n, d): "
              f"pass a state laid out (b, d, n)", tuple(state.shape))
    if A.shape[1] == d and A.shape[0] == B_n:
        _fail(ValueError, where, "A", f"shape (d={d}, n={B_n}), not transposed: A.shape is (n, d) here; pass A.t()",
              tuple(A.shape))
    if has_time and x.shape[-1] == A.shape[0] and x.shape[1] == B_l:
        _fail(ValueError, where, lead, f"layout (b, d, l); it looks (b, l, d), its last axis A's d = {A.shape[0]} "
              f"and its middle one B's l = {B_l}: pass {lead}.transpose(1, 2) (and delta, z likewise)",
              tuple(x.shape))


def _check(where, named, lead, lead_names, has_time, sizes_from=None):
    """Shared checks for the scan (inputs carry a time axis l) and the step (they don't).

    named: dict argument name -> tensor or None, in the order of the public signature;
    lead:  the name of the first input (u for the scan, x for the step), whose shape is (b, d, *time)
           and whose dtype is the input dtype;
    sizes_from: {size: argument} where each size (b, d, n, l) is taken from, before anything else is
           checked against it (default: b, d and l from lead, n from A). The scan takes them from u
           and A; the step takes b and d from state, the argument it writes, and n from A. A wrong
           size elsewhere is reported on that argument, naming where the size came from.
    Returns dict(b, d, n, l, g_B, g_C, input_dtype, compute_dtype).
    """
    for arg, x in named.items():
        if x is not None:
            _tensor(where, arg, x)
    x0 = named[lead]
    layouts = dict(_LAYOUTS, **{lead: lead_names})
    sources = {"b": lead, "d": lead, "n": "A", **({"l": lead} if has_time else {}), **(sizes_from or {})}
    for arg in dict.fromkeys((lead, *sources.values())):  # the ranks of the arguments sizes are read from
        t, layout = named[arg], layouts[arg]
        if t.dim() != len(layout):
            _fail(ValueError, where, arg, f"rank {len(layout)} ({', '.join(layout)})", f"rank {t.dim()} with shape {tuple(t.shape)}")
    sizes = {size: named[arg].shape[layouts[arg].index(size)] for size, arg in sources.items()}
    b, d, n = sizes["b"], sizes["d"], sizes["n"]
    time = (sizes["l"],) if has_time else ()
    A = named["A"]
    if A.shape[0] != d:
        _swapped_layout(where, named, lead, has_time, d)
    _shape(where, "A", A, (d, n), ("d", "n"), sources)
    if n < 1:
        _fail(ValueError, where, "A", "at least one state (n >= 1)", tuple(A.shape))

    in_dtype = x0.dtype
    _dtype(where, lead, x0, INPUT_DTYPES, "the input dtype")
    f = compute_dtype(in_dtype)
    full = (b, d, *time)
    tail_names = ("l",) if has_time else ()
    full_names = ("b", "d", *tail_names)
    groups = {}
    for arg, x in named.items():
        if x is None:
            continue
        _device(where, arg, x, x0.device)
        if arg in ("u", "x", "delta", "dt", "z"):
            _shape(where, arg, x, full, full_names, sources)
            _dtype(where, arg, x, (in_dtype,), f"the dtype of {lead}")
        elif arg in ("B", "C"):
            groups[arg] = _groups(where, arg, x, b, d, n, time, tail_names, sources)
            _dtype(where, arg, x, tuple(dict.fromkeys((in_dtype, f))), f"the input or compute dtype for {lead} in {in_dtype}")
        elif arg in ("D", "delta_bias", "dt_bias"):
            _shape(where, arg, x, (d,), ("d",), sources)
            _dtype(where, arg, x, (f,), f"the compute dtype for {lead} in {in_dtype}")
        elif arg in ("initial_state", "state"):
            _shape(where, arg, x, (b, d, n), ("b", "d", "n"), sources)
            _dtype(where, arg, x, (f,), f"the compute dtype for {lead} in {in_dtype}")
        elif arg == "A":
            _dtype(where, arg, x, (f,), f"the compute dtype for {lead} in {in_dtype}")
    return dict(b=b, d=d, n=n, l=time[0] if time else 1, g_B=groups["B"], g_C=groups["C"],
                input_dtype=in_dtype, compute_dtype=f)


def check_scan(u, delta, A, B, C, D, z, delta_bias, initial_state):
    """Validate selective_scan arguments (shapes in impls.selective_scan). Returns the sizes and dtypes."""
    named = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state)
    return _check("selective_scan", named, "u", ("b", "d", "l"), True)


# Arguments' signatures that passed check_step -> what it returned. A decoding step is called once
# per layer per token with the same shapes, and the checks in _check (a dozen Python-level passes,
# about 16 µs) cost a third of the small model's scan step. Every check reads only each argument's
# type, shape, dtype and device (is_complex and is_floating_point follow from the dtype), so a call
# whose arguments have exactly the signature of one that passed passes the same checks: looking the
# signature up is each of those checks, made on every call. Any other signature runs _check in full,
# which raises with its usual message or is remembered.
_STEP_PASSED = {}
_STEP_PASSED_MAX = 256  # forgotten all at once beyond this (property tests draw many shapes)


def _signature(args):
    """(type, shape, dtype, device) of each argument, None for None: what the checks read."""
    return tuple(None if t is None else (type(t), t.shape, t.dtype, t.device) for t in args)


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
            _fail(ValueError, where, arg, "a tensor whose elements do not share memory (it is written in place)",
                  f"internal overlap: shape {tuple(t.shape)} with strides {t.stride()}")
        for other, u in {**written, **read}.items():
            if other != arg and isinstance(u, torch.Tensor) and _shares_memory(t, u):
                _fail(ValueError, where, arg, "memory of its own (it is written in place)",
                      f"memory shared with {other}")


def check_step(state, x, dt, A, B, C, D, z, dt_bias):
    """Validate selective_state_update arguments (shapes in impls.selective_state_update).
    Returns dict(b, d, n, l, g_B, g_C, input_dtype, compute_dtype), as the scan's check does."""
    try:
        key = _signature((state, x, dt, A, B, C, D, z, dt_bias))
        dims = _STEP_PASSED.get(key)
    except Exception:  # an argument without these attributes, or unhashable ones: not a tensor, checked below
        key = dims = None
    if dims is not None:
        # the signature says nothing about memory: aliasing is checked on every call
        check_no_overlap("selective_state_update", dict(state=state), dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias))
        return dict(dims)
    if not isinstance(state, torch.Tensor):
        _fail(TypeError, "selective_state_update", "state", "a torch.Tensor", type(state).__name__)
    named = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, state=state)
    dims = _check("selective_state_update", named, "x", ("b", "d"), False, dict(b="state", d="state"))
    check_no_overlap("selective_state_update", dict(state=state), dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias))
    if key is not None:
        if len(_STEP_PASSED) >= _STEP_PASSED_MAX:
            _STEP_PASSED.clear()
        _STEP_PASSED[key] = dims
    return dict(dims)


def check_bool(where, arg, value):
    """A flag (delta_softplus, dt_softplus) must be a bool: "yes", 0 or a tensor would be read by
    truthiness, "no" as True. Raises TypeError naming the argument."""
    if not isinstance(value, bool):
        _fail(TypeError, where, arg, "a bool (True or False)", f"{type(value).__name__} {value!r}")


def check_result(where, impl, arg, x, shape, dtype):
    """An implementation's output must have the promised shape and dtype: never pass on a wrong one."""
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(shape) or x.dtype != dtype:
        got = (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
        raise RuntimeError(f"{where}: implementation {impl!r} returned {arg} {got}, "
                           f"expected shape {tuple(shape)} and dtype {dtype}")


# --- packed variable-length sequences and batch-indexed decoding (the varlen issue) -----------
# Both helpers are family-neutral (the SSD front door can import them): they check only the index
# tensors, against sizes the caller has already checked.

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
        _fail(TypeError, where, arg, "a torch.Tensor", type(cu_seqlens).__name__)
    if cu_seqlens.dtype != torch.int32:
        _fail(ValueError, where, arg, "dtype torch.int32", cu_seqlens.dtype)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        _fail(ValueError, where, arg, "shape (nseq + 1,), at least one offset", tuple(cu_seqlens.shape))
    _device(where, arg, cu_seqlens, device)
    if b != 1:
        _fail(ValueError, where, arg, "packed inputs with batch size b=1 (sequences laid end to end in time)", f"b={b}")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        _fail(ValueError, where, arg, "a first offset of 0", offsets[0])
    for i, (s, e) in enumerate(zip(offsets, offsets[1:])):
        if e < s:
            _fail(ValueError, where, arg, "non-decreasing offsets", f"cu_seqlens[{i + 1}]={e} < cu_seqlens[{i}]={s}")
    if offsets[-1] != l:
        _fail(ValueError, where, arg, f"a last offset equal to the packed length l={l}", offsets[-1])
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
        _fail(TypeError, where, arg, "a torch.Tensor", type(state_batch_indices).__name__)
    if state_batch_indices.dtype != torch.int32:
        _fail(ValueError, where, arg, "dtype torch.int32", state_batch_indices.dtype)
    if tuple(state_batch_indices.shape) != (b,):
        _fail(ValueError, where, arg, f"shape (b={b},)", tuple(state_batch_indices.shape))
    _device(where, arg, state_batch_indices, device)
    indices = state_batch_indices.tolist()
    for i, s in enumerate(indices):
        if s >= slots:
            _fail(ValueError, where, arg, f"slots below the cache's {slots} (negative: a padding row)",
                  f"state_batch_indices[{i}]={s}")
    used = [s for s in indices if s >= 0]
    if len(set(used)) != len(used):
        _fail(ValueError, where, arg, "each cache slot at most once", indices)
    return indices


def check_scan_packed(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens):
    """check_scan for packed inputs: u (1, d, l), initial_state (nseq, d, n), cu_seqlens (nseq + 1,).
    Returns check_scan's dict with nseq and offsets (the list) added."""
    where = "selective_scan"
    named = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    dims = _check(where, named, "u", ("b", "d", "l"), True)
    nseq, offsets = check_cu_seqlens(where, cu_seqlens, dims["b"], dims["l"], u.device)
    if initial_state is not None:
        _tensor(where, "initial_state", initial_state)
        _device(where, "initial_state", initial_state, u.device)
        _shape(where, "initial_state", initial_state, (nseq, dims["d"], dims["n"]), ("nseq", "d", "n"))
        _dtype(where, "initial_state", initial_state, (dims["compute_dtype"],), f"the compute dtype for u in {u.dtype}")
    return dict(dims, nseq=nseq, offsets=offsets)


def check_step_indexed(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices):
    """check_step for a (slots, d, n) state cache read and written through state_batch_indices (b,).
    Returns check_step's dict with slots and indices (the list) added."""
    where = "selective_state_update"
    if not isinstance(state, torch.Tensor):
        _fail(TypeError, where, "state", "a torch.Tensor", type(state).__name__)
    named = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)
    dims = _check(where, named, "x", ("b", "d"), False)
    _tensor(where, "state", state)
    _device(where, "state", state, x.device)
    if state.dim() != 3:
        _fail(ValueError, where, "state", f"shape (slots, d={dims['d']}, n={dims['n']})", tuple(state.shape))
    _shape(where, "state", state, (state.shape[0], dims["d"], dims["n"]), ("slots", "d", "n"))
    _dtype(where, "state", state, (dims["compute_dtype"],), f"the compute dtype for x in {x.dtype}")
    indices = check_state_batch_indices(where, state_batch_indices, dims["b"], state.shape[0], x.device)
    check_no_overlap(where, dict(state=state), dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias))
    return dict(dims, slots=state.shape[0], indices=indices)
