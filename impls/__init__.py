"""Selective-scan implementations behind one interface.

    import impls
    impls.names()                       # registered implementation names
    impls.get("loop")                   # its entry: name, scan, step, supports
    impls.register("mine", scan=my_scan, step=my_step, gradients=True)
    y = impls.selective_scan(u, delta, A, B, C, ..., impl="parallel")
    y = impls.selective_state_update(state, x, dt, A, B, C, ..., impl="recurrent")

Two families share the registry: "selective" (Mamba-1, the default) and "ssd" (Mamba-2):

    impls.names(family="ssd")           # loop, chunked, recurrent, parallel (through the mapping), ...
    impls.register("mine", scan=my_ssd_scan, step=my_ssd_step, family="ssd", gradients=True)
    y = impls.ssd_scan(x, dt, A, B, C, chunk_size, ..., impl="chunked")
    y = impls.ssd_state_update(state, x, dt, A, B, C, ..., impl="recurrent")

Shapes follow the official Mamba-1 ``selective_scan_fn`` / ``selective_state_update``; letters
(b, d, l, n, g) are defined in impls/frontdoor.py. Both public functions check their arguments
(impls/frontdoor.py) and what the implementation returns, so a plugged-in implementation gets the
same errors and guarantees as the built-in ones.
"""

import dataclasses
import importlib
import os
from typing import Callable, Optional

import torch

# Triton reads TRITON_INTERPRET once, when it is first imported (a machine-info probe, a plugin):
# set it here, before anything can import triton, so that without a GPU the Triton kernels run in
# its interpreter whatever imports triton first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from . import frontdoor, loop, parallel, recurrent

# What an implementation can do. A call that needs more raises NotImplementedError: a gap is
# declared and visible, never a silent fallback.
DEFAULT_SUPPORTS = dict(
    dtypes=frontdoor.INPUT_DTYPES,  # input dtypes it accepts
    grouped=True,                   # B/C with g groups
    initial_state=True,             # initial_state argument
    gradients=False,                # autograd through the scan
    varlen=False,                   # packed sequences (cu_seqlens)
    state_batch_indices=None,       # the step's batch-indexed state cache; None: as varlen
    nonfinite_inputs=True,          # one inf or NaN input gives non-finite outputs exactly where the loop's are
    deterministic=True,             # the same call twice (forward, and backward) gives the same bits
    batch_invariant=False,          # row i's results are bit for bit the same alone or in any batch (a claim
                                    # a kernel makes; otherwise its rows agree within the tolerance policy)
    case_limits=None,               # dict of upper bounds on b, d, n, l for the property tests, if slow
)


@dataclasses.dataclass(frozen=True)
class Implementation:
    name: str
    scan: Callable
    step: Optional[Callable]
    supports: dict
    module: str
    family: str = "selective"


# What a Mamba-2 SSD implementation can do (family="ssd"); same rule: a call needing more raises
# NotImplementedError.
SSD_DEFAULT_SUPPORTS = dict(
    dtypes=frontdoor.INPUT_DTYPES,  # input dtypes it accepts
    grouped=True,                   # B/C with g > 1 groups
    initial_states=True,            # initial_states argument
    gradients=False,                # autograd through the scan
    dt_limit=True,                  # a dt_limit other than the default (0, inf)
    D_hp=True,                      # D of shape (h, p)
    varlen=False,                   # seq_idx, cu_seqlens, return_varlen_states (the varlen issue)
    state_batch_indices=None,       # the step's batch-indexed state cache; None: as varlen
    deterministic=True,             # the same call twice (forward, and backward) gives the same bits
    batch_invariant=False,          # row i's results are bit for bit the same alone or in any batch (a claim
                                    # a kernel makes; otherwise its rows agree within the tolerance policy)
    case_limits=None,               # dict of upper bounds on b, l, h, p, n for the property tests, if slow
)

INDEXED_GAP = "a batch-indexed state cache (state_batch_indices)"

_REGISTRY = {}  # the "selective" family
_FAMILIES = {"selective": (_REGISTRY, DEFAULT_SUPPORTS), "ssd": ({}, SSD_DEFAULT_SUPPORTS)}


def _family(family):
    try:
        return _FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(_FAMILIES)}") from None


