"""Train a small draft model for a HF Llama-family target by self-distillation on CPU.

Usage (every stage is resumable / skipped when its output exists; on 2 cores using one
thread: ~23 min stdlib data + ~20 min chat data + 32 min benchmark-domain data, 74 min
training, evals)::

    export VLLM_CPU_OMP_THREADS_BIND=nobind OMP_NUM_THREADS=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
    vllm-cmasd train-draft all      # data -> train -> export -> assemble
    vllm-cmasd train-draft bench    # vLLM: target, draft, draft_model spec

``vllm-cmasd`` preloads the venv's Intel OpenMP (``.venv/lib/libiomp5.so``) itself, as
for its other commands. ``scripts/train_draft.py STAGE ...`` is the same entry point
without that: there, also ``export LD_PRELOAD=$PWD/.venv/lib/libiomp5.so``.

Defaults: target ``models/smollm2-135m-instruct``, work dir ``models/.cache/draft-train``,
shipped result ``drafts/smollm2-135m-draft-rv``, assembled checkpoint
``models/smollm2-135m-draft-rv``.

Stages (:data:`STAGES`; one module each, whose docstring has the details; ``all`` runs
the first four in this order, ``bench`` and ``overlap`` run only when named):

``data``      (:mod:`.data`, prompts from :mod:`.sources`) the target answers
              stdlib/licence, chat-domain and benchmark-domain prompts with vLLM; its
              top-16 log-probs are cached as the teacher -> ``data.pt``.
``train``     (:mod:`.train`) distil the first layers of the target plus a
              reduced-vocabulary head on the cached teacher -> ``ckpt.pt``, ``best.pt``.
``export``    (:mod:`.export`) what differs from the target -> ``--out``.
``assemble``  (:mod:`.export`) :func:`~.export.assemble_draft` -> ``--assemble-to``.
``bench``     (:mod:`.bench`) vLLM: target, draft and ``draft_model`` speculative
              decoding at batch 1 -> ``bench.json``.
``overlap``   (:mod:`.overlap`) how much of each benchmark prompt the training prompts
              hold -> ``overlap.json``.
``eagle-train``, ``eagle-export``, ``eagle-assemble`` (:mod:`.eagle3`) an EAGLE-3 head
              for vLLM's ``eagle3`` method on the same ``data.pt`` -> ``eagle_best.pt``,
              ``drafts/smollm2-135m-eagle3``, ``models/smollm2-135m-eagle3``; ``eagle-eval``
              scores a head on a work dir's held-out docs records.
``prompts``, ``answer`` (:mod:`.answer`) the ``data`` stage split for a machine with
              an accelerator and no vLLM: benchmark-domain prompts here ->
              ``prompts.json``; answered there with transformers -> ``data.pt``.

The shipped draft (v5) continues v4 with summaries of the guides and notes packages ship
beside their READMEs, and drops every reused record on benchmark or held-out text (both
cores, no other jobs; ``drafts/smollm2-135m-draft-rv/TRAINING.md`` has the record; the
second ``data`` call only re-checks and generates nothing)::

    vllm-cmasd train-draft data --work models/.cache/draft-train-v5 \\
        --reuse-data models/.cache/draft-train-v4b --chat 0 --docs-gen-minutes 24 \\
        --docs-mix summarization=1,translation=0,instruction=0 \\
        --max-prompt-tokens 640 --gen-batch 128 --gen-chunk 256
    vllm-cmasd train-draft data --work models/.cache/draft-train-v5b \\
        --reuse-data models/.cache/draft-train-v5 --chat 0 --docs-gen-minutes 0 \\
        --max-prompt-tokens 640 --gen-batch 128 --gen-chunk 256
    TA="--threads 2 --lr 3e-4 --warmup 20 --batch-tokens 3072 --max-len 768 --max-minutes 50"
    vllm-cmasd train-draft train --work models/.cache/draft-train-v5b \\
        --init-from drafts/smollm2-135m-draft-rv $TA --eval-every 100 --eval-subset 48
    vllm-cmasd train-draft export --work models/.cache/draft-train-v5b \\
        --init-from drafts/smollm2-135m-draft-rv $TA --export-from best.pt

v4 continued v3 with more benchmark-domain data, summaries first::

    vllm-cmasd train-draft data --work models/.cache/draft-train-v4 \\
        --reuse-data models/.cache/draft-train-v3 --chat 0 --docs-gen-minutes 28 \\
        --docs-mix summarization=4,translation=1,instruction=2 \\
        --max-prompt-tokens 640 --gen-batch 128 --gen-chunk 256
    vllm-cmasd train-draft data --work models/.cache/draft-train-v4b \\
        --reuse-data models/.cache/draft-train-v4 --chat 0 --docs-gen-minutes 11 \\
        --docs-mix summarization=1,translation=0,instruction=0 \\
        --max-prompt-tokens 640 --gen-batch 128 --gen-chunk 256
    (train / export as for v5, in models/.cache/draft-train-v4b)

v3 continued v2 on benchmark-domain data::

    vllm-cmasd train-draft data --work models/.cache/draft-train-v3 \\
        --gen-minutes 0 --chat 1 --magpie-n 0 --chat-gen-minutes 3 --docs-gen-minutes 30 \\
        --max-prompt-tokens 640 --gen-batch 128 --gen-chunk 256 --n-eval 32
    TA="--threads 2 --lr 4e-4 --warmup 20 --batch-tokens 3072 --max-len 768 --max-minutes 60"
    vllm-cmasd train-draft train --work models/.cache/draft-train-v3 \\
        --init-from drafts/smollm2-135m-draft-rv $TA --eval-every 100 --eval-subset 48
    vllm-cmasd train-draft export --work models/.cache/draft-train-v3 \\
        --init-from drafts/smollm2-135m-draft-rv $TA --export-from best.pt

v2 was made in two runs: the stdlib/licence-only run above (defaults with ``--chat 0``,
work dir ``models/.cache/draft-train``), then::

    vllm-cmasd train-draft data --work models/.cache/draft-train-v2 \\
        --reuse-data models/.cache/draft-train
    vllm-cmasd train-draft train --work models/.cache/draft-train-v2 \\
        --init-from models/.cache/draft-train/best.pt --lr 3e-4 --warmup 10 --max-minutes 49
    vllm-cmasd train-draft export --work models/.cache/draft-train-v2 \\
        --init-from models/.cache/draft-train/best.pt --lr 3e-4 --warmup 10 --max-minutes 49

(see ``drafts/smollm2-135m-draft-rv/TRAINING.md`` for the exact record).

Importing this package is cheap: torch, transformers and vLLM are imported inside the
stages that use them.
"""

from __future__ import annotations

import importlib

# Stage name -> (module of this package, the function of the parsed arguments that runs it).
STAGES: dict[str, tuple[str, str]] = {
    "data": ("data", "stage_data"),
    "train": ("train", "stage_train"),
    "export": ("export", "stage_export"),
    "assemble": ("export", "stage_assemble"),
    "bench": ("bench", "stage_bench"),
    "overlap": ("overlap", "stage_overlap"),
    "eagle-train": ("eagle3", "stage_eagle_train"),
    "eagle-export": ("eagle3", "stage_eagle_export"),
    "eagle-assemble": ("eagle3", "stage_eagle_assemble"),
    "eagle-eval": ("eagle3", "stage_eagle_eval"),
    "prompts": ("answer", "stage_prompts"),
    "answer": ("answer", "stage_answer"),
}
ALL_STAGES = ("data", "train", "export", "assemble")  # what stage ``all`` runs, in order


def stage_module(name: str):
    """The module of stage ``name``."""
    return importlib.import_module(f"{__name__}.{STAGES[name][0]}")


def stage_function(name: str):
    """The function that runs stage ``name``: ``stage_function(name)(args)``."""
    return getattr(stage_module(name), STAGES[name][1])
