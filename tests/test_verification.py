"""CM-ASD verification end to end: the policies' rules, EXACT == vLLM, robustness.

On vLLM's CPU build (no usable Triton) these run the torch twins through
vLLM's kernel dispatcher, exactly as the plugin sets them up on CPU, and
compare against vLLM's own CPU rejection kernels. Where Triton can run they
run the Triton kernels on CUDA. Kernel == twin is tests/test_kernels.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vllm.platforms import current_platform
from vllm.triton_utils import HAS_TRITON
from vllm.triton_utils.dispatcher import KernelOverride
from vllm.v1.sample import rejection_sampler
from vllm.v1.sample.logits_processor import LogitsProcessors
from vllm.v1.sample.metadata import SamplingMetadata
from vllm.v1.sample.rejection_sampler import RejectionSampler, rejection_sample
from vllm.v1.sample.sampler import Sampler
from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

from vllm_cmasd.config import CmasdConfig
from vllm_cmasd.kernels import verify
from vllm_cmasd.policies import VERIFICATION_POLICIES, Policy, PolicyParams
from vllm_cmasd.verification import CmasdRejectionSampler, cmasd_rejection_sample
from vllm_cmasd.vllm_patch import register_cpu_kernels

pytestmark = pytest.mark.kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_params(policy: Policy, **knobs) -> PolicyParams:
    """The verifier's parameters for ``policy``, through the config (its defaults)."""
    return PolicyParams.from_config(CmasdConfig(k_max=8, verification=policy.config_name, **knobs))


EXACT = make_params(Policy.EXACT)
# Inputs come from their own seeds: drawn from the same stream as the
# verifier's uniforms, drafts would correlate with their acceptance tests.
DATA_SEED = 12345


@pytest.fixture(scope="module", autouse=True)
def kernels_for_this_platform():
    """What vLLM's CPU worker and the plugin do when Triton cannot run."""
    if not HAS_TRITON:
        current_platform.import_kernels()
        current_platform.register_triton_kernel_overrides()  # vLLM's own rejection kernels
        register_cpu_kernels()


def make_sampling_metadata(temperatures, seeds=None, max_num_logprobs=None, top_k=None, top_p=None):
    """SamplingMetadata for a batch; ``seeds[i]`` gives request i its own generator;
    ``top_k`` / ``top_p``: one value per request, or None."""
    generators = {i: torch.Generator(DEVICE).manual_seed(seed) for i, seed in (seeds or {}).items()}
    batch_size = len(temperatures)
    return SamplingMetadata(
        temperature=torch.tensor(temperatures, dtype=torch.float32, device=DEVICE),
        all_greedy=all(t == 0 for t in temperatures),
        all_random=all(t > 0 for t in temperatures),
        top_p=None if top_p is None else torch.tensor(top_p, dtype=torch.float32, device=DEVICE),
        top_k=None if top_k is None else torch.tensor(top_k, dtype=torch.int32, device=DEVICE),
        generators=generators,
        max_num_logprobs=max_num_logprobs,
        no_penalties=True,
        prompt_token_ids=None,
        frequency_penalties=torch.zeros(batch_size, device=DEVICE),
        presence_penalties=torch.zeros(batch_size, device=DEVICE),
        repetition_penalties=torch.ones(batch_size, device=DEVICE),
        output_token_ids=[[] for _ in range(batch_size)],
        allowed_token_ids_mask=None,
        bad_words_token_ids={},
        logitsprocs=LogitsProcessors(),
    )


def make_batch(draft_lengths, vocab_size, with_draft_probs, seed=0):
    """Target logits, draft distributions close to the target, and drafts from them."""
    g = torch.Generator().manual_seed(DATA_SEED + seed)
    num_tokens = sum(draft_lengths)
    target_logits = torch.randn(num_tokens, vocab_size, generator=g) * 3
    draft_probs = (target_logits + torch.randn(num_tokens, vocab_size, generator=g)).softmax(dim=-1)
    draft_ids = torch.multinomial(draft_probs, 1, generator=g).squeeze(1)
    take_argmax = torch.rand(num_tokens, generator=g) < 0.5
    draft_ids = torch.where(take_argmax, target_logits.argmax(dim=-1), draft_ids)
    return dict(
        draft_token_ids=draft_ids.int().to(DEVICE),
        num_draft_tokens=list(draft_lengths),
        max_spec_len=max(draft_lengths),
        cu_num_draft_tokens=torch.tensor(draft_lengths).cumsum(0).int().to(DEVICE),
        draft_probs=draft_probs.to(DEVICE) if with_draft_probs else None,
        target_logits=target_logits.to(DEVICE),
        bonus_token_ids=torch.randint(vocab_size, (len(draft_lengths), 1), generator=g).to(DEVICE),
    )


def run_cmasd(batch, temperatures, policy_params=EXACT, confidence=None, seeds=None, rng_seed=0, draft_entropy=None):
    torch.manual_seed(rng_seed)
    return cmasd_rejection_sample(
        **batch,
        sampling_metadata=make_sampling_metadata(temperatures, seeds),
        confidence=confidence,
        policy_params=policy_params,
        draft_entropy=draft_entropy,
    )


def assert_well_formed(output_token_ids, num_accepted, num_draft_tokens, vocab_size):
    """Each row: accepted drafts, one recovered/bonus token, then -1 only."""
    for row, accepted, num_draft in zip(output_token_ids.tolist(), num_accepted.tolist(), num_draft_tokens):
        assert 0 <= accepted <= num_draft
        assert all(0 <= token < vocab_size for token in row[: accepted + 1]), row
        assert all(token == -1 for token in row[accepted + 1 :]), row


# --------------------------------------------------------------------------
# EXACT is vLLM's rejection sampler.
# --------------------------------------------------------------------------

