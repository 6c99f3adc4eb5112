#!/usr/bin/env python
"""Train the draft model: ``vllm-cmasd train-draft STAGE [options]`` under its old name.

The code is the package :mod:`vllm_cmasd.training` (its docstring: stages, usage, the
environment; ``--help`` shows them). Unlike ``vllm-cmasd``, this does not preload the
venv's Intel OpenMP: ``export LD_PRELOAD=$PWD/.venv/lib/libiomp5.so`` first.
"""

from vllm_cmasd.training.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
