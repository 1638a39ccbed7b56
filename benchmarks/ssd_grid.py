"""SSD (Mamba-2) scan speed grid: chunked, loop, the mapped `parallel`, transformers' torch SSD and a
matmul floor, measured side by side and interleaved, with paired ratios.

A sweep module for benchmarks/runner.py (``points``, ``measure``), and a command of its own:

    python -m benchmarks.ssd_grid [--l 2048] [--direction forward|forward+backward] [--memory]

The shape is mamba2-130m's layer (b=1, h=24, p=64, n=128, g=1), float32, at its chunk_size 256 and at
64 (chunk_size is a performance setting; the floor's work depends on it), with the
arguments its Mamba2 block passes to ``mamba_chunk_scan_combined``: D (h,), dt_bias, dt_softplus, no
z (the block gates in its RMSNorm), no initial_states. Inputs follow Mamba-2's initialisation:
A = -U(1, 16), dt log-uniform in [1e-3, 0.1] stored through the inverse softplus in dt_bias.

Implementations (every one through ``impls.ssd_scan``, so the front door is in every time):

    chunked        the SSD default (impls/ssd/chunked.py)
    loop           the spec, a loop over time (impls/ssd/loop.py)
    parallel       Mamba-1's chunked scan through the d = h·p mapping
    transformers   transformers' pure-PyTorch mamba2_chunk_scan (impls/adapters/transformers_ssd.py)
    floor          the chunked algorithm's matmul work, timed as torch.matmul on the same shapes

The floor. Per (batch, chunk of Q = chunk_size tokens), the SSD algorithm (Dao & Gu 2024, §6) does
four batched matrix products, and nothing less gives its result:

    C Bᵀ                  (Q, n) @ (n, Q)   per group           2·b·g·c·Q²·n flops
    (C Bᵀ ∘ L) (dt·x)     (Q, Q) @ (Q, p)   per head            2·b·h·c·Q²·p
    chunk states          (p, Q) @ (Q, n)   per head            2·b·h·c·Q·p·n
    state readout         (Q, n) @ (n, p)   per head            2·b·h·c·Q·n·p

with c = ceil(l / Q). The floor is one call running those four torch.matmul products on random
float32 operands of exactly those shapes, batched over (b·c·g) or (b·c·h), into preallocated
outputs: the time the matmuls alone take at the rate torch.matmul reaches here. Everything else a
chunked scan does (the decays, the mask, the state pass, D, the dt pipeline) is elementwise and
comes on top. Its flops and rate are recorded beside its time.

Timing and memory as benchmarks/chunked_grid.py measures every chunked family: interleaved rounds,
each ratio to chunked taken within a round (on this shared machine ratios of medians measured at
different moments moved by 2-10x; paired ratios hold, docs/benchmarks.md). Forward + backward:
gradients of x, dt, A, B, C, D and dt_bias for the implementations that declare gradients (the loop
is left out: autograd through 2048 Python steps holds every state), beside chunked's forward.
Memory: the point at l = 65,536 runs chunked alone in a fresh process.

One thread by default (SSD_GRID_THREADS=2 measures on two, a different point key): on this shared
2-core machine a two-thread run waits on a descheduled thread at every parallel region whenever
another process holds a core, which slows an implementation by its number of ops, not its work
(measured: chunked 2.6 s a call at l = 2048 on two threads under load, against 0.16-0.4 s on one).
"""

import importlib.util
import math
import os
import sys

import torch

import impls
from . import chunked_grid

if importlib.util.find_spec("transformers") is not None:
    import impls.adapters.transformers_ssd  # noqa: F401  (registers "transformers" in the ssd family)

BENCHMARK = "ssd_grid"
SHAPE = dict(b=1, h=24, p=64, n=128, g=1)          # mamba2-130m: d_model 768, expand 2, headdim 64
CHUNK_SIZE = 256                                   # mamba2-130m's chunk_size
IMPLS = ("chunked", "loop", "parallel", "transformers", "floor")
MEMORY_L = 65536
THREADS = int(os.environ.get("SSD_GRID_THREADS", "1"))
ROUNDS = {"quick": 3, "default": 5, "long": 5}
# Slow implementations are measured only up to this l, without a chunk size of their own at
# chunk_size 256 only, and in the long sweep only (one thread, l = 2048: the loop about 1 s a call, the
# mapped parallel 3 s; two threads on this machine under load: the loop 11 s at l = 512, parallel 106 s
# at 2048). Neither is timed with gradients (the loop's autograd holds every state; parallel's backward
# at this shape takes far longer than the forward).
MAX_L = {"loop": 2048, "parallel": 2048}
CHUNKLESS = ("loop", "parallel")


