"""The benchmark harness end to end on the tiny pair (micro preset), and its prompt set."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vllm_cmasd.bench.runner import CMASD_METHODS, FIXED_K_METHODS as FIXED_K, METHODS
from vllm_cmasd.policies import VERIFICATION_POLICIES

pytestmark = pytest.mark.engine

# Methods whose drafting is decided by measured costs (the controller, or the window's budget).
CONTROLLED = {"cmasd", "cmasd_confidence", "cmasd_topk", "rstitch", "specbound", "cmasd_budget", "cmasd_eagle3"}
RECORD_FIELDS = {
    "method", "setting", "task", "k", "batch_size", "tokens_per_s", "speedup_vs_ar",
    "mean_acceptance_length", "draft_length_histogram", "rollback_rate", "rel_bleu_vs_ar",
    "rouge_l_vs_ar", "identical_to_ar", "oracle_fraction", "oracle_speedup", "machine",
}


def test_committed_prompts_are_fixed_and_sourced():
    from vllm_cmasd.bench.prompts import TASKS, load_prompts

    data = load_prompts()
    assert isinstance(data["version"], int)
    ids = set()
    for task in TASKS:
        items = data["tasks"][task]
        assert len(items) >= 16, task  # the full preset's batch of 16
        for item in items:
            assert item["prompt"].strip() and item["source"], item
            # Never the draft's training text (stdlib docstrings, common-licenses).
            assert "common-licenses" not in item["source"], item["source"]
            assert item["source"].split(":")[0] in {"pypi-metadata", "debian-doc", "manpage"}, item["source"]
            assert item["id"] not in ids
            ids.add(item["id"])


def test_training_prompts_leave_the_benchmark_unseen():
    """The draft's benchmark-domain training prompts (scripts/train_draft.py) share the
    benchmark's templates but none of its documents or passages."""
    from vllm_cmasd.bench.prompts import TASKS, load_prompts, origin_key, training_prompts

    bench = [q for items in load_prompts()["tasks"].values() for q in items]
    train = training_prompts(english_man_pages=40, python_doc_files=1500)
    assert {q["task"] for q in train} == set(TASKS)
    assert any(q["source"].startswith("pydoc:") for q in train)
    assert any(q["source"].startswith("debian-doc:") and "/README" not in q["source"] for q in train)
    origins = {origin_key(q["source"]) for q in bench}
    assert not origins & {q["origin"] for q in train}
    bench_text = "\0".join(q["prompt"] for q in bench)
    for q in train:
        body = q["prompt"].split("\n\n", 1)[-1]
        assert body not in bench_text, q["source"]
    # Nor a file that another Debian package ships with the same bytes.
    def debian_files(prompts):
        return {q["source"].split(":", 1)[1].split("#")[0] for q in prompts if q["source"].startswith("debian-doc:")}

    bench_bytes = {Path(f).read_bytes() for f in debian_files(bench)}
    assert not [f for f in debian_files(train) if Path(f).read_bytes() in bench_bytes]
    # Without exclusion the same code rebuilds benchmark prompts: the templates are shared.
    everything = {q["prompt"] for q in training_prompts({"tasks": {}}, english_man_pages=0, python_doc_files=0)}
    assert any(q["prompt"] in everything for q in bench)
    # One origin per document, across languages and versions.
    assert origin_key("manpage:/usr/share/man/de/man1/dpkg.1.gz#paragraph3:de") == origin_key(
        "manpage:/usr/share/man/man1/dpkg.1.gz#NAME"
    )
    assert origin_key("pypi-metadata:Foo_Bar==1.0#Summary") == origin_key("pypi-metadata:foo-bar==2.1#paragraph4")
    # A package's docstrings belong to its README's document: left out with it.
    assert origin_key("pydoc:foo_bar==2.1:foo_bar/core.py:Parser:12#paragraph0") == origin_key(
        "pypi-metadata:Foo-Bar==1.0#paragraph2"
    ) == origin_key("pypi-doc:foo-bar==2.1:foo_bar/guide.md#paragraph0")
    # A Debian package's guides belong with its README.
    assert origin_key("debian-doc:/usr/share/doc/sed/sed.txt.gz#paragraph9") == origin_key(
        "debian-doc:/usr/share/doc/sed/README#paragraph0"
    ) != origin_key("debian-doc:/usr/share/doc/bash/README#paragraph0")


