"""The plugin's draft architectures in vLLM's model registry, their classes built lazily.

An architecture module (``draft_model``, ``self_draft``) defines ``ARCH_NAME``
and a function that builds the class: the class subclasses vLLM's model code,
so it is built when vLLM first looks it up, not when the plugin's entry point
imports the module in every vLLM process.
"""

from __future__ import annotations

from collections.abc import Callable


def register(arch_name: str, module_name: str) -> None:
    """Register ``module_name:arch_name`` with vLLM's ModelRegistry (idempotent)."""
    from vllm import ModelRegistry

    if arch_name not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(arch_name, f"{module_name}:{arch_name}")


def lazy_class(module_globals: dict, arch_name: str, make_class: Callable[[], type]) -> Callable[[str], type]:
    """A module ``__getattr__`` that builds the ``arch_name`` class on first access."""

    def __getattr__(name: str) -> type:
        if name != arch_name:
            raise AttributeError(name)
        cls = make_class()
        # Built inside a function; named as the module attribute it becomes.
        cls.__name__ = cls.__qualname__ = arch_name
        module_globals[name] = cls
        return cls

    return __getattr__
