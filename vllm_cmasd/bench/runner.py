"""Run the benchmark: every method on the same prompts, interleaved.

Each method's engine runs in a process of its own (:mod:`vllm_cmasd.bench.host`);
how the methods take turns is the preset's ``interleave`` (:data:`INTERLEAVE_MODES`):
by rounds (one engine at a time, each round's share of the prompt batches, the
order reversed every other round) or by calls (a round holds every engine, each
of its prompt batches on each engine in turn). Either way a drift of the machine's speed over the
run hits every method alike. All engines come from
:func:`vllm_cmasd.engines.llm_kwargs` with identical settings, run in-process in
their child (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and decode greedily. What is
measured per ``generate`` call: :mod:`vllm_cmasd.bench.host`;
:mod:`vllm_cmasd.bench.report` turns it into records, the table and the plots.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable
from unittest import mock

from vllm_cmasd.bench.host import EngineFailed, EngineHost
from vllm_cmasd.bench.prompts import TASKS, load_prompts

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


# How the methods take turns, each engine in a process of its own:
# - "rounds": a round starts each method's engine in turn, runs that round's
#   share of the prompt batches on it and stops it: one engine at a time.
# - "calls": a round starts every method's engine and holds them all; each of
#   the round's prompt batches runs on every engine in turn, so the calls
#   compared ran seconds apart, not minutes (the machines' speed drifts by
#   15-25% between rounds). New engines each round: one engine process can run
#   15-40% slower than the next of the same method for its whole life (docs/notes/
#   eagle3-training.md, fourteenth session), and more rounds average that out.
#   All engines are held at once: for a few methods.
INTERLEAVE_MODES: tuple[str, ...] = ("rounds", "calls")


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
    interleave: str = "rounds"
    """How the methods take turns (:data:`INTERLEAVE_MODES`)."""
    repeats: int = 1
    """The rounds run this many times over (new engines each round, the same
    prompts each time): more rounds of every task where ``rounds`` alone would
    split the prompts into rounds of one task (``batch16``: 6 batches, 2 rounds)."""


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
    """Spread every (task, batch size)'s batches over the rounds, each batch once,
    then the rounds ``repeats`` times over.

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
    return rounds * preset.repeats


# ---------------------------------------------------------------------------
# The run


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

    Each engine runs in a child process of its own (:class:`~vllm_cmasd.bench.host.EngineHost`).
    ``preset.interleave`` says how the methods take turns (:data:`INTERLEAVE_MODES`).

    The engines' environment is set for the run and restored after it: the
    tests call this in their own process, where it must not change later
    engines. The KV-cache size goes to each engine as ``kv_cache_memory_bytes``,
    not through the environment (VLLM_CPU_KVCACHE_SPACE would beat every later
    engine's own size).
    """
    if preset.interleave not in INTERLEAVE_MODES:
        raise ValueError(f"interleave: must be one of {list(INTERLEAVE_MODES)}; got {preset.interleave!r}")
    settings = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    defaults = {
        # vLLM's INFO lines (a stats line every 10 s, the config of every engine)
        # would bury the progress bar; VLLM_LOGGING_LEVEL=INFO brings them back.
        "VLLM_LOGGING_LEVEL": "WARNING",
    }
    settings.update({name: value for name, value in defaults.items() if name not in os.environ})
    with mock.patch.dict(os.environ, settings):
        from tqdm import tqdm

        from vllm_cmasd.engines import on_cpu

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
        warmup_prompt = token_ids[prompts[preset.tasks[0]][0]["id"]]
        machine = machine_description()

        calls: list[dict[str, Any]] = []
        engine_starts: list[dict[str, Any]] = []
        failed: dict[str, str] = {}
        hosts: dict[str, EngineHost] = {}
        latest_start: dict[str, dict[str, Any]] = {}  # each label's engine start record, its learnt state added
        total = sum(len(units) for units in rounds) * len(preset.methods)
        bar = tqdm(total=total, desc=f"bench {preset.name}", unit="batch", disable=not progress, dynamic_ncols=True)

        def start(spec: MethodSpec, r: int) -> None:
            if spec.label in failed:
                return
            # Room for one more engine, judged by the largest started one.
            if hosts:
                import psutil

                need = 1.25 * max(h.rss_bytes() for h in hosts.values())
                if psutil.virtual_memory().available < need:
                    raise MemoryError(
                        f"interleave 'calls': {len(preset.methods)} engines at once do not fit in memory "
                        f"({len(hosts)} started, {psutil.virtual_memory().available / 2**30:.1f} GiB left, "
                        f"~{need / 2**30:.1f} GiB each); run fewer methods or interleave 'rounds'"
                    )
            try:
                host = EngineHost(spec.engine_kwargs(target, drafters, overrides), warmup_prompt=warmup_prompt,
                                  warmup_batch=max(preset.batch_sizes), max_tokens=preset.max_tokens, name=spec.method)
            except EngineFailed as exc:
                failed[spec.label] = str(exc)
                log(f"[bench] {spec.label}: engine failed, skipped: {exc}")
                return
            hosts[spec.label] = host
            engine_starts.append({"label": spec.label, "round": r, **host.start_record})
            latest_start[spec.label] = engine_starts[-1]

        def stop(spec: MethodSpec) -> None:
            host = hosts.pop(spec.label, None)
            if host is None:
                return
            try:
                latest_start[spec.label].update(host.controller_state())
            except EngineFailed:
                pass
            finally:
                host.close()

        def measure(spec: MethodSpec, unit: Unit, r: int) -> None:
            host = hosts.get(spec.label)
            if host is not None:  # else it failed
                bar.set_postfix_str(f"round {r + 1}/{len(rounds)} {spec.label}")
                try:
                    call = host.generate([token_ids[pid] for pid in unit.prompt_ids])
                    calls.append({"label": spec.label, "round": r, "task": unit.task, "batch_size": unit.batch_size,
                                  "prompt_ids": unit.prompt_ids, **call})
                except EngineFailed as exc:
                    failed[spec.label] = str(exc)
                    log(f"[bench] {spec.label}: failed while generating, dropped: {exc}")
                    calls[:] = [c for c in calls if c["label"] != spec.label]
                    hosts.pop(spec.label).close()
            bar.update(1)

        try:
            if preset.interleave == "calls":
                n = 0
                for r, units in enumerate(rounds):
                    for spec in preset.methods:
                        start(spec, r)
                    for unit in units:
                        for spec in turns(preset.methods, n):
                            measure(spec, unit, r)
                        n += 1
                    for spec in preset.methods:
                        stop(spec)
            else:
                for r, units in enumerate(rounds):
                    for spec in turns(preset.methods, r):
                        start(spec, r)
                        for unit in units:
                            measure(spec, unit, r)
                        stop(spec)
        finally:
            for spec in preset.methods:
                stop(spec)
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


def turns(methods, n: int) -> list:
    """The methods' order for the n-th turn: as given, reversed every other
    turn, so that a drift of the machine's speed favours no method."""
    return list(methods) if n % 2 == 0 else list(reversed(methods))


def save_raw(raw: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(raw) + "\n", encoding="utf-8")
