"""Mamba-2 time per token: our Mamba2LM (impls/models/mamba2.py) against transformers' Mamba2ForCausalLM, side by side.

    python -m benchmarks.model2_speed [--sizes small 130m] [--L 64 1024] [--prefill-L 1024]
                                      [--rounds 15] [--threads 1] [--out results/model2_speed.jsonl]
    python -m benchmarks.model2_speed --slopes [--slope-L 64 128 ... 2048]   # is it recurrent?
    python -m benchmarks.model2_speed --split                               # where a step's time goes

Both models hold the same random weights (official initialisation, seed 0; transformers' gets ours
through impls.models.mamba2.LAYOUT), float32, batch 1, on the CPU (transformers' pure-PyTorch path: no
mamba_ssm or causal_conv1d kernels here). Sizes (MODELS):
    small  d_model 256, 4 layers, vocabulary 256 (as the Mamba-1 peer comparison's small model)
    130m   mamba2-130m's config.json: d_model 768, 24 layers, vocabulary 50,277 padded to 50,288;
           Mamba-2 defaults d_state 128, headdim 64 (24 heads), ngroups 1, d_conv 4, chunk_size 256
What is timed:
    decode   one recurrent step at position L: ours ``Mamba2LM.step`` (impls.ssd_state_update through
             ``--step-impl``) against transformers' cached call ``model(token, cache=..., use_cache=True)``,
             each from the state of its own prefill of the same L-token prompt
    prefill  the PREFILL_L-token prompt into the decode cache: ours ``Mamba2LM.prefill`` (one
             impls.ssd_scan per layer through ``--scan-impl``) against transformers'
             ``model(ids, use_cache=True, logits_to_keep=1)`` (the LM head on the last position
             only, as its generate does)
The two sides of each ratio are timed interleaved (benchmarks.common.interleaved: blocks of calls
in rotated order, round after round) and the ratio is the median of the per-round ratios, with its
quartiles (benchmarks.common.paired_ratio): on this shared 2-core machine a ratio of medians taken
at different moments is not to be trusted (docs/benchmarks.md).

Each record (JSON lines, one per (what, size, L)) carries both medians, the ratio and its quartiles,
the thread count and machine info. Targets (docs/figures.md): decode <= 0.5x at small, <= 0.7x at 130m;
prefill of 1024 tokens <= 0.7x.

--slopes: time per token against L, log-log slope (benchmarks.slopes.fit_slope; 1 = re-forwarding,
quadratic in total; 0 = constant per token), as the Mamba-1 sweep has them:
    scan level, one layer at mamba2-130m's shape (SCAN: b 1, h 24, p 64, n 128, g 1, chunk_size 256):
        reforward  impls.ssd_scan over the L tokens so far (--scan-impl); recurrent  one
        impls.ssd_state_update (--step-impl) from the state of an L-token prefill
    model level, the small model: reforward  Mamba2LM.forward over L tokens (LM head on the last
        only); recurrent  Mamba2LM.step after a prefill of L tokens
--split: where a fused decoding step's time goes (each part of Mamba2LM's fused step, timed alone
    over all layers on the cache's own buffers, against the whole step), at each size.

It is also a sweep module for benchmarks/runner.py (``points(size, names)``, ``measure(point)``,
``group(point)``): one point per (what, size, L) of the comparison, per slope level/mode and per
decode split size; "quick" runs the small model only.
"""

import argparse
import json
import time

import torch

from impls.models.mamba2 import LAYOUT, Mamba2Config, Mamba2LM
import impls
from .common import append_jsonl, interleaved, machine_info, paired_ratio, time_call
from .slopes import fit_slope

MODELS = {"small": dict(d_model=256, n_layer=4, vocab_size=256),
          "130m": dict(d_model=768, n_layer=24, vocab_size=50277, pad_vocab_size_multiple=16)}
PREFILL_L = 1024
SCAN = dict(b=1, h=24, p=64, n=128, g=1, chunk_size=256)   # one mamba2-130m layer
SLOPE_L = [64, 128, 256, 512, 1024, 2048]
TARGETS = {("decode", "small"): 0.5, ("decode", "130m"): 0.7, ("prefill", "small"): 0.7, ("prefill", "130m"): 0.7}


