"""Is it recurrent? Time per generated token, re-forwarding the prefix versus recurrent decoding.

A sweep module for benchmarks/runner.py (``points(size, impls)``, ``measure(point)``).

    python -m benchmarks.runner --sweep time_per_token [--quick | --long] [--impl NAME ...] --out FILE

Scan level, one Mamba layer's scan at mamba-130m's size (b=1, d = d_inner = 1536, n = 16, float32):
    reforward  the time to produce the token at position L by re-running the whole prefix: one
               impls.selective_scan over L tokens (Mamba's arguments: D, z, delta_bias, softplus),
               for every implementation
    recurrent  one impls.selective_state_update at position L, from the state a real prefill of L
               tokens left (return_last_state), for every implementation with a step
Model level, the small model MODEL (impls/model.py, official layout and initialisation):
    reforward  MambaLM.forward over the L tokens so far (LM head on the last position only)
    recurrent  MambaLM.step at position L, after MambaLM.prefill of L tokens
    cumulative MambaLM.generate of L tokens from a one-token prompt, in both modes (re-forwarding is
               quadratic in L, so it runs directly only up to CUMULATIVE_REFORWARD_MAX[size])
Memory: recurrent decoding of L tokens (selective_state_update L times, inputs cycled from a fixed
pool so they take constant memory), in a fresh process so that its peak resident memory is its own.

Against the peers, model level, float32, batch 1, at mamba-130m's sizes (level "model_130m":
d_model 768, 24 layers, vocabulary 50,277 padded to 50,280) and a small model (level "model_small":
d_model 256, 4 layers, vocabulary 256 as in MODEL: with mamba-130m's vocabulary its LM head, 12.9 M
weights, would be most of a small model's step on both sides), PEER_MODELS, with the same random
weights on both sides (impls/mambapy_model.py). Included when ``names`` is None or names "mambapy":
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
The recurrent steps at one (level, L), and the two prefills, are measured side by side in one call
(``side_by_side``): rounds in which every contender runs one block of calls, in an order rotated
each round, so a change in the machine's load lands on all of them. Each record carries its
median over the rounds, and ours carry ``ratio_to_mambapy``: the median over rounds of the per-round
ratio, with its quartiles (the noise). The first point of a group measures the group; the others
return what it stored (``measured_with``).

Every point records median_s, iqr_s and min_s (torch.utils.benchmark through
benchmarks.common.time_call, REPEATS timed runs after a warm-up, see _timed) and the peak resident
memory while it ran (benchmarks.common.peak_rss_during). Implementations that run interpreted
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
from .common import peak_rss_during, time_call

THREADS = 1
SCAN = dict(b=1, d=1536, n=16)                      # mamba-130m: d_inner = 2 * 768, d_state = 16
MODEL = dict(d_model=128, n_layer=2, vocab_size=256)  # the small model (d_inner 256, n 16)
REPEATS = 3                                          # timed runs wanted, beyond the warm-up
MIN_RUN_S = 0.2
# A re-forward call longer than this is timed once (runs=1): seconds-long calls vary by a few percent
# here, far less than the slope fit needs, and three of them at L = 8192 were a tenth of the sweep.
REFORWARD_SINGLE_S = 1.0
LENGTHS = {"quick": [2 ** k for k in range(6, 11)],
           "default": [2 ** k for k in range(6, 14)],
           "long": [2 ** k for k in range(6, 17)]}
MODEL_LENGTHS = {"quick": [2 ** k for k in range(6, 10)],
                 "default": [2 ** k for k in range(6, 14)],
                 "long": [2 ** k for k in range(6, 15)]}
CUMULATIVE_MAX = {"quick": 2 ** 8, "default": 2 ** 10, "long": 2 ** 13}
CUMULATIVE_REFORWARD_MAX = {"quick": 2 ** 7, "default": 2 ** 7, "long": 2 ** 10}
MEMORY_LENGTHS = {"quick": [], "default": [2 ** 10, 2 ** 13], "long": [2 ** 10, 2 ** 20]}
POOL = 64                                            # distinct token inputs cycled by the memory points
PEER = "mambapy"                                     # the peer's name in records: mamba.py's model, measured
                                                     # against ours (its registered scan is timed in the scan grid)
PEER_MODELS = {"130m": dict(d_model=768, n_layer=24, vocab_size=50277),   # mamba-130m's config.json sizes
               "small": dict(d_model=256, n_layer=4, vocab_size=256)}
PEER_SIZES = {"quick": ["small"], "default": ["small", "130m"], "long": ["small", "130m"]}
PEER_LENGTHS = {"quick": [64, 1024], "default": [64, 256, 1024], "long": [64, 256, 1024, 4096]}
PEER_REFORWARD_LENGTHS = {"quick": {"small": [64, 256]}, "default": {"small": [64, 256, 1024], "130m": [64, 256]},
                          "long": {"small": [64, 256, 1024, 4096], "130m": [64, 256, 1024]}}
PEER_ROUNDS = 9                                      # side-by-side rounds per group
PEER_BLOCK_S = 0.15                                  # seconds per contender per round (at least one call)
PREFILL_MODEL, PREFILL_L, PREFILL_ROUNDS = "small", 1024, 3
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
    for L in MODEL_LENGTHS[size]:
        if stepping and L <= CUMULATIVE_MAX[size]:
            out.append(dict(kind="cumulative", level="model", mode="recurrent", impl=stepping[0], prefill_impl=pre,
                            L=L, model=MODEL, **common))
        if fast and L <= CUMULATIVE_REFORWARD_MAX[size]:
            out.append(dict(kind="cumulative", level="model", mode="reforward", impl=pre if pre in fast else fast[0],
                            L=L, model=MODEL, **common))
    for L in MEMORY_LENGTHS[size]:
        out += [dict(kind="memory", level="scan", mode="recurrent", impl=n, L=L, **SCAN, **common) for n in stepping]
    if peer_wanted:
        out += peer_points(size, stepping, fast, pre, common)
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
    out += [dict(kind="prefill", level=f"model_{PREFILL_MODEL}", mode="prefill", impl=n, L=PREFILL_L,
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


def small_model():
    from impls.model import MambaConfig, MambaLM

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return MambaLM(MambaConfig(**MODEL)).eval()


# ------------------------------------------------------------------------------------- measuring

_previous = {}  # series -> (L, seconds per call) of the point measured last in this process


def _timed(series, L, fn, single_after_s=None):
    """Time fn with benchmarks.common.time_call and watch its peak resident memory.

    REPEATS timed runs after a warm-up (``runs`` records how many there were): time_call's own first
    (block-size estimating) run is the warm-up, and its minimum run time is (REPEATS - 1/2) x the
    call's duration predicted from the previous point of the same series, scaled linearly in L. That
    gives REPEATS runs when the prediction is within 25 % (more when it over-predicts, as for flat
    series), one call fewer than a separate warm-up; a call slower than predicted by more than that
    is timed again with the duration now known. The first point of a series, with nothing to predict
    from, makes a separate warm-up call instead. With single_after_s, a call predicted or found to take longer runs once
    (runs=1, iqr_s=0). Returns time_call's dict plus min_s, peak_rss_bytes, rss_before_bytes.
    """
    guess = _previous.get(series)
    predicted = None if guess is None else guess[1] * L / guess[0]
    if predicted is None:
        t0 = time.perf_counter()
        _, peak, before = peak_rss_during(fn)
        predicted = time.perf_counter() - t0
        once = single_after_s is not None and predicted > single_after_s
        result = (dict(median_s=predicted, iqr_s=0.0, runs=1, times_s=[predicted]) if once
                  else time_call(fn, min_run_time=max(MIN_RUN_S, REPEATS * predicted), warmup=0))
    elif single_after_s is not None and predicted > single_after_s:
        t0 = time.perf_counter()
        _, peak, before = peak_rss_during(fn)
        elapsed = time.perf_counter() - t0
        result = dict(median_s=elapsed, iqr_s=0.0, runs=1, times_s=[elapsed])
    else:
        result, peak, before = peak_rss_during(
            lambda: time_call(fn, min_run_time=max(MIN_RUN_S, (REPEATS - 0.5) * predicted), warmup=0))
        if result["runs"] < REPEATS:  # slower than predicted (a busy machine): again, knowing the duration
            result = time_call(fn, min_run_time=max(MIN_RUN_S, (REPEATS - 0.5) * result["median_s"]), warmup=0)
    _previous[series] = (L, result["median_s"])
    return dict(result, min_s=min(result["times_s"]), predicted_s=predicted, peak_rss_bytes=peak,
                rss_before_bytes=before)


def _series(point):
    return (point["kind"], point["level"], point["mode"], point["impl"])


@torch.no_grad()
def _scan_per_token(point):
    b, d, n, L = point["b"], point["d"], point["n"], point["L"]
    if point["mode"] == "reforward":
        x = scan_inputs(b, d, n, L)
        return _timed(_series(point), L, lambda: impls.selective_scan(**x, impl=point["impl"]),
                      single_after_s=REFORWARD_SINGLE_S)
    x = scan_inputs(b, d, n, L + 1)
    prefix = {k: (v[..., :L] if isinstance(v, torch.Tensor) and v.dim() == 3 else v) for k, v in x.items()}
    _, state = impls.selective_scan(**prefix, return_last_state=True, impl=point["prefill_impl"])
    args = step_args(x, L)          # the token at position L
    # each run advances the state by one more token: the cost of a step does not depend on where it is
    return dict(_timed(_series(point), L, lambda: impls.selective_state_update(state, *args, impl=point["impl"])),
                state_bytes=state.numel() * state.element_size())


@torch.no_grad()
def _model_per_token(point):
    model, L = (small_model() if point["model"] == MODEL else peer_models(point["model"])[0]), point["L"]
    ids = torch.randint(0, model.config.vocab_size, (1, L), generator=torch.Generator().manual_seed(1))
    if point["mode"] == "reforward":
        return _timed(_series(point), L, lambda: model(ids, impl=point["impl"], num_last_tokens=1)[:, -1].argmax(-1),
                      single_after_s=REFORWARD_SINGLE_S)
    logits, cache = model.prefill(ids, impl=point["prefill_impl"])
    token = logits.argmax(-1)
    return dict(_timed(_series(point), L, lambda: model.step(token, cache, impl=point["impl"]).argmax(-1)),
                cache_bytes=cache.nbytes())


@torch.no_grad()
def _model_cumulative(point):
    model, L = small_model(), point["L"]
    prompt = torch.tensor([[1]])
    if point["mode"] == "reforward":
        fn = lambda: model.generate(prompt, L, mode="reforward", impl=point["impl"])  # noqa: E731
    else:
        fn = lambda: model.generate(prompt, L, mode="recurrent", impl=point["prefill_impl"],  # noqa: E731
                                    step_impl=point["impl"])
    scale = L if point["mode"] == "recurrent" else L * L   # what the total time grows with, for the prediction
    result = _timed(_series(point), scale, fn, single_after_s=1.0)
    return dict(result, per_token_mean_s=result["median_s"] / L)


# ------------------------------------------------------------------------- against the peers

_peer_models = {}   # PEER_MODELS name -> (MambaLM, MambapyLM): built once per process (130m takes seconds)
_stored = {}        # a side-by-side group's key -> {impl: result} not yet returned


def peer_models(model):
    """(our MambaLM with PEER_MODELS' sizes and random official-initialised weights, seed 0; mamba.py's
    model holding the same weights)."""
    key = json.dumps(model, sort_keys=True)
    if key not in _peer_models:
        from impls.mambapy_model import from_mamba_lm
        from impls.model import MambaConfig, MambaLM

        _peer_models.clear()  # one pair at a time: 130m's pair holds about 1.2 GB
        with torch.random.fork_rng():
            torch.manual_seed(0)
            ours = MambaLM(MambaConfig(**model)).eval()
        _peer_models[key] = (ours, from_mamba_lm(ours))
    return _peer_models[key]


def side_by_side(fns, rounds=PEER_ROUNDS, block_s=PEER_BLOCK_S):
    """Time several callables against each other on a shared, noisy machine.

    Each is called once (warm-up, and to size its block: as many calls as fill block_s, at least
    one); then ``rounds`` rounds, in each of which every callable runs one timed block, the order
    rotated from round to round. Returns {name: dict(median_s, iqr_s, min_s, runs, times_s, calls_per_block)},
    per call; times_s[r] is round r, so ratios can be taken round by round."""
    names = list(fns)
    calls = {}
    for name in names:
        t0 = time.perf_counter()
        fns[name]()
        calls[name] = max(1, int(block_s / max(time.perf_counter() - t0, 1e-9)))
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, k = fns[name], calls[name]
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            times[name].append((time.perf_counter() - t0) / k)
    out = {}
    for name, ts in times.items():
        q = torch.tensor(ts, dtype=torch.float64).quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
        out[name] = dict(median_s=float(q[1]), iqr_s=float(q[2] - q[0]), min_s=min(ts), runs=len(ts), times_s=ts,
                         calls_per_block=calls[name])
    return out


def ratio_stats(ours, peer):
    """Median and quartiles over rounds of ours / peer, round by round (two side_by_side results)."""
    r = torch.tensor([a / b for a, b in zip(ours["times_s"], peer["times_s"])], dtype=torch.float64)
    q = r.quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return dict(ratio_to_mambapy=float(q[1]), ratio_q1=float(q[0]), ratio_q3=float(q[2]))


def _group_key(point):
    return json.dumps({k: v for k, v in point.items() if k not in ("impl", "how")}, sort_keys=True, default=str)


def _from_group(point, measure_group):
    """The result for point's impl from its side-by-side group, measuring the group if needed."""
    key = _group_key(point)
    if point["impl"] not in _stored.get(key, {}):
        _stored[key] = measure_group(point)
    return _stored[key].pop(point["impl"])