@pytest.fixture(scope="module")
def micro_bench(tiny_pair, tiny_self_draft, tiny_eagle3, tmp_path_factory):
    from vllm_cmasd.bench import resolve_preset, run_bench

    target, draft = tiny_pair
    out = tmp_path_factory.mktemp("bench")
    env_before = dict(os.environ)
    bench = run_bench(
        resolve_preset("micro"), out, target=target, draft=draft, self_draft=tiny_self_draft, eagle3=tiny_eagle3,
        progress=False,
    )
    # The benchmark's engine settings (a 2 GiB KV-cache pool for every engine,
    # ...) must not outlive it: later engines in this process set their own.
    assert dict(os.environ) == env_before
    return bench, out


def test_micro_bench_writes_files(micro_bench):
    bench, out = micro_bench
    for name in ("bench.json", "bench.md", "speedup.png", "tradeoff.png", "acceptance.png", "controller.png"):
        assert (out / name).stat().st_size > 0, name
    on_disk = json.loads((out / "bench.json").read_text())
    assert on_disk["records"] and on_disk["summary"]
    assert "| method |" in (out / "bench.md").read_text()
    assert (out / "speedup.png").read_bytes()[:4] == b"\x89PNG"


def test_micro_bench_records(micro_bench):
    bench, _ = micro_bench
    assert bench["failed"] == {}, bench["failed"]
    records = bench["records"]
    assert {r["method"] for r in records} == set(METHODS)
    assert {r["task"] for r in records} == {"summarization", "translation", "instruction"}
    assert {r["batch_size"] for r in records} == {1, 2}
    machine = bench["machine"]
    assert machine["cpu_model"] and machine["cpu_cores"] >= 1 and machine["torch"] and machine["vllm"]
    for r in records + bench["summary"]:
        assert RECORD_FIELDS <= set(r), RECORD_FIELDS - set(r)
        assert r["tokens_per_s"] > 0 and r["speedup_vs_ar"] > 0, r["setting"]
        assert len(r["speedup_by_round"]) == bench["preset_settings"]["rounds"]
        assert 0.0 <= r["rel_bleu_vs_ar"] <= 100.0 and 0.0 <= r["rouge_l_vs_ar"] <= 1.0
        if r["method"] == "ar":
            assert r["speedup_vs_ar"] == pytest.approx(1.0) and r["speedup_by_round"] == pytest.approx([1.0])
            assert r["rel_bleu_vs_ar"] == pytest.approx(100.0)
            assert r["rouge_l_vs_ar"] == pytest.approx(1.0)
            assert r["identical_to_ar"] is True
            assert r["mean_acceptance_length"] == 1.0 and r["draft_length_histogram"] == {}
            assert r["oracle_fraction"] is None
            continue
        if r["method"] in CONTROLLED and r["num_drafts"] == 0:
            # On the tiny pair the drafter costs what the target does: the
            # controller, deciding by measured times, may find that no draft ever
            # pays. Nothing was verified, so a draft it did make (an exploring
            # pass) came on a request's last step, which the scheduler drops as
            # the request ends: at most one per request.
            made = sum(count for n, count in r["draft_length_histogram"].items() if int(n) > 0)
            assert r["identical_to_ar"] is True and made <= r["num_prompts"], r
            continue
        # Speculative methods proposed drafts, and their counters are consistent.
        assert sum(r["draft_length_histogram"].values()) > 0, r["setting"]
        assert max(int(n) for n in r["draft_length_histogram"]) <= r["k"]
        assert 1.0 <= r["mean_acceptance_length"] <= r["k"] + 1
        if r["method"] != "ngram":  # n-gram may find no match in 12 random tokens
            assert r["num_drafts"] > 0, r["setting"]
            assert 0.0 <= r["rollback_rate"] <= 1.0
            assert sum(r["accepted_length_histogram"].values()) == r["num_drafts"]
        assert r["oracle_speedup"] > 0 and r["oracle_fraction"] > 0
        if r["method"] in ("draft_model", "cmasd", "cmasd_exact", "specbound", "cmasd_budget", "eagle3",
                           "cmasd_eagle3"):
            # Lossless under greedy decoding: token for token AR's output.
            assert r["identical_to_ar"] is True, r["setting"]
            assert r["rel_bleu_vs_ar"] == pytest.approx(100.0)
        if r["method"] in ("draft_model", "eagle3"):
            assert set(map(int, r["draft_length_histogram"])) == {r["k"]}
        if r["method"] in CMASD_METHODS:
            assert r["k_max"] == r["k"] and r["cmasd"]["verification"] in VERIFICATION_POLICIES
        # Memory: the trained draft has weights of its own, the self-draft none.
        assert r["target_weight_bytes"] > 0
        if r["method"] == "specbound":
            assert r["draft_weight_bytes"] == 0
        elif r["method"] in ("draft_model", "cmasd_exact", "eagle3", "cmasd_eagle3"):
            assert r["draft_weight_bytes"] > 0
    # The head's own weights are the draft's fraction (it shares the target's embedding).
    by_method = {r["method"]: r for r in records}
    assert by_method["eagle3"]["draft_weight_bytes"] < by_method["draft_model"]["draft_weight_bytes"]
    # The best fixed k is marked once per (method, task, batch size).
    best = [r for r in records if r.get("best_fixed_k")]
    assert len(best) == len({(r["method"], r["task"], r["batch_size"]) for r in records if r["method"] in FIXED_K})
    # What the controller learnt, per engine: its cost fit and calibration.
    learnt = [e for e in bench["engine_starts"] if e["label"].startswith("cmasd ")]
    assert learnt and all(e["cost_fit"]["target_step_s"] > 0 for e in learnt)
    assert all(len(e["calibration"]["curve"]) == 20 for e in learnt)


