"""End-to-end on the real SmolLM2-135M-Instruct pair (scripts/setup.sh --models builds it)."""

from __future__ import annotations

import pytest
from conftest import run_engine

from vllm_cmasd.engines import DEFAULT_DRAFT, DEFAULT_TARGET, llm_kwargs

pytestmark = pytest.mark.real

PROMPTS = [
    "Count from 1 to 30, separated by commas.",
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "List the first ten letters of the alphabet.",
    "Explain, in detail and step by step, how a bicycle's gears let a rider climb a steep hill "
    "without getting tired quickly, and what changes when the chain moves to a larger sprocket.",
    "Translate to German: Good morning, how are you?",
]


@pytest.fixture(scope="module")
def real_pair():
    for path in (DEFAULT_TARGET, DEFAULT_DRAFT):
        assert (path / "config.json").exists(), f"{path} missing: run scripts/setup.sh --models"
    return DEFAULT_TARGET, DEFAULT_DRAFT


def chat_prompts(target):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target)
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in PROMPTS
    ]


def test_exact_is_identical_to_plain_decoding_on_real_pair(real_pair):
    from vllm import SamplingParams

    target, draft = real_pair
    prompts = chat_prompts(target)
    params = SamplingParams(temperature=0.0, max_tokens=64)
    settings = dict(enable_prefix_caching=True, enable_chunked_prefill=True)
    plain = run_engine(prompts, params, **llm_kwargs(target, **settings))
    ours = run_engine(
        prompts, params,
        **llm_kwargs(target, draft=draft, num_speculative_tokens=6, cmasd={"verification": "exact"}, **settings),
    )
    assert ours.token_ids == plain.token_ids
    assert ours.drafter.stats.num_drafts > 0
