"""One benchmark engine in a process of its own, and what is measured per call.

:class:`EngineHost` starts a child process that builds one method's ``vllm.LLM``
in-process there (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set by the caller's
environment: no engine-core process reserving a core, so it runs at full speed)
and answers ``generate`` calls over a pipe, blocked on it between calls (no CPU).
Every engine starts in a fresh process, so none runs in a heap and thread pools
that earlier engines left behind, and the run may keep several started at once and
alternate their calls (:mod:`vllm_cmasd.bench.runner`, ``interleave="calls"``).

What is measured per ``generate`` call (one batch of prompts): wall time, output
tokens, engine steps, time spent in the drafter's ``propose`` and the lengths it
proposed, and the differences of vLLM's speculative-decoding counters and, for
CM-ASD, of the proposer's :class:`~vllm_cmasd.metrics.DraftStats` and running totals.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import dataclass, field
from typing import Any

from vllm_cmasd.engines import model_runner

WARMUP_TOKENS = 8


class EngineFailed(RuntimeError):
    """The child could not start its engine, or a call failed there (the message says why)."""


class EngineHost:
    """A child process holding one engine (``engine_kwargs``: ``vllm.LLM``'s), warmed
    up on ``warmup_batch`` rotations of ``warmup_prompt`` before :attr:`start_record` is
    returned: the run's largest batch, since an engine's first call of a larger batch
    than it had run took ~10% longer (batch 16, docs/notes/eagle3-training.md,
    twenty-second session), a cost the first engine of each round paid alone."""

    def __init__(self, engine_kwargs: dict[str, Any], *, warmup_prompt: list[int], warmup_batch: int = 1,
                 max_tokens: int, name: str):
        # forkserver: each child forks from a server process that has imported vLLM
        # once (an import takes 18-33 s on these 2-core machines), not from the
        # caller, whose threads and torch state a forked child would inherit. The
        # server keeps the environment it started with: each child takes the
        # caller's of the moment.
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(
            target=_serve, args=(child_conn, dict(os.environ), engine_kwargs, warmup_prompt, warmup_batch, max_tokens),
            name=f"bench-{name}",
        )
        self._proc.start()
        child_conn.close()
        try:
            self.start_record: dict[str, Any] = self._reply()
        except BaseException:
            self.close()
            raise

    def _reply(self) -> Any:
        try:
            status, value = self._conn.recv()
        except EOFError:
            self._proc.join(timeout=30)
            raise EngineFailed(f"the engine's process died (exit code {self._proc.exitcode})") from None
        if status == "error":
            raise EngineFailed(value)
        return value

    def generate(self, prompts: list[list[int]]) -> dict[str, Any]:
        """One greedy ``generate`` call on these prompts' token ids: the measured call."""
        self._conn.send(("generate", prompts))
        return self._reply()

    def controller_state(self) -> dict[str, Any]:
        """What a CM-ASD controller learnt so far (its cost fit, calibration, acceptance history); {} for other methods."""
        self._conn.send(("state", None))
        return self._reply()

    def rss_bytes(self) -> int:
        import psutil

        return psutil.Process(self._proc.pid).memory_info().rss

    def close(self) -> None:
        """Shut the engine down and wait for the child; kill it if it does not exit."""
        if self._proc.is_alive():
            try:
                self._conn.send(("stop", None))
                self._conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                pass
            self._proc.join(timeout=60)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
        self._conn.close()


# What the fork server imports before it forks engines' processes.
_PRELOAD = ["vllm", "vllm.entrypoints.llm", __name__]


def _serve(conn, environ: dict[str, str], engine_kwargs: dict[str, Any], warmup_prompt: list[int],
           warmup_batch: int, max_tokens: int) -> None:
    """The child: start the engine, then answer calls until told to stop."""
    os.environ.clear()
    os.environ.update(environ)
    llm = None
    try:
        _quiet_repeated_warnings()
        from vllm import LLM, SamplingParams

        from vllm_cmasd.vllm_patch import install_dispatcher_scan_fix

        install_dispatcher_scan_fix()
        start = time.perf_counter()
        llm = LLM(**engine_kwargs)
        # Rotations of the prompt: as long, but no two share a prefix-cache block, so the
        # warm-up prefills the whole batch (copies shared one prefill and left the first
        # timed call of each round still ~8% slow).
        rotations = [warmup_prompt[i:] + warmup_prompt[:i] for i in range(warmup_batch)]
        warm = llm.generate([{"prompt_token_ids": ids} for ids in rotations],
                            SamplingParams(temperature=0.0, max_tokens=WARMUP_TOKENS), use_tqdm=False)
        record = {"seconds": time.perf_counter() - start, "pid": os.getpid(), "warmup_requests": len(warm),
                  **weight_memory(llm)}
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, seed=0)
        probe = instrument(llm)
    except Exception as exc:  # a method that cannot start must not sink the others
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        _shutdown(llm)
        return
    conn.send(("ok", record))
    while True:
        try:
            command, arg = conn.recv()
        except EOFError:  # the parent is gone
            break
        if command == "stop":
            break
        try:
            if command == "generate":
                conn.send(("ok", measured_call(llm, probe, arg, params)))
            else:  # "state"
                conn.send(("ok", controller_state(llm)))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
    _shutdown(llm)
    conn.send(("ok", None))


def _shutdown(llm) -> None:
    if llm is not None:
        from vllm_cmasd.engines import shutdown

        shutdown(llm)


