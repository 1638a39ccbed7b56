"""Is it recurrent? Time per generated token, re-forwarding the prefix versus recurrent decoding.

A sweep module for benchmarks/runner.py (``points(size, impls)``, ``measure(point)``).

    python -m benchmarks.runner --sweep time_per_token [--quick | --long] [--impl NAME ...] --out FILE

Scan level, one Mamba layer's scan at mamba-130m's size (b=1, d = d_inner = 1536, n = 16, float32):
    reforward  the time to produce the token at position L by re-running the whole prefix: one
               impls.selective_scan over L tokens (Mamba's arguments: D, z, delta_bias, softplus),
               for every implementation
    recurrent  one impls.selective_state_update at position L, from the state a real prefill of L
               tokens left (return_last_state), for every implementation with a step
Model level, the small model MODEL (impls/models/mamba.py, official layout and initialisation):
    reforward  MambaLM.forward over the L tokens so far (LM head on the last position only)
    recurrent  MambaLM.step at position L, after MambaLM.prefill of L tokens
    cumulative generate of L tokens from a one-token prompt, in both modes, L from CUMULATIVE_MIN
               (powers of two, and 1.5 times each within re-forwarding's range; re-forwarding is
               quadratic in L, so it runs directly only up to CUMULATIVE_REFORWARD_MAX[size]: at
               least 4 points in every size, as a fit of a + b L + c L^2 needs), for each
               family's small model with MODEL's sizes: MambaLM (level "model", through the chosen
               implementations) and, when no implementation is named, Mamba2LM ("model2":
               model2_speed's, the same sizes) and Mamba3LM ("model3", the official Mamba-3
               defaults inside), each through CUMULATIVE_FAMILIES' scan and step
Memory: recurrent decoding of L tokens (selective_state_update L times, inputs cycled from a fixed
pool so they take constant memory), in a fresh process so that its peak resident memory is its own.

Against the peers, model level, float32, batch 1, at mamba-130m's sizes (level "model_130m":
d_model 768, 24 layers, vocabulary 50,277 padded to 50,280) and a small model (level "model_small":
d_model 256, 4 layers, vocabulary 256 as in MODEL: with mamba-130m's vocabulary its LM head, 12.9 M
weights, would be most of a small model's step on both sides), PEER_MODELS, with the same random
weights on both sides (impls/adapters/mambapy_model.py). Included when ``names`` is None or names "mambapy":
    per_token / recurrent, impl "recurrent" (every step implementation)  MambaLM.step at position L
    per_token / recurrent, impl "mambapy"  mamba.py's step (mambapy.mamba.Mamba.step, embedding and
               LM head as mambapy.lm.LM has them), from the state of the same L-token prefix (our
               prefill's cache converted with caches_from: the cost of a step does not depend on
               how its state was made, and mamba.py would need L of its steps to make it)
    per_token / reforward  MambaLM.forward over the L tokens so far: what mamba-minimal
               (johnma2006/mamba-minimal) does for every token. mamba-minimal is not on PyPI and its
               code is not copied here, so our re-forwarding stands for it (``stands_for``); it
               runs the same work per token (a whole forward of the prefix), through our scan
    prefill    the prompt (PREFILL_L tokens, small model) into the decode cache: ours with one scan
               (MambaLM.prefill through the prefill implementation), mamba.py's with a loop of its
               step (its only way); both caches then decode NEXT_TOKENS greedy tokens and the
               records say whether they were the same (same_next_tokens)
Measured interleaved, so that a ratio's two sides see the same load (benchmarks.common.interleaved:
rounds in which every contender runs one block of calls, the order rotated each round): the points
of one group (``group``) are measured together, by the group's first point; the others return what
it stored (``measured_with`` names the group). A group is every mode and implementation at one
(kind, level, L), or the peers of one side-by-side comparison. Each record carries median_s,
iqr_s, min_s and times_s (one per round, seconds per call) and the peak resident memory of its
warm-up call (benchmarks.common.peak_rss_during), and, beside the group's reference, the paired
ratio to it (benchmarks.common.paired_ratio: ``ratio``, median of the per-round ratios, its
quartiles, ``ratio_to`` and ``unstable``): re-forwarding to the recurrent step at the same L
(``ratio_to`` "recurrent/recurrent"), ours to mamba.py (``ratio_to`` "mambapy"). Groups of slow calls
get fewer rounds (GROUP_BUDGET_S, at least 5). Implementations that run interpreted
(``case_limits`` declared, such as Triton's interpreter on a CPU) get a "skipped" line with the
reason instead of points. Slopes of time per token against L: benchmarks/slopes.py (fit_slope).

Threads: every point runs with THREADS torch threads. Measured here: with 2 threads on 2 cores and
any other process busy, each small op waits for a descheduled OpenMP thread, and a decode step took
8 ms instead of 0.27 ms (30x); the per-token ops (24k elements) are below torch's parallel grain
anyway, so one thread costs the recurrent path nothing. Against mamba.py, side by side with 2
threads while another process kept one core busy: 31 ms per token for our small model and 188 ms
for mamba.py's (2 ms and 3 ms with one thread), 219 ms and 1185 ms at 130m (45 ms and 65 ms): every
op waits for a descheduled thread, so such a ratio counts ops, not work.
"""