def register(name, scan, step=None, family="selective", **capabilities):
    """Add an implementation under ``name`` in ``family`` ("selective": Mamba-1, "ssd": Mamba-2).

    scan: a function with the signature of ``selective_scan`` (``ssd_scan`` for family="ssd"),
          without ``impl``, called positionally;
    step: optional, with the signature of ``selective_state_update`` (``ssd_state_update``),
          without ``impl``, updating the state in place; capabilities: keys of DEFAULT_SUPPORTS
          (SSD_DEFAULT_SUPPORTS for family="ssd").
    """
    registry, defaults = _family(family)
    unknown = set(capabilities) - set(defaults)
    if unknown:
        raise TypeError(f"register({name!r}): unknown capabilities {sorted(unknown)}; known: {sorted(defaults)}")
    if name in registry:
        raise ValueError(f"register({name!r}): an implementation of that name is already registered")
    if not callable(scan) or (step is not None and not callable(step)):
        raise TypeError(f"register({name!r}): scan and step must be callables")
    supports = {**defaults, **capabilities}
    supports["dtypes"] = tuple(supports["dtypes"])
    if supports["state_batch_indices"] is None:   # a packed-sequence implementation decodes them too
        supports["state_batch_indices"] = supports["varlen"]
    module = getattr(getattr(scan, "func", scan), "__module__", "?")  # through functools.partial
    registry[name] = Implementation(name, scan, step, supports, module, family)
    return registry[name]


def names(family="selective"):
    """Registered implementation names of ``family``, in registration order."""
    return tuple(_family(family)[0])


def get(name, family="selective"):
    """The registered entry for ``name`` in ``family`` (an Implementation)."""
    registry = _family(family)[0]
    try:
        return registry[name]
    except KeyError:
        kind = "" if family == "selective" else f"{family} "
        raise ValueError(f"unknown {kind}implementation {name!r}; registered: {', '.join(registry)}") from None


