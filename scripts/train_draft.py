#!/usr/bin/env python
"""Train a small draft model for a HF Llama-family target by self-distillation on CPU.

Usage (every stage is resumable / skipped when its output exists; on 2 cores using one
thread: ~23 min stdlib data + ~20 min chat data + 32 min benchmark-domain data, 74 min
training, evals)::

    export LD_PRELOAD=$PWD/.venv/lib/libiomp5.so VLLM_CPU_OMP_THREADS_BIND=nobind \
           OMP_NUM_THREADS=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
    .venv/bin/python scripts/train_draft.py all      # data -> train -> export -> assemble
    .venv/bin/python scripts/train_draft.py bench    # vLLM: target, draft, draft_model spec

Defaults: target ``models/smollm2-135m-instruct``, work dir ``models/.cache/draft-train``,
shipped result ``drafts/smollm2-135m-draft-rv``, assembled checkpoint
``models/smollm2-135m-draft-rv``.

Stages:

``data``      build instruction prompts ("Explain what this Python function does",
              "Summarize: <paragraph>", "Translate to French: <sentence>", "Continue this
              text: ...", ...) from text that exists offline on every machine here (Python
              standard-library sources/docstrings, Debian's /usr/share/common-licenses),
              split by a fixed hash of the *source item* into train / held-out (a held-out
              paragraph or function never appears in training under any template), and let
              the target answer them greedily with vLLM in batches. vLLM returns the
              target's top-16 log-probs at every response position (``logprobs=16``): the
              cached teacher, so training needs no teacher forward. ``--prompt-logprobs 1``
              also caches them on prompt positions (+25% generation time; off by default,
              prompt tokens then only serve as context). Stops after ``--gen-minutes``.
              Chat domain (``--chat 1``, default), because the stdlib/licence prompts
              alone leave the draft out of domain on ordinary chat (0% agreement on
              "count from 1 to 40"): (a) Magpie-style user turns -- the target continues
              the chat-template prefix of a user turn (``<|im_start|>system ...<|im_end|>
              <|im_start|>user\\n``) at temperature 1.0 / top-p 0.95 with a fixed seed per
              request, stopped at ``<|im_end|>`` (<= 80 tokens; ``--magpie-n``,
              ``--magpie-minutes``), filtered (length, words, letters, repetition, template
              tokens) and deduplicated, anything shaped like / equal to a benchmark prompt
              (``vllm_cmasd/bench/prompts.json``) dropped; (b) deterministic templated short
              tasks from parameters (counting ranges, days / months / letters, arithmetic,
              yes/no questions, short rewrites, word games, tiny Python functions). Both
              are split train / held-out by a hash of the item id, answered greedily like
              the stdlib prompts (<= ``--chat-max-new-tokens``, ``--chat-gen-minutes``;
              held-out ``eval_chat`` first). ``--reuse-data DIR`` starts from every record
              of an earlier work dir (train and held-out) and asks only new prompts.
              Benchmark domain (``--docs-gen-minutes``, default 32; :func:`docs_prompts`):
              the plugin benchmark's own summarization / translation / instruction
              templates on package READMEs and docstrings, Debian READMEs and man pages,
              with every document a benchmark prompt comes from (all versions, all
              languages of a man page, a package's docstrings with its README) and every
              passage quoted in one left out (``vllm_cmasd.bench.prompts.training_prompts``);
              split train / held-out (``eval_docs``) by a hash of the document; asked in
              the ratio ``--docs-mix``; answered greedily, <= ``--docs-max-new-tokens``.
``train``     draft = target's input embedding (frozen, shared, not shipped) + first
              ``--layers`` decoder layers + final norm + a reduced-vocabulary LM head over the
              ``--keep-vocab`` most frequent target tokens of the training data (rows
              initialised from the tied embedding). Loss: KL(target || draft) on the cached
              top-16 teacher probabilities (renormalised over kept tokens). AdamW, warmup +
              cosine decay over ``--steps`` or ``--max-minutes`` (whichever ends first),
              length-bucketed batches of ``--batch-tokens`` tokens in a seeded order,
              ``torch.set_num_threads(--threads)``; checkpoints every ``--ckpt-every`` steps
              (``ckpt.pt``, resumed automatically; best held-out in ``best.pt``), tqdm shows
              loss and top-1 agreement; at the end prints teacher-forced top-1 agreement
              with the target on the held-out split, separately for the stdlib/licence and
              the chat-domain held-out sets (the best-checkpoint criterion is their mean),
              and the kept vocabulary's coverage of their response tokens.
              ``--init-from CKPT`` warm-starts from an earlier run (body as trained; head
              rows of tokens that were kept before are copied by token id, rows of newly
              kept tokens start from the embedding).
``export``    write what differs from the target (trained layers, norm, small head, kept
              token ids; bf16 safetensors) + ``draft.json`` record to ``--out``.
``assemble``  :func:`assemble_draft` -> ``--assemble-to``.
``bench``     plain decoding of target and draft alone and vLLM ``draft_model``
              speculative decoding (greedy, k=4) at batch 1 on held-out prompts
              (``--bench-set heldout``: stdlib/licence, ``heldout-chat``, ``heldout-docs``;
              ``benchmark``: the first ``--bench-per-task`` prompts of each task of the
              plugin benchmark).
``overlap``   :func:`stage_overlap`: the share of each benchmark prompt's 8-word shingles
              that the work dir's training prompts hold (a leakage check beside the
              exclusion rules) -> ``overlap.json``.

The shipped draft (v5) continues v4 with summaries of the guides and notes packages ship
beside their READMEs, and drops every reused record on benchmark or held-out text (both
cores, no other jobs; ``drafts/smollm2-135m-draft-rv/TRAINING.md`` has the record; the
second ``data`` call only re-checks and generates nothing)::

    .venv/bin/python scripts/train_draft.py data --work models/.cache/draft-train-v5 \\
        --reuse-data models/.cache/draft-train-v4b --chat 0 --docs-gen-minutes 24 \\
        --docs-mix summarization=1,translation=0,instruction=0 \\
        --max-prompt-tokens 640 --gen-batch 128 --gen-chunk 256
    .venv/bin/python scripts/train_draft.py data --work models/.cache/draft-train-v5b \\
        --reuse-data models/.cache/draft-train-v5 --chat 0 --docs-gen-minutes 0 \\
        --max-prompt-tokens 640 --gen-batch 128 --gen-chunk 256
    TA="--threads 2 --lr 3e-4 --warmup 20 --batch-tokens 3072 --max-len 768 --max-minutes 50"
    .venv/bin/python scripts/train_draft.py train --work models/.cache/draft-train-v5b \\
        --init-from drafts/smollm2-135m-draft-rv $TA --eval-every 100 --eval-subset 48
    .venv/bin/python scripts/train_draft.py export --work models/.cache/draft-train-v5b \\
        --init-from drafts/smollm2-135m-draft-rv $TA --export-from best.pt

v4 continued v3 with more benchmark-domain data, summaries first::

    .venv/bin/python scripts/train_draft.py data --work models/.cache/draft-train-v4 \\
        --reuse-data models/.cache/draft-train-v3 --chat 0 --docs-gen-minutes 28 \\
        --docs-mix summarization=4,translation=1,instruction=2 \\
        --max-prompt-tokens 640 --gen-batch 128 --gen-chunk 256
    .venv/bin/python scripts/train_draft.py data --work models/.cache/draft-train-v4b \\
        --reuse-data models/.cache/draft-train-v4 --chat 0 --docs-gen-minutes 11 \\
        --docs-mix summarization=1,translation=0,instruction=0 \\
        --max-prompt-tokens 640 --gen-batch 128 --gen-chunk 256
    (train / export as for v5, in models/.cache/draft-train-v4b)

v3 continued v2 on benchmark-domain data::

    .venv/bin/python scripts/train_draft.py data --work models/.cache/draft-train-v3 \\
        --gen-minutes 0 --chat 1 --magpie-n 0 --chat-gen-minutes 3 --docs-gen-minutes 30 \\
        --max-prompt-tokens 640 --gen-batch 128 --gen-chunk 256 --n-eval 32
    TA="--threads 2 --lr 4e-4 --warmup 20 --batch-tokens 3072 --max-len 768 --max-minutes 60"
    .venv/bin/python scripts/train_draft.py train --work models/.cache/draft-train-v3 \\
        --init-from drafts/smollm2-135m-draft-rv $TA --eval-every 100 --eval-subset 48
    .venv/bin/python scripts/train_draft.py export --work models/.cache/draft-train-v3 \\
        --init-from drafts/smollm2-135m-draft-rv $TA --export-from best.pt

v2 was made in two runs: the stdlib/licence-only run above (defaults with ``--chat 0``,
work dir ``models/.cache/draft-train``), then::

    .venv/bin/python scripts/train_draft.py data --work models/.cache/draft-train-v2 \\
        --reuse-data models/.cache/draft-train
    .venv/bin/python scripts/train_draft.py train --work models/.cache/draft-train-v2 \\
        --init-from models/.cache/draft-train/best.pt --lr 3e-4 --warmup 10 --max-minutes 49
    .venv/bin/python scripts/train_draft.py export --work models/.cache/draft-train-v2 \\
        --init-from models/.cache/draft-train/best.pt --lr 3e-4 --warmup 10 --max-minutes 49

(see ``drafts/smollm2-135m-draft-rv/TRAINING.md`` for the exact record).

:func:`assemble_draft` builds the full vLLM-loadable draft checkpoint (architecture
``CmasdReducedVocabLlamaForCausalLM``, see :mod:`vllm_cmasd.draft_model`) from the target
and the shipped ``drafts/<name>/`` files.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DRAFT_ARCH = "CmasdReducedVocabLlamaForCausalLM"
DEFAULT_DRAFT_NAME = "smollm2-135m-draft-rv"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
TOPK = 16  # teacher top-k cached per position


def log(msg: str) -> None:
    print(f"[train_draft {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------
# Offline text -> instruction prompts
# --------------------------------------------------------------------------------------

def _h(s: str) -> int:
    return int(hashlib.sha1(s.encode("utf-8", "replace")).hexdigest()[:8], 16)


def _clean(s: str) -> str:
    return re.sub(r"[ \t]+", " ", s).strip()


def _stdlib_items(max_files: int | None = None):
    """(source_id, kind, text) from the standard library: docstrings and small functions."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py")
                   if "test" not in p.parts and "site-packages" not in p.parts
                   and "idlelib" not in p.parts and "lib2to3" not in p.parts)
    if max_files:
        files = files[:max_files]
    for path in files:
        try:
            src = path.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except Exception:
            continue
        rel = str(path.relative_to(stdlib))
        lines = src.splitlines()
        mdoc = ast.get_docstring(tree)
        if mdoc and len(mdoc) > 80:
            yield (f"{rel}", "moddoc", rel[:-3].replace("/", "."), mdoc)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if node.name.startswith("_"):
                    continue
                sid = f"{rel}:{node.name}:{node.lineno}"
                if doc and len(doc) > 60:
                    yield (sid, "doc", node.name, doc)
                if isinstance(node, ast.FunctionDef) and node.end_lineno:
                    n = node.end_lineno - node.lineno + 1
                    if 4 <= n <= 30:
                        code = "\n".join(lines[node.lineno - 1: node.end_lineno])
                        yield (sid + ":src", "code", node.name, code)


