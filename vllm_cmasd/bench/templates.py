"""The prompt templates of the benchmark's tasks, shared by the benchmark
(:func:`vllm_cmasd.bench.prompts.extract`) and by the draft's benchmark-domain
training data (:func:`vllm_cmasd.bench.prompts.training_prompts`)."""

from __future__ import annotations

from vllm_cmasd.bench.sources import Passage

_LANGUAGE_NAMES = {"en": "English", "de": "German", "fr": "French", "es": "Spanish"}

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


def translation_prompt(text: str, src: str, dst: str) -> str:
    """``src`` and ``dst``: language codes (en, de, fr, es)."""
    return TRANSLATION_TEMPLATE.format(src=_LANGUAGE_NAMES[src], dst=_LANGUAGE_NAMES[dst], text=text)


def instruction_prompt(templates: tuple[str, ...], i: int, passage: Passage) -> str:
    """The ``i``-th of ``templates`` (cyclically) around a ``name\\twhat`` passage."""
    name, what = passage.text.split("\t")
    return templates[i % len(templates)].format(name=name, what=_lower_first(what))
