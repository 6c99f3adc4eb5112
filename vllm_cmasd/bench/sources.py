"""Offline documents for the benchmark's prompts and the draft's benchmark-domain
training data: passages (paragraphs with the source they came from), the pools the
benchmark draws from, and which document a passage belongs to (:func:`origin_key`).

Sources (all present offline on the project's Debian 12 CPU machines; see
docs/notes/benchmark.md). The draft model was first trained on Python
standard-library docstrings and /usr/share/common-licenses, so neither is used,
and paragraphs that read like licence text are dropped everywhere.

* ``pypi-metadata``: long descriptions (README) in the METADATA of the Python
  packages installed in the project's venv (pip installs them with vLLM).
* ``debian-doc``: README files under /usr/share/doc/<package>/.
* ``manpage``: manual pages under /usr/share/man, English NAME lines and the
  German, French and Spanish translations, rendered with ``man -l``.

Training data only (never the benchmark's): ``pypi-doc`` (the other text files
packages ship), ``pydoc`` (the installed packages' docstrings), the other text
documents under /usr/share/doc and English man-page paragraphs.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

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


@dataclass
class Passage:
    """A paragraph (or a run of them) and where it came from, ``kind:path#where``
    (``debian-doc:/usr/share/doc/sed/README#paragraph0``, ``manpage:...#NAME``)."""

    text: str
    source: str


# ---------------------------------------------------------------------------
# Text cleaning


def stable_key(*parts: object) -> str:
    """The same in every process (unlike ``hash``): stable pseudo-random orders."""
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


def english_prose(passages: list[Passage]) -> list[Passage]:
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


def _installed_distributions():
    """The installed distributions, less the copies a package vendors for itself
    (setuptools' ``_vendor``, on ``sys.path`` once setuptools is imported, as vLLM's
    import does): with them the document pool depended on what the process had
    imported, and the ``data`` and ``prompts`` stages drew different held-out sets."""
    from importlib import metadata

    for dist in metadata.distributions():
        if "_vendor" not in Path(str(dist.locate_file(""))).parts:
            yield dist


def _pypi_packages() -> list[tuple[str, str, str, str]]:
    """(name, version, summary, long description) of every installed distribution."""
    seen, out = set(), []
    for dist in _installed_distributions():
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
    out = []
    for dist in _installed_distributions():
        name, version = dist.metadata["Name"], dist.metadata["Version"]
        if not name or name.lower().startswith("vllm-cmasd"):
            continue
        out += [(name, version, str(f), Path(dist.locate_file(f))) for f in dist.files or [] if keep(str(f))]
    return out


def package_doc_file_passages() -> list[Passage]:
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


def debian_doc_passages(readme_only: bool = True) -> list[Passage]:
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


def python_doc_passages(max_files: int | None = None) -> list[Passage]:
    """English prose paragraphs of the module, class and function docstrings of the
    installed distributions (training data only: technical prose like the READMEs the
    benchmark summarizes, ~19k paragraphs, ~1 min to parse). ``max_files``: at most
    that many source files, in a stable pseudo-random order."""
    import ast

    files = _package_files(lambda path: path.endswith(".py") and "test" not in path)
    files.sort(key=lambda item: stable_key("pydoc", item[0], item[2]))
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
    return english_prose(out)


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


def manpage_english_passages(max_pages: int) -> list[Passage]:
    """English prose paragraphs of man1/man5/man8 pages (training data only; the
    benchmark uses just their NAME lines). ``max_pages`` pages in a stable
    pseudo-random order: rendering all of them takes ~8 min."""
    paths = sorted(Path("/usr/share/man").glob("man[158]/*.gz"), key=lambda p: stable_key("man-en", p.name))
    out = []
    for path in paths[:max_pages]:
        for i, paragraph in enumerate(_manpage_paragraphs(path)):
            out.append(Passage(paragraph, f"manpage:{path}#paragraph{i}"))
    return english_prose(out)


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
# Pools and documents


@dataclass(frozen=True)
class Pools:
    pypi: list[Passage]  # English prose paragraphs of package READMEs
    debian: list[Passage]  # English prose paragraphs of Debian READMEs
    foreign: list[Passage]  # German / French / Spanish man-page paragraphs
    names: list[Passage]  # "command\twhat it does" from man-page NAME lines
    summaries: list[Passage]  # "package\tsummary" from package metadata


@functools.cache
def load_pools() -> Pools:
    """The passages the benchmark's prompts are drawn from, from this machine's offline text.

    Read once a process (~1 min: it renders ~470 man pages), then shared: callers
    build new lists from the pools and never change them."""
    summaries = [
        Passage(f"{name}\t{summary.rstrip('.')}", f"pypi-metadata:{name}=={version}#Summary")
        for name, version, summary, _ in _pypi_packages()
        if 15 <= len(summary) <= 120 and not _LICENCE_WORDS.search(summary) and "http" not in summary
    ]
    return Pools(
        pypi=english_prose(_pypi_passages()),
        debian=english_prose(debian_doc_passages()),
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


def shares_paragraph(text: str, paragraphs: set[str]) -> bool:
    """Whether a passage (paragraphs joined by blank lines) holds one of ``paragraphs``."""
    return any(part in paragraphs for part in text.split("\n\n"))

