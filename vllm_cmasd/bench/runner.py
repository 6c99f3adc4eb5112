"""Run the benchmark: every method on the same prompts, interleaved, one engine at a time.

A *round* starts each engine configuration once (in turn, the order reversed
every other round), runs that round's share of the prompt batches on it and
shuts it down; drift in machine speed over the run therefore hits every
method alike. All engines come from :func:`vllm_cmasd.engines.llm_kwargs`
with identical settings, run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
and decode greedily.

What is measured per ``generate`` call (one batch of ``batch_size`` prompts of
one task): wall time, output tokens, engine steps, time spent in the drafter's
``propose`` and the lengths it proposed, and the differences of vLLM's
speculative-decoding counters and, for CM-ASD, of the proposer's
:class:`~vllm_cmasd.metrics.DraftStats`. :mod:`vllm_cmasd.bench.report` turns
these into records, the table and the plots.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable
from unittest import mock

from vllm_cmasd.bench.prompts import TASKS, load_prompts
from vllm_cmasd.engines import model_runner
from vllm_cmasd.vllm_patch import install_dispatcher_scan_fix

METHODS: tuple[str, ...] = (
    "ar", "draft_model", "ngram", "cmasd", "cmasd_exact", "cmasd_confidence", "cmasd_topk", "rstitch", "specbound",
    "cmasd_budget",
    "eagle3", "cmasd_eagle3",
)
# vLLM's own methods at a fixed k: the baselines whose best k the report marks.
FIXED_K_METHODS: frozenset[str] = frozenset({"draft_model", "eagle3"})
# The methods that run CM-ASD's proposer (the others are vLLM's own).
CMASD_METHODS: frozenset[str] = frozenset(METHODS) - FIXED_K_METHODS - {"ar", "ngram"}
# The drafter each speculative method runs (a key of the ``drafters`` given to
# MethodSpec.engine_kwargs); every other CM-ASD method drafts with "draft".
DRAFTER_OF: dict[str, str] = {"specbound": "self_draft", "eagle3": "eagle3", "cmasd_eagle3": "eagle3"}
# The methods whose verification is relaxed (the others are lossless).
LOSSY_METHODS: frozenset[str] = frozenset({"cmasd_confidence", "cmasd_topk", "rstitch"})


@dataclass(frozen=True)
class MethodSpec:
    """One engine configuration: a method and its settings."""

    method: str
    k: int | None = None
    """Fixed draft length (draft_model, ngram) or k_max (CM-ASD)."""
    cmasd: dict[str, Any] | None = None
    """The ``additional_config["cmasd"]`` object (CM-ASD only)."""

    @property
    def label(self) -> str:
        if self.method == "ar":
            return "ar"
        parts = [self.method, f"k={self.k}" if self.method in FIXED_K_METHODS | {"ngram"} else f"k_max={self.k}"]
        for key, value in sorted((self.cmasd or {}).items()):
            # The method name already says these.
            if key not in ("verification", "draft_budget", "draft_length"):
                parts.append(f"{key}={value}")
        return " ".join(parts)

    @property
    def drafter(self) -> str:
        """Which of the run's drafters this method drafts with: ``draft``, ``self_draft`` or ``eagle3``."""
        return DRAFTER_OF.get(self.method, "draft")

    def engine_kwargs(self, target: str, drafters: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
        """``drafters``: the checkpoint of each drafter (:attr:`drafter`) the run has."""
        from vllm_cmasd.engines import llm_kwargs

        if self.method == "ar":
            return llm_kwargs(target, **overrides)
        if self.method == "ngram":
            return llm_kwargs(target, ngram=True, num_speculative_tokens=self.k, **overrides)
        if drafters.get(self.drafter) is None:
            raise ValueError(f"method {self.method} drafts with the {self.drafter} checkpoint, and this run has none")
        speculation = dict(draft=str(drafters[self.drafter]), num_speculative_tokens=self.k,
                           draft_method="eagle3" if self.drafter == "eagle3" else "draft_model")
        if self.method in FIXED_K_METHODS:
            return llm_kwargs(target, **speculation, **overrides)
        return llm_kwargs(target, **speculation, cmasd=dict(self.cmasd or {}), **overrides)


def cmasd(k_max: int) -> MethodSpec:
    """The default: the speculation controller, exact verification."""
    return MethodSpec("cmasd", k_max, {"verification": "exact"})


def cmasd_exact(k_max: int, **settings: Any) -> MethodSpec:
    """The paper's fixed-threshold window, exact verification."""
    return MethodSpec("cmasd_exact", k_max, {"verification": "exact", "draft_length": "window", **settings})


def cmasd_confidence(k_max: int, **settings: Any) -> MethodSpec:
    """The controller with the relaxed (confidence-modulated) verifier."""
    return MethodSpec("cmasd_confidence", k_max, {"verification": "confidence", **settings})


def cmasd_topk(k_max: int, **settings: Any) -> MethodSpec:
    """The controller with the top-k tolerance verifier (a draft token in the target's
    top ``topk_beta`` within ``topk_tau`` of its best logit stands)."""
    return MethodSpec("cmasd_topk", k_max, {"verification": "topk-tolerance", **settings})


def rstitch(k_max: int, entropy: float) -> MethodSpec:
    return MethodSpec("rstitch", k_max, {"verification": "rstitch", "rstitch_entropy": entropy})


def specbound(k_max: int) -> MethodSpec:
    return MethodSpec("specbound", k_max, {"verification": "exact"})


def cmasd_eagle3(k_max: int) -> MethodSpec:
    """The controller on the EAGLE-3 head, exact verification."""
    return MethodSpec("cmasd_eagle3", k_max, {"verification": "exact"})


def cmasd_budget(k_max: int) -> MethodSpec:
    """The paper's window, its tokens also capped by the controller's rule."""
    return MethodSpec("cmasd_budget", k_max, {"verification": "exact", "draft_length": "window", "draft_budget": "auto"})


@dataclass(frozen=True)
class Preset:
    name: str
    prompts_per_task: int
    batch_sizes: tuple[int, ...]
    max_tokens: int
    rounds: int
    methods: tuple[MethodSpec, ...]
    tasks: tuple[str, ...] = TASKS
    kv_cache_gib: int = 2
    """KV-cache size of every engine (CPU only), unless the caller's engine
    overrides or VLLM_CPU_KVCACHE_SPACE set one: small pools start faster."""


def _config_default(name: str) -> Any:
    import dataclasses

    from vllm_cmasd.config import CmasdConfig

    return next(f.default for f in dataclasses.fields(CmasdConfig) if f.name == name)


def default_methods(
    k_max: int = 8,
    fixed_ks=(2, 4, 6, 8),
    leniencies=(0.5, None, 2.0),
    thresholds=(None,),
    ngram_k: int = 4,
    rstitch_entropies=(0.5, 1.5, 3.0),
    eagle3_ks=(2, 4, 6),
):
    """AR, vLLM's draft model at each fixed k, n-gram, the CM-ASD controller,
    the paper's window (exact), the controller with relaxed verification,
    R-Stitch routing, SpecBound self-drafting, the window with the budget,
    vLLM's EAGLE-3 at each fixed k and the controller on the same head.

    ``None`` in ``leniencies``/``thresholds`` means the config's default,
    written out so that labels and records name the value.
    """
    threshold_default, leniency_default = _config_default("threshold"), _config_default("leniency")
    methods = [MethodSpec("ar")]
    methods += [MethodSpec("draft_model", k) for k in fixed_ks]
    methods.append(MethodSpec("ngram", ngram_k))
    methods.append(cmasd(k_max))
    methods += [cmasd_exact(k_max, threshold=threshold_default if t is None else t) for t in thresholds]
    methods += [cmasd_confidence(k_max, leniency=leniency_default if v is None else v) for v in leniencies]
    methods.append(cmasd_topk(k_max, topk_beta=_config_default("topk_beta"), topk_tau=_config_default("topk_tau")))
    methods += [rstitch(k_max, h) for h in rstitch_entropies]
    methods += [specbound(k_max), cmasd_budget(k_max)]
    methods += [MethodSpec("eagle3", k) for k in eagle3_ks]
    methods.append(cmasd_eagle3(k_max))
    return tuple(methods)


PRESETS: dict[str, Preset] = {
    # <= 20 minutes on 2 idle CPU cores with the real SmolLM2 pair (10 engines x 2 rounds).
    "quick": Preset("quick", prompts_per_task=4, batch_sizes=(1, 4), max_tokens=32, rounds=2, methods=default_methods()),
    # The complete run: 16 prompts per task, batch 1/4/16, a threshold and a leniency
    # sweep; about 2 hours on 2 CPU cores.
    "full": Preset(
        "full",
        prompts_per_task=16,
        batch_sizes=(1, 4, 16),
        max_tokens=128,
        rounds=2,
        methods=default_methods(thresholds=(None, 0.15, 0.5), leniencies=(0.25, 0.5, None, 2.0, 4.0)),
    ),
    # Batch 16, where verification is no longer free: the controller against
    # fixed k and the paper's window; ~3 minutes on 2 CPU cores.
    "batch16": Preset(
        "batch16",
        prompts_per_task=16,
        batch_sizes=(16,),
        max_tokens=32,
        rounds=2,
        methods=(
            MethodSpec("ar"), MethodSpec("draft_model", 2), MethodSpec("draft_model", 4),
            cmasd_exact(8, threshold=_config_default("threshold")), cmasd(8),
            MethodSpec("eagle3", 2), MethodSpec("eagle3", 4), cmasd_eagle3(8),
        ),
    ),
    # For tests on the tiny random-weight pair: 8 engines, one round, seconds each.
    "micro": Preset(
        "micro",
        prompts_per_task=2,
        batch_sizes=(1, 2),
        max_tokens=12,
        rounds=1,
        methods=(
            MethodSpec("ar"), MethodSpec("draft_model", 4), MethodSpec("ngram", 4), cmasd(4), cmasd_exact(4),
            cmasd_confidence(4), cmasd_topk(4), rstitch(4, 1.0), specbound(4), cmasd_budget(4), MethodSpec("eagle3", 4),
            cmasd_eagle3(4),
        ),
        kv_cache_gib=1,
    ),
}


# ---------------------------------------------------------------------------
# Machine


def machine_description() -> dict[str, Any]:
    import torch
    import vllm

    cpu_model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    gpu = None
    if torch.cuda.is_available():
        gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    try:
        from vllm.platforms import current_platform

        vllm_device = current_platform.device_type
    except Exception:  # pragma: no cover - depends on the install
        vllm_device = None
    return {
        "cpu_model": cpu_model,
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": mem_gib,
        "gpu": gpu,
        "vllm_device": vllm_device,
        "torch": torch.__version__,
        "vllm": vllm.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# ---------------------------------------------------------------------------
# Work plan


@dataclass
class Unit:
    """One ``generate`` call: a batch of prompts of one task at one batch size."""

    task: str
    batch_size: int
    prompt_ids: list[str]


def plan_rounds(prompts: dict[str, list[dict]], preset: Preset) -> list[list[Unit]]:
    """Spread every (task, batch size)'s batches over the rounds, each batch once.

    Each batch size runs the same prompts. Batch j of the i-th task goes to
    round (i + j) mod rounds, so the rounds get a similar mix of tasks and batch
    sizes even where a task has fewer batches than there are rounds.
    """
    rounds: list[list[Unit]] = [[] for _ in range(preset.rounds)]
    for batch_size in preset.batch_sizes:
        for i, task in enumerate(preset.tasks):
            ids = [p["id"] for p in prompts[task]]
            for j, start in enumerate(range(0, len(ids), batch_size)):
                rounds[(i + j) % preset.rounds].append(Unit(task, batch_size, ids[start : start + batch_size]))
    return rounds


# ---------------------------------------------------------------------------
# Engine instrumentation


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


def _cmasd_stats(llm):
    drafter = getattr(model_runner(llm), "drafter", None)
    return getattr(drafter, "stats", None)


def _controller_totals(llm) -> dict[str, float]:
    """The controller's running totals so far (metrics.CONTROLLER_TOTALS): steps
    without a drafter pass, catch-ups (catchup.py), exploring, drafter time."""
    drafter = getattr(model_runner(llm), "drafter", None)
    if not hasattr(drafter, "lag"):
        return {}
    return drafter.totals()


def _controller_state(llm) -> dict:
    """What the controller learnt by the end of an engine's calls: the cost fit
    (budget.MeasuredCosts.summary) and the calibration (calibration.AcceptanceCalibration.summary)."""
    drafter = getattr(model_runner(llm), "drafter", None)
    if getattr(drafter, "costs", None) is None:
        return {}
    return {"cost_fit": drafter.costs.summary(), "calibration": drafter.calibration.summary()}


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


# ---------------------------------------------------------------------------
# The run


class _ErrorsOnly:
    """Logging filter: only errors pass."""

    def filter(self, record) -> bool:
        return record.levelno >= 40  # logging.ERROR


def _max_positions(model: str) -> int:
    try:
        config = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return 2048
    return int(config.get("max_position_embeddings") or 2048)


def _chat_token_ids(target: str, prompts: dict[str, list[dict]]) -> dict[str, list[int]]:
    """Each prompt as one user turn through the target's chat template, tokenized once."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target)
    out = {}
    for items in prompts.values():
        for p in items:
            if tokenizer.chat_template:
                ids = tokenizer.apply_chat_template(
                    [{"role": "user", "content": p["prompt"]}], add_generation_prompt=True, tokenize=True
                )
                if isinstance(ids, dict) or hasattr(ids, "keys"):
                    ids = ids["input_ids"]
            else:
                ids = tokenizer(p["prompt"])["input_ids"]
            out[p["id"]] = list(ids)
    return out


def run(
    preset: Preset,
    *,
    target: str | Path,
    draft: str | Path,
    self_draft: str | Path,
    eagle3: str | Path | None = None,
    prompts_path: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    engine_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every method of ``preset``; returns the raw measurements (see report.build).

    The engines' environment is set for the run and restored after it: the
    tests call this in their own process, where it must not change later
    engines. The KV-cache size goes to each engine as ``kv_cache_memory_bytes``,
    not through the environment (VLLM_CPU_KVCACHE_SPACE would beat every later
    engine's own size).
    """
    settings = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    defaults = {
        # vLLM's INFO lines (a stats line every 10 s, the config of every engine)
        # would bury the progress bar; VLLM_LOGGING_LEVEL=INFO brings them back.
        "VLLM_LOGGING_LEVEL": "WARNING",
    }
    settings.update({name: value for name, value in defaults.items() if name not in os.environ})
    with mock.patch.dict(os.environ, settings):
        import logging

        import vllm  # noqa: F401 - registers the plugin before any engine

        # Repeated per engine or per generate call, and harmless here: every engine
        # start after the first re-registers the same CPU kernels, and the CPU
        # worker re-warns that torch's thread count is already bound. A filter, not
        # a level: every engine start re-applies vLLM's logging config, which
        # resets the levels of vLLM's loggers but keeps their filters.
        for name in ("vllm.triton_utils.dispatcher", "vllm.v1.worker.cpu_worker"):
            quiet = logging.getLogger(name)
            if not any(isinstance(f, _ErrorsOnly) for f in quiet.filters):
                quiet.addFilter(_ErrorsOnly())
        from tqdm import tqdm
        from vllm import LLM, SamplingParams

        from vllm_cmasd.engines import on_cpu, shutdown, spec_decode_counters

        install_dispatcher_scan_fix()
        started = time.time()
        target, draft, self_draft = str(target), str(draft), str(self_draft)
        eagle3 = str(eagle3) if eagle3 else None
        drafters = {"draft": draft, "self_draft": self_draft, "eagle3": eagle3}
        data = load_prompts(prompts_path)
        overrides = dict(engine_overrides or {})
        if on_cpu():
            overrides.setdefault("kv_cache_memory_bytes", int(preset.kv_cache_gib * 2**30))
        token_ids = _chat_token_ids(target, {task: data["tasks"][task] for task in preset.tasks})
        # The context must hold prompt + answer; a small model (the tiny test pair)
        # may have fewer positions than llm_kwargs' default max_model_len.
        max_model_len = overrides.setdefault("max_model_len", min(2048, _max_positions(target)))
        prompts, too_long = {}, []
        for task in preset.tasks:
            fits = [p for p in data["tasks"][task] if len(token_ids[p["id"]]) + preset.max_tokens <= max_model_len]
            too_long += [p["id"] for p in data["tasks"][task][: preset.prompts_per_task] if p not in fits]
            prompts[task] = fits[: preset.prompts_per_task]
            if len(prompts[task]) < preset.prompts_per_task:
                raise ValueError(f"only {len(prompts[task])} {task} prompts fit max_model_len {max_model_len}")
        if too_long:
            log(f"[bench] skipped prompts longer than max_model_len {max_model_len}: {too_long}")
        rounds = plan_rounds(prompts, preset)
        params = SamplingParams(temperature=0.0, max_tokens=preset.max_tokens, seed=0)
        warmup_params = SamplingParams(temperature=0.0, max_tokens=8)
        warmup_prompt = {"prompt_token_ids": token_ids[prompts[preset.tasks[0]][0]["id"]]}
        machine = machine_description()

        calls: list[dict[str, Any]] = []
        engine_starts: list[dict[str, Any]] = []
        failed: dict[str, str] = {}
        total = sum(len(units) for units in rounds) * len(preset.methods)
        bar = tqdm(total=total, desc=f"bench {preset.name}", unit="batch", disable=not progress, dynamic_ncols=True)
        for r, units in enumerate(rounds):
            order = list(preset.methods) if r % 2 == 0 else list(reversed(preset.methods))
            for spec in order:
                if spec.label in failed:
                    bar.update(len(units))
                    continue
                bar.set_postfix_str(f"round {r + 1}/{len(rounds)} {spec.label}")
                t0 = time.perf_counter()
                llm = probe = stats = None
                # The previous engine is garbage now; freezing what is left makes
                # vLLM's gc.collect() calls during startup cheap (seconds per engine
                # on a big heap). vLLM unfreezes everything again at shutdown.
                gc.collect()
                gc.freeze()
                try:
                    llm = LLM(**spec.engine_kwargs(target, drafters, overrides))
                    llm.generate([warmup_prompt], warmup_params, use_tqdm=False)
                except Exception as exc:  # a method that cannot start must not sink the others
                    failed[spec.label] = f"{type(exc).__name__}: {exc}"
                    log(f"[bench] {spec.label}: engine failed, skipped: {failed[spec.label]}")
                    if llm is not None:
                        shutdown(llm)
                    llm = None
                    bar.update(len(units))
                    continue
                engine_starts.append(
                    {"label": spec.label, "round": r, "seconds": time.perf_counter() - t0, **weight_memory(llm)}
                )
                probe = instrument(llm)
                stats = _cmasd_stats(llm)
                try:
                    for unit in units:
                        before_counters = spec_decode_counters(llm)
                        before_probe = probe.snapshot()
                        before_hist = list(stats.length_histogram) if stats is not None else None
                        before_totals = _controller_totals(llm)
                        batch = [{"prompt_token_ids": token_ids[pid]} for pid in unit.prompt_ids]
                        start = time.perf_counter()
                        outputs = llm.generate(batch, params, use_tqdm=False)
                        seconds = time.perf_counter() - start
                        after_counters = spec_decode_counters(llm)
                        after_probe = probe.snapshot()
                        call = {
                            "label": spec.label,
                            "round": r,
                            "task": unit.task,
                            "batch_size": unit.batch_size,
                            "prompt_ids": unit.prompt_ids,
                            "seconds": seconds,
                            "output_token_ids": [list(o.outputs[0].token_ids) for o in outputs],
                            "texts": [o.outputs[0].text for o in outputs],
                            "engine_steps": after_probe[0] - before_probe[0],
                            "propose_s": after_probe[1] - before_probe[1],
                            "proposed_lengths": _diff_hist(before_probe[2], after_probe[2]),
                            "num_drafts": after_counters["num_drafts"] - before_counters["num_drafts"],
                            "num_draft_tokens": after_counters["num_draft_tokens"] - before_counters["num_draft_tokens"],
                            "num_accepted_tokens": after_counters["num_accepted_tokens"]
                            - before_counters["num_accepted_tokens"],
                            "accepted_per_position": _diff_list(
                                before_counters["accepted_per_position"], after_counters["accepted_per_position"]
                            ),
                        }
                        if stats is not None:
                            call["cmasd_length_histogram"] = _diff_list(before_hist, list(stats.length_histogram))
                            call.update(
                                {name: value - before_totals[name] for name, value in _controller_totals(llm).items()}
                            )
                        calls.append(call)
                        bar.update(1)
                    engine_starts[-1].update(_controller_state(llm))
                except Exception as exc:
                    failed[spec.label] = f"{type(exc).__name__}: {exc}"
                    log(f"[bench] {spec.label}: failed while generating, dropped: {failed[spec.label]}")
                    calls = [c for c in calls if c["label"] != spec.label]
                finally:
                    shutdown(llm)
                    llm = probe = stats = None
        bar.close()
        machine["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        return {
            "preset": asdict(preset),
            "target": target,
            "draft": draft,
            "self_draft": self_draft,
            "eagle3": eagle3,
            "prompts_version": data.get("version"),
            "prompts": {
                task: [{"id": p["id"], "source": p["source"], "prompt_tokens": len(token_ids[p["id"]])} for p in items]
                for task, items in prompts.items()
            },
            "skipped_too_long": too_long,
            "methods": [{"label": m.label, "method": m.method, "k": m.k, "cmasd": m.cmasd} for m in preset.methods],
            "machine": machine,
            "engine_overrides": overrides,
            "calls": calls,
            "engine_starts": engine_starts,
            "failed": failed,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "wall_s": time.time() - started,
        }


def _diff_list(before: list, after: list) -> list:
    before = list(before or [])
    after = list(after or [])
    before += [0] * (len(after) - len(before))
    return [a - b for a, b in zip(after, before)]


def _diff_hist(before: dict[int, int], after: dict[int, int]) -> dict[int, int]:
    return {n: c - before.get(n, 0) for n, c in after.items() if c - before.get(n, 0)}


def save_raw(raw: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(raw) + "\n", encoding="utf-8")
