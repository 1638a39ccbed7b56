"""The SSD front door: argument checking and the dtype policy of the Mamba-2 family.

Glossary (used in every SSD docstring of this package, after the Mamba-2 paper, Dao & Gu 2024,
"Transformers are SSMs", and the official ``mamba_chunk_scan_combined``):
    b  batch size
    l  sequence length (time)
    h  heads (``nheads``); each head has one scalar decay A_h and one dt per token
    p  head dimension (``headdim``): the channels of a head, d_inner = h p
    n  state size (``d_state``)
    g  groups of B/C (``ngroups``): head i reads group i // (h // g); g divides h

Dtype policy (the Mamba-1 front door's, impls/frontdoor.py, per argument):
    x and z share the *input dtype* (float16, bfloat16, float32 or float64).
    The *compute dtype* is float64 for float64 inputs and float32 otherwise.
    dt, B and C are in the input dtype or the compute dtype; A, D, dt_bias and any state
    (initial_states, the step's state) are in the compute dtype.
    out comes back in the input dtype, final_states in the compute dtype.

Every check raises before anything is computed or written, with a message that names the
argument, what was expected and what was given (ValueError for shapes and values, TypeError for
types and dtypes).
"""

import math

import torch

from ..frontdoor import (INPUT_DTYPES, agreed_device, agreed_sizes, check_chunk_size, check_dtype, check_no_overlap,
                         check_shape, check_tensor, compute_dtype, fail)

DEFAULT_DT_LIMIT = (0.0, float("inf"))


def check_dt_limit(where, dt_limit):
    """dt_limit: a pair (lo, hi) of real numbers with lo <= hi (either may be infinite). Returns it as floats."""
    try:
        lo, hi = (float(v) for v in dt_limit)
    except (TypeError, ValueError):
        fail(ValueError, where, "dt_limit", "a pair (lo, hi) of real numbers", repr(dt_limit))
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        fail(ValueError, where, "dt_limit", "a pair (lo, hi) with lo <= hi", repr(dt_limit))
    return lo, hi


def _layouts(time):
    """Each argument's layouts (size names): time = 1 for the scan (l after b), 0 for the step."""
    tl = ("l",) * time
    return dict(x=(("b", *tl, "h", "p"),), z=(("b", *tl, "h", "p"),), dt=(("b", *tl, "h"),), A=(("h",),),
                B=(("b", *tl, "g", "n"),), C=(("b", *tl, "g", "n"),), D=(("h",), ("h", "p")), dt_bias=(("h",),),
                initial_states=(("b", "h", "p", "n"),), state=(("b", "h", "p", "n"),))


_LAYOUTS = {time: _layouts(time) for time in (0, 1)}  # built once, read on every call

# The argument each size is quoted from, and believed first where readings tie.
_PREFER = {"b": "x", "l": "x", "h": "x", "p": "x", "g": "B", "n": "B"}


def _check(where, named, lead, time, typed=False):
    """Shared checks for the scan (inputs carry a time axis l after b) and the step (they don't).

    named: argument name -> tensor or None; lead: the name of x, whose shape is (b, *time, h, p).
    typed: every tensor's type and device are already checked (the step checks them before it
    reads the tied forms; the untied ones are views of them), so they are not checked twice.
    Returns dict(b, l, h, p, n, g, input_dtype, compute_dtype).
    """
    if not typed:
        for arg, t in named.items():
            if t is not None:
                check_tensor(where, arg, t)
        agreed_device(where, named)
    x, B = named[lead], named["B"]
    tn = ("l",) * time
    lead_names, bc_names = ("b", *tn, "h", "p"), ("b", *tn, "g", "n")
    if x.dim() != 3 + time:
        fail(ValueError, where, lead, f"rank {3 + time} ({', '.join(lead_names)})", f"rank {x.dim()} with shape {tuple(x.shape)}")
    check_dtype(where, lead, x, INPUT_DTYPES, "the input dtype")
    if B.dim() != 3 + time:
        fail(ValueError, where, "B", f"rank {3 + time} ({', '.join(bc_names)})", f"rank {B.dim()} with shape {tuple(B.shape)}")
    sizes, sources = agreed_sizes(where, named, _LAYOUTS[time], _PREFER)
    b, h, p, g, n = (sizes[k] for k in ("b", "h", "p", "g", "n"))
    tl = (sizes["l"],) if time else ()
    in_dtype = x.dtype
    f = compute_dtype(in_dtype)
    in_or_f = tuple(dict.fromkeys((in_dtype, f)))
    check_shape(where, "A", named["A"], (h,), ("h",), sources)
    if g < 1 or h % g != 0:
        fail(ValueError, where, "B", f"a group count g that divides h={h}", f"g={g} (shape {tuple(B.shape)})")
    if n < 1:
        fail(ValueError, where, "B", "at least one state (n >= 1)", tuple(B.shape))
    for arg, t in named.items():
        if t is None:
            continue
        if arg in (lead, "z"):
            check_shape(where, arg, t, (b, *tl, h, p), lead_names, sources)
            check_dtype(where, arg, t, (in_dtype,), f"the dtype of {lead}")
        elif arg == "dt":
            check_shape(where, arg, t, (b, *tl, h), (*lead_names[:-1],), sources)
            check_dtype(where, arg, t, in_or_f, f"the input or compute dtype for {lead} in {in_dtype}")
        elif arg in ("B", "C"):
            check_shape(where, arg, t, (b, *tl, g, n), bc_names, sources)
            check_dtype(where, arg, t, in_or_f, f"the input or compute dtype for {lead} in {in_dtype}")
        elif arg == "D":
            if tuple(t.shape) not in ((h,), (h, p)):
                flat = f" (a flat (h*p,) D is D.view({h}, {p}))" if tuple(t.shape) == (h * p,) else ""
                fail(ValueError, where, arg, f"shape (h={h}) or (h={h}, p={p}){flat}", tuple(t.shape))
            check_dtype(where, arg, t, (f,), f"the compute dtype for {lead} in {in_dtype}")
        elif arg == "dt_bias":
            check_shape(where, arg, t, (h,), ("h",), sources)
            check_dtype(where, arg, t, (f,), f"the compute dtype for {lead} in {in_dtype}")
        elif arg in ("initial_states", "state"):
            check_shape(where, arg, t, (b, h, p, n), ("b", "h", "p", "n"), sources)
            check_dtype(where, arg, t, (f,), f"the compute dtype for {lead} in {in_dtype}")
        elif arg == "A":
            check_dtype(where, arg, t, (f,), f"the compute dtype for {lead} in {in_dtype}")
    return dict(b=b, l=tl[0] if tl else 1, h=h, p=p, n=n, g=g, input_dtype=in_dtype, compute_dtype=f)


