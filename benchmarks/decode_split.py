"""Where a decoding step's time goes: the per-token cost of MambaLM.step split into its parts.

A sweep module for benchmarks/runner.py (``points(size, impls)``, ``measure(point)``):

    python -m benchmarks.runner --sweep decode_split [--quick | --long] [--impl NAME ...] --out FILE

``decode_split(model, cache, token, impl)`` runs a traced copy of ``MambaLM.step``: the very calls
the step makes (impls/models/mamba.py: the fused step's ``LayerDecode`` methods for float32/float64 RMSNorm
models, ``MambaMixer.step_*`` for the others), in the same order, on the real decoding state, with a
clock read between parts. Per token (all layers together):

    projections  in_proj, x_proj + dt_proj (``project``), out_proj with the residual add, LM head
                 (also separately: in_proj_s, x_dt_proj_s, out_proj_s, lm_head_s)
    conv         the rolling conv buffer write, the k-tap conv, its bias, SiLU (``step_conv``)
    scan_step    the step implementation (``LayerDecode.scan``; ``step_scan`` through
                 impls.selective_state_update, its argument checks included, on the module path;
                 the fused step checks its fixed buffers at its first call only)
                 (front_door_isolated_s: those checks alone, every layer's, timed on their own)
    norm         the n_layer RMSNorms and norm_f
    overhead     the traced step's time minus the parts: the embedding, the step's own Python
                 (the layer loop, attribute lookups, the clock reads)

Why traced in place and not each part in a loop of its own: measured here, a part repeated alone
runs with warm caches and branch predictors, and the parts timed that way summed to about half a
step (the rest would have shown as "overhead"); traced inside the step, the parts sum to it.
The traced step, the plain model.step (total_s) and the isolated checks run side by side
(benchmarks.common.interleaved); traced_total_s next to total_s shows what the clock
reads cost. Parts are means over every traced step; share_<part> = part / traced_step_s.

Points: each step implementation (not interpreted) at the peer models' sizes
(time_per_token.PEER_MODELS: 130m and small) and the suite's small MODEL (level "model"), float32,
batch 1, THREADS threads, after a prefill of SPLIT_L tokens. median_s is total_s.
"""

import time

import torch

import impls
from impls.selective import frontdoor
from .common import interleaved
from .time_per_token import MODEL, PEER_MODELS, THREADS, interpreted, prefill_impl

SPLIT_L = 256
MODELS = {"quick": {"small": PEER_MODELS["small"]},
          "default": {"small": PEER_MODELS["small"], "130m": PEER_MODELS["130m"], "model": MODEL},
          "long": {"small": PEER_MODELS["small"], "130m": PEER_MODELS["130m"], "model": MODEL}}
ROUNDS = 9
BLOCK_S = 0.1
PARTS = ("projections", "conv", "scan_step", "norm")
# the per-layer parts of a step, in the order a layer runs them (each timed between two clock reads)
LAYER_PARTS = ("norm", "in_proj", "conv", "x_dt_proj", "scan_step", "out_proj")


def points(size, names):
    chosen = [n for n in (names or impls.names()) if n != "mambapy"] or list(impls.names())
    for n in chosen:
        impls.get(n)  # an unknown name raises ValueError listing the registered ones
    stepping = [n for n in chosen if not interpreted(n) and impls.get(n).step is not None]
    pre = prefill_impl(chosen)
    return [dict(kind="decode_split", level="model" if name == "model" else f"model_{name}", mode="recurrent",
                 impl=n, prefill_impl=pre, L=SPLIT_L, model=model, dtype="float32", threads=THREADS)
            for name, model in MODELS[size].items() for n in stepping]


