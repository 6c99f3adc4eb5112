"""What every stage of the draft training shares: paths, names, the teacher's top-k,
the log line, the hash that splits train / held-out, and small helpers on records."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # vllm_cmasd/training/common.py
DRAFT_ARCH = "CmasdReducedVocabLlamaForCausalLM"
DEFAULT_DRAFT_NAME = "smollm2-135m-draft-rv"
DEFAULT_EAGLE3_NAME = "smollm2-135m-eagle3"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
TOPK = 16  # teacher top-k cached per position
CHAT_KINDS = ("magpie", "task")


def log(msg: str) -> None:
    print(f"[train_draft {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stable_hash(s: str) -> int:
    """A hash that is the same in every process (unlike ``hash``): the train / held-out
    split of every source is ``stable_hash(item id) % 1000 < eval_frac * 1000``."""
    return int(hashlib.sha1(s.encode("utf-8", "replace")).hexdigest()[:8], 16)


def is_chat_kind(kind: str) -> bool:
    return kind.split(":")[0] in CHAT_KINDS


def domain(kind: str) -> str:
    """The domain of a record's prompt kind: ``stdlib`` (stdlib / licence text),
    ``chat`` (Magpie turns, templated tasks) or ``docs`` (the benchmark's domain)."""
    return "docs" if kind.startswith("docs:") else "chat" if is_chat_kind(kind) else "stdlib"


def chat_ids(tok, prompt: str, max_prompt_tokens: int):
    """The prompt as a chat-template user turn, token ids; None when longer than
    ``max_prompt_tokens``."""
    msgs = [{"role": "user", "content": prompt}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    ids = list(ids)
    if len(ids) > max_prompt_tokens:
        return None
    return ids


def teacher_record(prompt: dict, seq: list[int], n_prompt: int, t_ids, t_lps, finished: bool) -> dict:
    """One record of ``data.pt``: the prompt's ids then the target's answer (``seq``),
    and the teacher's top-k ids / log-probs at each position t for token t + 1."""
    import torch

    return {"sid": prompt["sid"], "kind": prompt["kind"], "ids": torch.tensor(seq, dtype=torch.int32),
            "n_prompt": n_prompt, "t_ids": t_ids, "t_lps": t_lps.to(torch.float16), "finished": finished}


def load_target_state(target_dir):
    """Every tensor of the target checkpoint's safetensors files."""
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(Path(target_dir).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd
