"""The benchmark's fixed prompts: extracted once from offline text, committed as JSON.

The prompts live in ``prompts.json`` next to this file, each with the source it
came from. The benchmark only ever reads that file; nothing is extracted or
downloaded at run time. :func:`extract` rebuilds it (``python -m
vllm_cmasd.bench.prompts --write``) and is kept so the extraction is
reviewable and repeatable; bump ``PROMPTS_VERSION`` whenever the committed
set changes.

Sources (all present offline on the project's Debian 12 CPU machines; see
docs/notes/benchmark.md). The draft model was first trained on Python
standard-library docstrings and /usr/share/common-licenses, so neither is used,
and paragraphs that read like licence text are dropped everywhere. (Its later
training data come from :func:`training_prompts`: this benchmark's templates on
other documents, none of the benchmark's own.)

* ``pypi-metadata``: long descriptions (README) in the METADATA of the Python
  packages installed in the project's venv (pip installs them with vLLM).
* ``debian-doc``: README files under /usr/share/doc/<package>/.
* ``manpage``: manual pages under /usr/share/man, English NAME lines and the
  German, French and Spanish translations, rendered with ``man -l``.

Tasks: ``summarization`` (a 120-320 word passage), ``translation`` (English
passages into French/German/Spanish, and German/French/Spanish man-page
passages into English) and ``instruction`` (open-ended requests built around a
real package summary or command description).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

PROMPTS_FILE = Path(__file__).with_name("prompts.json")
PROMPTS_VERSION = 1
TASKS: tuple[str, ...] = ("summarization", "translation", "instruction")
PER_TASK = 32

_LICENCE_WORDS = re.compile(
    r"licen[cs]e|licen[cs]i|lizenz|warranty|permission is|legal|copyright|free software|redistribut|all rights reserved|"
    r"merchantability|permission is hereby granted|gnu general public|apache|trademark",
    re.IGNORECASE,
)
_PACKAGING_FILES = re.compile(r"licen[cs]e|copying|notice|authors|requirements|entry_points|top_level|/_?vendor/", re.I)
_DEBIAN_NON_PROSE = re.compile(r"^copyright$|changelog|news|changes|history|\.(c|h|py|pl|sh|css|js)(\.gz)?$", re.I)
_STOPWORDS = {
    "en": set("the and of to is in that it for with as are this be by on or from which can not".split()),
    "de": set("der die das und ist nicht mit den dem ein eine einer wird werden auf für von sie zu auch oder wenn".split()),
    "fr": set("le la les et est des une un dans pour par qui que sur avec pas sont ce au du ne être".split()),
    "es": set("el la los las y es de que en un una para por con se del al no como su este".split()),
}
_LANGUAGE_NAMES = {"en": "English", "de": "German", "fr": "French", "es": "Spanish"}


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


@dataclass
class Passage:
    text: str
    source: str


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
# Text cleaning


def _stable_key(*parts: object) -> str:
    return hashlib.sha1("\x1f".join(map(str, parts)).encode()).hexdigest()


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W\d_]+", text.lower())


def _language(text: str) -> str | None:
    words = _words(text)
    if len(words) < 12:
        return None
    hits = {lang: sum(w in stop for w in words) for lang, stop in _STOPWORDS.items()}
    best = max(hits, key=hits.get)
    others = sorted(hits.values())[-2]
    if hits[best] / len(words) >= 0.12 and hits[best] >= 3 * max(others, 1):
        return best
    return None


def _is_prose(text: str, min_words: int, max_words: int) -> bool:
    words = text.split()
    if not min_words <= len(words) <= max_words:
        return False
    if _LICENCE_WORDS.search(text):
        return False
    if "\ufffd" in text or re.search("[ÃÂ][\x80-\xbf]", text):  # mojibake
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text)
    if letters / len(text) < 0.9:  # code, tables, URLs, option lists
        return False
    if re.search(r"https?://|www\.|\$ |>>>|::|\{|\}|==|->|\||\*", text):
        return False
    if re.search(r"\s[.,;:_](?=\W|$)|\w_(?=\W|$)", text):  # left-overs of removed links
        return False
    # Sentences, not lists of names: several sentence ends, most words lower case.
    if text.count(". ") + text.endswith(".") < 2:
        return False
    lower = sum(w[:1].islower() for w in words)
    return lower / len(words) >= 0.6


def _english_prose(passages: list["Passage"]) -> list["Passage"]:
    """The passages that are English prose paragraphs of 25-320 words."""
    return [p for p in passages if _language(p.text) == "en" and _is_prose(p.text, 25, 320)]


def _markup_to_paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a Markdown / reStructuredText / plain-text README."""
    text = text.replace("\r\n", "\n")
    text = re.sub(r"```.*?```", "\n", text, flags=re.S)  # fenced code
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<[^>\n]+>", "", text)  # html tags
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", text)  # images
    text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", text)  # md links
    text = re.sub(r"`([^`<]+?)\s*<[^>]+>`_+", r"\1", text)  # rst links
    text = re.sub(r"`+([^`]+)`+_?", r"\1", text)  # inline code / rst roles
    text = re.sub(r":[a-z]+:(?=\S)", "", text)  # rst roles prefix
    text = re.sub(r"\*\*([^*]+)\*\*|\*([^*\n]+)\*", lambda m: m.group(1) or m.group(2), text)
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.strip("\n").split("\n")
        if not lines or any(
            re.match(r"\s{4,}\S|\t|\s*[-*+] |\s*\d+[.)] |\s*#|\s*\.\. |\s*[=\-~^*#]{3,}\s*$|\s*\|", line)
            for line in lines
        ):
            continue  # code, lists, headings, directives, tables
        paragraph = " ".join(line.strip() for line in lines)
        paragraphs.append(re.sub(r"\s+", " ", paragraph).strip())
    return paragraphs


def _read_text(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="strict") as f:
            return f.read(400_000)
    except (UnicodeDecodeError, OSError, EOFError):
        return ""


# ---------------------------------------------------------------------------
# Sources


def _pypi_packages() -> list[tuple[str, str, str, str]]:
    """(name, version, summary, long description) of every installed distribution."""
    from importlib import metadata

    seen, out = set(), []
    for dist in metadata.distributions():
        meta = dist.metadata
        name = meta["Name"]
        if not name or name.lower() in seen or name.lower().startswith("vllm-cmasd"):
            continue
        seen.add(name.lower())
        body = meta.get_payload() or ""
        description = meta.get("Description") or ""
        if len(description) > len(body):
            body = re.sub(r"\n {8}|\n\|", "\n", description)
        out.append((name, meta["Version"], (meta.get("Summary") or "").strip(), body))
    return sorted(out)


def _pypi_passages() -> list[Passage]:
    out = []
    for name, version, _summary, body in _pypi_packages():
        for i, paragraph in enumerate(_markup_to_paragraphs(body)):
            out.append(Passage(paragraph, f"pypi-metadata:{name}=={version}#paragraph{i}"))
    return out


def _package_files(keep) -> list[tuple[str, str, str, Path]]:
    """(name, version, path in the distribution, file) of the installed distributions'
    files for which ``keep(path)`` holds, this project's own left out."""
    from importlib import metadata

    out = []
    for dist in metadata.distributions():
        name, version = dist.metadata["Name"], dist.metadata["Version"]
        if not name or name.lower().startswith("vllm-cmasd"):
            continue
        out += [(name, version, str(f), Path(dist.locate_file(f))) for f in dist.files or [] if keep(str(f))]
    return out


def _package_doc_file_passages() -> list[Passage]:
    """Paragraphs of the Markdown / reStructuredText / text files the installed
    distributions ship beside their code (guides, READMEs of subpackages; training data
    only). Licences, requirement lists and packaging metadata are skipped."""
    out = []
    for name, version, path, file in _package_files(
        lambda path: path.endswith((".md", ".rst", ".txt")) and ".dist-info" not in path
        and not _PACKAGING_FILES.search(path)
    ):
        for i, paragraph in enumerate(_markup_to_paragraphs(_read_text(file))):
            out.append(Passage(paragraph, f"pypi-doc:{name}=={version}:{path}#paragraph{i}"))
    return out


def _debian_doc_passages(readme_only: bool = True) -> list[Passage]:
    """Paragraphs of the README files under /usr/share/doc/<package>/ (the benchmark's
    source); ``readme_only=False``: of every text document there (guides, FAQs,
    design notes; training data only), change logs, licences and markup other than
    Markdown / reStructuredText skipped."""
    out = []
    root = Path("/usr/share/doc")
    if not root.is_dir():
        return out
    for path in sorted(root.glob("*/README*") if readme_only else root.rglob("*")):
        if path.is_symlink() or not path.is_file() or path.suffix in {".html", ".pdf"}:
            continue
        if not readme_only and (
            path.name.startswith("README") or _DEBIAN_NON_PROSE.search(path.name)
            or path.suffix not in {"", ".txt", ".md", ".rst", ".gz"}
        ):
            continue
        for i, paragraph in enumerate(_markup_to_paragraphs(_read_text(path))):
            out.append(Passage(paragraph, f"debian-doc:{path}#paragraph{i}"))
    return out


