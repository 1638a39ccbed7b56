"""Our Mamba language model against mamba.py's, with the same weights (impls/adapters/mambapy_model.py).

mamba.py is an independent reading of the paper and the official code, so agreement checks our
block (conv, projections, dt, gating, norm), not only our scans against each other. Weights are
random in every parameter (norm gains, A_log, D, conv and dt biases included: with the official
initialisation's ones and zeros a swapped or missing term could go unseen).

The tolerance policy (equivalence/tolerance.py), as in test_model.py: the oracle is our model in
float64 through the loop over the whole sequence, the baseline our float32 model through the loop,
and ``length`` is tolerance.terms("y", l, n) for a sequence of l tokens.

Checked: mamba.py's full forward (its parallel pscan and its sequential scan) and its step-by-step
decoding give our logits at every position; a prompt prefilled into our decode cache with one scan
and one prefilled by mamba.py token by token (a loop of its ``step``) give the same next tokens;
our cache converted to mamba.py's continues exactly as mamba.py's own.
"""

import dataclasses

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import impls
from impls.adapters import mambapy_model
from impls.models.mamba import MambaConfig, MambaLM
from .model_helpers import check, one_thread, randomized_pair  # noqa: F401

pytest.importorskip("mambapy.mamba")


@dataclasses.dataclass(frozen=True)
class ParityCase:
    d_model: int
    n_layer: int
    vocab: int
    l: int               # tokens
    b: int = 1
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: object = "auto"
    bias: bool = False
    conv_bias: bool = True
    seed: int = 0

    @property
    def id(self):
        return (f"m{self.d_model}-L{self.n_layer}-v{self.vocab}-l{self.l}-b{self.b}-n{self.d_state}-k{self.d_conv}"
                f"-e{self.expand}-r{self.dt_rank}-bias{int(self.bias)}-cb{int(self.conv_bias)}-s{self.seed}")

    def config(self):
        return MambaConfig(d_model=self.d_model, n_layer=self.n_layer, vocab_size=self.vocab,
                           ssm_cfg=dict(d_state=self.d_state, d_conv=self.d_conv, expand=self.expand,
                                        dt_rank=self.dt_rank, bias=self.bias, conv_bias=self.conv_bias))

    def build(self):
        """(float32 model, float64 copy, mamba.py peer in float32, ids (b, l))."""
        model, model64, ids = randomized_pair(MambaLM, self.config(), self.seed, (self.b, self.l), self.vocab)
        return model, model64, mambapy_model.from_mamba_lm(model), ids


parity_cases = st.builds(
    ParityCase, d_model=st.integers(4, 32), n_layer=st.integers(1, 3), vocab=st.integers(8, 64),
    l=st.integers(1, 40), b=st.integers(1, 2), d_state=st.integers(1, 16), d_conv=st.integers(2, 4),
    expand=st.integers(1, 2), dt_rank=st.one_of(st.just("auto"), st.integers(1, 8)), bias=st.booleans(),
    conv_bias=st.booleans(), seed=st.integers(0, 2**31 - 1))


@given(case=parity_cases)
@example(case=ParityCase(d_model=16, n_layer=2, vocab=40, l=1))
@example(case=ParityCase(d_model=24, n_layer=2, vocab=45, l=37, b=2, bias=True, conv_bias=False, seed=3))
def test_same_weights_same_logits_forward_and_step_by_step(case):
    """mamba.py's full forward (pscan and sequential) and its step-by-step decoding, and our
    step-by-step decoding, give the float64 oracle's logits at every position within the policy."""
    model, model64, peer, ids = case.build()
    l, n = ids.shape[1], model.config.d_state
    with torch.no_grad():
        oracle = model64(ids, impl="loop")
        baseline = model(ids, impl="loop")
        check("mamba.py forward (pscan)", case, peer(ids), oracle, baseline, l, n)
        sequential = mambapy_model.from_mamba_lm(model, pscan=False)
        check("mamba.py forward (sequential scan)", case, sequential(ids), oracle, baseline, l, n)

        caches, theirs = peer.new_caches(case.b), []
        cache, ours = model.new_cache(case.b), []
        for t in range(l):
            logits, caches = peer.step(ids[:, t], caches)
            theirs.append(logits)
            ours.append(model.step(ids[:, t], cache))
        check("mamba.py step by step", case, torch.stack(theirs, 1), oracle, baseline, l, n)
        check("our step by step", case, torch.stack(ours, 1), oracle, baseline, l, n)


PREFILL_CASES = [ParityCase(d_model=32, n_layer=2, vocab=64, l=48, seed=5),
                 ParityCase(d_model=16, n_layer=3, vocab=50, l=23, b=2, d_state=8, d_conv=3, seed=6)]
NEW_TOKENS = 8