def build(size, seed=0):
    """(our Mamba2LM, transformers' Mamba2ForCausalLM with the same weights), float32, eval mode."""
    from transformers import Mamba2Config as HFConfig, Mamba2ForCausalLM

    torch.manual_seed(seed)
    ours = Mamba2LM(Mamba2Config(**MODELS[size], ssm_cfg={"layer": "Mamba2"})).eval()
    cfg = {k: v for k, v in ours.config.to_transformers_dict().items() if k not in ("model_type", "architectures")}
    peer = Mamba2ForCausalLM(HFConfig(**cfg, pad_token_id=None, bos_token_id=None, eos_token_id=None)).eval()
    missing, unexpected = peer.load_state_dict({LAYOUT["weights"].get(k, k): v for k, v in ours.state_dict().items()},
                                               strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weights did not map: missing {missing}, unexpected {unexpected}")
    return ours, peer


@torch.no_grad()
def decode_pair(ours, peer, L, step_impl, scan_impl):
    """Two callables, each one decoding step at position L from its own prefill of the same prompt."""
    ids = torch.randint(0, ours.config.vocab_size, (1, L), generator=torch.Generator().manual_seed(1))
    _, cache = ours.prefill(ids, impl=scan_impl)
    out = peer(ids, use_cache=True, logits_to_keep=1)
    hf_cache, token = out.cache, ids[:, -1]

    def ours_step():
        with torch.no_grad():
            ours.step(token, cache, impl=step_impl)

    def peer_step():
        with torch.no_grad():
            peer(token[:, None], cache=hf_cache, use_cache=True)

    return ours_step, peer_step


def prefill_pair(ours, peer, L, scan_impl):
    ids = torch.randint(0, ours.config.vocab_size, (1, L), generator=torch.Generator().manual_seed(2))

    def ours_prefill():
        with torch.no_grad():
            ours.prefill(ids, impl=scan_impl)

    def peer_prefill():
        with torch.no_grad():
            peer(ids, use_cache=True, logits_to_keep=1)

    return ours_prefill, peer_prefill


def measure_pair(what, size, L, fns, rounds, block_s, threads, extra):
    """Time the pair (ours, transformers') interleaved; one record with both medians and the paired ratio."""
    t0 = time.perf_counter()
    res = interleaved({"ours": fns[0], "transformers": fns[1]}, rounds=rounds, block_s=block_s)
    ratio = paired_ratio(res["ours"]["times_s"], res["transformers"]["times_s"], to="transformers")
    target = TARGETS.get((what, size))
    rec = dict(kind="model2_speed", what=what, size=size, L=L, dtype="float32", batch=1, threads=threads,
               ours_median_s=res["ours"]["median_s"], transformers_median_s=res["transformers"]["median_s"],
               ours_iqr_s=res["ours"]["iqr_s"], transformers_iqr_s=res["transformers"]["iqr_s"],
               rounds=rounds, target=target, meets_target=None if target is None else ratio["ratio"] <= target,
               seconds=time.perf_counter() - t0, **{k: v for k, v in ratio.items() if k != "ratio_pairs"}, **extra)
    print(f"{what:8s} {size:6s} L={L:5d}  ours {1e3 * rec['ours_median_s']:8.2f} ms  transformers "
          f"{1e3 * rec['transformers_median_s']:8.2f} ms  ratio {ratio['ratio']:.3f} [{ratio['ratio_q1']:.3f}, "
          f"{ratio['ratio_q3']:.3f}]" + ("" if target is None else f"  target <= {target}") +
          ("  (unstable)" if ratio["unstable"] else ""), flush=True)
    return rec


def scan_inputs(L, seed=0):
    """ssd_scan arguments at SCAN's shape, Mamba-2's initialisation: A = -U(1, 16), dt in [1e-3, 0.1]
    through dt_bias (softplus on), D (h,), no z (the model gates in its norm)."""
    g = torch.Generator().manual_seed(seed)
    b, h, p, n, G = SCAN["b"], SCAN["h"], SCAN["p"], SCAN["n"], SCAN["g"]
    dt = torch.exp(torch.rand(h, generator=g) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                   + torch.log(torch.tensor(1e-3)))
    return dict(x=torch.randn(b, L, h, p, generator=g), dt=0.1 * torch.randn(b, L, h, generator=g),
                A=-(1 + 15 * torch.rand(h, generator=g)), B=torch.randn(b, L, G, n, generator=g),
                C=torch.randn(b, L, G, n, generator=g), D=torch.ones(h), dt_bias=dt + torch.log(-torch.expm1(-dt)))


@torch.no_grad()
def slope_records(lengths, step_impl, scan_impl, min_run_s=0.3):
    """Time per token against L at the scan and model levels (see the module docstring), with fits."""
    records = []
    model = build("small")[0]
    for L in lengths:
        a = scan_inputs(L)
        kw = dict(D=a["D"], dt_bias=a["dt_bias"], dt_softplus=True)
        _, state = impls.ssd_scan(a["x"], a["dt"], a["A"], a["B"], a["C"], SCAN["chunk_size"], return_final_states=True,
                                  impl=scan_impl, **kw)
        t = L - 1
        args = (a["x"][:, t].contiguous(), a["dt"][:, t].contiguous(), a["A"], a["B"][:, t].contiguous(),
                a["C"][:, t].contiguous())
        ids = torch.randint(0, model.config.vocab_size, (1, L), generator=torch.Generator().manual_seed(3))
        _, cache = model.prefill(ids, impl=scan_impl)
        fns = {("scan", "reforward"): lambda: impls.ssd_scan(a["x"], a["dt"], a["A"], a["B"], a["C"], SCAN["chunk_size"],
                                                               impl=scan_impl, **kw),
               ("scan", "recurrent"): lambda: impls.ssd_state_update(state, *args, impl=step_impl, **kw),
               ("model", "reforward"): lambda: model(ids, impl=scan_impl, num_last_tokens=1),
               ("model", "recurrent"): lambda: model.step(ids[:, -1], cache, impl=step_impl)}
        for (level, mode), fn in fns.items():
            r = time_call(fn, min_run_time=min_run_s)
            records.append(dict(kind="model2_per_token", level=level, mode=mode, L=L, median_s=r["median_s"],
                                iqr_s=r["iqr_s"], runs=r["runs"], impl=scan_impl if mode == "reforward" else step_impl))
            print(f"per token  {level:5s} {mode:9s} L={L:5d}  {1e3 * r['median_s']:9.3f} ms", flush=True)
    for level in ("scan", "model"):
        for mode in ("reforward", "recurrent"):
            rs = [r for r in records if r["level"] == level and r["mode"] == mode]
            fit = fit_slope([r["L"] for r in rs], [r["median_s"] for r in rs])
            records.append(dict(kind="model2_slope", level=level, mode=mode, lengths=[r["L"] for r in rs], **fit))
            print(f"slope      {level:5s} {mode:9s} {fit['slope']:.2f} [{fit['ci_low']:.2f}, {fit['ci_high']:.2f}]",
                  flush=True)
    return records


@torch.no_grad()
def split_records(size, L=256, step_impl="recurrent", scan_impl="chunked", min_run_s=0.3):
    """Each part of the fused decoding step, over all layers, timed alone on the cache's buffers, and
    the whole step; shares of the whole."""
    model = build(size)[0]
    ids = torch.randint(0, model.config.vocab_size, (1, L), generator=torch.Generator().manual_seed(4))
    _, cache = model.prefill(ids, impl=scan_impl)
    token = ids[:, -1]
    model.step(token, cache, impl=step_impl)            # the first step passes the front door
    step_fn = cache.checked[step_impl]
    layers = list(zip(model.backbone.layers, cache.layers))
    stream, phase = cache.stream, cache.phase
    xs = [(t.reshape(shape) for t, shape in (c.x, c.B, c.C)) for _, c in layers]
    xs = [tuple(x) for x in xs]

    def embed():
        torch.index_select(model.backbone.embedding.weight, 0, token, out=stream.residual)

    def norms():
        for blk, _ in layers:
            stream.normalize(blk.norm.weight, cache.eps)

    def in_proj():
        for blk, c in layers:
            torch.mm(stream.normed, blk.mixer.in_proj.weight.t(), out=c.zxbcdt)

    def conv():
        for _, c in layers:
            c.conv_slots[phase].copy_(c.xBC_t)
            torch.bmm(c.conv_store, c.conv_taps[phase], out=c.conv_out)
            torch.nn.functional.silu(c.conv_out, inplace=True)

    ys = [None] * len(layers)

    def ssd_step():
        for i, (blk, c) in enumerate(layers):
            x, B, C = xs[i]
            ys[i] = step_fn(c.ssm_state, x, c.dt, c.A, B, C, c.D, None, c.dt_bias, True, blk.mixer.dt_limit)

    ssd_step()

    def gated_norm():
        for i, (blk, c) in enumerate(layers):
            blk.mixer.gated_norm_(ys[i].reshape(1, -1), c)

    def out_proj():
        for i, (blk, c) in enumerate(layers):
            stream.residual.addmm_(ys[i].reshape(1, -1), blk.mixer.out_proj.weight.t())

    def head():
        torch.mm(stream.normalize(model.backbone.norm_f.weight, cache.eps), model.lm_head.weight.t())

    parts = dict(embedding=embed, block_norms=norms, in_proj=in_proj, conv=conv, ssd_step=ssd_step,
                 gated_norm=gated_norm, out_proj=out_proj, final_norm_and_lm_head=head)
    whole = time_call(lambda: model.step(token, cache, impl=step_impl), min_run_time=min_run_s)["median_s"]
    times = {k: time_call(fn, min_run_time=min_run_s)["median_s"] for k, fn in parts.items()}
    total = sum(times.values())
    records = [dict(kind="model2_decode_split", size=size, L=L, part=k, median_s=v, share=v / total,
                    step_median_s=whole) for k, v in times.items()]
    print(f"decode split {size}: step {1e3 * whole:.3f} ms, parts sum {1e3 * total:.3f} ms: " +
          ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in times.items()), flush=True)
    return records


