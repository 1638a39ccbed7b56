"""The Mamba-1 front door: the checks of selective_scan and selective_state_update's arguments
(shapes in impls/selective/__init__.py; letters and dtype policy in impls/frontdoor.py).

The Mamba-1 dtype detail: B and C may be in the input dtype or the compute dtype; A, D, delta_bias
and any state are in the compute dtype (float32 parameters for half inputs, as the official kernels
expect).
"""

import torch

from ..frontdoor import (INPUT_DTYPES, agreed_device, agreed_sizes, check_cu_seqlens, check_device, check_dtype,
                         check_no_overlap, check_shape, check_state_batch_indices, check_tensor, compute_dtype, fail)


def _groups(where, arg, X, b, d, n, tail, tail_names, sources=None):
    """B/C: (b, n, *tail) or (b, g, n, *tail) with g dividing d. Returns g (1 when ungrouped)."""
    if X.dim() == 2 + len(tail):
        check_shape(where, arg, X, (b, n, *tail), ("b", "n", *tail_names), sources)
        return 1
    if X.dim() == 3 + len(tail):
        g = X.shape[1]
        if g < 1 or d % g != 0:
            fail(ValueError, where, arg, f"a group count g that divides d={d}", f"g={g}")
        check_shape(where, arg, X, (b, g, n, *tail), ("b", "g", "n", *tail_names), sources)
        return g
    ranks = f"rank {2 + len(tail)} (b, n{''.join(', ' + t for t in tail_names)}) or {3 + len(tail)} (b, g, n, ...)"
    fail(ValueError, where, arg, ranks, f"rank {X.dim()} with shape {tuple(X.shape)}")


def _layouts(time):
    """Each argument's layouts (size names), time = ("l",) for the scan and () for the step."""
    full = (("b", "d", *time),)
    return dict(u=full, x=full, delta=full, dt=full, z=full, A=(("d", "n"),),
                B=(("b", "n", *time), ("b", "g_B", "n", *time)), C=(("b", "n", *time), ("b", "g_C", "n", *time)),
                D=(("d",),), delta_bias=(("d",),), dt_bias=(("d",),),
                initial_state=(("b", "d", "n"),), state=(("b", "d", "n"),))


_LAYOUTS = {True: _layouts(("l",)), False: _layouts(())}  # by has_time: built once, read on every call


def _check(where, named, lead, has_time, sizes_from=None):
    """Shared checks for the scan (inputs carry a time axis l) and the step (they don't).

    named: dict argument name -> tensor or None, in the order of the public signature;
    lead:  the name of the first input (u for the scan, x for the step), whose shape is (b, d, *time)
           and whose dtype is the input dtype;
    sizes_from: {size: argument} each size (b, d, n, l) is quoted from (default: b, d and l from lead,
           n from A; the step quotes b and d from state, the argument it writes). The sizes are
           those the arguments agree on (impls.frontdoor.agreed_sizes): an argument that disagrees
           with the others is named, whichever it is.
    Returns dict(b, d, n, l, g_B, g_C, input_dtype, compute_dtype).
    """
    for arg, x in named.items():
        if x is not None:
            check_tensor(where, arg, x)
    agreed_device(where, named)
    x0 = named[lead]
    layouts = _LAYOUTS[has_time]
    prefer = {"b": lead, "d": lead, "n": "A", **({"l": lead} if has_time else {}), **(sizes_from or {})}
    for arg in dict.fromkeys((lead, *prefer.values())):  # the ranks of the arguments every size is on
        t, layout = named[arg], layouts[arg][0]
        if t.dim() != len(layout):
            fail(ValueError, where, arg, f"rank {len(layout)} ({', '.join(layout)})", f"rank {t.dim()} with shape {tuple(t.shape)}")
    sizes, sources = agreed_sizes(where, named, layouts, prefer)
    b, d, n = sizes["b"], sizes["d"], sizes["n"]
    time = (sizes["l"],) if has_time else ()
    A = named["A"]
    check_shape(where, "A", A, (d, n), ("d", "n"), sources)
    if n < 1:
        fail(ValueError, where, "A", "at least one state (n >= 1)", tuple(A.shape))

    in_dtype = x0.dtype
    check_dtype(where, lead, x0, INPUT_DTYPES, "the input dtype")
    f = compute_dtype(in_dtype)
    full = (b, d, *time)
    tail_names = ("l",) if has_time else ()
    full_names = ("b", "d", *tail_names)
    groups = {}
    for arg, x in named.items():
        if x is None:
            continue
        if arg in ("u", "x", "delta", "dt", "z"):
            check_shape(where, arg, x, full, full_names, sources)
            check_dtype(where, arg, x, (in_dtype,), f"the dtype of {lead}")
        elif arg in ("B", "C"):
            groups[arg] = _groups(where, arg, x, b, d, n, time, tail_names, sources)
            check_dtype(where, arg, x, tuple(dict.fromkeys((in_dtype, f))), f"the input or compute dtype for {lead} in {in_dtype}")
        elif arg in ("D", "delta_bias", "dt_bias"):
            check_shape(where, arg, x, (d,), ("d",), sources)
            check_dtype(where, arg, x, (f,), f"the compute dtype for {lead} in {in_dtype}")
        elif arg in ("initial_state", "state"):
            check_shape(where, arg, x, (b, d, n), ("b", "d", "n"), sources)
            check_dtype(where, arg, x, (f,), f"the compute dtype for {lead} in {in_dtype}")
        elif arg == "A":
            check_dtype(where, arg, x, (f,), f"the compute dtype for {lead} in {in_dtype}")
    return dict(b=b, d=d, n=n, l=time[0] if time else 1, g_B=groups["B"], g_C=groups["C"],
                input_dtype=in_dtype, compute_dtype=f)


