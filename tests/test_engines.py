"""Engine settings (vllm_cmasd.engines): every CPU engine gets an explicit KV-cache size.

vLLM's CPU worker, left to size the KV cache itself, gives an engine
``gpu_memory_utilization`` x the NUMA node's memory minus the calling
process's RSS: in a long test process that is negative, and nodes report
different memory on different machines (CI was red on the AMD EPYC machine).
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
from conftest import run_engine
from test_engine import CMASD, PROMPTS, engine, greedy

from vllm_cmasd.engines import CPU_KV_CACHE_SEQUENCES, cpu_kv_cache_bytes, kv_bytes_per_token, llm_kwargs, on_cpu

cpu_only = pytest.mark.skipif(not on_cpu(), reason="vLLM's CPU worker is the one that sizes the KV cache from RSS")


@cpu_only
def test_cpu_engines_get_a_kv_cache_size_that_holds_full_sequences(tiny_pair):
    target, draft = tiny_pair
    kwargs = llm_kwargs(target, draft=draft, max_model_len=512)
    per_token = kv_bytes_per_token(target) + kv_bytes_per_token(draft)
    assert kwargs["kv_cache_memory_bytes"] == cpu_kv_cache_bytes(target, draft, max_model_len=512)
    assert kwargs["kv_cache_memory_bytes"] >= per_token * 512 * CPU_KV_CACHE_SEQUENCES
    # The draft's layers live in the same pool: a bigger pool with a draft.
    assert kwargs["kv_cache_memory_bytes"] >= llm_kwargs(target, max_model_len=512)["kv_cache_memory_bytes"]


def test_kv_bytes_per_token_reads_the_models_attention_shape(tiny_pair):
    import json

    target, _ = tiny_pair
    config = json.loads((target / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    expected = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 4
    assert kv_bytes_per_token(target) == expected
    assert kv_bytes_per_token("org/a-model-id-not-a-directory") is None
    assert cpu_kv_cache_bytes("org/a-model-id-not-a-directory", max_model_len=512) == 2**30


@cpu_only
def test_an_explicit_size_from_the_user_wins(tiny_pair):
    target, draft = tiny_pair
    assert llm_kwargs(target, draft=draft, kv_cache_memory_bytes=96 * 2**20)["kv_cache_memory_bytes"] == 96 * 2**20
    # vLLM's CPU platform turns VLLM_CPU_KVCACHE_SPACE into the size; ours stays out of its way.
    with mock.patch.dict("os.environ", {"VLLM_CPU_KVCACHE_SPACE": "1"}):
        assert "kv_cache_memory_bytes" not in llm_kwargs(target, draft=draft)


@cpu_only
@pytest.mark.engine
def test_engine_starts_after_the_test_process_has_grown(tiny_pair):
    """The process's RSS passes its share of the node's memory (vLLM's own
    sizing would ask for a negative pool); the engine still starts and drafts."""
    import psutil
    import torch
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

    target, draft = tiny_pair
    fraction = 0.05
    node = get_memory_node_info(get_allowed_cpu_list()[0].numa_node)
    share = math.ceil(node.total_memory * fraction)
    grow = max(0, share - psutil.Process().memory_info().rss) + 256 * 2**20
    ballast = torch.ones(grow // 4, dtype=torch.float32)  # written pages: they count in RSS
    try:
        assert psutil.Process().memory_info().rss > share
        run = run_engine(
            PROMPTS[:3], greedy(16),
            **engine(target, draft=draft, num_speculative_tokens=4, cmasd=CMASD, gpu_memory_utilization=fraction),
        )
    finally:
        del ballast
    assert all(len(tokens) == 16 for tokens in run.token_ids)
    assert run.drafter.stats.num_drafts > 0
