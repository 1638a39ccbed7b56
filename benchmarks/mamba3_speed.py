"""Mamba-3 time per token: Mamba3LM (impls/models/mamba3.py) re-forwarding against decoding, against
Mamba2LM, and its prefill against stepping every token.

    python -m benchmarks.mamba3_speed [--L 64 128 ... 2048] [--decode-L 64 1024] [--prefill-L 1024]
                                      [--rounds 9] [--threads 2] [--out results/mamba3_speed.jsonl]

The model (MODEL): d_model 256, 4 layers, vocabulary 256 (the Mamba-2 comparison's small size), the
official Mamba-3 defaults otherwise (d_state 128, headdim 64: 8 heads, rope_fraction 0.5, chunk_size
64), random weights (official initialisation, seed 0), float32, batch 1, on the CPU. What is timed:

    per_token  at each prefix length L, interleaved: "reforward" Mamba3LM.forward over the L tokens
               (LM head on the last only: what generate(mode="reforward") does per token) and
               "recurrent" one Mamba3LM.step from the state of an L-token prefill. The log-log
               slope of each against L (benchmarks.slopes.fit_slope): about 1 for re-forwarding
               (quadratic in total), about 0 for decoding (constant per token).
    decode     one step at position L, Mamba3LM against Mamba2LM of the same d_model and layer
               count (Mamba-2 defaults: d_state 128, headdim 64, d_conv 4), each from its own
               prefill; the ratio mamba3 / mamba2.
    prefill    PREFILL_L tokens into the decode cache: Mamba3LM.prefill (one chunked scan per layer,
               return_final_states) against a fresh cache and one step per token; the ratio
               stepping / prefill (the target: at least 10).

Both sides of each ratio are timed interleaved (benchmarks.common.interleaved) and the ratio is the
median of the per-round ratios with its quartiles (benchmarks.common.paired_ratio): on a shared
machine a ratio of medians taken at different moments is not to be trusted. Each record carries
the 1-minute load average before and after it (os.getloadavg) and the machine info.
"""

import argparse
import os
import time

import torch

from impls.models.mamba2 import Mamba2Config, Mamba2LM
from impls.models.mamba3 import Mamba3Config, Mamba3LM
from .common import append_jsonl, interleaved, machine_info, paired_ratio
from .slopes import fit_slope

MODEL = dict(d_model=256, n_layer=4, vocab_size=256)
PER_TOKEN_L = [64, 128, 256, 512, 1024, 2048]
DECODE_L = [64, 1024]
PREFILL_L = 1024
PREFILL_TARGET = 10.0    # stepping every token / one chunked scan, at least


def build(model=MODEL, ssm_cfg=None, seed=0):
    """(Mamba3LM, Mamba2LM) of the same d_model, layer count, vocabulary and, where ssm_cfg sets them,
    d_state, headdim, ngroups and expand; float32, eval mode."""
    ssm_cfg = dict(ssm_cfg or {})
    shared = {k: v for k, v in ssm_cfg.items() if k in ("d_state", "headdim", "ngroups", "expand")}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m3 = Mamba3LM(Mamba3Config(**model, ssm_cfg={"layer": "Mamba3", **ssm_cfg})).eval()
        m2 = Mamba2LM(Mamba2Config(**model, ssm_cfg={"layer": "Mamba2", **shared})).eval()
    return m3, m2


def prompt(model, L, seed):
    return torch.randint(0, model.config.vocab_size, (1, L), generator=torch.Generator().manual_seed(seed))


def decoding_step(model, L, seed=1):
    """One step at position L from the model's own prefill of an L-token prompt (the cache advances
    at each call: constant time per token, whatever the position)."""
    ids = prompt(model, L, seed)
    _, cache = model.prefill(ids)
    token = ids[:, -1]
    return lambda: model.step(token, cache)


def stepping_prefill(model, ids):
    """The prompt into a fresh cache one step per token (what a model without a chunked scan does)."""
    def run():
        cache = model.new_cache(ids.shape[0])
        for t in range(ids.shape[1]):
            model.step(ids[:, t], cache)
    return run


def record(kind, rounds, res, extra, load_before):
    """A JSON record of an interleaved timing: each side's median and IQR, and the load average."""
    rec = dict(kind=kind, dtype="float32", batch=1, threads=torch.get_num_threads(), rounds=rounds,
               load_before=load_before, load_after=os.getloadavg()[0], **extra)
    for name, r in res.items():
        rec[f"{name}_median_s"], rec[f"{name}_iqr_s"] = r["median_s"], r["iqr_s"]
    return rec