TEMPERATURES = {
    "greedy": [0.0] * 6,
    "random": [1.0, 0.7, 1.3, 1.0, 0.5, 1.0],
    "mixed": [0.0, 1.0, 0.0, 0.8, 1.0, 0.0],
}


@pytest.mark.parametrize("seeded", [False, True], ids=["global_rng", "seeded"])
@pytest.mark.parametrize("with_draft_probs", [True, False], ids=["draft_probs", "one_hot"])
@pytest.mark.parametrize("kind", list(TEMPERATURES))
def test_exact_matches_vllm_token_for_token(kind, with_draft_probs, seeded):
    temperatures = TEMPERATURES[kind]
    seeds = {1: 11, 3: 33, 4: 44} if seeded else None
    for seed in range(4):
        batch = make_batch([3, 5, 0, 2, 4, 1], 300, with_draft_probs, seed=seed)
        ours, num_accepted = run_cmasd(batch, temperatures, seeds=seeds, rng_seed=seed)
        torch.manual_seed(seed)
        theirs = rejection_sample(**batch, sampling_metadata=make_sampling_metadata(temperatures, seeds))
        assert torch.equal(ours, theirs), (seed, ours, theirs)
        assert torch.equal(num_accepted, ((ours != -1).sum(dim=1) - 1).int())


P_EIGHT = torch.tensor([0.30, 0.20, 0.15, 0.10, 0.10, 0.08, 0.05, 0.02])
Q_EIGHT = torch.tensor([0.05, 0.10, 0.30, 0.05, 0.20, 0.05, 0.05, 0.20])


def one_token_drafts(p, q, n):
    """n requests of one draft token d ~ q each, verified against target p."""
    g = torch.Generator().manual_seed(DATA_SEED)
    return dict(
        draft_token_ids=torch.multinomial(q, n, replacement=True, generator=g).int().to(DEVICE),
        num_draft_tokens=[1] * n,
        max_spec_len=1,
        cu_num_draft_tokens=torch.arange(1, n + 1, dtype=torch.int32, device=DEVICE),
        draft_probs=q.expand(n, -1).contiguous().to(DEVICE),
        target_logits=p.log().expand(n, -1).contiguous().to(DEVICE),
        bonus_token_ids=torch.zeros(n, 1, dtype=torch.long, device=DEVICE),
    )


def test_exact_reproduces_the_target_distribution():
    """The first emitted token of 200k one-token drafts is distributed as p, not q."""
    p, q = P_EIGHT, Q_EIGHT
    n = 200_000
    batch = one_token_drafts(p, q, n)
    output_token_ids, num_accepted = run_cmasd(batch, [1.0] * n)
    counts = torch.bincount(output_token_ids[:, 0].long().cpu(), minlength=8).double()
    expected = n * p.double()
    chi_square = ((counts - expected) ** 2 / expected).sum().item()
    assert chi_square < 24.32, (chi_square, counts)  # chi2(7 dof) at p = 0.001
    # ... and the acceptance rate is the textbook sum_x min(p, q).
    assert abs(num_accepted.float().mean().item() - torch.minimum(p, q).sum().item()) < 0.005


@pytest.mark.parametrize("threshold, emitted", [(2.5, "q"), (1.5, "p")])
def test_rstitch_emits_the_drafter_where_it_is_sure_and_the_target_elsewhere(threshold, emitted):
    """One-token drafts d ~ q, verified by R-Stitch: below the entropy threshold
    the first emitted token is distributed as q (the drafter's token stands),
    above it as p (exact verification)."""
    p, q = P_EIGHT, Q_EIGHT
    entropy = -(q * q.log()).sum()  # 1.91 nats
    n = 200_000
    batch = one_token_drafts(p, q, n)
    output_token_ids, _ = run_cmasd(
        batch, [1.0] * n, make_params(Policy.RSTITCH, rstitch_entropy=threshold),
        draft_entropy=entropy.expand(n).contiguous().to(DEVICE),
    )
    counts = torch.bincount(output_token_ids[:, 0].long().cpu(), minlength=8).double()
    expected = n * (q if emitted == "q" else p).double()
    chi_square = ((counts - expected) ** 2 / expected).sum().item()
    assert chi_square < 24.32, (chi_square, counts)  # chi2(7 dof) at p = 0.001


# --------------------------------------------------------------------------
# The relaxed policies follow their rules.
# --------------------------------------------------------------------------

# One request, three positions with the same target distribution.
TARGET = torch.tensor([0.5, 0.3, 0.15, 0.05])


def fixed_target_batch(draft_ids):
    n = len(draft_ids)
    return dict(
        draft_token_ids=torch.tensor(draft_ids, dtype=torch.int32, device=DEVICE),
        num_draft_tokens=[n],
        max_spec_len=n,
        cu_num_draft_tokens=torch.tensor([n], dtype=torch.int32, device=DEVICE),
        draft_probs=None,
        target_logits=TARGET.log().expand(n, -1).contiguous().to(DEVICE),
        bonus_token_ids=torch.tensor([[3]], device=DEVICE),
    )


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "random"])
@pytest.mark.parametrize(
    "beta, tau, expected_accepted",
    [
        (2, 1.0, 2),  # token 2 is the third most likely: beyond beta = 2
        (3, 1.0, 2),  # within beta, but log .15 < log .5 - 1
        (3, 1.5, 3),  # both conditions hold
        (1, 0.0, 0),  # beta = 1: only the argmax passes
    ],
)
def test_topk_tolerance_rule(temperature, beta, tau, expected_accepted):
    """Drafts [1, 1, 2] under p = [.5, .3, .15, .05], the same rule for greedy and random."""
    params = make_params(Policy.TOPK_TOLERANCE, topk_beta=beta, topk_tau=tau)
    output, num_accepted = run_cmasd(fixed_target_batch([1, 1, 2]), [temperature], params)
    assert num_accepted.tolist() == [expected_accepted]
    row = output[0].tolist()
    assert row[:expected_accepted] == [1, 1, 2][:expected_accepted]
    if expected_accepted == 3:
        assert row[3] == 3  # the bonus token
    elif temperature == 0.0:
        assert row[expected_accepted] == 0  # greedy rejection emits the argmax


