"""SpecBound-style self-draft: the target's own first layers and LM head as the drafter.

A self-draft directory (written by :func:`build_self_draft`, normally through
``scripts/build_self_draft.py``) holds the target's config with
``architectures=["CmasdSelfDraftLlamaForCausalLM"]``, ``num_hidden_layers`` = the exit
layer N and ``self_draft_temperature`` = T, the target's tokenizer, and a one-tensor
weights file. vLLM loads it as an ordinary ``draft_model`` draft; the model it builds is
a Llama of N layers whose logits are ``lm_head(norm(h_N)) / T``: the target's early-exit
prediction after layer N, temperature-calibrated so that its confidence (which drives
CM-ASD's draft window) means what it says.

No weights come from disk. After vLLM has built both models, the CM-ASD proposer calls
:func:`share_target_weights`, which makes every parameter of the draft *be* the
target's parameter of the same name (embeddings, layers 0..N-1, final norm, LM head), so
the drafter costs no weight memory; it keeps its own attention modules and therefore
its own KV cache for its N layers. Exact verification keeps the output identical to
plain decoding. The sharing hook lives in :class:`vllm_cmasd.proposer.CmasdProposer`, so
a self-draft runs only under CM-ASD (``additional_config={"cmasd": {...}}``); under
vLLM's plain draft-model proposer it stops the engine at its first forward pass instead
of drafting from uninitialised weights.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

import torch

from vllm_cmasd import architectures

ARCH_NAME = "CmasdSelfDraftLlamaForCausalLM"
TEMPERATURE_KEY = "self_draft_temperature"
# The only tensor in a self-draft's weights file: vLLM's loader refuses a model
# directory without weights, so there is one, and load_weights skips it.
MARKER_TENSOR = "cmasd_self_draft_marker"
WEIGHTS_FILE = "model.safetensors"
RECORD_FILE = "self_draft.json"
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def register() -> None:
    """Register the architecture with vLLM's ModelRegistry (lazy import path)."""
    architectures.register(ARCH_NAME, __name__)


def is_self_draft(model) -> bool:
    return type(model).__name__ == ARCH_NAME


def _make_class():
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm.model_executor.models.llama import LlamaForCausalLM

    class CmasdSelfDraftLlamaForCausalLM(LlamaForCausalLM):
        """The target's first ``num_hidden_layers`` layers; logits scaled by 1/T."""

        def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            config = self.config
            temperature = getattr(config, TEMPERATURE_KEY, None)
            if not isinstance(temperature, (int, float)) or not temperature > 0:
                raise ValueError(
                    f"{ARCH_NAME} needs config.{TEMPERATURE_KEY} > 0, got {temperature!r}"
                )
            self.temperature = float(temperature)
            # The early-exit logits divided by T: LogitsProcessor multiplies by its
            # scale (the target's own logit_scale folded in, as LlamaForCausalLM does).
            self.logits_processor = LogitsProcessor(
                config.vocab_size, scale=getattr(config, "logit_scale", 1.0) / self.temperature
            )
            self.weights_shared = False

        def forward(self, *args, **kwargs):
            if not self.weights_shared:
                raise RuntimeError(
                    f"{ARCH_NAME} has no weights of its own: it takes the target's when "
                    "CM-ASD's proposer loads it. Run it with "
                    "additional_config={'cmasd': {...}} (e.g. {'verification': 'exact'})."
                )
            return super().forward(*args, **kwargs)

        def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
            for name, _ in weights:
                if name != MARKER_TENSOR:
                    raise ValueError(
                        f"{ARCH_NAME}: unexpected tensor {name!r} in the checkpoint; a "
                        "self-draft directory carries no weights (build it with "
                        "scripts/build_self_draft.py)"
                    )
            # Everything comes from the target later (share_target_weights); report all
            # parameters as loaded so vLLM's strict loading check passes.
            return {name for name, _ in self.named_parameters(remove_duplicate=False)}

    return CmasdSelfDraftLlamaForCausalLM


# Built lazily so importing this module (the plugin's register()) does not import
# vLLM's model code.
__getattr__ = architectures.lazy_class(globals(), ARCH_NAME, _make_class)


# --------------------------------------------------------------------------- sharing


