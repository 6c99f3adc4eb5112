"""``vllm-cmasd bench-serve`` end to end on the tiny pair: real servers, small numbers."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.serve, pytest.mark.slow]


def test_bench_serve_smoke(tiny_pair, tmp_path):
    from test_engine import PROMPTS

    from vllm_cmasd.bench.runner import MethodSpec, cmasd_exact
    from vllm_cmasd.bench.serve_load import ServeBenchConfig, run_serve_bench

    target, draft = tiny_pair
    cfg = ServeBenchConfig(
        target=str(target), draft=str(draft),
        # Two servers keep it short; vLLM's fixed-k method runs in the real benchmark.
        methods=[MethodSpec("ar"), cmasd_exact(4)],
        concurrencies=[1, 3], requests_per_concurrency=2, min_requests=4, max_tokens=12, max_model_len=512,
        kv_cache_gib=0.25, block_size=32, startup_timeout=300, request_timeout=120,
    )
    record = run_serve_bench(cfg, tmp_path, prompts=PROMPTS)
    saved = json.loads((tmp_path / "serve.json").read_text())
    assert saved["settings"]["methods"] == ["ar", "cmasd_exact k_max=4"]
    # --block-size reaches every server (vLLM's /metrics reports the cache config it runs).
    assert saved["settings"]["server_overrides"]["block_size"] == 32
    assert {r["summary"]["block_size"] for r in record["results"]} == {32}
    # Each level's prefix-cache hit rate, from vLLM's counters (prompts repeat across levels).
    rates = [r["summary"]["prefix_cache_hit_rate"] for r in record["results"]]
    assert all(0 <= rate <= 1 for rate in rates) and any(rate > 0 for rate in rates)
    # vLLM's own client measured, and wrote its result JSON per method and level.
    for r in record["results"]:
        theirs = json.loads((tmp_path / r["vllm_result"]).read_text())
        assert theirs["completed"] == r["summary"]["requests"] and theirs["output_throughput"] > 0
        assert theirs["backend"] == "openai-chat" and theirs["max_concurrency"] == r["summary"]["concurrency"]
    summaries = [r["summary"] for r in record["results"]]
    assert [(s["method"], s["concurrency"], s["requests"]) for s in summaries] == [
        ("ar", 1, 4), ("ar", 3, 6), ("cmasd_exact", 1, 4), ("cmasd_exact", 3, 6),  # at least 4 per level
    ]
    for s in summaries:
        assert s["errors"] == 0
        # The counters read around a level count its measured requests, not vLLM's client's warm-up.
        assert s["server_requests"] == s["requests"]
        assert s["throughput_tok_s"] > 0 and 0 < s["ttft_p50_s"] <= s["e2e_p50_s"] <= s["e2e_p99_s"]
        assert s["tpot_p50_s"] > 0
        # CM-ASD's own counters, read from /metrics: the window never skips the drafter.
        assert s["cmasd_skipped_drafter_passes"] == 0 and s["cmasd_catch_up_tokens"] == 0
        assert s["cmasd_exploring_passes"] == 0
        assert (s["cmasd_drafter_seconds"] > 0) == (s["method"] == "cmasd_exact")  # time in the proposer
        assert 0 < s["mean_output_tokens"] <= 12
    # Speculation happened only where it was asked for.
    assert all(s["mean_draft_length"] == 0 for s in summaries if s["method"] == "ar")
    assert all(1 <= s["mean_draft_length"] <= 4 for s in summaries if s["method"] == "cmasd_exact")
    # Same prompts, greedy: CM-ASD's answers are plain decoding's.
    texts = {(r["summary"]["method"], r["summary"]["concurrency"]): r["texts"] for r in record["results"]}
    assert all(len(t) == n and all(t) for t, n in zip(texts.values(), (4, 6, 4, 6)))
    assert texts[("cmasd_exact", 1)] == texts[("ar", 1)]
    assert texts[("cmasd_exact", 3)] == texts[("ar", 3)]
    table = (tmp_path / "serve.md").read_text()
    assert "| ar | 0 | 1 | 4 | 0 |" in table and "| cmasd_exact k_max=4 | 0 | 3 | 6 | 0 |" in table
    # The method against plain decoding, per level (one round: one ratio each).
    ratios = {(r["label"], r["concurrency"]): r for r in saved["speedup_vs_ar"]}
    assert set(ratios) == {("cmasd_exact k_max=4", 1), ("cmasd_exact k_max=4", 3)}
    plain = {s["concurrency"]: s["throughput_tok_s"] for s in summaries if s["method"] == "ar"}
    for s in summaries:
        if s["method"] != "ar":
            assert ratios[(s["label"], s["concurrency"])]["ratios"] == [
                pytest.approx(s["throughput_tok_s"] / plain[s["concurrency"]])
            ]
    assert not list(tmp_path.glob("logs/*.stderr.log")) or all(
        "Traceback" not in p.read_text() for p in tmp_path.glob("logs/*.stderr.log")
    )


def test_rounds_alternate_the_servers_and_ratios_pair_within_a_round():
    """With --rounds, each method's server runs once a round, the order
    reversed every other round; a method is compared with plain decoding's
    server of the same round, and the rounds' median is reported."""
    from vllm_cmasd.bench.runner import MethodSpec, cmasd
    from vllm_cmasd.bench.serve_load import round_order, speedups_vs_ar

    ar, ctl = MethodSpec("ar"), cmasd(8)
    assert [(r, m.method) for r, m in round_order([ar, ctl], 3)] == [
        (0, "ar"), (0, "cmasd"), (1, "cmasd"), (1, "ar"), (2, "ar"), (2, "cmasd"),
    ]

    def row(method, label, round_, tok_s, c=8):
        return {"method": method, "label": label, "round": round_, "concurrency": c, "throughput_tok_s": tok_s}

    summaries = [row("ar", "ar", 0, 100.0), row("cmasd", ctl.label, 0, 90.0),
                 row("cmasd", ctl.label, 1, 120.0), row("ar", "ar", 1, 100.0),
                 row("ar", "ar", 2, 50.0), row("cmasd", ctl.label, 2, 50.0)]
    (only,) = speedups_vs_ar(summaries)
    assert (only["label"], only["concurrency"]) == (ctl.label, 8)
    assert only["ratios"] == [0.9, 1.2, 1.0] and only["median"] == 1.0
    assert (only["min"], only["max"]) == (0.9, 1.2)
    low, high = only["interval"]
    assert low < (0.9 * 1.2 * 1.0) ** (1 / 3) < high  # around the rounds' geometric mean
    assert speedups_vs_ar([row("cmasd", ctl.label, 0, 90.0)]) == []  # no plain decoding to compare with
