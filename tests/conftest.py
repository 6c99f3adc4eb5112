"""Shared fixtures: the tiny random-weight model pair and a real vLLM engine runner."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import pytest

# Engines run inside the test process, so tests can look at the model
# runner's proposer and sampler (what vLLM really used, not what we asked for).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


# Lines of a failed test's captured output that name an error: vLLM's engine
# processes log the root cause ("EngineCore failed to start", the exception)
# in the middle of a long capture, which CI logs shorten.
_ERROR_LINE = re.compile(r"(Error|Exception|failed to start|Traceback|Killed|OOM)")


def pytest_terminal_summary(terminalreporter):
    """Repeat those lines at the very end of the run, a few per failed test."""
    named = {}
    for report in terminalreporter.stats.get("failed", []):
        lines = [
            line.strip()[:300]
            for title, text in report.sections
            if title.startswith("Captured")
            for line in text.splitlines()
            if _ERROR_LINE.search(line) and "Warning" not in line
        ]
        if lines:
            named[report.nodeid] = dict.fromkeys(lines[-12:])  # the last ones, each once
    if not named:
        return
    terminalreporter.section("errors named in the failed tests' captured output")
    for nodeid, lines in named.items():
        terminalreporter.write_line(nodeid)
        for line in lines:
            terminalreporter.write_line(f"    {line}")


def load_script(name: str):
    """A module of scripts/ (they are standalone scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    from vllm_cmasd.testing import make_tiny_pair

    return make_tiny_pair(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_eagle3(tiny_pair, tmp_path_factory):
    """A random-weight EAGLE-3 head for the tiny target (vllm_cmasd.testing.make_tiny_eagle3_head)."""
    from vllm_cmasd.testing import make_tiny_eagle3_head

    return make_tiny_eagle3_head(tiny_pair[0], tmp_path_factory.mktemp("tiny-eagle3"))


@pytest.fixture(scope="session")
def tiny_eagle(tiny_pair, tmp_path_factory):
    """A random-weight EAGLE-1 head for the tiny target (vllm_cmasd.testing.make_tiny_eagle_head)."""
    from vllm_cmasd.testing import make_tiny_eagle_head

    return make_tiny_eagle_head(tiny_pair[0], tmp_path_factory.mktemp("tiny-eagle"))


@pytest.fixture(scope="session")
def tiny_self_draft(tiny_pair, tmp_path_factory):
    """The tiny target's own first 2 of 4 layers and LM head (SpecBound self-draft)."""
    from vllm_cmasd.self_draft import build_self_draft

    target, _ = tiny_pair
    return build_self_draft(target, tmp_path_factory.mktemp("tiny-self-draft") / "self-draft", 2, 1.0)


@dataclass
class EngineRun:
    outputs: list  # vLLM RequestOutput per prompt
    drafter: object | None = None
    model: object | None = None  # the target model (vLLM drops its reference at shutdown)
    sampler: object | None = None
    counters: dict = field(default_factory=dict)  # vLLM's spec-decode counters
    num_preemptions: int = 0
    metrics: list = field(default_factory=list)  # LLM.get_metrics() at the end

    @property
    def token_ids(self) -> list[list[int]]:
        return [list(o.outputs[0].token_ids) for o in self.outputs]


def run_engine(prompts, params, **engine_kwargs) -> EngineRun:
    """Start a real vLLM engine, generate, record what ran, shut it down."""
    from vllm import LLM

    from vllm_cmasd.engines import model_runner, shutdown, spec_decode_counters

    llm = LLM(**engine_kwargs)
    try:
        outputs = llm.generate(prompts, params, use_tqdm=False)
        runner = model_runner(llm)
        metrics = llm.get_metrics()
        return EngineRun(
            metrics=metrics,
            outputs=outputs,
            drafter=getattr(runner, "drafter", None),
            model=runner.get_model(),
            sampler=getattr(runner, "rejection_sampler", None),
            counters=spec_decode_counters(llm),
            num_preemptions=sum(m.value for m in metrics if m.name == "vllm:num_preemptions"),
        )
    finally:
        shutdown(llm)
