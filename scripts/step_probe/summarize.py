#!/usr/bin/env python
"""Summarize scripts/step_probe/sitecustomize.py's per-step CSVs, one file a server.

    .venv/bin/python scripts/step_probe/summarize.py /tmp/steps [--reqs 8]

Per file: its steps; decode steps without drafts (one token a request) at exactly
``--reqs`` requests, median time in the target's forward, in sampling outside
the proposer and in the proposer; the same for steps that verify drafts; steps
with prompt tokens (count, tokens, seconds); and, for a speculative engine, a
least-squares fit of forward + sampling outside the proposer over decode steps
of up to ``--reqs`` requests = a + b x requests + c x draft tokens verified.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

import torch


def median_ms(rows: list[dict[str, float]], column) -> str:
    values = [column(r) for r in rows]
    return f"{1e3 * statistics.median(values):.1f} ms" if values else "-"


def summarize(path: Path, reqs: int, k_max: int) -> None:
    rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(path.open())]
    speculative = any(r["propose"] > 0 for r in rows)
    print(f"{path.name}: {'speculative' if speculative else 'plain'}, {len(rows)} steps")
    outside = lambda r: r["sample"] - r["propose"]  # noqa: E731
    plain_steps = [r for r in rows if r["reqs"] == reqs and r["tokens"] == reqs]
    verifying = [r for r in rows if r["reqs"] == reqs and reqs < r["tokens"] <= reqs * (k_max + 1)]
    groups = [("decode, no drafts", plain_steps)] + ([("decode, verifying drafts", verifying)] if speculative else [])
    for label, steps in groups:
        print(f"  {label} at {reqs} requests: n={len(steps)}, forward {median_ms(steps, lambda r: r['execute'])}, "
              f"sampling outside the proposer {median_ms(steps, outside)}, proposer {median_ms(steps, lambda r: r['propose'])}")
    prompt = [r for r in rows if r["tokens"] > r["reqs"] * (k_max + 1)]
    print(f"  steps with prompt tokens: {len(prompt)}, {sum(r['tokens'] for r in prompt):.0f} tokens, "
          f"{sum(r['execute'] for r in prompt):.2f} s")
    if speculative:
        decode = [r for r in rows if 0 < r["reqs"] <= reqs and r["tokens"] <= r["reqs"] * (k_max + 1)]
        xs = torch.tensor([[1.0, r["reqs"], r["tokens"] - r["reqs"]] for r in decode], dtype=torch.float64)
        ys = torch.tensor([[r["execute"] + outside(r)] for r in decode], dtype=torch.float64)
        a, b, c = (1e3 * v for v in torch.linalg.lstsq(xs, ys).solution[:, 0].tolist())
        print(f"  fit over {len(decode)} decode steps: {a:.2f} ms + {b:.2f} ms a request + {c:.2f} ms a verified draft token")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir")
    parser.add_argument("--reqs", type=int, default=8, help="the batch size whose decode steps are compared")
    parser.add_argument("--k-max", type=int, default=8, help="a decode step holds at most k_max + 1 tokens a request")
    args = parser.parse_args()
    for path in sorted(Path(args.dir).glob("*.csv")):
        summarize(path, args.reqs, args.k_max)


if __name__ == "__main__":
    main()
