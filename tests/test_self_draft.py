"""The SpecBound-style self-draft (vllm_cmasd.self_draft, scripts/build_self_draft.py).

On the tiny random-weight target (4 layers, untied LM head) a self-draft exits after
layer 2. The tiny pair's own draft is a *copy* of the same target's first 2 layers,
embeddings, final norm and head, so at T=1 both drafters compute one function: the
self-draft must draft exactly what the copy drafts, from the target's own tensors.
"""

from __future__ import annotations

import pytest
from conftest import load_script, run_engine
from test_engine import CMASD, PROMPTS, engine, greedy

from vllm_cmasd.self_draft import build_self_draft, unique_weight_bytes

EXIT_LAYER = 2
HOT = 3.0  # a temperature well above the calibrated ones: visibly lower confidence


@pytest.fixture(scope="module")
def self_drafts(tiny_pair, tmp_path_factory):
    """{temperature: self-draft dir} for the tiny target, exit layer 2."""
    target, _ = tiny_pair
    root = tmp_path_factory.mktemp("self-drafts")
    return {t: build_self_draft(target, root / f"t{t}", EXIT_LAYER, t) for t in (1.0, HOT)}


def _models(run):
    """(draft model, target model) of a finished engine run."""
    return run.drafter.model, run.model


def _assert_shares_all_weights(draft, target):
    import torch

    names = [n for n, _ in draft.named_parameters(remove_duplicate=False)]
    assert any(n.startswith(f"model.layers.{EXIT_LAYER - 1}.") for n in names)
    for name, param in draft.named_parameters(remove_duplicate=False):
        assert param is target.get_parameter(name), name
        assert param.data_ptr() == target.get_parameter(name).data_ptr(), name
    assert unique_weight_bytes(draft, target) == 0
    # vLLM's CPU build keeps linear weights prepacked beside the parameters.
    for name, module in draft.named_modules():
        if hasattr(module, "cpu_linear"):
            assert module.cpu_linear is target.get_submodule(name).cpu_linear, name
    # The attention modules (and so the KV cache) stay the draft's own.
    for i in range(EXIT_LAYER):
        mine, theirs = draft.model.layers[i].self_attn.attn, target.model.layers[i].self_attn.attn
        assert mine is not theirs and mine.layer_name != theirs.layer_name
    assert len(draft.model.layers) == EXIT_LAYER
    assert draft.lm_head.weight.dtype == torch.float32


def _assert_tempered_head(draft, target, temperature):
    """Draft logits are the target's LM head on the same hidden state, divided by T."""
    import torch

    h = torch.randn(7, draft.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mine, theirs = draft.compute_logits(h), target.compute_logits(h)
    torch.testing.assert_close(mine, theirs / temperature, rtol=1e-5, atol=1e-5)
    assert torch.equal(mine.argmax(-1), theirs.argmax(-1))  # greedy drafts are unchanged


@pytest.mark.engine
def test_self_draft_is_lossless_drafts_like_the_layer_copy_and_owns_no_weights(tiny_pair, self_drafts):
    target, copied_draft = tiny_pair
    plain = run_engine(PROMPTS, greedy(), **engine(target))
    copy = run_engine(PROMPTS, greedy(), **engine(target, draft=copied_draft, num_speculative_tokens=6, cmasd=CMASD))
    ours = run_engine(PROMPTS, greedy(), **engine(target, draft=self_drafts[1.0], num_speculative_tokens=6, cmasd=CMASD))

    assert type(ours.drafter.model).__name__ == "CmasdSelfDraftLlamaForCausalLM"
    assert ours.token_ids == plain.token_ids
    assert ours.counters["num_accepted_tokens"] > 0
    # Same function as the copied layers: the same drafts, windows and acceptances.
    for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "accepted_per_position"):
        assert ours.counters[key] == copy.counters[key], key
    assert ours.drafter.stats.length_histogram == copy.drafter.stats.length_histogram

    draft, target_model = _models(ours)
    _assert_shares_all_weights(draft, target_model)
    _assert_tempered_head(draft, target_model, 1.0)