import json
import os
import subprocess
import sys
import time

import torch

import impls
from . import model2_speed
from .common import interleaved, paired_ratio, peak_rss_during

THREADS = 1
SCAN = dict(b=1, d=1536, n=16)                      # mamba-130m: d_inner = 2 * 768, d_state = 16
MODEL = dict(d_model=128, n_layer=2, vocab_size=256)  # the small model (d_inner 256, n 16)
ROUNDS = 9                                           # interleaved rounds per group (fewer for slow groups:
GROUP_BUDGET_S = 8.0                                 # about this many seconds of timed calls, at least 5 rounds)
BLOCK_S = 0.04                                       # seconds per contender per round (at least one call)
CUMULATIVE_ROUNDS = 5
LENGTHS = {"quick": [2 ** k for k in range(6, 10)],
           "default": [2 ** k for k in range(6, 14)],
           "long": [2 ** k for k in range(6, 17)]}
MODEL_LENGTHS = {"quick": [2 ** k for k in range(6, 9)],
                 "default": [2 ** k for k in range(6, 14)],
                 "long": [2 ** k for k in range(6, 15)]}
# cumulative generation: recurrent up to CUMULATIVE_MAX tokens, re-forwarding (quadratic) up to
# CUMULATIVE_REFORWARD_MAX, from 8 tokens on, at powers of two and, up to CUMULATIVE_REFORWARD_MAX,
# 1.5 times each: at least 4 points for the fit of a + b L + c L^2; with 11 points to 256 (8 degrees of
# freedom) its interval of c was 0.41-0.51 times as wide as with the 6 powers of two in one default
# run (Mamba-3's c resolved only with them), for about half again of re-forwarding's time
CUMULATIVE_MIN = 8
CUMULATIVE_MAX = {"quick": 2 ** 6, "default": 2 ** 10, "long": 2 ** 13}
CUMULATIVE_REFORWARD_MAX = {"quick": 2 ** 6, "default": 2 ** 8, "long": 2 ** 10}
# the other families' cumulative levels: level -> (the scan that re-forwards and prefills, the step)
CUMULATIVE_FAMILIES = {"model2": ("chunked", "recurrent"), "model3": ("chunked", "recurrent")}
MEMORY_LENGTHS = {"quick": [], "default": [2 ** 10, 2 ** 13], "long": [2 ** 10, 2 ** 20]}
POOL = 64                                            # distinct token inputs cycled by the memory points
PEER = "mambapy"                                     # the peer's name in records: mamba.py's model, measured
                                                     # against ours (its registered scan is timed in the scan grid)
PEER_MODELS = {"130m": dict(d_model=768, n_layer=24, vocab_size=50277),   # mamba-130m's config.json sizes
               "small": dict(d_model=256, n_layer=4, vocab_size=256)}
