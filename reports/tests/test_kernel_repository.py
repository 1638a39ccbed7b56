"""The suite run from a kernel's own repository, as a newcomer meets it (the README's "Plugging in
your kernel" commands): a fresh virtual environment outside the checkout; the suite installed from
the checkout's path and examples/my_kernel from its own folder; the suite run from the kernel's
folder with `scanbench test`. The kernel's documented bug is met first in a values test on the
smallest case; the fix its BUG comment gives makes the run pass; the Markdown summaries say so.
The kernel's folder also has packages of its own named benchmarks and reports, first on sys.path.

The fresh environment gets what the suite declares it needs, and nothing else: the installed files
of the suite's runtime requirements and theirs (torch's pinned build among them) are linked in from
this environment rather than unpacked again (minutes of pip), so pip finds them satisfied and
installs the suite alone. An import the suite does not declare fails there, as on a user's machine;
that the declared versions install from an index is what `make test` itself does."""

import os
import re
import shutil
import subprocess
import sys
from importlib import metadata

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "my_kernel")


def run(args, cwd, timeout=1200, **env):
    """args in a clean environment (nothing of this run's PYTHONPATH or virtual environment), plus ``env``."""
    env = {**{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}, **env}
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# A kernel's repository may have packages of its own named as two of the suite's top-level packages,
# here first on sys.path (PYTHONPATH=.): each side must import its own.
OWN_PACKAGES_TEST = """
import benchmarks
import reports


def test_this_repositorys_own_benchmarks_and_reports():
    assert benchmarks.WHO == reports.WHO == "kernel"
"""


def requirements(name):
    """The installed distributions ``name`` requires, and theirs, without extras: {name: distribution}."""
    found, todo = {}, [Requirement(r) for r in metadata.requires(name) or ()]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = canonicalize_name(req.name)
        if key not in found:
            found[key] = metadata.distribution(req.name)
            todo += [Requirement(r) for r in found[key].requires or ()]
    return found


def link_installed(dist, site):
    """Hard-links (else copies) the files an installed distribution lists into ``site``."""
    for file in dist.files:
        if file.parts[0] != "..":       # its scripts: the suite runs python -m, never them
            target = site / file
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(dist.locate_file(file), target)
            except FileExistsError:     # a __pycache__ entry another distribution listed too
                pass
            except OSError:             # another file system: copy
                shutil.copy2(dist.locate_file(file), target)


def fixed(source):
    """The kernel's source with the fix its BUG comment gives: each line the comment shows (after
    "The fix is these two lines") in place of the line that assigns the same name."""
    comment = source[source.index("The fix is these two lines"):].splitlines()[1:3]
    for line in (c.strip().lstrip("#").strip() for c in comment):
        name = line.split("=")[0].strip()
        source, count = re.subn(rf"^(\s*){re.escape(name)} = .*?(\s+# .*)?$", lambda m: m.group(1) + line, source,
                                count=1, flags=re.M)
        assert count == 1, f"no line assigns {name!r}"
    return source


