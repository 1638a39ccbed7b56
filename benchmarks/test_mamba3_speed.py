"""benchmarks/mamba3_speed.py end to end on a tiny model: every record written and read back with
its fields (no time is asserted: this machine is shared)."""

import math

from benchmarks.common import read_jsonl
from benchmarks.mamba3_speed import main

TINY = dict(d_model=16, n_layer=1, vocab_size=20)


def test_mamba3_speed_end_to_end(tmp_path):
    out = tmp_path / "mamba3_speed.jsonl"
    records = main(["--L", "4", "8", "16", "--decode-L", "4", "--prefill-L", "8", "--rounds", "3", "--block-s", "0.001",
                    "--threads", "1", "--out", str(out)], model=TINY, ssm_cfg=dict(d_state=8, headdim=8, chunk_size=4))
    kinds = [r["kind"] for r in records]
    written, problems = read_jsonl(out)
    assert not problems and [r["kind"] for r in written] == kinds
    assert kinds == ["mamba3_per_token"] * 3 + ["mamba3_slope"] * 2 + ["mamba3_decode", "mamba3_prefill"]
    for r in records:
        assert r["model"] == TINY and r["machine"]
    for r in records[:3]:
        assert r["reforward_median_s"] > 0 and r["recurrent_median_s"] > 0 and r["load_before"] >= 0
    assert {r["mode"] for r in records[3:5]} == {"reforward", "recurrent"}
    assert all(math.isfinite(r["slope"]) for r in records[3:5])
    decode, prefill = records[5], records[6]
    assert decode["ratio_to"] == "mamba2" and decode["mamba3_median_s"] > 0 and decode["mamba2_median_s"] > 0
    assert prefill["ratio_to"] == "prefill" and prefill["target"] == 10.0 and isinstance(prefill["meets_target"], bool)