def _require(entry, where, dims, grouped, has_initial_state, tensors, varlen=False, indexed=False):
    s = entry.supports
    gaps = []
    if varlen and not s["varlen"]:
        gaps.append("packed sequences (cu_seqlens)")
    if indexed and not s["state_batch_indices"]:
        gaps.append(INDEXED_GAP)
    if dims["input_dtype"] not in s["dtypes"]:
        gaps.append(f"input dtype {dims['input_dtype']}")
    if grouped and not s["grouped"]:
        gaps.append("grouped B/C")
    if has_initial_state and not s["initial_state"]:
        gaps.append("initial_state")
    if torch.is_grad_enabled() and not s["gradients"] and any(t is not None and t.requires_grad for t in tensors):
        gaps.append("gradients (an input requires grad)")
    if gaps:
        raise NotImplementedError(f"{where}: implementation {entry.name!r} does not support {', '.join(gaps)}")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False, *, cu_seqlens=None, impl="parallel"):
    """The Mamba-1 selective scan through the implementation named ``impl``.

    dt = softplus(delta + delta_bias) (each optional); h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t;
    y_t = <C_t, h_t> + D u_t; out = y * silu(z).

    Args:
        u, delta: (b, d, l); A: (d, n) real; B, C: (b, n, l) or (b, g, n, l)
        D, delta_bias: (d,) optional; z: (b, d, l) optional; initial_state: (b, d, n) optional
        cu_seqlens: (nseq + 1,) int32, optional: nseq sequences packed end to end along time, with
            b = 1; sequence i is tokens cu_seqlens[i]:cu_seqlens[i + 1] and is scanned as if alone
            (nothing crosses a boundary), from initial_state[i] with initial_state (nseq, d, n)
    Returns:
        y: (b, d, l) in u's dtype, or (y, last_state) with last_state (b, d, n) in the compute
        dtype when return_last_state; with cu_seqlens, last_state is (nseq, d, n), each
        sequence's state after its last token (its initial state, or zeros, for a length-0 one).
    Raises:
        ValueError or TypeError naming the argument for bad input (impls/frontdoor.py), a malformed
        cu_seqlens and a delta_softplus that is not a bool included; NotImplementedError when the
        implementation lacks what the call needs (cu_seqlens needs the capability ``varlen``).
    """
    entry = get(impl)
    frontdoor.check_bool("selective_scan", "delta_softplus", delta_softplus)
    if cu_seqlens is None:
        dims = frontdoor.check_scan(u, delta, A, B, C, D, z, delta_bias, initial_state)
    else:
        dims = frontdoor.check_scan_packed(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens)
    _require(entry, "selective_scan", dims, B.dim() == 4 or C.dim() == 4, initial_state is not None,
             (u, delta, A, B, C, D, z, delta_bias, initial_state),
             varlen=cu_seqlens is not None)
    b, d, l, n, f = dims["b"], dims["d"], dims["l"], dims["n"], dims["compute_dtype"]
    states = b if cu_seqlens is None else dims["nseq"]
    if u.numel() == 0:  # l = 0 (or b, d = 0): empty output, the state passes through unchanged
        last = (initial_state.to(f) if initial_state is not None
                else torch.zeros(states, d, n, dtype=f, device=u.device))
        y = u.new_empty(b, d, l)
        return (y, last) if return_last_state else y
    packed = {} if cu_seqlens is None else dict(cu_seqlens=cu_seqlens)
    out = entry.scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_last_state, **packed)
    y, last = out if return_last_state else (out, None)
    frontdoor.check_result("selective_scan", impl, "y", y, (b, d, l), u.dtype)
    if return_last_state:
        frontdoor.check_result("selective_scan", impl, "last_state", last, (states, d, n), f)
        return y, last
    return y


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           *, state_batch_indices=None, impl="recurrent"):
    """One decoding step: advance ``state`` by one token in place and return the token's output.

    Args:
        state: (b, d, n) in the compute dtype, updated in place (left untouched if the call raises
               before the implementation runs); with state_batch_indices, a (slots, d, n) cache
        x, dt: (b, d); A: (d, n); B, C: (b, n) or (b, g, n); D, dt_bias: (d,) optional; z: (b, d) optional
        state_batch_indices: (b,) int32, optional: row i advances cache slot state_batch_indices[i];
            a negative index marks a padding row: its output is zeros and no slot is touched
    Returns:
        y: (b, d) in x's dtype
    Raises:
        ValueError or TypeError naming the argument for bad input, an index >= slots, a slot used
        twice and a dt_softplus that is not a bool included, with the state untouched;
        NotImplementedError when the implementation has no step or lacks what the call needs
        (state_batch_indices needs the capability ``state_batch_indices``).
    """
    entry = get(impl)
    if entry.step is None:
        raise NotImplementedError(f"selective_state_update: implementation {impl!r} has no step function; "
                                  f"those with one: {', '.join(k for k, v in _REGISTRY.items() if v.step)}")
    frontdoor.check_bool("selective_state_update", "dt_softplus", dt_softplus)
    if state_batch_indices is None:
        dims = frontdoor.check_step(state, x, dt, A, B, C, D, z, dt_bias)
    else:
        dims = frontdoor.check_step_indexed(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)
    _require(entry, "selective_state_update", dims, B.dim() == 3 or C.dim() == 3, False,
             (state, x, dt, A, B, C, D, z, dt_bias),
             indexed=state_batch_indices is not None)
    if state_batch_indices is None:
        y = entry.step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    else:
        y = entry.step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices=state_batch_indices)
    frontdoor.check_result("selective_state_update", impl, "y", y, (dims["b"], dims["d"]), x.dtype)
    return y


def _require_ssd(entry, where, dims, tensors, **needs):
    """Refuse (NotImplementedError) a call that needs a capability ``entry`` does not declare.
    needs: capability name -> whether this call needs it."""
    s = entry.supports
    gaps = [f"input dtype {dims['input_dtype']}"] if dims["input_dtype"] not in s["dtypes"] else []
    gaps += [{"grouped": "grouped B/C (g > 1)", "D_hp": "D of shape (h, p)",
              "dt_limit": "a dt_limit other than (0, inf)", "varlen": "packed sequences (varlen)",
              "state_batch_indices": INDEXED_GAP}.get(k, k)
             for k, needed in needs.items() if needed and not s[k]]
    if torch.is_grad_enabled() and not s["gradients"] and any(t is not None and t.requires_grad for t in tensors):
        gaps.append("gradients (an input requires grad)")
    if gaps:
        raise NotImplementedError(f"{where}: implementation {entry.name!r} does not support {', '.join(gaps)}")


