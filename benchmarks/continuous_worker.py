"""One side of `scanbench continuous`: a long-lived process timing calls of one tree's code.

    python benchmarks/continuous_worker.py TREE [--cpu N] [--plugin MODULE:FUNCTION --plugin-path DIR --family F]

The parent (reports/continuous.py) starts two of these, one per tree (BASE and HEAD), and drives
them alternately, so that the two sides of every ratio are measured interleaved, A B B A ..., and
see the same load. This file is run from the parent's tree, but imports only ``impls`` and torch
from TREE (put first on sys.path and checked), so it has to stay within the public API that both
trees share: impls.selective_scan, selective_state_update, ssd_scan, ssd_state_update.

Protocol, one JSON object a line, one answer a request:
    (on start)                                    -> {impls, torch, defaults: {family: {scan, step}}}
    {"op": "prepare", "point": {...}, "plant": F} -> {once_s}   (builds inputs, one warm-up call)
    {"op": "run", "calls": N}                     -> {cpu_s}    (CPU seconds per call, N calls)
A failure answers {"error": "..."} and the worker carries on.

Times are this process's CPU time (time.process_time): time spent descheduled while another
process runs does not count. One torch thread, as every sweep here measures (benchmarks/scan_grid.py),
on the CPU given by --cpu (both workers get the same one).
"""

import argparse
import importlib
import inspect
import json
import math
import os
import sys
import time

FAMILIES = {"selective": ("selective_scan", "selective_state_update"), "ssd": ("ssd_scan", "ssd_state_update")}


def selective_inputs(b, d, n, l, seed=0):
    """A Mamba block's scan arguments (D, z, delta_bias, softplus), float32; A = -(1..n)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    return dict(u=torch.randn(b, d, l, generator=gen), delta=0.1 * torch.randn(b, d, l, generator=gen),
                A=-torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1), B=torch.randn(b, n, l, generator=gen),
                C=torch.randn(b, n, l, generator=gen), D=torch.ones(d), z=torch.randn(b, d, l, generator=gen),
                delta_bias=0.1 * torch.randn(d, generator=gen), delta_softplus=True)


def selective_step_inputs(b, d, n, seed=0):
    import torch
    gen = torch.Generator().manual_seed(seed)
    return dict(state=torch.randn(b, d, n, generator=gen), x=torch.randn(b, d, generator=gen),
                dt=0.1 * torch.randn(b, d, generator=gen), A=-torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1),
                B=torch.randn(b, n, generator=gen), C=torch.randn(b, n, generator=gen), D=torch.ones(d),
                z=torch.randn(b, d, generator=gen), dt_bias=0.1 * torch.randn(d, generator=gen), dt_softplus=True)


def ssd_inputs(b, h, p, n, g, l, chunk_size, seed=0):
    """A Mamba-2 block's ssd_scan arguments (D (h,), dt_bias, softplus, no z), float32."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(b, l, h, p, generator=gen), dt=0.1 * torch.randn(b, l, h, generator=gen),
                A=-(1 + 15 * torch.rand(h, generator=gen)), B=torch.randn(b, l, g, n, generator=gen),
                C=torch.randn(b, l, g, n, generator=gen), chunk_size=chunk_size, D=torch.ones(h),
                dt_bias=0.1 * torch.randn(h, generator=gen), dt_softplus=True)


def ssd_step_inputs(b, h, p, n, g, seed=0):
    import torch
    gen = torch.Generator().manual_seed(seed)
    return dict(state=torch.randn(b, h, p, n, generator=gen), x=torch.randn(b, h, p, generator=gen),
                dt=0.1 * torch.randn(b, h, generator=gen), A=-(1 + 15 * torch.rand(h, generator=gen)),
                B=torch.randn(b, g, n, generator=gen), C=torch.randn(b, g, n, generator=gen), D=torch.ones(h),
                dt_bias=0.1 * torch.randn(h, generator=gen), dt_softplus=True)