PEER_SIZES = {"quick": ["small"], "default": ["small", "130m"], "long": ["small", "130m"]}
PEER_LENGTHS = {"quick": [64, 256], "default": [64, 256, 1024], "long": [64, 256, 1024, 4096]}
PEER_REFORWARD_LENGTHS = {"quick": {"small": [64, 256]}, "default": {"small": [64, 256, 1024], "130m": [64, 256]},
                          "long": {"small": [64, 256, 1024, 4096], "130m": [64, 256, 1024]}}
PEER_ROUNDS = 9                                      # side-by-side rounds per group
PEER_BLOCK_S = 0.15                                  # seconds per contender per round (at least one call)
PREFILL_MODEL, PREFILL_ROUNDS = "small", 5
PREFILL_L = {"quick": 64, "default": 1024, "long": 1024}
NEXT_TOKENS = 8                                      # greedy tokens decoded from both prefilled caches


def interpreted(name):
    return bool(impls.get(name).supports["case_limits"])


def prefill_impl(chosen):
    """The scan used to prefill before timing a step: the time of a step does not depend on which
    scan computed its state, so the fastest available one (parallel, else the first chosen)."""
    fast = [n for n in chosen if not interpreted(n)]
    return "parallel" if "parallel" in fast else (fast[0] if fast else "loop")


