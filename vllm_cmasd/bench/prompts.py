"""The benchmark's fixed prompts: extracted once from offline text, committed as JSON.

The prompts live in ``prompts.json`` next to this file, each with the source it
came from. The benchmark only ever reads that file; nothing is extracted or
downloaded at run time. :func:`extract` rebuilds it (``python -m
vllm_cmasd.bench.prompts --write``) and is kept so the extraction is
reviewable and repeatable; bump ``PROMPTS_VERSION`` whenever the committed
set changes.

Sources: :mod:`vllm_cmasd.bench.sources` (package READMEs, Debian READMEs, man
pages; never the draft's first training text, and no licence text); templates:
:mod:`vllm_cmasd.bench.templates`. (The draft's later training data come from
:func:`training_prompts`: this benchmark's templates on other documents, none of
the benchmark's own.)

Tasks: ``summarization`` (a 120-320 word passage), ``translation`` (English
passages into French/German/Spanish, and German/French/Spanish man-page
passages into English) and ``instruction`` (open-ended requests built around a
real package summary or command description).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from vllm_cmasd.bench.sources import (
    Passage,
    Pools,
    debian_doc_passages,
    english_prose,
    load_pools,
    manpage_english_passages,
    origin_key,
    package_doc_file_passages,
    python_doc_passages,
    shares_paragraph,
    stable_key,
)
from vllm_cmasd.bench.templates import (
    COMMAND_TEMPLATES,
    PACKAGE_TEMPLATES,
    SUMMARIZATION_TEMPLATE,
    instruction_prompt,
    translation_prompt,
)

# The public API. origin_key and shares_paragraph (documents) and SUMMARIZATION_TEMPLATE
# are re-exported: the training code and the tests import them from here.
__all__ = [
    "PER_TASK", "PROMPTS_FILE", "PROMPTS_VERSION", "SUMMARIZATION_TEMPLATE", "TASKS", "TUNING_PROMPTS",
    "benchmark_origins", "benchmark_paragraphs", "extract", "heldout_docs", "load_prompts", "main", "origin_key",
    "shares_paragraph", "training_prompts",
]

PROMPTS_FILE = Path(__file__).with_name("prompts.json")
PROMPTS_VERSION = 1
TASKS: tuple[str, ...] = ("summarization", "translation", "instruction")
PER_TASK = 32


# Short chat tasks for tuning CM-ASD's defaults (scripts/tune_threshold.py) and
# fitting the draft's calibration warm start (scripts/fit_calibration.py). The
# benchmark never uses them: what it measures was chosen on other prompts.
TUNING_PROMPTS = [
    "Name three countries in South America and their capitals.",
    "Explain what a compiler does in three sentences.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Give me five tips for sleeping better.",
    "What is the difference between weather and climate?",
    "Write a short thank-you note to a colleague who helped me move.",
    "List the planets of the solar system in order from the sun.",
    "Describe how to make a cup of tea, step by step.",
    "Summarize the water cycle for a ten-year-old.",
    "Translate 'Where is the train station?' into French and Spanish.",
    "Write a haiku about autumn leaves.",
    "What are the main causes of inflation? Answer briefly.",
    "Write a SQL query that counts orders per customer.",
    "Give three arguments for and against working from home.",
    "Explain recursion with a simple example.",
    "Draft a polite email asking a landlord to fix a leaking tap.",
]


# ---------------------------------------------------------------------------
# Loading (what the benchmark uses)


def load_prompts(path: str | Path | None = None) -> dict:
    """The committed prompt set: {"version", "tasks": {task: [{"id", "prompt", "source"}]}}."""
    with open(path or PROMPTS_FILE, encoding="utf-8") as f:
        data = json.load(f)
    for task in TASKS:
        if not data["tasks"].get(task):
            raise ValueError(f"{path or PROMPTS_FILE}: no prompts for task {task!r}")
    return data


# ---------------------------------------------------------------------------
# Prompt construction


def _pick(passages: list[Passage], n: int, salt: str, per_origin: int = 1) -> list[Passage]:
    """n passages in a stable pseudo-random order, at most per_origin from one package/file."""
    ordered = sorted(passages, key=lambda p: stable_key(salt, p.source))
    picked, counts = [], {}
    for p in ordered:
        origin = p.source.split("#")[0].split("==")[0]
        if counts.get(origin, 0) >= per_origin:
            continue
        counts[origin] = counts.get(origin, 0) + 1
        picked.append(p)
        if len(picked) == n:
            break
    return picked


def _span(origin: str, run: list[tuple[int, Passage]]) -> Passage:
    first, last = run[0][0], run[-1][0]
    span = f"#paragraph{first}" if first == last else f"#paragraphs{first}-{last}"
    return Passage("\n\n".join(q.text for _, q in run), origin + span)


def _by_origin(passages: list[Passage]) -> list[tuple[str, list[tuple[int, Passage]]]]:
    by_origin: dict[str, list[tuple[int, Passage]]] = {}
    for p in passages:
        origin, _, para = p.source.partition("#paragraph")
        by_origin.setdefault(origin, []).append((int(para), p))
    return [(origin, sorted(items, key=lambda item: item[0])) for origin, items in sorted(by_origin.items())]


def _summarization_windows(passages: list[Passage], per_file: int | None = None) -> list[Passage]:
    """Like :func:`_summarization_documents`, but a run starts at every paragraph and
    steps over the code, lists and tables between prose paragraphs (overlapping
    windows: more distinct summaries per document, for training). ``per_file``: at
    most that many windows per file, spread evenly over it."""
    out = []
    for origin, items in _by_origin(passages):
        starts = range(len(items))
        if per_file is not None and len(items) > per_file:
            starts = range(0, len(items), math.ceil(len(items) / per_file))
        for start in starts:
            run, words = [], 0
            for index, p in items[start:]:
                n = len(p.text.split())
                if words + n > 320:
                    break
                run.append((index, p))
                words += n
            if words >= 120:
                out.append(_span(origin, run))
    return out


def _summarization_documents(passages: list[Passage]) -> list[Passage]:
    """Runs of consecutive prose paragraphs from one document, 120-320 words."""
    out = []
    for origin, items in _by_origin(passages):
        run: list[tuple[int, Passage]] = []
        for index, p in items + [(-10, None)]:  # sentinel flushes the last run
            words = sum(len(q.text.split()) for _, q in run)
            contiguous = run and index == run[-1][0] + 1
            if p is not None and (not run or contiguous) and words + len(p.text.split()) <= 320:
                run.append((index, p))
                continue
            if 120 <= words <= 320:
                out.append(_span(origin, run))
            run = [(index, p)] if p is not None else []
    return out


def benchmark_origins(benchmark: dict | None = None) -> set[str]:
    """The :func:`origin_key` of every document a benchmark prompt comes from
    (default: the committed prompt set)."""
    return {origin_key(q["source"]) for items in (benchmark or load_prompts())["tasks"].values() for q in items}


def benchmark_paragraphs(benchmark: dict | None = None, pools: Pools | None = None) -> set[str]:
    """Every paragraph of every document a benchmark prompt comes from. A training text
    sharing one is left out even where another package ships the same file under
    another name (libffi8 and libffi-dev carry one README)."""
    origins, pools = benchmark_origins(benchmark), pools or load_pools()
    return {p.text for p in pools.pypi + pools.debian + pools.foreign if origin_key(p.source) in origins}


def extract(per_task: int = PER_TASK) -> dict:
    """Build the prompt set from this machine's offline text (see the module doc)."""
    pools = load_pools()
    pypi, debian, foreign, names = pools.pypi, pools.debian, pools.foreign, pools.names

    tasks: dict[str, list[dict]] = {task: [] for task in TASKS}

    def add(task: str, prompt: str, passage: Passage, **extra) -> None:
        tasks[task].append(
            {"id": f"{task[:3]}-{len(tasks[task]):02d}", "prompt": prompt, "source": passage.source, **extra}
        )

    # Summarization: 2/3 Python package READMEs, 1/3 Debian READMEs.
    n_debian = per_task // 3
    docs = _pick(_summarization_documents(debian), n_debian, "sum-debian")
    docs += _pick(_summarization_documents(pypi), per_task - len(docs), "sum-pypi")
    for p in docs:
        add("summarization", SUMMARIZATION_TEMPLATE.format(text=p.text), p)

    # Translation: half English -> fr/de/es, half de/fr/es man pages -> English.
    n_foreign = per_task // 2
    by_lang = {lang: [p for p in foreign if p.source.endswith(":" + lang)] for lang in ("de", "fr", "es")}
    chosen: list[tuple[Passage, str, str]] = []
    for i, lang in enumerate(("de", "fr", "es")):
        count = n_foreign // 3 + (i < n_foreign % 3)
        chosen += [(p, lang, "en") for p in _pick(by_lang[lang], count, f"tr-{lang}", per_origin=1)]
    english = [p for p in pypi + debian if len(p.text.split()) <= 90]
    for i, p in enumerate(_pick(english, per_task - len(chosen), "tr-en")):
        chosen.append((p, "en", ("fr", "de", "es")[i % 3]))
    for p, src, dst in chosen:
        prompt = translation_prompt(p.text, src, dst)
        add("translation", prompt, p, source_language=src, target_language=dst)

    # Open-ended instructions around real package summaries and command descriptions.
    half = per_task // 2
    for i, p in enumerate(_pick(pools.summaries, half, "ins-pypi")):
        add("instruction", instruction_prompt(PACKAGE_TEMPLATES, i, p), p)
    for i, p in enumerate(_pick(names, per_task - half, "ins-man")):
        add("instruction", instruction_prompt(COMMAND_TEMPLATES, i, p), p)

    for task, items in tasks.items():
        if len(items) < per_task:
            raise RuntimeError(f"only {len(items)} {task} prompts found (wanted {per_task})")
    # Interleave source kinds so the first prompts of each task (the quick
    # preset's) already mix sources.
    for task, items in tasks.items():
        kinds: dict[str, list[dict]] = {}
        for item in items:
            kinds.setdefault(item["source"].split(":")[0] + item.get("source_language", ""), []).append(item)
        mixed, queues = [], list(kinds.values())
        while any(queues):
            for queue in queues:
                if queue:
                    mixed.append(queue.pop(0))
        for i, item in enumerate(mixed):
            item["id"] = f"{task[:3]}-{i:02d}"
        tasks[task] = mixed
    return {
        "version": PROMPTS_VERSION,
        "description": "Fixed CM-ASD benchmark prompts (user turns; the chat template is applied at run time). "
        "Built by vllm_cmasd.bench.prompts.extract(); sources in docs/notes/benchmark.md.",
        "tasks": tasks,
    }