def _logical_weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of a linear layer's weight as loaded, also when vLLM has dropped it.

    On CPU vLLM prepacks linear weights into a GEMM handle (``module.cpu_linear``) and
    replaces ``module.weight`` by an empty tensor, so the memory is not visible as a
    parameter; its size is still output x input of this rank's shard.
    """
    weight = module._parameters.get("weight")
    if weight is None:
        return 0
    if weight.numel() == 0 and hasattr(module, "output_size_per_partition"):
        return (
            module.output_size_per_partition
            * module.input_size_per_partition
            * weight.element_size()
        )
    return 0


def share_target_weights(draft_model, target_model) -> int:
    """Make every draft parameter the target's parameter of the same name.

    Parameters are replaced one by one (``module._parameters[name] = target_param``),
    never whole modules: the draft's attention modules stay its own, because their
    layer names key the draft's KV cache. On CPU the packed GEMM handle
    (``cpu_linear``) that vLLM builds from a linear weight at load time is the real
    copy of that weight, so it is taken from the target too. Under tensor parallelism
    each rank holds its own shards of both models, with the same sharding (same config,
    same TP size), and shares those. The draft's own tensors are freed once nothing
    references them. Returns the bytes the draft now shares instead of owning.
    """
    shared = 0
    counted: set[int] = set()  # a tied embedding/LM head is one tensor: count it once
    for module_name, module in draft_model.named_modules():
        own = module._parameters
        if not own and not hasattr(module, "cpu_linear"):
            continue
        try:
            target_module = target_model.get_submodule(module_name)
        except AttributeError as exc:
            raise ValueError(
                f"self-draft module {module_name!r} has no counterpart in the target "
                f"{type(target_model).__name__}; the self-draft must be built from this target"
            ) from exc
        for param_name, param in list(own.items()):
            if param is None:  # e.g. a linear layer's absent bias (registered as None)
                continue
            full = f"{module_name}.{param_name}" if module_name else param_name
            target_param = target_module._parameters.get(param_name)
            if target_param is None:
                raise ValueError(f"target has no parameter {full!r} for the self-draft")
            if target_param.shape != param.shape or target_param.dtype != param.dtype:
                raise ValueError(
                    f"self-draft parameter {full!r} is {tuple(param.shape)} {param.dtype}, "
                    f"the target's is {tuple(target_param.shape)} {target_param.dtype}: "
                    "build the self-draft from this target and run both with one dtype"
                )
            own[param_name] = target_param
            if id(target_param) not in counted:
                counted.add(id(target_param))
                shared += target_param.numel() * target_param.element_size()
        if hasattr(module, "cpu_linear"):
            if not hasattr(target_module, "cpu_linear"):
                raise ValueError(f"target module {module_name!r} has no packed CPU GEMM to share")
            module.cpu_linear = target_module.cpu_linear
            shared += _logical_weight_bytes(target_module)
    draft_model.weights_shared = True
    return shared


def unique_weight_bytes(model, shared_with=None) -> int:
    """Bytes of ``model``'s weights that ``shared_with`` does not hold (all of
    them when it is None; 0 for a self-draft after sharing).

    Counts parameters whose storage is none of ``shared_with``'s, and, on CPU,
    the packed GEMM handles of linear layers that are not ``shared_with``'s
    (vLLM's CPU build keeps a linear layer's weight only in its handle).
    """
    others = [] if shared_with is None else list(shared_with.parameters())
    other_ptrs = {p.data_ptr() for p in others if p.numel()}
    total = sum(
        p.numel() * p.element_size()
        for p in model.parameters()
        if p.numel() and p.data_ptr() not in other_ptrs
    )
    for module_name, module in model.named_modules():
        if hasattr(module, "cpu_linear"):
            twin = None
            if shared_with is not None:
                try:
                    twin = shared_with.get_submodule(module_name)
                except AttributeError:
                    pass
            if module.cpu_linear is not getattr(twin, "cpu_linear", None):
                total += _logical_weight_bytes(module)
    return total


# --------------------------------------------------------------------------- building


def build_self_draft(
    target_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    exit_layer: int,
    temperature: float,
    calibration: dict | None = None,
) -> Path:
    """Write a self-draft directory for ``target_dir`` exiting after ``exit_layer`` layers.

    ``calibration`` (what ``scripts/build_self_draft.py`` measured) is stored in
    ``self_draft.json`` next to the exit layer, the temperature and the target's path.
    Written to a temporary directory beside ``out_dir`` and renamed into place.
    """
    from safetensors.torch import save_file

    target_dir, out_dir = Path(target_dir).resolve(), Path(out_dir).resolve()
    config = json.loads((target_dir / "config.json").read_text())
    total = config["num_hidden_layers"]
    if not 1 <= exit_layer < total:
        raise ValueError(f"exit_layer must be in 1..{total - 1} (the target has {total}), got {exit_layer}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    config["architectures"] = [ARCH_NAME]
    config["num_hidden_layers"] = exit_layer
    if isinstance(config.get("layer_types"), list):  # per-layer lists shrink with the layers
        config["layer_types"] = config["layer_types"][:exit_layer]
    config[TEMPERATURE_KEY] = float(temperature)
    record = {
        "target": str(target_dir),
        "target_num_layers": total,
        "exit_layer": exit_layer,
        "temperature": float(temperature),
        "calibration": calibration,
    }

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in COPIED_FILES:
            if (target_dir / name).is_file():
                shutil.copy2(target_dir / name, tmp / name)
        save_file({MARKER_TENSOR: torch.zeros(1)}, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
