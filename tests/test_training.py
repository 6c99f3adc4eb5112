"""The draft's training package (vllm_cmasd.training): its command line, the train /
held-out splits of its prompt sources, the leakage guards and the checkpoint assembly."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from vllm_cmasd.bench.prompts import SUMMARIZATION_TEMPLATE, TASKS, load_prompts
from vllm_cmasd.training import ALL_STAGES, STAGES, sources, stage_function
from vllm_cmasd.training.common import DRAFT_ARCH, TOKENIZER_FILES, stable_hash

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "vllm_cmasd.cli", "train-draft", "--help"],
    [sys.executable, str(REPO / "scripts" / "train_draft.py"), "--help"],
], ids=["vllm-cmasd", "script"])
def test_help_lists_every_stage(command):
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "{" + ",".join([*STAGES, "all"]) + "}" in result.stdout
    # The details of each stage (its module's docstring) are in the help too.
    for name in STAGES:
        assert f"``{name}``" in result.stdout, name


def test_every_stage_resolves_to_its_function():
    assert set(ALL_STAGES) <= set(STAGES)
    for name in STAGES:
        assert callable(stage_function(name)), name


def test_stdlib_prompts_split_by_source_item(monkeypatch):
    # A slice of the standard library keeps this fast; the split rule is the same.
    monkeypatch.setattr(sources, "_stdlib_items", functools.partial(sources._stdlib_items, max_files=40))
    if not Path("/usr/share/common-licenses").is_dir():
        monkeypatch.setattr(sources, "_license_items", lambda: iter(()))
    train, held = sources.build_prompts(seed=1234, n_train=300, n_eval=100)
    assert (train, held) == sources.build_prompts(seed=1234, n_train=300, n_eval=100)
    assert train and held
    train_items, held_items = {p["sid"] for p in train}, {p["sid"] for p in held}
    # No held-out function or paragraph in training, under any template.
    assert not train_items & held_items
    assert all(stable_hash(sid) % 1000 < 100 for sid in held_items)
    assert all(stable_hash(sid) % 1000 >= 100 for sid in train_items)


def test_docs_prompts_split_by_document_and_mixed_by_task(monkeypatch):
    fake = []
    for i in range(200):
        kind = "pydoc" if i % 3 == 0 else "pypi-metadata"
        for task in TASKS:
            fake.append({"task": task, "prompt": f"{task} prompt on document {i}",
                         "source": f"{kind}:pkg{i}==1.0#{task}", "origin": f"pypi:pkg{i}"})
    origin = {"docs:" + q["source"]: q["origin"] for q in fake}
    monkeypatch.setattr(sources, "training_prompts", lambda: fake)
    mix = {"summarization": 2, "translation": 1, "instruction": 0}

    train, held = sources.docs_prompts(seed=1234, mix=mix)
    assert (train, held) == sources.docs_prompts(seed=1234, mix=mix)
    assert train and held
    held_origins = {origin[q["sid"]] for q in held}
    assert not held_origins & {origin[q["sid"]] for q in train}
    assert all(stable_hash(o) % 1000 < 100 for o in held_origins)
    # Asked in the ratio of the mix: two summaries, one translation per round, no instructions.
    assert [q["kind"] for q in train[:6]] == ["docs:summarization"] * 2 + ["docs:translation"] + \
        ["docs:summarization"] * 2 + ["docs:translation"]
    assert {q["kind"] for q in train + held} == {"docs:summarization", "docs:translation"}
    # Within a task, READMEs (the benchmark's kind of document) before docstrings.
    for task in ("summarization", "translation"):
        is_pydoc = [q["sid"].startswith("docs:pydoc:") for q in train if q["kind"] == f"docs:{task}"]
        assert is_pydoc == sorted(is_pydoc) and any(is_pydoc) and not all(is_pydoc)


def test_the_held_out_draw_does_not_depend_on_the_training_pool(monkeypatch):
    """More training documents (another machine's packages, or setuptools' vendored
    ones on the path after a vLLM import) leave the held-out prompts as they were: the
    ``data`` and ``prompts`` stages must hold out the same ones."""
    pool = [{"task": task, "prompt": f"{task} prompt on document {i}", "source": f"pypi-metadata:pkg{i}==1.0#{task}",
             "origin": f"pypi:pkg{i}"} for i in range(300) for task in TASKS]
    extra = [{"task": task, "prompt": f"{task} prompt on extra {i}", "source": f"pypi-metadata:extra{i}==1.0#{task}",
              "origin": f"pypi:extra{i}"} for i in range(40) for task in TASKS]
    extra = [q for q in extra if stable_hash(q["origin"]) % 1000 >= 100]  # training documents only
    monkeypatch.setattr(sources, "training_prompts", lambda: pool)
    train, held = sources.docs_prompts(seed=1234)
    monkeypatch.setattr(sources, "training_prompts", lambda: pool + extra)
    more_train, same_held = sources.docs_prompts(seed=1234)
    assert len(more_train) == len(train) + len(extra) and held
    assert same_held == held


def test_the_held_out_prompt_set_is_the_held_out_documents_in_the_benchmarks_format(monkeypatch, tmp_path):
    """``python -m vllm_cmasd.bench.prompts --heldout-docs``: a set the benchmark
    loads (--prompts), every prompt on a document the training stages hold out."""
    from vllm_cmasd.bench.prompts import main

    pool = [{"task": task, "prompt": f"{task} prompt on document {i}", "source": f"pypi-metadata:pkg{i}==1.0#{task}",
             "origin": f"pypi:pkg{i}"} for i in range(400) for task in TASKS]
    monkeypatch.setattr(sources, "training_prompts", lambda: pool)
    _, held = sources.docs_prompts(seed=1234)
    held_prompts = {q["prompt"] for q in held}
    origin = {q["source"]: q["origin"] for q in pool}
    main(["--heldout-docs", "--per-task", "3", "--out", str(tmp_path / "held.json")])
    data = load_prompts(tmp_path / "held.json")
    assert [len(data["tasks"][task]) for task in TASKS] == [3, 3, 3]
    for task in TASKS:
        for item in data["tasks"][task]:
            assert item["prompt"] in held_prompts and item["prompt"].startswith(task)
            assert stable_hash(origin[item["source"]]) % 1000 < 100
    assert len({item["id"] for items in data["tasks"].values() for item in items}) == 9


def test_vendored_distributions_are_not_documents():
    """setuptools' vendored copies (on ``sys.path`` once it is imported) are not
    installed packages: the document pool does not depend on what was imported."""
    from importlib import metadata
    from pathlib import Path

    import setuptools  # noqa: F401  (puts setuptools/_vendor on sys.path)

    from vllm_cmasd.bench.sources import _installed_distributions, _pypi_packages

    vendored = [d for d in metadata.distributions() if "_vendor" in Path(str(d.locate_file(""))).parts]
    if not vendored:
        pytest.skip("this setuptools vendors no distributions")
    kept = list(_installed_distributions())
    assert len(kept) == len(list(metadata.distributions())) - len(vendored)
    assert not [d for d in kept if "_vendor" in Path(str(d.locate_file(""))).parts]
    only_vendored = {d.metadata["Name"].lower() for d in vendored} - {d.metadata["Name"].lower() for d in kept}
    assert not only_vendored & {name.lower() for name, *_ in _pypi_packages()}


def summarize(*paragraphs: str) -> str:
    return SUMMARIZATION_TEMPLATE.format(text="\n\n".join(paragraphs))


FRESH = "A paragraph that no document on this machine holds, written for this test alone."


def test_unseen_filter_rejects_benchmark_and_heldout_documents_and_paragraphs():
    from vllm_cmasd.training.data import unseen_filter

    bench = load_prompts()["tasks"]["summarization"][0]
    bench_paragraph = bench["prompt"].split("\n\n", 1)[1].split("\n\n")[0]
    heldout_paragraph = "A held-out paragraph, also written for this test."
    heldout = [{"sid": "docs:manpage:/usr/share/man/man1/cmasd-heldout.1.gz#paragraph0",
                "prompt": summarize(heldout_paragraph, "Its second paragraph.")}]
    unseen = unseen_filter(heldout)

    assert unseen("docs:pypi-doc:cmasd-nowhere==1.0:guide.md#paragraph0", summarize(FRESH))
    # A benchmark document, whatever its text; and any other language of a held-out page.
    assert not unseen("docs:" + bench["source"], summarize(FRESH))
    assert not unseen("docs:manpage:/usr/share/man/de/man1/cmasd-heldout.1.gz#paragraph4", summarize(FRESH))
    # Their paragraphs under names of their own (a file that two packages ship).
    assert not unseen("docs:pypi-doc:cmasd-nowhere==1.0:guide.md#paragraph1", summarize(FRESH, bench_paragraph))
    assert not unseen("docs:pypi-doc:cmasd-nowhere==1.0:guide.md#paragraph2", summarize(heldout_paragraph))


def test_overlap_finds_benchmark_text_in_training_prompts(tmp_path):
    import torch

    from vllm_cmasd.training.overlap import stage_overlap

    bench = [q for items in load_prompts()["tasks"].values() for q in items]
    leaked = bench[5]
    fresh = [summarize(f"{FRESH} Variant {i} of it, with words of its own: {' '.join(['word%d' % j for j in range(i, i + 12)])}.")
             for i in range(30)]
    prompts = {"train_docs": [{"sid": f"docs:t{i}", "kind": "docs", "prompt": p} for i, p in enumerate(fresh)]}
    prompts["train_docs"].append({"sid": "docs:leak", "kind": "docs", "prompt": "Please answer: " + leaked["prompt"]})
    prompts["train_docs"].append({"sid": "docs:unanswered", "kind": "docs", "prompt": bench[6]["prompt"]})
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    answered = [{"sid": q["sid"]} for q in prompts["train_docs"] if q["sid"] != "docs:unanswered"]
    torch.save({"train": answered}, tmp_path / "data.pt")

    stage_overlap(Namespace(work=str(tmp_path)))
    result = json.loads((tmp_path / "overlap.json").read_text())
    shares = {row["id"]: row["share_in_training"] for row in result["prompts"]}
    assert shares[leaked["id"]] == 1.0
    assert shares[bench[6]["id"]] < 0.5  # asked but never answered: not training data
    assert result["summary"]["prompts_with_share"][">=0.5"] == 1
    assert result["summary"]["training_prompts"] == len(answered)


def test_assemble_draft_builds_the_full_checkpoint_from_the_shipped_files(tiny_pair, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from vllm_cmasd.training.export import assemble_draft

    target, _ = tiny_pair
    tsd = load_file(str(target / "model.safetensors"))
    embed = tsd["model.embed_tokens.weight"]
    kept = torch.arange(0, embed.shape[0], 3, dtype=torch.int64)
    # What `export` ships: two trained layers, the norm, a small head and the kept ids.
    small = {k: v.to(torch.bfloat16) for k, v in tsd.items()
             if k == "model.norm.weight" or k.startswith(("model.layers.0.", "model.layers.1."))}
    small["lm_head.weight"] = tsd["lm_head.weight"][kept].to(torch.bfloat16).contiguous()
    small["kept_token_ids"] = kept
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    save_file(small, str(shipped / "draft.safetensors"))
    (shipped / "draft.json").write_text(json.dumps({"architecture": DRAFT_ARCH, "layers": 2, "steps": 7}))

    out = assemble_draft(target, shipped, tmp_path / "models" / "draft-rv")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [DRAFT_ARCH] and cfg["num_hidden_layers"] == 2
    assert cfg["vocab_size"] == embed.shape[0] and cfg["draft_vocab_size"] == len(kept)
    assert cfg["tie_word_embeddings"] is False
    tensors = load_file(str(out / "model.safetensors"))
    assert torch.equal(tensors["model.embed_tokens.weight"], embed.float())  # the target's, not shipped
    assert torch.equal(tensors["kept_token_ids"], kept)
    assert tensors["lm_head.weight"].dtype == torch.float32 and tensors["lm_head.weight"].shape[0] == len(kept)
    assert not [k for k in tensors if k.startswith("model.layers.2.")]
    assert all((out / f).exists() for f in TOKENIZER_FILES if (target / f).exists())
    assert json.loads((out / "cmasd_draft.json").read_text())["record"]["steps"] == 7

    # Again over the first: the same checkpoint, nothing left beside it.
    before = (out / "model.safetensors").read_bytes()
    assert assemble_draft(target, shipped, out) == out
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["draft-rv"]


# --------------------------------------------------------------------------- EAGLE-3 head


@pytest.fixture(scope="module")
def tiny_eagle3_training(tiny_pair, tmp_path_factory):
    """``eagle-train`` / ``eagle-export`` / ``eagle-assemble`` end to end on the
    tiny target: records like the ``data`` stage's (a prompt, then the target's
    greedy answer), a 256-token kept vocabulary, 20 s of training."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaForCausalLM

    from vllm_cmasd.testing import corpus_texts
    from vllm_cmasd.training.cli import main

    target, _ = tiny_pair
    root = tmp_path_factory.mktemp("eagle3-training")
    tok = AutoTokenizer.from_pretrained(target)
    model = LlamaForCausalLM.from_pretrained(target).eval()
    prompts = [ids[:48] for ids in (tok(t[i * 997: i * 997 + 1500])["input_ids"] for t in corpus_texts()[:4] for i in range(12))
               if len(ids) >= 48]
    records = []
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            out = model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)[0]
            records.append({"sid": f"docs:tiny{i}", "kind": "docs:summarization", "ids": out.to(torch.int32),
                            "n_prompt": len(ids)})
    work = root / "work"
    work.mkdir()
    torch.save({"train": records[8:], "eval": [], "eval_chat": [], "eval_docs": records[:8]}, work / "data.pt")
    kept = torch.cat([torch.arange(3), torch.randperm(1021, generator=torch.Generator().manual_seed(0))[:253] + 3])
    save_file({"kept_token_ids": kept.sort().values.to(torch.int64)}, str(root / "kept.safetensors"))
    args = ["--target", str(target), "--work", str(work), "--kept-from", str(root / "kept.safetensors"),
            "--eagle-out", str(root / "shipped"), "--eagle-assemble-to", str(root / "assembled"),
            "--batch-tokens", "768", "--max-len", "128", "--max-minutes", "0.33", "--warmup", "5", "--lr", "2e-3",
            "--ckpt-every", "20", "--eval-every", "20", "--eval-subset", "8", "--threads", "1", "--export-from", "best.pt"]
    for stage in ("eagle-train", "eagle-export", "eagle-assemble"):
        assert main([stage, *args]) == 0
    return target, work, root / "shipped", root / "assembled", kept.sort().values


