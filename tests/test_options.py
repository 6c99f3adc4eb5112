"""R-Stitch routing and the draft budget inside real vLLM engines on the tiny pair."""

from __future__ import annotations

import pytest
from conftest import run_engine
from test_engine import PROMPTS, engine, greedy

pytestmark = pytest.mark.engine


def rstitch(threshold):
    return {"verification": "rstitch", "rstitch_entropy": threshold, "threshold": 0.3}


def sampled():
    from vllm import SamplingParams

    return [SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i, max_tokens=32) for i in range(len(PROMPTS))]


def test_rstitch_threshold_zero_is_exact(tiny_pair):
    """Nothing is kept unchecked: greedy == plain decoding; seeded sampling ==
    CM-ASD exact token for token (same random numbers, same decisions)."""
    target, draft = tiny_pair
    spec = dict(draft=draft, num_speculative_tokens=6)
    plain = run_engine(PROMPTS, greedy(), **engine(target))
    ours = run_engine(PROMPTS, greedy(), **engine(target, cmasd=rstitch(0.0), **spec))
    assert ours.token_ids == plain.token_ids
    assert ours.sampler.policy_params.policy.name == "RSTITCH"
    exact = run_engine(PROMPTS, sampled(), **engine(target, cmasd={"verification": "exact", "threshold": 0.3}, **spec))
    ours = run_engine(PROMPTS, sampled(), **engine(target, cmasd=rstitch(0.0), **spec))
    assert ours.token_ids == exact.token_ids


def test_rstitch_keeps_the_drafter_where_it_is_sure(tiny_pair):
    """Acceptance rises with the threshold, to every draft above log(vocab),
    and the output leaves plain decoding only where drafts were kept."""
    import math

    target, draft = tiny_pair
    spec = dict(draft=draft, num_speculative_tokens=6)
    plain = run_engine(PROMPTS, greedy(), **engine(target))
    rates = {}
    outputs = {}
    for threshold in (0.0, 2.0, math.log(1024) + 1):  # the tiny vocabulary has 1024 tokens
        run = run_engine(PROMPTS, greedy(), **engine(target, cmasd=rstitch(threshold), **spec))
        rates[threshold] = run.counters["num_accepted_tokens"] / run.counters["num_draft_tokens"]
        outputs[threshold] = run.token_ids
    low, mid, high = sorted(rates)
    assert rates[low] < rates[mid] < rates[high] == 1.0, rates
    assert outputs[high] != plain.token_ids  # kept drafts the target would not have chosen
    same = sum(a == b for a, b in zip(outputs[mid], plain.token_ids))
    assert same < len(PROMPTS), "mid threshold changed nothing"


def test_budget_is_lossless_and_measures_its_costs(tiny_pair, monkeypatch):
    """The budget's per-position decisions on a step that drafts. Whether a step
    drafts at all is decided by measured times (on the tiny pair the drafter
    costs what the target does, so it would often skip: tests/test_catchup.py
    covers skipping); here every step drafts."""
    import numpy as np

    from vllm_cmasd.proposer import CmasdProposer

    monkeypatch.setattr(CmasdProposer, "_who_drafts", lambda self, req_ids, query_lens, catch_ups: (np.ones(len(req_ids), dtype=bool), None))
    target, draft = tiny_pair
    plain = run_engine(PROMPTS, greedy(), **engine(target))
    ours = run_engine(
        PROMPTS,
        greedy(),
        **engine(target, draft=draft, num_speculative_tokens=6,
                 cmasd={"verification": "exact", "threshold": 0.3, "draft_budget": "auto"}),
    )
    assert ours.token_ids == plain.token_ids
    assert ours.counters["num_accepted_tokens"] > 0
    measured = ours.drafter.costs
    # Measured on the running engine, with the start-up profile as prior.
    assert measured.num_target_samples > 0 and measured.num_draft_samples > 0
    costs = measured.prior
    assert costs.tokens[0] == 1 and len(costs.tokens) >= 4
    assert all(t > 0 for t in costs.target_s + costs.draft_s), costs
    # The biggest verification batch costs more than a one-token one.
    assert costs.target_s[-1] > costs.target_s[0], costs


def test_the_controller_profiles_its_costs_at_engine_start(tiny_pair):
    """The cost profile runs after vLLM's warm-up, before any request: the
    first request's first token does not wait for it (2.4 s on the real pair)."""
    from vllm import LLM

    from vllm_cmasd.engines import model_runner, shutdown

    target, draft = tiny_pair
    llm = LLM(**engine(target, draft=draft, num_speculative_tokens=4, cmasd={"verification": "exact"}))
    try:
        costs = model_runner(llm).drafter.costs
        assert costs is not None and costs.num_target_samples == 0
        assert all(t > 0 for t in costs.prior.target_s + costs.prior.draft_s), costs.prior
    finally:
        shutdown(llm)


def test_budget_off_profiles_nothing(tiny_pair):
    """The paper's window without the budget measures no costs."""
    target, draft = tiny_pair
    window = {"verification": "exact", "draft_length": "window"}
    run = run_engine(PROMPTS[:2], greedy(8), **engine(target, draft=draft, num_speculative_tokens=4, cmasd=window))
    assert run.drafter.costs is None