@torch.no_grad()
def decode_split(model, cache, token, impl="recurrent", rounds=ROUNDS, block_s=BLOCK_S):
    """The per-token cost of ``model.step(token, cache, impl)`` split into parts (module docstring).

    Args:
        model: an impls.models.mamba.MambaLM; cache: its InferenceCache (advanced as in a decode);
        token: (b,) ids; impl: the step implementation
    Returns:
        dict of seconds per token: the parts projections_s, conv_s, scan_step_s, norm_s and
        overhead_s = traced_step_s - the parts (means over the traced steps); in_proj_s,
        x_dt_proj_s, out_proj_s, lm_head_s (the projections' pieces); share_<part> for the four
        parts and the overhead; total_s and total_iqr_s (plain model.step, median over rounds),
        traced_total_s (the traced step, median over rounds), front_door_isolated_s.
    """
    parts = dict.fromkeys((*LAYER_PARTS, "lm_head"), 0.0)
    clock = time.perf_counter

    def tally(names, times):
        """parts[name] += the time between consecutive clock reads, one name per interval."""
        for name, start, stop in zip(names, times, times[1:]):
            parts[name] += stop - start

    def traced_fused():
        """LanguageModel.step's fused path with MambaMixer.fused_step (float32/float64 RMSNorm models),
        the same calls in the same order, with a clock read between parts (LayerDecode's methods)."""
        t0 = clock()
        stream, phase = cache.stream, cache.phase
        step_fn = cache.checked.get(impl)
        torch.index_select(model.backbone.embedding.weight, 0, token, out=stream.residual)
        for block, c in zip(model.backbone.layers, cache.layers):
            dc = c.decode
            t1 = clock()
            normed = stream.normalize(block.norm.weight, cache.eps)
            t2 = clock()
            dc.in_proj(normed)
            t3 = clock()
            dc.conv(c, phase)
            t4 = clock()
            dc.x_dt_proj(c)
            t5 = clock()
            y = dc.scan(c, step_fn, impl)
            t6 = clock()
            dc.out_proj(y, stream.residual)
            t7 = clock()
            tally(LAYER_PARTS, (t1, t2, t3, t4, t5, t6, t7))
        if step_fn is None:
            cache.checked[impl] = impls.get(impl).step
        cache.phase = (phase + 1) % cache.k
        t8 = clock()
        normed = stream.normalize(model.backbone.norm_f.weight, cache.eps)
        t9 = clock()
        logits = torch.mm(normed, model.lm_head.weight.t())
        t10 = clock()
        tally(("norm", "lm_head"), (t8, t9, t10))
        return logits, t10 - t0

    def traced():
        """MambaLM.step (LanguageModel.step with MambaMixer.step), the same calls in the same order,
        with a clock read between parts."""
        if cache.stream is not None:
            return traced_fused()
        t0 = clock()
        h = model.backbone.embedding(token)
        residual = h.float() if model.residual_fp32() else h
        phase, step_fn = cache.phase, cache.checked.get(impl)
        for block, c in zip(model.backbone.layers, cache.layers):
            mixer = block.mixer
            t1 = clock()
            normed = block.norm(residual.to(h.dtype))
            t2 = clock()
            x, z = mixer.step_in_proj(normed)
            t3 = clock()
            x = mixer.step_conv(x, c, phase)
            t4 = clock()
            delta, B, C = mixer.project(x)
            t5 = clock()
            y = mixer.step_scan(c, x, delta, B, C, z, impl, step_fn)
            t6 = clock()
            residual = mixer.step_out_proj(y, residual)
            t7 = clock()
            tally(LAYER_PARTS, (t1, t2, t3, t4, t5, t6, t7))
        if step_fn is None:
            cache.checked[impl] = impls.get(impl).step
        cache.phase = (phase + 1) % cache.k
        t8 = clock()
        final = model.backbone.norm_f(residual.to(h.dtype))
        t9 = clock()
        logits = model.lm_head(final)
        t10 = clock()
        tally(("norm", "lm_head"), (t8, t9, t10))
        return logits, t10 - t0

    layer_args = []
    for c in cache.layers:  # the arguments one selective_state_update call gets (values do not matter)
        x = torch.zeros(token.shape[0], c.D.shape[0], dtype=model.dtype)
        n = c.A.shape[1]
        layer_args.append((c.ssm_state.clone(), x, x, c.A, x[:, :n], x[:, :n], c.D, x, c.dt_bias))
    traced_steps = []

    def traced_step():
        traced_steps.append(traced()[1])

    fns = {"total": lambda: model.step(token, cache, impl=impl), "traced": traced_step,
           "front_door_isolated": lambda: [frontdoor.check_step(*a) for a in layer_args]}
    timed = interleaved(fns, rounds=rounds, block_s=block_s)
    calls = len(traced_steps)
    out = {f"{name}_s": v / calls for name, v in parts.items()}  # means over the traced steps
    out["traced_step_s"] = sum(traced_steps) / calls
    out["projections_s"] = out["in_proj_s"] + out["x_dt_proj_s"] + out["out_proj_s"] + out["lm_head_s"]
    out["overhead_s"] = out["traced_step_s"] - sum(out[f"{p}_s"] for p in PARTS)
    for p in PARTS + ("overhead",):
        out[f"share_{p}"] = out[f"{p}_s"] / out["traced_step_s"]
    out.update(total_s=timed["total"]["median_s"], total_iqr_s=timed["total"]["iqr_s"],
               traced_total_s=timed["traced"]["median_s"],
               front_door_isolated_s=timed["front_door_isolated"]["median_s"])
    return out


def measure(point):
    from impls.models.mamba import MambaConfig, MambaLM

    threads = torch.get_num_threads()
    torch.set_num_threads(point["threads"])
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = MambaLM(MambaConfig(**point["model"])).eval()
        ids = torch.randint(0, model.config.vocab_size, (1, point["L"]), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits, cache = model.prefill(ids, impl=point["prefill_impl"])
        split = decode_split(model, cache, logits.argmax(-1), point["impl"])
        return dict(split, median_s=split["total_s"], iqr_s=split["total_iqr_s"])
    finally:
        torch.set_num_threads(threads)
