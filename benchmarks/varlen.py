"""Packed against padded: one call over nseq sequences laid end to end (cu_seqlens, b = 1) against
one call over the same sequences padded to the longest (b = nseq), for Mamba-1 ``selective_scan``
(--family selective) or Mamba-2 ``ssd_scan`` (--family ssd).

    python -m benchmarks.varlen [--family selective|ssd] [--impl parallel|chunked] [--nseq 64]
                                [--d 64] [--n 16] [--headdim 16] [--chunk-size 64] [--seed 0]
                                [--rounds 7] [--threads 1] [--out results/varlen.jsonl]

For the SSD, d = h * headdim channels (h = d / headdim heads, one group of B and C), chunk_size
64, Mamba-2's initialisation (A = -U(1, 16) per head, dt log-uniform in [1e-3, 0.1]); the padded
call pads with x = 0 and dt = -inf before softplus (dt = 0 after it and the clamp), the same
exact no-op step as Mamba-1's delta = -inf.

Lengths are log-uniform between 16 and 4096 (scipy.stats.loguniform): long-tailed, most sequences
short, a few near 4096, so padding to the longest multiplies the work several times. The padded
call pads on the right with delta = -inf: softplus(-inf) = 0, so a padded step has dt = 0 (decay 1,
no input) and every row's last state is its sequence's last state, exactly. Both calls therefore
compute the same answer, and the run checks that they agree before it times them.

Time: the two calls interleaved (benchmarks.common.interleaved: rounds, order alternated), and
the speed-up is the median over rounds of the per-round ratio padded / packed of this process's CPU
time (benchmarks.common.paired_ratio), with its quartiles. Peak memory: each call once in a fresh
process (so neither inherits the other's freed pages or parallel's reused buffers), the peak
resident bytes while it runs above the resident bytes just before (inputs already allocated); on a
GPU, torch.cuda.max_memory_allocated above the allocated bytes before. One JSON line per run.

One thread by default: on this shared 2-core machine a second OpenMP thread waiting for a
descheduled one made even the CPU-time ratio swing threefold from round to round.
"""

import argparse
import json
import multiprocessing
import os
import sys

import numpy as np
import scipy.stats
import torch

import impls

from .common import append_jsonl, code_state, interleaved, machine_info, paired_ratio, peak_rss_during

MIN_LEN, MAX_LEN = 16, 4096


def draw_lengths(nseq, seed):
    """nseq lengths, log-uniform in [MIN_LEN, MAX_LEN], as a list of ints."""
    x = scipy.stats.loguniform(MIN_LEN, MAX_LEN).rvs(nseq, random_state=seed)
    return [int(v) for v in np.clip(np.round(x), MIN_LEN, MAX_LEN)]


def make_inputs(lengths, d, n, seed, device="cpu"):
    """(packed, padded): selective_scan keyword arguments for the same sequences.

    packed: u, delta, z (1, d, L), B, C (1, n, L) with L = sum(lengths), cu_seqlens (nseq + 1,);
    padded: u, delta, z (nseq, d, Lmax), B, C (nseq, n, Lmax), delta = -inf past each length.
    Shared: A (d, n) = -(1..n) per channel, D and delta_bias (d,), delta_softplus; Mamba's
    initialisation (dt log-uniform in [1e-3, 0.1]), float32."""
    gen = torch.Generator().manual_seed(seed)
    L, Lmax, nseq = sum(lengths), max(lengths), len(lengths)
    dt = torch.exp(np.log(1e-3) + (np.log(0.1) - np.log(1e-3)) * torch.rand(1, d, L, generator=gen))
    packed = dict(u=torch.randn(1, d, L, generator=gen), delta=torch.log(torch.expm1(dt)),
                  B=torch.randn(1, n, L, generator=gen), C=torch.randn(1, n, L, generator=gen),
                  z=torch.randn(1, d, L, generator=gen))
    shared = dict(A=-torch.arange(1, n + 1, dtype=torch.float32).expand(d, n).contiguous(), D=torch.ones(d),
                  delta_bias=torch.zeros(d), delta_softplus=True)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    padded = {k: torch.zeros(nseq, v.shape[1], Lmax) for k, v in packed.items()}
    padded["delta"].fill_(float("-inf"))                  # softplus(-inf) = 0: a padded step changes nothing
    for i, (a, e) in enumerate(zip(offsets, offsets[1:])):
        for k, v in packed.items():
            padded[k][i, :, :e - a] = v[0, :, a:e]
    packed["cu_seqlens"] = torch.tensor(offsets, dtype=torch.int32)
    move = lambda x: {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in x.items()}  # noqa: E731
    return move({**packed, **shared}), move({**padded, **shared})


