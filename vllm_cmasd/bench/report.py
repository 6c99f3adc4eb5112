"""Turn the runner's raw measurements into bench.json records, bench.md and plots.

Definitions (see docs/notes/benchmark.md for the reasoning):

* ``tokens_per_s``: output tokens / wall seconds of the ``generate`` calls
  (engine start and warm-up excluded), summed over the batches of that
  (method, setting, task, batch size).
* ``speedup_vs_ar``: tokens_per_s / AR's tokens_per_s on the same prompts and batch size.
* ``speedup_by_round``: the same within each round (its share of the prompts): how
  far the machine's drift moved the ratio over the run.
* ``speedup_interval``: the 95% confidence interval of the geometric mean of the
  rounds' speedups (Student's t: :mod:`vllm_cmasd.bench.intervals`); None under
  two rounds.
* ``mean_acceptance_length``: 1 + accepted / drafts, vLLM's counters (tokens a
  request gains per verification step in which it drafted; 1.0 for AR).
* ``rollback_rate``: (drafted - accepted) / drafted.
* ``rel_bleu_vs_ar`` (sacrebleu corpus BLEU, 0-100) and ``rouge_l_vs_ar``
  (rouge-score ROUGE-L F1, 0-1, mean over prompts) of the method's text with AR's
  text (same prompts, same batch size) as the reference.
* ``oracle_speedup``: speedup of a drafter that knows in advance how many of its
  k_max drafted tokens the target accepts and drafts exactly those, with the
  same draft model and the measured costs. Under greedy decoding it takes the
  same verification steps as vLLM's draft model at fixed k = k_max (a step that
  accepts a tokens advances a + 1 either way) but drafts and verifies only the
  accepted tokens. Costs, per (task, batch size), from two measured runs: AR's
  time per engine step t_step = T_ar / steps_ar, and the k_max run's extra time
  per drafted token beta = (T_ref - steps_ref * t_step) / drafted_ref; then
  T_oracle = steps_ref * t_step + beta * accepted_ref. ``oracle_fraction`` =
  method speedup / oracle speedup.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from vllm_cmasd.bench.intervals import speedup_interval
from vllm_cmasd.bench.runner import CMASD_METHODS, FIXED_K_METHODS, LOSSY_METHODS, METHODS
from vllm_cmasd.metrics import CONTROLLER_TOTALS

LOSSLESS = frozenset(METHODS) - LOSSY_METHODS
SPECULATIVE = frozenset(METHODS) - {"ar"}


# ---------------------------------------------------------------------------
# Quality


def rel_bleu(hyps: list[str], refs: list[str]) -> float:
    if hyps == refs:
        return 100.0
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hyps, [refs]).score)


def rouge_l(hyps: list[str], refs: list[str]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [1.0 if h == r else scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)]
    return float(sum(scores) / len(scores)) if scores else float("nan")


# ---------------------------------------------------------------------------
# Aggregation


def _sum_hist(hists: list[dict]) -> dict[int, int]:
    out: dict[int, int] = defaultdict(int)
    for h in hists:
        for n, c in h.items():
            out[int(n)] += c
    return dict(sorted(out.items()))


def _list_hist(values: list[int]) -> dict[int, int]:
    return {n: c for n, c in enumerate(values) if c}


def _accepted_length_histogram(num_drafts: float, per_position: list[float]) -> dict[int, int]:
    """Drafts by number of accepted tokens, from vLLM's per-position acceptance counters."""
    if not num_drafts:
        return {}
    ge = [num_drafts] + list(per_position) + [0]  # ge[j] = drafts with >= j accepted
    return {j: int(ge[j] - ge[j + 1]) for j in range(len(ge) - 1) if ge[j] - ge[j + 1]}


