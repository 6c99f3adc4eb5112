"""The exact verifier keeps the target's sampling distribution, measured in real engines.

Many seeded requests of one prompt, temperature 1 with top-k 20, a few tokens each:
the distribution of the token at each generated position must be the same under
plain decoding and under CM-ASD's exact verification (chi-square test of
homogeneity). Position 0 comes from the prefill; positions 1.. are decided by
verification. The same test must see the confidence-modulated policy change the
distribution (it accepts drafts the target would not sample as often), which
shows the test has the power to catch a lossy verifier. A second setting mixes
greedy requests (every fourth) with top-p 0.9 ones in the same batches: the
greedy ones must all give plain decoding's answer, the others its distribution.
"""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import run_engine
from test_engine import engine

pytestmark = [pytest.mark.engine, pytest.mark.slow]

PROMPT = "for key, value in"
NUM_SAMPLES = 1000
MAX_TOKENS = 4
P_VALUE = 1e-3


def homogeneity_p_value(a: list[int], b: list[int], min_count: int = 10) -> float:
    """Chi-square test that two samples of tokens come from one distribution.

    Tokens seen fewer than ``min_count`` times in both samples together are
    pooled into one category, so every expected count is large enough.
    """
    import torch

    count_a, count_b = Counter(a), Counter(b)
    kept = [t for t in count_a.keys() | count_b.keys() if count_a[t] + count_b[t] >= min_count]
    table = [[count_a[t], count_b[t]] for t in kept]
    pooled = [len(a) - sum(r[0] for r in table), len(b) - sum(r[1] for r in table)]
    if sum(pooled) > 0:
        table.append(pooled)
    if len(table) < 2:
        return 1.0
    observed = torch.tensor(table, dtype=torch.float64)
    expected = observed.sum(1, keepdim=True) * observed.sum(0, keepdim=True) / observed.sum()
    chi_square = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor((len(table) - 1) / 2, dtype=torch.float64)
    return torch.special.gammaincc(dof, chi_square / 2).item()


def _sampling(setting: str, seed: int):
    from vllm import SamplingParams

    common = dict(seed=seed, max_tokens=MAX_TOKENS, ignore_eos=True)
    if setting == "top_k":
        return SamplingParams(temperature=1.0, top_k=20, **common)
    # "mixed_top_p": every fourth request greedy, in the same batches as sampled ones.
    if seed % 4 == 0:
        return SamplingParams(temperature=0.0, **common)
    return SamplingParams(temperature=0.8, top_p=0.9, **common)


def sample(engine_kwargs: dict, first_seed: int, setting: str = "top_k") -> list[list[int]]:
    params = [_sampling(setting, first_seed + i) for i in range(NUM_SAMPLES)]
    run = run_engine([PROMPT] * NUM_SAMPLES, params, **engine_kwargs)
    if "speculative_config" in engine_kwargs:
        assert run.counters["num_accepted_tokens"] > 0
    return run.token_ids


def p_values(reference: list[list[int]], other: list[list[int]]) -> list[float]:
    return [homogeneity_p_value([t[i] for t in reference], [t[i] for t in other]) for i in range(1, MAX_TOKENS)]


@pytest.fixture(scope="module")
def plain_samples(tiny_pair):
    """Plain decoding's samples per setting, each drawn once."""
    target, _ = tiny_pair
    drawn = {}

    def get(setting: str) -> list[list[int]]:
        if setting not in drawn:
            drawn[setting] = sample(engine(target), first_seed=0, setting=setting)
        return drawn[setting]

    return get


@pytest.mark.parametrize(
    "draft_sample_method, cmasd, setting",
    [
        ("greedy", {"verification": "exact", "draft_length": "window"}, "top_k"),
        ("probabilistic", {"verification": "exact", "draft_length": "window"}, "top_k"),
        # The controller (the default) changes what is drafted, never how it is verified.
        ("probabilistic", {"verification": "exact"}, "top_k"),
        # Greedy and top-p requests in one batch.
        ("probabilistic", {"verification": "exact", "draft_length": "window"}, "mixed_top_p"),
    ],
    ids=["exact-greedy-drafts", "exact-sampled-drafts", "controller-sampled-drafts", "exact-mixed-batch-top-p"],
)
def test_exact_verification_keeps_the_target_distribution(tiny_pair, plain_samples, draft_sample_method, cmasd,
                                                          setting, monkeypatch):
    if cmasd.get("draft_length") != "window":
        # Every step drafts: whether a step drafts at all is decided by measured
        # times, and on the tiny pair the budget would often skip.
        import numpy as np

        from vllm_cmasd.proposer import CmasdProposer

        monkeypatch.setattr(CmasdProposer, "_who_drafts", lambda self, ids, query_lens, catch_ups: (np.ones(len(ids), dtype=bool), None))
    target, draft = tiny_pair
    kwargs = engine(target, draft=draft, num_speculative_tokens=4, cmasd=cmasd)
    kwargs["speculative_config"]["draft_sample_method"] = draft_sample_method
    reference = plain_samples(setting)
    # Independent seeds: the samples must agree in distribution, not token for token.
    ours = sample(kwargs, first_seed=NUM_SAMPLES, setting=setting)
    if setting == "mixed_top_p":
        # NUM_SAMPLES is a multiple of 4: the greedy requests sit at the same indices.
        greedy = {tuple(t) for i, t in enumerate(reference + ours) if i % 4 == 0}
        assert len(greedy) == 1, greedy  # every greedy request: plain decoding's one answer
        reference = [t for i, t in enumerate(reference) if i % 4]
        ours = [t for i, t in enumerate(ours) if i % 4]
    p = p_values(reference, ours)
    assert min(p) > P_VALUE, p


@pytest.mark.parametrize(
    "cmasd",
    [{"verification": "confidence", "leniency": 1.0, "draft_length": "window"},
     {"verification": "rstitch", "rstitch_entropy": 2.0, "draft_length": "window"}],
    ids=["confidence", "rstitch"],
)
def test_lenient_verification_is_detected_as_a_different_distribution(tiny_pair, plain_samples, cmasd):
    target, draft = tiny_pair
    kwargs = engine(target, draft=draft, num_speculative_tokens=4, cmasd=cmasd)
    lenient = sample(kwargs, first_seed=NUM_SAMPLES)
    p = p_values(plain_samples("top_k"), lenient)
    assert min(p) < P_VALUE, p


def test_exact_verification_on_an_eagle3_head_keeps_the_target_distribution(tiny_pair, tiny_eagle3, plain_samples):
    """The same test on vLLM's EAGLE-3 proposer path (CmasdEagleProposer), drafts
    sampled from a random head's reduced-vocabulary distribution."""
    target, _ = tiny_pair
    kwargs = engine(target, draft=tiny_eagle3, draft_method="eagle3", num_speculative_tokens=4,
                    cmasd={"verification": "exact", "draft_length": "window"})
    kwargs["speculative_config"]["draft_sample_method"] = "probabilistic"
    ours = sample(kwargs, first_seed=NUM_SAMPLES)
    p = p_values(plain_samples("top_k"), ours)
    assert min(p) > P_VALUE, p
