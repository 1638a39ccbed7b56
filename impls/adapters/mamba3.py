"""The official Mamba-3 SISO kernels (the ``mamba_ssm`` package) behind our Mamba-3 interface.
Registered by impls/adapters/__init__.py only where ``mamba_ssm`` imports and CUDA is available; on
any other machine the name is absent.

    mamba3_scan           mamba_ssm.ops.triton.mamba3.mamba3_siso_combined.mamba3_siso_combined (Triton)
    mamba3_state_update   mamba_ssm.ops.triton.mamba3.mamba3_siso_step.mamba3_siso_step (Triton)

Our signatures are the official ones (letters b, l, h, h_qk, p, n, n_ang, S as in
impls/mamba3/loop.py), so little is translated:

- device: the suite builds its inputs on the CPU; they are copied to DEVICE, and the results copied
  back. The copies are outside the kernels and change no value.
- states out: ours are new tensors in the compute dtype (float32). The official scan returns the
  angle state in bfloat16 (its cumulative angles are stored in the dtype of Angles after its cast)
  and the v state as a view of V (bfloat16); the official step returns V itself as the v state.
  All four are copied into new float32 tensors (exact: a widening).
- states in: the official step unpacks Input_States unconditionally; for None (a fresh sequence)
  the adapter passes the zero states.
- out: the official scan returns it in bfloat16 (V's dtype after its cast); cast back to V's dtype.

Declared gaps (refused with NotImplementedError before anything runs; the registry refuses the
first two, the adapter the rest, so a direct call refuses them too):

- input dtypes other than bfloat16: ``mamba3_siso_combined`` casts Q, K, V, Trap, Angles and Z to
  bfloat16 (ADT and DT stay float32), so a float32 or float16 call would be computed on rounded
  inputs, and there are no float64 kernels. For the same reason Q, K, Trap and Angles given in
  float32 beside bfloat16 V (our front door accepts the compute dtype for them) are refused.
- the serving form (state_batch_indices): the official indexed step is an unmerged pull request.
- n_ang odd: both official functions assert ``headdim_angles % 2 == 0`` (mamba3_siso_fwd as well as
  the step; our own step and scan accept any n_ang <= n / 2).
- shapes the Triton kernels do not serve: n and p must be powers of two of at least 16 (tl.arange
  over the head dimensions and tl.dot tiles; the wrapper's docstring asks powers of two for TMA),
  and chunk_size likewise (tl.arange over the chunk). l = 0: ``mamba3_siso_fwd`` asserts seqlen > 0.

Not wrapped here: the CuTe step ``mamba3_step_fn`` that ``Mamba3.step`` calls, whose hard-coded
tile_D=64 writes out of bounds for headdim < 64 (reported: step off by about 1 and nondeterministic).
An adapter for it must refuse p < 64.

Known official limitations, run and reported as expected failures by
``--xfails-file impls/adapters/xfails/mamba3.txt`` (one line each, with the reason): the angle
state and the cumulative angles the kernels rotate with are bfloat16; tanh, sin, cos and sigmoid
are the hardware approximations (tanh.approx.f32 and friends, about 2^-11 relative); the step's
readout h q~ is a bfloat16 dot; a packed sequence of length 0 gets its neighbour's k and v states.
"""

import torch

DEVICE = "cuda"   # tests of the adapter's translation without a GPU set "cpu" (with a stand-in package)

WRAPS = "mamba_ssm"   # the package whose version the pytest header shows beside ours

# the arguments the official scan casts to bfloat16 (Z is V's dtype by our front door)
CAST_TO_BF16 = ("Q", "K", "Trap", "Angles")


def _to(t, dtype=None):
    return None if t is None else t.to(device=DEVICE, dtype=dtype or t.dtype)


def _back(t, like, dtype=torch.float32):
    """A new tensor on like's device (copy=True: never the kernel's own, never an input)."""
    return t.to(device=like.device, dtype=dtype, copy=True)


def _power_of_two(x):
    return x >= 16 and x & (x - 1) == 0