class _Group:
    """All calls of one (label, task, batch size)."""

    def __init__(self, calls: list[dict]):
        self.calls = calls
        self.seconds = sum(c["seconds"] for c in calls)
        self.tokens = sum(len(ids) for c in calls for ids in c["output_token_ids"])
        self.steps = sum(c["engine_steps"] for c in calls)
        self.propose_s = sum(c["propose_s"] for c in calls)
        self.drafts = sum(c["num_drafts"] for c in calls)
        self.drafted = sum(c["num_draft_tokens"] for c in calls)
        self.accepted = sum(c["num_accepted_tokens"] for c in calls)
        width = max((len(c["accepted_per_position"]) for c in calls), default=0)
        self.per_position = [
            sum(c["accepted_per_position"][i] for c in calls if i < len(c["accepted_per_position"]))
            for i in range(width)
        ]
        # By round and prompt: under --repeats a prompt runs once a repeat, each output compared with AR's.
        self.outputs: dict[tuple[int, str], tuple[list[int], str]] = {
            (c["round"], pid): (ids, text)
            for c in calls for pid, ids, text in zip(c["prompt_ids"], c["output_token_ids"], c["texts"])
        }

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")

    def merged(self, other: "_Group") -> "_Group":
        return _Group(self.calls + other.calls)


def _fit_costs(points: list[tuple[str, float, float, float]]) -> dict[str, Any]:
    """Least squares T = P_task + alpha * steps + beta * drafted over (task, T, steps, drafted)."""
    import numpy as np

    tasks = sorted({p[0] for p in points})
    if len(points) < len(tasks) + 2 or len({p[3] for p in points}) < 2:
        return {"ok": False, "reason": "too few runs to fit"}
    rows = [[1.0 if p[0] == t else 0.0 for t in tasks] + [p[2], p[3]] for p in points]
    y = [p[1] for p in points]
    coef, *_ = np.linalg.lstsq(np.array(rows), np.array(y), rcond=None)
    alpha, beta = float(coef[-2]), float(coef[-1])
    fitted = np.array(rows) @ coef
    resid = float(np.sqrt(np.mean((fitted - np.array(y)) ** 2)))
    ok = alpha > 0 and beta > 0
    return {
        "ok": ok,
        "alpha_s_per_step": alpha,
        "beta_s_per_drafted_token": beta,
        "prefill_s": {t: float(c) for t, c in zip(tasks, coef[: len(tasks)])},
        "rms_residual_s": resid,
        "num_points": len(points),
        **({} if ok else {"reason": "fit gave a non-positive cost"}),
    }