def check_scan(u, delta, A, B, C, D, z, delta_bias, initial_state):
    """Validate selective_scan arguments (shapes in impls.selective_scan). Returns the sizes and dtypes."""
    named = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state)
    return _check("selective_scan", named, "u", True)


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
        fail(TypeError, "selective_state_update", "state", "a torch.Tensor", type(state).__name__)
    named = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, state=state)
    dims = _check("selective_state_update", named, "x", False, dict(b="state", d="state"))
    check_no_overlap("selective_state_update", dict(state=state), dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias))
    if key is not None:
        if len(_STEP_PASSED) >= _STEP_PASSED_MAX:
            _STEP_PASSED.clear()
        _STEP_PASSED[key] = dims
    return dict(dims)


def check_scan_packed(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens):
    """check_scan for packed inputs: u (1, d, l), initial_state (nseq, d, n), cu_seqlens (nseq + 1,).
    Returns check_scan's dict with nseq and offsets (the list) added."""
    where = "selective_scan"
    named = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    dims = _check(where, named, "u", True)
    nseq, offsets = check_cu_seqlens(where, cu_seqlens, dims["b"], dims["l"], u.device)
    if initial_state is not None:
        check_tensor(where, "initial_state", initial_state)
        check_device(where, "initial_state", initial_state, u.device)
        check_shape(where, "initial_state", initial_state, (nseq, dims["d"], dims["n"]), ("nseq", "d", "n"))
        check_dtype(where, "initial_state", initial_state, (dims["compute_dtype"],), f"the compute dtype for u in {u.dtype}")
    return dict(dims, nseq=nseq, offsets=offsets)


def check_step_indexed(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices):
    """check_step for a (slots, d, n) state cache read and written through state_batch_indices (b,).
    Returns check_step's dict with slots and indices (the list) added."""
    where = "selective_state_update"
    if not isinstance(state, torch.Tensor):
        fail(TypeError, where, "state", "a torch.Tensor", type(state).__name__)
    named = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)
    dims = _check(where, named, "x", False)
    check_tensor(where, "state", state)
    check_device(where, "state", state, x.device)
    if state.dim() != 3:
        fail(ValueError, where, "state", f"shape (slots, d={dims['d']}, n={dims['n']})", tuple(state.shape))
    check_shape(where, "state", state, (state.shape[0], dims["d"], dims["n"]), ("slots", "d", "n"))
    check_dtype(where, "state", state, (dims["compute_dtype"],), f"the compute dtype for x in {x.dtype}")
    indices = check_state_batch_indices(where, state_batch_indices, dims["b"], state.shape[0], x.device)
    check_no_overlap(where, dict(state=state), dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias))
    return dict(dims, slots=state.shape[0], indices=indices)