def refuse(where, V, n, n_ang, chunk_size=None, l=None, **tensors):
    """NotImplementedError for a call the official kernels do not serve (see the module docstring)."""
    gaps = []
    if V.dtype != torch.bfloat16:
        gaps.append(f"input dtype {V.dtype} (the kernel computes on bfloat16 Q, K, V, Trap, Angles, Z)")
    gaps += [f"{k} in {t.dtype} (the kernel casts it to bfloat16)" for k, t in tensors.items()
             if t is not None and t.dtype != torch.bfloat16]
    if n_ang % 2:
        gaps.append(f"odd n_ang={n_ang} (it asserts headdim_angles % 2 == 0)")
    p = V.shape[-1]
    for name, size in (("n", n), ("p", p)) + ((("chunk_size", chunk_size),) if chunk_size is not None else ()):
        if not _power_of_two(size):
            gaps.append(f"{name}={size} (a power of two >= 16 is needed by its Triton tiles)")
    if l == 0:
        gaps.append("l=0 (it asserts seqlen > 0)")
    if gaps:
        raise NotImplementedError(f"mamba_ssm {where}: does not support {'; '.join(gaps)}")


def mamba3_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None, chunk_size=64,
                return_final_states=False, cu_seqlens=None):
    """The official chunked scan, ``mamba3_siso_combined``.

    Args:
        Q, K: (b, l, h_qk, n) bfloat16; V, Z: (b, l, h, p) bfloat16; ADT, DT: (b, h, l) float32;
        Trap: (b, h, l) bfloat16; Q_bias, K_bias: (h, n); Angles: (b, l, h, n_ang) bfloat16, n_ang even;
        D: (h,); Input_States: (angle (S, h, n_ang), ssm (S, h, p, n), k (S, h, n), v (S, h, p))
        float32 or None; cu_seqlens: (S + 1,) int32 with b = 1, or None
    Returns:
        out (b, l, h, p) in V's dtype on V's device; with return_final_states, (out, angle, ssm, k, v),
        the states new float32 tensors (S, h, ...)
    Raises:
        NotImplementedError: the declared gaps (module docstring).
    """
    from mamba_ssm.ops.triton.mamba3.mamba3_siso_combined import mamba3_siso_combined

    refuse("mamba3_siso_combined", V, Q.shape[-1], Angles.shape[-1], chunk_size, V.shape[1],
           Q=Q, K=K, Trap=Trap, Angles=Angles)
    states = None if Input_States is None else tuple(_to(s) for s in Input_States)
    result = mamba3_siso_combined(_to(Q), _to(K), _to(V), _to(ADT), _to(DT), _to(Trap), _to(Q_bias), _to(K_bias),
                                  _to(Angles), D=_to(D), Z=_to(Z), Input_States=states, chunk_size=chunk_size,
                                  return_final_states=return_final_states, cu_seqlens=_to(cu_seqlens))
    if not return_final_states:
        return _back(result, V, V.dtype)
    out, *final = result
    return (_back(out, V, V.dtype), *(_back(s, V) for s in final))


def mamba3_state_update(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None,
                        state_batch_indices=None):
    """The official decode step, ``mamba3_siso_step``.

    Args:
        Q, K: (b, h_qk, n); V, Z: (b, h, p); ADT, DT, Trap: (b, h); Q_bias, K_bias: (h, n);
        Angles: (b, h, n_ang), n_ang even; D: (h,); Input_States: (angle (b, h, n_ang),
        ssm (b, h, p, n), k (b, h, n), v (b, h, p)) float32, or None (zeros)
        state_batch_indices: must be None (a declared gap)
    Returns:
        (out (b, h, p) in V's dtype, (angle, ssm, k, v)): new float32 tensors (b, h, ...); the
        inputs are untouched
    Raises:
        NotImplementedError: the declared gaps (module docstring).
    """
    from mamba_ssm.ops.triton.mamba3.mamba3_siso_step import mamba3_siso_step

    if state_batch_indices is not None:  # the registry refuses it first; a direct call must not drop it
        raise NotImplementedError("mamba_ssm mamba3_siso_step: no state_batch_indices (the indexed step is unmerged)")
    refuse("mamba3_siso_step", V, Q.shape[-1], Angles.shape[-1], Q=Q, K=K, Trap=Trap, Angles=Angles)
    b, h, p = V.shape
    n, n_ang = Q.shape[-1], Angles.shape[-1]
    if Input_States is None:
        f = dict(dtype=torch.float32, device=DEVICE)
        states = (torch.zeros(b, h, n_ang, **f), torch.zeros(b, h, p, n, **f), torch.zeros(b, h, n, **f),
                  torch.zeros(b, h, p, **f))
    else:
        states = tuple(_to(s) for s in Input_States)
    out, new = mamba3_siso_step(_to(Q), _to(K), _to(V), _to(ADT), _to(DT), _to(Trap), _to(Q_bias), _to(K_bias),
                                _to(Angles), D=_to(D), Z=_to(Z), Input_States=states)
    return _back(out, V, V.dtype), tuple(_back(s, V) for s in new)
