"""Implementations from installed packages: the entry point, its failure modes, and the xfails file."""

import dataclasses
import inspect
import os
import re
import shlex
import subprocess
import sys
import types
from importlib import metadata

import pytest
import torch
from hypothesis import find, settings
from hypothesis.errors import NoSuchExample

import impls

from . import plugin, properties, selective, ssd
from .diagnose import describe, probe_capabilities
from .test_planted_bugs import SEARCH, drawn, rejected

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)   # the checkout's root, or site-packages installed
IN_CHECKOUT = os.path.isfile(os.path.join(ROOT, "Makefile"))
EXAMPLE = os.path.join(ROOT, "examples", "my_kernel")


def fake_entry_points(*values):
    eps = [metadata.EntryPoint(name=v.split(":")[0], value=v, group=impls.ENTRY_POINT_GROUP) for v in values]
    return lambda group=None, **kw: [e for e in eps if e.group == group]


def groups_read(scan):
    """Which group of B each of d = 4 channels reads (g = 2), measured directly: one token, dt = 1,
    u = 1, C = 1, and B = 1 in group 0 only, so channel c's output is 1 exactly when it reads group 0."""
    b, d, n, l, g = 1, 4, 1, 1, 2
    B = torch.zeros(b, g, n, l)
    B[:, 0] = 1.0
    y = scan(torch.ones(b, d, l), torch.ones(b, d, l), -torch.ones(d, n), B, torch.ones(b, g, n, l))
    return [0 if float(v) > 0.5 else 1 for v in y[0, :, 0]]


@pytest.mark.skipif(not IN_CHECKOUT, reason="the example kernel is in the checkout, not in an installed suite")
def test_installed_package_registers_through_the_entry_point_and_its_bug_is_found(monkeypatch):
    """The example as shipped has its group-mapping bug, and the suite finds it, on a grouped case
    with several channels per group; once a reader has made the README's fix, the suite finds
    nothing. Which of the two holds is measured independently of the suite (groups_read)."""
    monkeypatch.syspath_prepend(EXAMPLE)
    monkeypatch.setattr(metadata, "entry_points", fake_entry_points("my_kernel:register"))
    assert impls.load_plugins() == {"my_kernel": None}
    assert "my_kernel" in impls.names() and impls.get("my_kernel").module == "my_kernel"
    fixed = groups_read(impls.get("my_kernel").scan) == [0, 0, 1, 1]   # the interface: c // (d // g)
    if not fixed:
        assert groups_read(impls.get("my_kernel").scan) == [0, 1, 0, 1]  # the documented bug: c % g
        found = find(drawn(selective), lambda d: rejected(selective, "my_kernel", d), settings=SEARCH)
        assert found[0].g > 1 and found[0].d > found[0].g  # the bug is in the group mapping
    else:
        with pytest.raises(NoSuchExample):
            find(drawn(selective), lambda d: rejected(selective, "my_kernel", d), settings=settings(SEARCH, max_examples=100))


def test_a_broken_plugin_warns_and_registers_nothing(monkeypatch):
    monkeypatch.setattr(metadata, "entry_points", fake_entry_points("no_such_module_xyz:register"))
    before = impls.names()
    with pytest.warns(UserWarning, match="no_such_module_xyz.*failed to load"):
        status = impls.load_plugins()
    assert "ModuleNotFoundError" in status["no_such_module_xyz"] and impls.names() == before


def test_xfails_file_marks_listed_tests(tmp_path):
    listed = tmp_path / "xfails.txt"
    listed.write_text("# a known gap\nequivalence/test_front_door.py::test_empty_sequence[loop]  # l = 0 demo\n")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rX", f"--xfails-file={listed}",
           "equivalence/test_front_door.py", "-k", "empty_sequence"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert "1 passed" in run.stdout and "1 xpassed" in run.stdout, run.stdout[-2000:]
    assert "l = 0 demo" in run.stdout


def test_header_names_module_version_and_wrapped_package():

    assert f"impls.selective.loop (selective-scan-suite {metadata.version('selective-scan-suite')})" in describe(selective, "loop")
    if "mambapy" in impls.names():
        assert f"wrapping mambapy {metadata.version('mambapy')}" in describe(selective, "mambapy")
        assert "'grouped': False" in describe(selective, "mambapy")