@pytest.mark.parametrize(
    "leniency, confidence, accepted",
    [
        (0.6, 1.0, True),  # delta = 0.6 >= log(.5/.3) = 0.51
        (0.6, 0.75, False),  # delta = 0.6 * (.75 - .5) / .5 = 0.3
        (2.0, 0.5, False),  # at the floor: strict
        (0.0, 1.0, False),  # no leniency: strict
    ],
)
def test_confidence_rule_greedy(leniency, confidence, accepted):
    params = make_params(Policy.CONFIDENCE, leniency=leniency, confidence_floor=0.5)
    output, num_accepted = run_cmasd(
        fixed_target_batch([1]), [0.0], params, confidence=torch.tensor([confidence], device=DEVICE)
    )
    assert output[0].tolist() == ([1, 3] if accepted else [0, -1])
    assert num_accepted.tolist() == [int(accepted)]


@pytest.mark.parametrize("leniency, rate", [(0.0, 0.3), (math.log(2.0), 0.6), (5.0, 1.0)])
def test_confidence_rule_random(leniency, rate):
    """One-hot draft of token 1 (p = .3): accepted with probability min(1, .3 e^delta)."""
    n = 40_000
    batch = dict(
        draft_token_ids=torch.ones(n, dtype=torch.int32, device=DEVICE),
        num_draft_tokens=[1] * n,
        max_spec_len=1,
        cu_num_draft_tokens=torch.arange(1, n + 1, dtype=torch.int32, device=DEVICE),
        draft_probs=None,
        target_logits=TARGET.log().expand(n, -1).contiguous().to(DEVICE),
        bonus_token_ids=torch.zeros(n, 1, dtype=torch.long, device=DEVICE),
    )
    params = make_params(Policy.CONFIDENCE, leniency=leniency, confidence_floor=0.2)
    output, num_accepted = run_cmasd(batch, [1.0] * n, params, confidence=torch.ones(n, device=DEVICE))
    assert abs(num_accepted.float().mean().item() - rate) < 0.015
    # Rejected positions emit the residual max(0, p - onehot(1)): never token 1.
    assert not ((num_accepted == 0) & (output[:, 0] == 1)).any()


@pytest.mark.parametrize("kind", list(TEMPERATURES))
def test_confidence_is_monotone_in_leniency(kind):
    temperatures = TEMPERATURES[kind]
    for seed in range(3):
        batch = make_batch([4, 6, 0, 3, 5, 2], 200, True, seed=seed)
        confidence = torch.rand(batch["draft_token_ids"].shape[0], generator=torch.Generator().manual_seed(DATA_SEED))
        confidence = confidence.to(DEVICE)
        exact, _ = run_cmasd(batch, temperatures, EXACT, rng_seed=seed)
        previous = None
        for leniency in [0.0, 0.05, 0.3, 1.0, 2.0, 5.0, 20.0]:
            params = make_params(Policy.CONFIDENCE, leniency=leniency, confidence_floor=0.3)
            output, num_accepted = run_cmasd(batch, temperatures, params, confidence, rng_seed=seed)
            if leniency == 0.0:
                assert torch.equal(output, exact)
            else:
                assert (num_accepted >= previous).all(), (leniency, num_accepted, previous)
            previous = num_accepted
        # No confidence signal, or confidence at the floor, is EXACT too.
        for strict_confidence in (None, torch.full_like(confidence, 0.3)):
            params = make_params(Policy.CONFIDENCE, leniency=5.0, confidence_floor=0.3)
            output, _ = run_cmasd(batch, temperatures, params, strict_confidence, rng_seed=seed)
            assert torch.equal(output, exact)


# --------------------------------------------------------------------------
# Walk layout and bad inputs.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("policy", list(Policy), ids=lambda p: p.name)
def test_walk_layout_with_empty_and_padded_drafts(policy):
    """Greedy rows: stop at the first miss (or padding), bonus after a full match."""
    target_logits = torch.eye(6)[[0, 1, 2, 3, 4, 5, 0]] * 10  # argmax of token i is row i's hot entry
    # requests: [0, 1, miss] | [] | [padding, 4] | [5] | [0]
    draft_ids = [0, 1, 4, -1, 4, 5, 0]
    batch = dict(
        draft_token_ids=torch.tensor(draft_ids, dtype=torch.int32, device=DEVICE),
        num_draft_tokens=[3, 0, 2, 1, 1],
        max_spec_len=3,
        cu_num_draft_tokens=torch.tensor([3, 3, 5, 6, 7], dtype=torch.int32, device=DEVICE),
        draft_probs=None,
        target_logits=target_logits.to(DEVICE),
        bonus_token_ids=torch.tensor([[1], [2], [3], [4], [5]], device=DEVICE),
    )
    params = make_params(policy, leniency=1.0, confidence_floor=0.0, topk_beta=1, topk_tau=0.0)
    output, num_accepted = run_cmasd(batch, [0.0] * 5, params)
    assert output.tolist() == [[0, 1, 2, -1], [2, -1, -1, -1], [3, -1, -1, -1], [5, 4, -1, -1], [0, 5, -1, -1]]
    assert num_accepted.tolist() == [2, 0, 0, 1, 1]


