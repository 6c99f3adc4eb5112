"""CM-ASD with Ray tensor parallelism (TP=2): lossless, and both ranks in step.

On vLLM's CPU build Ray needs the opt-in platform of
``vllm_cmasd.ray_cpu_platform`` (``VLLM_CMASD_CPU_RAY=1``) and a Ray node that
offers its ``cmasd_cpu_rank`` resource; this module starts that local Ray
itself (2 CPUs, 2 rank slots) and stops it at the end. The two ranks are two
Ray actors with one OpenMP thread each. On GPUs (2 or more) Ray needs neither.

Engines run in an engine-core process of their own (``VLLM_ENABLE_V1_MULTIPROCESSING=1``,
overriding conftest): the test process may have resolved vLLM's platform long
before (plain ``CpuPlatform``), but a fresh engine process resolves it with the
switch set. Each rank's drafter and verifier are recorded through
``LLM.collective_rpc`` (hence ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``: callables
travel pickled) and the ranks' records must be identical. docs/ray.md.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import pytest
from test_engine import PROMPTS as ENGINE_PROMPTS

from vllm_cmasd.engines import llm_kwargs
from vllm_cmasd.ray_cpu_platform import RAY_RESOURCE, SWITCH

pytestmark = pytest.mark.ray

TP = 2
# The engine tests' mixed-length batch, first six prompts.
PROMPTS = ENGINE_PROMPTS[:6]
K_MAX = 6
MAX_TOKENS = 32


def _on_cpu_build() -> bool:
    from vllm.platforms import cpu_platform_plugin

    return cpu_platform_plugin() is not None


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray of our own, and the environment that makes engines use it."""
    ray = pytest.importorskip("ray")
    import cloudpickle
    import vllm.envs

    on_cpu = _on_cpu_build()
    if not on_cpu and _gpu_count() < TP:
        pytest.skip(f"needs vLLM's CPU build or {TP} GPUs")
    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process")

    env = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    }
    if on_cpu:
        env[SWITCH] = "1"
    saved = {name: os.environ.get(name) for name in [*env, "RAY_ADDRESS"]}
    started = time.monotonic()
    for attempt in range(3):
        try:
            ray.init(
                address="local",  # never someone else's cluster
                num_cpus=TP if on_cpu else None,
                num_gpus=None if on_cpu else TP,
                resources={RAY_RESOURCE: TP} if on_cpu else None,
                include_dashboard=False,
                log_to_driver=False,
            )
            break
        except Exception as error:
            # Ray gives its raylet a fixed 30 s to register; on a loaded
            # 2-core machine that can run out. Start again from scratch.
            if "timed out during startup" not in str(error) or attempt == 2:
                raise
            ray.shutdown()
    # Set after ray.init on purpose: Ray's own processes do not inherit the
    # switch, so the workers get it only the way the platform hands it to them
    # (the actors' runtime env), as on a cluster started without it.
    os.environ.update(env)
    # The engine process (a child of this one) joins this cluster.
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    # Earlier in-process engines froze vLLM's env cache; read env vars afresh.
    vllm.envs.disable_envs_cache()
    # The recorders below travel to the workers by value (this module is not
    # importable there).
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    from vllm.platforms import current_platform

    print(
        f"\nlocal Ray up in {time.monotonic() - started:.1f}s: {ray.cluster_resources()}; "
        f"this process's vLLM platform: {type(current_platform).__name__}"
    )
    try:
        yield
    finally:
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        vllm.envs.disable_envs_cache()


def test_platform_is_opt_in(monkeypatch):
    """Without the switch the entry point leaves vLLM's platform detection alone."""
    from importlib.metadata import entry_points

    from vllm_cmasd import ray_cpu_platform

    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.platform_plugins")}
    assert plugins.get("cmasd_cpu_ray") == "vllm_cmasd.ray_cpu_platform:platform_plugin"
    monkeypatch.delenv(SWITCH, raising=False)
    assert ray_cpu_platform.platform_plugin() is None
    monkeypatch.setenv(SWITCH, "1")
    if not _on_cpu_build():  # GPUs: Ray works without it; the switch is ignored
        assert ray_cpu_platform.platform_plugin() is None
        return
    assert ray_cpu_platform.platform_plugin() == "vllm_cmasd.ray_cpu_platform.CpuRayPlatform"
    from vllm.platforms.cpu import CpuPlatform

    cls = ray_cpu_platform.CpuRayPlatform
    assert issubclass(cls, CpuPlatform) and cls.ray_device_key == RAY_RESOURCE
    assert cls.ray_noset_device_env_vars == [SWITCH]


