"""The Mamba-3 (SISO) front door: argument checks and the dtype policy, run before anything is
computed or written. Letters (b, l, h, h_qk, p, n, n_ang, S) as in impls/mamba3/loop.py.

Dtype policy (the SSD family's, argument by argument):
    V and Z share the *input dtype* (float16, bfloat16, float32 or float64); the *compute dtype*
    is float64 for float64 V and float32 otherwise (impls.frontdoor.compute_dtype).
    Q, K, ADT, DT, Trap, Angles, Q_bias, K_bias: the input dtype or the compute dtype (the official
    kernel takes ADT, DT in float32 beside bfloat16 activations, and its tests pass Angles in float32).
    D and the four states: the compute dtype. Outputs: out in the input dtype, states in the compute
    dtype.

Every check raises ValueError (shapes, values, aliasing) or TypeError (types, dtypes) naming the
argument, what was expected and what was given.
"""

import numbers

import torch

from ..frontdoor import (INPUT_DTYPES, agreed_device, agreed_sizes, check_bool, check_cu_seqlens, check_device,
                        check_dtype, check_no_overlap, check_shape, check_state_batch_indices, check_tensor,
                        compute_dtype, fail)

STATE_NAMES = ("angle", "ssm", "k", "v")


def check_chunk_size(where, chunk_size):
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        fail(TypeError, where, "chunk_size", "a positive integer", repr(chunk_size))
    if chunk_size < 1:
        fail(ValueError, where, "chunk_size", "a positive integer", repr(chunk_size))
    return int(chunk_size)


def _layouts(time, rank=()):
    """Each argument's layout (size names): time = 1 for the scan (l after b), 0 for the step;
    rank = ("R",) for MIMO's Q, K and biases."""
    tl = ("l",) * time
    per_token, per_head = ("b", *tl, "h", "p"), ("b", "h", *tl)
    return dict(Q=(("b", *tl, *rank, "h_qk", "n"),), K=(("b", *tl, *rank, "h_qk", "n"),), V=(per_token,), Z=(per_token,),
                ADT=(per_head,), DT=(per_head,), Trap=(per_head,), Q_bias=(("h", *rank, "n"),), K_bias=(("h", *rank, "n"),),
                MIMO_V=(("h", "R", "p"),), MIMO_Z=(("h", "R", "p"),), MIMO_Out=(("h", "R", "p"),),
                Angles=(("b", *tl, "h", "n_ang"),), D=(("h",),))


# by (time, MIMO): built once, read on every call
_LAYOUTS = {(time, mimo): _layouts(time, ("R",) if mimo else ()) for time in (0, 1) for mimo in (False, True)}

# The argument each size is quoted from, and believed first where readings tie.
_PREFER = {"b": "V", "h": "V", "p": "V", "l": "V", "R": "Q", "h_qk": "Q", "n": "Q", "n_ang": "Angles"}


def _sizes(where, named, time, mimo):
    """What SISO and MIMO check first: every argument a tensor (or None), on one device, V, Q and
    Angles (the arguments every size is on) of their rank, V of an input dtype; then the sizes the
    arguments agree on and where each is quoted from (impls.frontdoor.agreed_sizes)."""
    for arg, t in named.items():
        if t is not None:
            check_tensor(where, arg, t)
    agreed_device(where, named)
    layouts = _LAYOUTS[time, mimo]
    for arg in ("V", "Q", "Angles"):
        layout = layouts[arg][0]
        if named[arg].dim() != len(layout):
            fail(ValueError, where, arg, f"rank {len(layout)} ({', '.join(layout)})",
                 f"rank {named[arg].dim()} with shape {tuple(named[arg].shape)}")
    check_dtype(where, "V", named["V"], INPUT_DTYPES, "the input dtype")
    return agreed_sizes(where, named, layouts, _PREFER)