def points(size, names):
    """One point per (l, direction, chunk_size): every implementation at that point is measured
    inside it, interleaved. names: None for IMPLS (those registered in the ssd family, and the floor);
    otherwise those of them listed (chunked, the reference of every ratio, is always measured).
    Implementations that have no chunk size (loop, parallel) are measured at chunk_size 256 only."""
    chosen = [i for i in IMPLS if (names is None or i in names or i == "chunked")]
    chosen = [i for i in chosen if i == "floor" or i in impls.names(family="ssd")]
    shape = dict(SHAPE, dtype="float32", threads=THREADS)
    forwards = [(2048, "forward", CHUNK_SIZE), (2048, "forward", 64)]
    backwards = [(2048, "forward+backward", CHUNK_SIZE), (2048, "forward+backward", 64)]
    if size == "quick":
        grid = [(512, "forward", 64)]
    elif size == "default":
        grid = forwards + backwards
    else:
        grid = ([(512, "forward", CHUNK_SIZE)] + forwards + [(8192, "forward", CHUNK_SIZE), (8192, "forward", 64)]
                + backwards)
    out = []
    for l, direction, chunk_size in grid:
        # the slow chunkless ones (a minute a call and more) in the long sweep only
        which = [i for i in chosen if l <= MAX_L.get(i, l) and (i not in CHUNKLESS or (size == "long" and chunk_size == CHUNK_SIZE))]
        if direction == "forward+backward":
            which = [i for i in which if i not in ("floor", *CHUNKLESS) and impls.get(i, family="ssd").supports["gradients"]]
        out.append(dict(shape, l=l, chunk_size=chunk_size, direction=direction, impls=which, rounds=ROUNDS[size]))
    if size == "long":
        for chunk_size in (CHUNK_SIZE, 64):
            out.append(dict(shape, l=MEMORY_L, chunk_size=chunk_size, direction="memory", impls=["chunked"], rounds=1))
    return out


def make_inputs(b, h, p, n, g, l, seed=0, requires_grad=False, **_):
    """Mamba-2-initialised float32 arguments of ssd_scan (as its block passes them)."""
    gen = torch.Generator().manual_seed(seed)
    dt0 = torch.rand(h, generator=gen).mul_(math.log(100.0)).add_(math.log(1e-3)).exp_()
    dt_bias = dt0.expm1().log()                                   # inverse softplus of dt in [1e-3, 0.1]
    x = dict(x=torch.randn(b, l, h, p, generator=gen), dt=0.1 * torch.randn(b, l, h, generator=gen),
             A=-(1 + 15 * torch.rand(h, generator=gen)), B=torch.randn(b, l, g, n, generator=gen),
             C=torch.randn(b, l, g, n, generator=gen), D=torch.ones(h), dt_bias=dt_bias)
    if requires_grad:
        for v in x.values():
            v.requires_grad_()
    return x


def floor_work(b, h, p, n, g, l, chunk_size, **_):
    """The four matmul shapes of the chunked algorithm: [(batch, rows, inner, cols)], and flops."""
    c, Q = -(-l // chunk_size), chunk_size
    shapes = [(b * c * g, Q, n, Q), (b * c * h, Q, Q, p), (b * c * h, p, Q, n), (b * c * h, Q, n, p)]
    return shapes, sum(2 * k * m * i * j for k, m, i, j in shapes)


def chunk_bytes(h, p, n, chunk_size, **_):
    """One chunk's float32 working set: its (h, Q, Q) decayed scores, its x and out (Q, h, p) and a
    state (h, p, n). "A few chunks' worth" of memory beyond inputs and output is a few of these."""
    Q = chunk_size
    return 4 * (h * Q * Q + 2 * Q * h * p + h * p * n)


def forward(point, impl, x):
    """A no-argument function: impl on inputs x through impls.ssd_scan, with the arguments
    mamba2-130m's block passes."""
    return lambda: impls.ssd_scan(x["x"], x["dt"], x["A"], x["B"], x["C"], point["chunk_size"], D=x["D"],
                                  dt_bias=x["dt_bias"], dt_softplus=True, impl=impl)


globals().update(chunked_grid.bound(sys.modules[__name__]))


if __name__ == "__main__":
    sys.exit(main())  # noqa: F821 (bound just above)