def test_a_plain_functions_capabilities_are_probed():
    """Each capability is what a tiny call showed: a float64 NotImplementedError and a scan that
    detaches its result each turn one capability off, and only that one; a grouped crash is not a
    refusal: grouped stays on (supported but broken), so the tests run and show the crash."""

    loop = impls.get("loop").scan

    def picky(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
              return_last_state=False):
        if u.dtype == torch.float64:
            raise NotImplementedError("no float64 here")
        if B.dim() == 4:
            raise RuntimeError("shape mismatch in my grouped path")
        return loop(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_last_state)

    def detached(*args):
        y, s = loop(*args)
        return y.detach(), s.detach()

    supports, notes = probe_capabilities(selective, picky)
    assert supports["dtypes"] == (torch.float16, torch.bfloat16, torch.float32) and supports["grouped"]
    assert supports["initial_state"] and supports["gradients"], notes
    assert notes["grouped"].startswith("broken: RuntimeError: shape mismatch"), notes
    assert notes["dtype f64"].startswith("gap: NotImplementedError"), notes
    supports, notes = probe_capabilities(selective, detached)
    assert not supports["gradients"] and supports["grouped"] and len(supports["dtypes"]) == 4, notes

    def written_out(*args):   # a decoding kernel's out= ops: torch refuses them on inputs that require grad
        y, s = loop(*args)
        return torch.mul(args[0], 0, out=torch.empty_like(args[0])) + y, s

    supports, notes = probe_capabilities(selective, written_out)
    assert not supports["gradients"] and len(supports["dtypes"]) == 4, notes
    assert notes["gradients"].startswith("gap: NotImplementedError: not differentiable (an out= op"), notes


def test_packed_sequences_are_probed_like_the_other_capabilities():
    """cu_seqlens, of every family with packing: a scan that does not take the argument, or
    refuses it with NotImplementedError, lacks varlen; one that takes it has it; one that raises
    anything else inside keeps it (supported but broken). With a step, state_batch_indices is probed
    the same way (one batch-indexed step), and a step alone (its scan run token by token) has
    packing exactly when its step takes the indices. No probe registration is left behind."""
    loop, recurrent = impls.get("loop"), impls.get("recurrent")

    def unpacked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
                 return_last_state=False):
        return loop.scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_last_state)

    def packed(*args, cu_seqlens=None):
        return loop.scan(*args, cu_seqlens=cu_seqlens)

    def refusing(*args, cu_seqlens=None):
        if cu_seqlens is not None:
            raise NotImplementedError("no packing yet")
        return loop.scan(*args)

    def crashing(*args, cu_seqlens=None):
        if cu_seqlens is not None:
            raise TypeError("unsupported operand type(s) for +: 'NoneType' and 'int'")
        return loop.scan(*args)

    def step_without_indices(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
        return recurrent.step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)

    before, before_mamba3 = impls.names(), impls.names(family="mamba3")
    for scan, step, varlen, indexed in [(unpacked, None, "gap: TypeError", None), (packed, None, "ok", None),
                                        (refusing, None, "gap: NotImplementedError", None),
                                        (crashing, None, "broken: TypeError", None),
                                        (packed, recurrent.step, "ok", "ok"),
                                        (packed, step_without_indices, "ok", "gap: TypeError"),
                                        (selective.scan_by_stepping(step_without_indices), step_without_indices,
                                         "gap: TypeError", "gap: TypeError"),
                                        (selective.scan_by_stepping(recurrent.step), recurrent.step, "ok", "ok")]:
        supports, notes = probe_capabilities(selective, scan, step)
        assert notes["varlen"].startswith(varlen) and supports["varlen"] == (not varlen.startswith("gap")), notes
        assert notes.get("state_batch_indices", "")[:len(indexed or "")] == (indexed or ""), notes
        if indexed:
            assert supports["state_batch_indices"] == (not indexed.startswith("gap")), notes

    for fam in [properties.family(f) for f in impls.FAMILIES if properties.wired(f) and properties.family(f).PACKING]:
        scan = impls.get("loop", fam.NAME).scan
        names = list(inspect.signature(scan).parameters)

        def refusing(*args, scan=scan, names=names, **kw):
            if {**dict(zip(names, args)), **kw}.get("cu_seqlens") is not None:
                raise NotImplementedError("no packing yet")
            return scan(*args, **kw)

        assert probe_capabilities(fam, scan)[0]["varlen"], fam.NAME
        supports, notes = probe_capabilities(fam, refusing)
        assert not supports["varlen"] and notes["varlen"] == "gap: NotImplementedError: no packing yet", notes
    assert impls.names() == before and impls.names(family="mamba3") == before_mamba3