def call(point):
    """A callable running the point's operation once, through the tree's public function."""
    import impls
    scan, step = (getattr(impls, f) for f in FAMILIES[point["family"]])
    shape = {k: point[k] for k in ("b", "d", "h", "p", "n", "g") if k in point}
    if point["op"] == "scan":
        length = dict(l=point["l"], chunk_size=point["chunk_size"]) if point["family"] == "ssd" else dict(l=point["l"])
        x = (ssd_inputs if point["family"] == "ssd" else selective_inputs)(**shape, **length)
        return lambda: scan(**x, impl=point["impl"])
    x = (ssd_step_inputs if point["family"] == "ssd" else selective_step_inputs)(**shape)
    state = x.pop("state")
    return lambda: step(state, **x, impl=point["impl"])


def planted(point, factor):
    """The point's call doing its work ``factor`` times: the whole call floor(factor) times, then the
    same operation over the first (factor - floor(factor)) of the sequence (a scan's work grows with
    its length), as benchmarks/planted.py does in a sweep."""
    whole, part = int(math.floor(factor)), factor - math.floor(factor)
    fn = call(point)
    rest = None
    if part:
        if "l" not in point:
            raise ValueError(f"a fractional plant ({factor}) needs a sequence to cut; {point['op']} has none")
        rest = call(dict(point, l=max(1, round(part * point["l"]))))

    def slow():
        for _ in range(whole):
            fn()
        if rest is not None:
            rest()
    return slow


def defaults():
    """{family: {scan, step}}: the implementation each public function of this tree uses by default."""
    import impls
    out = {}
    for family, functions in FAMILIES.items():
        if all(hasattr(impls, f) for f in functions):
            out[family] = {op: inspect.signature(getattr(impls, f)).parameters["impl"].default
                           for op, f in zip(("scan", "step"), functions)}
    return out


def load_plugin(spec, path, family):
    """Import MODULE from ``path`` (checked: not a copy found elsewhere) and register FUNCTION under spec."""
    import impls
    sys.path.insert(0, path)
    module, _, attr = spec.partition(":")
    # importing impls loaded the installed copy of a kernel with an entry point: this side's is in path
    top = module.split(".")[0]
    for name in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
        del sys.modules[name]
    mod = importlib.import_module(module)
    where = os.path.realpath(getattr(mod, "__file__", "") or "")
    if not where.startswith(os.path.realpath(path) + os.sep):
        raise ImportError(f"{module} was imported from {where}, not from {path}")
    if attr:
        impls.register(spec, getattr(mod, attr), family=family)
    return where


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("tree")
    parser.add_argument("--plugin")
    parser.add_argument("--plugin-path")
    parser.add_argument("--family", default="selective")
    parser.add_argument("--cpu", type=int)
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    tree = os.path.realpath(args.tree)
    sys.path[:] = [tree] + [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
    import torch
    torch.set_num_threads(1)
    try:
        import impls
    except Exception as e:  # noqa: BLE001 (a tree whose impls cannot be imported: reported in one line)
        print(json.dumps(dict(error=f"{tree}: cannot import impls: {type(e).__name__}: {e}")), flush=True)
        return
    hello = dict(impls=os.path.realpath(impls.__file__), torch=torch.__version__, defaults=defaults())
    if not hello["impls"].startswith(tree + os.sep):   # e.g. an installed copy, when the tree has none
        hello["error"] = f"{tree} has no impls package (imported {hello['impls']} instead)"
    try:
        if args.plugin and "error" not in hello:
            hello["plugin"] = load_plugin(args.plugin, args.plugin_path, args.family)
    except Exception as e:  # noqa: BLE001 (reported to the parent in one line)
        hello["error"] = f"--impl {args.plugin}: {type(e).__name__}: {e}"
    print(json.dumps(hello), flush=True)
    fn = None
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "prepare":
                fn = None   # the previous point's tensors go before the next point's are made
                fn = planted(request["point"], request["plant"]) if request.get("plant") else call(request["point"])
                c0 = time.process_time()
                fn()
                answer = dict(once_s=time.process_time() - c0)
            else:
                calls = request["calls"]
                c0 = time.process_time()
                for _ in range(calls):
                    fn()
                answer = dict(cpu_s=(time.process_time() - c0) / calls)
        except Exception as e:  # noqa: BLE001 (an implementation's error, reported per point)
            answer = dict(error=f"{type(e).__name__}: {e}")
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