def ssd_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
             cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False,
             return_varlen_states=False, *, impl="chunked"):
    """The Mamba-2 SSD scan through the SSD implementation named ``impl``; the signature of the
    official ``mamba_chunk_scan_combined`` (without its state_dtype).

    dt <- clamp(softplus?(dt + dt_bias), *dt_limit) (softplus threshold 20; the clamp always, so the
    default lower limit 0 turns a negative dt into 0); h_t = exp(dt_t A) h_{t-1} + dt_t x_t (x) B_t;
    y_t = h_t C_t + D x_t; out = y silu(z). Dao & Gu 2024, eq. (1); the spec is impls/ssd_loop.py.

    Args:
        x: (b, l, h, p); dt: (b, l, h); A: (h,); B, C: (b, l, g, n), head i reads group i // (h // g)
        chunk_size: positive int, a performance setting only (any l, results differ by rounding)
        D: (h,) or (h, p) optional; z: (b, l, h, p) optional; dt_bias: (h,) optional
        initial_states: (b, h, p, n) optional (zeros); (nseq, h, p, n) with cu_seqlens
        seq_idx: (b, l) int32 optional: a new sequence wherever it changes, negative = padding
            (outputs zeros, contributes to no state); initial_states reaches a row's first sequence
        cu_seqlens: (nseq + 1,) int32 optional, b = 1: sequence i is tokens cu_seqlens[i]:cu_seqlens[i+1],
            scanned as if alone from initial_states[i]
        return_varlen_states: with cu_seqlens, also return varlen_states (nseq, h, p, n)
        (packed sequences: impls/ssd_varlen.py; they need the capability ``varlen``)
        dt_softplus: bool; dt_limit: (lo, hi) with lo <= hi
        return_final_states: also return the state after the last token (with cu_seqlens, after
            each sequence's last token: (nseq, h, p, n))
    Returns:
        out (b, l, h, p) in x's dtype, or (out, final_states) with final_states (b, h, p, n) in the
        compute dtype (float32, float64 for float64 inputs); then varlen_states if asked, the
        official order: out, [final_states], [varlen_states].
    Raises:
        ValueError / TypeError at the front door (impls/ssd_frontdoor.py, impls/ssd_varlen.py)
        naming the argument, malformed cu_seqlens or seq_idx included; NotImplementedError for what
        the implementation does not declare.
    """
    from . import ssd_frontdoor, ssd_varlen

    entry = get(impl, "ssd")
    frontdoor.check_bool("ssd_scan", "dt_softplus", dt_softplus)
    varlen = seq_idx is not None or cu_seqlens is not None or bool(return_varlen_states)
    dims, chunk_size, dt_limit = ssd_frontdoor.check_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias,
                                                          None if varlen else initial_states, dt_limit)
    if varlen:
        dims = ssd_varlen.check_packed(x, initial_states, seq_idx, cu_seqlens, return_varlen_states, dims)
    _require_ssd(entry, "ssd_scan", dims, (x, dt, A, B, C, D, z, dt_bias, initial_states),
                 grouped=dims["g"] > 1, initial_states=initial_states is not None,
                 dt_limit=dt_limit != ssd_frontdoor.DEFAULT_DT_LIMIT, D_hp=D is not None and D.dim() == 2,
                 varlen=varlen)
    b, l, h, p, n, f = dims["b"], dims["l"], dims["h"], dims["p"], dims["n"], dims["compute_dtype"]
    if x.numel() == 0 and not varlen:  # l = 0 (or b, h, p = 0): empty output, the state passes through
        final = (initial_states.to(f) if initial_states is not None
                 else torch.zeros(b, h, p, n, dtype=f, device=x.device))
        out = x.new_empty(b, l, h, p)
        return (out, final) if return_final_states else out
    res = entry.scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
                     dt_softplus, dt_limit, return_final_states, return_varlen_states)
    if varlen:
        res = list(res) if isinstance(res, tuple) else [res]
        states = b if dims["nseq"] is None else dims["nseq"]
        wanted = [("out", (b, l, h, p), x.dtype)] + [("final_states", (states, h, p, n), f)] * bool(return_final_states)
        wanted += [("varlen_states", (dims["nseq"], h, p, n), f)] * bool(return_varlen_states)
        if len(res) != len(wanted):
            raise RuntimeError(f"ssd_scan: implementation {impl!r} returned {len(res)} results, expected "
                               f"{len(wanted)}: {', '.join(w[0] for w in wanted)}")
        for r, (what, shape, dtype) in zip(res, wanted):
            frontdoor.check_result("ssd_scan", impl, what, r, shape, dtype)
        return res[0] if len(res) == 1 else tuple(res)
    out, final = res if return_final_states else (res, None)
    frontdoor.check_result("ssd_scan", impl, "out", out, (b, l, h, p), x.dtype)
    if return_final_states:
        frontdoor.check_result("ssd_scan", impl, "final_states", final, (b, h, p, n), f)
        return out, final
    return out


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                     dt_limit=(0.0, float("inf")), *, state_batch_indices=None, impl="recurrent"):
    """One Mamba-2 decoding step: advance ``state`` by one token in place and return its output.

    Args:
        state: (b, h, p, n) in the compute dtype, updated in place (left untouched whenever the call
               raises at the front door)
        x: (b, h, p); dt: (b, h) or the tied (b, h, p); A: (h,) or the tied (h, p, n);
        B, C: (b, g, n); D: (h,) or (h, p) optional; z: (b, h, p) optional;
        dt_bias: (h,) or the tied (h, p) optional. Tied forms are the official Mamba2.step's
        broadcasts (zero strides, one value per head); they are untied before the implementation runs.
        dt_softplus: bool; dt_limit: (lo, hi), applied after softplus, as in ssd_scan
        state_batch_indices: (b,) int32 optional: ``state`` is then a (slots, h, p, n) cache and row
            r advances slot state_batch_indices[r]; negative = padding row (output zeros, no slot
            touched); needs the capability ``state_batch_indices``
    Returns:
        y: (b, h, p) in x's dtype
    Raises:
        ValueError / TypeError naming the argument (an index >= slots or a slot used twice
        included), the state untouched; NotImplementedError for what the implementation lacks.
    """
    from . import ssd_frontdoor

    entry = get(impl, "ssd")
    if entry.step is None:
        raise NotImplementedError(f"ssd_state_update: implementation {impl!r} has no step function; those "
                                  f"with one: {', '.join(k for k in names('ssd') if get(k, 'ssd').step)}")
    frontdoor.check_bool("ssd_state_update", "dt_softplus", dt_softplus)
    indexed = state_batch_indices is not None
    # a (slots, h, p, n) cache is checked on its own (impls/ssd_varlen.py); no state has overlap with the rest
    dims, untied, dt_limit = ssd_frontdoor.check_step(None if indexed else state, x, dt, A, B, C, D, z, dt_bias,
                                                      dt_limit)
    if indexed:
        dims = ssd_varlen.check_step_indexed(state, x, state_batch_indices, dims)
        frontdoor.check_no_overlap("ssd_state_update", dict(state=state),
                                   dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias))
    dt, A, dt_bias = untied["dt"], untied["A"], untied["dt_bias"]
    _require_ssd(entry, "ssd_state_update", dims, (state, x, dt, A, B, C, D, z, dt_bias),
                 grouped=dims["g"] > 1, dt_limit=dt_limit != ssd_frontdoor.DEFAULT_DT_LIMIT,
                 D_hp=D is not None and D.dim() == 2, state_batch_indices=indexed)
    if indexed:
        y = entry.step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit,
                       state_batch_indices=state_batch_indices)
    else:
        y = entry.step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit)
    frontdoor.check_result("ssd_state_update", impl, "y", y, (dims["b"], dims["h"], dims["p"]), x.dtype)
    return y