def build(raw: dict[str, Any]) -> dict[str, Any]:
    """bench.json's content from the runner's raw measurements."""
    methods = {m["label"]: m for m in raw["methods"]}
    groups: dict[tuple[str, str, int], _Group] = {}
    by_key: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for c in raw["calls"]:
        by_key[(c["label"], c["task"], c["batch_size"])].append(c)
    for key, calls in by_key.items():
        groups[key] = _Group(calls)
    tasks = list(raw["preset"]["tasks"])
    batch_sizes = list(raw["preset"]["batch_sizes"])
    machine = raw["machine"]
    # Weights as loaded in each engine (the same every round).
    memory = {e["label"]: e for e in raw["engine_starts"]}

    cmasd_kmax = [m["k"] for m in raw["methods"] if m["method"] in CMASD_METHODS]
    fixed = sorted(m["k"] for m in raw["methods"] if m["method"] == "draft_model")
    k_ref = max(cmasd_kmax) if cmasd_kmax else (max(fixed) if fixed else None)
    ref_label = next(
        (m["label"] for m in raw["methods"] if m["method"] == "draft_model" and m["k"] == k_ref), None
    )

    # A cross-check of the two-point costs below: per batch size, a least-squares
    # fit of T = P_task + alpha * steps + beta * drafted over AR and every fixed k.
    cost_fits: dict[int, dict[str, Any]] = {}
    for bs in batch_sizes:
        points = [
            (task, g.seconds, g.steps, g.drafted)
            for (label, task, b), g in groups.items()
            if b == bs and methods[label]["method"] in ("ar", "draft_model")
        ]
        cost_fits[bs] = _fit_costs(points)

    def oracle(pairs: list[tuple[_Group | None, _Group | None]]) -> dict[str, Any] | None:
        """The oracle over (AR group, k_max group) pairs, one pair per task."""
        if ref_label is None or not pairs or any(ar is None or ref is None or not ar.steps for ar, ref in pairs):
            return None
        t_oracle = t_ar = tokens = 0.0
        betas = []
        for ar, ref in pairs:
            t_step = ar.seconds / ar.steps
            beta = max(0.0, (ref.seconds - ref.steps * t_step) / ref.drafted) if ref.drafted else 0.0
            betas.append(beta)
            t_oracle += ref.steps * t_step + beta * ref.accepted
            t_ar += ar.seconds
            tokens += ref.tokens
        ar_tps = sum(ar.tokens for ar, _ in pairs) / t_ar
        return {
            "oracle_speedup": tokens / max(t_oracle, 1e-9) / ar_tps,
            "oracle_tokens_per_s": tokens / max(t_oracle, 1e-9),
            "oracle_beta_s_per_drafted_token": sum(betas) / len(betas),
            "oracle_step_s": sum(ar.seconds / ar.steps for ar, _ in pairs) / len(pairs),
        }

    def record(label: str, task: str, bs: int, g: _Group, ar: _Group | None, orc: dict | None) -> dict[str, Any]:
        m = methods[label]
        method = m["method"]
        ar_tps = ar.tps if ar is not None else None
        by_round = _by_round(g, ar) if ar is not None else []
        rec: dict[str, Any] = {
            "method": method,
            "setting": label,
            "task": task,
            "batch_size": bs,
            "k": m["k"],
            "k_max": m["k"] if method in CMASD_METHODS else None,
            "cmasd": m["cmasd"],
            "num_prompts": len(g.outputs),
            "num_batches": len(g.calls),
            "output_tokens": g.tokens,
            "seconds": g.seconds,
            "tokens_per_s": g.tps,
            "speedup_vs_ar": g.tps / ar_tps if ar_tps else None,
            "speedup_by_round": by_round,
            "speedup_interval": speedup_interval(by_round),
            "engine_steps": g.steps,
            "tokens_per_engine_step": g.tokens / g.steps if g.steps else None,
            "num_drafts": g.drafts,
            "num_draft_tokens": g.drafted,
            "num_accepted_tokens": g.accepted,
            "mean_draft_length": g.drafted / g.drafts if g.drafts else (0.0 if method == "ar" else None),
            "mean_acceptance_length": 1 + g.accepted / g.drafts if g.drafts else 1.0,
            "draft_length_histogram": {},
            "accepted_length_histogram": _accepted_length_histogram(g.drafts, g.per_position),
            "rollback_rate": (g.drafted - g.accepted) / g.drafted if g.drafted else None,
            "draft_time_s": g.propose_s,
            "lossless": method in LOSSLESS,
            "target_weight_bytes": memory.get(label, {}).get("target_weight_bytes"),
            "draft_weight_bytes": memory.get(label, {}).get("draft_weight_bytes"),
        }
        if method in CMASD_METHODS:
            rec["draft_length_histogram"] = _sum_hist(
                [_list_hist(c.get("cmasd_length_histogram", [])) for c in g.calls]
            )
            # Steps the draft budget ran without a drafter pass, and what catching up cost.
            for name in CONTROLLER_TOTALS:
                rec[name] = sum(c.get(name, 0) for c in g.calls)
        elif method in SPECULATIVE:
            rec["draft_length_histogram"] = _sum_hist([c["proposed_lengths"] for c in g.calls]) or (
                {m["k"]: g.drafts} if g.drafts else {}
            )
        if ar is not None:
            ids = sorted(set(g.outputs) & set(ar.outputs))
            hyps = [g.outputs[i][1] for i in ids]
            refs = [ar.outputs[i][1] for i in ids]
            same = sum(g.outputs[i][0] == ar.outputs[i][0] for i in ids)
            rec.update(
                rel_bleu_vs_ar=rel_bleu(hyps, refs),
                rouge_l_vs_ar=rouge_l(hyps, refs),
                num_identical_to_ar=same,
                identical_to_ar=same == len(ids) and len(ids) > 0,
            )
        else:
            rec.update(rel_bleu_vs_ar=None, rouge_l_vs_ar=None, num_identical_to_ar=None, identical_to_ar=None)
        if method in SPECULATIVE and orc is not None:
            rec["oracle_speedup"] = orc["oracle_speedup"]
            rec["oracle_fraction"] = rec["speedup_vs_ar"] / orc["oracle_speedup"] if rec["speedup_vs_ar"] else None
            rec["oracle_costs"] = {
                "step_s": orc["oracle_step_s"],
                "beta_s_per_drafted_token": orc["oracle_beta_s_per_drafted_token"],
            }
        else:
            rec["oracle_speedup"] = rec["oracle_fraction"] = rec["oracle_costs"] = None
        rec["machine"] = machine
        return rec

    ar_label = next((m["label"] for m in raw["methods"] if m["method"] == "ar"), None)
    records, summary = [], []
    for bs in batch_sizes:
        for label in methods:
            if label in raw.get("failed", {}) and not any(k[0] == label for k in groups):
                continue
            per_task = []
            for task in tasks:
                g = groups.get((label, task, bs))
                if g is None:
                    continue
                ar = groups.get((ar_label, task, bs)) if ar_label else None
                orc = oracle([(ar, groups.get((ref_label, task, bs)))])
                records.append(record(label, task, bs, g, ar, orc))
                per_task.append(task)
            if not per_task:
                continue
            merged = _merge([groups[(label, t, bs)] for t in per_task])
            ar_all = None
            if ar_label and all((ar_label, t, bs) in groups for t in per_task):
                ar_all = _merge([groups[(ar_label, t, bs)] for t in per_task])
            orc = oracle([(groups.get((ar_label, t, bs)), groups.get((ref_label, t, bs))) for t in per_task])
            summary.append(record(label, "all", bs, merged, ar_all, orc))
    for rows in (records, summary):  # vLLM's best fixed k, per method (draft model, EAGLE-3 head)
        best: dict[tuple[str, str, int], dict] = {}
        for rec in rows:
            if rec["method"] in FIXED_K_METHODS:
                key = (rec["method"], rec["task"], rec["batch_size"])
                if key not in best or rec["tokens_per_s"] > best[key]["tokens_per_s"]:
                    best[key] = rec
        for rec in rows:
            if rec["method"] in FIXED_K_METHODS:
                rec["best_fixed_k"] = rec is best[(rec["method"], rec["task"], rec["batch_size"])]
    return {
        "schema_version": 1,
        "preset": raw["preset"]["name"],
        "preset_settings": raw["preset"],
        "target": raw["target"],
        "draft": raw["draft"],
        "self_draft": raw.get("self_draft"),
        "prompts_version": raw["prompts_version"],
        "prompts": raw["prompts"],
        "machine": machine,
        "engine_overrides": raw.get("engine_overrides", {}),
        "started_at": raw["started_at"],
        "wall_s": raw["wall_s"],
        "engine_starts": raw["engine_starts"],
        "failed": raw.get("failed", {}),
        "oracle": {
            "reference_setting": ref_label,
            "k_max": k_ref,
            "definition": "T_oracle = steps_ref * (T_ar / steps_ar) + beta * accepted_ref, "
            "beta = (T_ref - steps_ref * T_ar / steps_ar) / drafted_ref, per (task, batch size)",
            "cost_fit_by_batch_size": {str(bs): c for bs, c in cost_fits.items()},
        },
        "records": records,
        "summary": summary,
    }


