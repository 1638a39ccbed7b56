"""The suite's pytest plugin: which implementations of each family are under test, the fixtures
that run a test once per implementation, the order failures are met in, and the hypothesis
profiles. Every hook iterates over the registered families (impls.FAMILIES): a family's options
come from its Family value, so a third family gets its own without a line here.

    pytest                                   # every registered implementation of every family
    pytest --impl loop --impl recurrent      # only these (Mamba-1); --ssd-impl for the SSD, ...
    pytest --impl my_package.my_module       # a module that calls impls.register(...) on import
    pytest --impl my_module:my_scan          # any function with the family's scan signature: its
                                             # capabilities are probed by tiny calls
    pytest --impl-step my_module:my_step     # a step function (its scan is the step run per token)
    pytest --impl-step recurrent             # or a registered name with a step (its step)
    pytest --hypothesis-profile thorough     # profiles: ci, dev, thorough

A test says which family it belongs to: by the ``family`` fixture (it then runs for every family
under test, its id starting with the family's name), by ``pytest.mark.family(name)``, or by an
implementation fixture of one family (``impl``, ``stepping_impl``, ... for Mamba-1, ``ssd_impl``,
``ssd_stepping_impl``, ... for the SSD: the family's name, then the fixture's). A test that says
none belongs to the default family, Mamba-1, as ``impls.register`` does. The options of only some
families given: only their tests run.
"""

import importlib
import inspect
import os
import shlex
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

import impls  # noqa: E402 (sets TRITON_INTERPRET before anything imports triton)

from . import diagnose, properties, tolerance  # noqa: E402

# The review summary (implementation x property, --scan-summary FILE) comes with the suite's hooks
pytest_plugins = ["equivalence.summary"]

DEFAULT_FAMILY = "selective"

# CI sets CI=true, which makes hypothesis load its own "ci" profile; ours replaces it by name and
# is loaded explicitly in pytest_configure, so the settings below are the ones in force.
_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# CI's 10 against a user's 25: the whole CI run (clean checkout, install, every test on 2 cores) must
# stay under 15 minutes (docs/testing.md has the measured times), and its seed changes with every
# commit, so over commits it draws more
settings.register_profile("ci", max_examples=10, database=None, **_COMMON)
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


def run_seed():
    import secrets
    import subprocess

    if os.environ.get(SEED_ENV):
        return int(os.environ[SEED_ENV])
    if os.environ.get("CI"):
        try:
            head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                  cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.strip()
            return int(head[:8], 16)
        except (OSError, subprocess.CalledProcessError, ValueError):
            pass
    return secrets.randbelow(2**32)


def dest(option):
    """'--ssd-impl-step' -> 'ssd_impl_step', as argparse names it."""
    return option.lstrip("-").replace("-", "_")


def prefix(family):
    """What a family's fixtures and config attributes start with: "" for the default, "ssd_", ..."""
    return "" if family == DEFAULT_FAMILY else f"{family}_"


def pytest_addoption(parser):
    group = parser.getgroup("state-space scans")
    for fam in impls.FAMILIES.values():
        which = "" if fam.name == DEFAULT_FAMILY else f"{fam.name} "
        group.addoption(fam.option, action="append", default=[], metavar="NAME|MODULE|MODULE:FUNCTION",
                        help=f"{which}implementation(s) under test: a registered {which}name, a module that registers "
                             f"{which}implementations on import, or a function with the {fam.scan.__name__} "
                             f"signature; repeatable (default: all registered)")
        group.addoption(fam.step_option, default=None, metavar="MODULE:FUNCTION|NAME",
                        help=f"a {fam.step.__name__}-like step function to test, or a registered name with a step "
                             f"(with {fam.option} MODULE:FUNCTION, its step; alone, also its scan, run token by token)")
    group.addoption("--xfails-file", default=None, metavar="FILE",
                    help="expected failures: one test-id prefix per line (# comments allowed), for an "
                         "implementation's known gaps; listed tests run and are reported as xfail/xpass")


