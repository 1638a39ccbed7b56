"""How often does the suite fail a correct kernel? Run the property suite over every built-in
implementation, N rounds with fresh random seeds, and count.

    python -m equivalence.false_alarms --rounds 3                 # thorough profile: 500 examples a property
    python -m equivalence.false_alarms --rounds 1 --profile dev   # a quick look (25 a property)

Each round is one pytest run (``-n 2``) with its own seed (printed, with the command that replays it)
and a fresh hypothesis directory, so nothing stored is replayed. hypothesis' observability records
every drawn example and the targets each comparison reported (equivalence/tolerance.py:
error / bound); from them this prints the drawn examples and failures per family, and the largest
error / bound per implementation and property: the margin a correct kernel keeps, not only pass or
fail. transformers' SSD runs with its known failures listed (impls/adapters/xfails/transformers_ssd.txt),
which are reported as expected failures, not false alarms. Each round is appended to ``--out`` as
one JSON line. Ctrl-C or SIGTERM stops the round in progress and writes it, marked interrupted, with
what it drew so far; no later round starts.
"""

import argparse
import ast
import collections
import datetime
import functools
import json
import os
import pathlib
import secrets
import signal
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

import pandas as pd

# The property tests of every family; what they check is listed in docs/testing.md.
PROPERTY_FILES = (
    "equivalence/test_values.py", "equivalence/test_invariants.py", "equivalence/test_gradients.py",
    "equivalence/test_varlen.py", "equivalence/test_properties.py", "equivalence/ssd/test_seq_idx.py",
)
TRANSFORMERS = ["--ssd-impl", "impls.adapters.transformers_ssd", "--xfails-file", "impls/adapters/xfails/transformers_ssd.txt"]


def params(nodeid):
    """'equivalence/test_values.py::test_x[ssd-triton-...]' -> ['ssd', 'triton', ...]."""
    test = nodeid.split("::")[-1]
    return test.partition("[")[2].rstrip("]").split("-")


def family(nodeid):
    """Which family a test id belongs to: the family parameter a family-parametrized test's id starts
    with ([ssd-chunked]), else the family its file declares for all its tests (a module-level
    ``pytestmark = pytest.mark.family(name)``), else the family folder its file is in
    (equivalence/ssd/), else Mamba-1."""
    import impls

    first = params(nodeid)[0]
    if first in impls.FAMILIES:
        return first
    path = nodeid.split("::")[0]
    declared = file_family(path)
    if declared is not None:
        return declared
    folders = path.split("/")[1:-1]
    return next((f for f in folders if f in impls.FAMILIES), "selective")


ROOT = pathlib.Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=None)
def file_family(path):
    """The family named by a test file's module-level ``pytestmark = pytest.mark.family(name)`` (alone
    or in a list), or None. Read from the source, not imported: counting examples runs no test module.
    path: relative to the repository root, as in a test id."""
    try:
        tree = ast.parse((ROOT / path).read_text())
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark"
                                                     for t in node.targets)):
            continue
        marks = node.value.elts if isinstance(node.value, (ast.List, ast.Tuple)) else [node.value]
        for mark in marks:
            if (isinstance(mark, ast.Call) and isinstance(mark.func, ast.Attribute) and mark.func.attr == "family"
                    and mark.args and isinstance(mark.args[0], ast.Constant)):
                return mark.args[0].value
    return None


def split(nodeid):
    """'equivalence/test_values.py::test_x[ssd-triton]' -> ('test_x', 'triton')."""
    import impls

    name = nodeid.split("::")[-1].partition("[")[0]
    values = params(nodeid)
    if values[0] in impls.FAMILIES and len(values) > 1:
        values = values[1:]
    return name, values[0]


def pytest_command(seed, profile, workers, files, extra):
    import impls

    selected = [a for f in impls.FAMILIES.values() for n in impls.names(family=f.name) for a in (f.option, n)]
    return [sys.executable, "-m", "pytest", *files, "-n", str(workers), "-q", "-p", "no:cacheprovider",
            "--hypothesis-profile", profile, "--hypothesis-seed", str(seed), *selected, *TRANSFORMERS, *extra]