def test_eagle3_training_learns_the_targets_continuations(tiny_eagle3_training):
    """Held-out greedy acceptance (k=4) rises well above the untrained head's."""
    import torch

    _, work, _, _, _ = tiny_eagle3_training
    final = json.loads((work / "eagle_final_eval.json").read_text())
    history = torch.load(work / "eagle_ckpt.pt", weights_only=False)["hist"]
    first = next(h["heldout_docs"] for h in history if "heldout_docs" in h)
    assert final["last"]["anchors"] > 100
    assert final["last"]["acceptance_length"] > 1.3, final
    assert final["best_on_subset"]["acceptance_length"] >= first["acceptance_length"]


def test_eagle_eval_scores_a_head_on_the_work_dirs_held_out_records(tiny_eagle3_training, capsys):
    """``eagle-eval`` of the last checkpoint gives the figure training ended with."""
    from vllm_cmasd.training.cli import main

    target, work, _, _, kept = tiny_eagle3_training
    final = json.loads((work / "eagle_final_eval.json").read_text())["last"]
    capsys.readouterr()
    assert main(["eagle-eval", "--target", str(target), "--work", str(work), "--init-from", str(work / "eagle_ckpt.pt"),
                 "--kept-from", str(work.parent / "kept.safetensors"), "--max-len", "128"]) == 0
    assert f"'acceptance_length': {final['acceptance_length']}, 'anchors': {final['anchors']}," in capsys.readouterr().out


