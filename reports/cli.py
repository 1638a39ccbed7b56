"""scanbench: run the benchmark sweeps, turn results into a report, check a kernel against a baseline.

    scanbench sweep  [--quick | --long] [--impl NAME ...] [--out FILE] [--resume]
    scanbench report [--results FILE ...] [--out DIR]
    scanbench check  --baseline FILE [--results FILE ...] [--threshold 0.10] [--impl NAME ...] [--update-baseline]
"""

import argparse
import os
import sys

import impls
from benchmarks import runner
from benchmarks.runner import DEFAULT_OUT

DEFAULT_REPORT = os.path.join("results", "report")


def sweep(args):
    argv = (["--quick"] if args.size == "quick" else ["--long"] if args.size == "long" else [])
    argv += sum((["--impl", n] for n in args.impl or []), []) + sum((["--sweep", s] for s in args.sweep or []), [])
    return runner.main(argv + ["--out", args.out] + (["--resume"] if args.resume else []))


def report(args):
    from .load import load
    from .report import build

    data, problems = load(args.results)
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    if data.empty:
        print(f"nothing to report: no readable results in {', '.join(args.results)} (run `scanbench sweep` first)", file=sys.stderr)
        return 1
    md, html = build(data, problems, args.out)
    print(f"report written: {html}\n                {md}")
    return 0


def check(args):
    from .check import make_baseline, numeric_rows, read_baseline, speed_rows, write_baseline
    from .load import load

    data, problems = load(args.results) if args.results else (None, [])
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    if args.update_baseline:
        import pandas as pd
        write_baseline(args.baseline, make_baseline(data if data is not None else pd.DataFrame()))
        print(f"baseline written: {args.baseline}")
        return 0
    try:
        baseline = read_baseline(args.baseline)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = args.impl or impls.names()
    numeric = numeric_rows(baseline, names)
    failed = numeric[~numeric["ok"]]
    print(f"numeric: {len(numeric)} comparisons against float64 golden results, {len(failed)} outside the tolerance policy")
    if not failed.empty:
        print(failed.to_markdown(index=False, floatfmt=".3g"))
    regressions = 0
    if data is not None:
        speed = speed_rows(baseline, data, args.threshold)
        moved = speed[speed["status"] != "ok"]
        regressions = int((speed["status"] == "REGRESSION").sum())
        print(f"speed: {len(speed)} points against the baseline (threshold {args.threshold:.0%}), {regressions} regression(s)")
        if not moved.empty:
            print(moved.to_markdown(index=False, floatfmt=".3g"))
    return 1 if (regressions or not failed.empty) else 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="scanbench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sweep", help="run the benchmark sweeps, appending JSON lines")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="size", action="store_const", const="quick")
    size.add_argument("--long", dest="size", action="store_const", const="long")
    p.add_argument("--impl", action="append", help="implementation name (default: all registered)")
    p.add_argument("--sweep", action="append", help=f"only this sweep: {', '.join(runner.SWEEPS)}")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--resume", action="store_true", help="skip points already in --out")
    p.set_defaults(func=sweep)
    p = sub.add_parser("report", help="turn result files into report.html and report.md with plots")
    p.add_argument("--results", nargs="+", default=[DEFAULT_OUT], help="JSON-lines or pytest-benchmark JSON files")
    p.add_argument("--out", default=DEFAULT_REPORT)
    p.set_defaults(func=report)
    p = sub.add_parser("check", help="numeric and speed regression check against a baseline")
    p.add_argument("--baseline", required=True)
    p.add_argument("--results", nargs="+", help="results to compare for speed (numeric checks run regardless)")
    p.add_argument("--threshold", type=float, default=0.10, help="allowed slowdown as a fraction (default 0.10)")
    p.add_argument("--impl", action="append", help="implementations to check numerically (default: all)")
    p.add_argument("--update-baseline", action="store_true", help="write a new baseline from --results and the golden cases")
    p.set_defaults(func=check)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
