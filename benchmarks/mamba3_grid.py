"""Mamba-3 (SISO) scan speed and memory: chunked against the loop, the recurrent step and its own
matmul floor, forward+backward against forward, and memory beyond inputs and output against l.

A sweep module for benchmarks/runner.py (``points``, ``measure``, ``table``), and a command:

    python -m benchmarks.mamba3_grid [--l 2048] [--direction forward|forward+backward|memory]

The shape is the official kernel's optimum (its docstring: nheads_qk=1, nheads=32, headdim_qk=128,
headdim_v=64, chunk_size=64): h_qk = 1, h = 32, n = 128, p = 64, chunk_size 64, with n_ang = 32
(the module's rope_fraction 0.5: d_state / 4) and the arguments the Mamba3 module passes: D, Z, no
Input_States. Inputs: DT log-uniform in [1e-3, 0.1], ADT = A DT with A = -exp(N(0, 1)) per token
and head, Trap and Angles N(0, 1), Q and K N(0, 1) (RMS-normed in the module), biases 1, D 1.
b = 1 and l = 2048 on this CPU (the official benchmarks use larger b and l on a GPU).

Implementations, each through the public functions (the front door is in every time):

    chunked     impls/mamba3/chunked.py, the reference of every ratio
    loop        the spec, a loop over tokens
    recurrent   the step run token after token (impls/mamba3/recurrent.py)
    step        one call of mamba3_state_update (one token): chunked's time per token over it
                is ``per_token_over_step``
    floor       the chunked algorithm's matmuls alone, timed as torch.matmul on the same shapes

The floor. Per (batch, chunk of T = chunk_size tokens, head) the chunked scan does four matrix
products, and nothing less gives its result (q~ and k~ are per head even with h_qk = 1: the
rotation angles are per head):

    q~ k~ᵀ                 (T, n) @ (n, T)     2·b·c·h·T²·n flops
    (q~ k~ᵀ ∘ W) V         (T, T) @ (T, p)     2·b·c·h·T²·p
    chunk state            (p, T) @ (T, n)     2·b·c·h·T·p·n
    state readout          (T, n) @ (n, p)     2·b·c·h·T·n·p

with c = ceil(l / T), on random float32 operands into preallocated outputs. Everything else (the
rotations, the decays and trapezoid weights, the masks, the state pass, D and the gate) is
elementwise and comes on top.

Timing and memory as benchmarks/chunked_grid.py measures every chunked family: paired ratios of
interleaved rounds. Forward+backward: gradients of every input (Q, K, V, ADT, DT, Trap, Q_bias,
K_bias, Angles, D, Z) for chunked, beside chunked's forward in the same rounds. One thread
(MAMBA3_GRID_THREADS to change it), for the reason benchmarks/ssd_grid.py gives. Memory: each
memory point runs chunked alone in a fresh process; the points at several l give the growth per
token (``memory_growth``).
"""

import math
import os
import sys

import torch

import impls
from . import chunked_grid

BENCHMARK = "mamba3_grid"
SHAPE = dict(b=1, h_qk=1, h=32, p=64, n=128, n_ang=32)
CHUNK_SIZE = 64
IMPLS = ("chunked", "loop", "recurrent", "step", "floor")
THREADS = int(os.environ.get("MAMBA3_GRID_THREADS", "1"))
ROUNDS = {"quick": 3, "default": 5, "long": 5}
# The sweep measures memory at these l and the report fits its growth; MEMORY_L, the target, takes
# about 2 GiB of inputs and output and a minute, so it is measured only on request (--direction
# memory --l 65536).
MEMORY_LS = (1024, 2048, 4096, 8192)
MEMORY_L = 65536
MAX_L = {}                                   # every implementation at every l