def test_the_base_call_is_required_not_probed_away():
    """A function that refuses even the plainest call (float32, ungrouped) keeps float32 on."""

    def refuses(*args):
        raise NotImplementedError("nothing works yet")

    supports, notes = probe_capabilities(selective, refuses)
    assert supports["dtypes"] == (torch.float32,) and not supports["grouped"], notes
    assert notes["dtype f32"].startswith("broken (the base call is required)"), notes


@pytest.mark.parametrize("name", [f for f in impls.FAMILIES if properties.wired(f)])
def test_the_gradient_probe_reads_whatever_a_family_returns(name):
    """The gradient probe takes every tensor the scan returns, however many (Mamba-1's y and last
    state, Mamba-3's out and four states): each family's loop, plugged in as a plain function, is
    differentiable; the same returning detached tensors is not."""
    fam, loop = properties.family(name), impls.get("loop", name).scan

    def detached(*args):
        return tuple(t.detach() for t in loop(*args))

    supports, notes = probe_capabilities(fam, loop)
    assert supports["gradients"] and notes["gradients"] == "ok", notes
    supports, notes = probe_capabilities(fam, detached)
    assert not supports["gradients"] and notes["gradients"].startswith("gap: "), notes
    assert "output has no autograd graph" in notes["gradients"], notes


@pytest.mark.parametrize("name", [f for f in impls.FAMILIES if properties.wired(f)])
def test_the_probe_passes_the_arguments_the_public_function_passes(name):
    """The probe calls a plugged-in scan with as many positional arguments as the family's public
    function does, so a kernel written with the documented signature and no defaults is probed as
    it will be called (the SSD probe once left out return_varlen_states and refused such a kernel
    as one of another family)."""
    import equivalence

    fam, loop, passed = properties.family(name), impls.get("loop", name).scan, []

    def spy(*args, **kwargs):
        passed.append(len(args))
        return loop(*args, **kwargs)

    impls.register("spy_xyz", spy, family=name, dtypes=(torch.float32,))
    try:
        eval(fam.call("spy_xyz", fam.TINY), {"impls": impls, "equivalence": equivalence})
    finally:
        impls.unregister("spy_xyz", family=name)

    def strict(*args):
        assert len(args) == passed[0], f"called with {len(args)} arguments, the public function passes {passed[0]}"
        return loop(*args)

    supports, notes = probe_capabilities(fam, strict)
    assert notes["dtype f32"] == "ok", notes


PLAIN_MAMBA3 = """
import impls

def scan(*args):
    return impls.get("loop", "mamba3").scan(*args)
"""


def test_a_plain_mamba3_function_has_its_gradients_probed(tmp_path):
    """--mamba3-impl MODULE:FUNCTION, as a kernel author runs it: the header says its gradients were
    probed and found (not a probe that broke on the five returns, out and the four states)."""
    (tmp_path / "plain_mamba3_xyz.py").write_text(PLAIN_MAMBA3)
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-p", "no:cacheprovider", "-p", "no:xdist",
           "--mamba3-impl=plain_mamba3_xyz:scan", "equivalence/test_values.py"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                         cwd=os.path.join(os.path.dirname(__file__), os.pardir))
    header = next((line for line in run.stdout.splitlines() if "plain_mamba3_xyz:scan: plain_mamba3_xyz" in line), "")
    assert run.returncode == 0 and "'gradients': True" in header, run.stdout[-3000:]
    assert header.endswith("(probed by tiny calls)"), header   # nothing refused, nothing raised


CRASHING = """
def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
         initial_state=None, return_last_state=False):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")
"""


@pytest.mark.parametrize("option", ["--impl", "--impl-step"])
def test_a_kernel_that_crashes_on_every_call_fails_the_values_test(tmp_path, option):
    """The newcomer's finding: a kernel raising on every call passed (every probe a 'gap', every
    value test asserting NotImplementedError). It must fail, with its own error in the output; also
    when a scan is passed by mistake as --impl-step. The header still says what was probed."""
    (tmp_path / "crashing_kernel_xyz.py").write_text(CRASHING)
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "--hypothesis-profile",
           "ci", f"{option}=crashing_kernel_xyz:scan", "equivalence/test_values.py", "-k", "test_values_and_last_state"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                         cwd=ROOT)
    assert run.returncode == 1 and "1 failed" in run.stdout, run.stdout[-3000:]
    assert "1 failed" in run.stdout and "RuntimeError: CUDA error: an illegal memory access" in run.stdout
    assert "(probed by tiny calls; " in run.stdout, run.stdout[:3000]
    assert "; raised, so tested and expected to fail: {'dtype f16'" in run.stdout, run.stdout[:3000]