def _license_items():
    root = Path("/usr/share/common-licenses")
    for path in sorted(root.iterdir()):
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except Exception:
            continue
        paras = [_clean(p.replace("\n", " ")) for p in re.split(r"\n\s*\n", text)]
        for i, p in enumerate(paras):
            if 120 <= len(p) <= 1500:
                yield (f"lic:{path.name}:{i}", "para", path.name, p)


def _first_sentence(text: str) -> str:
    m = re.match(r"(.{20,300}?[.!?])(\s|$)", text.replace("\n", " "))
    return _clean(m.group(1) if m else text[:200])


def _prompts_for(item, rng: random.Random):
    sid, kind, name, text = item
    out = []
    if kind == "code":
        out.append(f"Explain what this Python function does:\n\n```python\n{text}\n```")
        if rng.random() < 0.3:
            out.append(f"Write a docstring for this Python function:\n\n```python\n{text}\n```")
    elif kind in ("doc", "moddoc"):
        doc = text[:1200]
        what = "module" if kind == "moddoc" else "Python API"
        t = rng.choice([
            f"Summarize this documentation of the {what} `{name}` in two sentences:\n\n{doc}",
            f"Explain in simple terms what `{name}` does, based on its documentation:\n\n{doc}",
            f"Write a short Python example that uses `{name}`. Its documentation says:\n\n{doc}",
        ])
        out.append(t)
        if rng.random() < 0.25:
            out.append(f"Translate to French: {_first_sentence(doc)}")
    elif kind == "para":
        t = rng.choice([
            f"Summarize: {text}",
            f"Explain this license text in plain English:\n\n{text}",
            f"What are the key points of this text?\n\n{text}",
            f"Continue this text: {text[: max(80, len(text) // 2)]}",
        ])
        out.append(t)
        if rng.random() < 0.3:
            out.append(f"Translate to French: {_first_sentence(text)}")
        if rng.random() < 0.2:
            out.append(f"Rewrite this sentence so that a child can understand it: {_first_sentence(text)}")
    return out


def build_prompts(seed: int, n_train: int, n_eval: int, eval_frac: float = 0.1):
    """Deterministic prompt lists. The split is by source item (hash), so no held-out
    paragraph/function is ever seen in training, under any prompt template."""
    items = list(_stdlib_items()) + list(_license_items())
    # dedupe on text
    seen, uniq = set(), []
    for it in items:
        k = it[3]
        if k in seen:
            continue
        seen.add(k)
        uniq.append(it)
    train, held = [], []
    for it in uniq:
        (held if (_h(it[0]) % 1000) < eval_frac * 1000 else train).append(it)
    rng = random.Random(seed)
    # balance: licenses are few, stdlib many; sample items in a fixed order
    def sample(pool, n):
        by_kind = {}
        for it in pool:
            by_kind.setdefault(it[2 - 1], []).append(it)
        rng.shuffle(pool)
        lic = [it for it in pool if it[1] == "para"]
        rest = [it for it in pool if it[1] != "para"]
        prompts = []
        for it in lic + rest:  # all license paragraphs first (small), then stdlib
            for p in _prompts_for(it, rng):
                prompts.append({"sid": it[0], "kind": it[1], "prompt": p})
        rng.shuffle(prompts)
        return prompts[:n]
    return sample(train, n_train), sample(held, n_eval)


# --------------------------------------------------------------------------------------
# Chat-domain prompts: templated short tasks and Magpie-style self-generated user turns
# --------------------------------------------------------------------------------------

CHAT_KINDS = ("magpie", "task")


def is_chat_kind(kind: str) -> bool:
    return kind.split(":")[0] in CHAT_KINDS


_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December"]
_WORDS = ["apple", "river", "garden", "window", "teacher", "computer", "mountain", "pencil",
          "bicycle", "library", "orange", "planet", "kitchen", "butterfly", "ocean", "candle",
          "friend", "holiday", "elephant", "guitar", "summer", "doctor", "village", "rainbow"]
_SUBJ = ["The cat", "My brother", "The students", "Our neighbour", "The old man", "She", "The team",
         "The little girl", "My friends", "The farmer"]
_VERB = [("walks to", "walked to"), ("eats", "ate"), ("reads", "read"), ("paints", "painted"),
         ("visits", "visited"), ("cleans", "cleaned"), ("opens", "opened"), ("watches", "watched")]
_OBJ = ["the park", "a big sandwich", "an old book", "the fence", "the museum", "the kitchen",
        "the window", "a funny movie", "the garden", "the library"]
_FACTS = [("a whale", "a fish"), ("a tomato", "a fruit"), ("the sun", "a star"), ("a bat", "a bird"),
          ("a spider", "an insect"), ("Paris", "the capital of France"), ("water", "a liquid at room temperature"),
          ("a penguin", "a bird"), ("the moon", "a planet"), ("Python", "a programming language"),
          ("ice", "colder than boiling water"), ("a square", "a rectangle"), ("a dolphin", "a mammal"),
          ("Mount Everest", "the highest mountain on Earth"), ("a potato", "a vegetable"),
          ("gold", "a metal"), ("a triangle", "a shape with four sides"), ("Tokyo", "in Japan")]
_PY_TASKS = ["returns the sum of a list of numbers", "checks whether a number is even",
             "reverses a string", "returns the largest of three numbers", "counts the vowels in a string",
             "returns the square of a number", "checks whether a string is a palindrome",
             "converts Celsius to Fahrenheit", "returns the first n even numbers",
             "removes duplicates from a list", "returns the length of the longest word in a sentence",
             "computes the average of a list"]