def test_scanbench_runs_where_a_kernel_has_packages_named_benchmarks_and_reports(tmp_path):
    """The suite installs the plain top-level names benchmarks and reports; a kernel's repository
    with its own, first on sys.path (PYTHONPATH=.), once made the scanbench command fail to start.
    Started as its console script is, it runs the suite's own and leaves sys.path as it found it."""
    for name in ("benchmarks", "reports"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text('WHO = "kernel"\n')
    entry = next(e for e in metadata.entry_points(group="console_scripts") if e.name == "scanbench")
    module, _, function = entry.value.partition(":")
    code = (f"import sys; before = sys.path[:]; from {module} import {function}; "
            f"status = {function}(['report', '--results', 'no-such-file.jsonl']); "
            "import reports.cli, benchmarks.runner; "
            "print(status, sys.path == before, reports.cli.__file__, benchmarks.runner.__file__)")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "no-such-file.jsonl: no such file" in done.stderr, done.stderr[-3000:]
    status, same_path, *files = done.stdout.split()
    assert status == "2" and same_path == "True", done.stdout
    assert not any(f.startswith(str(tmp_path)) for f in files), files


@pytest.mark.long
@pytest.mark.skipif(not os.path.isdir(EXAMPLE), reason="the example kernel is in the checkout, not in an installed suite")
def test_a_kernel_repository_meets_its_bug_first_fixes_it_and_passes(tmp_path):
    python = tmp_path / "venv" / "bin" / "python"
    made = run([sys.executable, "-m", "venv", tmp_path / "venv"], cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    site = tmp_path / "venv" / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    fresh = {canonicalize_name(d.name) for d in metadata.distributions(path=[str(site)])}   # pip, setuptools
    for name, dist in requirements("selective-scan-suite").items():
        if name not in fresh:            # pip upgrades those itself where the suite needs it
            link_installed(dist, site)
    pip = [python, "-m", "pip", "install", "--quiet"]
    done = run(pip + [ROOT], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    kernel = tmp_path / "my_kernel"   # a copy: the fix below must not touch the checkout
    shutil.copytree(EXAMPLE, kernel, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build"))
    done = run(pip + ["-e", "."], cwd=kernel)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("benchmarks", "reports"):
        (kernel / name).mkdir()
        (kernel / name / "__init__.py").write_text('WHO = "kernel"\n')
    (kernel / "tests" / "test_own_packages.py").write_text(OWN_PACKAGES_TEST)
    scanbench = tmp_path / "venv" / "bin" / "scanbench"

    first = run([scanbench, "test", "my_kernel", "--summary", "before.md", "--", "-x"], cwd=kernel, PYTHONPATH=".")
    assert first.returncode == 1, first.stdout[-5000:]
    assert "make test" not in first.stdout, first.stdout[-5000:]
    # the drawn cases shrunk to the smallest grouping that shows the bug, or, in the few runs whose
    # draws miss it, the pinned case of that grouping right after
    failed = re.findall(r"^FAILED (\S+)", first.stdout, re.M)
    assert failed in (["test_values.py::test_values_and_last_state[selective-my_kernel]"],
                      ["test_values.py::test_pinned_edge_case[selective-my_kernel-b1-d4-n2-l5-g2-f32-mamba-D-z-delta_bias-"
                       "softplus-s5]"]), first.stdout[-5000:]
    before = (kernel / "before.md").read_text()
    failures = before[before.index("### Failures"):]
    assert failures.count("- **") == 1 and "**selective / my_kernel / values**" in failures, before
    assert re.search(r"smallest case: .*Case\(b=1, d=4, n=[12], l=[15], g=2,", failures), before
    assert "fails only with g > 1 and d/g > 1" in first.stdout, first.stdout[-5000:]
    own = run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=kernel)
    assert own.returncode == 1 and "1 failed, 6 passed" in own.stdout and "-d6-" in own.stdout, own.stdout[-3000:]

    source = kernel / "my_kernel" / "__init__.py"
    source.write_text(fixed(source.read_text()))
    second = run([scanbench, "test", "my_kernel", "--summary", "after.md"], cwd=kernel, timeout=2400)
    assert second.returncode == 0, second.stdout[-5000:]
    after = (kernel / "after.md").read_text()
    header, row = (next(line for line in after.splitlines() if line.startswith(start))
                   for start in ("| implementation |", "| my_kernel |"))
    assert "### Failures" not in after and "fail" not in row, after
    assert row.split("|")[header.split("|").index(" values ")].strip() == "pass", after
    own = run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=kernel)
    assert own.returncode == 0, own.stdout[-3000:]


RECIPE = os.path.join(ROOT, "examples", "ci", "scan-suite.yml")


@pytest.mark.skipif(not os.path.isfile(RECIPE), reason="the CI recipe is in the checkout, not in an installed suite")
def test_the_ci_recipes_commands_are_what_the_suite_accepts(monkeypatch):
    """Each scanbench line of examples/ci/scan-suite.yml, its variables filled from the file's env
    block, parses as the command it names, for the example kernel's module and a registered family;
    the recipe installs this distribution and the torch this environment was built with."""
    import shlex

    import impls
    from reports import cli

    text = open(RECIPE).read()
    env = dict(re.findall(r'^  ([A-Z]+): "(.*)"$', text, re.M))
    assert env["SUITE"].startswith(metadata.metadata("selective-scan-suite")["Name"] + " @ "), env
    assert text.count(f"pip install torch=={torch.__version__.split('+')[0]} ") == 2, "torch pin"
    called = {}
    for name in ("test", "continuous"):
        monkeypatch.setattr(cli, name, lambda args, name=name: called.setdefault(name, args) and 0)
    lines = re.findall(r"^\s+run: (scanbench .*)$", text, re.M)
    for line in lines:
        line = re.sub(r"\$(\w+)", lambda m: env[m.group(1)], line)
        assert cli.main(shlex.split(line)[1:]) == 0, line
    assert sorted(called) == ["continuous", "test"], lines
    assert called["test"].kernel == called["continuous"].impl == "my_kernel:selective_scan", called
    assert called["test"].pytest_args[:2] == ["-n", "2"] and called["continuous"].base_path == "base", called
    assert {a.family for a in called.values()} <= set(impls.FAMILIES), called