class _ErrorsOnly:
    """Logging filter: only errors pass."""

    def filter(self, record) -> bool:
        return record.levelno >= 40  # logging.ERROR


def _quiet_repeated_warnings() -> None:
    """Harmless here and repeated per engine: every engine start re-registers the
    same CPU kernels, and the CPU worker re-warns that torch's thread count is
    already bound. A filter, not a level: an engine start re-applies vLLM's logging
    config, which resets the levels of vLLM's loggers but keeps their filters."""
    import logging

    import vllm  # noqa: F401 - configures vLLM's logging first

    for name in ("vllm.triton_utils.dispatcher", "vllm.v1.worker.cpu_worker"):
        logging.getLogger(name).addFilter(_ErrorsOnly())


# ---------------------------------------------------------------------------
# Instrumentation (in the child)


@dataclass
class Probe:
    """Counts engine steps and times/records the drafter's proposals."""

    steps: int = 0
    propose_s: float = 0.0
    proposed_lengths: dict[int, int] = field(default_factory=dict)

    def snapshot(self) -> tuple[int, float, dict[int, int]]:
        return self.steps, self.propose_s, dict(self.proposed_lengths)


def instrument(llm) -> Probe:
    probe = Probe()
    engine = llm.llm_engine
    original_step = engine.step

    def step(*args, **kwargs):
        probe.steps += 1
        return original_step(*args, **kwargs)

    engine.step = step
    drafter = getattr(model_runner(llm), "drafter", None)
    if drafter is not None:
        original_propose = drafter.propose

        def propose(*args, **kwargs):
            start = time.perf_counter()
            drafts = original_propose(*args, **kwargs)
            probe.propose_s += time.perf_counter() - start
            if hasattr(drafts, "shape"):  # tensor [num_reqs, k]
                lengths = [int(drafts.shape[-1])] * int(drafts.shape[0]) if drafts.dim() == 2 else []
            else:
                lengths = [len(row) for row in drafts]
            for n in lengths:
                probe.proposed_lengths[n] = probe.proposed_lengths.get(n, 0) + 1
            return drafts

        drafter.propose = propose
    return probe


def measured_call(llm, probe: Probe, prompts: list[list[int]], params) -> dict[str, Any]:
    """One ``generate`` call and what it changed in the engine's counters."""
    from vllm_cmasd.engines import spec_decode_counters

    drafter = getattr(model_runner(llm), "drafter", None)
    stats = getattr(drafter, "stats", None)
    controlled = hasattr(drafter, "lag")
    before_counters = spec_decode_counters(llm)
    before_probe = probe.snapshot()
    before_hist = list(stats.length_histogram) if stats is not None else None
    before_totals = drafter.totals() if controlled else {}
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    after_counters = spec_decode_counters(llm)
    after_probe = probe.snapshot()
    call = {
        "seconds": seconds,
        "output_token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "texts": [o.outputs[0].text for o in outputs],
        "engine_steps": after_probe[0] - before_probe[0],
        "propose_s": after_probe[1] - before_probe[1],
        "proposed_lengths": _diff_hist(before_probe[2], after_probe[2]),
        "num_drafts": after_counters["num_drafts"] - before_counters["num_drafts"],
        "num_draft_tokens": after_counters["num_draft_tokens"] - before_counters["num_draft_tokens"],
        "num_accepted_tokens": after_counters["num_accepted_tokens"] - before_counters["num_accepted_tokens"],
        "accepted_per_position": _diff_list(
            before_counters["accepted_per_position"], after_counters["accepted_per_position"]
        ),
    }
    if stats is not None:
        call["cmasd_length_histogram"] = _diff_list(before_hist, list(stats.length_histogram))
    if controlled:
        # The controller's running totals (metrics.CONTROLLER_TOTALS): steps without a
        # drafter pass, catch-ups (catchup.py), exploring, drafter time.
        call.update({name: value - before_totals[name] for name, value in drafter.totals().items()})
    return call


def controller_state(llm) -> dict[str, Any]:
    """What the controller learnt by now: the cost fit (budget.MeasuredCosts.summary),
    the calibration (calibration.AcceptanceCalibration.summary) and the acceptance
    history's rate and shrinkage weight (budget.AcceptanceHistory.summary)."""
    drafter = getattr(model_runner(llm), "drafter", None)
    if getattr(drafter, "costs", None) is None:
        return {}
    return {"cost_fit": drafter.costs.summary(), "calibration": drafter.calibration.summary(),
            "acceptance": drafter.acceptance.summary()}


def weight_memory(llm) -> dict[str, int]:
    """Bytes of the target's weights, and of the drafter's that are its own
    (a self-draft's are the target's: 0), as loaded in the engine."""
    from vllm_cmasd.self_draft import unique_weight_bytes

    runner = model_runner(llm)
    target = runner.model
    out = {"target_weight_bytes": unique_weight_bytes(target)}
    drafter = getattr(runner, "drafter", None)
    if drafter is not None and hasattr(drafter, "model"):
        out["draft_weight_bytes"] = unique_weight_bytes(drafter.model, target)
    return out


def _diff_list(before: list, after: list) -> list:
    before = list(before or [])
    after = list(after or [])
    before += [0] * (len(after) - len(before))
    return [a - b for a, b in zip(after, before)]


def _diff_hist(before: dict[int, int], after: dict[int, int]) -> dict[int, int]:
    return {n: c - before.get(n, 0) for n, c in after.items() if c - before.get(n, 0)}
