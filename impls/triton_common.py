"""What the Triton kernels of every family share: the interpreter when there is no GPU, the
elementwise functions written to match torch's to the last bit, and the launchers' helpers.

Kernel helpers (``@triton.jit``, called from the kernels of impls/selective/triton.py,
impls/ssd/triton.py and impls/mamba3/triton.py): ``div`` (division rounded to nearest),
``softplus`` (threshold 20), ``silu``, ``sigmoid`` and ``segment`` (a difference of two compensated
cumulative sums). Launcher helpers: ``launch_config`` with the chunked kernels' tables, ``block``,
``check_tile_limits``, ``tl_dtype``, ``result_dtype``, ``quiet`` and ``host_tensors_on_a_gpu_machine``.

Devices: tensors on a CUDA device run there. Without a GPU, CPU tensors run in the interpreter; on a
machine with a GPU, CPU tensors (the equivalence suite builds its cases on the CPU) are copied to it
and the results copied back, gradients flowing through the copies, a step's state written back in
place (``host_tensors_on_a_gpu_machine``).

Triton's interpreter (``TRITON_INTERPRET=1``, set below when there is no CUDA device) runs the
kernels on the CPU with numpy, in CI. Its differences, each handled where marked "interpreter:":
  - bfloat16 is held as raw 16-bit integers: arithmetic on it is wrong, so every load is converted
    to float32 first (which every GPU kernel here does anyway);
  - float32 -> bfloat16 conversion truncates instead of rounding to nearest even: under the
    interpreter only, the kernels store half results as float32 and torch rounds them
    (``result_dtype``); on a GPU they store bfloat16 directly, rounded to nearest even;
  - ``triton.autotune`` with several configs and ``triton.testing.do_bench`` need a GPU: nothing here
    autotunes (a step must not: autotuning would apply its in-place update more than once), the
    block sizes are chosen by each kernel file's launch configuration (``launch_config``);
  - programs run one after another, so scratch shared between the steps of one program never races
    there; on a GPU each program owns its scratch and a barrier separates writing it from reading it;
  - numpy warns where a value overflows to inf or turns NaN (``quiet``).
"""

import contextlib
import os

import numpy as np
import torch

if not torch.cuda.is_available():
    # Triton reads this when a kernel is decorated: without a GPU, run the kernels in its interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402  (after TRITON_INTERPRET is settled)
import triton.language as tl  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------------------------------------
# Elementwise functions for the kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def div(a, b):
    """a / b rounded to nearest. For float32 Triton's `/` is div.full.f32 on NVIDIA GPUs, up to 2 ulp
    off; float64 division is already rounded to nearest (and has no other form)."""
    if b.dtype == tl.float32:
        q = tl.fdiv(a, b, ieee_rounding=True)
    else:
        q = a / b
    return q


@triton.jit
def softplus(x):
    """torch.nn.functional.softplus: x above the threshold 20, log1p(exp(x)) below it.
    log1p without libdevice (the interpreter has none): log(w) * e / (w - 1) with w = 1 + e is
    accurate to a few ulp where log(1 + e) would lose every digit of a small e (Goldberg 1991)."""
    e = tl.exp(tl.where(x > 20.0, 20.0, x))       # clamped: no overflow; NaN stays NaN
    w = 1.0 + e
    log1p = tl.where(w == 1.0, e, tl.log(w) * div(e, tl.where(w == 1.0, 1.0, w - 1.0)))
    return tl.where(x > 20.0, x, log1p)


@triton.jit
def silu(z):
    """z / (1 + exp(-z)), the very formula of torch's silu (z * sigmoid(z) would round twice more),
    overflow included: for a very negative z, exp(-z) = inf and silu = z / inf = -0, as torch's; for
    z = -inf, -inf / inf = NaN, as torch's. (Clamping -z, as this once did, gave -inf at z = -inf and
    -1.8e-5 at z = -1e30.)"""
    return div(z, 1.0 + tl.exp(-z))


