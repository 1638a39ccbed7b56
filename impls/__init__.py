"""Selective-scan implementations behind one interface.

    import impls
    impls.names()                       # registered implementation names
    impls.get("loop")                   # its entry: name, scan, step, supports
    impls.register("mine", scan=my_scan, step=my_step, gradients=True)
    y = impls.selective_scan(u, delta, A, B, C, ..., impl="parallel")
    y = impls.selective_state_update(state, x, dt, A, B, C, ..., impl="recurrent")

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
    case_limits=None,               # dict of upper bounds on b, d, n, l for the property tests, if slow
)


@dataclasses.dataclass(frozen=True)
class Implementation:
    name: str
    scan: Callable
    step: Optional[Callable]
    supports: dict
    module: str


_REGISTRY = {}


def register(name, scan, step=None, **capabilities):
    """Add an implementation under ``name``.

    scan: a function with the signature of ``selective_scan`` (without ``impl``);
    step: optional, with the signature of ``selective_state_update`` (without ``impl``), updating
          the state in place; capabilities: keys of DEFAULT_SUPPORTS.
    """
    unknown = set(capabilities) - set(DEFAULT_SUPPORTS)
    if unknown:
        raise TypeError(f"register({name!r}): unknown capabilities {sorted(unknown)}; known: {sorted(DEFAULT_SUPPORTS)}")
    if name in _REGISTRY:
        raise ValueError(f"register({name!r}): an implementation of that name is already registered")
    if not callable(scan) or (step is not None and not callable(step)):
        raise TypeError(f"register({name!r}): scan and step must be callables")
    supports = {**DEFAULT_SUPPORTS, **capabilities}
    supports["dtypes"] = tuple(supports["dtypes"])
    module = getattr(getattr(scan, "func", scan), "__module__", "?")  # through functools.partial
    _REGISTRY[name] = Implementation(name, scan, step, supports, module)
    return _REGISTRY[name]


def names():
    """Registered implementation names, in registration order."""
    return tuple(_REGISTRY)


def get(name):
    """The registered entry for ``name`` (an Implementation)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown implementation {name!r}; registered: {', '.join(_REGISTRY)}") from None


def _require(entry, where, dims, grouped, has_initial_state, tensors):
    s = entry.supports
    gaps = []
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
                   initial_state=None, return_last_state=False, *, impl="parallel"):
    """The Mamba-1 selective scan through the implementation named ``impl``.

    dt = softplus(delta + delta_bias) (each optional); h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t;
    y_t = <C_t, h_t> + D u_t; out = y * silu(z).

    Args:
        u, delta: (b, d, l); A: (d, n) real; B, C: (b, n, l) or (b, g, n, l)
        D, delta_bias: (d,) optional; z: (b, d, l) optional; initial_state: (b, d, n) optional
    Returns:
        y: (b, d, l) in u's dtype, or (y, last_state) with last_state (b, d, n) in the compute
        dtype when return_last_state.
    """
    entry = get(impl)
    dims = frontdoor.check_scan(u, delta, A, B, C, D, z, delta_bias, initial_state)
    _require(entry, "selective_scan", dims, B.dim() == 4 or C.dim() == 4, initial_state is not None,
             (u, delta, A, B, C, D, z, delta_bias, initial_state))
    b, d, l, n, f = dims["b"], dims["d"], dims["l"], dims["n"], dims["compute_dtype"]
    if u.numel() == 0:  # l = 0 (or b, d = 0): empty output, the state passes through unchanged
        last = (initial_state.to(f) if initial_state is not None
                else torch.zeros(b, d, n, dtype=f, device=u.device))
        y = u.new_empty(b, d, l)
        return (y, last) if return_last_state else y
    out = entry.scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_last_state)
    y, last = out if return_last_state else (out, None)
    frontdoor.check_result("selective_scan", impl, "y", y, (b, d, l), u.dtype)
    if return_last_state:
        frontdoor.check_result("selective_scan", impl, "last_state", last, (b, d, n), f)
        return y, last
    return y


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           *, impl="recurrent"):
    """One decoding step: advance ``state`` by one token in place and return the token's output.

    Args:
        state: (b, d, n) in the compute dtype, updated in place (left untouched if the call raises
               before the implementation runs)
        x, dt: (b, d); A: (d, n); B, C: (b, n) or (b, g, n); D, dt_bias: (d,) optional; z: (b, d) optional
    Returns:
        y: (b, d) in x's dtype
    """
    entry = get(impl)
    if entry.step is None:
        raise NotImplementedError(f"selective_state_update: implementation {impl!r} has no step function; "
                                  f"those with one: {', '.join(k for k, v in _REGISTRY.items() if v.step)}")
    dims = frontdoor.check_step(state, x, dt, A, B, C, D, z, dt_bias)
    _require(entry, "selective_state_update", dims, B.dim() == 3 or C.dim() == 3, False,
             (state, x, dt, A, B, C, D, z, dt_bias))
    y = entry.step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    frontdoor.check_result("selective_state_update", impl, "y", y, (dims["b"], dims["d"]), x.dtype)
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


register("loop", loop.selective_scan, gradients=True)
register("recurrent", recurrent.selective_scan, step=recurrent.selective_state_update)
register("parallel", parallel.selective_scan, gradients=True)

# Triton kernels (impls/triton_scan.py), when triton is installed. Imported on first call only.
# Without a GPU they run in Triton's interpreter, one program after another, so the property tests
# fold their cases into small sizes (odd sizes stay odd; l still spans several 16-token chunks);
# on a GPU they run natively, at the suite's full sizes.
import importlib.util  # noqa: E402

if importlib.util.find_spec("triton") is not None:
    _interpreted = not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
    register("triton", lazy("triton_scan", "selective_scan"), step=lazy("triton_scan", "selective_state_update"),
             gradients=True, case_limits=dict(b=2, d=40, n=16, l=40) if _interpreted else None)

# mamba.py's pscan and step (impls/mambapy_adapter.py), the pure-PyTorch peer, when mambapy is
# installed (a dev dependency). It has one B and C per token: grouped B/C is a declared gap.
if importlib.util.find_spec("mambapy") is not None:
    register("mambapy", lazy("mambapy_adapter", "selective_scan"), step=lazy("mambapy_adapter", "selective_state_update"),
             gradients=True, grouped=False)

# The official kernels (impls/mamba_ssm_adapter.py), where mamba_ssm imports and there is a GPU.
# Their known gaps are declared; their known bugs are in equivalence/xfails/mamba_ssm.txt.
MAMBA_SSM_SUPPORTS = dict(dtypes=(torch.float32, torch.float16, torch.bfloat16), initial_state=False, gradients=True)


def register_mamba_ssm(name="mamba_ssm"):
    """Register the official kernels' adapter under ``name`` (equivalence/test_mamba_ssm.py also
    registers it over a stand-in package, on the CPU, to test the adapter's translation)."""
    return register(name, lazy("mamba_ssm_adapter", "selective_scan"),
                    step=lazy("mamba_ssm_adapter", "selective_state_update"), **MAMBA_SSM_SUPPORTS)


if importlib.util.find_spec("mamba_ssm") is not None and torch.cuda.is_available():
    register_mamba_ssm()

# Installed packages last: built-in names are taken first, so a plugin cannot shadow them.
BUILTIN = names()
PLUGINS = load_plugins()
