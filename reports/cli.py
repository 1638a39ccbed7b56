"""scanbench: run the benchmark sweeps, turn results into a report, check a kernel against a baseline.

    scanbench sweep  [--quick | --long] [--impl NAME|MODULE|MODULE:FUNCTION ...] [--out FILE] [--resume] [--shard I/N]
    scanbench report [--results FILE ...] [--out DIR]
    scanbench check  --baseline FILE [--results FILE ...] [--threshold 0.2] [--impl NAME ...] [--update-baseline]
    scanbench continuous BASE [HEAD] [--quick] [--threshold 0.2] [--out FILE]   (the speed gate)
    scanbench test   MODULE:FUNCTION|MODULE|NAME [--family F] [--step MODULE:FUNCTION] [--summary FILE] [-- PYTEST ARGS...]

Exit status: test: pytest's (0 every property holds, 1 a failure, 2 interrupted, 4 usage error);
otherwise 0 pass; 1 a regression or a numeric failure (check), nothing to report (report),
every point an error (sweep);
2 a usage error (a missing, empty or unreadable results file, an unknown implementation, a baseline
that covers none of the results), reported in one line.
"""

import argparse
import math
import os
import sys

from benchmarks import runner
from benchmarks.runner import DEFAULT_OUT, UsageError

DEFAULT_REPORT = os.path.join("results", "report")
DEFAULT_THRESHOLD = 0.20


def sweep(args):
    return runner.run_args(args, "scanbench sweep")


def _load_results(paths, required=True):
    """(data, problems) of the results files; UsageError if a file is missing or holds nothing readable."""
    from .load import load

    for path in paths:
        if not os.path.isfile(path):
            raise UsageError(f"--results {path}: no such file")
        if not os.access(path, os.R_OK):
            raise UsageError(f"--results {path}: not readable")
        if os.path.getsize(path) == 0:
            raise UsageError(f"--results {path}: empty")
    data, problems = load(paths)
    if required and data.empty:
        raise UsageError(f"--results {' '.join(paths)}: no readable results")
    return data, problems


def report(args):
    from .report import build

    try:
        data, problems = _load_results(args.results)
    except UsageError as e:
        print(f"scanbench report: error: {e} (run `scanbench sweep` first)", file=sys.stderr)
        return 2
    try:
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise UsageError(f"--out {args.out} is a file; give a directory for the report")
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--out {args.out}: cannot create the report directory ({e.strerror})") from None
        if not os.access(args.out, os.W_OK):
            raise UsageError(f"--out {args.out}: not writable")
    except UsageError as e:
        print(f"scanbench report: error: {e}", file=sys.stderr)
        return 2
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    md, html = build(data, problems, args.out)
    print(f"report written: {html}\n                {md}")
    return 0


def check(args):
    from .check import comparable, fingerprints, make_baseline, numeric_rows, read_baseline, speed_rows, write_baseline

    try:
        if not (math.isfinite(args.threshold) and args.threshold >= 0):
            raise UsageError(f"--threshold {args.threshold}: need a finite fraction >= 0, e.g. 0.2")
        if not 0 < args.alpha < 1:
            raise UsageError(f"--alpha {args.alpha}: need a significance level between 0 and 1, e.g. 0.01")
        if args.update_baseline and not args.results:
            raise UsageError("--update-baseline needs --results (the paired ratios the baseline keeps)")
        data, problems = _load_results(args.results) if args.results else (None, [])
        for p in problems:
            print(f"warning: {p}", file=sys.stderr)
        if args.update_baseline:
            try:
                made = make_baseline(data)
            except ValueError as e:
                raise UsageError(str(e)) from None
            write_baseline(args.baseline, made)
            print(f"baseline written: {args.baseline}")
            return 0
        try:
            baseline = read_baseline(args.baseline)
        except OSError as e:
            raise UsageError(f"--baseline {args.baseline}: {e.strerror}") from None
        except ValueError as e:
            raise UsageError(str(e)) from None
        import impls
        names = runner.resolve_impls(args.impl) or list(impls.names())
        other = [n for n in names if n not in impls.names()]
        if other:   # e.g. an SSD (Mamba-2) name: the golden cases are selective_scan cases
            raise UsageError(f"--impl {' '.join(other)}: the numeric check runs selective_scan (Mamba-1) "
                             f"implementations only: {', '.join(impls.names())}")
        speed = None
        if data is not None:
            speed = speed_rows(baseline, data, args.threshold, args.alpha)
            if speed.empty:
                raise UsageError(f"the baseline {args.baseline} covers none of the paired ratios in "
                                 f"{' '.join(args.results)} (another sweep, or results without paired ratios)")
    except UsageError as e:
        print(f"scanbench check: error: {e}", file=sys.stderr)
        return 2
    numeric = numeric_rows(baseline, names)
    failed = numeric[~numeric["ok"]]
    print(f"numeric: {len(numeric)} comparisons against float64 golden results, {len(failed)} outside the tolerance policy")
    if not failed.empty:
        print(failed.to_markdown(index=False, floatfmt=".3g"))
    regressions = 0
    if speed is not None and not comparable(baseline, data):
        # another machine's speeds: shown as history, never a verdict
        print(f"speed: not comparable: the baseline was measured on {_machine(baseline.get('fingerprint'))}, "
              f"these results on {' and '.join(_machine(f) for f in fingerprints(data)) or 'an unrecorded machine'}; "
              "speed baselines are per machine (gate speed with `scanbench continuous BASE`)")
        print(speed.assign(status="not comparable").to_markdown(index=False, floatfmt=".3g"))
    elif speed is not None:
        moved = speed[speed["status"] != "ok"]
        regressions = int((speed["status"] == "REGRESSION").sum())
        unstable = int((speed["status"] == "unstable").sum())
        loads = data["load_avg"].dropna() if "load_avg" in data else []
        load = f"; load average {min(loads):.1f}-{max(loads):.1f} while measured" if len(loads) else ""
        print(f"speed: {len(speed)} paired ratios against the baseline (threshold {args.threshold:.0%} and "
              f"p < {args.alpha}), {regressions} regression(s), {unstable} unstable{load}")
        if not moved.empty:
            print(moved.to_markdown(index=False, floatfmt=".3g"))
    return 1 if (regressions or not failed.empty) else 0