def task_prompts(seed: int):
    """Deterministic short-task prompts from parameters (the old stdlib/licence data has
    none of this): counting ranges, days / months / letters, arithmetic, yes/no questions,
    short rewrites, tiny Python functions. Item id = family + parameters (hash split).
    Deliberately unlike the benchmark's summarization / translation / long-form prompts."""
    rng = random.Random(seed + 7)
    out = []

    def add(fam, params, prompt):
        out.append({"sid": f"task:{fam}:{params}", "kind": f"task:{fam}", "prompt": prompt})

    for a, b in sorted({(rng.randint(0, 30), 0) for _ in range(40)}):
        b = a + rng.choice([5, 8, 10, 12, 15, 20, 25, 30])
        add("count", (a, b), rng.choice([
            f"Count from {a} to {b}.", f"Count from {a} to {b}, separated by commas.",
            f"List the numbers from {a} to {b}.", f"Write the numbers {a} through {b} on one line."]))
        add("count_back", (a, b), f"Count backwards from {b} to {a}.")
        add("evens", (a, b), rng.choice([f"List the even numbers between {a} and {b}.",
                                         f"List the odd numbers between {a} and {b}."]))
    for i in range(7):
        add("days", i, rng.choice([
            "Continue the sequence: " + ", ".join(_DAYS[i:i + 3]) + ",",
            f"What day comes after {_DAYS[i]}?", f"List the days of the week starting from {_DAYS[i]}."]))
    add("days", "all", "Name the days of the week in order.")
    for i in range(12):
        add("months", i, rng.choice([
            "Continue the sequence: " + ", ".join(_MONTHS[i:i + 3]) + ",",
            f"What month comes after {_MONTHS[i]}?", f"List the months of the year starting from {_MONTHS[i]}.",
            f"How many days are there in {_MONTHS[i]}?"]))
    add("months", "all", "List the twelve months of the year.")
    for i in range(0, 20, 2):
        a, b = chr(65 + i), chr(65 + i + rng.randint(5, 6))
        add("letters", i, rng.choice([f"List the letters of the alphabet from {a} to {b}.",
                                      f"Continue the sequence: {a}, {chr(ord(a) + 1)}, {chr(ord(a) + 2)},",
                                      f"What letter comes after {a} in the alphabet?"]))
    for i in range(60):
        x, y = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice(["+", "-", "*", "/", "word"])
        if op == "+":
            q = rng.choice([f"What is {x} + {y}?", f"What is {x} plus {y}?", f"Add {x} and {y}."])
        elif op == "-":
            q = rng.choice([f"What is {x} - {y}?", f"Subtract {y} from {x}."])
        elif op == "*":
            x, y = x % 13 + 2, y % 13 + 2
            q = rng.choice([f"What is {x} times {y}?", f"Calculate {x} * {y}."])
        elif op == "/":
            y = y % 12 + 2
            q = f"What is {x * y} divided by {y}?"
        else:
            q = (f"Tom has {x} apples and buys {y} more. How many apples does he have now?")
        add("arith", (i, x, y, op), q)
    for i, (a, b) in enumerate(_FACTS):
        add("yesno", ("fact", i), rng.choice([f"Is {a} {b}? Answer yes or no.", f"Is {a} {b}?"]))
    for i in range(20):
        n = rng.randint(2, 200)
        add("yesno", ("num", i, n), rng.choice([f"Is {n} an even number? Answer yes or no.",
                                                f"Is {n} a prime number?", f"Is {n} greater than {rng.randint(2, 200)}?"]))
    for i in range(40):
        sj, (vp, vd), ob = rng.choice(_SUBJ), rng.choice(_VERB), rng.choice(_OBJ)
        sent = f"{sj} {vp} {ob} every day."
        add("rewrite", (i, sent), rng.choice([
            f"Rewrite this sentence in the past tense: {sent}",
            f"Rewrite this sentence as a question: {sent}",
            f"Make this sentence more formal: {sent}",
            f"Convert this sentence to uppercase: {sent}",
            f"Rewrite this sentence in the future tense: {sent}"]))
    for i, w in enumerate(_WORDS):
        add("word", (i, w), rng.choice([f"Spell the word '{w}' backwards.",
                                        f"How many letters are in the word '{w}'?",
                                        f"What is the plural of '{w}'?", f"Give three synonyms for '{w}'.",
                                        f"Use the word '{w}' in a sentence.", f"What rhymes with '{w}'?"]))
    for i, t in enumerate(_PY_TASKS):
        add("pyfunc", i, rng.choice([f"Write a Python function that {t}.",
                                     f"Write a short Python function that {t}. Keep it simple."]))
    seen, uniq = set(), []
    for p in out:
        if p["prompt"] not in seen:
            seen.add(p["prompt"])
            uniq.append(p)
    return uniq


def _user_turn_prefix(tok) -> list[int]:
    """Token ids of the chat template up to the start of a user message's text."""
    mark = "\u2063XQZ"
    text = tok.apply_chat_template([{"role": "user", "content": mark}], tokenize=False)
    prefix = text[: text.index(mark)]
    return tok(prefix, add_special_tokens=False)["input_ids"]


def _benchmark_texts() -> set[str]:
    p = REPO_ROOT / "vllm_cmasd/bench/prompts.json"
    if not p.exists():
        return set()
    tasks = json.loads(p.read_text()).get("tasks", {})
    return {_dedupe_key(q["prompt"]) for plist in tasks.values() for q in plist}