def load(spec, option):
    module, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        hint = ("" if os.getcwd() in sys.path or "" in sys.path else
                " (the pytest command does not put the current folder on sys.path: run python -m pytest, "
                "scanbench test, or install your package)")
        raise pytest.UsageError(f"{option} {spec}: cannot import {module!r}: {e}{hint}") from None
    if not attr:
        return mod
    if not callable(getattr(mod, attr, None)):
        raise pytest.UsageError(f"{option} {spec}: {module!r} has no function {attr!r}")
    return getattr(mod, attr)


def python_name(spec):
    """'pkg.mod:fn' -> ('pkg.mod', 'pkg.mod.fn'): the import and the expression, for a plain script."""
    module, _, attr = spec.partition(":")
    return module, f"{module}.{attr}"


def on_path(*specs):
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


def load_step(fam, spec):
    """The step option: MODULE:FUNCTION, or a registered name with a step (its step is used).
    Returns (step, the expression a plain script gets it by, the registered name or None)."""
    names = impls.names(fam.name)
    with_step = [n for n in names if impls.get(n, fam.name).step is not None]
    if spec in names:
        if impls.get(spec, fam.name).step is None:
            raise pytest.UsageError(f"{fam.step_option} {spec}: {spec!r} has no step function; expected "
                                    f"MODULE:FUNCTION or a registered name with a step ({', '.join(with_step)})")
        return impls.get(spec, fam.name).step, f"impls.get({spec!r}, {fam.name!r}).step", spec
    if ":" not in spec:
        raise pytest.UsageError(f"{fam.step_option} {spec}: expected MODULE:FUNCTION or a registered name with a "
                                f"step ({', '.join(with_step)})")
    return load(spec, fam.step_option), python_name(spec)[1], None


def register_probed(fam, name, scan, step, setup):
    """Register a plain function under ``name`` with the capabilities its tiny probe calls showed
    (equivalence/diagnose.py: probe_capabilities), and how a plain script registers it the same way."""
    spec = properties.family(fam.name)
    supports, notes = diagnose.probe_capabilities(spec, scan, step)
    refused = diagnose.base_call_refused_by_signature(notes)
    if refused:
        options = ", ".join(f.option for f in impls.FAMILIES.values())
        # the names the family's spec gives the arguments it is called with, in their order
        count = len(spec.positional(spec.make_inputs(spec.TINY)))
        params = ", ".join(list(inspect.signature(impls.get("loop", fam.name).scan).parameters)[:count])
        raise pytest.UsageError(f"{fam.option} {name}: does not take the {fam.name} scan's arguments "
                                f"({refused}); it is called with {count} positional arguments, ({params}) "
                                f"(docs/plugins.md); a kernel of another "
                                f"family is named with its family's option ({options}; scanbench test --family)")
    impls.register(name, scan, step=step, family=fam.name, **supports)
    diagnose.PROBED[(fam.name, name)] = notes
    # the script's registration declares what the probes found beyond the defaults (a packed case
    # needs varlen=True there too); setup ends with its impls.register(...) call
    declared = "".join(f", {k}={v!r}" for k, v in supports.items() if k != "dtypes" and fam.supports.get(k) != v)
    properties.SETUP[(fam.name, name)] = setup[:-1] + declared + ")"


def not_wired(family):
    """The header's line for a registered family whose equivalence module lacks the contract of
    equivalence/properties.py: its family-parametrized tests are not generated, and saying so
    keeps a green run from reading as if they had passed."""
    return f"{family}: shared properties not wired ({impls.get_family(family).equivalence} has no family contract)"


