"""Per-step timings inside a server's engine: one CSV row a step, for scripts/step_probe/summarize.py.

    STEP_PROBE_DIR=/tmp/steps PYTHONPATH=scripts/step_probe vllm-cmasd bench-serve ...

Python imports this file in every process started with ``scripts/step_probe`` on
``PYTHONPATH`` (the load client and the servers). Where a process imports vLLM's
model runner, it wraps ``execute_model`` (the target's forward; each row starts
there, with the step's scheduled tokens and requests), ``sample_tokens``
(sampling and verification, the proposer included), CM-ASD's ``propose`` and
vLLM's drafting loop (``SpecDecodeBaseProposer.propose``) with timers, and writes
``STEP_PROBE_DIR/<pid>.csv``. A probe for measuring, not part of the plugin.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import sys
import time

COLUMNS = ("tokens", "reqs", "execute", "sample", "propose", "base")
OUT_DIR = os.environ.get("STEP_PROBE_DIR", "/tmp/step_probe")
_row: dict[str, float] = {}
_file = None


def _emit() -> None:
    global _file
    if not _row:
        return
    if _file is None:
        os.makedirs(OUT_DIR, exist_ok=True)
        _file = open(os.path.join(OUT_DIR, f"{os.getpid()}.csv"), "w", buffering=1)
        _file.write(",".join(COLUMNS) + "\n")
    _file.write(",".join(f"{_row.get(c, 0.0):.6f}" for c in COLUMNS) + "\n")
    _row.clear()


def _start_step(self, scheduler_output, *args, **kwargs) -> None:
    _emit()
    _row["tokens"] = scheduler_output.total_num_scheduled_tokens
    _row["reqs"] = len(scheduler_output.num_scheduled_tokens)


def _timed(column, fn, before=None):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if before is not None:
            before(*args, **kwargs)
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _row[column] = _row.get(column, 0.0) + time.perf_counter() - start

    return wrapper


# module -> (class, method, CSV column, called first)
TARGETS = {
    "vllm_cmasd.proposer": [("CmasdProposerMixin", "propose", "propose", None)],
    "vllm.v1.spec_decode.llm_base_proposer": [("SpecDecodeBaseProposer", "propose", "base", None)],
    "vllm.v1.worker.gpu_model_runner": [
        ("GPUModelRunner", "execute_model", "execute", _start_step),
        ("GPUModelRunner", "sample_tokens", "sample", None),
    ],
}


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the methods above as soon as their module has run."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in TARGETS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module):
            exec_module(module)
            for class_name, method, column, before in TARGETS[fullname]:
                cls = getattr(module, class_name, None)
                if cls is not None and hasattr(cls, method):
                    setattr(cls, method, _timed(column, getattr(cls, method), before))

        spec.loader.exec_module = exec_and_wrap
        return spec


sys.meta_path.insert(0, _Finder())
