"""What differs between the families that scripts/gpu_check.py checks: their sizes, inputs, memory
floors and targets, and the FAMILIES dict that its phases, written once, read. Every function here
takes torch (and the device) as arguments: importing this module imports nothing heavy, so the pure
helpers are tested on the CPU (equivalence/test_gpu_check.py)."""

import math
import time

MAIN_SIZE = dict(b=8, d=1536, n=16, l=8192)      # the size of the selective targets
BENCH_SIZES = [MAIN_SIZE, dict(b=2, d=768, n=16, l=2048)]
STEP_SIZE = dict(b=8, d=1536, n=16)
# launch configurations to sweep at the main size: (block_d, num_warps, num_stages) for the forward,
# (bwd_block_d, bwd_num_warps) for the backward
FWD_CONFIGS = [(4, 1, 3), (8, 1, 3), (16, 1, 3), (16, 1, 1), (16, 2, 3), (32, 1, 3), (32, 2, 3), (64, 4, 3), (8, 1, 6)]
BWD_CONFIGS = [(8, 1), (16, 1), (16, 2), (32, 2)]
SMOKE_BENCH_SIZES = [dict(b=1, d=8, n=4, l=16)]
SMOKE_STEP_SIZE = dict(b=2, d=8, n=4)
SMOKE_FWD_CONFIGS, SMOKE_BWD_CONFIGS = [(4, 1, 1)], [(4, 1)]

# the SSD grid: mamba2-130m and mamba2-2.7b layers (d_model 768 and 2560, expand 2, headdim 64,
# d_state 128, one group), batch 1, chunk_size 256 (the official default)
SSD_SHAPES = {"mamba2-130m": dict(h=24, p=64, n=128, g=1), "mamba2-2.7b": dict(h=80, p=64, n=128, g=1)}
SSD_LENGTHS = [2048, 8192, 65536]
SSD_CHUNK = 256
SSD_STEP_BATCH = 64
SMOKE_SSD_SHAPES = {"tiny": dict(h=2, p=4, n=4, g=1)}
SMOKE_SSD_LENGTHS = [24]
SMOKE_SSD_CHUNK = 8

# Mamba-3 (SISO): the shape the official Triton kernel is tuned for, as its entry point's docstring
# says ("optimized for nheads_qk=1, nheads=32, headdim_qk=128, headdim_v=64, chunk_size=64",
# mamba3_siso_combined in mamba_ssm/ops/triton/mamba3/mamba3_siso_combined.py), with n_ang = n / 4
# as the official tests draw it; batch 16 as the official scan test, batch 128 for the step as its
# step test (tests/ops/triton/test_mamba3_siso.py); a long sequence besides, as the SSD grid's.
MAMBA3_SHAPE = dict(h=32, h_qk=1, p=64, n=128, n_ang=32)
MAMBA3_SIZES = [dict(b=16, l=2048), dict(b=1, l=8192), dict(b=1, l=65536)]
MAMBA3_CHUNK = 64
MAMBA3_STEP_BATCH = 128
SMOKE_MAMBA3_SHAPE = dict(h=2, h_qk=1, p=4, n=4, n_ang=1)
SMOKE_MAMBA3_SIZES = [dict(b=1, l=12)]
SMOKE_MAMBA3_CHUNK = 4



# ---- memory floors and FLOP counts (pure, tested on the CPU) -------------------------------------

def forward_bytes(b, d, n, l, g=1, itemsize=4, param_itemsize=4):
    """Bytes the forward must move at the least: u, delta, z read, y written (b·d·l each), B and C
    read (b·g·n·l each), A, D, delta_bias read once."""
    return itemsize * (4 * b * d * l + 2 * b * g * n * l) + param_itemsize * (d * n + 2 * d)


def backward_bytes(b, d, n, l, g=1, itemsize=4, param_itemsize=4):
    """Bytes the backward must move at the least: u, delta, z, grad y, B, C read; du, ddelta, dz, dB,
    dC written; parameters and their gradients once."""
    return itemsize * (7 * b * d * l + 4 * b * g * n * l) + 2 * param_itemsize * (d * n + 2 * d)