@pytest.mark.parametrize("with_draft_probs", [True, False], ids=["draft_probs", "one_hot"])
@pytest.mark.parametrize("policy", list(Policy), ids=lambda p: p.name)
@pytest.mark.parametrize("kind", list(TEMPERATURES))
def test_bad_numbers_never_leave_the_vocabulary(kind, policy, with_draft_probs):
    vocab_size = 64
    batch = make_batch([3, 5, 0, 2, 4, 1], vocab_size, with_draft_probs, seed=7)
    logits = batch["target_logits"]
    logits[0] = float("nan")
    logits[1, :10] = float("inf")
    logits[2] = float("-inf")
    logits[3, 5] = float("nan")
    logits[4, -3:] = float("inf")
    if with_draft_probs:
        draft_probs = batch["draft_probs"]
        draft_probs[5].zero_()
        draft_probs[6, batch["draft_token_ids"][6]] = 0.0
        draft_probs[7] = float("nan")
    batch["draft_token_ids"][8] = -1
    batch["draft_token_ids"][9] = vocab_size + 5
    # Drafts of token 0 on the broken rows: what an all-NaN row's argmax gives.
    batch["draft_token_ids"][0] = batch["draft_token_ids"][3] = 0
    params = make_params(policy, leniency=2.0, confidence_floor=0.2, topk_beta=4, topk_tau=3.0, rstitch_entropy=1.0)
    confidence = torch.rand(logits.shape[0], device=DEVICE)
    confidence[0] = float("nan")
    # Certain-looking drafter signals everywhere else: nothing but the target stops a draft.
    entropy = torch.zeros(logits.shape[0], device=DEVICE)
    output, num_accepted = run_cmasd(batch, TEMPERATURES[kind], params, confidence, draft_entropy=entropy)
    assert_well_formed(output, num_accepted, batch["num_draft_tokens"], vocab_size)
    # Request 0's first row is all NaN, request 1's first has one NaN (its softmax is
    # NaN throughout): neither has a distribution, so neither accepts a token.
    assert num_accepted[:2].tolist() == [0, 0]


def test_argmax_path_and_stats_kernel_flag_the_same_broken_rows():
    """All-greedy EXACT batches skip the softmax; they must find the same rows
    without a distribution as the stats kernel (max p = 0 there)."""
    vocab_size = 300
    batch = make_batch([3, 5, 0, 2, 4, 1], vocab_size, with_draft_probs=False, seed=3)
    logits = batch["target_logits"]
    logits[0] = float("nan")
    logits[1, :10] = float("inf")
    logits[2] = float("-inf")
    logits[3, 5] = float("nan")
    logits[4, ::2] = float("-inf")  # masked entries (logits processors) stay valid
    fast = verify.argmax_draft_token_stats(logits, batch["draft_token_ids"])
    argmax_id, has_max = verify.target_argmax(logits)
    full = verify.compute_draft_token_stats(
        logits.softmax(dim=-1), None, batch["draft_token_ids"], batch["cu_num_draft_tokens"], None, Policy.EXACT,
        argmax_id=argmax_id,
    )
    assert torch.equal(fast.target_max_prob > 0, full.target_max_prob > 0)
    assert (fast.target_max_prob > 0).tolist()[:5] == [False, False, False, False, True]
    assert has_max.tolist()[:5] == [False, False, False, False, True]
    assert fast.target_argmax[:4].tolist() == [0, 0, 0, 0]


# --------------------------------------------------------------------------
# The edges: ties, broken rows, invalid ids (each of these failed before its fix).
# --------------------------------------------------------------------------


def tie_batch(draft_id):
    """Request 0 (greedy): logits 0 at token 3 and 1e-8 at token 7, so both round to
    one float32 probability while the logits' argmax is 7. Request 1 samples."""
    logits = torch.full((2, 16), -5.0)
    logits[0, 3], logits[0, 7] = 0.0, 1e-8
    logits[1] = torch.randn(16, generator=torch.Generator().manual_seed(DATA_SEED))
    probs = logits.softmax(dim=-1)
    assert probs[0, 3] == probs[0, 7]
    return dict(
        draft_token_ids=torch.tensor([draft_id, 2], dtype=torch.int32, device=DEVICE),
        num_draft_tokens=[1, 1],
        max_spec_len=1,
        cu_num_draft_tokens=torch.tensor([1, 2], dtype=torch.int32, device=DEVICE),
        draft_probs=None,
        target_logits=logits.to(DEVICE),
        bonus_token_ids=torch.tensor([[9], [9]], device=DEVICE),
    )


# Each policy with knobs that make it strict: a greedy tie then has one answer.
STRICT = {
    Policy.EXACT: {},
    Policy.CONFIDENCE: dict(leniency=0.0),
    Policy.TOPK_TOLERANCE: dict(topk_beta=1, topk_tau=0.0),
    Policy.RSTITCH: dict(rstitch_entropy=0.0),
}