def test_micro_bench_is_interleaved(micro_bench):
    bench, _ = micro_bench
    labels = [s["label"] for s in bench["engine_starts"]]
    assert len(labels) == len(set(labels)) * bench["preset_settings"]["rounds"]
    # Each engine ran in a process of its own, none in the caller's.
    pids = [s["pid"] for s in bench["engine_starts"]]
    assert len(set(pids)) == len(pids) and os.getpid() not in pids
    # Each engine warmed up on a batch of the run's largest size before its first timed call.
    assert {s["warmup_requests"] for s in bench["engine_starts"]} == {max(bench["preset_settings"]["batch_sizes"])}


def _few_methods_preset(interleave: str):
    import dataclasses

    from vllm_cmasd.bench.runner import PRESETS, MethodSpec, cmasd

    return dataclasses.replace(PRESETS["micro"], methods=(MethodSpec("ar"), MethodSpec("draft_model", 4), cmasd(4)),
                               rounds=2, interleave=interleave, kv_cache_gib=1)


def test_interleaving_by_calls_runs_each_batch_on_every_engine_in_turn(tiny_pair, tiny_self_draft):
    """``interleave="calls"``: a round starts every engine and holds them all;
    each of its prompt batches runs on each engine in turn (the order reversed
    every other batch), so the calls compared ran seconds apart."""
    from vllm_cmasd.bench import runner

    target, draft = tiny_pair
    preset = _few_methods_preset("calls")
    raw = runner.run(preset, target=target, draft=draft, self_draft=tiny_self_draft, progress=False)
    labels = [m.label for m in preset.methods]
    assert raw["failed"] == {}
    # Every engine started once a round, in a process of its own.
    assert [(s["label"], s["round"]) for s in raw["engine_starts"]] == [(m, r) for r in range(2) for m in labels]
    assert len({s["pid"] for s in raw["engine_starts"]}) == 2 * len(labels)
    assert all(s["cost_fit"]["target_step_s"] > 0 and s["acceptance"]["shrinkage_weight"] > 0
               for s in raw["engine_starts"] if s["label"].startswith("cmasd "))
    calls = raw["calls"]
    n = len(preset.tasks) * sum(-(-preset.prompts_per_task // b) for b in preset.batch_sizes)  # batches
    assert len(calls) == n * len(labels)
    for i in range(n):
        turn = calls[i * len(labels): (i + 1) * len(labels)]
        assert [c["label"] for c in turn] == (labels if i % 2 == 0 else labels[::-1])
        assert len({tuple(c["prompt_ids"]) for c in turn}) == 1  # one batch, every engine
        # Lossless methods, greedy: the same tokens on every engine.
        assert len({json.dumps(c["output_token_ids"]) for c in turn}) == 1
    # The report gives each method's speedup within each round.
    from vllm_cmasd.bench import report

    for r in report.build(raw)["summary"]:
        assert len(r["speedup_by_round"]) == 2 and all(x > 0 for x in r["speedup_by_round"]), r["setting"]
        low, high = r["speedup_interval"]  # over the two rounds
        assert low <= min(r["speedup_by_round"]) <= max(r["speedup_by_round"]) <= high
        if r["method"] == "ar":
            assert r["speedup_by_round"] == pytest.approx([1.0, 1.0])
            assert r["speedup_interval"] == pytest.approx((1.0, 1.0))


def test_an_engine_that_cannot_start_fails_alone_and_leaves_no_process(tiny_pair):
    import multiprocessing

    from vllm_cmasd.bench.host import EngineFailed, EngineHost
    from vllm_cmasd.engines import llm_kwargs

    target, _ = tiny_pair
    kwargs = llm_kwargs(target, draft="/nonexistent/draft", num_speculative_tokens=2, max_model_len=128,
                        kv_cache_memory_bytes=2**26)
    with pytest.raises(EngineFailed, match="nonexistent"):
        EngineHost(kwargs, warmup_prompt=[1, 2, 3], max_tokens=4, name="broken")
    assert multiprocessing.active_children() == []


def test_interleaving_by_calls_refuses_engines_that_do_not_fit(tiny_pair, tiny_self_draft, monkeypatch):
    """Every engine is held at once: when the next would not fit in the memory
    left, the run stops with an error that says what to change, and the engines
    started so far are shut down."""
    import multiprocessing
    from types import SimpleNamespace

    import psutil

    from vllm_cmasd.bench import runner

    target, draft = tiny_pair
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=2**20))
    with pytest.raises(MemoryError, match="interleave 'rounds'"):
        runner.run(_few_methods_preset("calls"), target=target, draft=draft, self_draft=tiny_self_draft, progress=False)
    assert multiprocessing.active_children() == []
    with pytest.raises(ValueError, match=r"interleave: must be one of \['rounds', 'calls'\]"):
        runner.run(_few_methods_preset("both"), target=target, draft=draft, self_draft=tiny_self_draft, progress=False)