def step_bytes(b, d, n, itemsize=4):
    """The state read and written, x, dt, z, B, C read, y written."""
    return itemsize * (2 * b * d * n + 4 * b * d + 2 * b * n) + itemsize * (d * n + 2 * d)


def ssd_forward_bytes(b, l, h, p, n, g=1, itemsize=4, has_z=True):
    """Bytes the SSD forward must move at the least: x (and z) read, out written (b·l·h·p each),
    B and C read (b·l·g·n each), dt read (b·l·h, in the input dtype), A, D, dt_bias once (float32)."""
    return itemsize * ((3 if has_z else 2) * b * l * h * p + 2 * b * l * g * n + b * l * h) + 4 * 3 * h


def ssd_backward_bytes(b, l, h, p, n, g=1, itemsize=4, has_z=True):
    """Bytes the SSD backward must move at the least: x, z, d out, B, C, dt read; dx, dz, dB, dC,
    d dt written; parameters and their gradients once."""
    return itemsize * ((5 if has_z else 3) * b * l * h * p + 4 * b * l * g * n + 2 * b * l * h) + 4 * 6 * h


def ssd_flops(b, l, h, p, n, chunk_size):
    """Multiply-adds x 2 of the chunked algorithm's products: per token and head, the chunk state
    (p n), the readout of the carried state (p n), and the causal half of the within-chunk C B^T
    (Q n / 2) and of its product with dt x (Q p / 2), Q = min(chunk_size, l)."""
    Q = min(chunk_size, l)
    return 2 * b * l * h * (2 * p * n + Q * (n + p) / 2)


def ssd_step_bytes(b, h, p, n, g=1, itemsize=4):
    """The state read and written (b·h·p·n each), x, z read and y written, dt, B, C read."""
    return 4 * 2 * b * h * p * n + itemsize * (3 * b * h * p + b * h + 2 * b * g * n) + 4 * 3 * h


def mamba3_forward_bytes(b, l, h, p, n, n_ang, h_qk=1, itemsize=2, has_z=True):
    """Bytes the Mamba-3 SISO forward must move at the least, in the official kernel's dtypes: Q, K
    read (b·l·h_qk·n each), V (and Z) read and out written (b·l·h·p each), Angles (b·l·h·n_ang) and
    Trap (b·h·l) read, Q_bias and K_bias (h·n each) once, all in the input dtype; ADT and DT read in
    float32 (b·h·l each), D (h) once in float32. No state in or out."""
    return (itemsize * (2 * b * l * h_qk * n + (3 if has_z else 2) * b * l * h * p + b * l * h * n_ang + b * h * l
                        + 2 * h * n) + 4 * (2 * b * h * l + h))


def mamba3_backward_bytes(b, l, h, p, n, n_ang, h_qk=1, itemsize=2, has_z=True):
    """Bytes the Mamba-3 backward must move at the least: every input of the forward read again and
    its gradient written in its dtype (twice the forward's inputs), and d out read (b·l·h·p)."""
    out = itemsize * b * l * h * p
    return 2 * (mamba3_forward_bytes(b, l, h, p, n, n_ang, h_qk, itemsize, has_z) - out) + out


def mamba3_step_bytes(b, h, p, n, n_ang, h_qk=1, itemsize=2):
    """The four float32 states read and written (angle b·h·n_ang, ssm b·h·p·n, k b·h·n, v b·h·p);
    q, k read (b·h_qk·n each), v, z read and out written (b·h·p each), trap and angles read (b·h,
    b·h·n_ang), Q_bias, K_bias once (h·n each), in the input dtype; adt, dt (b·h each) and D (h) in
    float32."""
    states = 4 * 2 * b * h * (n_ang + p * n + n + p)
    return states + itemsize * (2 * b * h_qk * n + 3 * b * h * p + b * h + b * h * n_ang + 2 * h * n) + 4 * (2 * b * h + h)


# ---- each family's inputs, cases and tuning -------------------------------------------------------

