"""CM-ASD on vLLM's EAGLE-3 proposer (``method: eagle3``), on the tiny target
with a random-weight head that vLLM's own ``eagle3`` method loads unmodified;
and on an EAGLE-1 head (``method: eagle``), which the same proposer drives.

Skipping the head's pass and catching it up (from the target's hidden states
kept for the missed tokens) is tested with the draft model's in test_catchup.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import run_engine
from test_engine import CMASD, PROMPTS, engine, greedy

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


def test_a_step_without_a_drafter_pass_skips_vllms_input_preparation(tiny_pair, tiny_eagle3):
    """The controller decides before vLLM prepares the head's inputs: vLLM's
    next-token preparation runs only on steps whose drafter pass runs, and the
    output is still plain decoding's."""
    from vllm import LLM
    from vllm.v1.spec_decode.eagle import EagleProposer

    from vllm_cmasd.engines import model_runner, shutdown

    target, _ = tiny_pair
    plain = run_engine(PROMPTS, greedy(32), **engine(target, **SETTINGS))
    llm = LLM(**eagle3(target, tiny_eagle3, cmasd={"verification": "exact"}, **SETTINGS))
    try:
        drafter = model_runner(llm).drafter
        calls = {"prepare": 0, "pass": 0}

        def counted(name, method):
            def call(*args, **kwargs):
                calls[name] += 1
                return method(*args, **kwargs)
            return call

        drafter.prepare_next_token_ids_padded = counted("prepare", drafter.prepare_next_token_ids_padded)
        # vLLM's drafting loop, which CM-ASD's proposer runs only where the drafter runs.
        loop = EagleProposer.propose
        EagleProposer.propose = counted("pass", loop)
        try:
            outputs = llm.generate(PROMPTS, greedy(32), use_tqdm=False)
        finally:
            EagleProposer.propose = loop
        skipped = drafter.stats.num_skipped_passes
    finally:
        shutdown(llm)
    assert [list(o.outputs[0].token_ids) for o in outputs] == plain.token_ids
    assert skipped > 0 and calls["pass"] > 0, (skipped, calls)
    assert calls["prepare"] == calls["pass"], calls


def test_the_head_s_signals_reduce_its_own_vocabulary(tiny_pair, tiny_eagle3):
    """The head's confidence reduces its ``draft_vocab_size`` logits, not vLLM's
    full-vocabulary expansion of them (-inf off the ``d2t`` ids): the same
    signals, and the same full logits to draft from as vLLM's ``compute_logits``,
    over a sixth of the columns on the real head (0.55 ms a pass at batch 1)."""
    from vllm import LLM

    from vllm_cmasd.confidence import unified_confidence
    from vllm_cmasd.engines import model_runner, shutdown

    target, _ = tiny_pair
    llm = LLM(**eagle3(target, tiny_eagle3, cmasd={"verification": "exact"}))
    try:
        drafter = model_runner(llm).drafter
        hidden = torch.randn(3, drafter.hidden_size, generator=torch.Generator().manual_seed(0)).to(drafter.dtype)
        small, full = drafter._reduced_logits(hidden)
        assert small.shape[-1] == drafter.model.config.draft_vocab_size < full.shape[-1]
        assert torch.equal(full, drafter.model.compute_logits(hidden))
        vocab = full.shape[-1]
        ours, theirs = unified_confidence(small, drafter.config, vocab), unified_confidence(full, drafter.config, vocab)
        assert torch.allclose(ours, theirs, atol=1e-6), (ours, theirs)
    finally:
        shutdown(llm)


def test_exact_on_an_eagle1_head_is_identical_to_plain_decoding(tiny_pair, tiny_eagle):
    """``method: eagle`` (fc over [embedding ; the target's last hidden state],
    the target's LM head) runs vLLM's own loop, and CM-ASD's window and
    controller, on the same head."""
    from vllm.v1.spec_decode.eagle import EagleProposer

    target, _ = tiny_pair
    settings = dict(draft=tiny_eagle, draft_method="eagle", num_speculative_tokens=4, **SETTINGS)
    plain = run_engine(PROMPTS, greedy(32), **engine(target, **SETTINGS))
    theirs = run_engine(PROMPTS, greedy(32), **engine(target, **settings))
    assert type(theirs.drafter) is EagleProposer and theirs.counters["num_draft_tokens"] > 0
    assert theirs.token_ids == plain.token_ids
    for cmasd in (CMASD, {"verification": "exact"}):
        ours = run_engine(PROMPTS, greedy(32), **engine(target, cmasd=cmasd, **settings))
        assert type(ours.drafter).__name__ == "CmasdEagleProposer"
        assert type(ours.sampler).__name__ == "CmasdRejectionSampler"
        assert ours.token_ids == plain.token_ids
        assert ours.drafter.stats.num_draft_tokens > 0 or cmasd is not CMASD


