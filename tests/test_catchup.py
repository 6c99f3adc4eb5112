"""Skipping the drafter and catching its KV cache up (vllm_cmasd/catchup.py), in real engines,
for both drafter families: a draft model (its catch-up: the committed tokens) and an
EAGLE-3 head (also the target's hidden states kept for the tokens it missed).

Which steps skip is forced here by replacing the proposer's decision
(``_who_drafts``) with a fixed pattern; everything else is the real
engine. Exact verification would hide a stale drafter (outputs stay identical
while acceptance collapses), so the first test compares the drafter's logits
after a catch-up with those of a drafter that never skipped.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_engine
from test_engine import CMASD, PROMPTS, engine, greedy

from vllm_cmasd import proposer
from vllm_cmasd.proposer import CmasdEagleProposer, CmasdProposer

pytestmark = pytest.mark.engine

# Each family: its proposer class, and the engine settings of its drafter.
# (The tiny random head's drafts are drafted and verified, but none is
# accepted; the tiny draft's are.)
FAMILIES = {
    "draft_model": (CmasdProposer, lambda pair, head: dict(draft=pair[1])),
    "eagle3": (CmasdEagleProposer, lambda pair, head: dict(draft=head, draft_method="eagle3")),
}


@pytest.fixture(params=list(FAMILIES))
def family(request, tiny_pair):
    """(proposer class, engine settings for the drafter) of one drafter family."""
    proposer_class, settings = FAMILIES[request.param]
    head = request.getfixturevalue("tiny_eagle3") if request.param == "eagle3" else None
    return proposer_class, dict(settings(tiny_pair, head), num_speculative_tokens=4)


def resumed(run, proposer_class) -> bool:
    """Drafts were verified (and for the draft model, some accepted)."""
    counter = "num_accepted_tokens" if proposer_class is CmasdProposer else "num_draft_tokens"
    return run.counters[counter] > 0


def skip_calls(monkeypatch, skipped, proposer_class=CmasdProposer):
    """Propose calls (counted from 1) in ``skipped`` run no drafter pass."""
    return decide_calls(
        monkeypatch, lambda call, batch_size: np.full(batch_size, call not in skipped), proposer_class=proposer_class
    )


def decide_calls(monkeypatch, pattern, proposer_class=CmasdProposer):
    """Who drafts on each propose call: ``pattern(call counted from 1, batch size)``."""
    calls = []

    def decide(self, req_ids, query_lens, catch_ups):
        calls.append(len(req_ids))
        return pattern(len(calls), len(req_ids)), None

    monkeypatch.setattr(proposer_class, "_who_drafts", decide)
    return calls


def record_first_positions(monkeypatch, proposer_class=CmasdProposer):
    """Per propose call that drafts: the drafter's logits at the first drafted
    position of each request, the position of the token they follow, and
    whether any request still lags after that pass."""
    seen = []
    real_propose, real_confidence = proposer_class.propose, proposer.unified_confidence
    first = {}

    def confidence(logits, config, vocab_size=None):
        first.setdefault("logits", logits.clone())
        return real_confidence(logits, config, vocab_size)

    def propose(self, num_speculative_tokens, **kwargs):
        first.clear()
        # Before drafting: EAGLE's loop advances the metadata's seq_lens in place.
        rejected = kwargs["num_rejected_tokens_gpu"]
        new_token_positions = (kwargs["common_attn_metadata"].seq_lens - (0 if rejected is None else rejected)).tolist()
        out = real_propose(self, num_speculative_tokens=num_speculative_tokens, **kwargs)
        if "logits" in first:
            seen.append((list(self.runner.input_batch.req_ids), new_token_positions, first["logits"],
                         bool(self.lag.lag_start)))
        return out

    monkeypatch.setattr(proposer, "unified_confidence", confidence)
    monkeypatch.setattr(proposer_class, "propose", propose)
    return seen


def test_dirty_slots_follow_the_target_and_the_drafter_writes():
    """Slots come from each request's block table; a slot the target wrote is
    dirty until the drafter writes it; a head's hidden states are kept per slot
    as the target last wrote them; a cache hit lags from its first dirty slot."""
    from vllm_cmasd.catchup import DirtySlots, DrafterLag, token_slots

    block_table = np.array([[3, 1, 0], [2, 4, 0]])  # block size 4
    slots = token_slots(block_table, 4, starts=np.array([2, 0]), ends=np.array([6, 1]))
    assert slots.tolist() == [14, 15, 4, 5, 8]  # positions 2..5 of row 0, position 0 of row 1
    dirty = DirtySlots(keep_hidden_states=True)
    hidden = torch.arange(10.0).reshape(5, 2)
    dirty.target_wrote(slots, hidden)
    dirty.drafter_wrote(slots[:2])
    assert dirty.first_dirty(slots) == 2 and dirty.first_dirty(slots[:2]) == 2
    assert torch.equal(dirty.hidden_states_of(np.array([5, 14]), torch.device("cpu")), hidden[[3, 0]])
    dirty.target_wrote(np.array([5]), torch.tensor([[7.0, 7.0]]))  # rewritten: the latest rows count
    assert dirty.hidden_states_of(np.array([5]), torch.device("cpu")).tolist() == [[7.0, 7.0]]
    # A request first seen with 6 computed tokens on row 0's blocks lags from position 4.
    lag = DrafterLag(max_tracked=4)
    computed = np.array([6])
    lag.observe(["hit"], computed, first_dirty=lambda i: dirty.first_dirty(
        token_slots(block_table[i : i + 1], 4, np.zeros(1, dtype=np.int64), computed[i : i + 1])))
    assert lag.lag_start == {"hit": 4} and lag.num_restarts == 1
    dirty.drafter_wrote(slots)
    lag.observe(["clean"], computed, first_dirty=lambda i: dirty.first_dirty(
        token_slots(block_table[i : i + 1], 4, np.zeros(1, dtype=np.int64), computed[i : i + 1])))
    assert "clean" not in lag.lag_start


# Who drafts on propose calls 1-3 (from call 4 on, both requests draft), which
# recorded pass is compared (passes run on calls where anyone drafts; None: the
# first after which nothing lags), and the engine's settings.
LAGS = {
    # No drafter pass on the prefill's step and the next two: call 4 catches up.
    "skipped_steps": (lambda call: [False, False], 0, {}),
    # No pass on the prefill's step; on the next two only the first request
    # drafts: the second one lags, runs its own tokens without catching up (they
    # write drafter KV over its gap) and catches up on call 4.
    "lagging_beside_a_drafting_request": (lambda call: [call > 1, False], 2, {}),
    # 32-token steps: the prompts' chunks are skipped, and their catch-ups do
    # not fit one pass, so they are split over the next steps.
    "split_catch_up": (lambda call: [False, False], None, dict(enable_chunked_prefill=True, max_num_batched_tokens=32)),
}


@pytest.mark.parametrize("lag", list(LAGS))
def test_after_a_catch_up_the_drafter_sees_what_a_drafter_that_never_skipped_sees(
    tiny_pair, family, monkeypatch, lag
):
    """Lag both requests' drafters, then draft for both; at that pass each
    request's drafter logits must equal those of a fresh engine whose prompt is
    the same text up to there (its drafter ran every token from scratch). For
    a head this needs the target's hidden states of every missed token, at the
    right position and KV slot."""
    target, _ = tiny_pair
    proposer_class, drafter = family
    prompts = PROMPTS[1:3]
    early, compared, settings = LAGS[lag]
    decide_calls(monkeypatch, lambda call, n: np.array(early(call) if call <= 3 else [True] * n),
                 proposer_class=proposer_class)
    seen = record_first_positions(monkeypatch, proposer_class=proposer_class)
    run = run_engine(prompts, greedy(24), **engine(target, cmasd=CMASD, **drafter, **settings))
    assert run.drafter.lag.num_catch_up_tokens > 0
    if compared is None:
        assert run.drafter.lag.num_split_passes > 0
        compared = next(i for i, (_, _, _, lagging) in enumerate(seen) if not lagging)
    else:
        assert run.drafter.stats.num_skipped_passes == 3 - compared
    req_ids, positions, logits, _ = seen[compared]
    assert logits.shape[0] == len(prompts)

    monkeypatch.undo()
    seen_fresh = record_first_positions(monkeypatch, proposer_class=proposer_class)
    outputs = {o.request_id: o for o in run.outputs}
    for i, req_id in enumerate(req_ids):
        output = outputs.get(req_id) or outputs[req_id.rsplit("-", 1)[0]]  # the engine suffixes ids
        text = list(output.prompt_token_ids) + list(output.outputs[0].token_ids)
        # That pass drafted after the token at positions[i]: a fresh engine given
        # the text before it samples that token, then drafts after it.
        fresh_prompt = {"prompt_token_ids": text[: positions[i]]}
        before = len(seen_fresh)
        run_engine([fresh_prompt], greedy(2), **engine(target, cmasd=CMASD, **drafter))
        fresh_logits = seen_fresh[before][2][0]
        finite = fresh_logits.isfinite()  # a head's reduced vocabulary: -inf elsewhere
        assert torch.equal(logits[i].isfinite(), finite)
        close = torch.allclose(logits[i][finite], fresh_logits[finite], atol=1e-4, rtol=1e-4)
        assert close, (i, (logits[i][finite] - fresh_logits[finite]).abs().max())


def test_a_head_keeps_its_whole_prefix_cache_hit_and_catches_up_its_last_position(tiny_pair, tiny_eagle3, monkeypatch):
    """vLLM gives back an EAGLE engine's last matched block; under CM-ASD the
    hit stays whole (64 of 64 shared tokens here, two 32-token blocks) and the
    head's KV at the last cached position, written with the first request's
    next token, is caught up with the second's: its first drafter logits equal
    a fresh engine's on the same text."""
    target, _ = tiny_pair
    shared = list(range(5, 69))  # 64 tokens: the requests part exactly at a block boundary
    prompts = [{"prompt_token_ids": shared + list(range(100, 120))},
               {"prompt_token_ids": shared + list(range(200, 230))}]
    drafter = dict(draft=tiny_eagle3, draft_method="eagle3", num_speculative_tokens=4, cmasd=CMASD)
    settings = dict(enable_prefix_caching=True, block_size=32, max_num_seqs=1)  # one request after the other
    seen = record_first_positions(monkeypatch, proposer_class=CmasdEagleProposer)
    run = run_engine(prompts, greedy(4), **engine(target, **drafter, **settings))
    assert sum(m.value for m in run.metrics if m.name == "vllm:prefix_cache_hits") == 64
    assert run.drafter.lag.num_restarts == 1
    second = run.outputs[1].request_id
    req_ids, positions, logits, _ = next(entry for entry in seen if entry[0][0].startswith(second))

    monkeypatch.undo()
    seen_fresh = record_first_positions(monkeypatch, proposer_class=CmasdEagleProposer)
    text = prompts[1]["prompt_token_ids"] + list(run.outputs[1].outputs[0].token_ids)
    run_engine([{"prompt_token_ids": text[: positions[0]]}], greedy(2), **engine(target, **drafter))
    fresh_logits = seen_fresh[0][2][0]
    finite = fresh_logits.isfinite()
    assert torch.allclose(logits[0][finite], fresh_logits[finite], atol=1e-4, rtol=1e-4)