# ------------------------------------------------------- Mamba-2 rows of the time-per-token sweep

# benchmarks/time_per_token.py adds these points (per_token_points) and measures their groups here
# (per_token_group), so its report draws and fits them like the Mamba-1 levels: "ssd_scan" (one
# mamba2-130m layer's SSD scan, SCAN) and "model2" (a small Mamba2LM, MODEL2).
MODEL2 = dict(d_model=128, n_layer=2, vocab_size=256)   # Mamba-2 defaults inside: d_state 128, headdim 64 (h 4)
LEVELS = ("ssd_scan", "model2")
PER_TOKEN_L = {"quick": [64, 128, 256, 512], "default": [64, 128, 256, 512, 1024], "long": [64, 256, 1024, 4096, 16384]}
_small2 = {}


def small_model():
    """The level "model2" Mamba2LM (MODEL2, official initialisation, seed 0), float32, eval mode; built once."""
    if "model" not in _small2:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            _small2["model"] = Mamba2LM(Mamba2Config(**MODEL2, ssm_cfg={"layer": "Mamba2"})).eval()
    return _small2["model"]


def per_token_points(size, threads=1):
    """Re-forward (``chunked``) and recurrent (``recurrent``, prefilled by ``chunked``) time per token
    at each L, at both Mamba-2 levels, as time_per_token's "per_token" points."""
    out = []
    for level, shape in (("ssd_scan", {k: v for k, v in SCAN.items()}), ("model2", dict(model=MODEL2))):
        for L in PER_TOKEN_L[size]:
            common = dict(kind="per_token", level=level, L=L, dtype="float32", threads=threads, **shape)
            out += [dict(common, mode="reforward", impl="chunked"),
                    dict(common, mode="recurrent", impl="recurrent", prefill_impl="chunked")]
    return out


