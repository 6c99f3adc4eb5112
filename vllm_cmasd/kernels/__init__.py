"""Triton kernels of vllm-cmasd, each with a torch twin for platforms without Triton.

:mod:`vllm_cmasd.kernels.verify`: draft verification (used by
:mod:`vllm_cmasd.verification`).
"""