def _selective_big_scan(torch, dev, gen, smoke):
    """b·d·l = 2^31 + 2^18 elements in bfloat16 (n = 4 keeps the checkpoints small); windows of 16
    channels (the GPU block, the same launch shape) at the last batch row's last channels and the
    first row's first."""
    b, d, n, l = (2, 20, 3, 18) if smoke else (4, 1024, 4, 2**19 + 64)
    cd = 16 if not smoke else 8
    bf = torch.bfloat16
    u = torch.randn(b, d, l, device=dev, generator=gen, dtype=bf)
    delta = (0.001 + 0.1 * torch.rand(b, d, l, device=dev, generator=gen)).to(bf)
    z = torch.randn(b, d, l, device=dev, generator=gen, dtype=bf)
    A = -torch.arange(1, n + 1, device=dev, dtype=torch.float32).expand(d, n).contiguous()
    B = torch.randn(b, n, l, device=dev, generator=gen, dtype=bf)
    C = torch.randn(b, n, l, device=dev, generator=gen, dtype=bf)
    D = torch.ones(d, device=dev)

    def window(bi, c0):
        def take(name, t):
            if name in ("A", "D"):
                return t[c0:c0 + cd]
            if name in ("B", "C"):
                return t[bi:bi + 1]
            return t[bi:bi + 1, c0:c0 + cd].contiguous()    # (b, d, ...): u, delta, z, y, state, gradients
        return f"b{bi}c{c0}", take
    return dict(inputs=dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z), elements=b * d * l,
                windows=[window(b - 1, d - cd), window(0, 0)])


def _selective_big_step(torch, dev, gen, smoke):
    """A state of b·d·n = 2^31 + 2^21 float32 elements."""
    sb, sd, sn = (3, 20, 4) if smoke else (8200, 16384, 16)
    state = torch.randn(sb, sd, sn, device=dev, generator=gen)
    x, dt, z = (torch.randn(sb, sd, device=dev, generator=gen) for _ in range(3))
    B, C = (torch.randn(sb, sn, device=dev, generator=gen) for _ in range(2))
    A = -torch.rand(sd, sn, device=dev, generator=gen) - 0.5
    return state, dict(x=x, dt=dt, A=A, B=B, C=C, D=torch.ones(sd, device=dev), z=z,
                       dt_bias=torch.zeros(sd, device=dev), dt_softplus=True)


def _inputs(torch, dev, b, d, n, l, dtype, gen):
    """Mamba's initialisation: A = -(1..n), dt log-uniform in [1e-3, 0.1] through softplus."""
    dtv = torch.exp(math.log(1e-3) + (math.log(0.1) - math.log(1e-3)) * torch.rand(b, d, l, device=dev, generator=gen))
    bias = 0.1 * torch.randn(d, device=dev, generator=gen)
    return dict(u=torch.randn(b, d, l, device=dev, generator=gen).to(dtype),
                delta=(torch.log(torch.expm1(dtv)) - bias[:, None]).to(dtype),
                A=-torch.arange(1, n + 1, device=dev, dtype=torch.float32).expand(d, n).contiguous(),
                B=torch.randn(b, n, l, device=dev, generator=gen).to(dtype),
                C=torch.randn(b, n, l, device=dev, generator=gen).to(dtype),
                D=torch.ones(d, device=dev), z=torch.randn(b, d, l, device=dev, generator=gen).to(dtype),
                delta_bias=bias, delta_softplus=True)



def _selective_bench_cases(smoke):
    sizes = [(s, "float32") for s in (SMOKE_BENCH_SIZES if smoke else BENCH_SIZES)]
    return [dict(size, dtype=dtype) for size, dtype in sizes + ([] if smoke else [(MAIN_SIZE, "bfloat16")])]


def _selective_bench_inputs(torch, dev, gen, case, smoke):
    b, d, n, l = case["b"], case["d"], case["n"], case["l"]
    dtype = getattr(torch, case["dtype"])
    x = _inputs(torch, dev, b, d, n, l, dtype, gen)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    gy = torch.randn(b, d, l, device=dev, generator=gen).to(dtype)
    return dict(inputs=x, gy=gy, bytes=(forward_bytes(b, d, n, l, itemsize=itemsize), backward_bytes(b, d, n, l, itemsize=itemsize)),
                only=None if dtype == torch.float32 else ["triton"])


