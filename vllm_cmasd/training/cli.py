"""``vllm-cmasd train-draft STAGE [options]`` (and ``scripts/train_draft.py``): the
options of every stage, and the stages run in order."""

from __future__ import annotations

import argparse

from vllm_cmasd import training
from vllm_cmasd.training import ALL_STAGES, STAGES, stage_function, stage_module
from vllm_cmasd.training.common import DEFAULT_DRAFT_NAME, DEFAULT_EAGLE3_NAME, REPO_ROOT


def stage_details() -> str:
    """Every stage module's docstring once, in stage order: the help's epilog."""
    modules = dict.fromkeys(stage_module(name) for name in STAGES)
    return "\n".join(module.__doc__ for module in modules)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=training.__doc__, epilog=stage_details(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=[*STAGES, "all"])
    ap.add_argument("--target", default=str(REPO_ROOT / "models/smollm2-135m-instruct"))
    ap.add_argument("--work", default=str(REPO_ROOT / "models/.cache/draft-train"))
    ap.add_argument("--out", default=str(REPO_ROOT / "drafts" / DEFAULT_DRAFT_NAME))
    ap.add_argument("--assemble-to", default=str(REPO_ROOT / "models" / DEFAULT_DRAFT_NAME))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu",
                    help="answer / eagle-train: the torch device (cuda: an accelerator, where vLLM need not be installed)")
    # data
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--max-prompt-tokens", type=int, default=384)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--gen-batch", type=int, default=64)
    ap.add_argument("--gen-chunk", type=int, default=128)
    ap.add_argument("--gpu-mem", type=float, default=0.25)
    ap.add_argument("--gen-minutes", type=float, default=22.0,
                    help="minutes answering stdlib/licence train prompts (0: none; the held-out set is still answered)")
    ap.add_argument("--reuse-data", default="",
                    help="start from every record of this earlier work dir (train and held-out); "
                         "prompts it answered are not asked again")
    ap.add_argument("--chat", type=int, default=1, help="add the chat-domain source (0: off)")
    ap.add_argument("--magpie-n", type=int, default=1536, help="Magpie user turns to sample")
    ap.add_argument("--magpie-minutes", type=float, default=7.0)
    ap.add_argument("--magpie-temperature", type=float, default=1.0)
    ap.add_argument("--chat-max-new-tokens", type=int, default=96)
    ap.add_argument("--chat-gen-minutes", type=float, default=16.0,
                    help="time budget for answering the chat prompts (train split)")
    ap.add_argument("--n-eval-chat", type=int, default=64)
    ap.add_argument("--docs-gen-minutes", type=float, default=32.0,
                    help="minutes answering benchmark-domain prompts (docs_prompts; 0: off)")
    ap.add_argument("--docs-max-new-tokens", type=int, default=96)
    ap.add_argument("--answer-temperatures", default="0",
                    help="answer: the training prompts are answered once per temperature, in order (0: greedy)")
    ap.add_argument("--docs-mix", default="summarization=1,translation=1,instruction=1",
                    help="benchmark-domain prompts of each task per round of the time-boxed generation")
    ap.add_argument("--n-eval-docs", type=int, default=96)
    ap.add_argument("--prompt-logprobs", type=int, default=0,
                    help="also cache the target's top-k on prompt (offline text) positions")
    # model / train
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--keep-vocab", type=int, default=8192)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--max-len", type=int, default=560)
    ap.add_argument("--prompt-weight", type=float, default=0.3)
    ap.add_argument("--ckpt-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-subset", type=int, default=32)
    ap.add_argument("--max-minutes", type=float, default=74.0,
                    help="training time budget (total over resumes); the LR decays over it")
    ap.add_argument("--export-from", default="ckpt.pt", help="ckpt.pt (last) or best.pt")
    ap.add_argument("--init-from", default="",
                    help="warm start: a train checkpoint (e.g. models/.cache/draft-train/best.pt); "
                         "head rows are matched by token id when the kept vocabulary changed")
    # EAGLE-3 head (eagle-train / eagle-export / eagle-assemble)
    ap.add_argument("--ttt-steps", type=int, default=5, help="training-time test: unrolled drafting steps")
    ap.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="eagle-train / eagle-eval: the teacher's and the head's forward autocast to bf16 "
                         "(~2x on a CPU with AMX or a GPU; weights and optimizer stay fp32)")
    ap.add_argument("--skip-records-of", default="",
                    help="eagle-train: a work dir whose data.pt training records are left out (a warm-started round "
                         "on the records a --reuse-data stage added)")
    ap.add_argument("--kept-from", default="",
                    help="draft.safetensors whose kept_token_ids are the head's vocabulary (default: the shipped draft's)")
    ap.add_argument("--eagle-out", default=str(REPO_ROOT / "drafts" / DEFAULT_EAGLE3_NAME))
    ap.add_argument("--eagle-assemble-to", default=str(REPO_ROOT / "models" / DEFAULT_EAGLE3_NAME))
    # bench
    ap.add_argument("--bench-prompts", type=int, default=8)
    ap.add_argument("--bench-tokens", type=int, default=96)
    ap.add_argument("--bench-k", type=int, default=4)
    ap.add_argument("--bench-only", default="", help="comma list of target,draft,spec")
    ap.add_argument("--bench-set", default="heldout", choices=["heldout", "heldout-chat", "heldout-docs", "benchmark"])
    ap.add_argument("--bench-per-task", type=int, default=4)
    ap.add_argument("--bench-out", default="")
    args = ap.parse_args(argv)
    for name in ALL_STAGES if args.stage == "all" else (args.stage,):
        stage_function(name)(args)
    return 0
