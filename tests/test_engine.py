"""CM-ASD inside real vLLM engines on the tiny pair: lossless, variable drafts, inert when off."""

from __future__ import annotations

import pytest
from conftest import run_engine

from vllm_cmasd.engines import llm_kwargs

pytestmark = pytest.mark.engine

# Mixed lengths: short, medium and long prompts in one batch.
PROMPTS = [
    "def",
    "import os\nimport sys\n\n",
    "class Encoder(object):\n    def __init__(self, skipkeys=False):\n        self.skipkeys = skipkeys\n",
    "Return a JSON string",
    "The decoder reads a document and returns the object it encodes, " * 6,
    "for key, value in",
    "raise ValueError(",
    "# Copyright",
]
CMASD = {"threshold": 0.3, "verification": "exact"}


def engine(target, **kwargs):
    """llm_kwargs for the tiny pair (its max_position_embeddings is 1024)."""
    return llm_kwargs(target, **{"max_model_len": 512, **kwargs})


def greedy(max_tokens=48):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def test_plugin_is_inert_without_cmasd(tiny_pair):
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.spec_decode.draft_model import DraftModelProposer

    from vllm_cmasd.proposer import CmasdProposer

    target, draft = tiny_pair
    run = run_engine(PROMPTS[:2], greedy(8), **engine(target, draft=draft, num_speculative_tokens=4))
    assert type(run.drafter) is DraftModelProposer
    assert type(run.sampler) is RejectionSampler
    assert not isinstance(run.drafter, CmasdProposer)


def test_exact_greedy_is_identical_to_plain_decoding(tiny_pair):
    target, draft = tiny_pair
    settings = dict(enable_prefix_caching=True, enable_chunked_prefill=True, max_num_batched_tokens=64)
    plain = run_engine(PROMPTS, greedy(), **engine(target, **settings))
    ours = run_engine(
        PROMPTS, greedy(), **engine(target, draft=draft, num_speculative_tokens=6, cmasd=CMASD, **settings)
    )
    assert type(ours.drafter).__name__ == "CmasdProposer"
    assert type(ours.sampler).__name__ == "CmasdRejectionSampler"
    assert ours.token_ids == plain.token_ids
    stats = ours.drafter.stats
    # Drafts of different lengths really shared batches, and some stopped early.
    assert stats.num_mixed_steps > 0, stats
    assert stats.num_early_stops > 0, stats
    assert len({n for n, count in enumerate(stats.length_histogram) if count}) > 1, stats
    # vLLM's own counters saw the same variable-length drafts.
    assert ours.counters["num_draft_tokens"] == pytest.approx(stats.num_draft_tokens, rel=0.2)
    assert ours.counters["num_accepted_tokens"] > 0


def test_drafts_reach_the_scheduler_with_the_step_output(tiny_pair):
    """The engine core never asks the workers for the drafts
    (``take_draft_token_ids``, a round trip every step where the worker has
    its own process): they come with each step's output, and are scheduled,
    verified and lossless as before."""
    from vllm import LLM

    from vllm_cmasd.engines import shutdown, spec_decode_counters

    target, draft = tiny_pair
    plain = run_engine(PROMPTS, greedy(24), **engine(target))
    llm = LLM(**engine(target, draft=draft, num_speculative_tokens=4, cmasd=CMASD))
    try:
        executor = llm.llm_engine.model_executor
        asked = []
        take = executor.take_draft_token_ids
        executor.take_draft_token_ids = lambda: asked.append(1) or take()
        outputs = llm.generate(PROMPTS, greedy(24), use_tqdm=False)
        counters = spec_decode_counters(llm)
    finally:
        shutdown(llm)
    assert not asked
    assert counters["num_draft_tokens"] > 0 and counters["num_accepted_tokens"] > 0
    assert [list(o.outputs[0].token_ids) for o in outputs] == plain.token_ids