def continuous(args):
    from . import continuous as gate

    try:
        return gate.run(args)
    except UsageError as e:
        print(f"scanbench continuous: error: {e}", file=sys.stderr)
        return 2


def test(args):
    """The property suite, installed, against one kernel: pytest --pyargs equivalence with the
    family's option. pytest's cache and hypothesis' database stay in the current folder."""
    import subprocess

    import impls

    if args.family not in impls.FAMILIES:
        print(f"scanbench test: error: --family {args.family}: known families: {', '.join(impls.FAMILIES)}",
              file=sys.stderr)
        return 4
    family = impls.get_family(args.family)
    command = [sys.executable, "-m", "pytest", "--pyargs", "equivalence", "--rootdir", os.getcwd(),
               "-o", f"cache_dir={os.path.join(os.getcwd(), '.pytest_cache')}", family.option, args.kernel]
    command += [family.step_option, args.step] if args.step else []
    command += ["--scan-summary", args.summary] if args.summary else []
    command += args.pytest_args
    print("scanbench test: " + " ".join(command[1:]), flush=True)
    return subprocess.call(command)


def _machine(fp):
    if not fp:
        return "an unrecorded machine (a baseline without a fingerprint)"
    return f"{fp['cpu_model']}, {fp['cpus']} cores, torch {fp['torch']}, BLAS {fp['blas']}"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="scanbench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sweep", help="run the benchmark sweeps, appending JSON lines")
    runner.add_arguments(p)
    p.set_defaults(func=sweep)
    p = sub.add_parser("report", help="turn result files (shards merged) into report.html and report.md")
    p.add_argument("--results", nargs="+", default=[DEFAULT_OUT], help="JSON-lines or pytest-benchmark JSON files")
    p.add_argument("--out", default=DEFAULT_REPORT)
    p.set_defaults(func=report)
    p = sub.add_parser("check", help="numeric and speed regression check against a baseline")
    p.add_argument("--baseline", required=True)
    p.add_argument("--results", nargs="+", help="results to compare for speed (numeric checks run regardless)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="a slowdown of a paired ratio beyond this fraction, if significant, fails (default %(default)s)")
    p.add_argument("--alpha", type=float, default=0.01, help="significance level of the one-sided test (default %(default)s)")
    p.add_argument("--impl", action="append", metavar="NAME|MODULE|MODULE:FUNCTION",
                   help="implementations to check numerically (default: all registered)")
    p.add_argument("--update-baseline", action="store_true", help="write a new baseline from --results and the golden cases")
    p.set_defaults(func=check)
    p = sub.add_parser("continuous", help="speed gate: BASE against HEAD (default: the working tree), interleaved")
    from .continuous import add_arguments
    add_arguments(p)
    p.set_defaults(func=continuous)
    p = sub.add_parser("test", help="run the installed property suite against a kernel (pytest --pyargs equivalence)")
    p.add_argument("kernel", metavar="MODULE:FUNCTION|MODULE|NAME",
                   help="a scan function with the family's signature, a module that registers implementations, "
                        "or a registered name")
    p.add_argument("--family", default="selective", help="the kernel's family (default %(default)s; see impls.FAMILIES)")
    p.add_argument("--step", metavar="MODULE:FUNCTION", help="its step function, if it has one")
    p.add_argument("--summary", metavar="FILE", help="also write the implementation x property summary as Markdown")
    p.set_defaults(func=test)
    # what follows a "--" goes to pytest untouched (-x, -n 2, -k ...)
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:len(argv) - len(extra) - bool(extra or "--" in argv)])
    args.pytest_args = extra
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