def _dedupe_key(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()[:60]


_BENCH_LIKE = re.compile(r"^(summarize the following text in two or three sentences|"
                         r"translate the following \w+ text into \w+\. reply with the translation only)",
                         re.I)


def _magpie_ok(text: str) -> bool:
    t = text.strip()
    if not (15 <= len(t) <= 400) or "<|" in t or "|>" in t:
        return False
    words = t.split()
    if len(words) < 3 or len(set(w.lower() for w in words)) < 0.5 * len(words):
        return False
    letters = sum(c.isascii() and c.isalpha() for c in t)
    if letters < 0.6 * len(t):
        return False
    if t.lower().startswith(("assistant", "user", "system")) or _BENCH_LIKE.match(t):
        return False
    return True


def magpie_prompts(llm, tok, args) -> tuple[list[dict], dict]:
    """Magpie-style user prompts: the target continues the chat-template prefix of a user
    turn (default system prompt + ``<|im_start|>user\\n``) at temperature
    ``--magpie-temperature``, top-p 0.95, request ``j`` seeded ``seed * 100003 + j``,
    stopped at ``<|im_end|>`` (unfinished samples dropped), at most 80 tokens. Filtered
    (15-400 chars, >= 3 words, mostly ASCII letters, no template tokens, not repetitive,
    nothing shaped like a benchmark prompt) and deduplicated on a normalised 60-char key;
    anything matching a benchmark prompt is dropped."""
    from vllm import SamplingParams

    prefix = _user_turn_prefix(tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    bench = _benchmark_texts()
    out, seen = [], set()
    stats = {"raw": 0, "unfinished": 0, "filtered": 0, "dup": 0}
    t0 = time.time()
    j = 0
    while j < args.magpie_n and time.time() - t0 < args.magpie_minutes * 60:
        n = min(args.gen_chunk, args.magpie_n - j)
        sps = [SamplingParams(temperature=args.magpie_temperature, top_p=0.95, max_tokens=80,
                              stop_token_ids=[im_end], seed=args.seed * 100003 + j + i)
               for i in range(n)]
        outs = llm.generate([{"prompt_token_ids": prefix} for _ in range(n)], sps, use_tqdm=False)
        for o in outs:
            stats["raw"] += 1
            c = o.outputs[0]
            if c.finish_reason != "stop":
                stats["unfinished"] += 1
                continue
            text = c.text.strip()
            if not _magpie_ok(text):
                stats["filtered"] += 1
                continue
            key = _dedupe_key(text)
            if key in seen or key in bench:
                stats["dup"] += 1
                continue
            seen.add(key)
            out.append({"sid": "magpie:" + hashlib.sha1(key.encode()).hexdigest()[:12],
                        "kind": "magpie", "prompt": text})
        j += n
        log(f"data: magpie {j} sampled, {len(out)} kept, {stats}, {time.time() - t0:.0f}s")
    return out, stats


# --------------------------------------------------------------------------------------
# Benchmark-domain prompts: the benchmark's tasks and templates on other documents
# --------------------------------------------------------------------------------------

def docs_prompts(seed: int, eval_frac: float = 0.1, mix: dict[str, int] | None = None):
    """Summarization / translation / instruction prompts made with the plugin
    benchmark's own templates (:func:`vllm_cmasd.bench.prompts.training_prompts`) from
    the same kinds of offline text, with every document a benchmark prompt comes from
    left out. Split train / held-out by a hash of the document, so a held-out document
    never appears in training either. Each list is shuffled and then interleaved by task,
    ``mix[task]`` prompts of each task per round (default one each), so a time-boxed
    generation gets the tasks in that ratio; within a task, prompts on READMEs and man
    pages (the benchmark's own kinds of document) come before those on docstrings."""
    sys.path.insert(0, str(REPO_ROOT))
    from vllm_cmasd.bench.prompts import TASKS, training_prompts

    mix = mix or {t: 1 for t in TASKS}
    rng = random.Random(seed + 23)
    split = {"train": {t: [] for t in TASKS}, "eval": {t: [] for t in TASKS}}
    for q in training_prompts():
        part = "eval" if (_h(q["origin"]) % 1000) < eval_frac * 1000 else "train"
        split[part][q["task"]].append({"sid": f"docs:{q['source']}", "kind": f"docs:{q['task']}",
                                       "prompt": q["prompt"]})
    out = []
    for part in ("train", "eval"):
        queues = []
        for task, queue in split[part].items():
            rng.shuffle(queue)
            queue.sort(key=lambda q: not q["sid"].startswith("docs:pydoc:"))  # popped from the end
            queues.append((queue, mix.get(task, 0)))
        mixed = []
        while any(queue and n for queue, n in queues):
            for queue, n in queues:
                mixed += [queue.pop() for _ in range(min(n, len(queue)))]
        out.append(mixed)
    return out[0], out[1]


# --------------------------------------------------------------------------------------
# Stage: data (target answers with vLLM, teacher top-k log-probs cached)
# --------------------------------------------------------------------------------------

def _unseen_filter(heldout: list[dict]):
    """``unseen(sid, prompt)``: False for a benchmark-domain training prompt on a
    document of the benchmark or of the ``heldout`` prompts, or sharing a paragraph
    with one. Paragraphs catch what document names miss: files that several packages
    ship, man pages installed under several names (xz.1 / lzcat.1), the paragraphs that
    near-duplicate pages (gcloud alpha / beta) have in common."""
    sys.path.insert(0, str(REPO_ROOT))
    from vllm_cmasd.bench.prompts import benchmark_origins, benchmark_paragraphs, origin_key, shares_paragraph

    def body(prompt: str) -> str:  # the passage after the template's instruction
        return prompt.split("\n\n", 1)[-1]

    def origin(sid: str) -> str:
        return origin_key(sid.removeprefix("docs:"))

    origins = benchmark_origins() | {origin(q["sid"]) for q in heldout}
    paragraphs = benchmark_paragraphs() | {part for q in heldout for part in body(q["prompt"]).split("\n\n")}
    return lambda sid, prompt: origin(sid) not in origins and not shares_paragraph(body(prompt), paragraphs)


def _chat_ids(tok, prompt: str, max_prompt_tokens: int):
    msgs = [{"role": "user", "content": prompt}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    ids = list(ids)
    if len(ids) > max_prompt_tokens:
        return None
    return ids


def _pack_logprobs(lp_list, n):
    """list (len n) of dict{token_id: Logprob} -> (ids int32 [n,K], lps fp16 [n,K])."""
    import torch

    ids = torch.full((n, TOPK), -1, dtype=torch.int32)
    lps = torch.full((n, TOPK), -1e4, dtype=torch.float32)
    for i, d in enumerate(lp_list):
        if not d:
            continue
        # the highest TOPK: vLLM adds the sampled token on top of the top-k
        items = sorted(d.items(), key=lambda kv: -kv[1].logprob)[:TOPK]
        for j, (t, lp) in enumerate(items):
            ids[i, j] = t
            lps[i, j] = lp.logprob
    return ids, lps


def _answer(llm, tok, sp, plist, split, records, args, stop_at=None, label="", max_prompt_tokens=None):
    """Target answers ``plist`` greedily; appends teacher records to ``records[split]``."""
    import torch

    t0 = time.time()
    n_tok = 0
    chunk = args.gen_chunk
    for c0 in range(0, len(plist), chunk):
        if stop_at and time.time() > stop_at:
            log(f"data: {label} time budget reached, stopping at {c0}/{len(plist)} {split} prompts")
            break
        batch = []
        for p in plist[c0: c0 + chunk]:
            ids = _chat_ids(tok, p["prompt"], max_prompt_tokens or args.max_prompt_tokens)
            if ids is not None:
                batch.append((p, ids))
        if not batch:
            continue
        outs = llm.generate([{"prompt_token_ids": ids} for _, ids in batch], sp, use_tqdm=False)
        for (p, ids), o in zip(batch, outs):
            c = o.outputs[0]
            resp = list(c.token_ids)
            # teacher distribution for predicting token t+1 at position t:
            # prompt_logprobs[i] is for token i (given <i); [0] is None.
            plp = (o.prompt_logprobs[1:] if args.prompt_logprobs
                   else [None] * (len(ids) - 1))  # predicting prompt tokens 1..P-1
            glp = list(c.logprobs)  # predicting response tokens 0..R-1
            seq = ids + resp
            lp_list = list(plp) + glp  # position t predicts seq[t+1]
            n = len(lp_list)
            tids, tlps = _pack_logprobs(lp_list, n)
            records[split].append({
                "sid": p["sid"], "kind": p["kind"],
                "ids": torch.tensor(seq, dtype=torch.int32),
                "n_prompt": len(ids),
                "t_ids": tids, "t_lps": tlps.to(torch.float16),
                "finished": c.finish_reason == "stop",
            })
            n_tok += len(seq)
        el = time.time() - t0
        log(f"data: {label} {split} {min(c0 + chunk, len(plist))}/{len(plist)} prompts, "
            f"{n_tok} tokens, {el:.0f}s ({n_tok / el:.0f} tok/s incl. prompts)")


def _split_chat(prompts, eval_frac=0.1):
    tr, ev = [], []
    for p in prompts:
        (ev if (_h(p["sid"]) % 1000) < eval_frac * 1000 else tr).append(p)
    return tr, ev


def stage_data(args) -> None:
    """Two sources, both answered greedily by the target with top-16 log-probs cached:

    * stdlib / licence prompts (:func:`build_prompts`), ``--gen-minutes`` of generation;
      ``--reuse-data DIR`` starts from every record of an earlier run's work dir
      (``data.pt`` + ``prompts.json``: train and held-out sets, kept as they are) instead
      of regenerating the stdlib ones, and asks the other sources only prompts it did
      not answer;
    * chat domain (``--chat``): :func:`task_prompts` + :func:`magpie_prompts`, split
      train / held-out by a hash of the item id, answered with at most
      ``--chat-max-new-tokens`` new tokens for ``--chat-gen-minutes`` (held-out first).
      Magpie prompts are cached in ``chat_prompts.json``.

    ``data.pt``: ``train`` (both sources), ``eval`` (stdlib held-out), ``eval_chat``."""
    import torch
    from transformers import AutoTokenizer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out_path = work / "data.pt"
    if out_path.exists():
        log(f"data: {out_path} exists, skipping")
        return
    tok = AutoTokenizer.from_pretrained(args.target)
    records = {"train": [], "eval": [], "eval_chat": [], "eval_docs": []}
    pj = {"train": [], "eval": [], "eval_chat": [], "train_chat": [], "eval_docs": [], "train_docs": []}
    reuse = Path(args.reuse_data) if args.reuse_data else None
    answered = set()  # prompts the reused records already answer (not asked again)
    if reuse:
        old = torch.load(reuse / "data.pt", weights_only=False)
        opj = json.loads((reuse / "prompts.json").read_text())
        for key in records:
            records[key] = list(old.get(key, []))
        for key in pj:
            pj[key] = opj.get(key, [])
        # Re-check reused training records against today's rules (they have grown
        # stricter: see _unseen_filter).
        unseen = _unseen_filter(pj["eval_docs"])
        prompt_of = {q["sid"]: q["prompt"] for qs in pj.values() for q in qs}
        kept = [r for r in records["train"] if not r["sid"].startswith("docs:") or unseen(r["sid"], prompt_of[r["sid"]])]
        if len(kept) < len(records["train"]):
            log(f"data: dropping {len(records['train']) - len(kept)} reused train records on benchmark or held-out text")
            records["train"] = kept
        done = {r["sid"] for rs in records.values() for r in rs}
        answered = {q["prompt"] for qs in pj.values() for q in qs if q["sid"] in done}
        log(f"data: reusing the records of {reuse}: " + ", ".join(f"{k} {len(v)}" for k, v in records.items()))
        train_p, eval_p = [], []
    else:
        train_p, eval_p = build_prompts(args.seed, args.n_train, args.n_eval)
        pj["train"], pj["eval"] = train_p, eval_p
        log(f"data: {len(train_p)} train prompts, {len(eval_p)} held-out prompts")

    # The engine in this process: on vLLM's CPU build an engine process of its own
    # reserves a core for this one, which then idles (half the throughput on 2 cores).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    from vllm_cmasd.engines import llm_kwargs

    llm = LLM(**llm_kwargs(args.target, gpu_memory_utilization=args.gpu_mem, seed=args.seed,
                           max_model_len=args.max_prompt_tokens + args.max_new_tokens + 8,
                           max_num_seqs=args.gen_batch, disable_log_stats=True))
    t0 = time.time()
    if not reuse:
        sp = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens,
                            logprobs=TOPK, prompt_logprobs=TOPK if args.prompt_logprobs else None)
        _answer(llm, tok, sp, eval_p, "eval", records, args, label="stdlib")
        if args.gen_minutes > 0:  # 0: held-out only (its agreement is still reported)
            stop_at = time.time() + args.gen_minutes * 60
            _answer(llm, tok, sp, train_p, "train", records, args, stop_at=stop_at, label="stdlib")
    if args.chat:
        cp = work / "chat_prompts.json"
        if cp.exists():
            mag = json.loads(cp.read_text())["magpie"]
        else:
            mag, mstats = magpie_prompts(llm, tok, args)
            cp.write_text(json.dumps({"magpie": mag, "stats": mstats}, indent=0))
        tasks = task_prompts(args.seed)
        m_tr, m_ev = _split_chat(mag)
        t_tr, t_ev = _split_chat(tasks)
        rng = random.Random(args.seed + 11)
        rng.shuffle(m_ev)
        rng.shuffle(t_ev)
        n_t = min(len(t_ev), args.n_eval_chat // 4)
        chat_ev = m_ev[: args.n_eval_chat - n_t] + t_ev[:n_t]
        chat_tr = m_tr + t_tr
        rng.shuffle(chat_tr)
        log(f"data: chat: {len(mag)} magpie prompts ({len(m_tr)} train / {len(m_ev)} held-out), "
            f"{len(tasks)} task prompts ({len(t_tr)} / {len(t_ev)}); answering {len(chat_ev)} held-out, "
            f"then train for <= {args.chat_gen_minutes} min")
        pj["eval_chat"], pj["train_chat"] = chat_ev, chat_tr
        csp = SamplingParams(temperature=0.0, max_tokens=args.chat_max_new_tokens, logprobs=TOPK,
                             prompt_logprobs=TOPK if args.prompt_logprobs else None)
        stop_at = time.time() + args.chat_gen_minutes * 60
        _answer(llm, tok, csp, chat_ev, "eval_chat", records, args, label="chat")
        _answer(llm, tok, csp, chat_tr, "train", records, args, stop_at=stop_at, label="chat")
    if args.docs_gen_minutes > 0:
        mix = {task: int(n) for task, n in (item.split("=") for item in args.docs_mix.split(","))}
        docs_tr, docs_ev = docs_prompts(args.seed, mix=mix)
        # a reused held-out set is kept as it is, so versions are compared on the same text
        docs_ev = [] if records["eval_docs"] else docs_ev[: args.n_eval_docs]
        unseen = _unseen_filter(pj["eval_docs"] + docs_ev)
        docs_tr = [q for q in docs_tr if q["prompt"] not in answered and unseen(q["sid"], q["prompt"])]
        log(f"data: benchmark domain: {len(docs_tr)} new train / {len(docs_ev)} new held-out prompts "
            f"(mix {mix}); answering the held-out, then train for <= {args.docs_gen_minutes} min")
        pj["eval_docs"] = pj["eval_docs"] + docs_ev
        pj["train_docs"] = pj["train_docs"] + docs_tr
        dsp = SamplingParams(temperature=0.0, max_tokens=args.docs_max_new_tokens, logprobs=TOPK)
        stop_at = time.time() + args.docs_gen_minutes * 60
        _answer(llm, tok, dsp, docs_ev, "eval_docs", records, args, label="docs")
        _answer(llm, tok, dsp, docs_tr, "train", records, args, stop_at=stop_at, label="docs")
    (work / "prompts.json").write_text(json.dumps(pj, indent=0))
    torch.save(records, out_path.with_suffix(".tmp"))
    os.replace(out_path.with_suffix(".tmp"), out_path)
    log(f"data: wrote {out_path} in {time.time() - t0:.0f}s: " +
        ", ".join(f"{k} {len(v)} seqs" for k, v in records.items()))
    try:
        from vllm_cmasd.engines import shutdown  # type: ignore
        shutdown(llm)
    except Exception:
        pass


# --------------------------------------------------------------------------------------
# Draft model (pure torch, for training; vLLM uses vllm_cmasd.draft_model)
# --------------------------------------------------------------------------------------

def _load_target_state(target_dir):
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(Path(target_dir).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def build_draft(target_dir, n_layers: int, kept_ids):
    """transformers LlamaModel with the first n_layers of the target + small head."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig.from_pretrained(target_dir)
    cfg.num_hidden_layers = n_layers
    cfg.use_cache = False
    sd = _load_target_state(target_dir)
    body = LlamaModel(cfg)
    mine = {}
    for k, v in sd.items():
        k2 = k[len("model."):] if k.startswith("model.") else k
        if k2.startswith("layers."):
            li = int(k2.split(".")[1])
            if li >= n_layers:
                continue
        if k2.startswith("lm_head"):
            continue
        mine[k2] = v
    missing, unexpected = body.load_state_dict(mine, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    assert not missing and not unexpected, (missing, unexpected)
    body.embed_tokens.weight.requires_grad_(False)
    kept = torch.as_tensor(kept_ids, dtype=torch.long)
    head = torch.nn.Linear(cfg.hidden_size, len(kept), bias=False)
    with torch.no_grad():
        head.weight.copy_(body.embed_tokens.weight[kept])
    return cfg, body, head, kept


# --------------------------------------------------------------------------------------
# Stage: train
# --------------------------------------------------------------------------------------

def choose_kept_vocab(records, tok, keep: int):
    """Most frequent target tokens in the training data (text + teacher top-1), plus all
    special tokens. Returned sorted by id."""
    import torch

    cnt = torch.zeros(len(tok), dtype=torch.float64)
    for r in records:
        n_p = r["n_prompt"]
        ids = r["ids"].long()
        w = torch.ones(len(ids), dtype=torch.float64)
        w[n_p:] = 3.0  # response tokens count more: they are what the draft must predict
        cnt.index_add_(0, ids, w)
        top1 = r["t_ids"][:, 0].long()
        ok = top1 >= 0
        cnt.index_add_(0, top1[ok], torch.full((int(ok.sum()),), 1.0, dtype=torch.float64))
    # slots left after every seen token (small data sets) go to the lowest ids: in a BPE
    # vocabulary lower ids are earlier merges, i.e. more frequent pieces. (The shipped
    # smollm2 draft predates this tie-break: its 1927 spare slots hold arbitrary ids.)
    cnt += 1e-3 * (1.0 - torch.arange(len(cnt), dtype=torch.float64) / len(cnt))
    special = set(tok.all_special_ids) | {0, 1, 2}
    for s in special:
        cnt[s] += 1e12
    kept = torch.topk(cnt, keep).indices.sort().values
    return kept


def _make_batches(records, max_tokens: int, rng: random.Random, max_len: int):
    """Length-bucketed batches of record indices (padded tokens <= max_tokens)."""
    order = sorted(range(len(records)), key=lambda i: (min(len(records[i]["ids"]), max_len), rng.random()))
    batches, cur, cur_max = [], [], 0
    for i in order:
        L = min(len(records[i]["ids"]), max_len)
        if cur and max(cur_max, L) * (len(cur) + 1) > max_tokens:
            batches.append(cur)
            cur, cur_max = [], 0
        cur.append(i)
        cur_max = max(cur_max, L)
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def _collate(records, idxs, t2k, max_len, prompt_weight):
    import torch

    L = max(min(len(records[i]["ids"]), max_len) for i in idxs)
    B = len(idxs)
    inp = torch.zeros(B, L, dtype=torch.long)
    att = torch.zeros(B, L, dtype=torch.long)
    tk = torch.full((B, L, TOPK), -1, dtype=torch.long)  # teacher ids in kept index space
    tl = torch.full((B, L, TOPK), -1e4, dtype=torch.float32)
    top1 = torch.full((B, L), -1, dtype=torch.long)  # teacher top-1 target id
    w = torch.zeros(B, L)
    is_resp = torch.zeros(B, L, dtype=torch.bool)
    for b, i in enumerate(idxs):
        r = records[i]
        n = min(len(r["ids"]), L)
        inp[b, :n] = r["ids"][:n].long()
        att[b, :n] = 1
        m = min(n, r["t_ids"].shape[0])  # positions with a teacher (all but last token)
        ids = r["t_ids"][:m].long()
        k = torch.where(ids >= 0, t2k[ids.clamp(min=0)], torch.full_like(ids, -1))
        tk[b, :m] = k
        tl[b, :m] = r["t_lps"][:m].float()
        top1[b, :m] = ids[:, 0]
        ww = torch.full((m,), prompt_weight)
        resp_from = r["n_prompt"] - 1  # position n_prompt-1 predicts the first response token
        ww[resp_from:] = 1.0
        w[b, :m] = ww
        is_resp[b, resp_from:m] = True
    return inp, att, tk, tl, top1, w, is_resp


def _loss_and_stats(body, head, kept, batch):
    import torch

    inp, att, tk, tl, top1, w, is_resp = batch
    hs = body(input_ids=inp, attention_mask=att).last_hidden_state
    # only positions with a teacher distribution go through the head (prompt positions
    # without cached teacher log-probs still shape the context through attention)
    sel = (tk >= 0).any(-1) & (w > 0) & (top1 >= 0)
    hs, tk, tl, top1, w, is_resp = hs[sel], tk[sel], tl[sel], top1[sel], w[sel], is_resp[sel]
    logits = head(hs)  # [N, Vk]
    logq = torch.log_softmax(logits.float(), dim=-1)
    valid = tk >= 0
    p = torch.where(valid, tl, torch.full_like(tl, -1e4))
    p = torch.softmax(p, dim=-1) * valid  # teacher top-k renormalised over kept tokens
    lq = torch.gather(logq, -1, tk.clamp(min=0))
    ce = -(p * lq).sum(-1)  # cross-entropy; + H(p) = KL(p || q)
    ent = -(p * torch.log(p.clamp(min=1e-12))).sum(-1)
    kl = ce - ent
    loss = (kl * w).sum() / w.sum().clamp(min=1e-6)
    with torch.no_grad():
        pred = kept[logits.argmax(-1)]
        agree = pred == top1
        stats = {
            "agree_resp": int((agree & is_resp).sum()), "n_resp": int(is_resp.sum()),
            "agree_all": int(agree.sum()), "n_all": int(agree.numel()),
            "kl_sum": float((kl * w).sum()), "w_sum": float(w.sum()),
        }
    return loss, stats


def evaluate(body, head, kept, records, t2k, max_len, max_tokens=4096):
    import torch

    body.eval()
    tot = {"agree_resp": 0, "n_resp": 0, "agree_all": 0, "n_all": 0, "kl_sum": 0.0, "w_sum": 0.0}
    rng = random.Random(0)
    with torch.no_grad():
        for idxs in _make_batches(records, max_tokens, rng, max_len):
            batch = _collate(records, idxs, t2k, max_len, 1.0)
            _, st = _loss_and_stats(body, head, kept, batch)
            for k in tot:
                tot[k] += st[k]
    body.train()
    return {
        "top1_agreement_response": tot["agree_resp"] / max(1, tot["n_resp"]),
        "top1_agreement_all": tot["agree_all"] / max(1, tot["n_all"]),
        "kl": tot["kl_sum"] / max(1e-9, tot["w_sum"]),
        "n_response_tokens": tot["n_resp"], "n_tokens": tot["n_all"],
    }


def _load_init(path):
    """A warm start: a train checkpoint (``ckpt.pt`` / ``best.pt``), or a shipped draft
    directory (``drafts/<name>/``: its ``draft.safetensors`` and ``draft.json``)."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file():
        return torch.load(path, weights_only=False)
    tensors = load_file(str(path / "draft.safetensors"))
    record = json.loads((path / "draft.json").read_text())
    body = {k[len("model."):]: v.float() for k, v in tensors.items() if k.startswith("model.")}
    return {"body": body, "head": {"weight": tensors["lm_head.weight"].float()},
            "kept": tensors["kept_token_ids"], "layers": record["layers"],
            "step": record["steps"], "t_used": 60 * record["train_minutes"]}


def stage_train(args) -> None:
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work)
    data = torch.load(work / "data.pt", weights_only=False)
    tok = AutoTokenizer.from_pretrained(args.target)
    recs = data["train"]
    # held-out sets by domain: stdlib/licence, chat, benchmark domain ("docs")
    held = {d: data.get(key, []) for d, key in (("stdlib", "eval"), ("chat", "eval_chat"), ("docs", "eval_docs"))}
    held = {d: rs for d, rs in held.items() if rs}
    kept_path = work / "kept_ids.pt"
    if kept_path.exists():
        kept = torch.load(kept_path)
    else:
        kept = choose_kept_vocab(recs, tok, args.keep_vocab)
        torch.save(kept, kept_path)
    t2k = torch.full((len(tok) if len(tok) > 49152 else 49152,), -1, dtype=torch.long)
    t2k[kept] = torch.arange(len(kept))
    cfg, body, head, kept = build_draft(args.target, args.layers, kept)
    params = [p for p in body.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))

    def coverage(rs):
        n = sum(len(r["ids"]) - r["n_prompt"] for r in rs)
        return float(sum((t2k[r["ids"][r["n_prompt"]:].long()] >= 0).sum() for r in rs)) / max(1, n)

    n_tr_tok = sum(len(r["ids"]) for r in recs)
    n_resp = sum(len(r["ids"]) - r["n_prompt"] for r in recs)
    by_domain = Counter(_domain(r["kind"]) for r in recs)
    log(f"train: {len(recs)} seqs ({by_domain['chat']} chat-domain, {by_domain['docs']} benchmark-domain), {n_tr_tok} tokens "
        f"({n_resp} response), kept vocab {len(kept)} covers {coverage(recs):.4f} of train response tokens, "
        "held-out: " + ", ".join(f"{d} {coverage(rs):.4f}" for d, rs in held.items()) + f"; {args.layers} layers")
    step, epoch, t_used = 0, 0, 0.0
    ck = work / "ckpt.pt"
    hist = []
    best = {}
    if not ck.exists() and args.init_from:
        # warm start: body as trained; head rows of tokens kept before copied by token id,
        # rows of newly kept tokens stay initialised from the tied embedding
        st = _load_init(args.init_from)
        assert st["layers"] == args.layers, (st["layers"], args.layers)
        missing, unexpected = body.load_state_dict(st["body"], strict=False)
        assert not unexpected and all(k.startswith("embed_tokens") for k in missing), (missing, unexpected)
        old_kept = st["kept"].long()
        old_row = {int(t): i for i, t in enumerate(old_kept)}
        rows = [(i, old_row[int(t)]) for i, t in enumerate(kept) if int(t) in old_row]
        with torch.no_grad():
            if rows:
                new_i, old_i = map(torch.tensor, zip(*rows))
                head.weight[new_i] = st["head"]["weight"][old_i].to(head.weight.dtype)
        log(f"train: warm start from {args.init_from} (step {st['step']}): body loaded, "
            f"{len(rows)}/{len(kept)} head rows from its head, {len(kept) - len(rows)} from the embedding")
        hist.append({"step": 0, "init_from": str(args.init_from), "init_steps": st["step"],
                     "init_minutes": round(st["t_used"] / 60, 1), "head_rows_reused": len(rows)})
    if ck.exists():
        st = torch.load(ck, weights_only=False)
        body.load_state_dict(st["body"])
        head.load_state_dict(st["head"])
        opt.load_state_dict(st["opt"])
        step, t_used, hist = st["step"], st["t_used"], st.get("hist", [])
        best.update(st.get("best", {}))
        log(f"train: resumed from step {step} ({t_used / 60:.1f} min used)")

    def lr_at(s):
        if s < args.warmup:
            return args.lr * (s + 1) / args.warmup
        prog = (s - args.warmup) / max(1, args.steps - args.warmup)
        if args.max_minutes:  # deadline-aware: decay over whichever budget runs out first
            prog = max(prog, t_used / (args.max_minutes * 60))
        prog = min(1.0, prog)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))

    def save(path=ck):
        tmp = path.with_suffix(".tmp")
        torch.save({"body": body.state_dict(), "head": head.state_dict(), "opt": opt.state_dict(),
                    "step": step, "t_used": t_used, "hist": hist, "kept": kept,
                    "layers": args.layers, "best": dict(best)}, tmp)
        os.replace(tmp, path)

    def eval_all(subset=None):
        """Held-out agreement per domain. The headline number (best-checkpoint criterion)
        is the benchmark domain's when the data has one (it is what the draft is for),
        else the mean over the domains."""
        out = {d: evaluate(body, head, kept, rs[:subset], t2k, args.max_len) for d, rs in held.items()}
        domains = ["docs"] if "docs" in out else list(held)
        for k in ("top1_agreement_response", "kl"):
            out[k] = sum(out[d][k] for d in domains) / len(domains)
        return out

    # deterministic batch order: epoch e uses Random(seed + e); resume skips done steps
    sched = []
    e = 0
    while len(sched) < args.steps:
        sched.extend(_make_batches(recs, args.batch_tokens, random.Random(args.seed + e), args.max_len))
        e += 1
    body.train()
    pbar = tqdm(total=args.steps, initial=step, desc="distill", dynamic_ncols=True, mininterval=5)
    ema_loss, ema_agree = None, None
    t_start = time.time() - t_used
    while step < args.steps:
        idxs = sched[step]
        batch = _collate(recs, idxs, t2k, args.max_len, args.prompt_weight)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss, st = _loss_and_stats(body, head, kept, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        a = st["agree_resp"] / max(1, st["n_resp"])
        ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
        ema_agree = a if ema_agree is None else 0.95 * ema_agree + 0.05 * a
        pbar.set_postfix(loss=f"{ema_loss:.3f}", agree=f"{ema_agree:.3f}", lr=f"{lr_at(step):.1e}")
        pbar.update(1)
        t_used = time.time() - t_start
        if step % args.ckpt_every == 0 or step == args.steps:
            hist.append({"step": step, "min": round(t_used / 60, 2), "loss": round(ema_loss, 4),
                         "agree_resp_train_ema": round(ema_agree, 4)})
            if args.eval_every and step % args.eval_every == 0:
                r = eval_all(args.eval_subset)
                hist[-1]["heldout"] = r
                if r["top1_agreement_response"] >= best.get("top1_agreement_response", -1):
                    best.clear()
                    best.update(r, step=step)
                    save(work / "best.pt")
                log(f"train: step {step} held-out top-1 agreement (response) "
                    f"{r['top1_agreement_response']:.4f} ("
                    + ", ".join(f"{d} {r[d]['top1_agreement_response']:.4f}" for d in held)
                    + f") kl {r['kl']:.3f}")
            save()
        if args.max_minutes and t_used > args.max_minutes * 60:
            log(f"train: --max-minutes reached at step {step}")
            save()
            break
    pbar.close()
    save()
    r = eval_all()
    for d, rs in held.items():
        x = r[d]
        log(f"train: FINAL held-out ({d}) teacher-forced top-1 agreement with the target: "
            f"response tokens {x['top1_agreement_response']:.4f} ({x['n_response_tokens']} tokens), "
            f"KL {x['kl']:.4f}, kept-vocab coverage {coverage(rs):.4f}")
    r["kept_vocab_coverage"] = {"train": coverage(recs), **{d: coverage(rs) for d, rs in held.items()}}
    by_task: dict[str, list] = {}  # benchmark-domain held-out agreement per task: where the draft is weak
    for rec in held.get("docs", []):
        by_task.setdefault(rec["kind"].removeprefix("docs:"), []).append(rec)
    r["docs_by_task"] = {t: evaluate(body, head, kept, rs, t2k, args.max_len) for t, rs in sorted(by_task.items())}
    if by_task:
        log("train: FINAL held-out (docs) agreement by task: " + ", ".join(
            f"{t} {x['top1_agreement_response']:.4f} ({x['n_response_tokens']} tokens)" for t, x in r["docs_by_task"].items()))
    (work / "final_eval.json").write_text(json.dumps({"step": step, "minutes": t_used / 60, **r}, indent=1))


# --------------------------------------------------------------------------------------
# Stage: export (what differs from the target) and assemble (full vLLM checkpoint)
# --------------------------------------------------------------------------------------

def _domain(kind: str) -> str:
    return "docs" if kind.startswith("docs:") else "chat" if is_chat_kind(kind) else "stdlib"


def _kind_tokens(records) -> dict[str, int]:
    """Response tokens per prompt kind (``docs:summarization``, ``task:count``, ...)."""
    out = Counter()
    for r in records:
        out[r["kind"]] += len(r["ids"]) - r["n_prompt"]
    return dict(sorted(out.items()))


def _data_sources(records, args) -> list[str]:
    """What the training records were made from, for ``draft.json``."""
    domains = {_domain(r["kind"]) for r in records}
    kinds = {r["kind"] for r in records}
    out = []
    if "stdlib" in domains:
        out += ["Python stdlib docstrings/sources (%s)" % sys.version.split()[0], "/usr/share/common-licenses"]
    if "magpie" in kinds:
        out.append(f"chat: Magpie-style user turns sampled from the target (temperature "
                   f"{args.magpie_temperature}, top-p 0.95, seeded), answers <= {args.chat_max_new_tokens} new tokens")
    if any(k.startswith("task:") for k in kinds):
        out.append("chat: templated short tasks (counting, days/months/letters, arithmetic, yes/no, rewrites, "
                   f"word games, tiny Python functions), answers <= {args.chat_max_new_tokens} new tokens")
    if "docs" in domains:
        out.append("benchmark domain: vllm_cmasd.bench.prompts.training_prompts() -- the benchmark's "
                   "summarization / translation / instruction templates on package READMEs and docstrings, "
                   "Debian READMEs and man pages, every document of a benchmark prompt left out; answers <= "
                   f"{args.docs_max_new_tokens} new tokens")
    return out


def stage_export(args) -> None:
    import torch
    from safetensors.torch import save_file

    work = Path(args.work)
    st = torch.load(work / args.export_from, weights_only=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in st["body"].items():
        if k.startswith("embed_tokens") or "rotary" in k:
            continue  # shared with the target, not stored
        tensors["model." + k] = v.to(torch.bfloat16).contiguous()
    tensors["lm_head.weight"] = st["head"]["weight"].to(torch.bfloat16).contiguous()
    tensors["kept_token_ids"] = st["kept"].to(torch.int64).contiguous()
    save_file(tensors, str(out / "draft.safetensors"))
    fe = {}
    if (work / "final_eval.json").exists():
        fe = json.loads((work / "final_eval.json").read_text())
    data = torch.load(work / "data.pt", weights_only=False)
    by_domain = Counter(_domain(r["kind"]) for r in data["train"])
    rec = {
        "architecture": DRAFT_ARCH,
        "layers": st["layers"],
        "layer_init": f"target layers 0..{st['layers'] - 1}",
        "keep_vocab": int(len(st["kept"])),
        "steps": st["step"],
        "train_minutes": round(st["t_used"] / 60, 1),
        "seed": args.seed,
        "threads": args.threads,
        "init_from": args.init_from or None,
        "hparams": {k: getattr(args, k) for k in ("lr", "warmup", "steps", "max_minutes", "batch_tokens",
                                                    "max_len", "keep_vocab", "layers", "init_from")},
        "data": {
            "sources": _data_sources(data["train"], args),
            "train_seqs_by_domain": {d: by_domain[d] for d in ("stdlib", "chat", "docs")},
            **{f"{split}_seqs": len(data.get(split, [])) for split in ("eval_chat", "eval_docs")},
            **{f"{split}_response_tokens": int(sum(len(r["ids"]) - r["n_prompt"] for r in data.get(split, [])))
               for split in ("eval_chat", "eval_docs")},
            "train_response_tokens_by_kind": _kind_tokens(data["train"]),
            "teacher": (f"target greedy responses via vLLM (chat template, new-token caps as in sources); "
                        f"target top-{TOPK} log-probs cached at response positions"
                        + (" and prompt positions" if args.prompt_logprobs else
                           " (prompt positions: context only)")),
            "train_seqs": len(data["train"]), "eval_seqs": len(data["eval"]),
            "train_tokens": int(sum(len(r["ids"]) for r in data["train"])),
            "train_response_tokens": int(sum(len(r["ids"]) - r["n_prompt"] for r in data["train"])),
            "eval_tokens": int(sum(len(r["ids"]) for r in data["eval"])),
            "eval_response_tokens": int(sum(len(r["ids"]) - r["n_prompt"] for r in data["eval"])),
        },
        "heldout_final": fe,
        "history": st.get("hist", []),
    }
    (out / "draft.json").write_text(json.dumps(rec, indent=1))
    log(f"export: wrote {out}/draft.safetensors and draft.json")


def assemble_draft(target_dir, drafts_dir, out_dir) -> Path:
    """Build the full vLLM-loadable draft checkpoint in ``out_dir`` from the target
    checkpoint (embeddings, tokenizer, config) and the shipped trained tensors in
    ``drafts_dir`` (``draft.safetensors`` + ``draft.json``). Idempotent, atomic."""
    import torch
    from safetensors.torch import load_file, save_file

    target_dir, drafts_dir, out_dir = Path(target_dir), Path(drafts_dir), Path(out_dir)
    rec = json.loads((drafts_dir / "draft.json").read_text())
    small = load_file(str(drafts_dir / "draft.safetensors"))
    tsd = _load_target_state(target_dir)
    emb = tsd.get("model.embed_tokens.weight")
    if emb is None:
        emb = tsd["embed_tokens.weight"]
    cfg = json.loads((target_dir / "config.json").read_text())
    cfg["architectures"] = [DRAFT_ARCH]
    cfg["num_hidden_layers"] = int(rec["layers"])
    cfg["tie_word_embeddings"] = False
    cfg["draft_vocab_size"] = int(small["kept_token_ids"].numel())
    cfg["dtype"] = "float32"
    tensors = {"model.embed_tokens.weight": emb.float().contiguous()}
    for k, v in small.items():
        tensors[k] = v if k == "kept_token_ids" else v.float().contiguous()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in TOKENIZER_FILES:
        if (target_dir / f).exists():
            shutil.copy2(target_dir / f, tmp / f)
    (tmp / "cmasd_draft.json").write_text(json.dumps({"from": str(drafts_dir), "record": {
        k: rec.get(k) for k in ("architecture", "layers", "keep_vocab", "steps", "heldout_final")}}, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir

# --------------------------------------------------------------------------------------
# Stage: bench (vLLM: plain target, plain draft, draft_model speculative decoding)
# --------------------------------------------------------------------------------------

def _bench_prompts(args, tok):
    """``--bench-set heldout``: the first ``--bench-prompts`` held-out stdlib/licence
    prompts; ``heldout-chat``: held-out chat-domain prompts (Magpie + templated tasks);
    ``heldout-docs``: held-out benchmark-domain prompts (documents no benchmark prompt uses);
    ``benchmark``: the first ``--bench-per-task`` prompts of every task of the plugin's
    fixed benchmark (``vllm_cmasd/bench/prompts.json``, never used for training).
    Returns ``(task or kind, prompt ids)`` pairs, grouped by task."""
    work = Path(args.work)
    if args.bench_set == "benchmark":
        tasks = json.loads((REPO_ROOT / "vllm_cmasd/bench/prompts.json").read_text())["tasks"]
        out = []
        for task, plist in tasks.items():
            n = 0
            for p in plist:
                ids = _chat_ids(tok, p["prompt"], args.max_prompt_tokens)
                if ids is not None and n < args.bench_per_task:
                    out.append((task, ids))
                    n += 1
        return out
    pj = json.loads((work / "prompts.json").read_text())
    src = {"heldout": pj["eval"], "heldout-chat": pj.get("eval_chat", []),
           "heldout-docs": pj.get("eval_docs", [])}[args.bench_set]
    out = []
    for p in src:  # held-out: never seen in training (split by source item)
        ids = _chat_ids(tok, p["prompt"], args.max_prompt_tokens)
        if ids is not None:
            out.append((p["kind"].removeprefix("docs:"), ids))
        if len(out) >= args.bench_prompts:
            break
    return sorted(out, key=lambda item: item[0])


def _timed_generate(llm, prompts, sp, batch1: bool):
    t0 = time.perf_counter()
    n = 0
    if batch1:
        for ids in prompts:
            o = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0]
            n += len(o.outputs[0].token_ids)
    else:
        for o in llm.generate([{"prompt_token_ids": ids} for ids in prompts], sp, use_tqdm=False):
            n += len(o.outputs[0].token_ids)
    dt = time.perf_counter() - t0
    return n, dt


def stage_bench(args) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    sys.path.insert(0, str(REPO_ROOT))
    from vllm_cmasd.draft_model import register
    from vllm_cmasd.engines import llm_kwargs, shutdown, spec_decode_counters

    register()
    tok = AutoTokenizer.from_pretrained(args.target)
    groups: dict[str, list] = {}
    for group, ids in _bench_prompts(args, tok):
        groups.setdefault(group, []).append(ids)
    prompts = [ids for plist in groups.values() for ids in plist]
    sp = SamplingParams(temperature=0.0, max_tokens=args.bench_tokens, ignore_eos=False)
    warm = SamplingParams(temperature=0.0, max_tokens=8)
    draft = args.assemble_to
    common = dict(gpu_memory_utilization=args.gpu_mem, seed=args.seed,
                  max_model_len=args.max_prompt_tokens + args.bench_tokens + 16)
    res = {"card": "CPU (2 cores shared; torch threads as set by vLLM)", "prompts": len(prompts),
           "prompt_set": args.bench_set, "max_tokens": args.bench_tokens, "draft_checkpoint": str(draft)}
    runs = [("target", llm_kwargs(args.target, **common)), ("draft", llm_kwargs(draft, **common)),
            ("spec", llm_kwargs(args.target, draft=draft, num_speculative_tokens=args.bench_k, **common))]
    outs = {}
    for name, kw in runs:
        if args.bench_only and name not in args.bench_only.split(","):
            continue
        llm = LLM(**kw)
        _timed_generate(llm, prompts[:1], warm, True)
        n, dt, by_group = 0, 0.0, {}
        for group, plist in groups.items():
            before = spec_decode_counters(llm) if name == "spec" else None
            gn, gdt = _timed_generate(llm, plist, sp, True)
            n, dt = n + gn, dt + gdt
            by_group[group] = {"prompts": len(plist), "tok_per_s": round(gn / gdt, 2)}
            if name == "spec":
                c = spec_decode_counters(llm)
                d = c["num_drafts"] - before["num_drafts"]
                a = c["num_accepted_tokens"] - before["num_accepted_tokens"]
                by_group[group].update(num_drafts=d, num_accepted_tokens=a,
                                       mean_acceptance_length=round(1 + a / d, 3) if d else None)
        r = {"tokens": n, "seconds": round(dt, 2), "tok_per_s": round(n / dt, 2),
             "ms_per_token": round(1000 * dt / n, 2), "by_task": by_group}
        if name == "spec":
            d = sum(g["num_drafts"] for g in by_group.values())
            a = sum(g["num_accepted_tokens"] for g in by_group.values())
            r.update(num_drafts=d, num_accepted_tokens=a,
                     mean_acceptance_length=round(1 + a / d, 3) if d else None,
                     accepted_per_position=spec_decode_counters(llm).get("accepted_per_position"))
        outs[name] = r
        log(f"bench: {name}: {r}")
        shutdown(llm)
    res.update(outs)
    if "target" in outs and "draft" in outs:
        res["draft_cost_per_token_vs_target_step"] = round(
            outs["draft"]["ms_per_token"] / outs["target"]["ms_per_token"], 4)
    if "target" in outs and "spec" in outs:
        res["speedup"] = round(outs["spec"]["tok_per_s"] / outs["target"]["tok_per_s"], 3)
        res["speedup_by_task"] = {g: round(outs["spec"]["by_task"][g]["tok_per_s"] / t["tok_per_s"], 3)
                                  for g, t in outs["target"]["by_task"].items()}
    log(f"bench: {json.dumps(res)}")
    out = Path(args.bench_out) if args.bench_out else Path(args.work) / "bench.json"
    out.write_text(json.dumps(res, indent=1))


def _shingles(text: str, n: int = 8) -> set[int]:
    words = re.findall(r"\w+", text.lower())
    return {hash(tuple(words[i:i + n])) for i in range(len(words) - n + 1)}


def stage_overlap(args) -> None:
    """How much of each benchmark prompt the training data hold: the share of its 8-word
    shingles found in the work dir's answered training prompts, leaving out shingles
    that 20+ training prompts share (the templates' own words). The exclusion rules work
    on documents and identical paragraphs; this also catches near-duplicate text.
    Writes ``overlap.json`` to the work dir."""
    import torch

    work = Path(args.work)
    records = torch.load(work / "data.pt", weights_only=False)
    answered = {r["sid"] for r in records["train"]}
    pj = json.loads((work / "prompts.json").read_text())
    train_prompts = {q["prompt"] for qs in pj.values() for q in qs if q["sid"] in answered}
    seen = Counter()
    for prompt in train_prompts:
        seen.update(_shingles(prompt))
    tasks = json.loads((REPO_ROOT / "vllm_cmasd/bench/prompts.json").read_text())["tasks"]
    rows = []
    for task, plist in tasks.items():
        for q in plist:
            own = {h for h in _shingles(q["prompt"]) if seen[h] < 20}
            hit = sum(1 for h in own if seen[h])
            rows.append({"id": q["id"], "task": task, "shingles": len(own),
                         "share_in_training": round(hit / max(len(own), 1), 4)})
    rows.sort(key=lambda r: -r["share_in_training"])
    shares = [r["share_in_training"] for r in rows]
    summary = {"prompts": len(rows), "training_prompts": len(train_prompts),
               "mean_share": round(sum(shares) / len(shares), 4),
               "prompts_with_share": {f">={t}": sum(x >= t for x in shares) for t in (0.5, 0.2, 0.05)},
               "top": rows[:8]}
    (work / "overlap.json").write_text(json.dumps({"summary": summary, "prompts": rows}, indent=1))
    log("overlap: " + json.dumps(summary))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["data", "train", "export", "assemble", "bench", "overlap", "all"])
    ap.add_argument("--target", default=str(REPO_ROOT / "models/smollm2-135m-instruct"))
    ap.add_argument("--work", default=str(REPO_ROOT / "models/.cache/draft-train"))
    ap.add_argument("--out", default=str(REPO_ROOT / "drafts" / DEFAULT_DRAFT_NAME))
    ap.add_argument("--assemble-to", default=str(REPO_ROOT / "models" / DEFAULT_DRAFT_NAME))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1)
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
    # bench
    ap.add_argument("--bench-prompts", type=int, default=8)
    ap.add_argument("--bench-tokens", type=int, default=96)
    ap.add_argument("--bench-k", type=int, default=4)
    ap.add_argument("--bench-only", default="", help="comma list of target,draft,spec")
    ap.add_argument("--bench-set", default="heldout", choices=["heldout", "heldout-chat", "heldout-docs", "benchmark"])
    ap.add_argument("--bench-per-task", type=int, default=4)
    ap.add_argument("--bench-out", default="")
    args = ap.parse_args(argv)
    if args.stage in ("data", "all"):
        stage_data(args)
    if args.stage in ("train", "all"):
        stage_train(args)
    if args.stage in ("export", "all"):
        stage_export(args)
    if args.stage in ("assemble", "all"):
        p = assemble_draft(args.target, args.out, args.assemble_to)
        log(f"assemble: {p}")
    if args.stage == "bench":
        stage_bench(args)
    if args.stage == "overlap":
        stage_overlap(args)


if __name__ == "__main__":
    main()
