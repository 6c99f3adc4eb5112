"""The prompts the target answers in stage ``data``, from text that exists offline on
every machine here. Each source is split train / held-out by a fixed hash of its *source
item* (:func:`~vllm_cmasd.training.common.stable_hash`), so a held-out paragraph,
function or document never appears in training under any template.

* Stdlib / licence (:func:`build_prompts`): instruction prompts ("Explain what this
  Python function does", "Summarize: <paragraph>", "Translate to French: <sentence>",
  "Continue this text: ...", ...) on Python standard-library sources/docstrings and
  Debian's /usr/share/common-licenses.
* Chat domain (``--chat 1``, default), because the stdlib/licence prompts alone leave
  the draft out of domain on ordinary chat (0% agreement on "count from 1 to 40"):
  (a) Magpie-style user turns (:func:`magpie_prompts`) -- the target continues the
  chat-template prefix of a user turn (``<|im_start|>system ...<|im_end|>
  <|im_start|>user\\n``) at temperature 1.0 / top-p 0.95 with a fixed seed per request,
  stopped at ``<|im_end|>`` (<= 80 tokens; ``--magpie-n``, ``--magpie-minutes``),
  filtered (length, words, letters, repetition, template tokens) and deduplicated,
  anything shaped like / equal to a benchmark prompt (``vllm_cmasd/bench/prompts.json``)
  dropped; (b) deterministic templated short tasks from parameters
  (:func:`task_prompts`: counting ranges, days / months / letters, arithmetic, yes/no
  questions, short rewrites, word games, tiny Python functions). Both are split by a
  hash of the item id.
* Benchmark domain (:func:`docs_prompts`): the plugin benchmark's own summarization /
  translation / instruction templates on package READMEs and docstrings, Debian READMEs
  and man pages, with every document a benchmark prompt comes from (all versions, all
  languages of a man page, a package's docstrings with its README) and every passage
  quoted in one left out (:func:`vllm_cmasd.bench.prompts.training_prompts`); split by a
  hash of the document.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import re
import time
from pathlib import Path

from vllm_cmasd.bench.prompts import TASKS, training_prompts
from vllm_cmasd.training.common import REPO_ROOT, log, stable_hash

# --------------------------------------------------------------------------------------
# Offline text -> instruction prompts
# --------------------------------------------------------------------------------------

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
        (held if (stable_hash(it[0]) % 1000) < eval_frac * 1000 else train).append(it)
    rng = random.Random(seed)
    # balance: licenses are few, stdlib many; sample items in a fixed order
    def sample(pool, n):
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
    pages (the benchmark's own kinds of document) come before those on docstrings.
    Each part shuffles with a generator of its own: with one shared, a training pool a
    few documents larger (the ``data`` stage's, whose vLLM import put setuptools'
    vendored distributions on the path) drew another held-out set (7 of 96 in common
    with the ``prompts`` stage's)."""

    mix = mix or {t: 1 for t in TASKS}
    split = {"train": {t: [] for t in TASKS}, "eval": {t: [] for t in TASKS}}
    for q in training_prompts():
        part = "eval" if (stable_hash(q["origin"]) % 1000) < eval_frac * 1000 else "train"
        split[part][q["task"]].append({"sid": f"docs:{q['source']}", "kind": f"docs:{q['task']}",
                                       "prompt": q["prompt"]})
    out = []
    for part in ("train", "eval"):
        rng = random.Random(f"{seed + 23}:{part}")
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