def read_round(folder, junit):
    """(examples per family, failed test ids, {(implementation, test, label): largest target})."""
    examples, margins = collections.Counter(), {}
    for path in (folder / "hypothesis" / "observed").glob("*testcases.jsonl"):
        for line in path.read_text().splitlines():
            case = json.loads(line)
            if case.get("type") != "test_case" or case["status"] == "gave_up":
                continue
            examples[family(case["property"])] += 1
            test, impl = split(case["property"])
            for key, value in case["features"].items():
                if key.startswith("target:"):
                    k = (family(case["property"]), impl, test, key[len("target:"):])
                    margins[k] = max(margins.get(k, 0.0), float(value))
    failed = []
    if junit.exists():
        for tc in ET.parse(junit).iter("testcase"):
            if tc.find("failure") is not None or tc.find("error") is not None:
                failed.append(f"{tc.get('classname', '').replace('.', '/')}.py::{tc.get('name')}")
    return examples, failed, margins


def run_pytest(cmd, env, log):
    """(exit status, the tail of its output, interrupted) of one round, its output written to ``log``.
    A round stopped by Ctrl-C or SIGTERM (hours into a thorough run, say) stops pytest and still
    returns: what it drew so far is counted and written, not lost with the round's folder."""
    def stop(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, stop)
    interrupted = False
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            proc.wait()
        except KeyboardInterrupt:
            interrupted = True
            proc.send_signal(signal.SIGINT)    # pytest's own way to stop: it ends its workers and its report
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
    return proc.returncode, pathlib.Path(log).read_text()[-6000:], interrupted


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m equivalence.false_alarms", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1, help="pytest runs, each with a fresh seed (default 1)")
    parser.add_argument("--profile", default="thorough", choices=("thorough", "dev", "ci"))
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist processes (default 2)")
    parser.add_argument("--files", nargs="+", default=list(PROPERTY_FILES), help="test files (default: the property tests)")
    parser.add_argument("--out", default="results/false_alarms.jsonl", help="JSON lines, one per round, appended")
    parser.add_argument("pytest_args", nargs="*", help="after --: more pytest arguments")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.workers < 1:
        parser.error("--rounds and --workers must be at least 1")
    out = pathlib.Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.open("a").close()
    except OSError as e:
        parser.error(f"--out {args.out}: {e}")

    examples, failures, margins = collections.Counter(), [], {}
    for r in range(args.rounds):
        seed = secrets.randbelow(2**32)
        with tempfile.TemporaryDirectory() as tmp:
            folder = pathlib.Path(tmp)
            env = dict(os.environ, HYPOTHESIS_STORAGE_DIRECTORY=str(folder / "hypothesis"),
                       HYPOTHESIS_EXPERIMENTAL_OBSERVABILITY_NOCOVER="1")
            env.pop("CI", None)
            cmd = pytest_command(seed, args.profile, args.workers, args.files,
                                 [f"--junitxml={folder / 'junit.xml'}", *args.pytest_args])
            started = datetime.datetime.now(datetime.timezone.utc)
            print(f"round {r + 1}/{args.rounds}: seed {seed} ...", flush=True)
            returncode, output, interrupted = run_pytest(cmd, env, folder / "pytest.log")
            got, failed, m = read_round(folder, folder / "junit.xml")
        if returncode not in (0, 1) and not interrupted:   # 1: tests failed; else pytest itself could not run
            sys.exit(f"round {r + 1}: pytest exited {returncode}:\n{output}")
        examples.update(got)
        failures += [(seed, f) for f in failed]
        for k, v in m.items():
            margins[k] = max(margins.get(k, 0.0), v)
        minutes = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds() / 60
        print(f"round {r + 1}/{args.rounds}: seed {seed}: {'INTERRUPTED, ' if interrupted else ''}"
              f"{dict(got)} examples drawn, {len(failed)} failed "
              f"({minutes:.1f} min)" + "".join(f"\n  FAILED {f}" for f in failed)
              + (f"\n  replay: {' '.join(pytest_command(seed, args.profile, args.workers, args.files, args.pytest_args))}"
                 if failed else ""),
              flush=True)
        with out.open("a") as f:
            f.write(json.dumps(dict(seed=seed, profile=args.profile, started=started.isoformat(), examples=dict(got),
                                    failed=failed, margins=[[*k, v] for k, v in m.items()],
                                    interrupted=interrupted)) + "\n")
        if interrupted:
            break

    print(f"\n{r + 1} round(s){' (the last interrupted)' if interrupted else ''}, {args.profile} profile: examples drawn per family {dict(examples)}; "
          f"{len(failures)} failure(s)")
    if margins:
        table = pd.DataFrame([[*k, v] for k, v in margins.items()],
                             columns=["family", "implementation", "property", "compared", "largest error/bound"])
        worst = table.loc[table.groupby(["family", "implementation", "property"])["largest error/bound"].idxmax()]
        print("\nlargest error / bound (a correct kernel stays below 1):")
        print(worst.sort_values(["family", "implementation", "property"]).to_markdown(index=False, floatfmt=".3g"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
