"""The tiny test model pair: built offline, cached, deterministic, loaded and run by vLLM,
and a draft that agrees with its target often but not always."""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import time
from pathlib import Path

import pytest

from vllm_cmasd.testing import (
    CHAT_TEMPLATE,
    EOS_TOKEN,
    TINY_VERSION,
    make_tiny_pair,
    teacher_forced_agreement,
)

PROMPTS = [
    "def",
    "import os\nimport sys\n\n",
    "class Encoder(object):\n    def __init__(self, skipkeys=False):\n        self.skipkeys = skipkeys\n",
    "Return a JSON string",
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    t0 = time.time()
    target, draft = make_tiny_pair(root, seed=0)
    print(f"\nmake_tiny_pair built {target.parent.name} in {time.time() - t0:.1f}s")
    return target, draft


def _digest(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


def test_tiny_pair_is_cached_and_deterministic(pair, tmp_path):
    target, draft = pair
    t0 = time.time()
    assert make_tiny_pair(target.parent.parent, seed=0) == (target, draft)
    assert time.time() - t0 < 2.0, "second call must reuse the cached directory"
    assert f"tiny-v{TINY_VERSION}-s0-" in target.parent.name

    # Built again from scratch elsewhere: byte-identical files.
    target2, draft2 = make_tiny_pair(tmp_path, seed=0)
    assert _digest(target) == _digest(target2)
    assert _digest(draft) == _digest(draft2)
    # Another seed: same tokenizer, other weights.
    target3, _ = make_tiny_pair(tmp_path, seed=1)
    assert (target3 / "tokenizer.json").read_bytes() == (target / "tokenizer.json").read_bytes()
    assert (target3 / "model.safetensors").read_bytes() != (target / "model.safetensors").read_bytes()
    assert not list(tmp_path.glob(".*tmp*")), "no temporary directories left behind"


def test_tiny_pair_layout(pair):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    target, draft = pair
    tc, dc = AutoConfig.from_pretrained(target), AutoConfig.from_pretrained(draft)
    for c in (tc, dc):
        assert c.architectures == ["LlamaForCausalLM"]
        assert c.num_attention_heads % 2 == 0 and c.num_key_value_heads % 2 == 0  # TP=2
        assert c.max_position_embeddings == 1024
        assert c.head_dim == c.hidden_size // c.num_attention_heads >= 32  # vLLM CPU attention
    assert tc.num_attention_heads == 4 and tc.num_key_value_heads == 2
    assert dc.num_hidden_layers < tc.num_hidden_layers
    assert dc.vocab_size == tc.vocab_size

    # The draft's tensors are the target's (first layers, embeddings, norm, head).
    with safe_open(str(target / "model.safetensors"), "pt") as ft, \
            safe_open(str(draft / "model.safetensors"), "pt") as fd:
        assert ft.get_tensor("lm_head.weight").dtype.is_floating_point
        for key in fd.keys():
            assert (fd.get_tensor(key) == ft.get_tensor(key)).all(), key
        assert "model.layers.0.self_attn.q_proj.weight" in fd.keys()
        assert f"model.layers.{dc.num_hidden_layers}.self_attn.q_proj.weight" not in fd.keys()

    tok = AutoTokenizer.from_pretrained(target)
    assert len(tok) == tc.vocab_size
    assert 900 <= len(tok) <= 1100
    assert tok.eos_token == EOS_TOKEN and tok.eos_token_id == tc.eos_token_id
    assert tok.bos_token_id == tc.bos_token_id
    assert tok.chat_template == CHAT_TEMPLATE
    text = "def __init__(self, skipkeys=False):\n    return 'héllo → wörld'"
    assert tok.decode(tok(text).input_ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_draft_agrees_often_but_not_always(pair):
    """Teacher-forced on stdlib text: draft greedy == target greedy on 40-90% of positions,
    and both models are confident on some positions and unsure on others."""
    target, draft = pair
    texts = [Path(importlib.util.find_spec(m).origin).read_text()[:2000]
             for m in ("inspect", "tokenize", "locale")]
    r = teacher_forced_agreement(target, draft, texts)
    print("\ntiny pair, teacher-forced:", {k: round(v, 3) for k, v in r.items()})
    assert r["positions"] > 500
    assert 0.4 <= r["agreement"] <= 0.9
    # Confidence varies: peaky and flat next-token distributions both occur...
    assert r["target_top1_frac_gt_0.9"] > 0.01 and r["target_top1_frac_lt_0.3"] > 0.05
    assert r["draft_top1_frac_gt_0.5"] > 0.2 and r["draft_top1_frac_lt_0.3"] > 0.05
    # ...and the draft's confidence predicts agreement (what CM-ASD relies on).
    assert r["agreement_where_draft_top1_gt_0.5"] > r["agreement_where_draft_top1_lt_0.3"] + 0.2


def _hf_greedy(model_dir: Path, prompt_ids: list[int], n: int):
    """Greedy continuation with transformers plus the top-2 logit gap at each step."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = list(prompt_ids)
    out, gaps = [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            top = torch.topk(logits, 2)
            out.append(int(top.indices[0]))
            gaps.append(float(top.values[0] - top.values[1]))
            ids.append(out[-1])
    return out, gaps


@pytest.mark.parametrize("which", ["target", "draft"])
def test_vllm_runs_tiny_model_deterministically(pair, which):
    """A real vLLM engine loads the model, generates greedily (completions and chat),
    repeats itself exactly, and matches transformers' greedy decoding."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from vllm_cmasd.engines import llm_kwargs

    model_dir = pair[0] if which == "target" else pair[1]
    tok = AutoTokenizer.from_pretrained(model_dir)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    t0 = time.time()
    llm = LLM(**llm_kwargs(model_dir, gpu_memory_utilization=0.2, max_model_len=512,
                           dtype="float32", enforce_eager=True))
    try:
        t1 = time.time()
        first = llm.generate(PROMPTS, params, use_tqdm=False)
        second = llm.generate(PROMPTS, params, use_tqdm=False)
        chat = llm.chat([{"role": "user", "content": "Return a JSON string"}],
                        SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
        t2 = time.time()
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    print(f"\n{which}: engine start {t1 - t0:.1f}s, 3 generate calls {t2 - t1:.1f}s")

    a = [list(o.outputs[0].token_ids) for o in first]
    b = [list(o.outputs[0].token_ids) for o in second]
    assert a == b, "greedy decoding must be deterministic"
    assert all(len(x) == MAX_TOKENS for x in a)
    assert len({tuple(x) for x in a}) > 1, "different prompts should give different outputs"
    for prompt, o in zip(PROMPTS, first):
        assert list(o.prompt_token_ids) == tok(prompt).input_ids
        print(f"  {prompt[:24]!r:28} -> {o.outputs[0].text!r}")
    assert chat[0].prompt_token_ids[0] == tok.bos_token_id  # "<|im_start|>user\n..."
    assert len(chat[0].outputs[0].token_ids) >= 1

    # Same tokens as transformers, except after an exact near-tie (fp32 rounding).
    for o in first:
        ref, gaps = _hf_greedy(model_dir, list(o.prompt_token_ids), MAX_TOKENS)
        got = list(o.outputs[0].token_ids)
        if got != ref:
            i = next(i for i, (x, y) in enumerate(zip(got, ref)) if x != y)
            assert gaps[i] < 1e-3, f"vLLM and transformers diverge at step {i} (gap {gaps[i]:.4f})"