@torch.no_grad()
def per_token_group(point, members, timed_group):
    """Time one (level, L) group's members ({(mode, impl)}) with time_per_token's timed_group(calls,
    reference): the recurrent step is the reference of the ratios, as for Mamba-1."""
    L, pre = point["L"], point.get("prefill_impl") or "chunked"
    calls = {}
    if point["level"] == "ssd_scan":
        a = scan_inputs(L + 1)
        kw = dict(D=a["D"], dt_bias=a["dt_bias"], dt_softplus=True)
        prefix = {k: a[k][:, :L] for k in ("x", "dt", "B", "C")}
        token = [a[k][:, L].contiguous() for k in ("x", "dt")] + [a["A"]] + [a[k][:, L].contiguous() for k in ("B", "C")]
        for mode, impl in members:
            if mode == "reforward":
                calls[(mode, impl)] = lambda impl=impl: impls.ssd_scan(prefix["x"], prefix["dt"], a["A"], prefix["B"],
                                                                       prefix["C"], SCAN["chunk_size"], impl=impl, **kw)
            else:
                _, state = impls.ssd_scan(prefix["x"], prefix["dt"], a["A"], prefix["B"], prefix["C"], SCAN["chunk_size"],
                                          return_final_states=True, impl=pre, **kw)
                calls[(mode, impl)] = lambda impl=impl, s=state: impls.ssd_state_update(s, *token, impl=impl, **kw)
    else:
        model = small_model()
        ids = torch.randint(0, model.config.vocab_size, (1, L), generator=torch.Generator().manual_seed(1))
        for mode, impl in members:
            if mode == "reforward":
                calls[(mode, impl)] = lambda impl=impl: model(ids, impl=impl, num_last_tokens=1)[:, -1].argmax(-1)
            else:
                logits, cache = model.prefill(ids, impl=pre)
                calls[(mode, impl)] = lambda impl=impl, c=cache, t=logits.argmax(-1): model.step(t, c, impl=impl).argmax(-1)
    return timed_group(calls, next((m for m in members if m[0] == "recurrent"), None))


