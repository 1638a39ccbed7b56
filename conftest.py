"""pytest wiring: which implementations are under test, and the hypothesis profiles.

    pytest                                   # every registered implementation
    pytest --impl loop --impl recurrent      # only these
    pytest --impl my_package.my_module       # a module that calls impls.register(...) on import
    pytest --impl my_module:my_scan          # any function with the selective_scan signature
    pytest --impl-step my_module:my_step     # a step function (its scan is the step run per token)
    pytest --hypothesis-profile thorough     # profiles: ci, dev, thorough
"""

import importlib
import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated: set it before any kernel module is
# imported, so that without a GPU the Triton kernels run (slowly) in its interpreter, in every CI run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import HealthCheck, settings

# The suite's tensors are small: one thread runs them as fast, and on a 2-core machine with any
# other process busy, a second OpenMP thread made small ops wait on a descheduled thread (measured
# here: a decode step 30x slower). Benchmarks set their own thread count.
torch.set_num_threads(1)

import impls

# CI sets CI=true, which makes hypothesis load its own "ci" profile; ours replaces it by name and
# is loaded explicitly in pytest_configure, so the settings below are the ones in force.
_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=25, derandomize=True, database=None, **_COMMON)
settings.register_profile("dev", max_examples=25, **_COMMON)
settings.register_profile("thorough", max_examples=500, **_COMMON)


def pytest_addoption(parser):
    group = parser.getgroup("selective scan")
    group.addoption("--impl", action="append", default=[], metavar="NAME|MODULE|MODULE:FUNCTION",
                    help="implementation(s) under test: a registered name, a module that registers "
                         "implementations on import, or a scan function; repeatable (default: all registered)")
    group.addoption("--xfails-file", default=None, metavar="FILE",
                    help="expected failures: one test-id prefix per line (# comments allowed), for an "
                         "implementation's known gaps; listed tests run and are reported as xfail/xpass")
    group.addoption("--impl-step", default=None, metavar="MODULE:FUNCTION",
                    help="a selective_state_update-like step function to test (with --impl MODULE:FUNCTION, "
                         "its step; alone, also its scan, run token by token)")


def _load(spec):
    module, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise pytest.UsageError(f"--impl {spec}: cannot import {module!r}: {e}") from None
    if not attr:
        return mod
    if not callable(getattr(mod, attr, None)):
        raise pytest.UsageError(f"--impl {spec}: {module!r} has no function {attr!r}")
    return getattr(mod, attr)


def _select(config):
    from impls.recurrent import scan_by_stepping

    step = _load(config.getoption("impl_step")) if config.getoption("impl_step") else None
    chosen = []
    for spec in config.getoption("impl"):
        if spec in impls.names():
            chosen.append(spec)
        elif ":" in spec:
            if spec not in impls.names():
                impls.register(spec, _load(spec), step=step)
            chosen.append(spec)
            step = None
        elif "." in spec or importlib.util.find_spec(spec) is not None:
            before = set(impls.names())
            _load(spec)
            added = [n for n in impls.names() if n not in before]
            if not added:
                raise pytest.UsageError(f"--impl {spec}: importing it registered no implementation")
            chosen += added
        elif spec == "mamba_ssm":
            raise pytest.UsageError("--impl mamba_ssm: registered only where the mamba_ssm package imports and "
                                    "CUDA is available (impls/mamba_ssm_adapter.py), which is not the case here")
        else:
            raise pytest.UsageError(f"--impl {spec}: not a registered implementation "
                                    f"({', '.join(impls.names())}), a module, or module:function")
    if step is not None:  # a step on its own: its scan is the step, token by token
        name = config.getoption("impl_step")
        if name not in impls.names():
            impls.register(name, scan_by_stepping(step), step=step)
        chosen.append(name)
    return tuple(dict.fromkeys(chosen)) or impls.names()