def make_ssd_inputs(lengths, d, n, seed, device="cpu", headdim=16, chunk_size=64):
    """(packed, padded): ssd_scan keyword arguments for the same sequences, h = d // headdim heads.

    packed: x, z (1, L, h, p), dt (1, L, h), B, C (1, L, 1, n), cu_seqlens (nseq + 1,);
    padded: the same with b = nseq and time Lmax, x = 0 and dt = -inf past each length.
    Shared: A (h,), D and dt_bias (h,), dt_softplus, chunk_size; float32."""
    if d % headdim:
        raise ValueError(f"--d {d} must be a multiple of --headdim {headdim}")
    gen = torch.Generator().manual_seed(seed)
    h, p = d // headdim, headdim
    L, Lmax, nseq = sum(lengths), max(lengths), len(lengths)
    dt = torch.exp(np.log(1e-3) + (np.log(0.1) - np.log(1e-3)) * torch.rand(1, L, h, generator=gen))
    packed = dict(x=torch.randn(1, L, h, p, generator=gen), dt=torch.log(torch.expm1(dt)),
                  B=torch.randn(1, L, 1, n, generator=gen), C=torch.randn(1, L, 1, n, generator=gen),
                  z=torch.randn(1, L, h, p, generator=gen))
    shared = dict(A=-(1 + 15 * torch.rand(h, generator=gen)), D=torch.ones(h), dt_bias=torch.zeros(h),
                  dt_softplus=True, chunk_size=chunk_size)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    padded = {k: torch.zeros(nseq, Lmax, *v.shape[2:]) for k, v in packed.items()}
    padded["dt"].fill_(float("-inf"))                     # softplus(-inf) = 0: a padded step changes nothing
    for i, (a, e) in enumerate(zip(offsets, offsets[1:])):
        for k, v in packed.items():
            padded[k][i, :e - a] = v[0, a:e]
    packed["cu_seqlens"] = torch.tensor(offsets, dtype=torch.int32)
    move = lambda x: {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in x.items()}  # noqa: E731
    return move({**packed, **shared}), move({**padded, **shared})


def _scan(family, impl, x):
    """(y with time last, last states) of one call of ``family``'s public scan."""
    if family == "ssd":
        y, s = impls.ssd_scan(**x, return_final_states=True, impl=impl)
        return y.flatten(2).transpose(1, 2), s
    return impls.selective_scan(**x, return_last_state=True, impl=impl)


def _inputs(family, lengths, d, n, seed, device, headdim, chunk_size):
    if family == "ssd":
        return make_ssd_inputs(lengths, d, n, seed, device, headdim, chunk_size)
    return make_inputs(lengths, d, n, seed, device)


def agree(impl, packed, padded, family="selective"):
    """The largest |difference| between the packed and the padded call's outputs and last states,
    relative to the largest |output|: the two layouts must compute the same answer."""
    y1, s1 = _scan(family, impl, packed)
    y2, s2 = _scan(family, impl, padded)
    offsets = packed["cu_seqlens"].tolist()
    pairs = enumerate(zip(offsets, offsets[1:]))
    err = max([float((y1[0, :, a:e] - y2[i, :, :e - a]).abs().max()) for i, (a, e) in pairs]
              + [float((s1 - s2).abs().max())])
    return err / max(float(y1.abs().max()), float(s1.abs().max()), 1e-30)


def _memory_child(args, side, queue):
    torch.set_num_threads(args["threads"])
    packed, padded = _inputs(args["family"], args["lengths"], args["d"], args["n"], args["seed"], args["device"],
                             args["headdim"], args["chunk_size"])
    x = packed if side == "packed" else padded
    if args["device"] == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _scan(args["family"], args["impl"], x)
        torch.cuda.synchronize()
        queue.put(dict(peak_added_bytes=torch.cuda.max_memory_allocated() - before, kind="cuda allocated"))
        return
    _, peak, before = peak_rss_during(lambda: _scan(args["family"], args["impl"], x))
    queue.put(dict(peak_added_bytes=peak - before, kind="resident (RSS)"))