# ------------------------------------------------------------------------------ as a runner sweep

SWEEP_SIZES = {"quick": ["small"], "default": ["small", "130m"], "long": ["small", "130m"]}
SWEEP_L = {"quick": [64], "default": [64, 1024], "long": [64, 1024, 4096]}
SWEEP_SLOPE_L = {"quick": [64, 128, 256], "default": SLOPE_L, "long": SLOPE_L + [4096]}
_built = {}


def points(size, names=None):
    """The sweep's points (names: SSD implementation names; the step and scan used are "recurrent" and
    "chunked" unless named)."""
    names = list(names or [])
    step_impl = next((n for n in names if impls.get(n, "ssd").step is not None), "recurrent")
    scan_impl = next((n for n in names if n != step_impl), "chunked")
    common = dict(step_impl=step_impl, scan_impl=scan_impl, dtype="float32", batch=1, threads=1)
    out = []
    for name in SWEEP_SIZES[size]:
        out += [dict(kind="model2_vs_transformers", what="decode", size=name, L=L, **common) for L in SWEEP_L[size]]
        out.append(dict(kind="model2_vs_transformers", what="prefill", size=name, L=PREFILL_L, **common))
        out.append(dict(kind="model2_decode_split", size=name, L=256, **common))
    out.append(dict(kind="model2_slopes", lengths=SWEEP_SLOPE_L[size], **common))
    return out


def group(point):
    return json.dumps(point, sort_keys=True)


def measure(point):
    torch.set_num_threads(point["threads"])
    import transformers

    transformers.logging.set_verbosity_error()
    if point["kind"] == "model2_slopes":
        recs = slope_records(point["lengths"], point["step_impl"], point["scan_impl"])
        return dict(per_token=[r for r in recs if r["kind"] == "model2_per_token"],
                    slopes=[r for r in recs if r["kind"] == "model2_slope"])
    if point["kind"] == "model2_decode_split":
        recs = split_records(point["size"], point["L"], point["step_impl"], point["scan_impl"])
        return dict(step_median_s=recs[0]["step_median_s"], parts={r["part"]: r["median_s"] for r in recs})
    if point["size"] not in _built:
        _built.clear()
        _built[point["size"]] = build(point["size"])
    ours, peer = _built[point["size"]]
    if point["what"] == "decode":
        fns, rounds = decode_pair(ours, peer, point["L"], point["step_impl"], point["scan_impl"]), 15
    else:
        fns, rounds = prefill_pair(ours, peer, point["L"], point["scan_impl"]), 7
    rec = measure_pair(point["what"], point["size"], point["L"], fns, rounds, 0.1, point["threads"], {})
    return {k: v for k, v in rec.items() if k not in point}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--L", nargs="*", type=int, default=[64, 1024], help="decode positions (none: prefill only)")
    parser.add_argument("--prefill-L", type=int, default=PREFILL_L)
    parser.add_argument("--no-prefill", action="store_true")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--block-s", type=float, default=0.1, help="seconds per block of calls")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--step-impl", default="recurrent")
    parser.add_argument("--scan-impl", default="chunked")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--slopes", action="store_true", help="time per token against L, and slopes, instead")
    parser.add_argument("--slope-L", nargs="+", type=int, default=SLOPE_L)
    parser.add_argument("--split", action="store_true", help="the decode cost split, instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    extra = dict(step_impl=args.step_impl, scan_impl=args.scan_impl, transformers_version=transformers.__version__,
                 machine=machine_info())
    records = []
    if args.slopes or args.split:
        if args.slopes:
            records += slope_records(args.slope_L, args.step_impl, args.scan_impl)
        if args.split:
            for size in args.sizes:
                records += split_records(size, step_impl=args.step_impl, scan_impl=args.scan_impl)
        for rec in records:
            rec.update(threads=args.threads, dtype="float32", batch=1, **extra)
            if args.out:
                append_jsonl(args.out, rec)
        return records
    for size in args.sizes:
        ours, peer = build(size)
        for L in args.L:
            records.append(measure_pair("decode", size, L, decode_pair(ours, peer, L, args.step_impl, args.scan_impl),
                                   args.rounds, args.block_s, args.threads, extra))
        if not args.no_prefill:
            records.append(measure_pair("prefill", size, args.prefill_L, prefill_pair(ours, peer, args.prefill_L, args.scan_impl),
                                   max(5, args.rounds // 2), args.block_s, args.threads, extra))
        del ours, peer
    if args.out:
        for rec in records:
            append_jsonl(args.out, rec)
    return records


if __name__ == "__main__":
    main()
