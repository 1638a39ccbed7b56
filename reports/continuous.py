"""scanbench continuous: the speed gate between two versions of the code, measured side by side.

    scanbench continuous BASE [HEAD] [--quick] [--threshold 0.2] [--alpha 0.01] [--out FILE]
    scanbench continuous --impl MODULE:FUNCTION --base-path DIR [--head-path DIR] [--family ssd]

As asv's ``continuous``: both versions on one machine, in one run. BASE (and HEAD, if given) is a
git ref, extracted into a temporary directory with ``git archive``; HEAD defaults to the working
tree, uncommitted changes included. Two worker processes (benchmarks/continuous_worker.py), one per
tree, each importing its own tree's ``impls``, are driven alternately: for every gated point, rounds
in which BASE and HEAD each run one block of the same number of calls, the order swapped every round
(A B, B A, ...), on one torch thread each, timed in the worker's CPU time. So both sides of a ratio
see the same load, and the verdict never depends on another day's numbers. The rounds are shared
among PROCESS_PAIRS fresh pairs of workers, one pair after another: a process can settle on a speed
for its whole life (unchanged code measured 1.35x slower in one HEAD process under load), and over
three pairs that is one pair's share of the point's spread, not a verdict.
Both workers are pinned to the same CPU: only one runs at a time, and on this 2-core VM one core
ran the SSD scan at 17-24 ms a call and the other at 40-50 ms (another guest's load, presumably),
steadily, so two unpinned workers settling on different cores made unchanged code a "2x regression".

Gated points: for every family with a default implementation (the ``impl`` default of its public
functions, read from each tree), the default scan over a few sizes, and the time-per-token pair
at one position: re-forwarding the prefix (one scan over L tokens) and one recurrent step, each
against itself at the other version. A point regresses by the rule of ``scanbench check``
(reports.check.verdict): its median per-round ratio HEAD / BASE grew by more than the threshold,
or than the point's own spread (q3 / q1 - 1 of its per-round ratios) if wider, and a one-sided
Mann-Whitney U test on the log per-call times says HEAD is slower. Re-forward / recurrent, whose
sides do unlike work, is reported, never gated.

A plugged-in kernel (``--impl MODULE:FUNCTION``) is compared between two versions of its own file or
package: MODULE imported from --base-path on one side and from --head-path (default: the current
directory) on the other, both through this tree's front door.

SCANBENCH_PLANT=NAME=FACTOR (benchmarks/planted.py) plants a slowdown of NAME on the HEAD side only,
to measure whether the gate catches one (benchmarks/measure_gate.sh).
"""

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
import pandas as pd
from scipy.stats import mannwhitneyu
from tqdm import tqdm

from benchmarks import planted
from benchmarks.common import append_jsonl, fingerprint, machine_info, paired_ratio
from benchmarks.runner import UsageError, check_writable
from .check import ALPHA, verdict

SUITE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # a checkout, or site-packages
WORKER = os.path.join(SUITE_ROOT, "benchmarks", "continuous_worker.py")
ROUNDS = {"quick": 12, "default": 21}   # timed rounds per point, shared among the process pairs
PROCESS_PAIRS = 3   # fresh BASE/HEAD worker pairs per run, in turn (an odd count: a median over them)
BLOCK_S = {"quick": 0.03, "default": 0.05}   # seconds of calls per side per round (at least one call)
# malloc's heap on transparent huge pages. Without it the SSD scan took either about 18 ms or about
# 45 ms a call, decided per process and kept for its life (12 fresh processes here: 6 and 6), so
# two workers running the same code differed by 2x; with it, 12 of 12 took 18-30 ms.
MALLOC_TUNABLES = "glibc.malloc.hugetlb=1"

# The gated points of each family: (section, op, shape). Mamba-1 at the scan grid's quick sizes
# (benchmarks/scan_grid.py) and mamba-130m's layer; SSD at mamba2-130m's layer (benchmarks/ssd_grid.py).
SELECTIVE_130M = dict(b=1, d=1536, n=16)
SSD_130M = dict(b=1, h=24, p=64, n=128, g=1)
POINTS = {
    "selective": {
        "quick": [("scan", "scan", dict(b=1, d=64, n=16, l=512)), ("scan", "scan", dict(b=1, d=64, n=16, l=2048)),
                  ("scan", "scan", dict(b=1, d=1024, n=16, l=512)),
                  ("time_per_token", "scan", dict(SELECTIVE_130M, l=1024)), ("time_per_token", "step", SELECTIVE_130M)],
        "default": [("scan", "scan", dict(b=1, d=d, n=16, l=l)) for d in (64, 1024) for l in (512, 2048, 8192)]
                   + [("time_per_token", "scan", dict(SELECTIVE_130M, l=L)) for L in (256, 1024)]
                   + [("time_per_token", "step", SELECTIVE_130M)],
    },
    "ssd": {
        "quick": [("scan", "scan", dict(SSD_130M, l=512, chunk_size=64)),
                  ("time_per_token", "scan", dict(SSD_130M, l=1024, chunk_size=256)), ("time_per_token", "step", SSD_130M)],
        "default": [("scan", "scan", dict(SSD_130M, l=l, chunk_size=c)) for l in (512, 2048) for c in (64, 256)]
                   + [("time_per_token", "scan", dict(SSD_130M, l=L, chunk_size=256)) for L in (256, 1024)]
                   + [("time_per_token", "step", SSD_130M)],
    },
}


