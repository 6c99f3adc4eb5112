"""Stages ``export`` and ``assemble``.

``export``: write what differs from the target (trained layers, norm, small head, kept
token ids; bf16 safetensors) + ``draft.json`` record to ``--out`` (the shipped
``drafts/<name>/``), from ``--export-from`` (``ckpt.pt``: the last checkpoint, or
``best.pt``) of the work dir.

``assemble``: :func:`assemble_draft` -> ``--assemble-to``: the full vLLM-loadable draft
checkpoint (architecture ``CmasdReducedVocabLlamaForCausalLM``, see
:mod:`vllm_cmasd.draft_model`) from the target and the shipped ``drafts/<name>/`` files.
``scripts/prepare_models.py`` calls it on setup.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

from vllm_cmasd.training.common import DRAFT_ARCH, TOKENIZER_FILES, TOPK, domain, load_target_state, log


def _kind_tokens(records) -> dict[str, int]:
    """Response tokens per prompt kind (``docs:summarization``, ``task:count``, ...)."""
    out = Counter()
    for r in records:
        out[r["kind"]] += len(r["ids"]) - r["n_prompt"]
    return dict(sorted(out.items()))


def _data_sources(records, args) -> list[str]:
    """What the training records were made from, for ``draft.json``."""
    domains = {domain(r["kind"]) for r in records}
    kinds = {r["kind"] for r in records}
    out = []
    if "stdlib" in domains:
        out += ["Python stdlib docstrings/sources (%s)" % sys.version.split()[0], "/usr/share/common-licenses"]
    if "magpie" in kinds:
        out.append(f"chat: Magpie-style user turns sampled from the target (temperature "
                   f"{args.magpie_temperature}, top-p 0.95, seeded), answers <= {args.chat_max_new_tokens} new tokens")
    if any(k.startswith("task:") for k in kinds):
        out.append("chat: templated short tasks (counting, days/months/letters, arithmetic, yes/no, rewrites, "
                   f"word games, tiny Python functions), answers <= {args.chat_max_new_tokens} new tokens")
    if "docs" in domains:
        out.append("benchmark domain: vllm_cmasd.bench.prompts.training_prompts() -- the benchmark's "
                   "summarization / translation / instruction templates on package READMEs and docstrings, "
                   "Debian READMEs and man pages, every document of a benchmark prompt left out; answers <= "
                   f"{args.docs_max_new_tokens} new tokens")
    return out


def stage_export(args) -> None:
    import torch
    from safetensors.torch import save_file

    work = Path(args.work)
    st = torch.load(work / args.export_from, weights_only=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in st["body"].items():
        if k.startswith("embed_tokens") or "rotary" in k:
            continue  # shared with the target, not stored
        tensors["model." + k] = v.to(torch.bfloat16).contiguous()
    tensors["lm_head.weight"] = st["head"]["weight"].to(torch.bfloat16).contiguous()
    tensors["kept_token_ids"] = st["kept"].to(torch.int64).contiguous()
    save_file(tensors, str(out / "draft.safetensors"))
    fe = {}
    if (work / "final_eval.json").exists():
        fe = json.loads((work / "final_eval.json").read_text())
    data = torch.load(work / "data.pt", weights_only=False)
    by_domain = Counter(domain(r["kind"]) for r in data["train"])
    rec = {
        "architecture": DRAFT_ARCH,
        "layers": st["layers"],
        "layer_init": f"target layers 0..{st['layers'] - 1}",
        "keep_vocab": int(len(st["kept"])),
        "steps": st["step"],
        "train_minutes": round(st["t_used"] / 60, 1),
        "seed": args.seed,
        "threads": args.threads,
        "init_from": args.init_from or None,
        "hparams": {k: getattr(args, k) for k in ("lr", "warmup", "steps", "max_minutes", "batch_tokens",
                                                    "max_len", "keep_vocab", "layers", "init_from")},
        "data": {
            "sources": _data_sources(data["train"], args),
            "train_seqs_by_domain": {d: by_domain[d] for d in ("stdlib", "chat", "docs")},
            **{f"{split}_seqs": len(data.get(split, [])) for split in ("eval_chat", "eval_docs")},
            **{f"{split}_response_tokens": int(sum(len(r["ids"]) - r["n_prompt"] for r in data.get(split, [])))
               for split in ("eval_chat", "eval_docs")},
            "train_response_tokens_by_kind": _kind_tokens(data["train"]),
            "teacher": (f"target greedy responses via vLLM (chat template, new-token caps as in sources); "
                        f"target top-{TOPK} log-probs cached at response positions"
                        + (" and prompt positions" if args.prompt_logprobs else
                           " (prompt positions: context only)")),
            "train_seqs": len(data["train"]), "eval_seqs": len(data["eval"]),
            "train_tokens": int(sum(len(r["ids"]) for r in data["train"])),
            "train_response_tokens": int(sum(len(r["ids"]) - r["n_prompt"] for r in data["train"])),
            "eval_tokens": int(sum(len(r["ids"]) for r in data["eval"])),
            "eval_response_tokens": int(sum(len(r["ids"]) - r["n_prompt"] for r in data["eval"])),
        },
        "heldout_final": fe,
        "history": st.get("hist", []),
    }
    (out / "draft.json").write_text(json.dumps(rec, indent=1))
    log(f"export: wrote {out}/draft.safetensors and draft.json")


def assemble_draft(target_dir, drafts_dir, out_dir) -> Path:
    """Build the full vLLM-loadable draft checkpoint in ``out_dir`` from the target
    checkpoint (embeddings, tokenizer, config) and the shipped trained tensors in
    ``drafts_dir`` (``draft.safetensors`` + ``draft.json``). Idempotent, atomic."""
    from safetensors.torch import load_file, save_file

    target_dir, drafts_dir, out_dir = Path(target_dir), Path(drafts_dir), Path(out_dir)
    rec = json.loads((drafts_dir / "draft.json").read_text())
    small = load_file(str(drafts_dir / "draft.safetensors"))
    tsd = load_target_state(target_dir)
    emb = tsd.get("model.embed_tokens.weight")
    if emb is None:
        emb = tsd["embed_tokens.weight"]
    cfg = json.loads((target_dir / "config.json").read_text())
    cfg["architectures"] = [DRAFT_ARCH]
    cfg["num_hidden_layers"] = int(rec["layers"])
    cfg["tie_word_embeddings"] = False
    cfg["draft_vocab_size"] = int(small["kept_token_ids"].numel())
    cfg["dtype"] = "float32"
    tensors = {"model.embed_tokens.weight": emb.float().contiguous()}
    for k, v in small.items():
        tensors[k] = v if k == "kept_token_ids" else v.float().contiguous()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in TOKENIZER_FILES:
        if (target_dir / f).exists():
            shutil.copy2(target_dir / f, tmp / f)
    (tmp / "cmasd_draft.json").write_text(json.dumps({"from": str(drafts_dir), "record": {
        k: rec.get(k) for k in ("architecture", "layers", "keep_vocab", "steps", "heldout_final")}}, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def stage_assemble(args) -> None:
    p = assemble_draft(args.target, args.out, args.assemble_to)
    log(f"assemble: {p}")