@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: c.id)
def test_prefill_by_one_scan_gives_mambapy_next_tokens(impl, case):
    """Our prefill (one impls.selective_scan over the prompt into the decode cache) then greedy steps,
    against mamba.py's token-by-token prefill then greedy steps: the same tokens (a different token
    only where the oracle's top two logits tie within the policy's bound), and both sets of logits
    within the policy of the float64 oracle on those tokens."""
    entry = impls.get(impl)
    if entry.supports["case_limits"]:
        pytest.skip(f"{impl}: interpreted (case_limits {entry.supports['case_limits']}); test_model.py covers it")
    if torch.float32 not in entry.supports["dtypes"]:
        pytest.skip(f"{impl}: declared gap: no float32")
    model, model64, peer, ids = case.build()
    l, n, V = case.l, model.config.d_state, model.config.vocab_size
    with torch.no_grad():
        ours, our_logits = model.generate(ids, NEW_TOKENS, mode="recurrent", impl=impl, step_impl="recurrent",
                                          return_logits=True)
        theirs, their_logits = peer.generate(ids, NEW_TOKENS)
        length, oracles, bounds = l + NEW_TOKENS, {}, {}
        for tokens, logits, who in ((ours, our_logits, "ours"), (theirs, their_logits, "mamba.py")):
            oracles[who] = model64(tokens[:, :-1], impl="loop")[:, l - 1:]
            baseline = model(tokens[:, :-1], impl="loop")[:, l - 1:]
            bounds[who] = check(f"{who}: logits after the prefill, impl={impl!r}", case, logits, oracles[who],
                                baseline, length, n).bound
        for row in range(case.b):
            diff = (ours[row, l:] != theirs[row, l:]).nonzero()
            if len(diff):  # only a true tie may differ (the oracle on our tokens, up to there, is shared)
                s = int(diff[0])
                a, b = int(ours[row, l + s]), int(theirs[row, l + s])
                gap = abs(float(oracles["ours"][row, s, a] - oracles["ours"][row, s, b]))
                assert gap <= 2 * bounds["ours"], (f"{case!r}, impl={impl!r}: row {row}: step {s} chose {a}, "
                                                   f"mamba.py chose {b}; float64 logits differ by {gap:.3g}")
        assert (ours[:, l:] < V).all() and (theirs[:, l:] < V).all()


@pytest.mark.parametrize("case", PREFILL_CASES[:1], ids=lambda c: c.id)
def test_our_cache_continues_in_mambapy(case):
    """Our prefill's cache, converted to mamba.py's (h, last k-1 conv inputs), steps on in mamba.py
    exactly as its own token-by-token prefill does: the same state, in two layouts."""
    model, model64, peer, ids = case.build()
    l, n = case.l, model.config.d_state
    half = l // 2
    with torch.no_grad():
        oracle = model64(ids, impl="loop")[:, half - 1:]
        baseline = model(ids, impl="loop")[:, half - 1:]
        logits, cache = model.prefill(ids[:, :half], impl="loop")
        caches, got = mambapy_model.caches_from(cache), [logits]
        for t in range(half, l):
            step_logits, caches = peer.step(ids[:, t], caches)
            got.append(step_logits)
    check("mamba.py stepping from our cache", case, torch.stack(got, 1), oracle, baseline, l, n)


def test_weight_mapping_sets_every_peer_parameter():
    model, _, peer, _ = ParityCase(d_model=20, n_layer=2, vocab=45, bias=True, l=1, seed=2).build()
    ours, theirs = model.state_dict(), peer.state_dict()
    assert set(theirs) == {"mamba." + k[len("backbone."):] for k in ours if k.startswith("backbone.layers.")} | {
        "embedding.weight", "norm_f.weight", "lm_head.weight"}
    for k, v in theirs.items():
        source = {"embedding.weight": "backbone.embedding.weight", "norm_f.weight": "backbone.norm_f.weight",
                  "lm_head.weight": "lm_head.weight"}.get(k, "backbone." + k[len("mamba."):])
        assert torch.equal(v, ours[source]), k
    # mamba.py's LM unties its head: a copy of our tied embedding, in its own storage
    assert peer.lm_head.weight.data_ptr() != peer.embedding.weight.data_ptr()
    assert peer.lm_head.weight.is_contiguous()


def test_layernorm_models_are_refused():
    model = MambaLM(MambaConfig(d_model=8, n_layer=1, vocab_size=16, rms_norm=False))
    with pytest.raises(NotImplementedError, match="rms_norm"):
        mambapy_model.from_mamba_lm(model)


def test_decode_storage_survives_conversion_and_loading(tmp_path):
    """impls/models/mamba.py stores matrices with more outputs than inputs transposed (its decoding speed
    depends on it); a dtype change, load_state_dict and a save/load round trip keep that storage."""
    model = MambaLM(MambaConfig(d_model=48, n_layer=1, vocab_size=60))   # dt_rank 3: every matrix 2-D proper

    def transposed(m):
        mixer = m.backbone.layers[0].mixer
        return [w.stride() == (1, w.shape[0]) for w in (mixer.in_proj.weight, mixer.dt_proj.weight,
                                                        m.backbone.embedding.weight, m.lm_head.weight)]
    assert all(transposed(model)) and model.lm_head.weight is model.backbone.embedding.weight
    assert model.backbone.layers[0].mixer.out_proj.weight.is_contiguous()   # out < in: usual storage
    assert all(transposed(model.double()))
    model.save_pretrained(tmp_path)
    assert all(transposed(MambaLM.from_pretrained(tmp_path)))