@torch.no_grad()
def per_token_records(m3, lengths, rounds, block_s):
    """Time per token against L, re-forwarding and decoding interleaved at each L, and each fit."""
    records = []
    for L in lengths:
        load = os.getloadavg()[0]
        ids = prompt(m3, L, 3)
        res = interleaved({"reforward": lambda: m3(ids, num_last_tokens=1), "recurrent": decoding_step(m3, L)},
                          rounds=rounds, block_s=block_s)
        ratio = paired_ratio(res["reforward"]["times_s"], res["recurrent"]["times_s"], to="recurrent")
        records.append(record("mamba3_per_token", rounds, res, dict(L=L, ratio=ratio["ratio"],
                                                                     unstable=ratio["unstable"]), load))
        print(f"per token  L={L:5d}  reforward {1e3 * res['reforward']['median_s']:9.3f} ms  recurrent "
              f"{1e3 * res['recurrent']['median_s']:7.3f} ms  (load {load:.2f})", flush=True)
    timed = list(records)
    for mode in ("reforward", "recurrent"):
        fit = fit_slope([r["L"] for r in timed], [r[f"{mode}_median_s"] for r in timed])
        records.append(dict(kind="mamba3_slope", mode=mode, lengths=list(lengths), **fit))
        print(f"slope      {mode:9s} {fit['slope']:.2f} [{fit['ci_low']:.2f}, {fit['ci_high']:.2f}]", flush=True)
    return records


@torch.no_grad()
def paired_record(kind, fns, rounds, block_s, extra, to):
    """Two callables interleaved ({name: fn}, the first over the second); one record with the paired ratio."""
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = interleaved(fns, rounds=rounds, block_s=block_s)
    a, b = list(fns)
    ratio = paired_ratio(res[a]["times_s"], res[b]["times_s"], to=to)
    rec = record(kind, rounds, res, {**extra, **{k: v for k, v in ratio.items() if k != "ratio_pairs"},
                                     "seconds": time.perf_counter() - t0}, load)
    print(f"{kind:15s} {a} {1e3 * res[a]['median_s']:9.3f} ms  {b} {1e3 * res[b]['median_s']:9.3f} ms  "
          f"ratio {ratio['ratio']:.3f} [{ratio['ratio_q1']:.3f}, {ratio['ratio_q3']:.3f}]  (load {load:.2f})"
          + ("  (unstable)" if ratio["unstable"] else ""), flush=True)
    return rec


def main(argv=None, model=MODEL, ssm_cfg=None):
    """Run the three measurements; returns the records (and appends them to --out). ``model`` and
    ``ssm_cfg`` size the models (a test passes a tiny one)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--L", nargs="*", type=int, default=PER_TOKEN_L, help="prefix lengths of the per-token sweep")
    parser.add_argument("--decode-L", nargs="*", type=int, default=DECODE_L)
    parser.add_argument("--prefill-L", type=int, default=PREFILL_L, help="0: no prefill comparison")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--block-s", type=float, default=0.05, help="seconds per block of calls")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="append JSON lines here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    m3, m2 = build(model, ssm_cfg)
    sizes = dict(d_model=model["d_model"], n_layer=model["n_layer"], vocab_size=model["vocab_size"])
    records = per_token_records(m3, args.L, args.rounds, args.block_s) if len(args.L) >= 2 else []
    for L in args.decode_L:
        records.append(paired_record("mamba3_decode", {"mamba3": decoding_step(m3, L), "mamba2": decoding_step(m2, L)},
                                     args.rounds, args.block_s, dict(L=L), to="mamba2"))
    if args.prefill_L:
        ids = prompt(m3, args.prefill_L, 2)
        fns = {"stepping": stepping_prefill(m3, ids), "prefill": lambda: m3.prefill(ids)}
        rec = paired_record("mamba3_prefill", fns,
                            max(3, args.rounds // 2), args.block_s, dict(L=args.prefill_L), to="prefill")
        rec.update(target=PREFILL_TARGET, meets_target=rec["ratio"] >= PREFILL_TARGET)
        records.append(rec)
    machine = machine_info()
    for rec in records:
        rec.update(model=sizes, ssm_cfg=dict(m3.config.ssm_cfg), machine=machine)
        if args.out:
            append_jsonl(args.out, rec)
    return records


if __name__ == "__main__":
    main()