def _python_doc_passages(max_files: int | None = None) -> list[Passage]:
    """English prose paragraphs of the module, class and function docstrings of the
    installed distributions (training data only: technical prose like the READMEs the
    benchmark summarizes, ~19k paragraphs, ~1 min to parse). ``max_files``: at most
    that many source files, in a stable pseudo-random order."""
    import ast

    files = _package_files(lambda path: path.endswith(".py") and "test" not in path)
    files.sort(key=lambda item: _stable_key("pydoc", item[0], item[2]))
    out = []
    for name, version, f, file in files[:max_files]:
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, ValueError, OSError, UnicodeDecodeError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        for node in nodes:
            doc = ast.get_docstring(node)
            if not doc or len(doc) < 200:
                continue
            where = f"pydoc:{name}=={version}:{f}:{getattr(node, 'name', '')}:{getattr(node, 'lineno', 0)}"
            for i, paragraph in enumerate(_markup_to_paragraphs(doc)):
                out.append(Passage(paragraph, f"{where}#paragraph{i}"))
    return _english_prose(out)


def _render_manpage(path: Path) -> str:
    if shutil.which("man") is None:
        return ""
    env = dict(os.environ, MANWIDTH="2000", LC_ALL="C.UTF-8", MAN_KEEP_FORMATTING="0")
    try:
        result = subprocess.run(
            ["man", "-l", str(path)], capture_output=True, env=env, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = result.stdout.decode("utf-8", errors="replace")
    return re.sub(r".\x08", "", text)  # overstrike bold/underline


def _manpage_paragraphs(path: Path) -> list[str]:
    paragraphs = []
    for block in re.split(r"\n\s*\n", _render_manpage(path)):
        # Unindented lines are section headings (and the page header/footer).
        rows = [(len(line) - len(line.lstrip()), line.strip()) for line in block.split("\n")]
        rows = [(indent, line) for indent, line in rows if line and indent > 0]
        # A tagged paragraph's tag sits left of its text: drop it.
        if len(rows) > 1 and rows[0][0] < rows[1][0]:
            rows = rows[1:]
        if rows:
            text = re.sub(r"-\s+(?=[a-zäöüéèàç])", "", " ".join(line for _, line in rows))
            paragraphs.append(re.sub(r"^(?:[•·*]|-+)\s+", "", text))  # bullets, "--" tags
    return paragraphs


def _manpage_foreign_passages() -> list[Passage]:
    out = []
    for lang in ("de", "fr", "es"):
        for path in sorted(Path("/usr/share/man", lang).glob("man*/*.gz")):
            for i, paragraph in enumerate(_manpage_paragraphs(path)):
                if _language(paragraph) == lang:
                    out.append(Passage(paragraph, f"manpage:{path}#paragraph{i}:{lang}"))
    return out


def _manpage_english_passages(max_pages: int) -> list[Passage]:
    """English prose paragraphs of man1/man5/man8 pages (training data only; the
    benchmark uses just their NAME lines). ``max_pages`` pages in a stable
    pseudo-random order: rendering all of them takes ~8 min."""
    paths = sorted(Path("/usr/share/man").glob("man[158]/*.gz"), key=lambda p: _stable_key("man-en", p.name))
    out = []
    for path in paths[:max_pages]:
        for i, paragraph in enumerate(_manpage_paragraphs(path)):
            out.append(Passage(paragraph, f"manpage:{path}#paragraph{i}"))
    return _english_prose(out)


def _manpage_name_lines() -> list[Passage]:
    """English "command - what it does" lines from the NAME section of man1/man8 pages."""
    out = []
    for section in ("man1", "man8"):
        for path in sorted(Path("/usr/share/man", section).glob("*.gz")):
            text = _read_text(path)
            match = re.search(r"^\.SH\s+\"?NAME\"?\s*\n(.+?)\n\.(?:SH|PP)", text, flags=re.M | re.S)
            if not match:
                continue
            line = re.sub(r"\\f[BIRP]|\\\(em|\\-|\\&|\\ ", lambda m: "-" if m.group() == "\\-" else "", match.group(1))
            line = re.sub(r"\\\w+|\n\.\w+.*", " ", line).replace("\n", " ")
            m = re.match(r"\s*([\w.+-]+)(?:\s*,\s*[\w.+-]+)*\s+-+\s+(.{15,120}?)\s*$", line)
            if m and m.group(1) not in m.group(2) and " - " not in m.group(2) and not _LICENCE_WORDS.search(m.group(2)):
                out.append(Passage(f"{m.group(1)}\t{m.group(2).rstrip('.')}", f"manpage:{path}#NAME"))
    return out


# ---------------------------------------------------------------------------
# Prompt templates (shared by the benchmark and by the draft's training data)

SUMMARIZATION_TEMPLATE = "Summarize the following text in two or three sentences.\n\n{text}"
TRANSLATION_TEMPLATE = "Translate the following {src} text into {dst}. Reply with the translation only.\n\n{text}"
PACKAGE_TEMPLATES = (
    "Write a short introduction to the Python package {name} ({what}) for a newcomer: "
    "what problem does it solve and when would you use it?",
    "A colleague asks whether they should use {name} ({what}) in their next project. "
    "Give them balanced advice in a few paragraphs.",
    "Explain to a beginner, step by step, how they might start using {name} ({what}).",
    "Write a brief blog post announcing that your team has adopted {name} ({what}), "
    "and explain why.",
)
COMMAND_TEMPLATES = (
    "Explain what the {name} command ({what}) is for, and describe two situations where it is useful.",
    "Write a short tutorial for a new Linux user about {name} ({what}).",
    "A junior administrator has never used {name} ({what}). Explain what it does and what "
    "mistakes to avoid.",
    "Describe in plain language what {name} ({what}) does, as if explaining it to a non-programmer.",
)


def _lower_first(text: str) -> str:
    """'A fast parser' -> 'a fast parser'; 'YAML parser', 'Model Context Protocol' and 'Python ...' stay."""
    words = text.split()
    proper = {"python", "linux", "debian", "gnu", "microsoft", "intel", "intel®", "google", "apple"}
    if len(words) > 1 and words[0][1:].islower() and words[1][:1].islower() and words[0].lower() not in proper:
        return text[0].lower() + text[1:]
    return text


def _translation_prompt(text: str, src: str, dst: str) -> str:
    return TRANSLATION_TEMPLATE.format(src=_LANGUAGE_NAMES[src], dst=_LANGUAGE_NAMES[dst], text=text)


def _instruction_prompt(templates: tuple[str, ...], i: int, passage: "Passage") -> str:
    name, what = passage.text.split("\t")
    return templates[i % len(templates)].format(name=name, what=_lower_first(what))


# ---------------------------------------------------------------------------
# Prompt construction


def _pick(passages: list[Passage], n: int, salt: str, per_origin: int = 1) -> list[Passage]:
    """n passages in a stable pseudo-random order, at most per_origin from one package/file."""
    ordered = sorted(passages, key=lambda p: _stable_key(salt, p.source))
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


@dataclass
class _Pools:
    pypi: list[Passage]  # English prose paragraphs of package READMEs
    debian: list[Passage]  # English prose paragraphs of Debian READMEs
    foreign: list[Passage]  # German / French / Spanish man-page paragraphs
    names: list[Passage]  # "command\twhat it does" from man-page NAME lines
    summaries: list[Passage]  # "package\tsummary" from package metadata


def _pools() -> _Pools:
    summaries = [
        Passage(f"{name}\t{summary.rstrip('.')}", f"pypi-metadata:{name}=={version}#Summary")
        for name, version, summary, _ in _pypi_packages()
        if 15 <= len(summary) <= 120 and not _LICENCE_WORDS.search(summary) and "http" not in summary
    ]
    return _Pools(
        pypi=_english_prose(_pypi_passages()),
        debian=_english_prose(_debian_doc_passages()),
        foreign=[p for p in _manpage_foreign_passages() if _is_prose(p.text, 20, 90)],
        names=_manpage_name_lines(),
        summaries=summaries,
    )


def origin_key(source: str) -> str:
    """The document a prompt's text comes from, across versions and translations:
    ``pypi:sympy``, ``man:dpkg-deb.1`` (every language of that page), ``doc:/usr/share/doc/x``."""
    kind, _, rest = source.partition(":")
    path = rest.split("#")[0]
    if kind in ("pypi-metadata", "pydoc", "pypi-doc"):  # a package's README, docs and docstrings: one origin
        return "pypi:" + path.split("==")[0].lower().replace("_", "-")
    if kind == "manpage":
        return "man:" + Path(path).name.removesuffix(".gz")
    if kind == "debian-doc":  # every document of a Debian package: one origin
        return "doc:" + "/".join(Path(path).parts[:5]).removeprefix("/")
    return "doc:" + path


def benchmark_origins(benchmark: dict | None = None) -> set[str]:
    """The :func:`origin_key` of every document a benchmark prompt comes from
    (default: the committed prompt set)."""
    return {origin_key(q["source"]) for items in (benchmark or load_prompts())["tasks"].values() for q in items}


def benchmark_paragraphs(benchmark: dict | None = None, pools: "_Pools | None" = None) -> set[str]:
    """Every paragraph of every document a benchmark prompt comes from. A training text
    sharing one is left out even where another package ships the same file under
    another name (libffi8 and libffi-dev carry one README)."""
    origins, pools = benchmark_origins(benchmark), pools or _pools()
    return {p.text for p in pools.pypi + pools.debian + pools.foreign if origin_key(p.source) in origins}


def shares_paragraph(text: str, paragraphs: set[str]) -> bool:
    """Whether a passage (paragraphs joined by blank lines) holds one of ``paragraphs``."""
    return any(part in paragraphs for part in text.split("\n\n"))


def extract(per_task: int = PER_TASK) -> dict:
    """Build the prompt set from this machine's offline text (see the module doc)."""
    pools = _pools()
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
        prompt = _translation_prompt(p.text, src, dst)
        add("translation", prompt, p, source_language=src, target_language=dst)

    # Open-ended instructions around real package summaries and command descriptions.
    half = per_task // 2
    for i, p in enumerate(_pick(pools.summaries, half, "ins-pypi")):
        add("instruction", _instruction_prompt(PACKAGE_TEMPLATES, i, p), p)
    for i, p in enumerate(_pick(names, per_task - half, "ins-man")):
        add("instruction", _instruction_prompt(COMMAND_TEMPLATES, i, p), p)

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
    pools = _pools()
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
        return int(_stable_key("train", passage.source), 16) % n

    man = _manpage_english_passages(english_man_pages)
    pydoc = _python_doc_passages(python_doc_files)
    english = pools.pypi + pools.debian + man
    documents = sum((_summarization_windows(ps) for ps in (pools.debian, pools.pypi, man, pydoc)), [])
    documents += [p for p in english + pydoc if len(p.text.split()) >= 60]
    # Guides and notes beside the READMEs: summaries only, capped per file and per
    # package so a few large manuals (nodejs) do not dominate.
    guides = _english_prose(_package_doc_file_passages() + _debian_doc_passages(readme_only=False))
    guide_documents = _summarization_windows(guides, per_file=40) + [p for p in guides if len(p.text.split()) >= 60]
    guide_documents.sort(key=lambda p: _stable_key("guides", p.source))
    per_origin: dict[str, int] = {}
    for p in guide_documents:
        origin = origin_key(p.source)
        per_origin[origin] = per_origin.get(origin, 0) + 1
        if per_origin[origin] <= 300:
            documents.append(p)
    for p in documents:
        add("summarization", SUMMARIZATION_TEMPLATE.format(text=p.text), p)
    for p in pools.foreign:
        add("translation", _translation_prompt(p.text, p.source.rsplit(":", 1)[1], "en"), p)
    for p in english:
        if len(p.text.split()) <= 90:
            add("translation", _translation_prompt(p.text, "en", ("fr", "de", "es")[variant(p, 3)]), p)
    for templates, names in ((PACKAGE_TEMPLATES, pools.summaries), (COMMAND_TEMPLATES, pools.names)):
        for p in names:
            for i in range(len(templates)):
                add("instruction", _instruction_prompt(templates, i, p), p)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Extract the benchmark prompts from offline text.")
    parser.add_argument("--write", action="store_true", help=f"overwrite {PROMPTS_FILE.name}")
    parser.add_argument("--out", default=None, help="write here instead")
    parser.add_argument("--per-task", type=int, default=PER_TASK)
    args = parser.parse_args(argv)
    data = extract(args.per_task)
    text = json.dumps(data, indent=1, ensure_ascii=False) + "\n"
    if args.write or args.out:
        Path(args.out or PROMPTS_FILE).write_text(text, encoding="utf-8")
        print(f"wrote {args.out or PROMPTS_FILE}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
