"""Run benchmark sweeps point by point, appending one JSON line per finished point.

A sweep is a module in benchmarks/ with two functions, and optionally a third:

    points(size, impls) -> list of dicts   # the parameters of each point; size is "quick", "default" or "long";
                                           # impls is a list of implementation names or None for all
    measure(point) -> dict                 # what was measured at that point (median_s, ratio, ...)
    group(point) -> str                    # optional: points measured together (interleaved) share a
                                           # group; a shard never splits one (default: every point alone)

Each result line is {"benchmark": <sweep>, "key": <stable id of the point>, **point, **measured,
"commit", "dirty", "machine", "settings", "shard", "load_avg", "finished"}: the commit and whether
the tree had uncommitted changes (a hash of them), the machine (benchmarks.common.machine_info), the
settings (the sweep size and the environment variables that change what is measured, SETTINGS_ENV)
and the 1-minute load average when the point finished. A point that raises is recorded with "error"
and the sweep goes on.

No stale data: with resume=True a point already in the output file is skipped only when its record
matches the point's key, commit, dirty state, machine and settings, and, for an implementation
plugged in as MODULE or MODULE:FUNCTION, the hash of its module's source file ("plugin_source",
recorded in the point: such a file is often untracked); the run says how many it reused and how
many it ignored. Sharding: shard=(i, n) runs the i-th of n disjoint parts (whole groups, dealt
round-robin), so n machines together run the sweep once; `scanbench report` merges their files.

    scanbench sweep [--quick | --long] [--sweep NAME ...] [--impl NAME|MODULE|MODULE:FUNCTION ...]
                    [--out FILE] [--resume] [--shard I/N]
"""

import argparse
import datetime
import hashlib
import importlib
import importlib.util
import json
import os
import sys

from tqdm import tqdm

import impls
from . import planted
from .common import append_jsonl, code_state, machine_info, machine_key, read_jsonl

# modules of benchmarks/, run in this order (a second family's sweep is added here, e.g. "ssd_grid")
SWEEPS = ("calibration", "scan_grid", "time_per_token", "decode_split", "accuracy", "ssd_grid", "mamba3_grid")
DEFAULT_OUT = os.path.join("results", "results.jsonl")
# environment variables that change what a sweep measures: part of every point's settings
SETTINGS_ENV = ("SCAN_GRID_THREADS", "SSD_GRID_THREADS", "MAMBA3_GRID_THREADS", planted.ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS", "THP_MEM_ALLOC_ENABLE")


class UsageError(ValueError):
    """A bad command line or input file: reported in one line, exit status 2."""


# name -> source file of implementations plugged in from the command line (MODULE or MODULE:FUNCTION):
# such a file is often untracked, so the tree's dirty flag cannot see it change
PLUGIN_FILES = {}


def plugin_source(name):
    """A short hash of the source file a plugged-in implementation came from; None for the registry's own."""
    path = PLUGIN_FILES.get(name)
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return hashlib.sha1(f.read()).hexdigest()[:12]
    except OSError:
        return "unreadable"


def point_key(sweep, point):
    return sweep + ":" + json.dumps(point, sort_keys=True, default=str)


def settings(size):
    """What, beyond the point's parameters, decides what was measured."""
    return dict(size=size, env={k: os.environ[k] for k in SETTINGS_ENV if os.environ.get(k)})


def provenance(size):
    """The fields that must match for a recorded point to be reused (see the module docstring)."""
    return dict(code_state(), machine=machine_info(), settings=settings(size))


def same_provenance(record, now):
    return (record.get("commit") == now["commit"] and record.get("dirty") == now["dirty"]
            and isinstance(record.get("machine"), dict) and machine_key(record["machine"]) == machine_key(now["machine"])
            and record.get("settings") == now["settings"])


def available_sweeps():
    """The sweeps whose module exists (they land with their issues)."""
    return [s for s in SWEEPS if importlib.util.find_spec(f"benchmarks.{s}") is not None]


def resolve_impls(specs):
    """Implementation names from command-line specs, as pytest's --impl takes them: a registered
    name, MODULE:FUNCTION (a function with the selective_scan signature, registered under that
    name), or a module that registers implementations when imported. Raises UsageError otherwise."""
    if not specs:
        return None
    known = set(impls.names())
    try:
        known |= set(impls.names(family="ssd"))
    except TypeError:  # a registry without families
        pass
    # a plugin module in the current directory is found, as `python -m` and pytest (rootdir) find it
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    chosen = []
    for spec in specs:
        if spec in known or spec in impls.names():
            chosen.append(spec)
            continue
        module, _, attr = spec.partition(":")
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found and attr:
            raise UsageError(f"--impl {spec}: cannot import module {module!r} (is it on PYTHONPATH?)")
        if not found:
            raise UsageError(f"--impl {spec}: not a registered implementation ({', '.join(impls.names())}), "
                             f"module:function, or a module (cannot import module {module!r}: is it on PYTHONPATH?)")
        before = set(impls.names())
        try:
            mod = importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 (a plugin's own error, reported in one line)
            raise UsageError(f"--impl {spec}: cannot import {module!r}: {type(e).__name__}: {e}") from None
        if attr:
            fn = getattr(mod, attr, None)
            if not callable(fn):
                raise UsageError(f"--impl {spec}: {module!r} has no function {attr!r}")
            if spec not in impls.names():
                impls.register(spec, fn)
            PLUGIN_FILES.setdefault(spec, getattr(mod, "__file__", None))
            chosen.append(spec)
        else:
            added = [n for n in impls.names() if n not in before]
            if not added:
                raise UsageError(f"--impl {spec}: importing it registered no implementation")
            for n in added:
                PLUGIN_FILES.setdefault(n, getattr(mod, "__file__", None))
            chosen += added
    return list(dict.fromkeys(chosen))


def check_writable(out):
    """UsageError unless the results file ``out`` can be appended to (tried, then left as it was)."""
    existed = os.path.exists(out)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "a"):
            pass
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror})") from None
    if not existed:
        os.remove(out)