def test_impl_restricts_the_run_to_the_tests_of_what_it_names():
    """As --ssd-impl alone deselects the Mamba-1 tests, --impl alone deselects the SSD family's: the
    SSD files, the Mamba-2 model's, SSD-parametrized tests in a shared file, and the SSD header
    lines. And what the named implementation does not run is deselected too: the suite's tests of
    itself (the tolerance policy's), and another implementation's internals (parallel's)."""
    files = ["equivalence/test_model2.py", "equivalence/ssd/test_seq_idx.py", "equivalence/test_values.py",
             "equivalence/test_tolerance.py", "equivalence/test_parallel.py"]
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-p", "no:cacheprovider", "-p", "no:xdist", "--impl=loop", *files]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "SSD implementation under test" not in run.stdout and "implementation under test: loop" in run.stdout
    collected = run.stdout.partition("\ncollected ")[2]   # the header's replay line names the files given
    for gone in ("test_model2", "test_seq_idx", "[ssd-", "test_tolerance", "test_parallel"):
        assert gone not in collected.replace("deselected", ""), run.stdout[-3000:]
    assert "<Function test_values_and_last_state[selective-loop]>" in run.stdout, run.stdout[-3000:]


STEP = """
import impls

def step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    return impls.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, impl="recurrent")
"""


@pytest.mark.parametrize("spec, expected", [
    ("step_mod_xyz:step", "implementation under test: step_mod_xyz:step: step_mod_xyz ("),
    ("recurrent", "implementation under test: recurrent: impls.selective.recurrent"),
])
def test_impl_step_names_its_option_and_module(tmp_path, spec, expected):
    """A step's header line names the step's module (not impls.selective.recurrent, where its
    scan-by-stepping is built), or the registered name whose step it is."""
    (tmp_path / "step_mod_xyz.py").write_text(STEP)
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-p", "no:cacheprovider", "-p", "no:xdist",
           f"--impl-step={spec}", "equivalence/test_values.py", "-k", "test_values_and_last_state"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                         cwd=ROOT)
    assert run.returncode == 0 and expected in run.stdout, (run.stdout + run.stderr)[-3000:]


@pytest.mark.parametrize("spec, expected", [
    ("loop", "--impl-step loop: 'loop' has no step function; expected MODULE:FUNCTION or a registered name "
             "with a step (recurrent"),
    ("step_mod_xyz", "--impl-step step_mod_xyz: expected MODULE:FUNCTION or a registered name with a step"),
    ("no_such_mod_xyz:f", "--impl-step no_such_mod_xyz:f: cannot import"),
])
def test_impl_step_errors_name_their_option_and_what_it_takes(spec, expected):
    """--impl-step's errors name --impl-step (not --impl) and what it takes (pytest prints a
    UsageError as the run's one ERROR line, before any test)."""
    with pytest.raises(pytest.UsageError) as refused:
        plugin.load_step(impls.FAMILIES["selective"], spec)
    assert str(refused.value).startswith(expected), str(refused.value)


WRONG = """
import impls

def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
         initial_state=None, return_last_state=False):
    y, s = impls.get("loop").scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, True)
    return (1.5 * y, s) if return_last_state else 1.5 * y
"""


