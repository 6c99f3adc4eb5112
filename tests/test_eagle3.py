"""CM-ASD on vLLM's EAGLE-3 proposer (``method: eagle3``), on the tiny target
with a random-weight head that vLLM's own ``eagle3`` method loads unmodified.

The head's first pass always runs (``CmasdEagleProposer.FIRST_PASS_SKIPPABLE``
is False): a step where no request drafts still writes the head's KV, so it
never lags and nothing is caught up.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_engine
from test_catchup import decide_calls, record_first_positions
from test_engine import CMASD, PROMPTS, engine, greedy

from vllm_cmasd.proposer import CmasdEagleProposer

pytestmark = pytest.mark.engine

# Prefix caching and chunked prefill on: the head's first pass must cover
# cached blocks (vLLM recomputes the last one for EAGLE) and split prompts.
SETTINGS = dict(enable_prefix_caching=True, enable_chunked_prefill=True, max_num_batched_tokens=64)


def eagle3(target, head, **kwargs):
    return engine(target, draft=head, draft_method="eagle3", num_speculative_tokens=4, **kwargs)


def test_vllm_runs_the_tiny_head_unmodified_and_the_plugin_stays_inert(tiny_pair, tiny_eagle3):
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.spec_decode.eagle import EagleProposer

    target, _ = tiny_pair
    plain = run_engine(PROMPTS, greedy(24), **engine(target, **SETTINGS))
    theirs = run_engine(PROMPTS, greedy(24), **eagle3(target, tiny_eagle3, **SETTINGS))
    assert type(theirs.drafter) is EagleProposer and type(theirs.sampler) is RejectionSampler
    # The reduced vocabulary's offsets were loaded (they are not all zero).
    assert theirs.drafter.model.draft_id_to_target_id.abs().sum() > 0
    assert theirs.counters["num_draft_tokens"] > 0
    assert theirs.token_ids == plain.token_ids


@pytest.mark.parametrize("cmasd", [CMASD, {"verification": "exact"}], ids=["window", "controller"])
def test_exact_on_eagle3_is_identical_to_plain_decoding(tiny_pair, tiny_eagle3, cmasd):
    target, _ = tiny_pair
    plain = run_engine(PROMPTS, greedy(32), **engine(target, **SETTINGS))
    ours = run_engine(PROMPTS, greedy(32), **eagle3(target, tiny_eagle3, cmasd=cmasd, **SETTINGS))
    assert type(ours.drafter).__name__ == "CmasdEagleProposer"
    assert type(ours.sampler).__name__ == "CmasdRejectionSampler"
    assert ours.token_ids == plain.token_ids
    assert ours.drafter.stats.num_draft_tokens > 0 or cmasd is not CMASD
    assert ours.drafter.lag.num_catch_up_tokens == 0 and ours.drafter.stats.num_skipped_passes == 0


def test_exact_on_eagle3_under_preemption(tiny_pair, tiny_eagle3):
    """8 blocks of 128 tokens cannot hold 12 requests of ~140 prompt tokens once they grow past 256."""
    target, _ = tiny_pair
    settings = dict(num_gpu_blocks_override=8, enable_prefix_caching=True)
    prompts = [PROMPTS[4] + p for p in PROMPTS + PROMPTS[:4]]
    plain = run_engine(prompts, greedy(160), **engine(target, **settings))
    ours = run_engine(prompts, greedy(160), **eagle3(target, tiny_eagle3, cmasd=CMASD, **settings))
    assert ours.num_preemptions > 0
    assert ours.token_ids == plain.token_ids


def test_a_step_without_drafts_keeps_the_heads_kv_current(tiny_pair, tiny_eagle3, monkeypatch):
    """No request drafts on propose calls 1-3 (the prefill's step and two
    decode steps); the head's first pass still runs, so on call 4 each
    request's head logits equal those of a fresh engine given the same text
    (its head ran every token), and nothing lagged or was caught up."""
    target, _ = tiny_pair
    prompts = PROMPTS[1:3]
    decide_calls(monkeypatch, lambda call, n: np.full(n, call > 3), proposer_class=CmasdEagleProposer)
    seen = record_first_positions(monkeypatch, proposer_class=CmasdEagleProposer)
    run = run_engine(prompts, greedy(12), **eagle3(target, tiny_eagle3, cmasd=CMASD))
    assert run.drafter.lag.num_catch_up_tokens == 0 and not run.drafter.lag.lag_start
    assert run.drafter.stats.length_histogram[0] >= 3 * len(prompts)  # calls 1-3 drafted nothing
    req_ids, positions, logits = seen[3]  # every call runs the head's pass: call 4 is the fourth

    monkeypatch.undo()
    seen_fresh = record_first_positions(monkeypatch, proposer_class=CmasdEagleProposer)
    outputs = {o.request_id: o for o in run.outputs}
    for i, req_id in enumerate(req_ids):
        output = outputs.get(req_id) or outputs[req_id.rsplit("-", 1)[0]]  # the engine suffixes ids
        text = list(output.prompt_token_ids) + list(output.outputs[0].token_ids)
        before = len(seen_fresh)
        run_engine([{"prompt_token_ids": text[: positions[i]]}], greedy(2), **eagle3(target, tiny_eagle3, cmasd=CMASD))
        fresh_logits = seen_fresh[before][2][0]
        finite = logits[i].isfinite()
        assert torch.equal(finite, fresh_logits.isfinite())  # the same kept vocabulary
        assert torch.allclose(logits[i][finite], fresh_logits[finite], atol=1e-4, rtol=1e-4)