@triton.jit
def sigmoid(x):
    """1 / (1 + exp(-x)) without overflow for either sign."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, div(1.0, 1.0 + e), div(e, 1.0 + e))


@triton.jit
def segment(hi_i, lo_i, hi_j, lo_j, COMPENSATED: tl.constexpr):
    """cs_i - cs_j from the (hi, lo) cumsum of the SSD's chunk cumsum kernel: exact to rounding of
    the segment itself, not of cs."""
    if COMPENSATED:
        d = (hi_i - hi_j) + (lo_i - lo_j)
    else:
        d = hi_i - hi_j
    return d


# ---------------------------------------------------------------------------------------------
# Launcher helpers
# ---------------------------------------------------------------------------------------------

def launch_config(gpu, interpreter):
    """The launch configuration in force here: the ``gpu`` table on a GPU, the ``interpreter`` one in
    Triton's interpreter. Each kernel file holds one such dict and reads it at every launch, so that a
    test or a tuning sweep changes its block sizes in place."""
    return interpreter if INTERPRETED else gpu


# The chunked kernels' launch configuration (impls/ssd/triton.py's; impls/mamba3/triton.py launches
# those kernels and its own beside them). tl.dot needs every block dimension >= 16 on a GPU; the
# interpreter runs the same kernels with the same blocks. block_p, block_n: the forward's state
# tiles; block_m, block_k: positions per tile; block_t: positions per cumsum block; block_pn: the
# state pass's slice of the flattened (p, n) state; bwd_*: the backward's; step_block_p: the step's
# p tile. The interpreter uses the smallest tiles, so that CI's small cases (p = 17, n = 20, chunks
# of 20 to 40) still cross several tiles of every kind.
CHUNKED_GPU_CONFIG = dict(block_m=64, block_k=64, block_t=64, block_p=64, block_n=128, block_pn=1024, num_warps=4,
                          bwd_block=32, bwd_num_warps=4, step_block_p=16)
CHUNKED_INTERPRETER_CONFIG = dict(block_m=16, block_k=16, block_t=16, block_p=16, block_n=16, block_pn=64,
                                  num_warps=1, bwd_block=16, bwd_num_warps=1, step_block_p=16)

# Whole (p, n) tiles per program in the chunked kernels' backward and step: the declared limit on p and n.
MAX_PN = 256


def block(size, cap):
    """A block covering ``size`` up to ``cap``, at least 16 (tl.dot's smallest dimension)."""
    return max(16, min(triton.next_power_of_2(max(size, 1)), cap))


def check_tile_limits(where, kernels, p, n):
    """Refuse p or n above MAX_PN (NotImplementedError), naming ``kernels``."""
    if p > MAX_PN or n > MAX_PN:
        raise NotImplementedError(f"{where}: {kernels} hold a whole (p, n) state tile per program: p and n up to "
                                  f"{MAX_PN} (declared limit), got p={p}, n={n}")


def tl_dtype(dtype):
    """The Triton compute dtype of a torch compute dtype (float32 or float64)."""
    return {torch.float32: tl.float32, torch.float64: tl.float64}[dtype]


def result_dtype(dtype):
    """The dtype the kernels store results in. interpreter: its float32 -> bfloat16 conversion
    truncates, so half results are stored as float32 and torch rounds them to nearest even (for
    float16 the interpreter would round correctly, but numpy warns where a value overflows to inf)."""
    return torch.float32 if INTERPRETED and dtype in (torch.bfloat16, torch.float16) else dtype


def quiet():
    """interpreter: numpy warns where a value overflows to inf or turns NaN (under stress inputs);
    a GPU computes the same inf and NaN silently, and they propagate the same way."""
    return np.errstate(over="ignore", invalid="ignore", divide="ignore") if INTERPRETED else contextlib.nullcontext()


def host_tensors_on_a_gpu_machine(x):
    """Compiled kernels read GPU memory only: CPU tensors on a machine with a GPU go there and back."""
    return not INTERPRETED and x.device.type == "cpu"


def compile_for_a_gpu(kernel, pointers, constants, **options):
    """Compile ``kernel`` down to a cubin for sm_90 (Hopper) with Triton's own compiler and ptxas: no
    GPU needed. The interpreter accepts things the compiler rejects (Python ints where tensors are
    needed, say), so the tests compile every kernel CI interprets. Needs TRITON_INTERPRET=0 before
    triton is first imported.

    Args:
        pointers: argument name -> Triton pointer type ("*fp32", "*bf16", ...), "*" for the others
        constants: the constexpr arguments' values; every other argument is an int32
        options: triton.compile's (num_warps, num_stages, ...)
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature = {a: "constexpr" if a in constants else (pointers.get(a, pointers["*"]) if a.endswith("_ptr") else "i32")
                 for a in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(a),): v for a, v in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