def test_exact_on_eagle3_under_preemption(tiny_pair, tiny_eagle3):
    """8 blocks of 128 tokens cannot hold 12 requests of ~140 prompt tokens once they grow past 256."""
    target, _ = tiny_pair
    settings = dict(num_gpu_blocks_override=8, enable_prefix_caching=True)
    prompts = [PROMPTS[4] + p for p in PROMPTS + PROMPTS[:4]]
    plain = run_engine(prompts, greedy(160), **engine(target, **settings))
    ours = run_engine(prompts, greedy(160), **eagle3(target, tiny_eagle3, cmasd=CMASD, **settings))
    assert ours.num_preemptions > 0
    assert ours.token_ids == plain.token_ids


def test_the_training_head_computes_what_vllms_eagle3_head_computes(tiny_pair, tmp_path, monkeypatch):
    """``eagle-train``'s torch head, exported by ``eagle-export``'s writer, gives
    vLLM's own ``eagle3`` drafting loop the same logits at every drafting step: the
    aux layer ids, the token the head reads at each position, RoPE positions, the
    layer's norms and residuals, the keys a later step attends to (the training-time
    test's mask) and the ``d2t`` offsets all agree between training and serving."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig
    from vllm.model_executor.models.llama_eagle3 import Eagle3LlamaForCausalLM
    from vllm.v1.spec_decode.eagle import EagleProposer

    from vllm_cmasd.training import eagle3 as e3

    target, _ = tiny_pair
    g = torch.Generator().manual_seed(0)
    kept = torch.cat([torch.arange(3), torch.randperm(1021, generator=g)[:253] + 3]).sort().values
    head = e3.build_head(LlamaConfig.from_pretrained(target), len(kept))
    teacher = e3.Teacher(target, kept)
    e3._init_head(head, teacher, seed=0)
    with torch.no_grad():  # the residual branches at full scale, so attention and MLP shape the logits
        head.midlayer.self_attn.o_proj.weight.mul_(10)
        head.midlayer.mlp.down_proj.weight.mul_(10)
        for i, norm in enumerate(head.fc_norm):  # each aux state's norm its own weights
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) + 0.5 * i)
    e3.write_head(head.state_dict(), kept, target, tmp_path / "head")
    head_dir = e3.assemble_eagle3_head(target, tmp_path / "head", tmp_path / "assembled")
    shipped = load_file(str(head_dir / "model.safetensors"))
    assert head.load_state_dict({k: v.float() for k, v in shipped.items() if k not in ("d2t", "t2d")},
                                strict=False).missing_keys == []

    # vLLM's logits at each drafting step of its first propose call (after the prefill).
    steps, calls, anchor = [], [], []
    real_propose, real_logits = EagleProposer.propose, Eagle3LlamaForCausalLM.compute_logits

    def propose(self, num_speculative_tokens, **kwargs):
        calls.append(True)
        anchor.append(int(kwargs["common_attn_metadata"].seq_lens[0]) - 1)  # the sampled token's position - 1
        return real_propose(self, num_speculative_tokens=num_speculative_tokens, **kwargs)

    def compute_logits(self, hidden_states):
        out = real_logits(self, hidden_states)
        if len(calls) == 1:
            steps.append(out[0].clone())
        return out

    monkeypatch.setattr(EagleProposer, "propose", propose)
    monkeypatch.setattr(Eagle3LlamaForCausalLM, "compute_logits", compute_logits)
    run = run_engine([PROMPTS[1]], greedy(3), **eagle3(target, head_dir))
    assert len(steps) == 4
    output = run.outputs[0]
    t = anchor[0]
    ids = torch.tensor([list(output.prompt_token_ids) + list(output.outputs[0].token_ids)])[:, : t + 2]
    features, _, emb = teacher(ids)
    # Step 0 reads the sampled token (the record's next token); step j >= 1 reads the
    # token vLLM drafted at step j - 1, and only the anchor's row of a later step matters.
    table = teacher.embed.weight
    emb_next = [e3._shift(emb, 1)]
    for logits in steps[:-1]:
        e = torch.zeros_like(emb)
        e[0, t] = table[int(logits.argmax())]
        emb_next.append(e)
    with torch.no_grad():
        ours = [logits[0, t] for logits in head.unroll(emb_next, features, steps=4)]
    for j, (theirs, mine) in enumerate(zip(steps, ours)):
        assert torch.isfinite(theirs).sum() == len(kept) and torch.isfinite(theirs[kept]).all()
        assert torch.allclose(theirs[kept], mine, atol=2e-3, rtol=1e-3), (j, (theirs[kept] - mine).abs().max())