@torch.no_grad()
def _peer_per_token(point):
    def measure_group(point):
        from impls.mambapy_model import caches_from

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
        result = side_by_side(fns)
        group = "+".join(point["side_by_side"])
        out = {n: dict(r, measured_with=group, cache_bytes=cache.nbytes()) for n, r in result.items()}
        for n in point["side_by_side"]:
            if n != PEER:
                out[n].update(ratio_stats(result[n], result[PEER]))
        return out

    return _from_group(point, measure_group)


@torch.no_grad()
def _peer_prefill(point):
    def measure_group(point):
        from impls.mambapy_model import greedy

        ours, peer = peer_models(point["model"])
        ids = torch.randint(0, ours.config.vocab_size, (1, point["L"]), generator=torch.Generator().manual_seed(1))
        pre = [n for n in point["side_by_side"] if n != PEER][0]
        fns = {pre: lambda: ours.prefill(ids, impl=pre), PEER: lambda: peer.prefill(ids)}
        result = side_by_side(fns, rounds=PREFILL_ROUNDS, block_s=0.0)
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
        out = {n: dict(r, measured_with=f"{pre}+{PEER}", **check) for n, r in result.items()}
        r = ratio_stats(result[pre], result[PEER])
        out[pre].update(r, speedup_over_mambapy=1.0 / r["ratio_to_mambapy"])
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
        if point["level"] == "scan":
            return _scan_per_token(point)
        return _model_per_token(point)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":  # a memory point in its own process: prints one JSON line
    print(json.dumps(recurrent_memory(json.loads(sys.argv[1]))))