def test_eagle3_export_writes_vllms_layout(tiny_eagle3_training):
    import torch
    from safetensors.torch import load_file

    target, _, shipped, assembled, kept = tiny_eagle3_training
    tensors = load_file(str(shipped / "model.safetensors"))
    assert torch.equal(kept[torch.arange(len(kept))], torch.arange(len(kept)) + tensors["d2t"])  # offsets, not ids
    assert tensors["t2d"].sum() == len(kept) and tensors["t2d"][kept].all()
    assert not [k for k in tensors if "embed_tokens" in k or "rotary" in k]  # vLLM shares the target's embedding
    assert tensors["fc.weight"].shape[1] == 3 * tensors["fc.weight"].shape[0] and tensors["fc.weight"].dtype == torch.bfloat16
    cfg = json.loads((shipped / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
    assert cfg["draft_vocab_size"] == len(kept) and cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    record = json.loads((shipped / "head.json").read_text())
    assert record["steps"] > 0 and record["heldout_final"]["last"]["acceptance_length"] > 1.0
    assert all((assembled / f).exists() for f in TOKENIZER_FILES if (target / f).exists())


def test_eagle3_training_learns_with_its_forward_in_bf16(tiny_eagle3_training, tmp_path, capsys):
    """``--compute-dtype bfloat16`` (the forward autocast, ~2x on a CPU with AMX):
    the head still learns the target's continuations, its weights stay fp32, and
    the held-out figure matches ``eagle-eval`` in the same dtype."""
    import shutil

    import torch

    from vllm_cmasd.training.cli import main

    target, work, _, _, _ = tiny_eagle3_training
    shutil.copy(work / "data.pt", tmp_path / "data.pt")
    common = ["--target", str(target), "--work", str(tmp_path), "--kept-from", str(work.parent / "kept.safetensors"),
              "--max-len", "128", "--threads", "1", "--compute-dtype", "bfloat16"]
    assert main(["eagle-train", *common, "--batch-tokens", "768", "--max-minutes", "0.33", "--warmup", "5",
                 "--lr", "2e-3", "--ckpt-every", "20", "--eval-every", "20", "--eval-subset", "8"]) == 0
    final = json.loads((tmp_path / "eagle_final_eval.json").read_text())["last"]
    assert final["anchors"] > 100 and final["acceptance_length"] > 1.3, final
    head = torch.load(tmp_path / "eagle_ckpt.pt", weights_only=False)["head"]
    assert {t.dtype for t in head.values() if t.is_floating_point()} == {torch.float32}
    capsys.readouterr()
    assert main(["eagle-eval", *common, "--init-from", str(tmp_path / "eagle_ckpt.pt")]) == 0
    assert f"'acceptance_length': {final['acceptance_length']}, 'anchors': {final['anchors']}," in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["eagle-eval", *common[:-1], "float16"])
    assert "argument --compute-dtype: invalid choice: 'float16'" in capsys.readouterr().err


@pytest.mark.engine
def test_vllms_eagle3_runs_the_trained_tiny_head(tiny_eagle3_training):
    from conftest import run_engine
    from test_engine import PROMPTS, engine, greedy

    target, _, _, assembled, _ = tiny_eagle3_training
    plain = run_engine(PROMPTS, greedy(24), **engine(target))
    theirs = run_engine(PROMPTS, greedy(24), **engine(target, draft=assembled, draft_method="eagle3",
                                                       num_speculative_tokens=4))
    assert type(theirs.drafter).__name__ == "EagleProposer"
    assert theirs.token_ids == plain.token_ids
    assert theirs.counters["num_accepted_tokens"] > 0


# --------------------------------------------------------------------------- prompts / answer


def test_prompts_stage_keeps_the_leakage_guards_and_writes_chat_ids(tiny_pair, tmp_path, monkeypatch):
    """The prompts a GPU round answers pass the data stage's guards: none on a benchmark
    document, none on a held-out one; each carries its chat-template token ids."""
    from transformers import AutoTokenizer

    from vllm_cmasd.training.cli import main
    from vllm_cmasd.training.common import chat_ids

    target, _ = tiny_pair
    bench = load_prompts()["tasks"]["summarization"][0]
    fake = [{"task": "summarization", "prompt": summarize(f"{FRESH} Document {i}."),
             "source": f"pypi-doc:pkg{i}==1.0:guide.md#summarization", "origin": f"pypi:pkg{i}"} for i in range(300)]
    fake.append({"task": "summarization", "prompt": summarize(FRESH), "source": bench["source"],
                 "origin": "benchmark"})
    monkeypatch.setattr(sources, "training_prompts", lambda: fake)
    assert main(["prompts", "--target", str(target), "--work", str(tmp_path), "--n-eval-docs", "5",
                 "--docs-mix", "summarization=1,translation=0,instruction=0"]) == 0

    out = json.loads((tmp_path / "prompts.json").read_text())
    held, train = out["eval_docs"], out["train_docs"]
    assert len(held) == 5 and len(train) > 200
    assert "docs:" + bench["source"] not in {q["sid"] for q in held + train}
    assert not {q["sid"] for q in held} & {q["sid"] for q in train}
    tok = AutoTokenizer.from_pretrained(target)
    assert all(q["ids"] == chat_ids(tok, q["prompt"], 640) for q in held + train[:20])


def test_answer_stage_records_the_targets_greedy_answers(tiny_pair, tmp_path):
    """Prompts of different lengths answered in one left-padded batch get the answers
    each gets alone, and the teacher's top-1 at each response position is the token
    that follows: the data stage's records, made without vLLM. A second temperature
    answers every training prompt again."""
    import torch
    from transformers import LlamaForCausalLM

    from vllm_cmasd.training.cli import main

    target, _ = tiny_pair
    prompts = [{"sid": f"docs:p{i}", "kind": "docs:summarization", "prompt": "",
                "ids": [1, *range(10 + 7 * i, 10 + 7 * i + 3 + 5 * i)]} for i in range(5)]
    (tmp_path / "prompts.json").write_text(json.dumps({"eval_docs": prompts[:2], "train_docs": prompts[2:]}))
    assert main(["answer", "--target", str(target), "--work", str(tmp_path), "--gen-batch", "3",
                 "--docs-max-new-tokens", "12", "--docs-gen-minutes", "5", "--answer-temperatures", "0,1"]) == 0

    data = torch.load(tmp_path / "data.pt", weights_only=False)
    assert [r["sid"] for r in data["eval_docs"]] == ["docs:p0", "docs:p1"]
    greedy, sampled = data["train"][:3], data["train"][3:]
    assert sorted(r["sid"] for r in sampled) == sorted(r["sid"] for r in greedy) == ["docs:p2", "docs:p3", "docs:p4"]
    assert [r["ids"].tolist() for r in sampled] != [r["ids"].tolist() for r in greedy]
    model = LlamaForCausalLM.from_pretrained(target).eval()
    for r in data["eval_docs"] + greedy:
        alone = model.generate(torch.tensor([r["ids"][: r["n_prompt"]].tolist()]), max_new_tokens=12,
                               do_sample=False)[0]
        assert r["ids"].tolist() == alone.tolist()[: len(r["ids"])], r["sid"]
        resp = slice(r["n_prompt"] - 1, len(r["ids"]) - 1)
        assert r["t_ids"][resp, 0].tolist() == r["ids"][r["n_prompt"]:].tolist()
        assert (r["t_ids"][: r["n_prompt"] - 1] == -1).all()