def point_id(point):
    """Readable id: ssd-chunked-scan-b1-h24-p64-n128-g1-l512-c64."""
    dims = "-".join(f"{k if k != 'chunk_size' else 'c'}{point[k]}"
                    for k in ("b", "d", "h", "p", "n", "g", "l", "chunk_size") if k in point)
    impl = point["impl"] if "base_impl" not in point else f"{point['base_impl']}->{point['impl']}"
    return f"{point['family']}-{impl}-{point['op']}-{dims}"


def points(defaults, size, plugin=None, family="selective", base_defaults=None):
    """The gated points: every family both trees have a default for (defaults: {family: {scan, step}}
    as HEAD's worker reports them), or, for a plugin, its family's scan points. Where BASE's default
    differs (base_defaults), the point is the public function as each tree calls it by default: BASE's
    default at BASE against HEAD's at HEAD (``base_impl``), since that is the speed a user gets."""
    out = []
    for fam, table in POINTS.items():
        if plugin and fam != family:
            continue
        if fam not in defaults:
            continue
        for section, op, shape in table[size]:
            if plugin and op != "scan":
                continue
            impl = plugin or defaults[fam][op]
            point = dict(section=section, family=fam, op=op, impl=impl, **shape)
            base_impl = (base_defaults or {}).get(fam, {}).get(op, impl) if not plugin else impl
            if base_impl != impl:
                point["base_impl"] = base_impl
            out.append(point)
    return out


class Worker:
    """One tree's worker process (benchmarks/continuous_worker.py), answering one request at a time."""

    def __init__(self, tree, side, cpu, plugin=None, plugin_path=None, family="selective"):
        self.side = side
        self.log = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, WORKER, tree, "--cpu", str(cpu)]
        if plugin:
            cmd += ["--plugin", plugin, "--plugin-path", plugin_path, "--family", family]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", planted.ENV)}
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GLIBC_TUNABLES=MALLOC_TUNABLES)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     cwd=tree, env=env)
        self._hello = None

    @property
    def hello(self):
        """What the worker said on starting (read on first use, so that both workers start at once)."""
        if self._hello is None:
            self._hello = self._answer()
        return self._hello

    def _answer(self):
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            tail = self.log.read().strip().splitlines()[-1:] or ["no output"]
            raise UsageError(f"{self.side}: the worker stopped ({tail[0]})")
        return json.loads(line)

    def ask(self, **request):
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        self.log.close()


def measure(base, head, point, rounds, block_s, plant=None):
    """dict(base_s, head_s): per-call CPU seconds of each side, one per round, interleaved; or
    dict(error) if either side failed. plant: a factor for HEAD's side (planted slowdown), or None."""
    base_point = dict(point, impl=point.get("base_impl", point["impl"]))
    base_point.pop("base_impl", None)
    head_point = {k: v for k, v in point.items() if k != "base_impl"}
    prepared = [base.ask(op="prepare", point=base_point), head.ask(op="prepare", point=head_point, plant=plant)]
    errors = [f"{w.side}: {a['error']}" for w, a in zip((base, head), prepared) if "error" in a]
    if errors:
        return dict(error="; ".join(errors))
    calls = max(1, int(block_s / max(max(a["once_s"] for a in prepared), 1e-9)))   # the same calls on both sides
    times = {base.side: [], head.side: []}
    for r in range(rounds + 1):   # round 0 warms both sides up and is not kept
        for w in ((base, head) if r % 2 else (head, base)):
            answer = w.ask(op="run", calls=calls)
            if "error" in answer:
                return dict(error=f"{w.side}: {answer['error']}")
            if r:
                times[w.side].append(answer["cpu_s"])
    return dict(base_s=times[base.side], head_s=times[head.side], calls_per_block=calls)


