"""pytest wiring: which implementations are under test, and the hypothesis profiles.

    pytest                                   # every registered implementation
    pytest --impl loop --impl recurrent      # only these
    pytest --impl my_package.my_module       # a module that calls impls.register(...) on import
    pytest --impl my_module:my_scan          # any function with the selective_scan signature
    pytest --impl-step my_module:my_step     # a step function (its scan is the step run per token)
    pytest --impl-step recurrent             # or a registered name with a step (its step)
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
settings.register_profile("ci", max_examples=25, database=None, **_COMMON)
settings.register_profile("dev", max_examples=25, **_COMMON)
settings.register_profile("thorough", max_examples=500, **_COMMON)

# Every run draws from one seed, printed in the header and beside every failure, so that any run,
# a user's or CI's, is replayed exactly by `make test SEED=N` (pytest --hypothesis-seed N). A user's
# run draws a fresh seed, CI's is the commit's: reproducible, yet every commit draws anew (a fixed
# derandomized draw passed in CI every time while users' fresh draws failed). With a seed given,
# hypothesis keeps no database, so one failure is not replayed into every later run.
SEED_ENV = "SCAN_HYPOTHESIS_SEED"   # also how the xdist workers get the controller's seed

# A failure near the bound once spent over five minutes shrinking; a shrunk case is worth a minute,
# and the first, unshrunk case is printed as soon as it fails (equivalence/tolerance.py). Hypothesis
# keeps this limit monkeypatchable for this purpose.
SHRINKING_SECONDS = 60


def _run_seed():
    import secrets
    import subprocess

    if os.environ.get(SEED_ENV):
        return int(os.environ[SEED_ENV])
    if os.environ.get("CI"):
        try:
            head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                  cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
            return int(head[:8], 16)
        except (OSError, subprocess.CalledProcessError, ValueError):
            pass
    return secrets.randbelow(2**32)


def pytest_addoption(parser):
    group = parser.getgroup("selective scan")
    group.addoption("--impl", action="append", default=[], metavar="NAME|MODULE|MODULE:FUNCTION",
                    help="implementation(s) under test: a registered name, a module that registers "
                         "implementations on import, or a scan function; repeatable (default: all registered)")
    group.addoption("--xfails-file", default=None, metavar="FILE",
                    help="expected failures: one test-id prefix per line (# comments allowed), for an "
                         "implementation's known gaps; listed tests run and are reported as xfail/xpass")
    group.addoption("--impl-step", default=None, metavar="MODULE:FUNCTION|NAME",
                    help="a selective_state_update-like step function to test, or a registered name with a "
                         "step (with --impl MODULE:FUNCTION, its step; alone, also its scan, run token by token)")


def _load(spec, option="--impl"):
    module, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise pytest.UsageError(f"{option} {spec}: cannot import {module!r}: {e}") from None
    if not attr:
        return mod
    if not callable(getattr(mod, attr, None)):
        raise pytest.UsageError(f"{option} {spec}: {module!r} has no function {attr!r}")
    return getattr(mod, attr)


def _load_step(spec):
    """--impl-step: MODULE:FUNCTION, or a registered name with a step (its step is used).
    Returns (step, the expression a plain script gets it by, the registered name or None)."""
    with_step = [n for n in impls.names() if impls.get(n).step is not None]
    if spec in impls.names():
        if impls.get(spec).step is None:
            raise pytest.UsageError(f"--impl-step {spec}: {spec!r} has no step function; expected MODULE:FUNCTION "
                                    f"or a registered name with a step ({', '.join(with_step)})")
        return impls.get(spec).step, f"impls.get({spec!r}).step", spec
    if ":" not in spec:
        raise pytest.UsageError(f"--impl-step {spec}: expected MODULE:FUNCTION or a registered name with a step "
                                f"({', '.join(with_step)})")
    return _load(spec, "--impl-step"), _python_name(spec)[1], None


def _python_name(spec):
    """'pkg.mod:fn' -> ('pkg.mod', 'pkg.mod.fn'): the import and the expression, for a plain script."""
    module, _, attr = spec.partition(":")
    return module, f"{module}.{attr}"


def _on_path(*specs):
    """The statements that put each spec's module where a plain script finds it: the folder it was
    imported from (a script's sys.path[0] is the script's own folder, not where pytest ran)."""
    roots = []
    for spec in specs:
        module = spec.partition(":")[0]
        found = importlib.util.find_spec(module.split(".")[0])
        if found is not None and found.origin and found.origin not in ("built-in", "frozen"):
            top = os.path.dirname(found.origin)
            roots.append(os.path.dirname(top) if found.submodule_search_locations else top)
    roots = list(dict.fromkeys(roots))
    return f"import sys; sys.path[:0] = {roots!r}; " if roots else ""


def _register_probed(name, scan, step, setup):
    """Register a plain function under ``name`` with the capabilities its tiny probe calls showed
    (equivalence/checks.py: probe_capabilities), and how a plain script registers it the same way."""
    from equivalence.checks import PROBED, SETUP, probe_capabilities

    supports, notes = probe_capabilities(scan)
    impls.register(name, scan, step=step, **supports)
    PROBED[name] = notes
    SETUP[name] = setup


def _select(config):
    from impls.selective.recurrent import scan_by_stepping
    from equivalence.checks import SETUP

    step_spec = config.getoption("impl_step")
    step, step_expr, step_registered = _load_step(step_spec) if step_spec else (None, None, None)
    chosen = []
    for spec in config.getoption("impl"):
        if spec in impls.names():
            chosen.append(spec)
        elif ":" in spec:
            if spec not in impls.names():
                module, expr = _python_name(spec)
                setup = _on_path(spec) + f"import {module}; impls.register({spec!r}, {expr})"
                if step is not None:
                    imports = module if step_registered else f"{module}, {_python_name(step_spec)[0]}"
                    setup = (_on_path(spec, *([] if step_registered else [step_spec]))
                             + f"import {imports}; impls.register({spec!r}, {expr}, step={step_expr})")
                _register_probed(spec, _load(spec), step, setup)
            chosen.append(spec)
            step = None
        elif "." in spec or importlib.util.find_spec(spec) is not None:
            before = set(impls.names())
            _load(spec)
            added = [n for n in impls.names() if n not in before]
            if not added:
                raise pytest.UsageError(f"--impl {spec}: importing it registered no implementation")
            for name in added:  # declared at registration: those capabilities stand, nothing is probed
                SETUP[name] = _on_path(spec) + f"import {spec}"
            chosen += added
        elif spec == "mamba_ssm":
            raise pytest.UsageError("--impl mamba_ssm: registered only where the mamba_ssm package imports and "
                                    "CUDA is available (impls/adapters/mamba_ssm.py), which is not the case here")
        else:
            raise pytest.UsageError(f"--impl {spec}: not a registered implementation "
                                    f"({', '.join(impls.names())}), a module, or module:function")
    if step is not None and step_registered:  # a registered name on its own: that implementation
        chosen.append(step_registered)
    elif step is not None:  # a step on its own: its scan is the step, token by token
        name = step_spec
        if name not in impls.names():
            module, expr = _python_name(name)
            scan = scan_by_stepping(step)
            scan.__module__ = step.__module__  # the header names the step's module, not impls.selective.recurrent
            _register_probed(name, scan, step,
                             _on_path(name) + f"import {module}; from impls.selective.recurrent import scan_by_stepping; "
                             f"impls.register({name!r}, scan_by_stepping({expr}), step={expr})")
        chosen.append(name)
    return tuple(dict.fromkeys(chosen)) or impls.names()


def pytest_configure(config):
    config.addinivalue_line("markers", "only_for(name): tests of one implementation's internals, collected only "
                                       "when that implementation is under test")
    config.addinivalue_line("markers", "ssd_family: a Mamba-2 (SSD) test: deselected when only --impl/--impl-step "
                                       "is given (conftest.py: _is_ssd_test)")
    if not config.getoption("hypothesis_profile", None):
        settings.load_profile(os.environ.get("SCAN_HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
    config.selected_impls = _select(config)
    from hypothesis.internal.conjecture import engine

    engine.MAX_SHRINKING_SECONDS = SHRINKING_SECONDS


@pytest.hookimpl(tryfirst=True, specname="pytest_configure")  # before hypothesis' reads --hypothesis-seed
def pytest_configure_seed(config):
    if config.getoption("hypothesis_seed", None) is None:
        config.option.hypothesis_seed = str(_run_seed())
    os.environ[SEED_ENV] = str(config.option.hypothesis_seed)


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


# The order a failure is best met in: values (the drawn, shrunk case first, then the pinned edge
# cases), then invariants, then gradients; everything else after. A forward bug then shows first as
# a wrong value on the smallest case, not as a failed split or gradient, whose names point away from it.
ORDER = ("equivalence/test_values.py", "equivalence/test_invariants.py", "equivalence/test_gradients.py")


def _rank(item):
    path = item.nodeid.split("::")[0]
    if path not in ORDER:
        return 2 * len(ORDER)
    return 2 * ORDER.index(path) + ("::test_pinned_" in item.nodeid)


def pytest_collection_modifyitems(config, items):
    # Tests of one implementation's internals (pytest.mark.only_for) are not collected when it is not
    # under test: deselected (one count in the summary), not a skip line each.
    keep, dropped = [], []
    for item in items:
        marker = item.get_closest_marker("only_for")
        (dropped if marker and marker.args[0] not in config.selected_impls else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
    items.sort(key=_rank)  # stable: within a rank, the files' own order
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


# The options that choose what runs, repeated in a failure's replay line (a plugged-in kernel's test
# id exists only with its option).
REPLAYED_OPTIONS = (("--impl", "impl"), ("--impl-step", "impl_step"), ("--ssd-impl", "ssd_impl"),
                    ("--ssd-impl-step", "ssd_impl_step"), ("--xfails-file", "xfails_file"))


def _as_list(value):
    return [] if value is None else value if isinstance(value, list) else [value]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failed property check, say what the failing case needs: the check re-run once, for the
    final (shrunk) failure only, with each option off and each axis reduced (checks.what_it_needs)."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed or call.excinfo is None:
        return
    seed = item.config.option.hypothesis_seed
    chosen = " ".join(f"{flag} {value}" for flag, dest in REPLAYED_OPTIONS
                      for value in _as_list(item.config.getoption(dest)))
    whole = f"make test SEED={seed}" if not chosen else f"pytest {chosen} --hypothesis-seed {seed}"
    report.sections.append(("replay", f"this run's hypothesis seed is {seed}: {whole}, or this test alone:\n"
                                      f"pytest '{item.nodeid}' {chosen + ' ' if chosen else ''}--hypothesis-seed {seed}"))
    from equivalence.checks import CaseFailure, what_it_needs

    failure, todo = None, [call.excinfo.value]
    while todo and failure is None:  # hypothesis may wrap several distinct failures in a group
        e = todo.pop(0)
        if isinstance(e, CaseFailure):
            failure = e
        todo += list(getattr(e, "exceptions", ())) + [x for x in (e.__cause__, e.__context__) if x is not None]
    if failure is not None:
        lines = what_it_needs(failure)
        report.sections.append((f"what the failure needs ({failure.case.id}, re-run with each option off and "
                                f"each axis reduced)", "\n".join(lines)))


def pytest_report_header(config):
    from equivalence.checks import describe

    lines = [f"hypothesis profile: {settings().max_examples} examples per property; seed "
             f"{config.option.hypothesis_seed} (replay this run: make test SEED={config.option.hypothesis_seed})"]
    if _family_only(config) == "ssd":  # Mamba-1 tests are deselected: no Mamba-1 lines
        return lines
    return lines + ["implementation under test: " + describe(n) for n in config.selected_impls]


# Fixtures that parametrize over the implementations under test. Those without the capability a
# test needs appear as skipped, with the declared gap as the reason: visible, never silently passed.
IMPL_FIXTURES = {
    "impl": (lambda e: True, None),
    "stepping_impl": (lambda e: e.step is not None, "no step function"),
    "gradient_impl": (lambda e: e.supports["gradients"], "no gradient support"),
    "continuing_impl": (lambda e: e.supports["initial_state"], "no initial_state support"),
    "deterministic_impl": (lambda e: e.supports["deterministic"], "not deterministic"),
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
    "ssd_deterministic_impl": (lambda e: e.supports["deterministic"], "not deterministic"),
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
    from impls.ssd.recurrent import scan_by_stepping

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


# The SSD family's tests (Mamba-2: the SSD scans, their varlen, the Mamba-2 model): files by name, a
# module or test marked ``pytest.mark.ssd_family``, a test using an SSD fixture, or, in a file of both
# families, a test whose name has "ssd" as a word (test_ssd_..., test_an_ssd_run_...).
SSD_FILES = ("test_ssd", "test_triton_ssd", "test_varlen_ssd", "test_model2")


def _is_ssd_test(item):
    name = os.path.basename(str(item.fspath))
    return (name.startswith(SSD_FILES) or item.get_closest_marker("ssd_family") is not None
            or "ssd" in getattr(item, "originalname", item.name).split("_")
            or any(f in SSD_FIXTURES for f in getattr(item, "fixturenames", ())))


def _family_only(config):
    """"ssd" when only --ssd-impl/--ssd-impl-step is given, "selective" when only --impl/--impl-step,
    None when neither or both (everything collected runs)."""
    ssd = bool(config.getoption("ssd_impl") or config.getoption("ssd_impl_step"))
    selective = bool(config.getoption("impl") or config.getoption("impl_step"))
    return None if ssd == selective else ("ssd" if ssd else "selective")


@pytest.hookimpl(specname="pytest_collection_modifyitems", trylast=True)
def pytest_collection_modifyitems_ssd(config, items):
    only = _family_only(config)
    if only is None:  # neither, or both: everything collected runs
        return
    ssd_only = only == "ssd"
    keep = [item for item in items if _is_ssd_test(item) == ssd_only]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if _is_ssd_test(item) != ssd_only])
        items[:] = keep


@pytest.hookimpl(specname="pytest_report_header")
def pytest_report_header_ssd(config):
    from equivalence.ssd_checks import describe

    if _family_only(config) == "selective":  # their tests are deselected: no SSD lines
        return []
    return ["SSD implementation under test: " + describe(n) for n in config.selected_ssd_impls]


@pytest.hookimpl(specname="pytest_generate_tests")
def pytest_generate_tests_ssd(metafunc):
    for fixture, (has, gap) in SSD_FIXTURES.items():
        if fixture in metafunc.fixturenames:
            metafunc.parametrize(fixture, [
                n if has(impls.get(n, "ssd")) else pytest.param(n, marks=pytest.mark.skip(reason=f"{n}: declared gap: {gap}"))
                for n in metafunc.config.selected_ssd_impls])