def training_prompts(
    benchmark: dict | None = None, english_man_pages: int = 1000, python_doc_files: int | None = None
) -> list[dict]:
    """Prompts in the benchmark's tasks and templates from this machine's offline text,
    none of them the benchmark's: ``{"task", "prompt", "source", "origin"}``, for
    training a draft on the benchmark's domain. Left out: every document a benchmark
    prompt comes from (:func:`origin_key`: all versions of a package, its docstrings too,
    all documents of a Debian package, every language of a man page), any passage whose
    text occurs in a benchmark prompt, and any passage sharing a paragraph with one of
    those documents (files shipped by several packages). More than the benchmark's pool:
    summaries of overlapping windows of each document (a run of paragraphs from every
    paragraph on), of single paragraphs of 60+ words, of the installed packages'
    docstrings, and of the other text documents packages ship (guides and notes under
    site-packages and /usr/share/doc); English man-page paragraphs; every instruction
    template for each package or command; one translation direction per English
    passage, chosen by a hash of its source. ``benchmark``: the prompt set to keep
    unseen (default: the committed one);
    ``english_man_pages``: how many English man pages to render; ``python_doc_files``:
    at most that many source files for docstrings (None: all, 0: none)."""
    benchmark = benchmark or load_prompts()
    bench = [q for items in benchmark["tasks"].values() for q in items]
    exclude_origins = benchmark_origins(benchmark)
    bench_text = "\0".join(q["prompt"] for q in bench)
    pools = load_pools()
    bench_paragraphs = benchmark_paragraphs(benchmark, pools)
    out: list[dict] = []
    seen: set[str] = set()

    def add(task: str, prompt: str, passage: Passage) -> None:
        origin = origin_key(passage.source)
        if (
            origin in exclude_origins or prompt in seen
            or passage.text.split("\t")[-1] in bench_text
            or shares_paragraph(passage.text, bench_paragraphs)
        ):
            return
        seen.add(prompt)  # the same paragraph can sit in several packages or windows
        out.append({"task": task, "prompt": prompt, "source": passage.source, "origin": origin})

    def variant(passage: Passage, n: int) -> int:
        return int(stable_key("train", passage.source), 16) % n

    man = manpage_english_passages(english_man_pages)
    pydoc = python_doc_passages(python_doc_files)
    english = pools.pypi + pools.debian + man
    documents = sum((_summarization_windows(ps) for ps in (pools.debian, pools.pypi, man, pydoc)), [])
    documents += [p for p in english + pydoc if len(p.text.split()) >= 60]
    # Guides and notes beside the READMEs: summaries only, capped per file and per
    # package so a few large manuals (nodejs) do not dominate.
    guides = english_prose(package_doc_file_passages() + debian_doc_passages(readme_only=False))
    guide_documents = _summarization_windows(guides, per_file=40) + [p for p in guides if len(p.text.split()) >= 60]
    guide_documents.sort(key=lambda p: stable_key("guides", p.source))
    per_origin: dict[str, int] = {}
    for p in guide_documents:
        origin = origin_key(p.source)
        per_origin[origin] = per_origin.get(origin, 0) + 1
        if per_origin[origin] <= 300:
            documents.append(p)
    for p in documents:
        add("summarization", SUMMARIZATION_TEMPLATE.format(text=p.text), p)
    for p in pools.foreign:
        add("translation", translation_prompt(p.text, p.source.rsplit(":", 1)[1], "en"), p)
    for p in english:
        if len(p.text.split()) <= 90:
            add("translation", translation_prompt(p.text, "en", ("fr", "de", "es")[variant(p, 3)]), p)
    for templates, names in ((PACKAGE_TEMPLATES, pools.summaries), (COMMAND_TEMPLATES, pools.names)):
        for p in names:
            for i in range(len(templates)):
                add("instruction", instruction_prompt(templates, i, p), p)
    return out