def test_vllm_started_ray_gets_the_rank_resource(monkeypatch):
    """A bare ray.init() by vLLM reads the node's extra resources from RAY_OVERRIDE_RESOURCES."""
    import json

    from vllm_cmasd import ray_cpu_platform

    for name in ("RAY_ADDRESS", "RAY_OVERRIDE_RESOURCES"):
        monkeypatch.delenv(name, raising=False)
    ray_cpu_platform._offer_ranks_if_vllm_starts_ray(TP)
    offered = json.loads(os.environ["RAY_OVERRIDE_RESOURCES"])
    assert offered == {RAY_RESOURCE: max(TP, os.cpu_count() or 1)}
    # A Ray reached through an address is left alone.
    monkeypatch.delenv("RAY_OVERRIDE_RESOURCES")
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    ray_cpu_platform._offer_ranks_if_vllm_starts_ray(TP)
    assert "RAY_OVERRIDE_RESOURCES" not in os.environ


# --------------------------------------------------------------------------- per-rank records


def _digest(tensor) -> str | None:
    """Bit-exact fingerprint of a tensor (shape, dtype, bytes)."""
    import torch

    if tensor is None:
        return None
    t = tensor.detach().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)} {t.dtype}".encode())
    h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _install_recorder(worker):
    """On each rank: record every draft and every verification, bit-exactly."""
    import torch

    runner = worker.model_runner
    drafter, sampler = runner.drafter, runner.rejection_sampler
    records = runner.cmasd_rank_records = []
    propose, verify = drafter.propose, sampler.forward

    def recorded_propose(*args, **kwargs):
        drafts = propose(*args, **kwargs)
        req_ids = list(runner.input_batch.req_ids)
        # A step the draft budget ran without a drafter pass leaves no signals.
        ran = all(r in drafter._signals for r in req_ids)
        records.append({
            "step": "draft",
            "req_ids": req_ids,
            "drafts": [list(d) for d in drafts],
            "skipped_passes": drafter.stats.num_skipped_passes,
            # What the window's stop decisions and the verifier's policy read.
            "confidence": _digest(torch.stack([drafter._signals[r]["confidence"] for r in req_ids])) if ran else None,
            "draft_probs": _digest(drafter._last_draft_probs),
        })
        return drafts

    def recorded_verify(metadata, draft_probs, logits, sampling_metadata):
        out = verify(metadata, draft_probs, logits, sampling_metadata)
        records.append({
            "step": "verify",
            "num_draft_tokens": list(metadata.num_draft_tokens),
            "target_logits": _digest(logits),  # all-gathered over the TP group
            "num_accepted": sampler.last_num_accepted.tolist(),
            "tokens": out.sampled_token_ids.tolist(),
            # A step the budget ran without a drafter pass has no draft record
            # (vllm_patch skips propose): its skip is counted here.
            "skipped_passes": drafter.stats.num_skipped_passes,
        })
        return out

    drafter.propose = recorded_propose
    sampler.forward = recorded_verify
    from vllm.distributed import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank(), type(drafter).__name__, type(sampler).__name__


def _take_records(worker):
    records = worker.model_runner.cmasd_rank_records
    taken = list(records)
    records.clear()
    return taken


@dataclass
class Run:
    token_ids: list[list[int]]  # per batch, per prompt
    seconds: float
    ranks: list = field(default_factory=list)  # (tp rank, drafter, sampler) per worker
    records: list = field(default_factory=list)  # per batch: per worker (rank order) records
    outputs: list = field(default_factory=list)  # per batch: vLLM RequestOutputs


