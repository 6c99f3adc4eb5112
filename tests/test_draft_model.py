"""The reduced-vocabulary draft architecture (vllm_cmasd.draft_model) inside real vLLM.

A tiny random instance is built from the tiny target with the same code path as the
shipped draft (``draft.safetensors`` + ``draft.json`` -> ``assemble_draft``).
"""

from __future__ import annotations

import json

import pytest
from conftest import run_engine

from vllm_cmasd.engines import llm_kwargs

pytestmark = pytest.mark.engine

KEEP = 256
LAYERS = 2


@pytest.fixture(scope="module")
def reduced_draft(tiny_pair, tmp_path_factory):
    """(target_dir, draft_dir, kept ids) for a tiny reduced-vocab draft."""
    import torch
    from safetensors.torch import load_file, save_file

    target, _ = tiny_pair
    from vllm_cmasd.training.common import DRAFT_ARCH
    from vllm_cmasd.training.export import assemble_draft

    tsd = load_file(str(target / "model.safetensors"))
    vocab = tsd["model.embed_tokens.weight"].shape[0]
    g = torch.Generator().manual_seed(0)
    kept = torch.randperm(vocab, generator=g)[:KEEP].sort().values
    kept[0] = 2  # keep EOS reachable
    kept = kept.unique()
    small = {}
    for k, v in tsd.items():
        if k.startswith("model.layers."):
            if int(k.split(".")[2]) >= LAYERS:
                continue
            small[k] = v.to(torch.bfloat16)
        elif k == "model.norm.weight":
            small[k] = v.to(torch.bfloat16)
    small["lm_head.weight"] = tsd["lm_head.weight"][kept].to(torch.bfloat16).contiguous()
    small["kept_token_ids"] = kept.to(torch.int64)
    shipped = tmp_path_factory.mktemp("shipped")
    save_file(small, str(shipped / "draft.safetensors"))
    (shipped / "draft.json").write_text(json.dumps({"layers": LAYERS, "architecture": DRAFT_ARCH}))
    out = assemble_draft(target, shipped, tmp_path_factory.mktemp("models") / "draft-rv")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [DRAFT_ARCH]
    assert cfg["vocab_size"] == vocab and cfg["draft_vocab_size"] == len(kept)
    return target, out, kept


def test_vllm_loads_reduced_vocab_draft_and_masks_logits(reduced_draft):
    import torch
    from vllm import LLM, SamplingParams

    from vllm_cmasd.draft_model import register
    from vllm_cmasd.engines import model_runner, shutdown

    register()
    _, draft, kept = reduced_draft
    llm = LLM(**llm_kwargs(draft, max_model_len=256))
    try:
        outs = llm.generate(
            ["def", "Return a JSON string"],
            SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
            use_tqdm=False,
        )
        model = model_runner(llm).model
        assert type(model).__name__ == "CmasdReducedVocabLlamaForCausalLM"
        assert torch.equal(model.kept_token_ids.cpu(), kept)
        h = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits = model.compute_logits(h)
            # ParallelLMHead pads its rows to a multiple of 64; only the first k are real
            small = h @ model.lm_head.weight[: len(kept)].T
        assert logits.shape == (5, model.config.vocab_size)
        outside = torch.ones(model.config.vocab_size, dtype=torch.bool)
        outside[kept] = False
        assert torch.isneginf(logits[:, outside]).all()
        assert torch.isfinite(logits[:, kept]).all()
        torch.testing.assert_close(logits[:, kept], small, rtol=1e-4, atol=1e-4)
        assert torch.equal(model.get_top_tokens(h), logits.argmax(-1))
    finally:
        shutdown(llm)
    allowed = set(kept.tolist())
    for o in outs:
        toks = list(o.outputs[0].token_ids)
        assert len(toks) == 16 and set(toks) <= allowed


def test_reduced_vocab_draft_in_draft_model_speculation(reduced_draft):
    from vllm import SamplingParams

    from vllm_cmasd.draft_model import register

    register()
    target, draft, _ = reduced_draft
    prompts = ["def", "import os\nimport sys\n\n", "Return a JSON string"]
    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain = run_engine(prompts, sp, **llm_kwargs(target, max_model_len=256))
    spec = run_engine(
        prompts, sp, **llm_kwargs(target, draft=draft, num_speculative_tokens=4, max_model_len=256)
    )
    assert spec.counters["num_drafts"] > 0
    assert spec.token_ids == plain.token_ids  # greedy speculation is lossless