def _check(where, named, time):
    """Checks shared by the scan (time = 1: inputs carry l after b) and the step (time = 0).

    named: argument -> tensor or None, in the order of the public signature (Q .. Z).
    Returns dict(b, l, h, h_qk, p, n, n_ang, input_dtype, compute_dtype).
    """
    sizes, sources = _sizes(where, named, time, mimo=False)
    V, Q, Angles, layouts = named["V"], named["Q"], named["Angles"], _LAYOUTS[time, False]
    h, h_qk, n, n_ang = sizes["h"], sizes["h_qk"], sizes["n"], sizes["n_ang"]
    if h_qk < 1 or h % h_qk:
        fail(ValueError, where, "Q", f"a head count h_qk that divides V's h={h}", f"h_qk={h_qk} (shape {tuple(Q.shape)})")
    if n < 2 or n % 2:
        fail(ValueError, where, "Q", "an even state size n >= 2 (Q and K are rotated in pairs)", f"n={n}")
    if n_ang > n // 2:
        fail(ValueError, where, "Angles", f"n_ang <= n/2 = {n // 2} (one angle per pair of Q's n={n})", f"n_ang={n_ang}")
    f = compute_dtype(V.dtype)
    in_or_f = tuple(dict.fromkeys((V.dtype, f)))
    why_in = f"the input or compute dtype for V in {V.dtype}"
    why_f = f"the compute dtype for V in {V.dtype}"
    for arg, t in named.items():
        if t is None:
            continue
        layout = layouts[arg][0]
        check_shape(where, arg, t, tuple(sizes[k] for k in layout), layout, sources)
        if arg == "Z":
            check_dtype(where, arg, t, (V.dtype,), "the dtype of V")
        elif arg == "D":
            check_dtype(where, arg, t, (f,), why_f)
        else:
            check_dtype(where, arg, t, in_or_f, why_in)
    b, p, l = sizes["b"], sizes["p"], sizes.get("l", 1)
    return dict(b=b, l=l, h=h, h_qk=h_qk, p=p, n=n, n_ang=n_ang, input_dtype=V.dtype, compute_dtype=f)


def check_states(where, states, S, dims, S_name, slots=False):
    """Input_States: None, or all four of (angle (S, h, n_ang), ssm (S, h, p, n), k (S, h, n), or
    (S, R, h, n) for MIMO (dims has R), v (S, h, p)) in the compute dtype on V's device. With slots=True, S is read from the ssm state
    (a cache of slots). Returns S."""
    if states is None:
        return S
    if not isinstance(states, (tuple, list)) or len(states) != 4:
        got = f"{type(states).__name__} of {len(states)}" if isinstance(states, (tuple, list)) else type(states).__name__
        fail(TypeError, where, "Input_States", "a tuple of four tensors (angle, ssm, k, v), or None", got)
    missing = [STATE_NAMES[i] for i, s in enumerate(states) if s is None]
    if missing:
        fail(ValueError, where, "Input_States", "all four states (angle, ssm, k, v) or None: they are given together",
             f"{', '.join(missing)} missing")
    h, p, n, n_ang, f = dims["h"], dims["p"], dims["n"], dims["n_ang"], dims["compute_dtype"]
    for i, s in enumerate(states):
        check_tensor(where, f"Input_States[{i}] ({STATE_NAMES[i]})", s)
    if slots:
        if states[1].dim() != 4:
            fail(ValueError, where, "Input_States[1] (ssm)", f"rank 4 (slots, h={h}, p={p}, n={n})", tuple(states[1].shape))
        S = states[1].shape[0]
    R = dims.get("R")  # MIMO: the k state holds every rank's k~, (S, R, h, n)
    layouts = [((S, h, n_ang), (S_name, "h", "n_ang")), ((S, h, p, n), (S_name, "h", "p", "n")),
               ((S, h, n), (S_name, "h", "n")) if R is None else ((S, R, h, n), (S_name, "R", "h", "n")),
               ((S, h, p), (S_name, "h", "p"))]
    for i, (s, (shape, names)) in enumerate(zip(states, layouts)):
        arg = f"Input_States[{i}] ({STATE_NAMES[i]})"
        check_device(where, arg, s, dims["device"])
        check_shape(where, arg, s, shape, names)
        check_dtype(where, arg, s, (f,), f"the compute dtype for V in {dims['input_dtype']}")
    return S


def check_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, Input_States, chunk_size, return_final_states,
               cu_seqlens):
    """Validate mamba3_scan's arguments (shapes in impls.mamba3.mamba3_scan). Returns the sizes and
    dtypes (dict: b, l, h, h_qk, p, n, n_ang, S, input_dtype, compute_dtype, device, chunk_size)."""
    where = "mamba3_scan"
    chunk_size = check_chunk_size(where, chunk_size)
    check_bool(where, "return_final_states", return_final_states)
    named = dict(Q=Q, K=K, V=V, ADT=ADT, DT=DT, Trap=Trap, Q_bias=Q_bias, K_bias=K_bias, Angles=Angles, D=D, Z=Z)
    dims = dict(_check(where, named, 1), device=V.device, chunk_size=chunk_size)
    S, S_name = dims["b"], "b"
    if cu_seqlens is not None:
        S, _ = check_cu_seqlens(where, cu_seqlens, dims["b"], dims["l"], V.device)
        S_name = "nseq"
    dims["S"] = check_states(where, Input_States, S, dims, S_name)
    return dims