def _selective_step_inputs(torch, dev, gen, case, smoke):
    b, d, n = case["b"], case["d"], case["n"]
    x = _inputs(torch, dev, b, d, n, 1, torch.float32, gen)
    args = dict(x=x["u"][..., 0], dt=x["delta"][..., 0], A=x["A"], B=x["B"][..., 0], C=x["C"][..., 0], D=x["D"],
                z=x["z"][..., 0], dt_bias=x["delta_bias"], dt_softplus=True)
    return dict(inputs=dict(args, state=torch.zeros(b, d, n, device=dev)), bytes=step_bytes(b, d, n))


def _selective_tune(torch, ts, dev, gen, smoke, timed, out, started, budget):
    """A sweep of the launch configurations of the triton kernels at the main size (float32)."""
    size = SMOKE_BENCH_SIZES[0] if smoke else MAIN_SIZE
    x = _inputs(torch, dev, size["b"], size["d"], size["n"], size["l"], torch.float32, gen)
    gy = torch.randn(size["b"], size["d"], size["l"], device=dev, generator=gen)
    config = ts.CONFIG
    default = dict(config)
    out["default_config"] = default
    out["fwd_configs"], out["bwd_configs"] = [], []
    try:
        for block_d, warps, stages in (SMOKE_FWD_CONFIGS if smoke else FWD_CONFIGS):
            if time.time() - started > budget - 60:
                out["errors"].append("forward config sweep cut short: time budget")
                break
            config.update(block_d=block_d, num_warps=warps, num_stages=stages)
            with torch.no_grad():
                ms = timed(f"forward config {block_d, warps, stages}", lambda: ts.selective_scan(**x))
            out["fwd_configs"].append(dict(config=dict(block_d=block_d, num_warps=warps, num_stages=stages), ms=ms))
        config.update(default)
        leaves = {k: (v.detach().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
        wrt = [v for v in leaves.values() if isinstance(v, torch.Tensor)]
        for block_d, warps in (SMOKE_BWD_CONFIGS if smoke else BWD_CONFIGS):
            if time.time() - started > budget - 40:
                out["errors"].append("backward config sweep cut short: time budget")
                break
            config.update(bwd_block_d=block_d, bwd_num_warps=warps)
            ms = timed(f"backward config {block_d, warps}",
                       lambda: torch.autograd.grad(ts.selective_scan(**leaves), wrt, gy))
            out["bwd_configs"].append(dict(config=dict(bwd_block_d=block_d, bwd_num_warps=warps), ms=ms))
    finally:
        config.update(default)
    for key in ("fwd", "bwd"):
        measured = [c for c in out[f"{key}_configs"] if c["ms"] is not None]
        out[f"best_{key}_config"] = min(measured, key=lambda c: c["ms"]) if measured else None


def _ssd_big_scan(torch, dev, gen, smoke):
    """x and z of b·l·h·p = 2^31 + 2^16 bfloat16 elements; the window: the last two heads."""
    b, l, h, p, n = (1, 40, 4, 4, 4) if smoke else (1, 2**20 + 32, 32, 64, 16)
    ch = 2
    bf = torch.bfloat16
    x = torch.randn(b, l, h, p, device=dev, generator=gen, dtype=bf)
    z = torch.randn(b, l, h, p, device=dev, generator=gen, dtype=bf)
    dt = (0.001 + 0.1 * torch.rand(b, l, h, device=dev, generator=gen)).to(bf)
    A = -(1 + 15 * torch.rand(h, device=dev, generator=gen))
    B = torch.randn(b, l, 1, n, device=dev, generator=gen, dtype=bf)
    C = torch.randn(b, l, 1, n, device=dev, generator=gen, dtype=bf)
    D = torch.ones(h, device=dev)

    def take(name, t):
        if name in ("A", "D"):
            return t[h - ch:]
        if name in ("B", "C"):
            return t
        if name == "final_states":
            return t[:, h - ch:]
        return t[:, :, h - ch:].contiguous()                 # (b, l, h, ...): x, z, dt, out, gradients
    return dict(inputs=dict(x=x, dt=dt, A=A, B=B, C=C, chunk_size=SMOKE_SSD_CHUNK if smoke else SSD_CHUNK, D=D, z=z),
                elements=b * l * h * p, windows=[("", take)])


def _ssd_big_step(torch, dev, gen, smoke):
    """A state of b·h·p·n = 2^31 + 2^21 float32 elements (mamba2-130m's layer, 10,924 rows)."""
    sb, sh, sp, sn = (3, 2, 4, 4) if smoke else (10924, 24, 64, 128)
    state = torch.randn(sb, sh, sp, sn, device=dev, generator=gen)
    x, z = (torch.randn(sb, sh, sp, device=dev, generator=gen) for _ in range(2))
    dt = torch.rand(sb, sh, device=dev, generator=gen)
    B, C = (torch.randn(sb, 1, sn, device=dev, generator=gen) for _ in range(2))
    A = -(1 + 15 * torch.rand(sh, device=dev, generator=gen))
    return state, dict(x=x, dt=dt, A=A, B=B, C=C, D=torch.ones(sh, device=dev), z=z,
                       dt_bias=torch.zeros(sh, device=dev), dt_softplus=True)


def _ssd_inputs(torch, dev, b, l, h, p, n, g, dtype, gen):
    """Mamba-2's initialisation: A = -U(1, 16) per head, dt log-uniform in [1e-3, 0.1] through softplus."""
    dtv = torch.exp(math.log(1e-3) + (math.log(0.1) - math.log(1e-3)) * torch.rand(b, l, h, device=dev, generator=gen))
    bias = 0.1 * torch.randn(h, device=dev, generator=gen)
    return dict(x=torch.randn(b, l, h, p, device=dev, generator=gen).to(dtype),
                dt=(torch.log(torch.expm1(dtv)) - bias).to(dtype),
                A=-(1 + 15 * torch.rand(h, device=dev, generator=gen)),
                B=torch.randn(b, l, g, n, device=dev, generator=gen).to(dtype),
                C=torch.randn(b, l, g, n, device=dev, generator=gen).to(dtype),
                D=torch.ones(h, device=dev), z=torch.randn(b, l, h, p, device=dev, generator=gen).to(dtype),
                dt_bias=bias, dt_softplus=True)



def _ssd_shapes(smoke):
    return (SMOKE_SSD_SHAPES if smoke else SSD_SHAPES).items()


def _ssd_bench_cases(smoke):
    chunk = SMOKE_SSD_CHUNK if smoke else SSD_CHUNK
    return [dict(shape=name, b=1, l=l, **shape, chunk_size=chunk, dtype="bfloat16") for name, shape in _ssd_shapes(smoke)
            for l in (SMOKE_SSD_LENGTHS if smoke else SSD_LENGTHS)]


def _ssd_bench_inputs(torch, dev, gen, case, smoke):
    b, l, h, p, n, g = (case[k] for k in ("b", "l", "h", "p", "n", "g"))
    chunk = case["chunk_size"]
    x = dict(_ssd_inputs(torch, dev, b, l, h, p, n, g, torch.bfloat16, gen), chunk_size=chunk)
    gy = torch.randn(b, l, h, p, device=dev, generator=gen).to(torch.bfloat16)
    return dict(inputs=x, gy=gy, bytes=(ssd_forward_bytes(b, l, h, p, n, g, 2), ssd_backward_bytes(b, l, h, p, n, g, 2)),
                flops=ssd_flops(b, l, h, p, n, chunk))


def _ssd_step_cases(smoke):
    return [dict(shape=name, b=2 if smoke else SSD_STEP_BATCH, **shape) for name, shape in _ssd_shapes(smoke)]


def _ssd_step_inputs(torch, dev, gen, case, smoke):
    b, h, p, n, g = (case[k] for k in ("b", "h", "p", "n", "g"))
    x = _ssd_inputs(torch, dev, b, 1, h, p, n, g, torch.bfloat16, gen)
    args = dict(x=x["x"][:, 0], dt=x["dt"][:, 0], A=x["A"], B=x["B"][:, 0], C=x["C"][:, 0], D=x["D"], z=x["z"][:, 0],
                dt_bias=x["dt_bias"], dt_softplus=True)
    return dict(inputs=dict(args, state=torch.zeros(b, h, p, n, device=dev)), bytes=ssd_step_bytes(b, h, p, n, g, 2))


def _mamba3_inputs(torch, dev, gen, b, l, h, h_qk, p, n, n_ang, has_z=True):
    """The official SISO tests' draw: Q, K RMS-normed over n, V, Z, Angles, the biases standard
    normal, DT log-uniform in [1e-3, 0.1], ADT = -U(1, 16) DT, Trap U(0, 1) before its sigmoid, D = 1.
    In the official kernel's dtypes: bfloat16, but ADT, DT and D in float32. l = None: one token, the
    step's arguments (b, h, ...)."""
    bf, t = torch.bfloat16, () if l is None else (l,)
    r = lambda *s: torch.randn(*s, device=dev, generator=gen, dtype=bf)
    u = lambda *s: torch.rand(*s, device=dev, generator=gen)
    rms = lambda x: (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).to(bf)
    DT = torch.exp(math.log(1e-3) + (math.log(0.1) - math.log(1e-3)) * u(b, h, *t))
    return dict(Q=rms(torch.randn(b, *t, h_qk, n, device=dev, generator=gen)),
                K=rms(torch.randn(b, *t, h_qk, n, device=dev, generator=gen)), V=r(b, *t, h, p),
                ADT=-(1 + 15 * u(b, h, *t)) * DT, DT=DT, Trap=u(b, h, *t).to(bf), Q_bias=r(h, n), K_bias=r(h, n),
                Angles=r(b, *t, h, n_ang), D=torch.ones(h, device=dev), Z=r(b, *t, h, p) if has_z else None)


def _mamba3_big_scan(torch, dev, gen, smoke):
    """V of b·l·h·p = 2^31 + 2^17 bfloat16 elements, p = 128 and n = 16 (the kernels' float32 q~ and
    k~, (b, l, h, n), are an eighth of V's count), so that the backward fits an H100's 80 GB: about
    65 GB at its peak, counted on paper, most of it float32 copies of V's size (d out, V, dv, dV, in
    torch). No Z: the kernel reads it at out's offsets, and its gradient's float32 temporaries would
    need some 60 GB more. The window: the last two heads (Q and K, one head shared by all, h_qk = 1,
    are taken whole): in every head the last 32 tokens lie past element 2^31 of V and out."""
    b, l, h, p, n, n_ang = (1, 10, 4, 4, 4, 1) if smoke else (1, 2**19 + 32, 32, 128, 16, 2)
    ch = 2
    x = _mamba3_inputs(torch, dev, gen, b, l, h, 1, p, n, n_ang, has_z=False)

    def take(name, t):
        if name in ("Q", "K"):
            return t
        if name in ("Q_bias", "K_bias", "D"):
            return t[h - ch:]
        if name in ("ADT", "DT", "Trap", "angle", "ssm", "k", "v"):
            return t[:, h - ch:].contiguous()                # (b, h, ...)
        return t[:, :, h - ch:].contiguous()                 # (b, l, h, ...): V, Angles, out, gradients
    return dict(inputs=dict(x, chunk_size=SMOKE_MAMBA3_CHUNK if smoke else MAMBA3_CHUNK), elements=b * l * h * p,
                windows=[("", take)])


def _mamba3_big_step(torch, dev, gen, smoke):
    """An ssm state of b·h·p·n = 2^31 + 2^18 float32 elements (the official step test's h = 32,
    p = 64, n = 128, n_ang = 32; 8,193 rows); the four states in, new ones out."""
    sb, sh, sp, sn, sa = (3, 2, 4, 4, 1) if smoke else (8193, 32, 64, 128, 32)
    f = dict(device=dev, generator=gen)
    states = (2 * math.pi * torch.rand(sb, sh, sa, **f), torch.randn(sb, sh, sp, sn, **f), torch.randn(sb, sh, sn, **f),
              torch.randn(sb, sh, sp, **f))
    return states, _mamba3_inputs(torch, dev, gen, sb, None, sh, 1, sp, sn, sa)


def _mamba3_bench_cases(smoke):
    shape, chunk = (SMOKE_MAMBA3_SHAPE, SMOKE_MAMBA3_CHUNK) if smoke else (MAMBA3_SHAPE, MAMBA3_CHUNK)
    sizes = SMOKE_MAMBA3_SIZES if smoke else MAMBA3_SIZES
    return [dict(size, **shape, chunk_size=chunk, dtype="bfloat16") for size in sizes]


def _mamba3_step_cases(smoke):
    return [dict(SMOKE_MAMBA3_SHAPE if smoke else MAMBA3_SHAPE, b=2 if smoke else MAMBA3_STEP_BATCH)]


def _mamba3_dims(case):
    return [case[k] for k in ("b", "h", "h_qk", "p", "n", "n_ang")]


def _mamba3_bench_inputs(torch, dev, gen, case, smoke):
    b, h, h_qk, p, n, n_ang = _mamba3_dims(case)
    l, chunk = case["l"], case["chunk_size"]
    x = dict(_mamba3_inputs(torch, dev, gen, b, l, h, h_qk, p, n, n_ang), chunk_size=chunk)
    gy = torch.randn(b, l, h, p, device=dev, generator=gen).to(torch.bfloat16)
    # the FLOPs are the SSD's: per head, q~ k~^T within chunks and states of (p, n)
    return dict(inputs=x, gy=gy, bytes=(mamba3_forward_bytes(b, l, h, p, n, n_ang, h_qk),
                                        mamba3_backward_bytes(b, l, h, p, n, n_ang, h_qk)),
                flops=ssd_flops(b, l, h, p, n, chunk))


def _mamba3_step_inputs(torch, dev, gen, case, smoke):
    b, h, h_qk, p, n, n_ang = _mamba3_dims(case)
    states = tuple(torch.zeros(b, h, *s, device=dev) for s in ((n_ang,), (p, n), (n,), (p,)))
    return dict(inputs=dict(_mamba3_inputs(torch, dev, gen, b, None, h, h_qk, p, n, n_ang), Input_States=states),
                bytes=mamba3_step_bytes(b, h, p, n, n_ang, h_qk))


# A step that updates one state tensor in place, named state, and takes these arguments per batch row
IN_PLACE_STEP = dict(step_state="state", step_states=("state",), step_batched=("x", "dt", "B", "C", "z"))

# A family: its registry name; key, the prefix of its results in the JSON; title and check_prefix,
# how the table and the check names call it; the suite's option and files, and the smoke run's file
# and -k expression (a quick test of the family's kernels, run with its option); its Triton kernel module
# and public function names; the names of its outputs and of the inputs the big phase differentiates;
# its step's state argument, the names of its states and its arguments with a batch row each;
# the big and bench phases' inputs and cases; its targets: (name, reference, "speedup" or "over", bound),
# read from the bench row matching target_row.
FAMILIES = {
    "selective": dict(
        name="selective", key="", title="Mamba-1", check_prefix="", option="--impl",
        suite=["equivalence/test_values.py", "equivalence/test_invariants.py",
               "equivalence/test_gradients.py", "equivalence/test_triton.py"],
        smoke_tests=("equivalence/test_triton.py", "offset_helpers"),
        kernels="impls.selective.triton", scan="selective_scan", step="selective_state_update",
        return_state="return_last_state", outputs=("y", "state"), leaves=("u", "delta", "z"), **IN_PLACE_STEP,
        big_scan=_selective_big_scan, big_step=_selective_big_step,
        bench_names=("triton", "parallel", "loop"), step_names=("triton", "parallel", "recurrent"),
        bench_cases=_selective_bench_cases, bench_inputs=_selective_bench_inputs,
        step_cases=lambda smoke: [dict(SMOKE_STEP_SIZE if smoke else STEP_SIZE)], step_inputs=_selective_step_inputs,
        tune=_selective_tune,
        label=lambda r: " ".join([f"{k}{r[k]}" for k in ("b", "d", "n", "l") if k in r] + [r[k] for k in ("dtype",) if k in r]),
        target_row=dict(MAIN_SIZE, dtype="float32", op="forward"),
        targets=[("forward_speedup_vs_parallel", "parallel", "speedup", 20.0), ("forward_over_floor", "floor", "over", 2.0)],
        timeouts=dict(big=240, bench=200)),
    "ssd": dict(
        name="ssd", key="ssd_", title="SSD", check_prefix="ssd", option="--ssd-impl",
        suite=["equivalence/test_values.py", "equivalence/test_invariants.py",
               "equivalence/test_gradients.py", "equivalence/ssd/test_step.py", "equivalence/test_triton_ssd.py"],
        smoke_tests=("equivalence/test_triton_ssd.py", "growth"),
        kernels="impls.ssd.triton", scan="ssd_scan", step="ssd_state_update",
        return_state="return_final_states", outputs=("out", "final_states"), leaves=("x", "z"), **IN_PLACE_STEP,
        big_scan=_ssd_big_scan, big_step=_ssd_big_step,
        bench_names=("triton", "chunked", "mamba_ssm"), step_names=("triton", "recurrent", "mamba_ssm"),
        bench_cases=_ssd_bench_cases, bench_inputs=_ssd_bench_inputs,
        step_cases=_ssd_step_cases, step_inputs=_ssd_step_inputs,
        label=lambda r: f"{r['shape']} l{r['l']}" if "l" in r else f"{r['shape']} b{r['b']}",
        target_row=dict(shape="mamba2-2.7b", l=8192, op="forward"),
        targets=[("ssd_forward_speedup_vs_chunked", "chunked", "speedup", 20.0),
                 ("ssd_forward_over_official", "mamba_ssm", "over", 1.5)],
        timeouts=dict(big=240, bench=300)),
    "mamba3": dict(
        name="mamba3", key="mamba3_", title="Mamba-3", check_prefix="mamba3", option="--mamba3-impl",
        suite=["equivalence/test_values.py", "equivalence/test_invariants.py", "equivalence/test_gradients.py",
               "equivalence/test_properties.py", "equivalence/test_varlen.py", "equivalence/mamba3/test_triton.py"],
        smoke_tests=("equivalence/mamba3/test_triton.py", "launch_grids"),
        kernels="impls.mamba3.triton", scan="mamba3_scan", step="mamba3_state_update",
        return_state="return_final_states", outputs=("out", "angle", "ssm", "k", "v"),
        leaves=("V", "ADT", "DT", "Trap", "Angles"), step_state="Input_States", step_states=("angle", "ssm", "k", "v"),
        step_batched=("Q", "K", "V", "ADT", "DT", "Trap", "Angles", "Z"),
        big_scan=_mamba3_big_scan, big_step=_mamba3_big_step,
        bench_names=("triton", "chunked", "mamba_ssm"), step_names=("triton", "recurrent", "mamba_ssm"),
        bench_cases=_mamba3_bench_cases, bench_inputs=_mamba3_bench_inputs,
        step_cases=_mamba3_step_cases, step_inputs=_mamba3_step_inputs,
        label=lambda r: f"b{r['b']} l{r['l']}" if "l" in r else f"b{r['b']}",
        target_row=dict(b=16, l=2048, op="forward"),
        targets=[("mamba3_forward_speedup_vs_chunked", "chunked", "speedup", 20.0),
                 ("mamba3_forward_over_official", "mamba_ssm", "over", 1.5)],
        # the official kernels are timed through their adapter, as the suite calls them
        bench_notes=["mamba_ssm: through impls/adapters/mamba3.py, which returns new tensors: its forward's time "
                     "includes a copy of out (b·l·h·p), its step's a copy of the four states"],
        timeouts=dict(big=240, bench=240)),
}