def lazy(module, attr):
    """A function that imports impls.<module> on first call: ``import impls`` never imports GPU or
    compile-heavy code (Triton kernels), so collecting the tests on a CPU machine compiles nothing."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(f"impls.{module}"), attr)(*args, **kwargs)

    call.__module__, call.__qualname__, call.__name__ = f"impls.{module}", attr, attr
    return call


ENTRY_POINT_GROUP = "selective_scan.implementations"


def load_plugins():
    """Register the implementations of installed packages.

    A package declares, in its pyproject.toml,

        [project.entry-points."selective_scan.implementations"]
        my_kernel = "my_kernel:register"

    where the object is a function called with no arguments (it calls impls.register) or a module
    whose import registers. A plugin that fails to load is reported as a warning, never fatal, and
    never half-registered under a wrong name. Returns {entry point name: error or None}.
    """
    import warnings
    from importlib.metadata import entry_points

    status = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if callable(obj):
                obj()
            status[ep.name] = None
        except Exception as e:  # a broken third-party package must not break the suite
            status[ep.name] = f"{type(e).__name__}: {e}"
            warnings.warn(f"selective-scan plugin {ep.name!r} ({ep.value}) failed to load: {status[ep.name]}")
    return status


# Not batch_invariant (the default): built from batched torch ops on a CPU, whose softplus and silu
# round an element differently in their vectorised body and in their scalar tail (measured: 13% of
# float32 elements, by an ulp), and which elements fall in the tail depends on the batch size. Their
# rows agree within the tolerance policy instead, which is what is tested.
register("loop", loop.selective_scan, gradients=True, varlen=True)
register("recurrent", recurrent.selective_scan, step=recurrent.selective_state_update, varlen=True)
register("parallel", parallel.selective_scan, gradients=True, varlen=True)

# Triton kernels (impls/triton_scan.py), when triton is installed. Imported on first call only.
# Without a GPU they run in Triton's interpreter, one program after another, so the property tests
# fold their cases into small sizes (odd sizes stay odd; l still spans several 16-token chunks);
# on a GPU they run natively, at the suite's full sizes. Declared gap: varlen (the kernels take no
# cu_seqlens or state_batch_indices yet; the Triton issue may add them).
import importlib.util  # noqa: E402

if importlib.util.find_spec("triton") is not None:
    _interpreted = not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
    register("triton", lazy("triton_scan", "selective_scan"), step=lazy("triton_scan", "selective_state_update"),
             gradients=True, batch_invariant=True, case_limits=dict(b=2, d=40, n=16, l=40) if _interpreted else None)

# mamba.py's pscan and step (impls/mambapy_adapter.py), the pure-PyTorch peer, when mambapy is
# installed (a dev dependency). It has one B and C per token: grouped B/C is a declared gap, and so
# is varlen (mamba.py has no packed sequences and no batch-indexed cache). Non-finite inputs too: the
# pscan multiplies decays together before applying them, so where a product of decays underflows to
# 0 an inf state becomes 0 x inf = NaN, where the loop's stays inf (pinned in test_values.py).
if importlib.util.find_spec("mambapy") is not None:
    register("mambapy", lazy("mambapy_adapter", "selective_scan"), step=lazy("mambapy_adapter", "selective_state_update"),
             gradients=True, grouped=False, nonfinite_inputs=False, batch_invariant=False)

# The official kernels (impls/mamba_ssm_adapter.py), where mamba_ssm imports and there is a GPU.
# Their known gaps are declared; their known bugs are in equivalence/xfails/mamba_ssm.txt.
# varlen=False: the official Mamba-1 kernel has no packed sequences (requested since 2024).
# deterministic=False: its backward sums dD and ddelta_bias over thread blocks with atomic adds; batch
# invariance is not measured on a GPU here, so its rows are held to the tolerance policy.
MAMBA_SSM_SUPPORTS = dict(dtypes=(torch.float32, torch.float16, torch.bfloat16), initial_state=False, gradients=True,
                          varlen=False, deterministic=False, batch_invariant=False)


def register_mamba_ssm(name="mamba_ssm"):
    """Register the official kernels' adapter under ``name`` (equivalence/test_mamba_ssm.py also
    registers it over a stand-in package, on the CPU, to test the adapter's translation)."""
    return register(name, lazy("mamba_ssm_adapter", "selective_scan"),
                    step=lazy("mamba_ssm_adapter", "selective_state_update"), **MAMBA_SSM_SUPPORTS)


