"""Engine settings shared by the demo, the benchmark and the tests.

One place knows how to ask vLLM for plain decoding, vLLM's own speculation
and CM-ASD, so every comparison runs the engines under identical settings.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TARGET = REPO_ROOT / "models" / "smollm2-135m-instruct"
# Self-distilled, reduced output vocabulary: vllm_cmasd/training/ (vllm-cmasd train-draft), drafts/.
DEFAULT_DRAFT = REPO_ROOT / "models" / "smollm2-135m-draft-rv"
# The target's own first layers and LM head (SpecBound): scripts/build_self_draft.py.
DEFAULT_SELF_DRAFT = REPO_ROOT / "models" / "smollm2-135m-selfdraft"
# The trained EAGLE-3 head (drafts/smollm2-135m-eagle3, assembled by setup).
DEFAULT_EAGLE3 = REPO_ROOT / "models" / "smollm2-135m-eagle3"


# Full-length sequences the KV cache of a CPU engine holds (see cpu_kv_cache_bytes).
CPU_KV_CACHE_SEQUENCES = 8
# Without a config.json to read (a model id, not a directory): 1 GiB.
CPU_KV_CACHE_FALLBACK_BYTES = 2**30
_MIB = 2**20


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def kv_bytes_per_token(model: str | Path, dtype_bytes: int = 4) -> int | None:
    """Keys and values of one token over all of a model's attention layers, or
    None when ``model`` has no readable ``config.json``."""
    try:
        config = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads") or heads
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes


def cpu_kv_cache_bytes(*models: str | Path | None, max_model_len: int) -> int:
    """An explicit KV-cache size for a CPU engine of ``models`` (target, draft):
    CPU_KV_CACHE_SEQUENCES sequences of ``max_model_len`` tokens, fp32.

    Left to itself, vLLM's CPU worker takes ``gpu_memory_utilization`` x the
    NUMA node's memory minus the calling process's RSS: in a process that has
    already run engines (a test session, the benchmark) that is too little or
    negative, and what a node reports differs between machines. A fixed size
    depends on neither, and also spares the CPU worker its warm-up pass.
    """
    per_token = [kv_bytes_per_token(m) for m in models if m is not None]
    if not per_token or None in per_token:
        return CPU_KV_CACHE_FALLBACK_BYTES
    total = sum(per_token) * max_model_len * CPU_KV_CACHE_SEQUENCES
    return max(64, math.ceil(total / _MIB)) * _MIB


def llm_kwargs(
    target: str | Path,
    *,
    draft: str | Path | None = None,
    draft_method: str = "draft_model",
    num_speculative_tokens: int = 8,
    cmasd: dict[str, Any] | None = None,
    ngram: bool = False,
    max_model_len: int = 2048,
    gpu_memory_utilization: float = 0.25,
    **overrides: Any,
) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM``.

    ``draft`` alone: vLLM's speculation at fixed k with that draft, by
    ``draft_method`` (``draft_model``, or ``eagle3`` / ``eagle`` for an EAGLE-3 / EAGLE-1 head);
    ``draft`` and ``cmasd``: CM-ASD on it with k_max = ``num_speculative_tokens``; ``ngram``:
    vLLM's n-gram speculation; none of them: plain decoding.

    On CPU the KV cache gets an explicit size (:func:`cpu_kv_cache_bytes`)
    unless ``VLLM_CPU_KVCACHE_SPACE`` is set; ``kv_cache_memory_bytes`` in
    ``overrides`` wins over both.
    """
    kwargs: dict[str, Any] = dict(
        model=str(target),
        max_model_len=max_model_len,
        gpu_memory_utilization=gpu_memory_utilization,
        seed=0,
        # Keep vLLM's stats on: speculative-decoding counters come from them.
        disable_log_stats=False,
    )
    if on_cpu():
        # fp32 is the fast dtype on AVX2-only CPUs; graph compilation costs
        # ~2 minutes per engine there and was no faster.
        kwargs.update(dtype="float32", enforce_eager=True)
        if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kwargs["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(target, draft, max_model_len=max_model_len)
    if ngram:
        kwargs["speculative_config"] = {
            "method": "ngram",
            "num_speculative_tokens": num_speculative_tokens,
            "prompt_lookup_min": 2,
            "prompt_lookup_max": 5,
        }
    elif draft is not None:
        kwargs["speculative_config"] = {
            "method": draft_method,
            "model": str(draft),
            "num_speculative_tokens": num_speculative_tokens,
        }
        if cmasd is not None:
            kwargs["additional_config"] = {"cmasd": dict(cmasd)}
    elif cmasd is not None:
        raise ValueError("cmasd needs a draft model")
    kwargs.update(overrides)
    return kwargs


def preload_openmp_and_reexec() -> None:
    """Re-run this process with the venv's Intel OpenMP preloaded (CPU only).

    LD_PRELOAD only takes effect at process start; vLLM's workers inherit it.
    """
    lib = Path(sys.prefix) / "lib" / "libiomp5.so"
    preload = os.environ.get("LD_PRELOAD", "")
    if not lib.exists() or "libiomp5" in preload or os.environ.get("CMASD_NO_REEXEC"):
        return
    # An in-process CPU engine of the caller (a test) may have put torch's
    # libgomp there for its children; two OpenMP runtimes are refused by
    # vLLM's CPU worker ("assert not (use_iomp and use_gomp)").
    preload = ":".join(p for p in preload.split(":") if p and "libgomp" not in p)
    env = dict(os.environ, LD_PRELOAD=f"{lib}:{preload}" if preload else str(lib))
    env["CMASD_NO_REEXEC"] = "1"
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def model_runner(llm):
    """The model runner of an in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``):
    where CM-ASD's drafter (``.drafter``) and verifier (``.rejection_sampler``) live."""
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner


def shutdown(llm) -> None:
    """Stop an LLM's engine process now, so the next engine gets its memory."""
    import gc

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def spec_decode_counters(llm) -> dict[str, float]:
    """vLLM's own speculative-decoding counters, summed over the engine's life."""
    from vllm.v1.metrics.reader import Counter, Vector

    wanted = {
        "vllm:spec_decode_num_drafts": "num_drafts",
        "vllm:spec_decode_num_draft_tokens": "num_draft_tokens",
        "vllm:spec_decode_num_accepted_tokens": "num_accepted_tokens",
    }
    out: dict[str, Any] = {name: 0 for name in wanted.values()}
    out["accepted_per_position"] = []
    for metric in llm.get_metrics():
        if isinstance(metric, Counter) and metric.name in wanted:
            out[wanted[metric.name]] += metric.value
        elif isinstance(metric, Vector) and metric.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            out["accepted_per_position"] = list(metric.values)
    drafts = out["num_drafts"]
    out["mean_draft_length"] = out["num_draft_tokens"] / drafts if drafts else 0.0
    out["mean_acceptance_length"] = 1 + out["num_accepted_tokens"] / drafts if drafts else 1.0
    return out