def judge(base_s, head_s, threshold, alpha=ALPHA):
    """The verdict on one point from its interleaved per-call times (reports.check.verdict's rule)."""
    r = paired_ratio(head_s, base_s, to="BASE")
    change = r["ratio"] - 1
    tolerance = max(threshold, r["ratio_q3"] / r["ratio_q1"] - 1)
    logs_head, logs_base = np.log(head_s), np.log(base_s)
    p_up = float(mannwhitneyu(logs_head, logs_base, alternative="greater").pvalue)
    p_down = float(mannwhitneyu(logs_head, logs_base, alternative="less").pvalue)
    return dict(ratio=r["ratio"], ratio_q1=r["ratio_q1"], ratio_q3=r["ratio_q3"], ratio_pairs=r["ratio_pairs"],
                tolerance=tolerance, p=p_up, unstable=r["unstable"],
                status=verdict(change, tolerance, p_up, p_down, r["unstable"], alpha))


def compare(base_tree, head_tree, size="quick", threshold=0.2, alpha=ALPHA, plant=None, plugin=None,
            base_plugin_path=None, head_plugin_path=None, family="selective", chosen=None, rounds=None,
            block_s=None, out=None, progress=True):
    """Measure every gated point at base_tree and head_tree interleaved and judge each.

    plant: "NAME=FACTOR" slowing NAME on HEAD's side, or None; chosen: points to measure instead of
    the gated ones (tests use tiny ones). Returns (rows: a DataFrame, one row per point, with status;
    info: dict of the workers' hello, the fingerprint and the load averages while measuring).
    Raises UsageError where a tree or the plugin cannot be loaded."""
    plant_name, plant_factor = planted.parse(plant) if plant else (None, None)
    for side, tree in (("BASE", base_tree), ("HEAD", head_tree)):
        if not os.path.isdir(os.path.join(tree, "impls")):
            raise UsageError(f"{side} ({tree}) has no impls package: not a tree of this suite")
    cpu = min(os.sched_getaffinity(0))
    rounds = rounds or ROUNDS[size]
    block_s = block_s or BLOCK_S[size]
    machine = machine_info()
    times, errors, loads = {}, {}, []
    todo, notes, hello = None, [], None
    with tqdm(desc="continuous", unit="point", file=sys.stderr, disable=not progress) as bar:
        for pair in range(PROCESS_PAIRS):
            # each pair of fresh workers runs its share of every point's rounds: a speed a process
            # settles on for its life (as above) is then one pair's share of the spread, not the verdict
            share = rounds // PROCESS_PAIRS + (pair < rounds % PROCESS_PAIRS)
            workers = []
            try:
                for tree, side, path in ((base_tree, "BASE", base_plugin_path), (head_tree, "HEAD", head_plugin_path)):
                    workers.append(Worker(tree, side, cpu, plugin, path, family))
                for w in workers:
                    if "error" in w.hello:
                        raise UsageError(f"{w.side}: {w.hello['error']}")
                base, head = workers
                if todo is None:
                    if not base.hello["defaults"]:
                        raise UsageError(f"BASE ({base_tree}) has no selective_scan or ssd_scan to measure")
                    defaults = {f: d for f, d in head.hello["defaults"].items() if f in base.hello["defaults"]}
                    notes = [f"{f}: default {base.hello['defaults'][f]} at BASE, {d} at HEAD: each tree's public "
                             f"function measured with its own default" for f, d in defaults.items()
                             if base.hello["defaults"][f] != d and not plugin]
                    notes += [f"{f}: only at HEAD, not gated" for f in head.hello["defaults"] if f not in defaults]
                    todo = chosen or points(defaults, size, plugin, family, base.hello["defaults"])
                    if not todo:
                        raise UsageError("no family has a default at both BASE and HEAD: nothing to compare")
                    if plant_name and plant_name not in {p["impl"] for p in todo}:
                        raise UsageError(f"{planted.ENV}={plant}: {plant_name!r} is not among the gated implementations "
                                         f"({', '.join(sorted({p['impl'] for p in todo}))})")
                    bar.reset(total=len(todo) * PROCESS_PAIRS)
                    hello = dict(base=base.hello, head=head.hello)
                for point in todo:
                    key = point_id(point)
                    loads.append(os.getloadavg()[0])
                    if share and key not in errors:
                        result = measure(base, head, point, share, block_s,
                                         plant_factor if point["impl"] == plant_name else None)
                        if "error" in result:
                            errors[key] = result["error"]
                        else:
                            got = times.setdefault(key, dict(base_s=[], head_s=[], calls_per_block=[]))
                            got["base_s"] += result["base_s"]
                            got["head_s"] += result["head_s"]
                            got["calls_per_block"].append(result["calls_per_block"])
                    bar.update()
            finally:
                for w in workers:
                    w.close()
    loads.append(os.getloadavg()[0])
    rows = []
    for point in todo:
        key = point_id(point)
        factor = plant_factor if point["impl"] == plant_name else None
        row = dict(point, id=key)
        if key in errors:
            row.update(status="error", error=errors[key])
        else:
            result = times[key]
            row.update(base_ms=1e3 * float(np.median(result["base_s"])), head_ms=1e3 * float(np.median(result["head_s"])),
                       **judge(result["base_s"], result["head_s"], threshold, alpha), **result)
        rows.append(row)
        if out:
            append_jsonl(out, dict(row, benchmark="continuous", planted=plant if factor else None, machine=machine,
                                   fingerprint=fingerprint(machine), load_avg=loads[-1]))
    info = dict(**hello, fingerprint=fingerprint(machine), load_avg=(min(loads), max(loads)), cpu=cpu, notes=notes)
    return pd.DataFrame(rows), info


