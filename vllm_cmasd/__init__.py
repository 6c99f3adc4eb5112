"""vllm-cmasd: Confidence-Modulated Adaptive Speculative Decoding for vLLM 0.32.

``register`` is the ``vllm.general_plugins`` entry point. vLLM calls it in
every process it starts; it installs the hooks in :mod:`vllm_cmasd.vllm_patch`,
which do nothing unless a request's engine was configured with
``--additional-config '{"cmasd": {...}}'``.
"""

__version__ = "0.1.0"


def register() -> None:
    from vllm_cmasd import draft_model, self_draft, vllm_patch

    vllm_patch.install()
    # The draft architectures (new names only): the trained reduced-vocabulary
    # draft, and the self-draft that shares the target's weights (SpecBound).
    draft_model.register()
    self_draft.register()
