"""The bandwidth sweep (engine.ep_sweep) on 2 gloo processes at small sizes: sizes, bytes and
bandwidths add up, the layer's output is right at every size, bad sizes are refused."""

import json

import pytest

from engine.ep_launch import torchrun
from engine.ep_sweep import PUBLISHED, parse_sizes, summarize, sweep_settings
from engine.expert_parallel import EPSettings, ep_stats


@pytest.mark.slow
def test_sweep_on_two_ranks_reports_every_size_with_its_bytes(tmp_path):
    torchrun("engine.ep_sweep", ["--mb", "0.02,0.08", "--decode", "--experts", "16",
                                 "--d-model", "32", "--dtype", "fp32", "--reps", "2",
                                 "--warmup", "1", "--warmup-s", "0", "--batches", "1",
                                 "--backend", "gloo", "--timeout", "30", "--out", str(tmp_path)],
             2, 150.0, "sweep")
    doc = json.loads((tmp_path / "ep_sweep_gloo_2ranks.json").read_text())
    assert doc["world"] == 2 and doc["nvlink_GBps"] == 450.0 and doc["published"] == PUBLISHED
    rows = doc["sweep"]
    # k 8 rows of 32 fp32 values (128 bytes each) per token: 0.02 MB -> 20 tokens, 0.08 MB -> 78;
    # then the decoding case, 128 tokens.
    assert [r["tokens"] for r in rows] == [20, 78, 128]
    assert [r["case"] for r in rows] == ["sweep", "sweep", "decode"]
    for r in rows:
        assert r["payload_MB"] == pytest.approx(r["tokens"] * 8 * 32 * 4 / 1e6)
        assert r["max_abs_err"] < 1e-5  # the layer's output against the single-process reference
        # The dispatch's bytes on the wire: the what-if's count of off-rank rows of the busier
        # source rank (batch 0 of the same routing), over the dispatch's time.
        s = EPSettings(experts=16, ranks=2, top_k=8, tokens=r["tokens"], d_model=32,
                       dtype="fp32", router="topk")
        sent = ep_stats(s).dispatch_bytes()  # [src][dst]
        off = max(sum(b for dst, b in enumerate(row) if dst != src) for src, row in enumerate(sent))
        assert r["dispatch_busbw_GBps"] == pytest.approx(off / r["dispatch_ms"] / 1e6)
        # The combine sends back what a rank received: the dispatch's columns.
        back = max(sum(row[dst] for src, row in enumerate(sent) if src != dst) for dst in range(2))
        assert r["combine_busbw_GBps"] == pytest.approx(back / r["combine_ms"] / 1e6)
        assert r["even_busbw_GBps"] == pytest.approx(r["payload_MB"] / 2 / r["even_ms"])  # MB/ms = GB/s


def test_summary_takes_the_slowest_rank_and_half_the_payload_leaves_each_of_two():
    rows = [{"tokens": 10, "payload_bytes": 8e6, "max_abs_err": 0.0, "off_rank_bytes": 3e6,
             "combine_off_rank_bytes": 2e6 + r,
             "even_ms": 1.0 + r, "plain_dispatch_ms": 2.0, "dispatch_ms": 4.0 - r,
             "plain_combine_ms": 1.0, "combine_ms": 2.0} for r in range(2)]
    s = summarize(rows, 2)
    assert s["even_ms"] == 2.0 and s["dispatch_ms"] == 4.0
    assert s["even_busbw_GBps"] == pytest.approx(4e6 / 2.0 / 1e6)  # (R-1)/R of 8 MB in 2 ms
    assert s["even_algbw_GBps"] == pytest.approx(8e6 / 2.0 / 1e6)
    assert s["dispatch_busbw_GBps"] == pytest.approx(3e6 / 4.0 / 1e6)
    assert s["combine_busbw_GBps"] == pytest.approx((2e6 + 1) / 2.0 / 1e6)
    assert s["dispatch_ratio"] == 0.5 and s["combine_ratio"] == 0.5


def test_sizes_become_tokens_of_the_deepseek_like_layer():
    base = EPSettings(experts=256, ranks=4, top_k=8, tokens=1, d_model=7168, router="topk")
    # A row is 7168 bf16 values = 14336 bytes; 8 per token.
    assert sweep_settings(256e6, base).tokens == round(256e6 / (8 * 14336)) == 2232
    assert sweep_settings(1.0, base).tokens == 1


@pytest.mark.parametrize("text,message", [("", "at least one"), ("1,x", "comma list"),
                                          ("0", "--mb must be > 0"),
                                          ("5000", "--mb must be <= 4096")])
def test_bad_sizes_are_refused_naming_the_flag(text, message):
    with pytest.raises(ValueError, match=message):
        parse_sizes(text)