def test_reproduce_line_of_a_plain_function_runs_in_a_script_elsewhere(tmp_path):
    """A script's sys.path[0] is its own folder: the reproduce line puts the kernel's folder on
    sys.path itself, so it runs from any folder, without PYTHONPATH."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "wrong_kernel_xyz.py").write_text(WRONG)
    cmd = [sys.executable, "-m", "pytest", "-x", "-p", "no:cacheprovider", "-p", "no:xdist", "--hypothesis-profile", "ci",
           "--impl=wrong_kernel_xyz:scan", "equivalence/test_values.py", "-k", "test_values_and_last_state"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "kernels"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                         cwd=ROOT)
    assert run.returncode == 1 and "reproduce: " in run.stdout, run.stdout[-3000:]
    if IN_CHECKOUT:   # test ids are paths from the checkout's root
        assert ("pytest 'equivalence/test_values.py::test_values_and_last_state[selective-wrong_kernel_xyz:scan]' "
                "--impl wrong_kernel_xyz:scan --hypothesis-profile ci --hypothesis-seed") in run.stdout, run.stdout[-3000:]
    line = re.search(r"reproduce: (.*)", run.stdout).group(1)
    plain = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = subprocess.run([sys.executable, "-c", line + "; print(out[0].shape)"], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path, env=plain)
    assert script.returncode == 0 and "torch.Size" in script.stdout, (line, script.stderr[-2000:])


@pytest.mark.skipif(not IN_CHECKOUT, reason="an installed suite has no checkout and no Makefile")
@pytest.mark.skipif(not IN_CHECKOUT, reason="make test is the checkout's")
def test_a_run_in_the_checkout_is_replayed_by_make_test_or_its_own_selection(monkeypatch, tmp_path):
    """The whole suite is replayed by make test SEED=N, from the checkout's root wherever the run was
    made; a run of some files and -k by those, not the whole suite, through the checkout's interpreter."""
    whole = types.SimpleNamespace(
        option=types.SimpleNamespace(hypothesis_seed=12345, keyword="", markexpr=""), args=["equivalence"],
        args_source=pytest.Config.ArgsSource.TESTPATHS, rootpath=plugin.SUITE_ROOT, getoption=lambda *a: None)
    monkeypatch.chdir(plugin.SUITE_ROOT)
    assert plugin.replay(whole) == "make test SEED=12345"
    monkeypatch.chdir(tmp_path)
    assert plugin.replay(whole) == f"cd {shlex.quote(plugin.SUITE_ROOT)} && make test SEED=12345"
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-p", "no:cacheprovider", "-p", "no:xdist",
           "--hypothesis-seed", "12345", "equivalence/test_values.py", "-k", "last_state and not triton"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    python = os.path.relpath(sys.executable, plugin.SUITE_ROOT) if sys.executable.startswith(plugin.SUITE_ROOT) \
        else "python"
    assert (f"seed 12345 (replay this run: {python} -m pytest equivalence/test_values.py -k 'last_state and not "
            f"triton' --hypothesis-seed 12345)") in run.stdout, run.stdout[-3000:]