# Prompts sharing their first 128-token block (CPU attention's block size) with
# PROMPTS[4]: cache hits, within a step and across steps.
SHARED_PREFIX = [PROMPTS[4] + p for p in PROMPTS + PROMPTS[:4]]

CASES = {
    # name: (skipped propose calls, engine settings, prompts, max new tokens)
    "prefill_skipped": ({1}, {}, PROMPTS, 24),
    "every_other_step": (set(range(1, 80, 2)), {}, PROMPTS, 24),
    "chunked_prefill": ({1, 2, 3}, dict(enable_chunked_prefill=True, max_num_batched_tokens=48), PROMPTS, 24),
    # Catch-ups too long for a 48-token pass: split over several steps.
    "split_catch_up": (set(range(1, 14)), dict(enable_chunked_prefill=True, max_num_batched_tokens=48), PROMPTS, 32),
    # 32-token blocks: an EAGLE engine gives back its last matched block, so 128-token ones would not hit.
    "prefix_cache": ({1, 3, 4, 9}, dict(enable_prefix_caching=True, block_size=32), SHARED_PREFIX, 24),
    # 32 blocks of 32 tokens cannot hold 12 requests of ~140 prompt tokens once they grow past 256.
    "preemption": (set(range(1, 400, 3)), dict(num_gpu_blocks_override=32, block_size=32, enable_prefix_caching=True),
                   SHARED_PREFIX, 160),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exact_with_skipped_passes_is_identical_to_plain_decoding(tiny_pair, family, monkeypatch, case):
    target, _ = tiny_pair
    proposer_class, drafter = family
    skipped, settings, prompts, max_tokens = CASES[case]
    plain = run_engine(prompts, greedy(max_tokens), **engine(target, **settings))
    skip_calls(monkeypatch, skipped, proposer_class=proposer_class)
    ours = run_engine(prompts, greedy(max_tokens), **engine(target, cmasd=CMASD, **drafter, **settings))
    assert ours.token_ids == plain.token_ids
    assert ours.drafter.stats.num_skipped_passes > 0 and ours.drafter.lag.num_catch_up_tokens > 0
    assert resumed(ours, proposer_class)  # drafting resumed after the skips
    lag = ours.drafter.lag
    if case == "preemption":
        assert ours.num_preemptions > 0 and lag.num_restarts > 0
    if case == "prefix_cache":
        assert lag.num_restarts > 0  # cache hits on blocks filled while the drafter skipped
    if case == "split_catch_up":
        assert lag.num_split_passes > 0


def test_mixed_batch_where_some_requests_draft_and_others_lag(tiny_pair, family, monkeypatch):
    """Per request: on each drafting step every other request drafts nothing
    (alternating which; it still runs the first pass, and one that lags keeps
    lagging), and some whole steps skip the drafter, so drafting steps also
    carry catch-ups; greedy output stays plain decoding's."""
    target, _ = tiny_pair
    proposer_class, drafter = family

    def pattern(call, batch_size):
        if call in (2, 5, 6):
            return np.zeros(batch_size, dtype=bool)
        return (np.arange(batch_size) + call) % 2 == 0

    decide_calls(monkeypatch, pattern, proposer_class=proposer_class)
    plain = run_engine(PROMPTS, greedy(24), **engine(target))
    ours = run_engine(PROMPTS, greedy(24), **engine(target, cmasd=CMASD, **drafter))
    assert ours.token_ids == plain.token_ids
    assert ours.drafter.lag.num_catch_up_tokens > 0 and resumed(ours, proposer_class)
    assert ours.drafter.stats.length_histogram[0] > 0  # lagging requests drafted nothing


def test_controller_reports_what_it_did_and_learnt_on_the_metrics(tiny_pair, monkeypatch):
    """The default config (the controller): its skipped passes, catch-up tokens,
    calibration and cost fit reach LLM.get_metrics() from the worker."""
    target, draft = tiny_pair
    skip_calls(monkeypatch, skipped={1, 2, 4, 6, 7})
    ours = run_engine(PROMPTS, greedy(16), **engine(target, draft=draft, num_speculative_tokens=4,
                                                     cmasd={"verification": "exact"}))
    drafter = ours.drafter
    assert drafter.config.draft_length == "controller"

    def series(name):
        return [m for m in ours.metrics if m.name == name]

    def total(name):
        return sum(m.value for m in series(name))

    assert total("vllm:cmasd_skipped_drafter_passes") == drafter.stats.num_skipped_passes > 0
    assert total("vllm:cmasd_catch_up_tokens") == drafter.lag.num_catch_up_tokens > 0
    assert total("vllm:cmasd_exploring_passes") == drafter.stats.num_exploring_passes
    assert total("vllm:cmasd_exploring_catch_up_tokens") == drafter.stats.num_exploring_catch_up_tokens
    assert drafter.stats.drafter_seconds > 0
    # LLM.get_metrics() reads counters as whole numbers (test_serve_bench reads
    # the seconds off /metrics); the report may lag the last step.
    assert 0 <= total("vllm:cmasd_drafter_seconds") <= drafter.stats.drafter_seconds
    curve = {m.labels["confidence_bin"]: m.value for m in series("vllm:cmasd_calibration_acceptance")}
    assert [curve[f"{b / 20:.2f}"] for b in range(20)] == pytest.approx(drafter.calibration.curve)
    assert drafter.calibration.num_observed > 0
    verified = sum(m.value for m in series("vllm:cmasd_calibration_tokens"))
    assert verified == drafter.calibration.num_observed
    costs = {m.labels["term"]: m.value for m in series("vllm:cmasd_cost_seconds")}
    assert costs == pytest.approx(drafter.costs.coefficients)
    acceptance = {m.labels["term"]: m.value for m in series("vllm:cmasd_acceptance")}
    assert acceptance == pytest.approx(drafter.acceptance.summary())