if importlib.util.find_spec("mamba_ssm") is not None and torch.cuda.is_available():
    register_mamba_ssm()

# The Mamba-2 SSD family: the spec, the chunked default, the step (and its scan by stepping).
from . import ssd_chunked, ssd_loop, ssd_recurrent  # noqa: E402

# varlen (impls/ssd_varlen.py): the loop cuts each sequence out (the definition), chunked restarts its
# chunks at each sequence's first token (vLLM's layout), recurrent steps each sequence from its own
# state and its step takes state_batch_indices.
# batch_invariant=False: batched torch ops on a CPU, as for Mamba-1's loop above.
register("loop", ssd_loop.ssd_scan, family="ssd", gradients=True, varlen=True, batch_invariant=False)
register("chunked", ssd_chunked.ssd_scan, family="ssd", gradients=True, varlen=True, batch_invariant=False)
register("recurrent", ssd_recurrent.ssd_scan, step=ssd_recurrent.ssd_state_update, family="ssd", varlen=True,
         batch_invariant=False)
# Every grouped Mamba-1 implementation (parallel, ...) through the d = h p mapping, under its own name,
# with its Mamba-1 varlen: cu_seqlens and state_batch_indices pass through the mapping, seq_idx rows
# are packed into one cu_seqlens call (impls/ssd_varlen.py: through_cu_seqlens).
from . import ssd_mapped  # noqa: E402