def generate(batches, *, record: bool = False, in_process: bool = False, **kwargs) -> Run:
    """One engine: generate each ``(prompts, params)`` batch in turn, then stop it."""
    import vllm.envs
    from vllm import LLM

    from vllm_cmasd.engines import shutdown

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    vllm.envs.disable_envs_cache()  # an engine core freezes it; read the line above
    started = time.monotonic()
    try:
        llm = LLM(**kwargs)
    except RuntimeError as error:
        # One TP=2 start in ~40 on the 2-core CI machine has failed here (12-01,
        # commit 86cb42c; its root cause fell outside the CI log's excerpt), and
        # the same tests passed on every rerun. One more try, with a warning in
        # the run's summary; a second failure fails the test.
        if "Engine core initialization failed" not in str(error):
            raise
        warnings.warn(f"TP={kwargs.get('tensor_parallel_size')} engine failed to start; one more try: {error}")
        llm = LLM(**kwargs)
    run = Run(token_ids=[], seconds=0.0)
    try:
        ranks = llm.collective_rpc(_install_recorder) if record else []
        order = sorted(range(len(ranks)), key=lambda i: ranks[i][0])
        run.ranks = [ranks[i] for i in order]
        for prompts, params in batches:
            outputs = llm.generate(prompts, params, use_tqdm=False)
            run.outputs.append(outputs)
            run.token_ids.append([list(o.outputs[0].token_ids) for o in outputs])
            if record:
                records = llm.collective_rpc(_take_records)
                run.records.append([records[i] for i in order])
    finally:
        shutdown(llm)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        vllm.envs.disable_envs_cache()
    run.seconds = time.monotonic() - started
    return run


def engine(target, *, tp: int = TP, **kwargs):
    """Tiny pair, fp32 eager (llm_kwargs on CPU), a small fixed KV cache per rank."""
    settings = {
        "max_model_len": 512,
        "gpu_memory_utilization": 0.15,
        "kv_cache_memory_bytes": 64 * 2**20,  # plenty here; skips the memory profile
        "tensor_parallel_size": tp,
    }
    if tp > 1:
        settings["distributed_executor_backend"] = "ray"
    return llm_kwargs(target, **{**settings, **kwargs})


def greedy(max_tokens=MAX_TOKENS, logprobs=None):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs)


def sampled():
    """Mixed: unseeded (global generator) and seeded (own generator) sampling, one greedy."""
    from vllm import SamplingParams

    params = [
        SamplingParams(
            temperature=0.9, top_p=0.95, max_tokens=MAX_TOKENS, ignore_eos=True,
            seed=(100 + i if i % 2 else None),
        )
        for i in range(len(PROMPTS))
    ]
    params[0] = greedy()
    return params


def assert_ranks_agree(run: Run, records: list, proposer: str = "CmasdProposer") -> list[dict]:
    assert [r[0] for r in run.ranks] == list(range(TP)), run.ranks
    assert all(r[1:] == (proposer, "CmasdRejectionSampler") for r in run.ranks), run.ranks
    first, *others = records
    assert first and any(r["step"] == "verify" for r in first)
    for rank, other in enumerate(others, start=1):
        assert len(other) == len(first), (rank, len(other), len(first))
        for step, (a, b) in enumerate(zip(first, other)):
            assert a == b, f"rank {rank} differs from rank 0 at record {step}:\n{a}\n{b}"
    return first


def draft_lengths(records) -> list[list[int]]:
    return [[len(d) for d in r["drafts"]] for r in records if r["step"] == "draft"]


# --------------------------------------------------------------------------- test


@pytest.fixture(scope="module")
def plain_tp2(ray_cluster, tiny_pair):
    target, _ = tiny_pair
    return generate([(PROMPTS, greedy())], **engine(target))


