"""vLLM's CPU platform with Ray tensor parallelism (opt-in: ``VLLM_CMASD_CPU_RAY=1``).

vLLM 0.32's CPU build refuses ``--distributed-executor-backend ray``: its
``CpuPlatform.ray_device_key`` is empty ("current platform cpu does not
support ray"). This module is a ``vllm.platform_plugins`` entry point that,
only while ``VLLM_CMASD_CPU_RAY`` is set, supplies :class:`CpuRayPlatform`:
vLLM's ``CpuPlatform`` unchanged except for what Ray needs:

* ``ray_device_key = "cmasd_cpu_rank"``: a Ray custom resource, one unit per
  CPU rank. vLLM's Ray executors reserve one unit per rank in their placement
  group and give each worker actor ``resources={key: 1}``. It cannot be
  ``"CPU"``: Ray forbids ``"CPU"`` (and ``"GPU"``) inside ``resources=``.
  So the Ray cluster has to offer the resource: start it with
  ``resources={"cmasd_cpu_rank": N}`` (``ray start --resources``), or let
  vLLM start Ray and this platform adds the resource to that local node.
* ``RuntimeContext.get_accelerator_ids()`` also reports ``cmasd_cpu_rank``,
  with no ids, in every process on this platform. vLLM's Ray worker asks Ray
  for the accelerator ids of its device key
  (``get_node_and_physical_gpu_ids``), and Ray only knows accelerator
  resources (GPU, TPU, ...): a custom key raised ``KeyError``. A CPU rank has
  no device ids, and vLLM's CPU worker uses none.
* ``ray_noset_device_env_vars = ["VLLM_CMASD_CPU_RAY"]``: the one list vLLM
  sets to "1" in every Ray worker actor's runtime environment (both Ray
  executors), so the workers resolve this same platform even on a Ray
  cluster started without the switch.

With the switch unset (or on a non-CPU build of vLLM) the entry point
returns None and vLLM's own platform detection is untouched; on GPUs Ray
works in vLLM as it is. Each Ray worker actor has ``num_cpus=0``, so Ray
gives it ``OMP_NUM_THREADS=1`` unless the environment sets it. Details and
the rank-agreement argument: docs/ray.md.
"""

from __future__ import annotations

import functools
import json
import logging
import os

SWITCH = "VLLM_CMASD_CPU_RAY"
RAY_RESOURCE = "cmasd_cpu_rank"

logger = logging.getLogger(__name__)


def switch_is_on() -> bool:
    return os.environ.get(SWITCH, "").strip().lower() in ("1", "true", "yes", "on")


def platform_plugin() -> str | None:
    """The ``vllm.platform_plugins`` entry point: our platform's qualname, or None."""
    if not switch_is_on():
        return None
    from vllm.platforms import cpu_platform_plugin

    if cpu_platform_plugin() is None:
        logger.warning(
            "%s is set but this is not vLLM's CPU build; ignoring it (Ray needs no switch there).",
            SWITCH,
        )
        return None
    return f"{__name__}.CpuRayPlatform"


def _report_cpu_ranks_as_accelerators() -> None:
    """Make ``RuntimeContext.get_accelerator_ids()`` list our resource (no ids). Idempotent."""
    try:
        from ray.runtime_context import RuntimeContext
    except ImportError:  # no Ray, no Ray executor
        return
    original = RuntimeContext.get_accelerator_ids
    if getattr(original, "_cmasd_cpu_ranks", False):
        return

    @functools.wraps(original)
    def get_accelerator_ids(self):
        ids = original(self)
        ids.setdefault(RAY_RESOURCE, [])
        return ids

    get_accelerator_ids._cmasd_cpu_ranks = True
    RuntimeContext.get_accelerator_ids = get_accelerator_ids


def _offer_ranks_if_vllm_starts_ray(world_size: int) -> None:
    """Give a local Ray node that vLLM starts itself our resource.

    With no ``RAY_ADDRESS`` (and no ``ray start`` cluster on the machine) the
    engine process starts its own local Ray with a bare ``ray.init()``; Ray
    reads extra node resources from ``RAY_OVERRIDE_RESOURCES``, which that
    process inherits from here. A Ray reached through an address is left
    alone: it must offer the resource itself. One rank slot per core.
    """
    if os.environ.get("RAY_ADDRESS") or "RAY_OVERRIDE_RESOURCES" in os.environ:
        return
    ranks = max(world_size, os.cpu_count() or 1)
    os.environ["RAY_OVERRIDE_RESOURCES"] = json.dumps({RAY_RESOURCE: ranks})


def _make_class():
    from vllm.platforms.cpu import CpuPlatform

    class CpuRayPlatform(CpuPlatform):
        """vLLM's CpuPlatform, plus a Ray resource per CPU rank."""

        ray_device_key: str = RAY_RESOURCE
        ray_noset_device_env_vars: list[str] = [SWITCH]

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _report_cpu_ranks_as_accelerators()

        @classmethod
        def check_and_update_config(cls, vllm_config) -> None:
            super().check_and_update_config(vllm_config)
            parallel = vllm_config.parallel_config
            if parallel.use_ray:
                _offer_ranks_if_vllm_starts_ray(parallel.world_size)

    return CpuRayPlatform


def __getattr__(name: str):
    # Built on first use, so loading the entry point (every vLLM process, any
    # platform) imports nothing from vLLM while the switch is off.
    if name == "CpuRayPlatform":
        cls = _make_class()
        cls.__module__, cls.__qualname__ = __name__, name
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