def test_rounds_spread_the_work():
    from vllm_cmasd.bench.runner import PRESETS, plan_rounds

    for preset in (PRESETS["quick"], PRESETS["full"]):
        prompts = {t: [{"id": f"{t}-{i}"} for i in range(preset.prompts_per_task)] for t in preset.tasks}
        rounds = plan_rounds(prompts, preset)
        assert len(rounds) == preset.rounds
        for units in rounds:  # every round has work of every batch size
            assert {u.batch_size for u in units} == set(preset.batch_sizes)
            assert all(len(u.prompt_ids) == u.batch_size for u in units)
        for task in preset.tasks:  # each batch size covers each prompt exactly once
            for b in preset.batch_sizes:
                ids = [pid for units in rounds for u in units if (u.task, u.batch_size) == (task, b) for pid in u.prompt_ids]
                assert sorted(ids) == sorted(p["id"] for p in prompts[task])


def test_the_eagle3_methods_run_vllms_eagle3_on_the_head(tiny_pair, tiny_eagle3):
    """``eagle3`` (vLLM's, fixed k) and ``cmasd_eagle3`` (the controller) draft
    with the run's EAGLE-3 head, in the in-process benchmark and in bench-serve's
    servers alike; a run without a head says so instead of drafting with something else."""
    from vllm_cmasd.bench.serve_load import engine_flags, serve_methods

    target, draft = map(str, tiny_pair)
    drafters = {"draft": draft, "eagle3": str(tiny_eagle3)}
    offered = serve_methods(k=4, k_max=8, rstitch_entropy=1.0)
    theirs = offered["eagle3"].engine_kwargs(target, drafters, {})
    ours = offered["cmasd_eagle3"].engine_kwargs(target, drafters, {})
    for kwargs, k in ((theirs, 4), (ours, 8)):
        assert kwargs["speculative_config"] == {"method": "eagle3", "model": str(tiny_eagle3), "num_speculative_tokens": k}
    assert "additional_config" not in theirs and ours["additional_config"] == {"cmasd": {"verification": "exact"}}
    flags = engine_flags(ours)
    assert json.loads(flags[flags.index("--speculative-config") + 1])["method"] == "eagle3"
    assert offered["draft_model"].engine_kwargs(target, drafters, {})["speculative_config"]["method"] == "draft_model"
    with pytest.raises(ValueError, match="eagle3 checkpoint"):
        offered["cmasd_eagle3"].engine_kwargs(target, {"draft": draft, "eagle3": None}, {})


def test_repeats_run_every_round_again_on_the_same_prompts():
    """``--repeats`` gives more rounds of every task instead of splitting the prompts
    into rounds of one task each; a bad value is refused naming the flag."""
    import dataclasses

    from vllm_cmasd.bench import resolve_preset
    from vllm_cmasd.bench.runner import plan_rounds

    base = resolve_preset("batch16", prompts_per_task=32, rounds=2)
    prompts = {t: [{"id": f"{t}-{i}"} for i in range(32)] for t in base.tasks}
    once = plan_rounds(prompts, base)
    repeated = plan_rounds(prompts, resolve_preset("batch16", prompts_per_task=32, rounds=2, repeats=3))
    assert len(repeated) == 6 and repeated == once * 3
    assert all({u.task for u in units} == set(base.tasks) for units in repeated)
    # More rounds alone split the six batches: no round holds every task.
    split = plan_rounds(prompts, dataclasses.replace(base, rounds=6))
    assert all({u.task for u in units} != set(base.tasks) for units in split)
    with pytest.raises(ValueError, match=r"--repeats: must be a whole number >= 1; got 0"):
        resolve_preset("batch16", repeats=0)