def select(config, fam):
    """The names of ``fam`` under test, registering what its options name."""
    spec = properties.family(fam.name) if properties.wired(fam.name) else None
    kw = "" if fam.name == DEFAULT_FAMILY else f", family={fam.name!r}"
    step_spec = config.getoption(dest(fam.step_option))
    step, step_expr, step_registered = load_step(fam, step_spec) if step_spec else (None, None, None)
    chosen = []
    for spec_ in config.getoption(dest(fam.option)):
        if spec_ in impls.names(fam.name):
            chosen.append(spec_)
        elif ":" in spec_ and spec is None:
            raise pytest.UsageError(f"{fam.option} {spec_}: a plain function's capabilities are probed through "
                                    f"the shared properties, and {not_wired(fam.name)}; register it from a module")
        elif ":" in spec_:
            module, expr = python_name(spec_)
            setup = on_path(spec_) + f"import {module}; impls.register({spec_!r}, {expr}{kw})"
            if step is not None:
                imports = module if step_registered else f"{module}, {python_name(step_spec)[0]}"
                setup = (on_path(spec_, *([] if step_registered else [step_spec]))
                         + f"import {imports}; impls.register({spec_!r}, {expr}, step={step_expr}{kw})")
            register_probed(fam, spec_, load(spec_, fam.option), step, setup)
            chosen.append(spec_)
            step = None
        elif "." in spec_ or importlib.util.find_spec(spec_) is not None:
            before = set(impls.names(fam.name))
            load(spec_, fam.option)
            added = [n for n in impls.names(fam.name) if n not in before]
            if not added:
                raise pytest.UsageError(f"{fam.option} {spec_}: importing it registered no {fam.name} implementation")
            for name in added:  # declared at registration: those capabilities stand, nothing is probed
                properties.SETUP[(fam.name, name)] = on_path(spec_) + f"import {spec_}"
            chosen += added
        elif spec_ == "mamba_ssm":
            raise pytest.UsageError(f"{fam.option} mamba_ssm: registered only where the mamba_ssm package imports "
                                    "and CUDA is available (impls/adapters/mamba_ssm.py), which is not the case here")
        else:
            raise pytest.UsageError(f"{fam.option} {spec_}: not a registered {fam.name} implementation "
                                    f"({', '.join(impls.names(fam.name))}), a module, or module:function")
    if step is not None and step_registered:  # a registered name on its own: that implementation
        chosen.append(step_registered)
    elif step is not None and spec is None:
        raise pytest.UsageError(f"{fam.step_option} {step_spec}: {not_wired(fam.name)}")
    elif step is not None:  # a step on its own: its scan is the step, token by token
        module, expr = python_name(step_spec)
        scan = spec.scan_by_stepping(step)
        scan.__module__ = step.__module__  # the header names the step's module, not where scan_by_stepping is
        register_probed(fam, step_spec, scan, step,
                        on_path(step_spec) + f"import {module}, {spec.__name__}; impls.register({step_spec!r}, "
                        f"{spec.__name__}.scan_by_stepping({expr}), step={expr}{kw})")
        chosen.append(step_spec)
    return tuple(dict.fromkeys(chosen)) or impls.names(fam.name)


def chosen_families(config):
    """The families whose options were given; every family when none was (or all were)."""
    given = [f.name for f in impls.FAMILIES.values()
             if config.getoption(dest(f.option)) or config.getoption(dest(f.step_option))]
    return tuple(given) or tuple(impls.FAMILIES)


# Where the suite lives: a checkout's root, or site-packages for an installed suite.
SUITE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE_PACKAGES = ("impls", "equivalence", "benchmarks", "reports", "docs")


def named_options(config):
    """The family options given (--impl, --ssd-impl-step, ...): implementations named to be tested."""
    return [o for f in impls.FAMILIES.values() for o in (f.option, f.step_option) if config.getoption(dest(o), None)]


def of_the_suite(path):
    """Whether ``path`` is in one of the suite's own packages (not, say, a kernel's tests)."""
    path = os.path.abspath(str(path))
    return path.startswith(SUITE_ROOT + os.sep) and os.path.relpath(path, SUITE_ROOT).split(os.sep)[0] in SUITE_PACKAGES