def pytest_configure(config):
    if not config.getoption("hypothesis_profile", None):
        settings.load_profile(os.environ.get("SCAN_HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
    config.selected_impls = _select(config)


def _xfail_prefixes(config):
    path = config.getoption("xfails_file")
    if not path:
        return {}
    try:
        with open(path) as f:
            lines = [line.split("#", 1) for line in f]
    except OSError as e:
        raise pytest.UsageError(f"--xfails-file {path}: {e}") from None
    return {parts[0].strip(): (parts[1].strip() if len(parts) > 1 else f"listed in {path}")
            for parts in lines if parts[0].strip()}


def pytest_collection_modifyitems(config, items):
    prefixes = _xfail_prefixes(config)
    used = set()
    for item in items:
        for prefix, reason in prefixes.items():
            if item.nodeid.startswith(prefix):
                item.add_marker(pytest.mark.xfail(reason=f"expected failure: {reason}", strict=False))
                used.add(prefix)
    for prefix in set(prefixes) - used:
        config.issue_config_time_warning(pytest.PytestConfigWarning(
            f"--xfails-file: {prefix!r} matches no collected test"), stacklevel=2)


def pytest_report_header(config):
    from equivalence.checks import describe

    lines = [f"hypothesis profile: {settings().max_examples} examples per property"]
    return lines + ["implementation under test: " + describe(n) for n in config.selected_impls]


# Fixtures that parametrize over the implementations under test. Those without the capability a
# test needs appear as skipped, with the declared gap as the reason: visible, never silently passed.
IMPL_FIXTURES = {
    "impl": (lambda e: True, None),
    "stepping_impl": (lambda e: e.step is not None, "no step function"),
    "gradient_impl": (lambda e: e.supports["gradients"], "no gradient support"),
    "continuing_impl": (lambda e: e.supports["initial_state"], "no initial_state support"),
}


def pytest_generate_tests(metafunc):
    for fixture, (has, gap) in IMPL_FIXTURES.items():
        if fixture in metafunc.fixturenames:
            metafunc.parametrize(fixture, [
                n if has(impls.get(n)) else pytest.param(n, marks=pytest.mark.skip(reason=f"{n}: declared gap: {gap}"))
                for n in metafunc.config.selected_impls])
# ---- Mamba-2 SSD (issue 15): the SSD family's plug-in options and fixtures --------------------------
# Hook implementations of their own (specname), so the SSD block and the Mamba-1 hooks above stay apart.
#     pytest --ssd-impl chunked                     # SSD tests of one registered SSD implementation
#     pytest --ssd-impl my_module                   # a module that calls impls.register(..., family="ssd")
#     pytest --ssd-impl my_module:my_ssd_scan       # any function with the ssd_scan signature
#     pytest --ssd-impl-step my_module:my_ssd_step  # an ssd_state_update-like step (scan: step per token)
# Used alone (without --impl/--impl-step) they restrict the run to the SSD tests; --impl alone
# restricts it to the Mamba-1 tests.

SSD_FIXTURES = {
    "ssd_impl": (lambda e: True, None),
    "ssd_stepping_impl": (lambda e: e.step is not None, "no step function"),
    "ssd_gradient_impl": (lambda e: e.supports["gradients"], "no gradient support"),
    "ssd_continuing_impl": (lambda e: e.supports["initial_states"], "no initial_states support"),
}


@pytest.hookimpl(specname="pytest_addoption")
def pytest_addoption_ssd(parser):
    group = parser.getgroup("ssd scan")
    group.addoption("--ssd-impl", action="append", default=[], metavar="NAME|MODULE|MODULE:FUNCTION",
                    help="SSD implementation(s) under test: a registered SSD name, a module that registers SSD "
                         "implementations on import, or an ssd_scan-like function; repeatable (default: all)")
    group.addoption("--ssd-impl-step", default=None, metavar="MODULE:FUNCTION",
                    help="an ssd_state_update-like step function to test (with --ssd-impl MODULE:FUNCTION, its "
                         "step; alone, also its scan, run token by token)")


def _load_ssd(option, spec):
    try:
        return _load(spec)
    except pytest.UsageError as e:
        raise pytest.UsageError(str(e).replace("--impl", option, 1)) from None


def _select_ssd(config):
    from impls.ssd_recurrent import scan_by_stepping

    step_spec = config.getoption("ssd_impl_step")
    step = _load_ssd("--ssd-impl-step", step_spec) if step_spec else None
    if step_spec and (":" not in step_spec or not callable(step)):
        raise pytest.UsageError(f"--ssd-impl-step {step_spec}: expected MODULE:FUNCTION")
    chosen = []
    for spec in config.getoption("ssd_impl"):
        if spec in impls.names("ssd"):
            chosen.append(spec)
        elif ":" in spec:
            impls.register(spec, _load_ssd("--ssd-impl", spec), step=step, family="ssd")
            chosen.append(spec)
            step = None
        elif "." in spec or importlib.util.find_spec(spec) is not None:
            before = set(impls.names("ssd"))
            _load_ssd("--ssd-impl", spec)
            added = [n for n in impls.names("ssd") if n not in before]
            if not added:
                raise pytest.UsageError(f"--ssd-impl {spec}: importing it registered no SSD implementation")
            chosen += added
        else:
            raise pytest.UsageError(f"--ssd-impl {spec}: not a registered SSD implementation "
                                    f"({', '.join(impls.names('ssd'))}), a module, or module:function")
    if step is not None:  # a step on its own: its scan is the step, token by token
        impls.register(step_spec, scan_by_stepping(step), step=step, family="ssd")
        chosen.append(step_spec)
    return tuple(dict.fromkeys(chosen)) or impls.names("ssd")


@pytest.hookimpl(specname="pytest_configure")
def pytest_configure_ssd(config):
    config.selected_ssd_impls = _select_ssd(config)


def _is_ssd_test(item):
    name = os.path.basename(str(item.fspath))
    return name.startswith(("test_ssd", "test_triton_ssd")) or any(f in SSD_FIXTURES for f in getattr(item, "fixturenames", ()))


@pytest.hookimpl(specname="pytest_collection_modifyitems", trylast=True)
def pytest_collection_modifyitems_ssd(config, items):
    ssd_only = bool(config.getoption("ssd_impl") or config.getoption("ssd_impl_step"))
    selective_only = bool(config.getoption("impl") or config.getoption("impl_step"))
    if ssd_only == selective_only:  # neither, or both: everything collected runs
        return
    keep = [item for item in items if _is_ssd_test(item) == ssd_only]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if _is_ssd_test(item) != ssd_only])
        items[:] = keep


@pytest.hookimpl(specname="pytest_report_header")
def pytest_report_header_ssd(config):
    from equivalence.ssd_checks import describe

    return ["SSD implementation under test: " + describe(n) for n in config.selected_ssd_impls]


@pytest.hookimpl(specname="pytest_generate_tests")
def pytest_generate_tests_ssd(metafunc):
    for fixture, (has, gap) in SSD_FIXTURES.items():
        if fixture in metafunc.fixturenames:
            metafunc.parametrize(fixture, [
                n if has(impls.get(n, "ssd")) else pytest.param(n, marks=pytest.mark.skip(reason=f"{n}: declared gap: {gap}"))
                for n in metafunc.config.selected_ssd_impls])