@pytest.mark.parametrize("temperatures", [[0.0, 0.0], [0.0, 1.0]], ids=["all_greedy", "mixed"])
@pytest.mark.parametrize("policy", list(Policy), ids=lambda p: p.name)
def test_greedy_requests_take_the_logits_argmax_in_every_batch(policy, temperatures):
    strict = make_params(policy, **STRICT[policy])
    # The logits' argmax (7) is accepted, as vLLM's greedy sampler would emit it ...
    output, num_accepted = run_cmasd(tie_batch(7), temperatures, strict, confidence=torch.ones(2, device=DEVICE))
    assert output[0].tolist() == [7, 9] and num_accepted[0] == 1
    # ... and a wrong draft is replaced by it, not by the lowest id of equal probability.
    output, _ = run_cmasd(tie_batch(5), temperatures, strict, confidence=torch.ones(2, device=DEVICE))
    assert output[0].tolist() == [7, -1]
    if policy == Policy.EXACT:
        for draft_id in (7, 5):
            torch.manual_seed(0)
            theirs = rejection_sample(**tie_batch(draft_id), sampling_metadata=make_sampling_metadata(temperatures))
            assert torch.equal(run_cmasd(tie_batch(draft_id), temperatures, rng_seed=0)[0], theirs)
    if policy == Policy.CONFIDENCE:  # leniency 0 is exact, bit for bit, in every batch
        for draft_id in (7, 5, 3):
            ours = run_cmasd(tie_batch(draft_id), temperatures, strict, confidence=torch.ones(2, device=DEVICE))
            assert torch.equal(ours[0], run_cmasd(tie_batch(draft_id), temperatures)[0])


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "random"])
@pytest.mark.parametrize("policy", list(Policy), ids=lambda p: p.name)
def test_a_target_row_without_a_distribution_rejects_every_draft(policy, temperature):
    """All-NaN, +inf and all -inf target rows, each under a draft of token 0 (the
    broken row's argmax) that every drafter signal calls certain."""
    vocab_size = 32
    bad_rows = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
    logits = torch.randn(len(bad_rows), vocab_size, generator=torch.Generator().manual_seed(DATA_SEED))
    for row, value in enumerate(bad_rows.values()):
        logits[row] = value
    n = len(bad_rows)
    batch = dict(
        draft_token_ids=torch.zeros(n, dtype=torch.int32, device=DEVICE),
        num_draft_tokens=[1] * n,
        max_spec_len=1,
        cu_num_draft_tokens=torch.arange(1, n + 1, dtype=torch.int32, device=DEVICE),
        draft_probs=torch.nn.functional.one_hot(torch.zeros(n, dtype=torch.long), vocab_size).float().to(DEVICE),
        target_logits=logits.to(DEVICE),
        bonus_token_ids=torch.full((n, 1), 5, device=DEVICE),
    )
    knobs = dict(leniency=20.0, confidence_floor=0.0, topk_beta=vocab_size, topk_tau=100.0, rstitch_entropy=10.0)
    output, num_accepted = run_cmasd(
        batch, [temperature] * n, make_params(policy, **knobs),
        confidence=torch.ones(n, device=DEVICE), draft_entropy=torch.zeros(n, device=DEVICE),
    )
    assert num_accepted.tolist() == [0] * n, (policy, list(bad_rows))
    assert ((output[:, 0] >= 0) & (output[:, 0] < vocab_size)).all() and (output[:, 1] == -1).all()


def test_an_invalid_draft_id_in_a_sampled_request_resamples_from_the_target():
    """Draft id -1 (padding) with a draft distribution q = onehot(0) and target
    p = (.5, .5): the id was never drawn from q, so the emitted token must be a
    sample of p, not of norm(max(0, p - q)) = onehot(1)."""
    n = 20_000
    p = torch.tensor([0.5, 0.5, 0.0, 0.0])
    batch = dict(
        draft_token_ids=torch.full((n,), -1, dtype=torch.int32, device=DEVICE),
        num_draft_tokens=[1] * n,
        max_spec_len=1,
        cu_num_draft_tokens=torch.arange(1, n + 1, dtype=torch.int32, device=DEVICE),
        draft_probs=torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(n, -1).contiguous().to(DEVICE),
        target_logits=p.log().expand(n, -1).contiguous().to(DEVICE),
        bonus_token_ids=torch.zeros(n, 1, dtype=torch.long, device=DEVICE),
    )
    output, num_accepted = run_cmasd(batch, [1.0] * n)
    assert (num_accepted == 0).all()
    share_of_token_0 = (output[:, 0] == 0).float().mean().item()
    assert abs(share_of_token_0 - 0.5) < 0.02, share_of_token_0


# --------------------------------------------------------------------------
# The sampler module and its wiring.
# --------------------------------------------------------------------------


def spec_decode_metadata(draft_token_ids, num_draft_tokens):
    """Metadata for logits laid out per request as [its drafted positions..., bonus]."""
    cu_sampled = torch.tensor(num_draft_tokens).add(1).cumsum(0)
    starts = cu_sampled - torch.tensor(num_draft_tokens) - 1
    target_indices = torch.cat([start + torch.arange(n) for start, n in zip(starts.tolist(), num_draft_tokens)])
    return SpecDecodeMetadata(
        draft_token_ids=draft_token_ids,
        num_draft_tokens=num_draft_tokens,
        cu_num_draft_tokens=torch.tensor(num_draft_tokens).cumsum(0).int().to(DEVICE),
        cu_num_sampled_tokens=cu_sampled.int().to(DEVICE),
        target_logits_indices=target_indices.int().to(DEVICE),
        bonus_logits_indices=(cu_sampled - 1).int().to(DEVICE),
        logits_indices=torch.arange(int(cu_sampled[-1]), dtype=torch.int32, device=DEVICE),
    )


@pytest.mark.parametrize("kind", list(TEMPERATURES))
def test_sampler_matches_vllm_with_logprobs(kind):
    num_draft_tokens = [3, 5, 0, 2, 4, 1]
    batch = make_batch(num_draft_tokens, 300, True, seed=3)
    metadata = spec_decode_metadata(batch["draft_token_ids"], num_draft_tokens)
    logits = torch.randn(sum(num_draft_tokens) + len(num_draft_tokens), 300, device=DEVICE) * 3
    logits[metadata.target_logits_indices.long()] = batch["target_logits"]  # drafts often right
    config = CmasdConfig(k_max=8, verification="exact")
    asked = []
    ours = CmasdRejectionSampler(Sampler(), None, DEVICE, config, lambda name, m: asked.append((name, m)))
    theirs = RejectionSampler(Sampler())
    results = []
    for sampler in (ours, theirs):
        torch.manual_seed(0)
        sampling_metadata = make_sampling_metadata(TEMPERATURES[kind], {1: 5}, max_num_logprobs=2)
        results.append(sampler(metadata, batch["draft_probs"], logits.clone(), sampling_metadata))
    assert torch.equal(results[0].sampled_token_ids, results[1].sampled_token_ids)
    for a, b in zip(results[0].logprobs_tensors, results[1].logprobs_tensors):
        assert (a is None and b is None) or torch.equal(a, b)
    assert asked == []  # exact verification reads no drafter signal
    assert torch.equal(ours.last_num_accepted, ((results[0].sampled_token_ids != -1).sum(dim=1) - 1).int())