def check_step(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, Input_States, state_batch_indices):
    """Validate mamba3_state_update's arguments (shapes in impls.mamba3.mamba3_state_update).
    With state_batch_indices, Input_States is a cache (slots, h, ...) written in place: it is
    required, must own its memory and share none with another argument. Returns the sizes and
    dtypes (dict as check_scan's, with slots and indices for the indexed form)."""
    where = "mamba3_state_update"
    named = dict(Q=Q, K=K, V=V, ADT=ADT, DT=DT, Trap=Trap, Q_bias=Q_bias, K_bias=K_bias, Angles=Angles, D=D, Z=Z)
    dims = dict(_check(where, named, 0), device=V.device)
    return check_step_states(where, Input_States, state_batch_indices, dims, named)


def check_step_states(where, Input_States, state_batch_indices, dims, named):
    """A step's Input_States: (b, h, ...) rows only read, or with state_batch_indices a cache of slots
    (slots, h, ...) written in place, which must then be given, own its memory and share none with
    ``named`` (the step's other tensors). Returns dims with S (and slots, indices when indexed)."""
    if state_batch_indices is None:
        return dict(dims, S=check_states(where, Input_States, dims["b"], dims, "b"))
    if Input_States is None:
        fail(ValueError, where, "Input_States", "the state cache (angle, ssm, k, v) that state_batch_indices indexes", None)
    slots = check_states(where, Input_States, None, dims, "slots", slots=True)
    indices = check_state_batch_indices(where, state_batch_indices, dims["b"], slots, dims["device"])
    written = {f"Input_States[{i}] ({STATE_NAMES[i]})": s for i, s in enumerate(Input_States)}
    check_no_overlap(where, written, dict(named, state_batch_indices=state_batch_indices))
    return dict(dims, S=slots, slots=slots, indices=indices)


# ---- MIMO ------------------------------------------------------------------------------------------
# The same rules, with the rank R read from Q: Q, K (b, [l,] R, h_qk, n); Q_bias, K_bias (h, R, n);
# MIMO_V, MIMO_Z, MIMO_Out (h, R, p) in the input or compute dtype; outproj_norm_weight (h, p) or
# (h * p,) likewise. MIMO_Z is required with Z (it projects the gate); MIMO_Out may be None (the R
# outputs come back apart); a norm weight without the norm is refused (it would do nothing).

def _check_mimo(where, named, time, rotary_dim_divisor, norm, norm_eps):
    """Checks shared by the MIMO scan (time = 1) and step (time = 0). named: argument -> tensor or
    None (Q .. Z, then outproj_norm_weight). Returns dict(b, l, R, h, h_qk, p, n, n_ang, input_dtype,
    compute_dtype)."""
    if named["MIMO_V"] is None:
        fail(TypeError, where, "MIMO_V", "a tensor (h, R, p)", None)
    sizes, sources = _sizes(where, named, time, mimo=True)
    V, Q, layouts = named["V"], named["Q"], _LAYOUTS[time, True]
    b, h, p, l = sizes["b"], sizes["h"], sizes["p"], sizes.get("l", 1)
    R, h_qk, n, n_ang = sizes["R"], sizes["h_qk"], sizes["n"], sizes["n_ang"]
    if R < 1:
        fail(ValueError, where, "Q", "a rank R >= 1", f"R={R} (shape {tuple(Q.shape)})")
    if h_qk < 1 or h % h_qk:
        fail(ValueError, where, "Q", f"a head count h_qk that divides V's h={h}", f"h_qk={h_qk} (shape {tuple(Q.shape)})")
    if n < 2 or n % 2:
        fail(ValueError, where, "Q", "an even state size n >= 2 (Q and K are rotated in pairs)", f"n={n}")
    if n_ang > n // 2:
        fail(ValueError, where, "Angles", f"n_ang <= n/2 = {n // 2} (one angle per pair of Q's n={n})", f"n_ang={n_ang}")
    if rotary_dim_divisor is not None:
        if isinstance(rotary_dim_divisor, bool) or not isinstance(rotary_dim_divisor, numbers.Integral):
            fail(TypeError, where, "rotary_dim_divisor", "an integer or None", repr(rotary_dim_divisor))
        if rotary_dim_divisor < 2 or rotary_dim_divisor * n_ang != n:
            fail(ValueError, where, "rotary_dim_divisor", f"n / n_ang with Q's n={n} and Angles' n_ang={n_ang}",
                 repr(rotary_dim_divisor))
    check_bool(where, "fuse_pregate_headwise_rms_norm", norm)
    if isinstance(norm_eps, bool) or not isinstance(norm_eps, numbers.Real) or not norm_eps >= 0:
        fail(ValueError, where, "outproj_norm_eps", "a number >= 0", repr(norm_eps))
    if named["Z"] is not None and named["MIMO_Z"] is None:
        fail(ValueError, where, "MIMO_Z", "a tensor (h, R, p) with Z: it projects the gate to the R ranks", None)
    if named["outproj_norm_weight"] is not None and not norm:
        fail(ValueError, where, "outproj_norm_weight", "None without fuse_pregate_headwise_rms_norm (no norm to weigh)",
             "a tensor")
    f = compute_dtype(V.dtype)
    in_or_f = tuple(dict.fromkeys((V.dtype, f)))
    for arg, t in named.items():
        if t is None:
            continue
        if arg == "outproj_norm_weight":
            if tuple(t.shape) not in ((h, p), (h * p,)):
                fail(ValueError, where, arg, f"shape (h={h}, p={p}) or (h * p = {h * p},)", tuple(t.shape))
        else:
            layout = layouts[arg][0]
            check_shape(where, arg, t, tuple(sizes[k] for k in layout), layout, sources)
        if arg == "Z":
            check_dtype(where, arg, t, (V.dtype,), "the dtype of V")
        elif arg == "D":
            check_dtype(where, arg, t, (f,), f"the compute dtype for V in {V.dtype}")
        else:
            check_dtype(where, arg, t, in_or_f, f"the input or compute dtype for V in {V.dtype}")
    return dict(b=b, l=l, R=R, h=h, h_qk=h_qk, p=p, n=n, n_ang=n_ang, input_dtype=V.dtype,
                compute_dtype=f, device=V.device)


