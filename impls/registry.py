"""The registry: families of scans, the implementations registered in each, and what each can do.

A family is a value (``Family``): its name, its public scan and step, its default capabilities and
the command-line options that put a kernel of it under test. Each family's package (impls/selective,
impls/ssd, ...) declares its Family and registers its built-in implementations; a third family is a
folder and one ``add_family`` call, nothing more.
"""

import dataclasses
import importlib
import os
import warnings
from typing import Callable, Optional

import torch

# Triton reads TRITON_INTERPRET once, when it is first imported (a machine-info probe, a plugin):
# set it here, before anything can import triton, so that without a GPU the Triton kernels run in
# its interpreter whatever imports triton first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INDEXED_GAP = "a batch-indexed state cache (state_batch_indices)"


def triton_interpreted():
    """Whether Triton kernels run in its interpreter here (no GPU, or TRITON_INTERPRET set)."""
    return not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@dataclasses.dataclass(frozen=True)
class Family:
    """One family of scans.

    name: "selective", "ssd", ...; scan, step: its public functions (``impls.selective_scan``, ...),
    which take ``impl=``; supports: its default capabilities (the keys ``register`` accepts);
    gaps: capability -> how a refusal names it; option, step_option: the pytest options that choose
    its implementations (``--impl``, ``--impl-step``); equivalence: the module with its case type,
    input maker and tolerance magnitudes (imported by the tests only, never by ``import impls``).
    """
    name: str
    scan: Callable
    step: Callable
    supports: dict
    gaps: dict
    option: str
    step_option: str
    equivalence: str
    registry: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class Implementation:
    name: str
    scan: Callable
    step: Optional[Callable]
    supports: dict
    module: str
    family: str = "selective"


FAMILIES = {}


def add_family(family):
    """Make ``family`` (a Family) known to register, names and get."""
    if family.name in FAMILIES:
        raise ValueError(f"add_family: a family named {family.name!r} exists")
    FAMILIES[family.name] = family
    return family


def get_family(name):
    """The Family named ``name``."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}") from None


def register(name, scan, step=None, family="selective", **capabilities):
    """Add an implementation under ``name`` in ``family``.

    scan: a function with the signature of the family's public scan (``selective_scan``,
          ``ssd_scan``, ...) without ``impl``, called positionally;
    step: optional, with the signature of the family's public step without ``impl``, updating the
          state in place; capabilities: keys of the family's ``supports``.
    """
    fam = get_family(family)
    unknown = set(capabilities) - set(fam.supports)
    if unknown:
        raise TypeError(f"register({name!r}): unknown capabilities {sorted(unknown)}; known: {sorted(fam.supports)}")
    if name in fam.registry:
        raise ValueError(f"register({name!r}): an implementation of that name is already registered")
    if not callable(scan) or (step is not None and not callable(step)):
        raise TypeError(f"register({name!r}): scan and step must be callables")
    supports = {**fam.supports, **capabilities}
    supports["dtypes"] = tuple(supports["dtypes"])
    if supports.get("state_batch_indices", False) is None:  # a packed-sequence implementation decodes them too
        supports["state_batch_indices"] = supports["varlen"]
    module = getattr(getattr(scan, "func", scan), "__module__", "?")  # through functools.partial
    fam.registry[name] = Implementation(name, scan, step, supports, module, family)
    return fam.registry[name]


def unregister(name, family="selective"):
    """Remove ``name`` from ``family`` (tests that register a stand-in for one test)."""
    get_family(family).registry.pop(name, None)


def names(family="selective"):
    """Registered implementation names of ``family``, in registration order."""
    return tuple(get_family(family).registry)


def get(name, family="selective"):
    """The registered entry for ``name`` in ``family`` (an Implementation)."""
    registry = get_family(family).registry
    try:
        return registry[name]
    except KeyError:
        kind = "" if family == "selective" else f"{family} "
        raise ValueError(f"unknown {kind}implementation {name!r}; registered: {', '.join(registry)}") from None


def require(entry, where, input_dtype, tensors, **needs):
    """Refuse (NotImplementedError) a call that needs what ``entry`` does not declare.

    input_dtype: the call's input dtype; tensors: its tensor arguments (gradients are needed when
    one requires grad); needs: capability name -> whether this call needs it.
    """
    s, gaps_named = entry.supports, FAMILIES[entry.family].gaps
    gaps = [f"input dtype {input_dtype}"] if input_dtype not in s["dtypes"] else []
    gaps += [gaps_named.get(k, k) for k, needed in needs.items() if needed and not s[k]]
    if torch.is_grad_enabled() and not s["gradients"] and any(t is not None and t.requires_grad for t in tensors):
        gaps.append("gradients (an input requires grad)")
    if gaps:
        raise NotImplementedError(f"{where}: implementation {entry.name!r} does not support {', '.join(gaps)}")


def require_step(entry, where):
    """Refuse a step call to an implementation without a step, naming those with one."""
    if entry.step is None:
        with_step = [k for k, v in FAMILIES[entry.family].registry.items() if v.step]
        raise NotImplementedError(f"{where}: implementation {entry.name!r} has no step function; "
                                  f"those with one: {', '.join(with_step)}")


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