def active(config):
    """Whether this run is the suite's: one of its options given, or its own tests collected (a
    checkout's root, a path inside it, or ``--pyargs equivalence``). Installed, this plugin loads in
    every pytest run of the environment; in the others (a kernel author's own tests) it only adds its
    options, and changes no setting (threads, hypothesis profile, seed) and no test."""
    if getattr(config, "scan_suite_active", None) is not None:
        return config.scan_suite_active
    given = named_options(config) or config.getoption("xfails_file", None) or config.getoption("scan_summary", None)
    ours = str(config.rootpath) == SUITE_ROOT
    for arg in config.args:
        path = os.path.abspath(str(arg).split("::")[0])
        top = str(arg).split("::")[0].replace("/", ".").split(".")[0]
        ours = ours or of_the_suite(path)
        ours = ours or (config.getoption("pyargs", False) and top in SUITE_PACKAGES)
    config.scan_suite_active = bool(given or ours)
    config.scan_suite_tests = ours
    return config.scan_suite_active


@pytest.hookimpl(tryfirst=True)  # before hypothesis' reads --hypothesis-seed
def pytest_configure(config):
    if not active(config):
        return
    named = named_options(config)
    if named and not config.scan_suite_tests:   # the kernel would pass untested (workers would not say why)
        raise pytest.UsageError(f"{' '.join(named)} given, but none of the suite's tests is to be collected: from a "
                                f"kernel's folder, run `python -m pytest --pyargs equivalence {named[0]} ...` or "
                                f"`scanbench test ...`")
    # The suite's tensors are small: one thread runs them as fast, and on a 2-core machine with any
    # other process busy, a second OpenMP thread made small ops wait on a descheduled thread
    # (measured: a decode step 30x slower). Benchmarks set their own thread count.
    torch.set_num_threads(1)
    if config.getoption("hypothesis_seed", None) is None:
        config.option.hypothesis_seed = str(run_seed())
    os.environ[SEED_ENV] = str(config.option.hypothesis_seed)
    config.addinivalue_line("markers", "only_for(name, family='selective'): tests of one implementation's "
                                       "internals, collected only when that implementation is under test")
    config.addinivalue_line("markers", "family(name): the family a test belongs to (equivalence/plugin.py)")
    config.addinivalue_line("markers", "long: a test of minutes, started first (equivalence/plugin.py: rank)")
    if not config.getoption("hypothesis_profile", None):
        settings.load_profile(os.environ.get("SCAN_HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
    config.selected = {f.name: select(config, f) for f in impls.FAMILIES.values()}
    for name, chosen in config.selected.items():  # config.selected_impls, config.selected_ssd_impls, ...
        setattr(config, f"selected_{prefix(name)}impls", chosen)
    config.families = chosen_families(config)
    config.wired = tuple(f for f in impls.FAMILIES if properties.wired(f))
    from hypothesis.internal.conjecture import engine

    engine.MAX_SHRINKING_SECONDS = SHRINKING_SECONDS
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        def announce(text):
            with capture.global_and_fixture_disabled():   # in an xdist worker too: its stderr is the terminal
                print(text, file=sys.stderr, flush=True)
        tolerance.announce = announce


def xfail_prefixes(config):
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
# A family's own files of the same name (equivalence/selective/test_values.py: its non-finite
# patterns) come after the shared ones, which a directory's sorted collection would put first.
ORDER = ("test_values.py", "test_invariants.py", "test_gradients.py")


def rank(item):
    """Tests marked long first: under -n 2, a test of minutes started last keeps one worker busy
    while the other waits (the kernel-repository run, collected near the end, once made the whole
    run about its length longer). Then values, invariants and gradients, so that a bug is met first
    where it is plainest; the pinned cases after the drawn ones."""
    not_long = item.get_closest_marker("long") is None   # False sorts first
    file = os.path.basename(item.nodeid.split("::")[0])
    if file not in ORDER:
        return not_long, len(ORDER)
    shared = os.path.dirname(str(item.path)) == os.path.join(SUITE_ROOT, "equivalence")
    return not_long, ORDER.index(file), not shared, "::test_pinned_" in item.nodeid


# Fixtures that parametrize over the implementations under test, each family's under its prefix
# (impl, ssd_impl, ...). Those without the capability a test needs appear as skipped, with the
# declared gap as the reason: visible, never silently passed. ``spec`` is the family's module.
IMPL_FIXTURES = {
    "impl": lambda e, spec: None,
    "stepping_impl": lambda e, spec: None if e.step is not None else "no step function",
    "gradient_impl": lambda e, spec: None if e.supports["gradients"] else "no gradient support",
    "continuing_impl": lambda e, spec: (None if spec is None or e.supports[spec.STATE_ARG]
                                        else f"no {spec.STATE_ARG} support"),
    "deterministic_impl": lambda e, spec: None if e.supports["deterministic"] else "not deterministic",
    "nonfinite_impl": lambda e, spec: None if e.supports["nonfinite_inputs"] else "non-finite inputs",
    "varlen_impl": lambda e, spec: None if e.supports["varlen"] else "varlen",
    "varlen_gradient_impl": lambda e, spec: ", ".join(g for g, lacks in (("varlen", not e.supports["varlen"]),
                                                      ("gradients", not e.supports["gradients"])) if lacks) or None,
    "varlen_stepping_impl": lambda e, spec: ", ".join(g for g, lacks in (
        ("state_batch_indices", not e.supports["state_batch_indices"]), ("no step function", e.step is None))
        if lacks) or None,
}


def fixture_family(fixture):
    """(family, IMPL_FIXTURES key) for an implementation fixture name, or None."""
    for name in impls.FAMILIES:
        p = prefix(name)
        if fixture.startswith(p) and fixture[len(p):] in IMPL_FIXTURES and (p or not any(
                fixture.startswith(prefix(other)) for other in impls.FAMILIES if other != DEFAULT_FAMILY)):
            return name, fixture[len(p):]
    return None


def params(config, family, kind, ids=lambda n: n):
    """pytest.param of each implementation of ``family`` under test, skipped with its declared gap
    when it lacks what the fixture ``kind`` needs."""
    spec = properties.family(family) if family in config.wired else None
    out = []
    for n in config.selected[family]:
        gap = IMPL_FIXTURES[kind](impls.get(n, family), spec)
        marks = [pytest.mark.skip(reason=f"{n}: declared gap: {gap}")] if gap else []
        out.append(pytest.param(n, marks=marks, id=ids(n)))
    return out


def pytest_generate_tests(metafunc):
    if not active(metafunc.config):
        return
    names = metafunc.fixturenames
    if "family" in names:
        marker = metafunc.definition.get_closest_marker("family")
        # only the families whose module has the contract (the header names the others)
        families = [f for f in ([marker.args[0]] if marker else impls.FAMILIES) if f in metafunc.config.wired]
        kind = next((k for k in IMPL_FIXTURES if k in names), None)
        if kind is None:
            metafunc.parametrize("family", [properties.family(f) for f in families], ids=families)
            return
        if "pinned_case" not in names:
            metafunc.parametrize(["family", kind], [
                pytest.param(properties.family(f), *p.values, marks=p.marks, id=p.id)
                for f in families for p in params(metafunc.config, f, kind, ids=lambda n, f=f: f"{f}-{n}")])
            return
        # each of the family's pinned edge cases (its PINNED) in a test of its own
        metafunc.parametrize(["family", kind, "pinned_case"], [
            pytest.param(properties.family(f), *p.values, case, marks=p.marks, id=f"{p.id}-{case.id}")
            for f in families for p in params(metafunc.config, f, kind, ids=lambda n, f=f: f"{f}-{n}")
            for case in properties.family(f).PINNED])
        return
    for fixture in names:
        found = fixture_family(fixture)
        if found:
            metafunc.parametrize(fixture, params(metafunc.config, *found))


def implementation_of(item):
    """(family, implementation name) a test runs, from its parameters, or None for a test of no
    implementation: the value of an implementation fixture (impl, ssd_impl, ...), or a parameter
    naming a registered implementation of the test's family (a family module parameter, else
    item_family: a family folder's tests that parametrize over names, "loop", are its own)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    family = next((params[k].NAME for k in ("family", "fam") if hasattr(params.get(k), "NAME")), None)
    for key, value in params.items():
        if not isinstance(value, str) or key in ("family", "fam"):
            continue
        fam = family or (fixture_family(key) or (item_family(item),))[0]
        if fam in impls.FAMILIES and value in impls.names(fam):
            return fam, value
    return None


def under_test(config, item):
    """Whether a test exercises an implementation under test: it runs one (implementation_of), or
    it tests one's internals (pytest.mark.only_for)."""
    marker = item.get_closest_marker("only_for")
    if marker is not None:
        return marker.args[0] in config.selected[marker.kwargs.get("family", DEFAULT_FAMILY)]
    found = implementation_of(item)
    return found is not None and found[1] in config.selected[found[0]]


def item_family(item):
    """The family a collected test belongs to (see the module's docstring)."""
    callspec = getattr(item, "callspec", None)
    for key in ("family", "fam"):  # the fixture, or a test's own parametrization over family modules
        if callspec is not None and hasattr(callspec.params.get(key), "NAME"):
            return callspec.params[key].NAME
    marker = item.get_closest_marker("family")
    if marker is not None:
        return marker.args[0]
    for fixture in getattr(item, "fixturenames", ()):
        found = fixture_family(fixture)
        if found:
            return found[0]
    return DEFAULT_FAMILY


def pytest_collection_modifyitems(config, items):
    if not active(config):
        return
    # Tests of another family than those chosen, and tests of one implementation's internals
    # (pytest.mark.only_for) when it is not under test, are not collected: deselected (one count in
    # the summary), not a skip line each. With implementations named (--impl ...), of the suite's
    # tests only those that exercise them: its tests of itself and of its own implementations (the
    # tolerance policy, the planted bugs, the front door on the loop) say nothing about a kernel.
    # A kernel's own tests collected in the same run stay.
    named = bool(named_options(config))
    keep, dropped = [], []
    for item in items:
        marker = item.get_closest_marker("only_for")
        off = marker is not None and marker.args[0] not in config.selected[marker.kwargs.get("family", DEFAULT_FAMILY)]
        off = off or (named and of_the_suite(item.path) and not under_test(config, item))
        (dropped if off or item_family(item) not in config.families else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
    items.sort(key=rank)  # stable: within a rank, the files' own order
    prefixes = xfail_prefixes(config)
    used = set()
    for item in items:
        for p, reason in prefixes.items():
            if item.nodeid.startswith(p):
                item.add_marker(pytest.mark.xfail(reason=f"expected failure: {reason}", strict=False))
                used.add(p)
    for p in set(prefixes) - used:
        config.issue_config_time_warning(pytest.PytestConfigWarning(
            f"--xfails-file: {p!r} matches no collected test"), stacklevel=2)


def pytest_itemcollected(item):
    if str(item.path).startswith(os.path.join(SUITE_ROOT, "equivalence") + os.sep):
        item.config.scan_suite_collected = True


def pytest_collection_finish(session):
    """A kernel named with a family option while none of the suite's tests is collected would pass
    without being tested (from another folder, the tests are ``--pyargs equivalence``): refuse."""
    config = session.config
    named = named_options(config)
    if named and not getattr(config, "scan_suite_collected", False) and not config.getoption("collectonly"):
        raise pytest.UsageError(f"{' '.join(named)} given, but none of the suite's tests was collected: from a "
                                f"kernel's folder, run `python -m pytest --pyargs equivalence {named[0]} ...` or "
                                f"`scanbench test ...`")


def replayed_options(config):
    """The options that chose what runs, repeated in a failure's replay line (a plugged-in kernel's
    test id exists only with its option)."""
    flags = [(o, dest(o)) for f in impls.FAMILIES.values() for o in (f.option, f.step_option)]
    out = []
    for flag, d in flags + [("--xfails-file", "xfails_file"), ("--hypothesis-profile", "hypothesis_profile")]:
        value = config.getoption(d, None)  # a family added after the options were parsed has none
        out += [f"{flag} {v}" for v in ([] if value is None else value if isinstance(value, list) else [value])]
    return " ".join(out)


def in_checkout(config):
    """Whether the run is rooted at the suite's own checkout (its Makefile beside it), where test ids
    are paths from that root and `make test` runs the suite. Otherwise (the suite installed, run from
    a kernel's folder) its tests are reached as modules: ``--pyargs``."""
    return str(config.rootpath) == SUITE_ROOT and os.path.isfile(os.path.join(SUITE_ROOT, "Makefile"))


def selection(config):
    """The paths (or --pyargs modules) and -k/-m expressions a run was given, as shell words; none
    where it ran the suite's own testpaths whole."""
    words = list(config.args) if config.args_source == pytest.Config.ArgsSource.ARGS else []
    for flag, value in (("-k", config.option.keyword), ("-m", config.option.markexpr)):
        words += [flag, value] if value else []
    return [shlex.quote(w) for w in words]


def replay(config, item=None):
    """The command that replays this run's draws (its seed, options and selection of tests), or one
    test of it, in the form that works where the run was made."""
    seed, chosen = config.option.hypothesis_seed, replayed_options(config)
    tail = f"{chosen + ' ' if chosen else ''}--hypothesis-seed {seed}"
    if in_checkout(config):
        # the checkout's own interpreter by its path (`make test` does not activate .venv); test ids
        # and make are the checkout root's, so a run made elsewhere is replayed from there
        python = (os.path.relpath(sys.executable, SUITE_ROOT) if sys.executable.startswith(SUITE_ROOT + os.sep)
                  else "python")
        there = "" if os.getcwd() == SUITE_ROOT else f"cd {shlex.quote(SUITE_ROOT)} && "
        if item is not None:
            return f"{there}{python} -m pytest '{item.nodeid}' {tail}"
        words = selection(config)
        return there + (f"make test SEED={seed}" if not chosen and not words else
                        f"{python} -m pytest {' '.join(words + [tail])}")
    what = "equivalence"
    if item is not None and str(item.path).startswith(SUITE_ROOT + os.sep):
        module = os.path.splitext(os.path.relpath(str(item.path), SUITE_ROOT))[0].replace(os.sep, ".")
        what = f"'{module}::{item.nodeid.partition('::')[2]}'"
    elif item is None:
        what = " ".join(selection(config)) or what
    return f"python -m pytest --pyargs {what} {tail}"


CASE_TAG = "scan_failing_case"   # a failure's (final, shrunk case, its reproduce line), in report.user_properties


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failed property check, say what the failing case needs: the check re-run once, for the
    final (shrunk) failure only, with each option off and each axis reduced (diagnose.what_it_needs)."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed or call.excinfo is None or not active(item.config):
        return
    seed = item.config.option.hypothesis_seed
    report.sections.append(("replay", f"this run's hypothesis seed is {seed}: {replay(item.config)}, or this "
                                      f"test alone:\n{replay(item.config, item)}"))
    failure, todo = None, [call.excinfo.value]
    while todo and failure is None:  # hypothesis may wrap several distinct failures in a group
        e = todo.pop(0)
        if isinstance(e, properties.CaseFailure):
            failure = e
        todo += list(getattr(e, "exceptions", ())) + [x for x in (e.__cause__, e.__context__) if x is not None]
    if failure is None:
        return
    # for the review summary (equivalence/summary.py), which may read it on another process
    report.user_properties.append((CASE_TAG, (repr(failure.case),
                                              properties.repro(failure.family, failure.name, failure.case))))
    if all(hasattr(failure.family, k) for k in diagnose.NEEDS):
        lines = diagnose.what_it_needs(failure)
        report.sections.append((f"what the failure needs ({failure.case.id}, re-run with each option off and "
                                f"each axis reduced)", "\n".join(lines)))


def pytest_report_header(config):
    if not active(config):
        return
    lines = [f"hypothesis profile: {settings().max_examples} examples per property; seed "
             f"{config.option.hypothesis_seed} (replay this run: {replay(config)})"]
    for family in config.families:  # a family whose tests are deselected has no lines
        which = "" if family == DEFAULT_FAMILY else f"{family.upper()} "
        if family not in config.wired:
            lines += [not_wired(family), f"{which}implementations registered: {', '.join(config.selected[family])}"]
            continue
        spec = properties.family(family)
        lines += [f"{which}implementation under test: " + diagnose.describe(spec, n) for n in config.selected[family]]
    return lines