def heldout_docs(per_task: int = PER_TASK) -> dict:
    """A prompt set like the committed one, on the documents every training
    stage holds out: the held-out part of the training pool
    (:func:`training_prompts`, split by a hash of each document in
    ``training.sources.docs_prompts``), READMEs and man pages first. For a
    drafter's acceptance on unseen text of the benchmark's kinds (``vllm-cmasd
    bench --prompts``); built on this machine's offline text."""
    from vllm_cmasd.training.sources import docs_prompts  # training imports this module

    _, held_out = docs_prompts(seed=0)  # the seed orders each part; the split is the hash's
    tasks: dict[str, list[dict]] = {task: [] for task in TASKS}
    for q in held_out:
        task = q["kind"].removeprefix("docs:")
        if len(tasks[task]) < per_task:
            tasks[task].append({"id": f"{task[:3]}-held-{len(tasks[task]):02d}", "prompt": q["prompt"],
                                "source": q["sid"].removeprefix("docs:")})
    return {"version": PROMPTS_VERSION, "tasks": tasks,
            "description": "Held-out documents of the training pool (vllm_cmasd.bench.prompts.heldout_docs): "
            "the benchmark's templates on documents the training stages hold out."}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Extract the benchmark prompts from offline text.")
    parser.add_argument("--write", action="store_true", help=f"overwrite {PROMPTS_FILE.name}")
    parser.add_argument("--out", default=None, help="write here instead")
    parser.add_argument("--per-task", type=int, default=PER_TASK)
    parser.add_argument("--heldout-docs", action="store_true",
                        help="the training pool's held-out documents instead (heldout_docs); use with --out")
    args = parser.parse_args(argv)
    if args.heldout_docs and args.write:
        parser.error("--heldout-docs writes a set of its own: give --out, not --write")
    data = heldout_docs(args.per_task) if args.heldout_docs else extract(args.per_task)
    text = json.dumps(data, indent=1, ensure_ascii=False) + "\n"
    if args.write or args.out:
        Path(args.out or PROMPTS_FILE).write_text(text, encoding="utf-8")
        print(f"wrote {args.out or PROMPTS_FILE}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