@pytest.mark.parametrize("kind", list(TEMPERATURES))
def test_a_step_without_drafts_is_vllms_verification_of_no_drafts(kind):
    """The shortcut for steps the controller drafted nothing on (plain decoding's
    sampler) gives what vLLM's rejection sampler gives for zero drafts: the same
    tokens, logprobs and per-request generator states."""
    num_draft_tokens = [0] * 6
    metadata = spec_decode_metadata(torch.empty(0, dtype=torch.int32, device=DEVICE), num_draft_tokens)
    logits = torch.randn(len(num_draft_tokens), 300, generator=torch.Generator().manual_seed(DATA_SEED)).to(DEVICE) * 3
    ours = CmasdRejectionSampler(Sampler(), None, DEVICE, CmasdConfig(k_max=8), lambda name, m: None)
    theirs = RejectionSampler(Sampler())
    results, states = [], []
    for sampler in (ours, theirs):
        torch.manual_seed(0)
        sampling_metadata = make_sampling_metadata(TEMPERATURES[kind], {1: 5, 4: 9}, max_num_logprobs=2)
        results.append(sampler(metadata, None, logits.clone(), sampling_metadata))
        states.append([gen.get_state() for gen in sampling_metadata.generators.values()])
    assert torch.equal(results[0].sampled_token_ids, results[1].sampled_token_ids)
    for a, b in zip(results[0].logprobs_tensors, results[1].logprobs_tensors):
        assert (a is None and b is None) or torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(*states))
    assert ours.last_num_accepted.tolist() == [0] * 6


SAMPLING_SETTINGS = {
    # name: (temperatures, top_k (200 = the vocabulary: off, as vLLM writes it),
    #        top_p, integer logits (ties), use_fp64_gumbel)
    "mixed-top_k": ([0.0, 1.0, 0.7, 0.0, 1.3, 1.0], [200, 5, 20, 200, 3, 1], None, False, False),
    "mixed-top_p": ([0.0, 1.0, 0.7, 0.0, 1.3, 1.0], None, [1.0, 0.9, 0.5, 1.0, 0.8, 0.95], False, False),
    "random-top_k_top_p-fp64": ([1.0, 0.9, 1.2, 1.0, 0.6, 1.0], [10, 200, 4, 30, 2, 7], [0.9, 0.7, 1.0, 0.85, 1.0, 0.6],
                                False, True),
    "mixed-ties": ([0.0, 1.0, 0.0, 0.8, 1.0, 0.0], None, None, True, False),
    "mixed-ties-fp64-top_k": ([0.0, 1.0, 0.0, 0.8, 1.0, 0.0], [200, 3, 200, 5, 2, 200], None, True, True),
}


@pytest.mark.parametrize("with_draft_probs", [True, False], ids=["draft_probs", "one_hot"])
@pytest.mark.parametrize("setting", list(SAMPLING_SETTINGS))
def test_sampler_matches_vllm_under_sampling_constraints(setting, with_draft_probs):
    """EXACT through the whole sampler (temperature, top-k, top-p, fp64 noise,
    softmax ties, greedy beside sampled requests) is vLLM's sampler token for
    token, and leaves every per-request generator where vLLM leaves it (the
    request without drafts has a generator that must stay untouched)."""
    temperatures, top_k, top_p, ties, fp64 = SAMPLING_SETTINGS[setting]
    num_draft_tokens = [3, 5, 0, 2, 4, 1]
    seeds = {1: 11, 2: 22, 4: 44, 5: 55}  # request 2 drafts nothing
    for seed in range(3):
        batch = make_batch(num_draft_tokens, 200, with_draft_probs, seed=seed)
        metadata = spec_decode_metadata(batch["draft_token_ids"], num_draft_tokens)
        g = torch.Generator().manual_seed(DATA_SEED + 100 + seed)
        logits = (torch.randn(sum(num_draft_tokens) + len(num_draft_tokens), 200, generator=g) * 3).to(DEVICE)
        logits[metadata.target_logits_indices.long()] = batch["target_logits"]
        if ties:  # many equal probabilities, the maximum included
            logits = logits.round()
        ours = CmasdRejectionSampler(Sampler(), None, DEVICE, CmasdConfig(k_max=8), lambda name, m: None)
        theirs = RejectionSampler(Sampler())
        results, states = [], []
        for sampler in (ours, theirs):
            sampler.use_fp64_gumbel = fp64
            torch.manual_seed(seed)
            sampling_metadata = make_sampling_metadata(temperatures, seeds, top_k=top_k, top_p=top_p)
            results.append(sampler(metadata, batch["draft_probs"], logits.clone(), sampling_metadata))
            states.append({i: gen.get_state() for i, gen in sampling_metadata.generators.items()})
            states[-1]["global"] = torch.get_rng_state()
        assert torch.equal(results[0].sampled_token_ids, results[1].sampled_token_ids), (seed, results)
        for i in states[0]:
            assert torch.equal(states[0][i], states[1][i]), f"generator {i} moved differently"


def test_sampler_uses_the_confidence_source():
    num_draft_tokens = [4, 4, 4]
    batch = make_batch(num_draft_tokens, 100, True, seed=5)
    metadata = spec_decode_metadata(batch["draft_token_ids"], num_draft_tokens)
    logits = torch.randn(15, 100, device=DEVICE)  # every p(d) > e^-20 p_max
    accepted = {}
    for name, leniency in [("strict", 0.0), ("lenient", 20.0)]:
        config = CmasdConfig(k_max=4, verification="confidence", leniency=leniency, confidence_floor=0.0)
        sampler = CmasdRejectionSampler(
            Sampler(),
            None,
            DEVICE,
            config,
            lambda name, m: torch.ones(m.draft_token_ids.shape[0], device=DEVICE) if name == "confidence" else None,
        )
        torch.manual_seed(0)
        sampler(metadata, batch["draft_probs"], logits.clone(), make_sampling_metadata([0.0, 1.0, 0.0]))
        accepted[name] = sampler.last_num_accepted
    # Leniency 20 with full confidence accepts any draft with p(d) > e^-20 p_max.
    assert accepted["lenient"].tolist() == [4, 4, 4]
    assert (accepted["strict"] <= accepted["lenient"]).all()