ssd_mapped.register_all()

# The chunked SSD scan and the decode step as Triton kernels (impls/triton_ssd.py), imported on first
# call only. Without a GPU they run in Triton's interpreter, so the property tests fold their cases
# into small sizes (l still spans several chunks of the drawn chunk sizes). Declared gap: packed
# scans (varlen); its step does take state_batch_indices.
if importlib.util.find_spec("triton") is not None:
    register("triton", lazy("triton_ssd", "ssd_scan"), step=lazy("triton_ssd", "ssd_state_update"), family="ssd",
             gradients=True, state_batch_indices=True, batch_invariant=True,
             case_limits=dict(b=2, l=24, h=2, p=6, n=6) if _interpreted else None)

# transformers' Mamba-2 pure-PyTorch chunked SSD (impls/transformers_ssd_adapter.py), the CPU peer of
# `chunked`. Registered on request only (importing impls.transformers_ssd_adapter registers it:
# `pytest --ssd-impl impls.transformers_ssd_adapter --xfails-file equivalence/xfails/transformers_ssd.txt`;
# the SSD benchmark does so): its known bugs, listed in that file with their reasons, would fail the
# default run. Gaps: D (h, p); float64 (its scan computes in float32); the half dtypes (it adds dt_bias
# and applies softplus in the input dtype, far outside the tolerance policy); varlen (its torch path
# takes no seq_idx or cu_seqlens, its step no state_batch_indices). Its step has no dt_limit,
# a capability the entry would share with the scan: the entry carries the scan only, and the step is
# checked in equivalence/test_ssd_adapters.py on the cases it can serve.
TRANSFORMERS_SSD_SUPPORTS = dict(dtypes=(torch.float32,), D_hp=False, gradients=True, batch_invariant=False)


def register_transformers_ssd(name="transformers"):
    """Register transformers' pure-PyTorch SSD scan in the ssd family under ``name``."""
    return register(name, lazy("transformers_ssd_adapter", "ssd_scan"), family="ssd", **TRANSFORMERS_SSD_SUPPORTS)


# The official Mamba-2 kernels (impls/mamba_ssm_ssd_adapter.py), where mamba_ssm imports and there is
# a GPU. Gaps: float64; varlen (it has seq_idx, cu_seqlens and return_varlen_states, but its
# initial_states reaches only a row's first sequence: no per-sequence initial states, which the
# varlen properties need; its step's state_batch_indices is not wired through the adapter). Its
# step has no dt_limit (nor the clamp at 0 of a negative dt): a known official bug, an expected
# failure in equivalence/xfails/mamba_ssm_ssd.txt, while its scan's dt_limit is tested.
# deterministic=False: a known dD race in its backward (FIELD-NOTES.md); batch invariance as for Mamba-1's.
MAMBA_SSM_SSD_SUPPORTS = dict(dtypes=(torch.float32, torch.float16, torch.bfloat16), gradients=True,
                              deterministic=False, batch_invariant=False)


def register_mamba_ssm_ssd(name="mamba_ssm"):
    """Register the official Mamba-2 kernels' adapter in the ssd family under ``name``
    (equivalence/test_ssd_adapters.py registers it over a stand-in package, on the CPU)."""
    return register(name, lazy("mamba_ssm_ssd_adapter", "ssd_scan"), step=lazy("mamba_ssm_ssd_adapter", "ssd_state_update"),
                    family="ssd", **MAMBA_SSM_SSD_SUPPORTS)


if importlib.util.find_spec("mamba_ssm") is not None and torch.cuda.is_available():
    register_mamba_ssm_ssd()

# Installed packages last: built-in names are taken first, so a plugin cannot shadow them.
BUILTIN = names()
PLUGINS = load_plugins()
