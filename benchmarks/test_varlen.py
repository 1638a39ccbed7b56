"""benchmarks/varlen.py measures what it says: the packed and the padded inputs hold the same
sequences, padding changes no state, and a run records both sides (small sizes, no timing asserted)."""

import pytest
import torch

import impls
from benchmarks import varlen


def test_lengths_are_long_tailed_between_16_and_4096():
    lengths = varlen.draw_lengths(64, seed=0)
    assert len(lengths) == 64 and min(lengths) >= 16 and max(lengths) <= 4096
    assert sorted(lengths)[32] < sum(lengths) / 64     # median below the mean: a long right tail
    assert max(lengths) > 2048                          # so padding to the longest costs


def test_packed_and_padded_inputs_hold_the_same_sequences():
    lengths = [16, 3, 40]
    packed, padded = varlen.make_inputs(lengths, d=3, n=2, seed=1)
    assert packed["u"].shape == (1, 3, 59) and padded["u"].shape == (3, 3, 40)
    assert packed["cu_seqlens"].tolist() == [0, 16, 19, 59]
    assert torch.equal(padded["u"][1, :, :3], packed["u"][0, :, 16:19])
    assert torch.isneginf(padded["delta"][1, :, 3:]).all() and torch.isfinite(padded["delta"][1, :, :3]).all()


def test_padding_with_delta_minus_inf_changes_no_state():
    """The padded call's last states are the sequences' own (not the states after the padding)."""
    lengths = [5, 17, 2]
    packed, padded = varlen.make_inputs(lengths, d=4, n=3, seed=2)
    for impl in ("loop", "parallel"):
        _, s_packed = impls.selective_scan(**packed, return_last_state=True, impl=impl)
        _, s_padded = impls.selective_scan(**padded, return_last_state=True, impl=impl)
        assert (s_packed - s_padded).abs().max() < 1e-5 * s_packed.abs().max()
    assert varlen.agree("parallel", packed, padded) < 1e-5


def test_a_run_records_both_sides(tmp_path):
    out = tmp_path / "varlen.jsonl"
    record = varlen.run(nseq=3, d=2, n=2, rounds=2, out=str(out), log=lambda *_: None, memory=False)
    assert record["packed_tokens"] == sum(record["lengths"]) < record["padded_tokens"]
    assert len(record["packed"]["cpu_s"]) == len(record["padded"]["cpu_s"]) == 2 and record["speedup"]["ratio"] > 0
    assert out.read_text().count("\n") == 1


@pytest.mark.family("ssd")
def test_ssd_packed_and_padded_inputs_hold_the_same_sequences():
    packed, padded = varlen.make_ssd_inputs([16, 3, 40], d=4, n=2, seed=1, headdim=2)
    assert packed["x"].shape == (1, 59, 2, 2) and padded["x"].shape == (3, 40, 2, 2)
    assert packed["cu_seqlens"].tolist() == [0, 16, 19, 59]
    assert torch.equal(padded["x"][1, :3], packed["x"][0, 16:19])
    assert torch.isneginf(padded["dt"][1, 3:]).all() and torch.isfinite(padded["dt"][1, :3]).all()


@pytest.mark.family("ssd")
def test_ssd_padding_with_dt_minus_inf_changes_no_state():
    """The padded SSD call's final states are the sequences' own, for the loop and chunked."""
    packed, padded = varlen.make_ssd_inputs([5, 17, 2], d=4, n=3, seed=2, headdim=2, chunk_size=4)
    for impl in ("loop", "chunked"):
        _, s_packed = impls.ssd_scan(**packed, return_final_states=True, impl=impl)
        _, s_padded = impls.ssd_scan(**padded, return_final_states=True, impl=impl)
        assert (s_packed - s_padded).abs().max() < 1e-5 * s_packed.abs().max()
    assert varlen.agree("chunked", packed, padded, "ssd") < 1e-5


@pytest.mark.family("ssd")
def test_an_ssd_run_records_both_sides(tmp_path):
    out = tmp_path / "varlen.jsonl"
    record = varlen.run("chunked", nseq=3, d=4, n=2, rounds=2, out=str(out), log=lambda *_: None, memory=False,
                        family="ssd", headdim=2, chunk_size=8)
    assert record["family"] == "ssd" and record["packed_tokens"] == sum(record["lengths"]) < record["padded_tokens"]
    assert len(record["packed"]["cpu_s"]) == len(record["padded"]["cpu_s"]) == 2 and record["speedup"]["ratio"] > 0
