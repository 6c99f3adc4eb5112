"""Reduced-vocabulary Llama draft for vLLM's ``draft_model`` speculative method.

The trained CM-ASD draft (:mod:`vllm_cmasd.training`) is a few Llama decoder layers with
the target's full input embedding but a *small* LM head over the ``draft_vocab_size``
most frequent target tokens (FR-Spec / EAGLE-3 style). At this model size the target's
49152x576 head costs more than several decoder layers, so the small head is what makes
the draft cheap.

vLLM's ``draft_model`` method requires the draft's vocab size to equal the target's, so
the architecture keeps ``config.vocab_size`` (= the target's) for its input embedding and
``compute_logits`` returns full-vocabulary logits that are ``-inf`` outside the kept
tokens: a ``[N, k]`` matmul followed by an ``index_copy_`` into a ``-inf`` tensor (no big
matmul). Argmax / softmax over that tensor equal those over the kept tokens.

Checkpoint layout (what :func:`vllm_cmasd.training.export.assemble_draft` writes)::

    config.json        LlamaConfig + architectures=["CmasdReducedVocabLlamaForCausalLM"],
                       draft_vocab_size=k, tie_word_embeddings=false
    model.safetensors  model.embed_tokens.weight [V, H], model.layers.*, model.norm.weight,
                       lm_head.weight [k, H], kept_token_ids [k] (int64, target ids)

Call :func:`register` (idempotent) in every process before vLLM resolves the
architecture; the plugin's ``register()`` entry point is the place for it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from vllm_cmasd import architectures

ARCH_NAME = "CmasdReducedVocabLlamaForCausalLM"


def register() -> None:
    """Register the architecture with vLLM's ModelRegistry (lazy import path)."""
    architectures.register(ARCH_NAME, __name__)


def _make_class():
    from torch import nn
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    from vllm.model_executor.models.llama import LlamaForCausalLM
    from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix

    class CmasdReducedVocabLlamaForCausalLM(LlamaForCausalLM):
        """LlamaForCausalLM with a k-token LM head scattered into full-vocab logits."""

        def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
            nn.Module.__init__(self)
            config = vllm_config.model_config.hf_config
            self.config = config
            k = int(getattr(config, "draft_vocab_size", 0) or 0)
            if not 0 < k <= config.vocab_size:
                raise ValueError(
                    f"{ARCH_NAME} needs config.draft_vocab_size in (0, vocab_size], got {k}"
                )
            self.draft_vocab_size = k
            self.model = self._init_model(
                vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model")
            )
            self.lm_head = ParallelLMHead(
                k, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head")
            )
            self.logits_processor = LogitsProcessor(k)
            # target token id of each head row (a buffer: loaded, not trained)
            self.register_buffer(
                "kept_token_ids", torch.arange(k, dtype=torch.long), persistent=False
            )
            self.make_empty_intermediate_tensors = (
                self.model.make_empty_intermediate_tensors
            )

        def compute_small_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return self.logits_processor(self.lm_head, hidden_states)

        def expand_small_logits(self, small: torch.Tensor) -> torch.Tensor:
            """Full-vocabulary logits: the kept tokens' logits, -inf elsewhere."""
            out = small.new_full((small.shape[0], self.config.vocab_size), float("-inf"))
            out.index_copy_(1, self.kept_token_ids, small)
            return out

        def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
            small = self.compute_small_logits(hidden_states)
            return None if small is None else self.expand_small_logits(small)

        def compute_logits_local(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return self.compute_logits(hidden_states)

        def get_top_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
            small = self.compute_small_logits(hidden_states)
            return self.kept_token_ids[small.argmax(dim=-1)]

        def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
            loaded: set[str] = set()

            def rest():
                for name, w in weights:
                    if name == "kept_token_ids":
                        kept = w.to(torch.long).reshape(-1)
                        if kept.numel() != self.draft_vocab_size:
                            raise ValueError(
                                f"kept_token_ids has {kept.numel()} entries, "
                                f"config.draft_vocab_size is {self.draft_vocab_size}"
                            )
                        self.kept_token_ids.copy_(kept.to(self.kept_token_ids.device))
                        loaded.add(name)
                        continue
                    yield name, w

            loader = AutoWeightsLoader(self)
            loaded |= loader.load_weights(rest())
            return loaded

    return CmasdReducedVocabLlamaForCausalLM


# Built lazily so importing this module (the plugin's register()) does not import
# vLLM's model code.
__getattr__ = architectures.lazy_class(globals(), ARCH_NAME, _make_class)