@pytest.mark.parametrize("kind", list(TEMPERATURES))
def test_rstitch_keeps_exactly_the_low_entropy_drafts(kind):
    """R-Stitch: a draft with entropy below the threshold stands; others are checked exactly."""
    temperatures = TEMPERATURES[kind]
    num_draft_tokens = [3, 5, 0, 2, 4, 1]
    batch = make_batch(num_draft_tokens, 300, True, seed=7)
    num_tokens = sum(num_draft_tokens)
    entropy = torch.rand(num_tokens, generator=torch.Generator().manual_seed(DATA_SEED)).to(DEVICE) * 2
    exact = run_cmasd(batch, temperatures, rng_seed=1)

    def rstitch(threshold, entropy=entropy):
        return run_cmasd(batch, temperatures, make_params(Policy.RSTITCH, rstitch_entropy=threshold),
                         rng_seed=1, draft_entropy=entropy)

    # Threshold 0 keeps nothing unchecked (entropies are >= 0): exact, bit for bit;
    # so is a missing entropy.
    for output in (rstitch(0.0), rstitch(5.0, entropy=None)):
        assert torch.equal(output[0], exact[0]) and torch.equal(output[1], exact[1])
    # Above every entropy: every draft stands, then the bonus token.
    output, accepted = rstitch(2.5)
    assert accepted.tolist() == num_draft_tokens
    for row, n, bonus in zip(output.tolist(), num_draft_tokens, batch["bonus_token_ids"].view(-1).tolist()):
        assert row[n] == bonus
    # In between: a draft stands if it is kept or exact accepts it, up to the first
    # that is neither (the exact decisions per token come from the same uniforms).
    cu = [0, *torch.tensor(num_draft_tokens).cumsum(0).tolist()]
    kept = (entropy < 1.0).tolist()
    exact_accepts = exact[1].tolist()
    previous = torch.zeros(len(num_draft_tokens), dtype=torch.int32, device=DEVICE)
    for threshold in (0.3, 1.0, 1.7):
        output, accepted = rstitch(threshold)
        assert_well_formed(output, accepted, num_draft_tokens, 300)
        assert (accepted >= exact[1]).all() and (accepted >= previous).all()  # monotone in the threshold
        previous = accepted
        if threshold == 1.0:
            for b, n in enumerate(num_draft_tokens):
                first_unkept = next((j for j in range(n) if not kept[cu[b] + j]), n)
                # Exact accepts the first exact_accepts[b] tokens; R-Stitch accepts
                # at least those and every kept prefix.
                assert accepted[b] >= max(first_unkept, exact_accepts[b])


def test_policy_params_come_from_the_config_alone():
    assert VERIFICATION_POLICIES == ("exact", "confidence", "topk-tolerance", "rstitch")
    for name in VERIFICATION_POLICIES:
        params = PolicyParams.from_config(
            CmasdConfig(k_max=4, verification=name, leniency=2, confidence_floor=0.25, topk_beta=5, topk_tau=1.5)
        )
        assert params.policy.config_name == name and Policy.from_config_name(name) is params.policy
        assert (params.leniency, params.confidence_floor, params.topk_beta, params.topk_tau) == (2, 0.25, 5, 1.5)
    # No second set of defaults: the config's are the only ones.
    with pytest.raises(TypeError):
        PolicyParams(policy=Policy.CONFIDENCE)
    defaults = PolicyParams.from_config(CmasdConfig(k_max=4, verification="confidence"))
    assert (defaults.leniency, defaults.confidence_floor, defaults.topk_beta, defaults.topk_tau) == (1.0, 0.5, 3, 2.0)


@pytest.mark.skipif(HAS_TRITON, reason="registration is for platforms without Triton")
def test_register_cpu_kernels_is_idempotent():
    def registered():
        return [getattr(verify, kernel.__name__) for kernel, _ in verify.KERNELS_AND_TWINS] + [
            rejection_sampler.expand_kernel
        ]

    before = registered()
    for override, (_, twin) in zip(before, verify.KERNELS_AND_TWINS):
        assert isinstance(override, KernelOverride) and override.func is twin
    register_cpu_kernels()
    assert registered() == before


@pytest.mark.skipif(HAS_TRITON, reason="the fix is for vLLM's CPU override")
def test_cpu_expand_fix_gives_per_token_temperatures():
    """vLLM 0.32's CPU expand override returns uninitialised memory for floats."""
    cu_num_tokens = torch.tensor([2, 2, 5], dtype=torch.int32)
    temperature = rejection_sampler.expand_batch_to_tokens(
        torch.tensor([0.7, 0.5, 0.0]), cu_num_tokens, 5, replace_from=0, replace_to=1
    )
    assert temperature.tolist() == pytest.approx([0.7, 0.7, 1.0, 1.0, 1.0])
    top_k = rejection_sampler.expand_batch_to_tokens(torch.tensor([5, 7, 9], dtype=torch.int32), cu_num_tokens, 5)
    assert top_k.tolist() == [5, 5, 9, 9, 9]


# --------------------------------------------------------------------------
# Properties over random batches (hypothesis).
# --------------------------------------------------------------------------

