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

from ..frontdoor import (INPUT_DTYPES, check_bool, check_cu_seqlens, check_device, check_dtype, check_no_overlap,
                        check_shape, check_state_batch_indices, check_tensor, compute_dtype, fail)

STATE_NAMES = ("angle", "ssm", "k", "v")


def check_chunk_size(where, chunk_size):
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        fail(TypeError, where, "chunk_size", "a positive integer", repr(chunk_size))
    if chunk_size < 1:
        fail(ValueError, where, "chunk_size", "a positive integer", repr(chunk_size))
    return int(chunk_size)


def _check(where, named, time):
    """Checks shared by the scan (time = 1: inputs carry l after b) and the step (time = 0).

    named: argument -> tensor or None, in the order of the public signature (Q .. Z).
    Returns dict(b, l, h, h_qk, p, n, n_ang, input_dtype, compute_dtype).
    """
    for arg, t in named.items():
        if t is not None:
            check_tensor(where, arg, t)
    V, Q, Angles = named["V"], named["Q"], named["Angles"]
    tl = ("l",) * time
    for arg, t in (("V", V), ("Q", Q), ("Angles", Angles)):  # the arguments sizes are read from
        if t.dim() != 3 + time:
            layout = ("b", *tl, "h_qk" if arg == "Q" else "h", {"V": "p", "Q": "n", "Angles": "n_ang"}[arg])
            fail(ValueError, where, arg, f"rank {3 + time} ({', '.join(layout)})", f"rank {t.dim()} with shape {tuple(t.shape)}")
    check_dtype(where, "V", V, INPUT_DTYPES, "the input dtype")
    b, h, p = V.shape[0], V.shape[-2], V.shape[-1]
    lt = tuple(V.shape[1:1 + time])
    h_qk, n, n_ang = Q.shape[-2], Q.shape[-1], Angles.shape[-1]
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
    shapes = dict(Q=((b, *lt, h_qk, n), ("b", *tl, "h_qk", "n")), K=((b, *lt, h_qk, n), ("b", *tl, "h_qk", "n")),
                  Z=((b, *lt, h, p), ("b", *tl, "h", "p")),
                  ADT=((b, h, *lt), ("b", "h", *tl)), DT=((b, h, *lt), ("b", "h", *tl)), Trap=((b, h, *lt), ("b", "h", *tl)),
                  Q_bias=((h, n), ("h", "n")), K_bias=((h, n), ("h", "n")),
                  Angles=((b, *lt, h, n_ang), ("b", *tl, "h", "n_ang")), D=((h,), ("h",)))
    sources = {"b": "V", "h": "V", "p": "V", "l": "V", "h_qk": "Q", "n": "Q", "n_ang": "Angles"}
    for arg, t in named.items():
        if t is None or arg == "V":
            continue
        check_device(where, arg, t, V.device)
        check_shape(where, arg, t, *shapes[arg], sources)
        if arg == "Z":
            check_dtype(where, arg, t, (V.dtype,), "the dtype of V")
        elif arg == "D":
            check_dtype(where, arg, t, (f,), why_f)
        else:
            check_dtype(where, arg, t, in_or_f, why_in)
    return dict(b=b, l=lt[0] if lt else 1, h=h, h_qk=h_qk, p=p, n=n, n_ang=n_ang, input_dtype=V.dtype, compute_dtype=f)


def check_states(where, states, S, dims, S_name, slots=False):
    """Input_States: None, or all four of (angle (S, h, n_ang), ssm (S, h, p, n), k (S, h, n),
    v (S, h, p)) in the compute dtype on V's device. With slots=True, S is read from the ssm state
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
    layouts = [((S, h, n_ang), (S_name, "h", "n_ang")), ((S, h, p, n), (S_name, "h", "p", "n")),
               ((S, h, n), (S_name, "h", "n")), ((S, h, p), (S_name, "h", "p"))]
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
    if state_batch_indices is None:
        dims["S"] = check_states(where, Input_States, dims["b"], dims, "b")
        return dims
    if Input_States is None:
        fail(ValueError, where, "Input_States", "the state cache (angle, ssm, k, v) that state_batch_indices indexes", None)
    slots = check_states(where, Input_States, None, dims, "slots", slots=True)
    indices = check_state_batch_indices(where, state_batch_indices, dims["b"], slots, V.device)
    written = {f"Input_States[{i}] ({STATE_NAMES[i]})": s for i, s in enumerate(Input_States)}
    check_no_overlap(where, written, dict(named, state_batch_indices=state_batch_indices))
    return dict(dims, S=slots, slots=slots, indices=indices)
