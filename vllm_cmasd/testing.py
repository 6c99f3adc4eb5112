"""Tiny real models for tests: a random-weight Llama target and a draft made from it.

:func:`make_tiny_pair` builds, in a few seconds and without any network, a target and a
draft checkpoint that vLLM really loads and runs (``LlamaForCausalLM``, fp32, safetensors,
real tokenizer with a chat template). Why it is built this way:

* **Real tokenizer.** vLLM's completions and chat paths need a working tokenizer with
  bos/eos and a chat template, and detokenized text should look like text. We train a
  small byte-level BPE (vocab ``TOKENIZER_VOCAB``) with the ``tokenizers`` library on the
  source of a fixed list of Python stdlib modules (code and docstrings), which exists
  offline on every machine. Training is deterministic for a given corpus. The special
  tokens mirror SmolLM2 (the real target): ``<|endoftext|>`` = 0 (unk),
  ``<|im_start|>`` = 1 (bos, not added automatically), ``<|im_end|>`` = 2 (eos, pad),
  ChatML chat template. The stdlib text can differ between Python versions, so its hash
  is part of the cache key (and recorded in ``tiny_pair.json``).
* **Target.** 4 layers, hidden 128, 4 attention heads / 2 KV heads (head_dim 32: the
  smallest head size vLLM's CPU attention supports; 4/2 heads split over tensor-parallel
  size 2), intermediate 256, ``max_position_embeddings`` 1024, untied LM head. All
  weights come from a ``torch.Generator`` seeded with ``seed`` (no dependence on
  transformers' init code). The embedding and LM-head init std is large
  (``_EMBED_STD``/``_HEAD_STD``, not the usual 0.02): with a 0.02 init every next-token
  distribution is nearly uniform, so every confidence signal would be ~0 everywhere.
  With the larger std the distributions are peaky on some contexts and flat on others,
  which the tests of confidence-modulated drafting need. The LM head is untied because a
  tied head on random weights mostly predicts "repeat the current token" (the input
  embedding dominates the residual stream), which would make draft and target agree
  almost always.
* **Draft.** Same tokenizer/vocab; its weights are a copy of the target's first
  ``draft_layers`` (default 2) decoder layers plus the target's embeddings, final norm and
  LM head (the same construction as the SmolLM2 placeholder draft in
  ``scripts/prepare_models.py``). The residual-branch init scale ``_RESID_STD`` is chosen
  so that the draft's greedy next token equals the target's on roughly 40-90% of
  positions: speculative acceptance is neither always nor never. Measured teacher-forced
  on stdlib text (:func:`teacher_forced_agreement`): 0.64 for seed 0 (0.69 / 0.70 for
  seeds 1 / 2); about 0.8 where the draft's top-1 probability is > 0.5 and about 0.35
  where it is < 0.3, so drafter confidence predicts acceptance.

:func:`make_tiny_eagle3_head` adds a random-weight EAGLE-3 head for the tiny target, in
the layout vLLM's ``eagle3`` method loads unmodified (reduced vocabulary with ``d2t``);
:func:`make_tiny_eagle_head` an EAGLE-1 head for vLLM's ``eagle`` method.

Directories are cached under ``root`` by (seed, ``TINY_VERSION``, corpus hash) and written
atomically (tmp dir, then rename), so repeated or concurrent calls reuse one copy. Bump
``TINY_VERSION`` whenever what is built changes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path

TINY_VERSION = 1

TOKENIZER_VOCAB = 1024
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = SPECIAL_TOKENS
PAD_TOKEN = EOS_TOKEN

# ChatML like SmolLM2, without the default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Stdlib modules whose source is the tokenizer's training corpus (pure Python, always
# present, English docstrings plus code).
CORPUS_MODULES = (
    "argparse", "bisect", "calendar", "collections", "csv", "dataclasses", "difflib",
    "fnmatch", "fractions", "functools", "glob", "heapq", "json.decoder", "json.encoder",
    "pprint", "random", "shlex", "statistics", "string", "textwrap",
)

TARGET_LAYERS = 4
DRAFT_LAYERS = 2
HIDDEN = 128
INTERMEDIATE = 256
NUM_HEADS = 4
NUM_KV_HEADS = 2
MAX_POSITIONS = 1024

# Init scales (see module docstring). Linear weights: N(0, (_RESID_STD / sqrt(fan_in))^2)
# for the residual-branch outputs (o_proj, down_proj), N(0, 1/fan_in) for the rest.
_EMBED_STD = 1.0
_HEAD_STD = 0.45
_RESID_STD = 0.25

MARKER = "tiny_pair.json"


# --------------------------------------------------------------------------- tokenizer


def corpus_texts() -> list[str]:
    """The tokenizer's training text: source files of ``CORPUS_MODULES`` (missing ones skipped)."""
    texts = []
    for name in CORPUS_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        texts.append(Path(spec.origin).read_text(encoding="utf-8"))
    if not texts:
        raise RuntimeError("no stdlib source found for the tiny tokenizer's corpus")
    return texts