def unlike_work(rows):
    """Re-forward / recurrent per family at HEAD and at BASE: reported, never gated (unlike work)."""
    out = []
    ok = rows[rows["status"] != "error"] if "status" in rows else rows
    for family, g in ok[ok["section"] == "time_per_token"].groupby("family"):
        reforward, step = g[g["op"] == "scan"], g[g["op"] == "step"]
        if reforward.empty or step.empty:
            continue
        for _, r in reforward.iterrows():
            out.append(dict(family=family, of=f"re-forward l={int(r['l'])} / recurrent step",
                            BASE=r["base_ms"] / step["base_ms"].iloc[0], HEAD=r["head_ms"] / step["head_ms"].iloc[0]))
    return pd.DataFrame(out)


def git(repo, *args):
    done = subprocess.run(["git", "-C", repo, *args], capture_output=True)
    if done.returncode:
        raise UsageError(done.stderr.decode(errors="replace").strip().splitlines()[-1] if done.stderr.strip()
                         else f"git {' '.join(args)} failed")
    return done.stdout


def repository(where="."):
    """The top directory of the git repository containing ``where``; UsageError outside one."""
    done = subprocess.run(["git", "-C", where, "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if done.returncode:
        raise UsageError(f"{os.path.abspath(where)} is not in a git repository (continuous compares two commits of one)")
    return done.stdout.strip()


def resolve(repo, ref):
    """The full commit a ref names; UsageError naming the ref otherwise."""
    done = subprocess.run(["git", "-C", repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
                          capture_output=True, text=True)
    if done.returncode:
        raise UsageError(f"{ref!r} is not a commit of {repo}")
    return done.stdout.strip()


def extract(repo, commit, into):
    """The tree of ``commit`` (git archive), clean, under ``into``."""
    with tarfile.open(fileobj=io.BytesIO(git(repo, "archive", "--format=tar", commit))) as tar:
        tar.extractall(into, filter="data")
    return into


def run(args):
    """`scanbench continuous`: 0 pass, 1 a regression, 2 a usage error (raised as UsageError)."""
    if args.out:
        check_writable(args.out)   # before measuring, not after
    if not (np.isfinite(args.threshold) and args.threshold >= 0):
        raise UsageError(f"--threshold {args.threshold}: need a finite fraction >= 0, e.g. 0.2")
    if not 0 < args.alpha < 1:
        raise UsageError(f"--alpha {args.alpha}: need a significance level between 0 and 1, e.g. 0.01")
    if args.impl:
        module, colon, function = args.impl.partition(":")
        if not (module and colon and function):
            raise UsageError(f"--impl {args.impl}: need MODULE:FUNCTION (a function with the scan signature)")
        if not args.base_path:
            raise UsageError("--impl needs --base-path (the directory the BASE version of MODULE is imported from)")
        for flag, path in (("--base-path", args.base_path), ("--head-path", args.head_path)):
            if not os.path.isdir(path):
                raise UsageError(f"{flag} {path}: not a directory")
    elif args.base_path or args.head_path != ".":
        raise UsageError("--base-path and --head-path compare a plugged-in kernel: give --impl MODULE:FUNCTION")
    elif not args.base:
        raise UsageError("give BASE, a commit to compare against (e.g. origin/main), or --impl with --base-path")
    plant = os.environ.get(planted.ENV) or None
    if plant:
        try:
            planted.parse(plant)
        except ValueError as e:
            raise UsageError(str(e)) from None
    # A plugged-in kernel's two versions run on the suite that runs this (a checkout, or installed in
    # a kernel's CI, where the folder is no git repository of this suite's): no commits to extract.
    repo = SUITE_ROOT if args.impl else repository()
    with tempfile.TemporaryDirectory(prefix="scanbench-continuous-") as tmp:
        trees, names = {}, {}
        for side, ref in (("BASE", args.base), ("HEAD", args.head)):
            if args.impl:
                trees[side], names[side] = repo, f"the suite in {repo}"
            elif ref is None:
                trees[side] = repo
                dirty = bool(git(repo, "status", "--porcelain", "--untracked-files=no").strip())
                names[side] = f"the working tree ({git(repo, 'rev-parse', '--short', 'HEAD').decode().strip()}"\
                              f"{', with uncommitted changes' if dirty else ''})"
            else:
                commit = resolve(repo, ref)
                trees[side] = extract(repo, commit, os.path.join(tmp, side))
                names[side] = f"{ref} ({commit[:8]})"
        print(f"continuous: BASE {names['BASE']} against HEAD {names['HEAD']}"
              + (f"; {args.impl} from {args.base_path} against {args.head_path}" if args.impl else "")
              + (f"; {planted.ENV}={plant} on HEAD's side" if plant else ""), flush=True)
        rows, info = compare(trees["BASE"], trees["HEAD"], "quick" if args.quick else "default", args.threshold,
                             args.alpha, plant, args.impl, os.path.abspath(args.base_path or "."),
                             os.path.abspath(args.head_path), args.family, out=args.out)
    return report(rows, info, args.threshold, args.alpha)


def report(rows, info, threshold, alpha):
    """Print the verdicts; the exit status (1 if any point regressed or failed to run)."""
    fp = info["fingerprint"]
    lo, hi = info["load_avg"]
    print(f"machine: {fp['cpu_model']}, {fp['cpus']} cores, torch {fp['torch']}, BLAS {fp['blas']}; both sides on "
          f"CPU {info['cpu']}; load average {lo:.1f}-{hi:.1f} while measured")
    for note in info.get("notes", []):
        print(note)
    shown = rows.reindex(columns=["section", "id", "base_ms", "head_ms", "ratio", "ratio_q1", "ratio_q3", "tolerance",
                                  "p", "status"])
    print(shown.to_markdown(index=False, floatfmt=".3g"))
    unlike = unlike_work(rows)
    if not unlike.empty:
        print("reported, not gated (unlike work):")
        print(unlike.to_markdown(index=False, floatfmt=".3g"))
    bad = rows[rows["status"].isin(["REGRESSION", "error"])]
    for _, r in bad.iterrows():
        if r["status"] == "error":
            print(f"ERROR: {r['impl']} at {r['id']}: {r['error']}")
        else:
            print(f"REGRESSION: {r['impl']} ({r['section']}) at {r['id']}: HEAD / BASE {r['ratio']:.2f}x "
                  f"[{r['ratio_q1']:.2f}, {r['ratio_q3']:.2f}], tolerance {r['tolerance']:.0%}, p = {r['p']:.2g}")
    regressions = int((rows["status"] == "REGRESSION").sum())
    unstable = int((rows["status"] == "unstable").sum())
    print(f"speed: {len(rows)} points, HEAD against BASE interleaved (threshold {threshold:.0%} and p < {alpha}), "
          f"{regressions} regression(s), {unstable} unstable, {len(bad) - regressions} error(s)")
    return 1 if len(bad) else 0


def add_arguments(p):
    p.add_argument("base", nargs="?", metavar="BASE", help="a commit (ref) to compare against, e.g. origin/main")
    p.add_argument("head", nargs="?", metavar="HEAD", help="a commit to compare (default: the working tree)")
    p.add_argument("--quick", action="store_true", help="fewer points and rounds (CI: a few minutes on 2 cores)")
    p.add_argument("--threshold", type=float, default=0.20,
                   help="a slowdown HEAD / BASE beyond this fraction, if significant, fails (default %(default)s)")
    p.add_argument("--alpha", type=float, default=ALPHA, help="significance level of the one-sided test (default %(default)s)")
    p.add_argument("--impl", metavar="MODULE:FUNCTION", help="a plugged-in scan, compared between --base-path and --head-path")
    p.add_argument("--base-path", help="directory BASE's MODULE is imported from (with --impl)")
    p.add_argument("--head-path", default=".", help="directory HEAD's MODULE is imported from (default: .)")
    p.add_argument("--family", choices=("selective", "ssd"), default="selective",
                   help="the plugged-in scan's family: selective (Mamba-1 signature) or ssd (default %(default)s)")
    p.add_argument("--out", help="also append every point's measurements, as JSON lines, to this file")
