"""What the Triton kernels of every family share: the interpreter when there is no GPU, the
elementwise functions written to match torch's to the last bit, and the launchers' helpers.

Kernel helpers (``@triton.jit``, called from the kernels of impls/selective/triton.py and
impls/ssd/triton.py): ``div`` (division rounded to nearest), ``softplus`` (threshold 20),
``silu`` and ``sigmoid``. Launcher helpers: ``tl_dtype``, ``result_dtype``, ``quiet`` and
``host_tensors_on_a_gpu_machine``.

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
    block sizes are chosen by each kernel file's launch configuration;
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


# ---------------------------------------------------------------------------------------------
# Launcher helpers
# ---------------------------------------------------------------------------------------------

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
