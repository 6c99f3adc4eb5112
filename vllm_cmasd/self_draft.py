"""SpecBound-style self-draft (placeholder until the self-draft work lands)."""

from __future__ import annotations

ARCH_NAME = "CmasdSelfDraftLlamaForCausalLM"


def register() -> None:
    """Register the self-draft architecture with vLLM (not yet)."""


def is_self_draft(model) -> bool:
    return type(model).__name__ == ARCH_NAME


def share_target_weights(draft_model, target_model) -> int:
    raise NotImplementedError