def test_exact_greedy_under_preemption(tiny_pair):
    """A KV cache too small for the batch forces preemption and recompute."""
    target, draft = tiny_pair
    # CPU attention uses 128-token blocks: 8 blocks (1024 tokens) cannot hold
    # 12 requests of ~140 prompt tokens (two blocks each) once they grow past 256.
    settings = dict(num_gpu_blocks_override=8)
    prompts = [PROMPTS[4] + p for p in PROMPTS + PROMPTS[:4]]
    plain = run_engine(prompts, greedy(160), **engine(target, **settings))
    ours = run_engine(
        prompts, greedy(160), **engine(target, draft=draft, num_speculative_tokens=6, cmasd=CMASD, **settings)
    )
    assert ours.num_preemptions > 0 and plain.num_preemptions > 0
    assert ours.token_ids == plain.token_ids


def test_seeded_sampling_is_reproducible(tiny_pair):
    from vllm import SamplingParams

    target, draft = tiny_pair
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i, max_tokens=32) for i in range(len(PROMPTS))]
    kwargs = engine(target, draft=draft, num_speculative_tokens=4, cmasd=CMASD)
    first = run_engine(PROMPTS, params, **kwargs)
    second = run_engine(PROMPTS, params, **kwargs)
    assert first.token_ids == second.token_ids
    assert len({tuple(t) for t in first.token_ids}) > 1


@pytest.mark.parametrize(
    "cmasd, field",
    [
        ({"k_min": 5}, "cmasd.k_min"),
        ({"verification": "loose"}, "cmasd.verification"),
        ({"weights": {"entropy": 2.0}}, "cmasd.weights.entropy"),
    ],
)
def test_invalid_config_fails_at_startup(tiny_pair, cmasd, field):
    from vllm import LLM

    target, draft = tiny_pair
    # vLLM's pydantic config wraps our CmasdConfigError (a ValueError).
    with pytest.raises(ValueError, match=field):
        LLM(**engine(target, draft=draft, num_speculative_tokens=4, cmasd=cmasd))


def test_cmasd_without_draft_model_fails_at_startup(tiny_pair):
    from vllm import LLM

    target, _ = tiny_pair
    kwargs = engine(target, ngram=True, num_speculative_tokens=4)
    kwargs["additional_config"] = {"cmasd": {}}
    with pytest.raises(ValueError, match="speculative_config.method"):
        LLM(**kwargs)
    kwargs = engine(target)
    kwargs["additional_config"] = {"cmasd": {}}
    with pytest.raises(ValueError, match="speculative-config"):
        LLM(**kwargs)


def test_dynamic_sd_schedule_is_refused_at_startup(tiny_pair):
    """vLLM's Dynamic SD can ask the proposer for 0 tokens; CM-ASD sets each
    request's length itself, so the schedule is refused with the config error."""
    from vllm import LLM

    target, draft = tiny_pair
    kwargs = engine(target, draft=draft, num_speculative_tokens=4, cmasd=CMASD)
    kwargs["speculative_config"]["num_speculative_tokens_per_batch_size"] = [(1, 2, 4), (3, 256, 0)]
    with pytest.raises(ValueError, match="num_speculative_tokens_per_batch_size: CM-ASD supports"):
        LLM(**kwargs)


def test_drafter_signals_come_from_the_raw_logits_when_drafts_are_sampled(tiny_pair, monkeypatch):
    """With draft_sample_method="probabilistic" vLLM divides the drafter's logits
    by the temperature in place; the signals are defined on the raw logits.
    Top-k 1 makes the target's first token the same at every temperature, so
    the first drafted position's confidences must be too."""
    import torch
    from vllm import SamplingParams

    from vllm_cmasd import proposer

    target, draft = tiny_pair
    real = proposer.unified_confidence

    def first_confidences(temperature):
        seen = []

        def spy(logits, config, vocab_size=None):
            seen.append(real(logits, config, vocab_size))
            return seen[-1]

        monkeypatch.setattr(proposer, "unified_confidence", spy)
        kwargs = engine(target, draft=draft, num_speculative_tokens=4, cmasd=CMASD)
        kwargs["speculative_config"]["draft_sample_method"] = "probabilistic"
        params = SamplingParams(temperature=temperature, top_k=1, seed=0, max_tokens=4, ignore_eos=True)
        run_engine(PROMPTS[:3], params, **kwargs)
        return seen[0]

    cool, hot = first_confidences(0.5), first_confidences(2.0)
    assert cool.shape == (3,)
    assert torch.allclose(cool, hot, atol=1e-6), (cool, hot)