def _merge(groups: list[_Group]) -> _Group:
    return _Group([c for g in groups for c in g.calls])


def _by_round(g: _Group, ar: _Group) -> list[float]:
    """tokens_per_s over AR's in each round both ran calls in."""
    rounds = sorted({c["round"] for c in g.calls} & {c["round"] for c in ar.calls})
    return [
        _Group([c for c in g.calls if c["round"] == r]).tps / _Group([c for c in ar.calls if c["round"] == r]).tps
        for r in rounds
    ]


# ---------------------------------------------------------------------------
# Output


def _fmt(value: Any, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec)


def _fmt_range(values: list[float] | tuple[float, float] | None) -> str:
    """min-max of two or more values (of an interval: low-high)."""
    if not values or len(values) < 2:
        return "-"
    return f"{min(values):.2f}-{max(values):.2f}"


def _table(rows: list[dict]) -> list[str]:
    head = (
        "| method | setting | batch | tok/s | speedup | by round | 95% CI | acc. len | draft len | rollback | "
        "BLEU vs AR | ROUGE-L vs AR | identical | oracle speedup | of oracle | draft weights MiB |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        setting = r["setting"] + (" (best k)" if r.get("best_fixed_k") else "")
        identical = f"{r['num_identical_to_ar']}/{r['num_prompts']}" if r["num_identical_to_ar"] is not None else "-"
        draft_mib = r.get("draft_weight_bytes")
        draft_mib = None if draft_mib is None else draft_mib / 2**20
        lines.append(
            f"| {r['method']} | {setting} | {r['batch_size']} | {_fmt(r['tokens_per_s'], '.1f')} | "
            f"{_fmt(r['speedup_vs_ar'])} | {_fmt_range(r.get('speedup_by_round'))} | "
            f"{_fmt_range(r.get('speedup_interval'))} | "
            f"{_fmt(r['mean_acceptance_length'])} | {_fmt(r['mean_draft_length'])} | "
            f"{_fmt(r['rollback_rate'], '.1%')} | {_fmt(r['rel_bleu_vs_ar'], '.1f')} | {_fmt(r['rouge_l_vs_ar'], '.3f')} | "
            f"{identical} | {_fmt(r['oracle_speedup'])} | {_fmt(r['oracle_fraction'], '.0%')} | {_fmt(draft_mib, '.1f')} |"
        )
    return lines


def markdown(bench: dict[str, Any], command: str | None = None) -> str:
    m = bench["machine"]
    lines = [
        f"# CM-ASD benchmark: preset `{bench['preset']}`",
        "",
        f"- started {bench['started_at']}, {bench['wall_s'] / 60:.1f} min in all"
        + (f"; command: `{command}`" if command else ""),
        f"- machine: {m['cpu_model']}, {m['cpu_cores']} cores ({m.get('cpu_cores_usable')} usable), "
        f"{m.get('memory_gib')} GiB, GPU: {m.get('gpu') or 'none'}; torch {m['torch']}, vLLM {m['vllm']}; "
        f"load average at start/end: {_fmt((m.get('load_average_at_start') or [None])[0])} / "
        f"{_fmt((m.get('load_average_at_end') or [None])[0])}",
        f"- target `{bench['target']}`, draft `{bench['draft']}`, self-draft `{bench.get('self_draft')}`; prompts v{bench['prompts_version']}, "
        f"{bench['preset_settings']['prompts_per_task']} per task, max {bench['preset_settings']['max_tokens']} "
        f"new tokens, greedy, {bench['preset_settings']['rounds'] * bench['preset_settings'].get('repeats', 1)} "
        f"round(s), interleaved by "
        f"{bench['preset_settings'].get('interleave', 'rounds')}",
        f"- oracle reference: `{bench['oracle']['reference_setting']}`; measured costs (all tasks): "
        + "; ".join(
            f"batch {r['batch_size']}: {_fmt(r['oracle_costs']['step_s'], '.3f')} s per step, "
            f"{_fmt(r['oracle_costs']['beta_s_per_drafted_token'], '.4f')} s per drafted token"
            for r in bench["summary"]
            if r["setting"] == bench["oracle"]["reference_setting"] and r.get("oracle_costs")
        ),
    ]
    if bench.get("failed"):
        lines.append("- **failed to run**: " + "; ".join(f"`{k}`: {v[:200]}" for k, v in bench["failed"].items()))
    lines += ["", "## All tasks", ""] + _table(bench["summary"])
    tasks = sorted({r["task"] for r in bench["records"]}, key=lambda t: [r["task"] for r in bench["records"]].index(t))
    for task in tasks:
        lines += ["", f"## {task}", ""] + _table([r for r in bench["records"] if r["task"] == task])
    lines += [
        "",
        "Columns: tok/s = output tokens per second of generate calls; speedup vs plain decoding (AR) on the same "
        "prompts and batch size; by round = the lowest and highest of the same speedup within each round (the "
        "machine's drift); 95% CI = the 95% confidence interval of the rounds' geometric mean speedup (Student's t "
        "over the rounds' log ratios; each round runs new engines); acc. len = mean tokens per verification step that had a draft (1 + accepted/drafts); "
        "draft len = mean drafted tokens per draft; rollback = rejected / drafted tokens; BLEU (0-100) and ROUGE-L F1 "
        "(0-1) use AR's text as the reference; identical = outputs (a prompt's, once a repeat) whose tokens equal AR's; oracle speedup = "
        "a drafter that drafts exactly the tokens that will be accepted (k_max, same draft, measured costs); "
        "of oracle = speedup / oracle speedup; draft weights = the drafter's weights not shared with the target "
        "(0 for the self-draft). Definitions: docs/notes/benchmark.md.",
        "",
    ]
    return "\n".join(lines)


def plots(bench: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    summary = bench["summary"]
    if not summary:
        return written
    batch_sizes = sorted({r["batch_size"] for r in summary})
    labels = list(dict.fromkeys(r["setting"] for r in summary))
    colors = {
        "ar": "tab:gray",
        "draft_model": "tab:blue",
        "ngram": "tab:olive",
        "cmasd": "tab:orange",
        "cmasd_exact": "tab:green",
        "cmasd_confidence": "tab:red",
        "cmasd_topk": "gold",
        "rstitch": "tab:purple",
        "specbound": "tab:brown",
        "cmasd_budget": "tab:cyan",
        "eagle3": "tab:pink",
        "cmasd_eagle3": "darkorange",
    }
    method_of = {r["setting"]: r["method"] for r in summary}

    # 1. Speedup per setting and batch size.
    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(5 + 2.5 * len(batch_sizes), 4.5), squeeze=False, sharey=True)
    for ax, bs in zip(axes[0], batch_sizes):
        rows = {r["setting"]: r for r in summary if r["batch_size"] == bs}
        names = [lab for lab in labels if lab in rows]
        values = [rows[n]["speedup_vs_ar"] or 0 for n in names]
        ax.barh(range(len(names)), values, color=[colors[method_of[n]] for n in names])
        oracles = [(i, rows[n]["oracle_speedup"]) for i, n in enumerate(names) if rows[n]["oracle_speedup"]]
        if oracles:
            ax.axvline(oracles[0][1], color="k", linestyle=":", label="oracle (k_max)")
            ax.legend(loc="lower right", fontsize=8)
        ax.axvline(1.0, color="k", linewidth=0.8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"batch {bs}")
        ax.set_xlabel("speedup vs plain decoding")
    fig.suptitle("Output-token throughput relative to plain decoding (all tasks)")
    fig.tight_layout()
    path = out_dir / "speedup.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    # 2. Speed/quality trade-off.
    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(5 * len(batch_sizes), 4.2), squeeze=False)
    for ax, bs in zip(axes[0], batch_sizes):
        rows = [r for r in summary if r["batch_size"] == bs and r["speedup_vs_ar"] is not None]
        # The lossy methods' knob: each is drawn as a curve along it.
        curves = {"cmasd_confidence": ("leniency", "δ="), "cmasd_topk": ("topk_tau", "τ="),
                  "rstitch": ("rstitch_entropy", "H<")}
        for method in colors:
            pts = [r for r in rows if r["method"] == method]
            if method in curves:
                pts.sort(key=lambda r: (r["cmasd"] or {}).get(curves[method][0], 0.0))
            if not pts:
                continue
            xs = [r["speedup_vs_ar"] for r in pts]
            ys = [r["rel_bleu_vs_ar"] for r in pts]
            style = "-o" if method in curves and len(pts) > 1 else "o"
            ax.plot(xs, ys, style, color=colors[method], label=method)
            for r in pts:
                if method in curves:
                    knob, prefix = curves[method]
                    text = f"{prefix}{(r['cmasd'] or {}).get(knob, 'default')}"
                elif method in FIXED_K_METHODS | {"ngram"}:
                    text = f"k={r['k']}"
                else:
                    text = ""
                if text:
                    ax.annotate(text, (r["speedup_vs_ar"], r["rel_bleu_vs_ar"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("speedup vs plain decoding")
        ax.set_ylabel("BLEU vs plain decoding's text")
        ax.set_title(f"batch {bs}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Speed / quality trade-off (all tasks)")
    fig.tight_layout()
    path = out_dir / "tradeoff.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    # 3. Draft-length histograms of the adaptive and variable-length methods.
    adaptive = [r for r in summary if r["method"] in CMASD_METHODS | {"ngram"} and r["draft_length_histogram"]]
    if adaptive:
        fig, axes = plt.subplots(1, len(batch_sizes), figsize=(5 * len(batch_sizes), 4), squeeze=False)
        for ax, bs in zip(axes[0], batch_sizes):
            rows = [r for r in adaptive if r["batch_size"] == bs]
            width = 0.8 / max(len(rows), 1)
            for i, r in enumerate(rows):
                hist = {int(n): c for n, c in r["draft_length_histogram"].items()}
                total = sum(hist.values()) or 1
                xs = sorted(hist)
                ax.bar([x + i * width for x in xs], [hist[x] / total for x in xs], width=width, label=r["setting"])
            ax.set_xlabel("drafted tokens per draft")
            ax.set_ylabel("fraction of drafts")
            ax.set_title(f"batch {bs}")
            ax.legend(fontsize=6)
        fig.suptitle("Draft-length histograms (all tasks)")
        fig.tight_layout()
        path = out_dir / "draft_lengths.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # 4. Acceptance length and rollback per setting.
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    spec = [lab for lab in labels if method_of[lab] != "ar"]
    for bs_i, bs in enumerate(batch_sizes):
        rows = {r["setting"]: r for r in summary if r["batch_size"] == bs}
        xs = [i + bs_i * 0.8 / len(batch_sizes) for i in range(len(spec))]
        axes[0].bar(xs, [rows[n]["mean_acceptance_length"] if n in rows else 0 for n in spec], width=0.8 / len(batch_sizes), label=f"batch {bs}")
        axes[1].bar(xs, [(rows[n]["rollback_rate"] or 0) if n in rows else 0 for n in spec], width=0.8 / len(batch_sizes), label=f"batch {bs}")
    for ax, title in zip(axes, ("mean acceptance length (tokens per step)", "rollback rate (rejected / drafted)")):
        ax.set_xticks(range(len(spec)), spec, rotation=60, ha="right", fontsize=7)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "acceptance.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    # 5. What the controller learnt, per engine: reliability diagram and cost curves.
    learnt = [e for e in bench.get("engine_starts", []) if e.get("calibration") and e.get("cost_fit")]
    if learnt:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        axes[0].plot([0, 1], [0, 1], "k:", linewidth=0.8, label="perfect calibration")
        for e in learnt:
            rows = e["calibration"]["reliability"]
            axes[0].plot([r["predicted"] for r in rows], [r["observed"] for r in rows], "o-", markersize=3,
                         label=f"{e['label']} (round {e.get('round', '?')})")
            bins = e["calibration"]["num_bins"]
            axes[1].step([(b + 0.5) / bins for b in range(bins)], e["calibration"]["curve"], where="mid",
                         label=e["label"])
            fit = e["cost_fit"]
            line = axes[2].plot(fit["tokens"], [1e3 * t for t in fit["target_s"]], "-", label=f"{e['label']}: target step")
            axes[2].plot(fit["tokens"], [1e3 * t for t in fit["draft_s"]], "--", color=line[0].get_color(),
                         label=f"{e['label']}: drafter pass")
        axes[0].set(xlabel="predicted acceptance", ylabel="observed acceptance", title="Reliability diagram",
                    xlim=(0, 1), ylim=(0, 1))
        axes[1].set(xlabel="drafter confidence", ylabel="P(accepted | confidence)", title="Calibration (end of run)",
                    xlim=(0, 1), ylim=(0, 1))
        axes[2].set(xlabel="tokens in the pass", ylabel="ms", title="Measured cost fit", xscale="log")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        fig.tight_layout()
        path = out_dir / "controller.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write(bench: dict[str, Any], out_dir: Path, command: str | None = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "bench.json", out_dir / "bench.md"]
    paths[0].write_text(json.dumps(bench, indent=1) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(bench, command), encoding="utf-8")
    return paths + plots(bench, out_dir)


def write_outputs(raw: dict[str, Any], path: Path) -> None:
    """Every generated text, one JSON line per (setting, batch size, prompt)."""
    seen = set()
    with open(path, "w", encoding="utf-8") as f:
        for c in raw["calls"]:
            for pid, ids, text in zip(c["prompt_ids"], c["output_token_ids"], c["texts"]):
                key = (c["label"], c["batch_size"], pid)
                if key in seen:
                    continue
                seen.add(key)
                f.write(json.dumps({"setting": c["label"], "batch_size": c["batch_size"], "task": c["task"],
                                    "prompt_id": pid, "num_tokens": len(ids), "text": text}, ensure_ascii=False) + "\n")