ROW_DEFECTS = ("none", "nan_row", "one_nan", "inf_entry", "all_neg_inf", "masked_half")
DRAFT_DEFECTS = ("none", "pad", "out_of_vocab", "q_zero", "q_nan")


@st.composite
def verification_batches(draw):
    """Draft lengths 0..k_max, greedy and sampled requests, NaN / inf target rows,
    invalid draft ids and broken draft probabilities, every policy."""
    k_max = draw(st.integers(1, 6))
    batch_size = draw(st.integers(1, 6))
    lengths = draw(st.lists(st.integers(0, k_max), min_size=batch_size, max_size=batch_size))
    num_tokens = sum(lengths)
    return dict(
        vocab_size=draw(st.integers(2, 48)),
        lengths=lengths,
        greedy=draw(st.lists(st.booleans(), min_size=batch_size, max_size=batch_size)),
        with_draft_probs=draw(st.booleans()),
        row_defects=draw(st.lists(st.sampled_from(ROW_DEFECTS), min_size=num_tokens, max_size=num_tokens)),
        draft_defects=draw(st.lists(st.sampled_from(DRAFT_DEFECTS), min_size=num_tokens, max_size=num_tokens)),
        policy=draw(st.sampled_from(list(Policy))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build_random_batch(spec):
    vocab_size, lengths = spec["vocab_size"], spec["lengths"]
    g = torch.Generator().manual_seed(spec["seed"])
    num_tokens = sum(lengths)
    logits = torch.randn(num_tokens, vocab_size, generator=g) * 3
    draft_probs = (logits + torch.randn(num_tokens, vocab_size, generator=g)).softmax(dim=-1)
    draft_ids = torch.where(
        torch.rand(num_tokens, generator=g) < 0.6,
        logits.argmax(dim=-1),
        torch.multinomial(draft_probs, 1, generator=g).squeeze(1) if num_tokens else torch.zeros(0, dtype=torch.long),
    )
    for j, defect in enumerate(spec["row_defects"]):
        if defect == "nan_row":
            logits[j] = float("nan")
        elif defect == "one_nan":
            logits[j, j % vocab_size] = float("nan")
        elif defect == "inf_entry":
            logits[j, (j + 1) % vocab_size] = float("inf")
        elif defect == "all_neg_inf":
            logits[j] = float("-inf")
        elif defect == "masked_half":  # a logits processor's -inf: still a valid row
            logits[j, 1::2] = float("-inf")
    for j, defect in enumerate(spec["draft_defects"]):
        if defect == "pad":
            draft_ids[j] = -1
        elif defect == "out_of_vocab":
            draft_ids[j] = vocab_size + j
        elif defect == "q_zero":
            draft_probs[j, draft_ids[j]] = 0.0
        elif defect == "q_nan":
            draft_probs[j] = float("nan")
    batch = dict(
        draft_token_ids=draft_ids.int().to(DEVICE),
        num_draft_tokens=list(lengths),
        max_spec_len=max(lengths),
        cu_num_draft_tokens=torch.tensor(lengths).cumsum(0).int().to(DEVICE),
        draft_probs=draft_probs.to(DEVICE) if spec["with_draft_probs"] else None,
        target_logits=logits.to(DEVICE),
        bonus_token_ids=torch.randint(vocab_size, (len(lengths), 1), generator=g).to(DEVICE),
    )
    signals = dict(
        confidence=torch.rand(num_tokens, generator=g).to(DEVICE),
        draft_entropy=(torch.rand(num_tokens, generator=g) * 2).to(DEVICE),
    )
    return batch, signals


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=verification_batches())
def test_verification_properties_on_random_batches(spec):
    batch, signals = build_random_batch(spec)
    vocab_size, lengths = spec["vocab_size"], spec["lengths"]
    temperatures = [0.0 if g else 1.0 for g in spec["greedy"]]
    knobs = dict(leniency=2.0, confidence_floor=0.2, topk_beta=3, topk_tau=2.0, rstitch_entropy=1.0)
    output, num_accepted = run_cmasd(batch, temperatures, make_params(spec["policy"], **knobs), **signals)

    assert output.shape == (len(lengths), max(lengths) + 1) and output.dtype == torch.int32
    assert_well_formed(output, num_accepted, lengths, vocab_size)
    logits = batch["target_logits"].cpu()
    has_max = logits.amax(dim=-1).isfinite()
    draft_ids = batch["draft_token_ids"].cpu().tolist()
    start = 0
    for b, (row, accepted, n) in enumerate(zip(output.cpu().tolist(), num_accepted.cpu().tolist(), lengths)):
        drafted = draft_ids[start : start + n]
        assert row[:accepted] == drafted[:accepted]  # the accepted prefix is the draft itself
        assert all(0 <= d < vocab_size for d in drafted[:accepted])  # invalid ids never stand
        broken = [j for j in range(n) if not has_max[start + j]]
        assert not broken or accepted <= broken[0]  # a row without a distribution rejects
        if temperatures[b] == 0.0 and accepted < n:
            j = start + accepted  # greedy rejection emits the logits' argmax (0 for a broken row)
            assert row[accepted] == (int(logits[j].argmax()) if has_max[j] else 0)
        start += n


def test_policy_knobs_cannot_be_passed_by_position():
    """walk_acceptance and cmasd_rejection_sample take keywords only: adjacent
    floats (leniency, floor, tau, entropy) could otherwise be swapped unnoticed."""
    batch = fixed_target_batch([1])
    stats = verify.argmax_draft_token_stats(batch["target_logits"], batch["draft_token_ids"])
    with pytest.raises(TypeError):
        verify.walk_acceptance(stats, batch["draft_token_ids"], batch["cu_num_draft_tokens"])
    with pytest.raises(TypeError):
        cmasd_rejection_sample(*batch.values())
    # The kernels' compile-time constants are the registry's values.
    assert [int(getattr(verify, p.name).value) for p in Policy] == [int(p) for p in Policy]