def repair_last_line(path, log=print):
    """Make the file end at a line's end before appending to it: a last line cut short (a run killed
    mid-write) is dropped, one that is whole JSON but lacks its newline gets it; either is said."""
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return
        start = data.rfind(b"\n") + 1
        try:
            json.loads(data[start:])
        except ValueError:
            f.truncate(start)
            log(f"warning: {path}: its last line was cut short ({len(data) - start} bytes, not JSON); dropped")
            return
        f.write(b"\n")
        log(f"warning: {path}: its last line lacked a newline; added")


def parse_shard(text):
    """"I/N" -> (I, N) with 1 <= I <= N; UsageError otherwise."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text}: expected I/N, e.g. 2/4") from None
    if not 1 <= i <= n:
        raise UsageError(f"--shard {text}: need 1 <= I <= N")
    return i, n


def plan(sweeps, size, names, shard=None):
    """[(sweep, module, point)] in measuring order; with shard=(i, n) only the i-th of n parts,
    whole groups dealt round-robin in order."""
    todo, groups = [], {}
    for sweep in sweeps:
        module = importlib.import_module(f"benchmarks.{sweep}")
        group = getattr(module, "group", None)
        for p in module.points(size, names):
            g = sweep + ":" + (group(p) if group else point_key(sweep, p))
            groups.setdefault(g, len(groups))
            todo.append((groups[g], sweep, module, p))
    if shard is not None:
        i, n = shard
        todo = [t for t in todo if t[0] % n == i - 1]
    return [t[1:] for t in todo]


def run(sweeps=None, size="default", impls_=None, out=DEFAULT_OUT, resume=False, progress=True, shard=None,
        log=print):
    """Run the sweeps; returns (points measured now, how many of them raised). Raises UsageError for
    a bad sweep name, implementation or output path (checked before anything is measured)."""
    sweeps = sweeps or available_sweeps()
    unknown = [s for s in sweeps if s not in available_sweeps()]
    if unknown:
        raise UsageError(f"unknown sweep(s) {unknown}; available: {available_sweeps()}")
    if os.path.isdir(out):
        raise UsageError(f"--out {out} is a directory; give a file, e.g. {os.path.join(out, 'results.jsonl')}")
    if os.path.exists(out) and not resume:
        raise UsageError(f"{out} exists: pass --resume to continue it, or choose another --out")
    names = resolve_impls(impls_)
    try:
        plant = planted.apply_from_env()
    except ValueError as e:
        raise UsageError(str(e)) from None
    if plant:
        log(f"planted slowdown ({planted.ENV}): {plant}; recorded in every point's settings")
    if resume and os.path.exists(out):
        repair_last_line(out, log)
    now = provenance(size)
    done, ignored = {}, 0   # key -> the plugin source hash it was measured with
    if resume and os.path.exists(out):
        for r in read_jsonl(out)[0]:
            if "error" in r or "key" not in r:
                continue
            if same_provenance(r, now):
                done[r["key"]] = r.get("plugin_source")
            else:
                ignored += 1
    try:
        todo = plan(sweeps, size, names, shard)
    except ValueError as e:   # an implementation a sweep does not know
        raise UsageError(str(e)) from None
    def reusable(s, p):  # a plugged-in kernel whose source file changed is measured again
        key = point_key(s, p)
        return key in done and done[key] == plugin_source(p.get("impl"))

    stale = sum(point_key(s, p) in done and not reusable(s, p) for s, _, p in todo)
    reused = sum(reusable(s, p) for s, _, p in todo)
    todo = [(s, m, p) for s, m, p in todo if not reusable(s, p)]
    if resume:
        log(f"resume: reused {reused} point(s) of {out} (same commit, tree, machine and settings); "
            f"{ignored} recorded under another commit, tree, machine or settings not reused"
            + (f"; {stale} of a plugged-in implementation whose source file changed measured again" if stale else ""))
    check_writable(out)
    extra = dict(now, shard=f"{shard[0]}/{shard[1]}" if shard else None)
    measured = errored = 0
    bar = tqdm(todo, desc="sweep", unit="point", disable=not progress, file=sys.stderr)
    for sweep, module, point in bar:
        bar.set_postfix_str(f"{sweep} {point.get('impl', '')} {point.get('L', point.get('l', ''))}")
        record = dict(benchmark=sweep, key=point_key(sweep, point), **point,
                      plugin_source=plugin_source(point.get("impl")))
        try:
            record.update(module.measure(point))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # recorded, visible in the report, and retried by --resume
            record["error"] = f"{type(e).__name__}: {e}"
            errored += 1
        record.update(extra, load_avg=os.getloadavg()[0], finished=datetime.datetime.now().isoformat(timespec="seconds"))
        append_jsonl(out, record)
        measured += 1
    return measured, errored


def add_arguments(parser):
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="size", action="store_const", const="quick", help="about 80 s of CPU (2-3 min on 2 cores)")
    size.add_argument("--long", dest="size", action="store_const", const="long")
    parser.add_argument("--sweep", action="append", help=f"only this sweep, repeatable: {', '.join(SWEEPS)}")
    parser.add_argument("--impl", action="append", metavar="NAME|MODULE|MODULE:FUNCTION",
                        help="implementation(s) to measure, as pytest's --impl (default: all registered)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON-lines file (default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="continue --out: reuse its points measured at this commit, tree, machine and settings")
    parser.add_argument("--shard", metavar="I/N", help="run only the I-th of N disjoint parts of the sweep")


def main(argv=None, prog="scanbench sweep"):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_args(parser.parse_args(argv), prog)


def run_args(args, prog="scanbench sweep"):
    try:
        shard = parse_shard(args.shard) if args.shard else None
        n, errored = run(args.sweep, args.size or "default", args.impl, args.out, args.resume, shard=shard,
                log=lambda m: print(m, file=sys.stderr))
    except KeyboardInterrupt:
        print(f"\ninterrupted: everything finished so far is in {args.out}; rerun with --resume", file=sys.stderr)
        return 130
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"{n} point(s) measured, {errored} of them errors; results in {args.out}")
    if n and errored == n:   # nothing was measured at all: not a success
        print(f"{prog}: every point raised (see the \"error\" fields in {args.out})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