@pytest.mark.engine
def test_temperature_changes_confidence_not_the_greedy_draft(tiny_pair, self_drafts):
    target, _ = tiny_pair
    kwargs = dict(num_speculative_tokens=6, cmasd=CMASD)
    plain = run_engine(PROMPTS, greedy(), **engine(target))
    cool = run_engine(PROMPTS, greedy(), **engine(target, draft=self_drafts[1.0], **kwargs))
    hot = run_engine(PROMPTS, greedy(), **engine(target, draft=self_drafts[HOT], **kwargs))

    assert hot.token_ids == plain.token_ids
    draft, target_model = _models(hot)
    assert draft.temperature == HOT
    _assert_shares_all_weights(draft, target_model)
    _assert_tempered_head(draft, target_model, HOT)
    # Flatter draft distributions: lower confidence, so the windows close sooner.
    assert hot.counters["mean_draft_length"] < cool.counters["mean_draft_length"]


@pytest.mark.engine
def test_seeded_sampling_is_reproducible(tiny_pair, self_drafts):
    from vllm import SamplingParams

    target, _ = tiny_pair
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i, max_tokens=32) for i in range(len(PROMPTS))]
    kwargs = engine(target, draft=self_drafts[1.0], num_speculative_tokens=4, cmasd=CMASD)
    first = run_engine(PROMPTS, params, **kwargs)
    second = run_engine(PROMPTS, params, **kwargs)
    assert first.counters["num_accepted_tokens"] > 0
    assert first.token_ids == second.token_ids
    assert len({tuple(t) for t in first.token_ids}) > 1


@pytest.mark.engine
def test_self_draft_without_cmasd_refuses_to_draft(tiny_pair, self_drafts):
    from vllm import LLM

    from vllm_cmasd.engines import shutdown

    target, _ = tiny_pair
    # vLLM's own draft-model proposer never shares weights: drafting would run on
    # uninitialised memory, so the draft's first forward pass (vLLM's CPU profiling
    # run skips the drafter: the first request's) raises instead.
    llm = LLM(**engine(target, draft=self_drafts[1.0], num_speculative_tokens=4))
    try:
        with pytest.raises(RuntimeError, match="takes the target's when CM-ASD's proposer loads it"):
            llm.generate(PROMPTS[:1], greedy(8), use_tqdm=False)
    finally:
        shutdown(llm)


def test_build_self_draft_rejects_bad_layers_and_temperatures(tiny_pair, tmp_path):
    target, _ = tiny_pair
    for layer, temperature in ((0, 1.0), (4, 1.0), (2, 0.0)):
        with pytest.raises(ValueError):
            build_self_draft(target, tmp_path / "bad", layer, temperature)
    assert not (tmp_path / "bad").exists()


def test_early_exit_calibration_on_the_tiny_target(tiny_pair):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target, copied_draft = tiny_pair
    bsd = load_script("build_self_draft")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(target))
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32).eval()
    seqs = bsd.calibration_sequences(model, tok, tokens=600, seq_len=128, chat_prompts=2, answer_tokens=16)
    hidden, labels = bsd.collect_hidden_states(model, seqs)
    assert len(hidden) == 4 and hidden[0].shape == (labels.numel(), 128)

    # Early exit after layer 2 = the 2-layer copy of the target run to its end.
    copy = AutoModelForCausalLM.from_pretrained(str(copied_draft), dtype=torch.float32).eval()
    ids, first = seqs[-1]
    with torch.no_grad():
        exit_logits = model.lm_head(model.model.norm(hidden[EXIT_LAYER - 1]))
        copy_logits = copy(ids[None]).logits[0, first:-1]
    torch.testing.assert_close(exit_logits[-copy_logits.shape[0]:], copy_logits, rtol=1e-4, atol=1e-4)

    rows = bsd.calibrate_layers(model, hidden, labels)
    assert [r["layer"] for r in rows] == [1, 2, 3]
    row = rows[EXIT_LAYER - 1]
    t = row["temperature"]
    # The fitted T is the minimum of the NLL, and clearly better than T=1.
    assert row["nll_after"] < row["nll_before"] - 0.01, row
    assert row["nll_after"] == pytest.approx(bsd.nll_at(exit_logits, labels, t))
    assert row["nll_after"] <= bsd.nll_at(exit_logits, labels, t * 1.1)
    assert row["nll_after"] <= bsd.nll_at(exit_logits, labels, t / 1.1)
    assert 0 <= row["agreement"] <= 1 and row["ece_after"] < row["ece_before"], row
    speed, k = bsd.speed_model(row["agreement"], EXIT_LAYER, 4, 10, 10, 8)
    assert speed > 0 and 1 <= k <= 8