def test_cmasd_over_ray_tp2(ray_cluster, tiny_pair, plain_tp2):
    """Greedy exact: TP=2 CM-ASD == TP=2 plain decoding, == TP=1 CM-ASD where fp32
    allows; greedy and sampled: both ranks draft, decide and verify identically."""
    target, draft = tiny_pair
    cmasd = dict(draft=draft, num_speculative_tokens=K_MAX, cmasd={"threshold": 0.3, "verification": "exact"})
    # Sampled requests draft from the drafter's distribution (random numbers
    # in the drafting loop too); greedy requests still draft the argmax.
    probabilistic = {"draft_sample_method": "probabilistic"}

    kwargs = engine(target, **cmasd)
    kwargs["speculative_config"].update(probabilistic)
    ours_tp2 = generate([(PROMPTS, greedy()), (PROMPTS, sampled())], record=True, **kwargs)
    kwargs = engine(target, tp=1, **cmasd)
    kwargs["speculative_config"].update(probabilistic)
    ours_tp1 = generate([(PROMPTS, greedy(logprobs=2))], in_process=True, **kwargs)
    print(
        f"\nengine start + generate + stop: plain TP=2 {plain_tp2.seconds:.0f}s, "
        f"CM-ASD TP=2 {ours_tp2.seconds:.0f}s (two batches), CM-ASD TP=1 {ours_tp1.seconds:.0f}s"
    )

    # Lossless under TP=2: CM-ASD's exact policy reproduces TP=2 plain decoding.
    assert ours_tp2.token_ids[0] == plain_tp2.token_ids[0]

    # Both ranks drafted (same lengths, tokens, confidences), verified (same
    # target logits, accepted counts, tokens) identically, bit for bit.
    for batch, records in enumerate(ours_tp2.records):
        first = assert_ranks_agree(ours_tp2, records)
        lengths = draft_lengths(first)
        print(f"batch {batch}: {len(lengths)} drafting steps, ranks identical; draft lengths {lengths[:6]} ...")
        assert any(len(set(step)) > 1 for step in lengths), lengths  # mixed lengths in one batch
        assert any(n < K_MAX for step in lengths for n in step), lengths  # early stops
    sampled_records = ours_tp2.records[1][0]
    assert any(r["draft_probs"] for r in sampled_records if r["step"] == "draft")  # drafts were sampled
    assert len({tuple(t) for t in ours_tp2.token_ids[1]}) > 1
    assert ours_tp2.token_ids[1][0] == ours_tp2.token_ids[0][0]  # the greedy one stayed greedy

    # TP=1: the same tokens wherever fp32 allows. TP=2 sums each row-parallel
    # matmul (o_proj, down_proj) as two half sums plus an all-reduce, so its
    # logits differ from TP=1 in the last bits; greedy decoding can only part
    # where the target's top two tokens are that close.
    tp1_logprobs = [o.outputs[0].logprobs for o in ours_tp1.outputs[0]]
    same = 0
    for i, (a, b) in enumerate(zip(ours_tp2.token_ids[0], ours_tp1.token_ids[0])):
        if a == b:
            same += 1
            continue
        pos = next(p for p, (x, y) in enumerate(zip(a, b)) if x != y)
        top2 = sorted(tp1_logprobs[i][pos].values(), key=lambda lp: -lp.logprob)[:2]
        gap = top2[0].logprob - top2[1].logprob
        print(f"prompt {i}: TP=2 and TP=1 part at token {pos}; TP=1 top-2 logprob gap there {gap:.2e}")
        assert gap < 1e-3, (i, pos, gap)
    print(f"TP=2 == TP=1 on {same}/{len(PROMPTS)} prompts")


def test_options_over_ray_tp2(ray_cluster, tiny_pair, tiny_self_draft, tiny_eagle3, plain_tp2):
    """R-Stitch, the controller (the default config), the self-draft and an
    EAGLE-3 head at TP=2: ranks identical; all but R-Stitch stay lossless (the
    self-draft's weights shared per rank, the head's first pass on every step)."""
    target, draft = tiny_pair
    options = {
        "rstitch": (draft, "draft_model", {"verification": "rstitch", "rstitch_entropy": 2.0, "threshold": 0.3}),
        "controller": (draft, "draft_model", {"verification": "exact"}),
        "specbound": (tiny_self_draft, "draft_model", {"verification": "exact", "threshold": 0.3}),
        "eagle3": (tiny_eagle3, "eagle3", {"verification": "exact", "threshold": 0.3}),
    }
    for name, (drafter, method, cmasd) in options.items():
        run = generate(
            [(PROMPTS, greedy())], record=True,
            **engine(target, draft=drafter, draft_method=method, num_speculative_tokens=K_MAX, cmasd=cmasd),
        )
        first = assert_ranks_agree(run, run.records[0], proposer="CmasdEagleProposer" if method == "eagle3" else "CmasdProposer")
        accepted = sum(sum(r["num_accepted"]) for r in first if r["step"] == "verify")
        skipped = max((r["skipped_passes"] for r in first), default=0)
        print(f"{name}: TP=2 engine {run.seconds:.0f}s, ranks identical, {accepted} drafted tokens accepted, "
              f"{skipped} steps without a drafter pass")
        # The controller decides by measured times: on the tiny pair it may skip
        # every pass. The random head's drafts are drawn, not learnt: it drafts.
        if name == "eagle3":
            assert any(sum(len(d) for d in r["drafts"]) for r in first if r["step"] == "draft"), name
        else:
            assert accepted > 0 or (name == "controller" and skipped > 0), name
        if name == "rstitch":
            assert run.token_ids[0] != plain_tp2.token_ids[0]  # kept drafts the target would not have picked
        else:
            assert run.token_ids[0] == plain_tp2.token_ids[0], name
