#!/usr/bin/env python
"""Fit the draft's calibration warm start, P(accepted | confidence) per verification policy.

Runs CM-ASD on the tuning prompts (never the benchmark's) once per policy and
writes ``cmasd_calibration.json``, which the controller starts from
(``cmasd.calibration: "auto"``; docs/confidence.md "Calibrated acceptance").
Setup copies the shipped file next to the assembled draft.

    .venv/bin/python scripts/fit_calibration.py --out drafts/smollm2-135m-draft-rv/cmasd_calibration.json
    .venv/bin/python scripts/fit_calibration.py --draft models/smollm2-135m-eagle3 --draft-method eagle3 \
        --out drafts/smollm2-135m-eagle3/cmasd_calibration.json
"""

from __future__ import annotations

import argparse

from vllm_cmasd.bench.prompts import TUNING_PROMPTS
from vllm_cmasd.calibration import fit_warm_start
from vllm_cmasd.engines import DEFAULT_DRAFT, DEFAULT_TARGET, preload_openmp_and_reexec
from vllm_cmasd.policies import VERIFICATION_POLICIES
from vllm_cmasd.vllm_patch import PROPOSER_METHODS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=str(DEFAULT_TARGET))
    parser.add_argument("--draft", default=str(DEFAULT_DRAFT))
    parser.add_argument("--draft-method", default="draft_model", choices=sorted(PROPOSER_METHODS),
                        help="vLLM's speculative method of --draft (eagle3: an EAGLE-3 head)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--policies", nargs="+", default=list(VERIFICATION_POLICIES), choices=VERIFICATION_POLICIES)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    preload_openmp_and_reexec()
    curves = fit_warm_start(args.target, args.draft, args.out, args.policies, TUNING_PROMPTS, max_tokens=args.max_tokens,
                            draft_method=args.draft_method)
    for policy, curve in curves.items():
        print(f"{policy:15} " + " ".join(f"{p:.2f}" for p in curve))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