def check_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_limit):
    """Validate ssd_scan arguments (shapes in impls.ssd_scan; the varlen arguments are the caller's).

    Returns (dims, chunk_size, dt_limit): dims = dict(b, l, h, p, n, g, input_dtype, compute_dtype);
    chunk_size as an int; dt_limit as a pair of floats.
    """
    where = "ssd_scan"
    chunk_size = check_chunk_size(where, chunk_size)
    dt_limit = check_dt_limit(where, dt_limit)
    named = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states)
    return _check(where, named, "x", 1), chunk_size, dt_limit


def _untie(where, arg, t, keep, tied_shape, tied_names):
    """The official decode call's "tied" form: ``t`` broadcast (zero strides) over trailing
    dimensions whose values are all equal. Returns the untied tensor, t[index of the first element
    of each tied dimension]; raises ValueError where the values are not constant over them (a
    genuinely per-channel A or dt is outside the SSD model: one decay per head)."""
    check_shape(where, arg, t, tied_shape, tied_names)
    index = (slice(None),) * keep + (0,) * (t.dim() - keep)
    untied = t[index]
    if any(t.stride(k) != 0 and t.shape[k] > 1 for k in range(keep, t.dim())):
        expanded = untied[(Ellipsis,) + (None,) * (t.dim() - keep)].expand_as(t)
        if not torch.equal(t, expanded):
            fail(ValueError, where, arg, f"the tied form constant over {', '.join(tied_names[keep:])} "
                  f"(one value per head, as the official Mamba2.step broadcasts)", "values that vary over them")
    return untied


def check_step(state, x, dt, A, B, C, D, z, dt_bias, dt_limit):
    """Validate ssd_state_update arguments (shapes in impls.ssd_state_update; a state that shares
    memory with another argument or with itself is refused, as Mamba-1's) and untie the
    official "tied" form: A (h, p, n) -> (h,), dt (b, h, p) -> (b, h), dt_bias (h, p) -> (h,)
    (D (h, p) is a form of its own and is kept).

    Returns (dims, dict(dt=..., A=..., dt_bias=...) untied, dt_limit as floats).
    """
    where = "ssd_state_update"
    dt_limit = check_dt_limit(where, dt_limit)
    read = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)  # as given (tied forms included)
    for arg, t in dict(state=state, **read).items():
        if t is not None:
            check_tensor(where, arg, t)
    # before the tied forms are read: their values are compared, which on another device would fail
    # inside torch instead of here
    agreed_device(where, dict(read, state=state))
    # x (b, h, p) is checked against the state first (h, p: the slots of an indexed cache are not b):
    # otherwise z, D (h, p) or the state itself would be blamed for x's p
    if state is not None and state.dim() == 4 and x.dim() == 3 and tuple(x.shape[1:]) != tuple(state.shape[1:3]):
        S, h, a, c = state.shape
        if (h, c) == tuple(x.shape[1:]) and B is not None and B.dim() == 3 and B.shape[-1] == a:   # x and B agree: state is (S, h, n, p)
            fail(ValueError, where, "state", f"shape (b, h={h}, p={c}, n={a})",
                 f"{tuple(state.shape)}, which looks (b, h, n, p), transposed: pass state.transpose(2, 3)")
        fail(ValueError, where, "x", f"shape (b, h={state.shape[1]}, p={state.shape[2]}) (h, p those of state of "
              f"shape {tuple(state.shape)}; if x is right, state is not)", tuple(x.shape))
    tied_n = None
    if x.dim() == 3 and A.dim() == 3:
        h, p = x.shape[1:]
        tied_n = A.shape[2]
        A = _untie(where, "A", A, 1, (h, p, tied_n), ("h", "p", "n"))
    if x.dim() == 3 and dt.dim() == 3:
        dt = _untie(where, "dt", dt, 2, (x.shape[0], *x.shape[1:]), ("b", "h", "p"))
    if x.dim() == 3 and dt_bias is not None and dt_bias.dim() == 2:
        dt_bias = _untie(where, "dt_bias", dt_bias, 1, tuple(x.shape[1:]), ("h", "p"))
    named = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, state=state)
    dims = _check(where, named, "x", 0, typed=True)
    if tied_n is not None and tied_n != dims["n"]:
        fail(ValueError, where, "A", f"the tied form (h, p, n={dims['n']}), n as in B", f"n={tied_n}")
    # the state is written in place: it must own its memory (impls/frontdoor.py)
    check_no_overlap(where, dict(state=state), read)
    return dims, dict(dt=dt, A=A, dt_bias=dt_bias), dt_limit