def check_mimo(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z, chunk_size,
               rotary_dim_divisor, dtype, return_state, cu_seqlens, fuse_pregate_headwise_rms_norm,
               outproj_norm_weight, outproj_norm_eps, Input_States):
    """Validate mamba3_mimo's arguments (shapes in impls.mamba3.mamba3_mimo). Returns the sizes and
    dtypes (dict: b, l, R, h, h_qk, p, n, n_ang, S, input_dtype, compute_dtype, device, chunk_size)."""
    where = "mamba3_mimo"
    chunk_size = check_chunk_size(where, chunk_size)
    check_bool(where, "return_state", return_state)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        fail(TypeError, where, "dtype", "a torch.dtype or None", repr(dtype))
    named = dict(Q=Q, K=K, V=V, ADT=ADT, DT=DT, Trap=Trap, Q_bias=Q_bias, K_bias=K_bias, MIMO_V=MIMO_V, MIMO_Z=MIMO_Z,
                 MIMO_Out=MIMO_Out, Angles=Angles, D=D, Z=Z, outproj_norm_weight=outproj_norm_weight)
    dims = dict(_check_mimo(where, named, 1, rotary_dim_divisor, fuse_pregate_headwise_rms_norm, outproj_norm_eps),
                chunk_size=chunk_size)
    S, S_name = dims["b"], "b"
    if cu_seqlens is not None:
        S, _ = check_cu_seqlens(where, cu_seqlens, dims["b"], dims["l"], V.device)
        S_name = "nseq"
    dims["S"] = check_states(where, Input_States, S, dims, S_name)
    return dims


def check_mimo_step(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z, Input_States,
                    fuse_pregate_headwise_rms_norm, outproj_norm_weight, outproj_norm_eps, state_batch_indices=None):
    """Validate mamba3_mimo_state_update's arguments (shapes in impls.mamba3.mamba3_mimo_state_update);
    with state_batch_indices, Input_States is a cache written in place, checked as check_step's.
    Returns the sizes and dtypes (dict as check_mimo's, without chunk_size, with slots and indices
    for the indexed form)."""
    where = "mamba3_mimo_state_update"
    named = dict(Q=Q, K=K, V=V, ADT=ADT, DT=DT, Trap=Trap, Q_bias=Q_bias, K_bias=K_bias, MIMO_V=MIMO_V, MIMO_Z=MIMO_Z,
                 MIMO_Out=MIMO_Out, Angles=Angles, D=D, Z=Z, outproj_norm_weight=outproj_norm_weight)
    dims = _check_mimo(where, named, 0, None, fuse_pregate_headwise_rms_norm, outproj_norm_eps)
    return check_step_states(where, Input_States, state_batch_indices, dims, named)