def peak_memory(args, side):
    """Peak memory added by one call of ``side`` ("packed" or "padded"), measured in a fresh process."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_child, args=(args, side, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"the {side} memory measurement failed (exit code {proc.exitcode})")
    return queue.get(timeout=10)


def run(impl="parallel", nseq=64, d=64, n=16, seed=0, rounds=7, threads=1, device="cpu", out=None, log=print,
        memory=True, family="selective", headdim=16, chunk_size=64):
    """Measure one point; returns the record (and appends it to ``out`` as a JSON line when given).
    memory=False skips the peak-memory measurement (two fresh processes). family: "selective"
    (Mamba-1) or "ssd" (Mamba-2, with headdim and chunk_size)."""
    torch.set_num_threads(threads)
    lengths = draw_lengths(nseq, seed)
    packed, padded = _inputs(family, lengths, d, n, seed, device, headdim, chunk_size)
    L, Lmax = sum(lengths), max(lengths)
    ssd = f", headdim={headdim}, chunk_size={chunk_size}" if family == "ssd" else ""
    log(f"varlen ({family}{ssd}): {impl}, {nseq} sequences, lengths {min(lengths)}..{Lmax} "
        f"(median {int(np.median(lengths))}), "
        f"{L} tokens packed, {nseq * Lmax} padded; d={d}, n={n}, {threads} threads, {device}")
    disagreement = agree(impl, packed, padded, family)
    if not disagreement < 1e-4:
        raise RuntimeError(f"packed and padded calls disagree: relative difference {disagreement:.3g}")
    log(f"  packed and padded agree to {disagreement:.2g} (relative); timing {rounds} interleaved rounds ...")

    def call(x):
        def fn():
            _scan(family, impl, x)
            if device == "cuda":
                torch.cuda.synchronize()
        return fn

    t = interleaved({"packed": call(packed), "padded": call(padded)}, rounds=rounds, block_s=0.0)
    speedup = paired_ratio(t["padded"]["cpu_s"], t["packed"]["cpu_s"], to="packed")
    log(f"  packed {t['packed']['median_s'] * 1e3:.1f} ms, padded {t['padded']['median_s'] * 1e3:.1f} ms (median "
        f"wall); speed-up {speedup['ratio']:.2f}x [{speedup['ratio_q1']:.2f}, {speedup['ratio_q3']:.2f}]"
        f"{' UNSTABLE' if speedup['unstable'] else ''}; measuring peak memory in fresh processes ...")
    margs = dict(impl=impl, lengths=lengths, d=d, n=n, seed=seed, threads=threads, device=device, family=family,
                 headdim=headdim, chunk_size=chunk_size)
    mem = {side: (peak_memory(margs, side) if memory else dict(peak_added_bytes=None, kind="not measured"))
           for side in ("packed", "padded")}
    input_bytes = {side: sum(v.numel() * v.element_size() for k, v in x.items()
                             if isinstance(v, torch.Tensor) and k != "cu_seqlens")
                   for side, x in (("packed", packed), ("padded", padded))}
    if memory:
        log(f"  peak memory added: packed {mem['packed']['peak_added_bytes'] / 2**20:.1f} MiB, "
            f"padded {mem['padded']['peak_added_bytes'] / 2**20:.1f} MiB; inputs {input_bytes['packed'] / 2**20:.1f} "
            f"vs {input_bytes['padded'] / 2**20:.1f} MiB")
    record = dict(benchmark="varlen", family=family, impl=impl, nseq=nseq, d=d, n=n, seed=seed, threads=threads,
                  device=device,
                  **(dict(headdim=headdim, chunk_size=chunk_size) if family == "ssd" else {}),
                  lengths=lengths, packed_tokens=L, padded_tokens=nseq * Lmax, disagreement=disagreement,
                  packed={k: t["packed"][k] for k in ("median_s", "iqr_s", "cpu_median_s", "times_s", "cpu_s")}
                  | dict(input_bytes=input_bytes["packed"], **mem["packed"]),
                  padded={k: t["padded"][k] for k in ("median_s", "iqr_s", "cpu_median_s", "times_s", "cpu_s")}
                  | dict(input_bytes=input_bytes["padded"], **mem["padded"]),
                  speedup=speedup, machine=machine_info(), **code_state())
    if out:
        append_jsonl(out, record)
        log(f"  appended to {out}")
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.varlen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="selective", choices=("selective", "ssd"),
                        help="selective (Mamba-1 selective_scan) or ssd (Mamba-2 ssd_scan)")
    parser.add_argument("--impl", default=None,
                        help="a registered implementation of the family with varlen (default parallel; ssd: chunked)")
    parser.add_argument("--nseq", type=int, default=64)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--headdim", type=int, default=16, help="ssd: channels per head (h = d / headdim)")
    parser.add_argument("--chunk-size", type=int, default=64, help="ssd: chunk_size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join("results", "varlen.jsonl"))
    args = parser.parse_args(argv)
    args.impl = args.impl or ("chunked" if args.family == "ssd" else "parallel")
    names = impls.names(args.family)
    if args.impl not in names or not impls.get(args.impl, args.family).supports["varlen"]:
        parser.error(f"--impl {args.impl}: not a registered {args.family} implementation with varlen "
                     f"({', '.join(n for n in names if impls.get(n, args.family).supports['varlen'])})")
    record = run(args.impl, args.nseq, args.d, args.n, args.seed, args.rounds, args.threads, args.device, args.out,
                 family=args.family, headdim=args.headdim, chunk_size=args.chunk_size)
    json.dump({k: record[k] for k in ("family", "impl", "packed_tokens", "padded_tokens", "speedup")}, sys.stdout,
              default=str)
    print()


if __name__ == "__main__":
    main()