def _corpus_hash(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:12]


def train_tokenizer(out_dir: Path, texts: list[str] | None = None) -> None:
    """Train the byte-level BPE and save it as HF tokenizer files in ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = corpus_texts() if texts is None else texts
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(out_dir))


# --------------------------------------------------------------------------- models


def _llama_config(vocab_size: int, num_layers: int):
    import torch
    from transformers import LlamaConfig

    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=num_layers,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HIDDEN // NUM_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=ids[BOS_TOKEN],
        eos_token_id=ids[EOS_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
        initializer_range=0.02,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.dtype = torch.float32
    return cfg


def _random_weights(cfg, seed: int) -> dict:
    """Seeded weights for every parameter of ``LlamaForCausalLM(cfg)``, in a fixed order."""
    import math

    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in LlamaForCausalLM(cfg).named_parameters()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            t = torch.ones(shape)
        elif name == "model.embed_tokens.weight":
            t = torch.randn(shape, generator=g) * _EMBED_STD
        elif name == "lm_head.weight":
            t = torch.randn(shape, generator=g) * _HEAD_STD
        else:
            std = 1.0 / math.sqrt(shape[1])
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                std *= _RESID_STD
            t = torch.randn(shape, generator=g) * std
        out[name] = t.to(torch.float32).contiguous()
    return out


def _save_model(out_dir: Path, cfg, tensors: dict) -> None:
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(str(out_dir))
    GenerationConfig(
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id
    ).save_pretrained(str(out_dir))


def make_tiny_model(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    num_layers: int = TARGET_LAYERS,
    tokenizer_dir: str | os.PathLike | None = None,
    texts: list[str] | None = None,
) -> Path:
    """Write one tiny random-weight Llama (plus tokenizer) into ``out_dir`` (not cached).

    ``tokenizer_dir``: copy the tokenizer from there instead of training one on ``texts``
    (default :func:`corpus_texts`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        train_tokenizer(out_dir, texts)
    else:
        _copy_tokenizer(Path(tokenizer_dir), out_dir)
    vocab = _vocab_size(out_dir)
    cfg = _llama_config(vocab, num_layers)
    _save_model(out_dir, cfg, _random_weights(cfg, seed))
    return out_dir


def make_draft_from(target_dir: str | os.PathLike, out_dir: str | os.PathLike, num_layers: int) -> Path:
    """Draft = the target's first ``num_layers`` layers + its embeddings, final norm, LM head."""
    from safetensors.torch import load_file, save_file

    target_dir, out_dir = Path(target_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((target_dir / "config.json").read_text())
    if not 1 <= num_layers <= config["num_hidden_layers"]:
        raise ValueError(f"num_layers must be in 1..{config['num_hidden_layers']}, got {num_layers}")
    tensors = {
        k: v for k, v in load_file(str(target_dir / "model.safetensors")).items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < num_layers
    }
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config["num_hidden_layers"] = num_layers
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = config["layer_types"][:num_layers]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copy2(target_dir / "generation_config.json", out_dir / "generation_config.json")
    _copy_tokenizer(target_dir, out_dir)
    return out_dir


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _vocab_size(tokenizer_dir: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)


def _build_once(final: Path, marker: str, build) -> Path:
    """``final``, built by ``build(tmp_dir)`` (which writes ``marker`` last) unless
    there already: written atomically (a tmp dir, then rename), so repeated or
    concurrent calls reuse one copy."""
    if (final / marker).is_file():
        return final
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Someone else finished first (or a stale unfinished dir is in the way).
            if not (final / marker).is_file():
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def make_tiny_pair(root: str | os.PathLike, seed: int = 0, draft_layers: int = DRAFT_LAYERS) -> tuple[Path, Path]:
    """Build (or reuse) the tiny target and draft under ``root``; return ``(target, draft)``.

    The pair lives in ``root/tiny-v<TINY_VERSION>-s<seed>-d<draft_layers>-<corpus hash>/``
    with ``target/`` and ``draft/`` inside. Takes a few seconds the first time, nothing after.
    """
    texts = corpus_texts()
    key = f"tiny-v{TINY_VERSION}-s{seed}-d{draft_layers}-{_corpus_hash(texts)}"

    def build(tmp: Path) -> None:
        target = make_tiny_model(tmp / "target", seed=seed, texts=texts)
        make_draft_from(target, tmp / "draft", draft_layers)
        for d in (tmp, target, tmp / "draft"):
            d.chmod(0o755)
            for f in d.iterdir():
                if f.is_file():
                    f.chmod(0o644)
        (tmp / MARKER).write_text(json.dumps({
            "tiny_version": TINY_VERSION, "seed": seed, "draft_layers": draft_layers,
            "corpus_sha256_12": _corpus_hash(texts), "corpus_modules": list(CORPUS_MODULES),
        }, indent=2) + "\n")

    final = _build_once(Path(root) / key, MARKER, build)
    return final / "target", final / "draft"


EAGLE3_MARKER = "tiny_eagle3.json"
EAGLE_MARKER = "tiny_eagle.json"
# The tiny target's 4 layers would give vLLM's default aux ids (2, 2, 1), two
# states after deduplication: name three distinct ones (id L is the residual
# stream entering layer L).
EAGLE3_AUX_LAYER_IDS = (1, 2, 3)
EAGLE3_DRAFT_VOCAB = 512


def make_tiny_eagle3_head(target_dir: str | os.PathLike, root: str | os.PathLike, seed: int = 0) -> Path:
    """Build (or reuse) a random-weight EAGLE-3 head for the tiny target, in the
    layout vLLM's ``eagle3`` method loads unmodified (``LlamaForCausalLMEagle3``):
    one decoder layer over [embedding ; fc(three aux hidden states)], a reduced
    LM head of ``EAGLE3_DRAFT_VOCAB`` rows with its ``d2t`` offsets (target id =
    draft id + d2t[draft id]) to a seeded subset of the vocabulary that keeps the
    special tokens, and no embedding (vLLM shares the target's).

    Cached under ``root/tiny-eagle3-v<TINY_VERSION>-s<seed>-<target's weights hash>/``."""
    return _tiny_head("eagle3", target_dir, root, seed)


def make_tiny_eagle_head(target_dir: str | os.PathLike, root: str | os.PathLike, seed: int = 0) -> Path:
    """Build (or reuse) a random-weight EAGLE-1 head for the tiny target, in the
    layout vLLM's ``eagle`` method loads unmodified (``EagleLlamaForCausalLM``):
    ``fc`` over [embedding ; the target's last hidden state], one decoder layer
    without its input norm, no final norm, and neither embedding nor LM head
    (vLLM shares the target's).

    Cached under ``root/tiny-eagle-v<TINY_VERSION>-s<seed>-<target's weights hash>/``."""
    return _tiny_head("eagle", target_dir, root, seed)


def _tiny_head(method: str, target_dir, root, seed: int) -> Path:
    target_dir = Path(target_dir)
    digest = hashlib.sha256((target_dir / "model.safetensors").read_bytes()).hexdigest()[:12]
    key = f"tiny-{method}-v{TINY_VERSION}-s{seed}-{digest}"
    marker = EAGLE3_MARKER if method == "eagle3" else EAGLE_MARKER
    return _build_once(Path(root) / key, marker,
                       lambda tmp: _write_tiny_head(method, target_dir, tmp, seed=seed, digest=digest, marker=marker))


def _write_tiny_head(method: str, target_dir: Path, out_dir: Path, *, seed: int, digest: str, marker: str) -> None:
    import math

    import torch
    from safetensors.torch import save_file

    config = json.loads((target_dir / "config.json").read_text())
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config["head_dim"]
    q_out, kv_out = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    g = torch.Generator().manual_seed(seed)

    def linear(out_features: int, in_features: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=g) * (scale / math.sqrt(in_features))

    # EAGLE-3's layer attends over [embedding ; fc output] (2 x hidden); EAGLE-1's
    # fc already fused the two, and its layer takes hidden.
    eagle3 = method == "eagle3"
    layer, attn_in = ("midlayer", 2 * hidden) if eagle3 else ("layers.0", hidden)
    if eagle3:
        specials = torch.arange(len(SPECIAL_TOKENS))
        rest = torch.randperm(vocab - len(specials), generator=g)[: EAGLE3_DRAFT_VOCAB - len(specials)] + len(specials)
        kept = torch.cat([specials, rest]).sort().values
    tensors = {
        "fc.weight": linear(hidden, (len(EAGLE3_AUX_LAYER_IDS) if eagle3 else 2) * hidden),
        f"{layer}.self_attn.q_proj.weight": linear(q_out, attn_in),
        f"{layer}.self_attn.k_proj.weight": linear(kv_out, attn_in),
        f"{layer}.self_attn.v_proj.weight": linear(kv_out, attn_in),
        f"{layer}.self_attn.o_proj.weight": linear(hidden, q_out, _RESID_STD),
        f"{layer}.mlp.gate_proj.weight": linear(inter, hidden),
        f"{layer}.mlp.up_proj.weight": linear(inter, hidden),
        f"{layer}.mlp.down_proj.weight": linear(hidden, inter, _RESID_STD),
        f"{layer}.post_attention_layernorm.weight": torch.ones(hidden),
    }
    config.update(num_hidden_layers=1, tie_word_embeddings=False)
    config.pop("layer_types", None)
    if eagle3:
        tensors.update({
            "midlayer.input_layernorm.weight": torch.ones(hidden),
            "midlayer.hidden_norm.weight": torch.ones(hidden),
            "norm.weight": torch.ones(hidden),
            "lm_head.weight": torch.randn(EAGLE3_DRAFT_VOCAB, hidden, generator=g) * _HEAD_STD,
        })
        tensors["d2t"] = (kept - torch.arange(EAGLE3_DRAFT_VOCAB)).to(torch.int64)
        config.update(
            architectures=["LlamaForCausalLMEagle3"],
            draft_vocab_size=EAGLE3_DRAFT_VOCAB,
            target_hidden_size=hidden,
            eagle_config={"eagle_aux_hidden_state_layer_ids": list(EAGLE3_AUX_LAYER_IDS), "use_aux_hidden_state": True},
        )
    else:
        config.update(architectures=["EagleLlamaForCausalLM"])
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _copy_tokenizer(target_dir, out_dir)
    (out_dir / marker).write_text(json.dumps({"tiny_version": TINY_VERSION, "seed": seed,
                                              "target_sha256_12": digest}, indent=2) + "\n")


# --------------------------------------------------------------------------- measurement


def teacher_forced_agreement(target_dir, draft_dir, texts: list[str], max_len: int = 256) -> dict:
    """Teacher-forced on ``texts`` (transformers, fp32): how often the draft's greedy next
    token equals the target's, plus the spread of the target's top-1 probability."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(target_dir))
    tgt = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
    drf = AutoModelForCausalLM.from_pretrained(str(draft_dir), dtype=torch.float32).eval()
    agree, top1, dtop1 = [], [], []
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt").input_ids[:, :max_len]
            lt = tgt(ids).logits[0]
            ld = drf(ids).logits[0]
            agree.append(lt.argmax(-1) == ld.argmax(-1))
            top1.append(lt.softmax(-1).max(-1).values)
            dtop1.append(ld.softmax(-1).max(-1).values)
    a, p, dp = torch.cat(agree).float(), torch.cat(top1), torch.cat(dtop1)
    q = torch.quantile(p, torch.tensor([0.1, 0.5, 0.9])).tolist()
    hi, lo = p > 0.5, p < 0.3
    return {
        "positions": int(a.numel()),
        "agreement": float(a.mean()),
        "agreement_where_target_top1_gt_0.5": float(a[hi].mean()) if hi.any() else float("nan"),
        "agreement_where_target_top1_lt_0.3": float(a[lo].mean()) if lo.any() else float("nan"),
        "agreement_where_draft_top1_gt_0.5": float(a[dp > 0.5].mean()) if (dp > 0.5).any() else float("nan"),
        "agreement_where_draft_top1_lt_0.3": float(a[dp < 0.3].mean()) if (dp < 0.3).any() else float("nan"),
        "draft_top1_frac_gt_0.5": float((dp > 0.5).float().mean()),
        "draft_top1_frac_lt_0.3": float((dp < 0.3).float().mean()),
        "target_top1_p10": q[0], "target_top1_median": q[1], "target_top1_p90": q[2],
        "target_top1_frac_gt_0.9": float((p > 0.9).float().mean()),
        "target_top1_frac_lt_0.3": float((p < 0.3).float().mean()),
    }