def points(size, names):
    """One point per (l, direction): the implementations at a point are measured inside it,
    interleaved. names: None for IMPLS; otherwise those listed (chunked always)."""
    chosen = [i for i in IMPLS if names is None or i in names or i == "chunked"]
    chosen = [i for i in chosen if i in ("step", "floor") or i in impls.names(family="mamba3")]
    shape = dict(SHAPE, chunk_size=CHUNK_SIZE, dtype="float32", threads=THREADS)
    l = 512 if size == "quick" else 2048
    out = [dict(shape, l=l, direction="forward", impls=chosen, rounds=ROUNDS[size])]
    if size != "quick":
        grad = [i for i in chosen if i == "chunked"]  # the loop's autograd holds every state: not timed
        out.append(dict(shape, l=l, direction="forward+backward", impls=grad, rounds=ROUNDS[size]))
    if size == "long":
        out += [dict(shape, l=m, direction="memory", impls=["chunked"], rounds=1) for m in MEMORY_LS]
    return out


def make_inputs(b, h_qk, h, p, n, n_ang, l, seed=0, requires_grad=False, **_):
    """mamba3_scan's float32 arguments (dict) as the Mamba3 module passes them."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    DT = torch.exp(math.log(1e-3) + math.log(100.0) * torch.rand(b, h, l, generator=g))
    A = -torch.exp(r(b, h, l)).clamp(min=1e-4)
    x = dict(Q=r(b, l, h_qk, n), K=r(b, l, h_qk, n), V=r(b, l, h, p), ADT=A * DT, DT=DT, Trap=r(b, h, l),
             Q_bias=torch.ones(h, n), K_bias=torch.ones(h, n), Angles=r(b, l, h, n_ang), D=torch.ones(h),
             Z=r(b, l, h, p))
    if requires_grad:
        for v in x.values():
            v.requires_grad_()
    return x


def floor_work(b, h, p, n, l, chunk_size, **_):
    """The four matmul shapes of the chunked algorithm, [(batch, rows, inner, cols)], and flops."""
    c, T = -(-l // chunk_size), chunk_size
    shapes = [(b * c * h, T, n, T), (b * c * h, T, T, p), (b * c * h, p, T, n), (b * c * h, T, n, p)]
    return shapes, sum(2 * k * m * i * j for k, m, i, j in shapes)


def chunk_bytes(h, p, n, chunk_size, **_):
    """One chunk's float32 working set: its (h, T, T) weighted scores, its q~, k~ (T, h, n), its V and
    out (T, h, p) and a state (h, p, n): memory independent of l is a few of these."""
    T = chunk_size
    return 4 * (h * T * T + 2 * T * h * n + 2 * T * h * p + h * p * n)


def forward(point, impl, x):
    """A no-argument function: impl on inputs x through impls.mamba3_scan, or for "step" one token
    through the recurrent mamba3_state_update."""
    if impl == "step":
        tok = {k: v[..., 0] if k in ("ADT", "DT", "Trap") else v[:, 0] if v.dim() > 2 else v for k, v in x.items()}
        return lambda: impls.mamba3_state_update(**tok, impl="recurrent")
    return lambda: impls.mamba3_scan(**x, chunk_size=point["chunk_size"], impl=impl)


def memory_growth(records):
    """Memory beyond inputs and output against l, from memory points' results: dict(bytes_per_token:
    least-squares slope, at_MEMORY_L_bytes: its extrapolation to MEMORY_L, ls, beyond_bytes) or None."""
    pairs = sorted((r["l"], r["results"]["chunked"]["beyond_inputs_and_output_bytes"]) for r in records)
    if len(pairs) < 2:
        return None
    ls, ys = zip(*pairs)
    ml, my = sum(ls) / len(ls), sum(ys) / len(ys)
    slope = sum((a - ml) * (y - my) for a, y in pairs) / sum((a - ml) ** 2 for a in ls)
    return dict(bytes_per_token=slope, at_MEMORY_L_bytes=my + slope * (MEMORY_L - ml), ls=list(ls), beyond_bytes=list(ys))


globals().update(chunked_grid.bound(sys.modules[__name__]))


if __name__ == "__main__":
    sys.exit(main())  # noqa: F821 (bound just above)
