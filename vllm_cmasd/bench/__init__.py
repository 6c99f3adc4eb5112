"""The CM-ASD benchmark: ``vllm-cmasd bench --preset quick --out DIR``.

* :mod:`~vllm_cmasd.bench.prompts`: the fixed, committed prompt set (prompts.json),
  built from :mod:`~vllm_cmasd.bench.sources` (documents on this machine) and
  :mod:`~vllm_cmasd.bench.templates` (the tasks' wording).
* :mod:`~vllm_cmasd.bench.runner`: presets, the interleaved run.
* :mod:`~vllm_cmasd.bench.host`: one engine in a process of its own, the measurements per call.
* :mod:`~vllm_cmasd.bench.report`: records (bench.json), the table (bench.md), plots.

Method, measures and the oracle bound are defined in docs/notes/benchmark.md.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from pathlib import Path
from typing import Any

__all__ = ["run_bench", "resolve_preset", "add_arguments", "main_from_args"]


def resolve_preset(
    name: str,
    *,
    max_tokens: int | None = None,
    prompts_per_task: int | None = None,
    batch_sizes: tuple[int, ...] | None = None,
    rounds: int | None = None,
    repeats: int | None = None,
    methods: tuple[str, ...] | None = None,
    interleave: str | None = None,
):
    """A named preset with optional overrides (methods: keep only these method names)."""
    from vllm_cmasd.bench.runner import INTERLEAVE_MODES, METHODS, PRESETS

    if name not in PRESETS:
        raise ValueError(f"--preset: must be one of {sorted(PRESETS)}; got {name!r}")
    preset = PRESETS[name]
    changes: dict[str, Any] = {}
    if max_tokens is not None:
        changes["max_tokens"] = max_tokens
    if prompts_per_task is not None:
        changes["prompts_per_task"] = prompts_per_task
    if batch_sizes is not None:
        changes["batch_sizes"] = tuple(batch_sizes)
    if rounds is not None:
        changes["rounds"] = rounds
    if repeats is not None:
        if repeats < 1:
            raise ValueError(f"--repeats: must be a whole number >= 1; got {repeats}")
        changes["repeats"] = repeats
    if methods is not None:
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise ValueError(f"--methods: unknown {unknown}; allowed: {list(METHODS)}")
        changes["methods"] = tuple(m for m in preset.methods if m.method in methods)
    if interleave is not None:
        if interleave not in INTERLEAVE_MODES:
            raise ValueError(f"--interleave: must be one of {list(INTERLEAVE_MODES)}; got {interleave!r}")
        changes["interleave"] = interleave
    return dataclasses.replace(preset, **changes) if changes else preset


def run_bench(
    preset,
    out_dir: str | Path,
    *,
    target: str | Path,
    draft: str | Path,
    self_draft: str | Path,
    eagle3: str | Path | None = None,
    prompts_path: str | Path | None = None,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Run ``preset`` and write bench.json, bench.md, the plots, outputs.jsonl and raw.json to ``out_dir``."""
    from vllm_cmasd.bench import report, runner

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = runner.run(
        preset, target=target, draft=draft, self_draft=self_draft, eagle3=eagle3, prompts_path=prompts_path,
        progress=progress,
    )
    runner.save_raw(raw, out / "raw.json")
    report.write_outputs(raw, out / "outputs.jsonl")
    bench = report.build(raw)
    bench["command"] = command
    report.write(bench, out, command)
    return bench


def add_arguments(parser) -> None:
    from vllm_cmasd.bench.runner import INTERLEAVE_MODES, METHODS, PRESETS
    from vllm_cmasd.engines import DEFAULT_DRAFT, DEFAULT_EAGLE3, DEFAULT_SELF_DRAFT, DEFAULT_TARGET

    parser.add_argument(
        "--preset", default="quick",
        help=f"one of {sorted(PRESETS)}: quick (15-20 min on 2 CPU cores), batch16 (~3 min), full, micro (tests)",
    )
    parser.add_argument("--out", required=True, help="output directory (bench.json, bench.md, *.png)")
    parser.add_argument("--target", default=str(DEFAULT_TARGET))
    parser.add_argument("--draft", default=str(DEFAULT_DRAFT), help="draft model for draft_model and CM-ASD")
    parser.add_argument("--self-draft", default=str(DEFAULT_SELF_DRAFT), help="self-draft for specbound")
    parser.add_argument("--eagle3", default=str(DEFAULT_EAGLE3), help="EAGLE-3 head for eagle3 and cmasd_eagle3")
    parser.add_argument("--prompts", default=None, help="prompt set JSON (default: the committed prompts.json)")
    parser.add_argument("--max-tokens", type=int, default=None, help="override the preset's max new tokens")
    parser.add_argument("--prompts-per-task", type=int, default=None)
    parser.add_argument("--batch-sizes", default=None, help="comma list, e.g. 1,4,16")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    parser.add_argument(
        "--repeats", type=int, default=None,
        help="run the rounds this many times over, the same prompts each time (more rounds of every task)",
    )
    parser.add_argument(
        "--interleave", choices=INTERLEAVE_MODES, default=None,
        help="rounds (the presets' default): one engine at a time, each round's share of the batches; "
             "calls: every engine held at once (few methods), each batch on each engine in turn",
    )
    parser.add_argument("--methods", default=None, help=f"keep only these methods (comma list of {','.join(METHODS)})")
    parser.add_argument("--no-progress", action="store_true")


def main_from_args(args) -> int:
    preset = resolve_preset(
        args.preset,
        max_tokens=args.max_tokens,
        prompts_per_task=args.prompts_per_task,
        batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")) if args.batch_sizes else None,
        rounds=args.rounds,
        repeats=args.repeats,
        methods=tuple(m.strip() for m in args.methods.split(",")) if args.methods else None,
        interleave=args.interleave,
    )
    command = "vllm-cmasd " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    bench = run_bench(
        preset,
        args.out,
        target=args.target,
        draft=args.draft,
        self_draft=args.self_draft,
        eagle3=args.eagle3,
        prompts_path=args.prompts,
        progress=not args.no_progress,
        command=command,
    )
    out = Path(args.out)
    print((out / "bench.md").read_text(encoding="utf-8"))
    print(f"[bench] wrote {out}/bench.json, bench.md and plots in {bench['wall_s'] / 60:.1f} min")
    if bench["failed"]:
        print("[bench] failed settings: " + json.dumps(bench["failed"])[:2000])
    return 0