def points(size, names):
    """Points in the order they are measured: per-token scan level (each L, every implementation side
    by side), model level, cumulative, memory, then against the peers. names: implementation names
    to measure (None: all, and the peer points); "mambapy" among them adds the peer points."""
    peer_wanted = names is None or PEER in names
    chosen = [n for n in (names or impls.names()) if n != PEER] or list(impls.names())
    for n in chosen:
        impls.get(n)  # an unknown name raises ValueError listing the registered ones
    out = [dict(kind="skipped", impl=n, reason=f"interpreted (case_limits {impls.get(n).supports['case_limits']}): "
                                            f"seconds per token, not a timing of the kernel")
           for n in chosen if interpreted(n)]
    fast = [n for n in chosen if not interpreted(n)]
    stepping = [n for n in fast if impls.get(n).step is not None]
    pre = prefill_impl(chosen)
    common = dict(dtype="float32", threads=THREADS)
    for L in LENGTHS[size]:
        out += [dict(kind="per_token", level="scan", mode="reforward", impl=n, L=L, **SCAN, **common) for n in fast]
        out += [dict(kind="per_token", level="scan", mode="recurrent", impl=n, prefill_impl=pre, L=L, **SCAN, **common)
                for n in stepping]
    for L in MODEL_LENGTHS[size]:
        out += [dict(kind="per_token", level="model", mode="reforward", impl=n, L=L, model=MODEL, **common) for n in fast]
        out += [dict(kind="per_token", level="model", mode="recurrent", impl=n, prefill_impl=pre, L=L, model=MODEL, **common)
                for n in stepping]
    cumulative = [2 ** k for k in range(CUMULATIVE_MIN.bit_length() - 1, CUMULATIVE_MAX[size].bit_length())]
    cumulative = sorted(set(cumulative) | {3 * L // 2 for L in cumulative if 3 * L // 2 <= CUMULATIVE_REFORWARD_MAX[size]})
    # level -> (re-forwarding scan, step, the scan that prefills the step's state), None where none is chosen
    families = {"model": (pre if pre in fast else (fast or [None])[0], (stepping or [None])[0], pre)}
    if names is None:   # names are Mamba-1's implementations
        families.update({level: (scan, step, scan) for level, (scan, step) in CUMULATIVE_FAMILIES.items()})
    for level, (scan, step, prefill) in families.items():
        model = model2_speed.MODEL2 if level == "model2" else MODEL
        for L in cumulative:
            if step is not None:
                out.append(dict(kind="cumulative", level=level, mode="recurrent", impl=step, prefill_impl=prefill, L=L,
                                model=model, **common))
            if scan is not None and L <= CUMULATIVE_REFORWARD_MAX[size]:
                out.append(dict(kind="cumulative", level=level, mode="reforward", impl=scan, L=L, model=model, **common))
    for L in MEMORY_LENGTHS[size]:
        out += [dict(kind="memory", level="scan", mode="recurrent", impl=n, L=L, **SCAN, **common) for n in stepping]
    if peer_wanted:
        out += peer_points(size, stepping, fast, pre, common)
    if names is None:  # Mamba-2 levels "ssd_scan" and "model2" (benchmarks/model2_speed.py)
        out += model2_speed.per_token_points(size, THREADS)
    _note_members(out)
    return out


def peer_points(size, stepping, fast, pre, common):
    """The model-level points against mamba.py (see the module docstring), when mambapy is installed."""
    import importlib.util

    if importlib.util.find_spec("mambapy") is None:
        return [dict(kind="skipped", impl=PEER, reason="mambapy is not installed (pip install mambapy==1.2.0)")]
    out = []
    for name in PEER_SIZES[size]:
        level, model = f"model_{name}", PEER_MODELS[name]
        group = stepping + [PEER]
        for L in PEER_LENGTHS[size]:
            out += [dict(kind="per_token", level=level, mode="recurrent", impl=n, prefill_impl=pre, L=L, model=model,
                         side_by_side=group, **common) for n in group]
        if pre in fast:
            out += [dict(kind="per_token", level=level, mode="reforward", impl=pre, L=L, model=model,
                         stands_for="mamba-minimal", **common) for L in PEER_REFORWARD_LENGTHS[size].get(name, [])]
    group = [pre, PEER]
    out += [dict(kind="prefill", level=f"model_{PREFILL_MODEL}", mode="prefill", impl=n, L=PREFILL_L[size],
                 model=PEER_MODELS[PREFILL_MODEL], how="token_by_token" if n == PEER else "one_scan",
                 next_tokens=NEXT_TOKENS, side_by_side=group, **common) for n in group]
    return out


# ---------------------------------------------------------------------------------------- inputs

def scan_inputs(b, d, n, l, seed=0):
    """Mamba-initialised float32 arguments for selective_scan, built without float64 copies:
    A = -(1..n); dt log-uniform in [1e-3, 0.1] stored through the inverse softplus as delta + delta_bias.

    Returns dict(u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l); D, delta_bias: (d,); delta_softplus)."""
    gen = torch.Generator().manual_seed(seed)
    delta = torch.rand(b, d, l, generator=gen).mul_(torch.log(torch.tensor(100.0))).add_(torch.log(torch.tensor(1e-3)))
    delta.exp_().expm1_().log_()                     # inverse softplus of dt
    delta_bias = 0.1 * torch.randn(d, generator=gen)
    delta -= delta_bias[:, None]
    return dict(u=torch.randn(b, d, l, generator=gen), delta=delta,
                A=-torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1),
                B=torch.randn(b, n, l, generator=gen), C=torch.randn(b, n, l, generator=gen),
                D=torch.ones(d), z=torch.randn(b, d, l, generator=gen), delta_bias=delta_bias, delta_softplus=True)


def step_args(x, t):
    """selective_state_update's arguments for token t of scan_inputs x (everything but the state), as
    fresh contiguous (b, d) and (b, n) tensors, like those a decoding model computes for each token
    (a column view of the (b, d, l) inputs would be read with stride l: slower as l grows)."""
    return (x["u"][..., t].contiguous(), x["delta"][..., t].contiguous(), x["A"], x["B"][..., t].contiguous(),
            x["C"][..., t].contiguous(), x["D"], x["z"][..., t].contiguous(), x["delta_bias"], x["delta_softplus"])


def small_model(level="model"):
    """The small model of a model level (official initialisation, seed 0), float32, eval mode: MambaLM
    ("model", MODEL), Mamba2LM ("model2", model2_speed's MODEL2) or Mamba3LM ("model3", MODEL)."""
    if level == "model2":
        return model2_speed.small_model()
    from impls.models.mamba import MambaConfig, MambaLM
    from impls.models.mamba3 import Mamba3Config, Mamba3LM

    build = dict(model=lambda: MambaLM(MambaConfig(**MODEL)),
                 model3=lambda: Mamba3LM(Mamba3Config(**MODEL, ssm_cfg={"layer": "Mamba3"})))[level]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build().eval()


# ------------------------------------------------------------------------------------- measuring

_members = {}   # group -> [(mode, impl)] planned in it (filled by points)
_prefill = {}   # group -> the scan that prefills its recurrent members' state
_stored = {}    # group -> {(mode, impl): result} measured but not yet returned


def group(point):
    """The points measured together (interleaved): per (kind, level, L), every mode and
    implementation; the peer groups are named in the point (side_by_side)."""
    if point["kind"] in ("skipped", "memory"):
        return json.dumps(point, sort_keys=True, default=str)
    return json.dumps({k: v for k, v in point.items() if k not in ("impl", "mode", "prefill_impl", "how")},
                      sort_keys=True, default=str)


def _note_members(out):
    for p in out:
        if p["kind"] not in ("skipped", "memory"):
            _members.setdefault(group(p), []).append((p["mode"], p["impl"]))
            if "prefill_impl" in p:
                _prefill[group(p)] = p["prefill_impl"]
    for k, v in _members.items():
        _members[k] = list(dict.fromkeys(v))


def _from_group(point, measure_group):
    """The result for point's (mode, impl) from its group, measuring the group if needed."""
    key, me = group(point), (point["mode"], point["impl"])
    if me not in _stored.get(key, {}):
        _stored[key] = measure_group(point)
    return _stored[key].pop(me)


def _timed_group(calls, reference=None, rounds=ROUNDS, budget_s=GROUP_BUDGET_S):
    """Interleave calls ({(mode, impl): fn}); each result gets its peak resident memory of the
    warm-up call and, beside the reference (a key of calls), its paired ratio to it."""
    warm, peaks = {}, {}
    for k, fn in calls.items():
        t0 = time.perf_counter()
        _, peak, before = peak_rss_during(fn)
        warm[k] = time.perf_counter() - t0
        peaks[k] = dict(peak_rss_bytes=peak, rss_before_bytes=before)
    timed = interleaved(calls, rounds=rounds, block_s=BLOCK_S, budget_s=budget_s, warm=warm)
    out = {}
    for k, t in timed.items():
        out[k] = dict(t, **peaks[k], measured_with="+".join("/".join(m) for m in calls))
        if reference is not None and k != reference:
            out[k].update(paired_ratio(t["cpu_s"], timed[reference]["cpu_s"], to="/".join(reference)))
    return out


def _prefill_of(point):
    return point.get("prefill_impl") or _prefill.get(group(point)) or "parallel"


def _reference(members):
    """The denominator of a group's ratios: its first recurrent member (the kept-state step)."""
    return next((m for m in members if m[0] == "recurrent"), None)


@torch.no_grad()
def _scan_per_token(point):
    def measure_group(point):
        members = _members.get(group(point)) or [(point["mode"], point["impl"])]
        b, d, n, L = point["b"], point["d"], point["n"], point["L"]
        x = scan_inputs(b, d, n, L + 1)
        prefix = {k: (v[..., :L] if isinstance(v, torch.Tensor) and v.dim() == 3 else v) for k, v in x.items()}
        args = step_args(x, L)          # the token at position L
        calls, states = {}, {}
        for mode, impl in members:
            if mode == "reforward":
                calls[(mode, impl)] = lambda impl=impl: impls.selective_scan(**prefix, impl=impl)
            else:  # each step advances the state by one more token: a step's cost does not depend on where it is
                _, state = impls.selective_scan(**prefix, return_last_state=True, impl=_prefill_of(point))
                states[impl] = state
                calls[(mode, impl)] = lambda impl=impl, state=state: impls.selective_state_update(state, *args, impl=impl)
        out = _timed_group(calls, _reference(members))
        for (mode, impl), r in out.items():
            if mode == "recurrent":
                r["state_bytes"] = states[impl].numel() * states[impl].element_size()
        return out

    return _from_group(point, measure_group)


@torch.no_grad()
def _model_per_token(point):
    def measure_group(point):
        members = _members.get(group(point)) or [(point["mode"], point["impl"])]
        model = small_model() if point["model"] == MODEL else peer_models(point["model"])[0]
        L = point["L"]
        ids = torch.randint(0, model.config.vocab_size, (1, L), generator=torch.Generator().manual_seed(1))
        calls, caches = {}, {}
        for mode, impl in members:
            if mode == "reforward":
                calls[(mode, impl)] = (lambda impl=impl: model(ids, impl=impl, num_last_tokens=1)[:, -1].argmax(-1))
            else:
                logits, cache = model.prefill(ids, impl=_prefill_of(point))
                token, caches[impl] = logits.argmax(-1), cache
                calls[(mode, impl)] = lambda impl=impl, c=cache, t=token: model.step(t, c, impl=impl).argmax(-1)
        out = _timed_group(calls, _reference(members))
        for (mode, impl), r in out.items():
            if mode == "recurrent":
                r["cache_bytes"] = caches[impl].nbytes()
        return out

    return _from_group(point, measure_group)


@torch.no_grad()
def _model_cumulative(point):
    def measure_group(point):
        members = _members.get(group(point)) or [(point["mode"], point["impl"])]
        model, L = small_model(point["level"]), point["L"]
        prompt = torch.tensor([[1]])
        calls = {}
        for mode, impl in members:
            if mode == "reforward":
                calls[(mode, impl)] = lambda impl=impl: model.generate(prompt, L, mode="reforward", impl=impl)
            else:
                calls[(mode, impl)] = lambda impl=impl: model.generate(prompt, L, mode="recurrent",
                                                                       impl=_prefill_of(point), step_impl=impl)
        out = _timed_group(calls, _reference(members), rounds=CUMULATIVE_ROUNDS)
        for r in out.values():
            r["per_token_mean_s"] = r["median_s"] / L
        return out

    return _from_group(point, measure_group)


# ------------------------------------------------------------------------- against the peers

_peer_models = {}   # PEER_MODELS name -> (MambaLM, MambapyLM): built once per process (130m takes seconds)
_stored = {}        # a side-by-side group's key -> {impl: result} not yet returned


def peer_models(model):
    """(our MambaLM with PEER_MODELS' sizes and random official-initialised weights, seed 0; mamba.py's
    model holding the same weights)."""
    key = json.dumps(model, sort_keys=True)
    if key not in _peer_models:
        from impls.adapters.mambapy_model import from_mamba_lm
        from impls.models.mamba import MambaConfig, MambaLM

        _peer_models.clear()  # one pair at a time: 130m's pair holds about 1.2 GB
        with torch.random.fork_rng():
            torch.manual_seed(0)
            ours = MambaLM(MambaConfig(**model)).eval()
        _peer_models[key] = (ours, from_mamba_lm(ours))
    return _peer_models[key]


@torch.no_grad()
def _peer_per_token(point):
    def measure_group(point):
        from impls.adapters.mambapy_model import caches_from

        ours, peer = peer_models(point["model"])
        L = point["L"]
        ids = torch.randint(0, ours.config.vocab_size, (1, L), generator=torch.Generator().manual_seed(1))
        logits, cache = ours.prefill(ids, impl=point["prefill_impl"])
        token = logits.argmax(-1)
        fns, held = {}, [caches_from(cache)]   # mamba.py's cache: the same L-token state, in its layout

        def peer_step():
            logits, held[0] = peer.step(token, held[0])
            return logits.argmax(-1)
        for i, n in enumerate(point["side_by_side"]):
            if n == PEER:
                fns[n] = peer_step
            else:  # each of our step implementations advances a cache of its own
                c = cache if i == 0 else ours.prefill(ids, impl=point["prefill_impl"])[1]
                fns[n] = (lambda n=n, c=c: ours.step(token, c, impl=n).argmax(-1))
        result = interleaved(fns, rounds=PEER_ROUNDS, block_s=PEER_BLOCK_S)
        group = "+".join(point["side_by_side"])
        out = {("recurrent", n): dict(r, measured_with=group, cache_bytes=cache.nbytes()) for n, r in result.items()}
        for n in point["side_by_side"]:
            if n != PEER:
                out[("recurrent", n)].update(paired_ratio(result[n]["cpu_s"], result[PEER]["cpu_s"], to=PEER))
        return out

    return _from_group(point, measure_group)


@torch.no_grad()
def _peer_prefill(point):
    def measure_group(point):
        from impls.adapters.mambapy_model import greedy

        ours, peer = peer_models(point["model"])
        ids = torch.randint(0, ours.config.vocab_size, (1, point["L"]), generator=torch.Generator().manual_seed(1))
        pre = [n for n in point["side_by_side"] if n != PEER][0]
        fns = {pre: lambda: ours.prefill(ids, impl=pre), PEER: lambda: peer.prefill(ids)}
        result = interleaved(fns, rounds=PREFILL_ROUNDS, block_s=0.0)
        V, T = ours.config.vocab_size, point["next_tokens"]
        logits, cache = ours.prefill(ids, impl=pre)
        our_tokens, our_logits = greedy(logits, cache, lambda tok, c: (ours.step(tok, c), c), ids, T, V)
        logits, caches = peer.prefill(ids)
        peer_tokens, peer_logits = greedy(logits, caches, peer.step, ids, T, V)
        same = bool(torch.equal(our_tokens, peer_tokens))
        check = dict(same_next_tokens=same, our_next_tokens=our_tokens[0, -T:].tolist(),
                     peer_next_tokens=peer_tokens[0, -T:].tolist(),
                     next_logits_max_abs_diff=float((our_logits - peer_logits).abs().max()) if same else None,
                     next_logits_max_abs=float(peer_logits.abs().max()))
        out = {("prefill", n): dict(r, measured_with=f"{pre}+{PEER}", **check) for n, r in result.items()}
        r = paired_ratio(result[pre]["cpu_s"], result[PEER]["cpu_s"], to=PEER)
        out[("prefill", pre)].update(r, speedup_over_mambapy=1.0 / r["ratio"])
        return out

    return _from_group(point, measure_group)


def recurrent_memory(point):
    """Decode point["L"] tokens with selective_state_update, inputs cycled from a pool of POOL tokens.
    Returns peak resident bytes while decoding, before it, and the time."""
    torch.set_num_threads(point["threads"])
    x = scan_inputs(point["b"], point["d"], point["n"], POOL)
    pool = [step_args(x, t) for t in range(POOL)]
    state = torch.zeros(point["b"], point["d"], point["n"])

    @torch.no_grad()
    def decode():
        for t in range(point["L"]):
            impls.selective_state_update(state, *pool[t % POOL], impl=point["impl"])

    t0 = time.perf_counter()
    _, peak, before = peak_rss_during(decode, interval_s=0.01)
    elapsed = time.perf_counter() - t0
    return dict(peak_rss_bytes=peak, rss_before_bytes=before, decode_s=elapsed, per_token_mean_s=elapsed / point["L"],
                state_bytes=state.numel() * state.element_size(), finite=bool(torch.isfinite(state).all()))


def _in_fresh_process(point):
    """Run recurrent_memory in a child process (its resident memory owes nothing to earlier points)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.time_per_token", json.dumps(point)], cwd=root,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory point failed in its process: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(point):
    """What was measured at ``point`` (see the module docstring); the torch thread count is restored after."""
    if point["kind"] == "skipped":
        return dict(skipped=point["reason"])
    if point["kind"] == "memory":
        return _in_fresh_process(point)
    threads = torch.get_num_threads()
    torch.set_num_threads(point["threads"])
    try:
        if point["kind"] == "prefill":
            return _peer_prefill(point)
        if point.get("side_by_side"):
            return _peer_per_token(point)
        if point["kind"] == "cumulative":
            return _model_cumulative(point)
        if point["level"] in model2_speed.LEVELS:
            return _from_group(point, lambda p: model2_speed.per_token_group(
                p, _members.get(group(p)) or [(p["mode"], p["impl"])], _timed_group))
        if point["level"] == "scan":
            return _scan_per_token(point)
        return _model_per_token(point)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":  # a memory point in its own process: prints one JSON line
    print(json.dumps(recurrent_memory(json.loads(sys.argv[1]))))
