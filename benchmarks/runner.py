"""Run benchmark sweeps point by point, appending one JSON line per finished point.

A sweep is a module in benchmarks/ with two functions:

    points(size, impls) -> list of dicts   # the parameters of each point; size is "quick", "default" or "long";
                                           # impls is a list of implementation names or None for all
    measure(point) -> dict                 # what was measured at that point (median_s, iqr_s, ...)

Each result line is {"benchmark": <sweep>, "key": <stable id of the point>, **point, **measured,
"machine": machine_info(), "finished": <time>}. A point that raises is recorded with "error" and the
sweep goes on. With resume=True, points whose key is already in the output file are skipped, so
an interrupted sweep (Ctrl-C, a crash) picks up where it stopped and never duplicates a point.

    python -m benchmarks.runner [--quick | --long] [--sweep NAME ...] [--impl NAME ...] [--out FILE] [--resume]
"""

import argparse
import datetime
import importlib
import json
import os
import sys

from tqdm import tqdm

from .common import append_jsonl, machine_info, read_jsonl

SWEEPS = ("calibration", "scan_grid", "time_per_token", "decode_split", "accuracy")  # modules of benchmarks/, run in this order
DEFAULT_OUT = os.path.join("results", "results.jsonl")


def point_key(sweep, point):
    return sweep + ":" + json.dumps(point, sort_keys=True, default=str)


def available_sweeps():
    """The sweeps whose module exists (they land with their issues)."""
    return [s for s in SWEEPS if importlib.util.find_spec(f"benchmarks.{s}") is not None]


def run(sweeps=None, size="default", impls=None, out=DEFAULT_OUT, resume=False, progress=True):
    """Run the sweeps; returns the number of points measured now."""
    sweeps = sweeps or available_sweeps()
    unknown = [s for s in sweeps if s not in available_sweeps()]
    if unknown:
        raise ValueError(f"unknown sweep(s) {unknown}; available: {available_sweeps()}")
    done = set()
    if resume and os.path.exists(out):
        done = {r.get("key") for r in read_jsonl(out)[0] if "error" not in r}
    elif os.path.exists(out) and not resume:
        raise FileExistsError(f"{out} exists: pass --resume to continue it, or choose another --out")
    todo = []
    for sweep in sweeps:
        module = importlib.import_module(f"benchmarks.{sweep}")
        todo += [(sweep, module, p) for p in module.points(size, impls) if point_key(sweep, p) not in done]
    machine = machine_info()
    measured = 0
    bar = tqdm(todo, desc="sweep", unit="point", disable=not progress, file=sys.stderr)
    for sweep, module, point in bar:
        bar.set_postfix_str(f"{sweep} {point.get('impl', '')} {point.get('L', point.get('l', ''))}")
        record = dict(benchmark=sweep, key=point_key(sweep, point), **point)
        try:
            record.update(module.measure(point))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # recorded, visible in the report, and retried by --resume
            record["error"] = f"{type(e).__name__}: {e}"
        record.update(machine=machine, finished=datetime.datetime.now().isoformat(timespec="seconds"))
        append_jsonl(out, record)
        measured += 1
    return measured


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.runner", description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="size", action="store_const", const="quick")
    size.add_argument("--long", dest="size", action="store_const", const="long")
    parser.add_argument("--sweep", action="append", help=f"one of {SWEEPS} (default: all available)")
    parser.add_argument("--impl", action="append", help="implementation name (default: all registered)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    try:
        n = run(args.sweep, args.size or "default", args.impl, args.out, args.resume)
    except KeyboardInterrupt:
        print(f"\ninterrupted: everything finished so far is in {args.out}; rerun with --resume", file=sys.stderr)
        return 130
    except (ValueError, FileExistsError) as e:
        parser.error(str(e))
    print(f"{n} point(s) measured; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