def test_a_run_from_a_kernels_folder_is_replayed_by_the_commands_it_prints(tmp_path):
    """From a kernel's folder the suite's tests are modules (--pyargs), and there is no Makefile:
    the header and a failure's replay lines say python -m pytest --pyargs, never make test, and the
    line for the failing test alone, run as printed from that folder, fails again on the same case.
    The Markdown summary names that case, its reproduce line and the replay command."""
    (tmp_path / "wrong_kernel_xyz.py").write_text(WRONG)
    cmd = [sys.executable, "-m", "pytest", "-x", "-p", "no:cacheprovider", "-p", "no:xdist", "--hypothesis-profile", "ci",
           "--impl=wrong_kernel_xyz:scan", "--pyargs", "equivalence.test_values", "-k", "test_values_and_last_state",
           "--scan-summary", "summary.md"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 1 and "make test" not in run.stdout, run.stdout[-3000:]
    seed = re.search(r"seed (\d+) \(replay this run: python -m pytest --pyargs equivalence.test_values "
                     r"-k test_values_and_last_state --impl wrong_kernel_xyz:scan --hypothesis-profile ci --hypothesis-seed (\d+)\)", run.stdout)
    assert seed and seed.group(1) == seed.group(2), run.stdout[:3000]
    alone = re.search(r"or this test alone:\n(python -m pytest --pyargs .*)", run.stdout).group(1)
    case = re.search(r"^case = (Case\(.*\))$", run.stdout, re.M).group(1)
    again = subprocess.run([sys.executable, *shlex.split(alone)[1:], "-p", "no:cacheprovider", "-p", "no:xdist"],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert "1 failed" in again.stdout and f"case = {case}" in again.stdout, (alone, again.stdout[-3000:])
    summary = (tmp_path / "summary.md").read_text()
    assert "| wrong_kernel_xyz:scan | fail |" in summary and f"smallest case: `{case}`" in summary, summary
    assert f"replay: `{alone}`" in summary and "reproduce in Python: `import impls" in summary, summary


RAISES_PAST_ONE_CHANNEL = """
import impls

def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
         initial_state=None, return_last_state=False):
    if u.shape[-1] > 1:
        raise RuntimeError("a kernel's own error")
    return impls.get("loop").scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_last_state)
"""


def test_a_crash_is_summarised_with_the_case_hypothesis_drew(tmp_path):
    """A kernel that raises its own error (no property check's failure, so no case of the check's):
    the Markdown summary's smallest case is hypothesis' failing example with its draws, the case
    included, not its first line."""
    (tmp_path / "raising_kernel_xyz.py").write_text(RAISES_PAST_ONE_CHANNEL)
    cmd = [sys.executable, "-m", "pytest", "-x", "-p", "no:cacheprovider", "-p", "no:xdist", "--hypothesis-profile", "ci",
           "--impl=raising_kernel_xyz:scan", "--pyargs", "equivalence.test_values", "-k", "test_values_and_last_state",
           "--scan-summary", "summary.md"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 1 and "a kernel's own error" in run.stdout, run.stdout[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert re.search(r"smallest case: `(Falsifying example|Failing test case): test_values_and_last_state\(.*"
                     r"Draw 1 \(case\): Case\(b=1, d=1, n=1, l=2,", summary), summary


def test_a_family_folders_tests_are_summarised_under_their_family():
    """A test in a family's folder that parametrizes over implementation names ("loop", which
    Mamba-1 has too) is counted in its own family's table, not the default family's: the summary
    reads (family, implementation) from equivalence.plugin.implementation_of."""
    from types import SimpleNamespace

    from equivalence.plugin import implementation_of

    marks = {"family": pytest.mark.family("mamba3").mark}
    item = SimpleNamespace(callspec=SimpleNamespace(params={"name": "loop"}), fixturenames=["name"],
                           get_closest_marker=marks.get)
    assert implementation_of(item) == ("mamba3", "loop")


def test_a_function_of_another_family_is_refused_before_any_test():
    """A Mamba-1 scan named for the SSD family does not take its arguments: a usage error naming the
    family and the options, not a run of tests that each fail on the same TypeError."""
    from equivalence.plugin import register_probed

    with pytest.raises(pytest.UsageError, match=r"--ssd-impl wrong_family_xyz: does not take the ssd scan's "
                                                r"arguments \(TypeError: .*\); it is called with 16 positional "
                                                r"arguments, \(x, dt, A, .*return_varlen_states\).*--impl, --ssd-impl"):
        register_probed(impls.get_family("ssd"), "wrong_family_xyz", impls.get("loop").scan, None, "")
    assert "wrong_family_xyz" not in impls.names("ssd")


@pytest.mark.parametrize("where, said", [("no_such_folder_xyz/s.md", "no folder"), (".", "is a folder")])
def test_an_unwritable_summary_is_refused_before_any_test(tmp_path, where, said):
    """--scan-summary is checked when the run starts, not after every test has run."""
    from equivalence.summary import check_writable

    with pytest.raises(pytest.UsageError, match=said):
        check_writable(str(tmp_path / where))
    check_writable(str(tmp_path / "s.md"))


def test_a_family_module_without_its_whole_contract_is_named_with_what_it_lacks(monkeypatch):
    """A family whose equivalence module forgets a name of the contract: the error names it (not a
    default that could not be filled in from it), and the family counts as not wired."""
    module = types.ModuleType("half_a_family")
    for k in properties.CONTRACT:
        setattr(module, k, None)
    del module.terms
    monkeypatch.setitem(sys.modules, "half_a_family", module)
    monkeypatch.setitem(impls.FAMILIES, "half", dataclasses.replace(impls.get_family("selective"), name="half",
                                                                    equivalence="half_a_family"))
    assert not properties.wired("half")
    with pytest.raises(TypeError, match=r"family 'half': half_a_family does not define terms \(.*CONTRACT\)"):
        properties.family("half")


def test_long_tests_start_first_then_values_invariants_gradients():
    """The run's order (plugin.rank): a test marked long before everything, so that no worker of -n 2
    starts one last; then the values tests, the pinned cases after the drawn ones, then the rest."""
    from .plugin import rank

    def item(nodeid, long=False):
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), nodeid.split("::")[0].split("/")[-1])
        return types.SimpleNamespace(nodeid=nodeid, path=path,
                                     get_closest_marker=lambda name: object() if long and name == "long" else None)

    names = ["equivalence/test_front_door.py::test_a", "equivalence/test_values.py::test_pinned_edge_case[x]",
             "reports/tests/test_kernel_repository.py::test_b", "equivalence/test_values.py::test_values_and_last_state[x]",
             "equivalence/test_gradients.py::test_c"]
    items = [item(n, long="kernel_repository" in n) for n in names]
    assert [i.nodeid for i in sorted(items, key=rank)] == [names[2], names[3], names[1], names[4], names[0]]
