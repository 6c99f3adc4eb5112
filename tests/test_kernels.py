"""The verification kernels equal their torch twins, and compile for GPUs.

Triton's interpreter runs the kernels on CPU tensors, but only when
TRITON_INTERPRET=1 is set before triton is first imported (triton.language's
own helpers are decorated at import). Setting it inside this pytest process
would come too late, and would leak into everything else the process runs, so
``test_kernels_match_torch_under_interpreter`` runs this module again in a
child pytest with TRITON_INTERPRET=1: there the ``interpreted`` tests run and
the compile tests skip (the compiler needs the non-interpreted triton.language).
Run the child directly with ``TRITON_INTERPRET=1 pytest tests/test_kernels.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import torch
import triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from vllm.triton_utils.dispatcher import KernelOverride

from vllm_cmasd.config import CmasdConfig
from vllm_cmasd.kernels import verify
from vllm_cmasd.policies import Policy, PolicyParams

pytestmark = pytest.mark.kernels

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(
    not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 child of test_kernels_match_torch_under_interpreter"
)
compiled = pytest.mark.skipif(INTERPRETING, reason="the compiler needs triton imported without TRITON_INTERPRET")


def test_kernels_match_torch_under_interpreter():
    if INTERPRETING:
        pytest.skip("this is the interpreter run")
    start = time.monotonic()
    child = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-x", "-q", "-p", "no:cacheprovider"],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = child.stdout.strip().splitlines()[-1] if child.stdout.strip() else ""
    print(f"interpreter run ({time.monotonic() - start:.0f}s): {summary}")
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-3000:]
    assert " passed" in summary


# --------------------------------------------------------------------------
# Interpreted kernels vs torch twins.
# --------------------------------------------------------------------------

# name: (draft lengths per request, vocab size, which requests are greedy,
#        draft_probs given, vocabulary block size, extra knobs)
SCENARIOS = {
    "mixed": ([3, 0, 5, 1, 4], 100, [1, 0, 0, 1, 0], True, 32, {}),
    "all_greedy": ([4, 2, 0, 3], 77, [1, 1, 1, 1], False, 16, {}),
    "all_random": ([2, 5, 3], 64, [0, 0, 0], True, 64, {}),
    "one_hot_drafts": ([3, 4], 50, [0, 0], False, 16, {}),
    "padded_and_empty": ([0, 3, 0, 2, 1], 40, [0, 1, 0, 0, 1], True, 16, {"pad": 0.4}),
    "ties": ([4, 4, 3], 40, [1, 0, 0], True, 8, {"ties": True}),
    "bad_values": ([3, 2, 4], 48, [1, 0, 0], True, 16, {"bad_values": True}),
    "no_drafts": ([0, 0, 0], 32, [0, 1, 0], True, 32, {}),
    "wide_vocab": ([2, 1], 1000, [0, 1], True, 256, {}),
    "fp64_noise": ([3, 2, 4], 90, [0, 1, 0], True, 32, {"fp64_noise": True}),
    "fp64_noise_one_hot": ([2, 5], 70, [0, 0], False, 16, {"fp64_noise": True, "pad": 0.3}),
}


def make_inputs(
    draft_lengths, vocab_size, greedy, with_draft_probs, pad=0.0, ties=False, bad_values=False, fp64_noise=False, seed=0
):
    """Random verification inputs whose drafts are often right, so walks go deep."""
    g = torch.Generator().manual_seed(seed)
    batch_size, num_tokens = len(draft_lengths), sum(draft_lengths)
    logits = torch.randn(num_tokens, vocab_size, generator=g) * 3
    if ties:  # integer logits: many equal probabilities, including the maximum
        logits = logits.round()
    target_probs = logits.softmax(dim=-1)
    draft_probs = (logits + torch.randn(num_tokens, vocab_size, generator=g) * 0.5).softmax(dim=-1)
    draft_ids = torch.multinomial(draft_probs, 1, generator=g).squeeze(1)
    # Greedy-style drafts: the target's argmax half of the time.
    take_argmax = torch.rand(num_tokens, generator=g) < 0.5
    draft_ids = torch.where(take_argmax, target_probs.argmax(dim=-1), draft_ids).int()
    draft_ids[torch.rand(num_tokens, generator=g) < pad] = -1
    if bad_values and num_tokens >= 3:
        target_probs[0] = float("nan")
        target_probs[1, :5] = float("inf")
        target_probs[2, ::3] = float("nan")
        logits[0] = float("nan")
        logits[1, :5] = float("inf")
        draft_probs[1, draft_ids[1].clamp(min=0)] = 0.0
        draft_probs[2, ::2] = float("nan")
        draft_ids[-1] = vocab_size + 3  # out of range, like padding
    is_greedy = torch.tensor(greedy, dtype=torch.bool)
    all_greedy = bool(is_greedy.all())
    return dict(
        target_logits=logits,
        target_probs=target_probs,
        draft_probs=draft_probs if with_draft_probs else None,
        draft_token_ids=draft_ids,
        cu_num_draft_tokens=torch.tensor(draft_lengths).cumsum(0).int(),
        inverse_noise=None if all_greedy else torch.empty(
            batch_size, vocab_size, dtype=torch.float64 if fp64_noise else torch.float32
        ).exponential_(generator=g).reciprocal(),
        bonus_token_ids=torch.randint(vocab_size, (batch_size, 1), generator=g),
        uniform_probs=None if all_greedy else torch.rand(num_tokens, dtype=torch.float64, generator=g),
        confidence=torch.rand(num_tokens, generator=g),
        draft_entropy=torch.rand(num_tokens, generator=g) * 2,
        is_greedy=None if all_greedy else is_greedy,
        max_spec_len=max(draft_lengths),
    )


def verify_batch(
    inputs, policy, confidence=True, leniency=1.5, confidence_floor=0.3, topk_beta=3, topk_tau=1.0, rstitch_entropy=1.0
):
    stats = verify.compute_draft_token_stats(
        inputs["target_probs"],
        inputs["draft_probs"],
        inputs["draft_token_ids"],
        inputs["cu_num_draft_tokens"],
        inputs["inverse_noise"],
        policy,
        argmax_id=verify.target_argmax(inputs["target_logits"])[0],
    )
    config = CmasdConfig(
        k_max=8, verification=policy.config_name, leniency=leniency, confidence_floor=confidence_floor,
        topk_beta=topk_beta, topk_tau=topk_tau, rstitch_entropy=rstitch_entropy,
    )
    output = verify.walk_acceptance(
        stats,
        draft_token_ids=inputs["draft_token_ids"],
        cu_num_draft_tokens=inputs["cu_num_draft_tokens"],
        bonus_token_ids=inputs["bonus_token_ids"],
        uniform_probs=inputs["uniform_probs"],
        is_greedy=inputs["is_greedy"],
        max_spec_len=inputs["max_spec_len"],
        params=PolicyParams.from_config(config),
        confidence=inputs["confidence"] if confidence else None,
        draft_entropy=inputs["draft_entropy"],
    )
    return stats, output


def run_kernels_and_twins(monkeypatch, fn):
    """fn() with the (interpreted) Triton kernels, then with the torch twins."""
    results = []
    for use_twin in (False, True):
        for kernel, twin in verify.KERNELS_AND_TWINS:
            monkeypatch.setattr(verify, kernel.__name__, KernelOverride(kernel, twin) if use_twin else kernel)
        results.append(fn())
    return results


def assert_same(kernel_result, twin_result):
    (kernel_stats, kernel_output), (twin_stats, twin_output) = kernel_result, twin_result
    for field, a, b in zip(kernel_stats._fields, kernel_stats, twin_stats):
        if a is None or b is None:
            assert a is None and b is None, field
        else:
            assert a.dtype == b.dtype and torch.equal(a, b), (field, a, b)
    for a, b in zip(kernel_output, twin_output):
        assert a.dtype == b.dtype == torch.int32 and torch.equal(a, b), (a, b)


@interpreted
@pytest.mark.parametrize("policy", list(Policy), ids=lambda p: p.name)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_kernels_equal_twins(monkeypatch, scenario, policy):
    draft_lengths, vocab_size, greedy, with_draft_probs, block_size, knobs = SCENARIOS[scenario]
    monkeypatch.setattr(verify, "VOCAB_BLOCK_SIZE", block_size)
    monkeypatch.setattr(verify, "TWIN_CHUNK_ELEMENTS", 3 * vocab_size)  # chunks of 3 rows
    inputs = make_inputs(draft_lengths, vocab_size, greedy, with_draft_probs, **knobs)
    kernel_result, twin_result = run_kernels_and_twins(monkeypatch, lambda: verify_batch(inputs, policy))
    assert_same(kernel_result, twin_result)
    output_token_ids, num_accepted = kernel_result[1]
    assert ((output_token_ids >= -1) & (output_token_ids < vocab_size)).all()


@interpreted
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kernels_equal_twins_across_knobs(monkeypatch, seed):
    """Other policy knobs, and CONFIDENCE without a confidence signal."""
    monkeypatch.setattr(verify, "VOCAB_BLOCK_SIZE", 16)
    inputs = make_inputs([2, 4, 3, 1], 60, [0, 1, 0, 0], True, seed=seed)
    for policy, kwargs in [
        (Policy.CONFIDENCE, dict(confidence=False)),
        (Policy.CONFIDENCE, dict(leniency=0.0)),
        (Policy.CONFIDENCE, dict(leniency=6.0, confidence_floor=0.0)),
        (Policy.TOPK_TOLERANCE, dict(topk_beta=1, topk_tau=0.0)),
        (Policy.TOPK_TOLERANCE, dict(topk_beta=10, topk_tau=5.0)),
        (Policy.RSTITCH, dict(rstitch_entropy=0.0)),
        (Policy.RSTITCH, dict(rstitch_entropy=3.0)),
    ]:
        results = run_kernels_and_twins(monkeypatch, lambda: verify_batch(inputs, policy, **kwargs))
        assert_same(*results)


@st.composite
def random_inputs(draw):
    batch_size = draw(st.integers(1, 5))
    return dict(
        draft_lengths=draw(st.lists(st.integers(0, 6), min_size=batch_size, max_size=batch_size)),
        vocab_size=draw(st.integers(2, 70)),
        greedy=draw(st.lists(st.booleans(), min_size=batch_size, max_size=batch_size)),
        with_draft_probs=draw(st.booleans()),
        pad=draw(st.sampled_from([0.0, 0.3])),
        ties=draw(st.booleans()),
        bad_values=draw(st.booleans()),
        fp64_noise=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@interpreted
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=random_inputs(), policy=st.sampled_from(list(Policy)), block_size=st.sampled_from([8, 16, 64]))
def test_kernels_equal_twins_on_random_batches(monkeypatch, spec, policy, block_size):
    monkeypatch.setattr(verify, "VOCAB_BLOCK_SIZE", block_size)
    inputs = make_inputs(**spec)
    assert_same(*run_kernels_and_twins(monkeypatch, lambda: verify_batch(inputs, policy)))


# --------------------------------------------------------------------------
# GPU compilation (no GPU needed: triton compiles to PTX and ptxas to cubin).
# --------------------------------------------------------------------------

STATS_SIGNATURE = dict(
    target_probs="*fp32",
    draft_probs="*fp32",
    draft_token_ids="*i32",
    token_request_ids="*i64",
    inverse_noise="*fp32",
    target_prob_of_draft="*fp32",
    draft_prob_of_draft="*fp32",
    target_max_prob="*fp32",
    num_more_likely="*i32",
    recovered_token_ids="*i32",
    vocab_size="i32",
    POLICY="constexpr",
    BLOCK_SIZE="constexpr",
)
WALK_SIGNATURE = dict(
    output_token_ids="*i32",
    num_accepted="*i32",
    cu_num_draft_tokens="*i32",
    draft_token_ids="*i32",
    target_prob_of_draft="*fp32",
    draft_prob_of_draft="*fp32",
    target_max_prob="*fp32",
    target_argmax="*i32",
    num_more_likely="*i32",
    recovered_token_ids="*i32",
    uniform_probs="*fp64",
    confidence="*fp32",
    draft_entropy="*fp32",
    is_greedy="*i1",
    bonus_token_ids="*i64",
    max_spec_len="i32",
    leniency="fp32",
    confidence_floor="fp32",
    confidence_span="fp32",
    topk_beta="i32",
    topk_tau="fp32",
    rstitch_entropy="fp32",
    POLICY="constexpr",
)


def kernel_variants():
    """Every (kernel, policy, arguments that are None, noise dtype) that
    ``cmasd_rejection_sample`` can launch: None arguments and dtypes are
    compile-time, so each is its own binary.

    - stats kernel: not launched for all-greedy EXACT / RSTITCH batches (they
      take the argmax path); draft probabilities or one-hot drafts; in a batch
      with sampled requests, fp32 or fp64 noise (``use_fp64_gumbel``).
    - walk kernel: all-greedy or not; CONFIDENCE with or without a signal;
      num_more_likely only for TOPK_TOLERANCE, draft_entropy only for RSTITCH.
    """
    for policy in Policy:
        for all_greedy in (False, True):
            base = () if policy == Policy.TOPK_TOLERANCE else ("num_more_likely",)
            if not (all_greedy and policy in (Policy.EXACT, Policy.RSTITCH)):
                for one_hot in (False, True):
                    for noise in (None,) if all_greedy else ("fp32", "fp64"):
                        none = base + (("draft_probs",) if one_hot else ())
                        if all_greedy:
                            none += ("token_request_ids", "inverse_noise", "recovered_token_ids")
                        label = f"{policy.name}-{'greedy' if all_greedy else 'mixed'}-{'onehot' if one_hot else 'q'}"
                        yield pytest.param(verify.draft_token_stats_kernel, policy, none, noise,
                                           id=f"stats-{label}" + (f"-{noise}" if noise else ""))
            walk_none = base + (() if policy == Policy.RSTITCH else ("draft_entropy",))
            if all_greedy:
                walk_none += ("recovered_token_ids", "uniform_probs", "is_greedy")
            for with_confidence in (True, False) if policy == Policy.CONFIDENCE else (False,):
                none = walk_none + (() if with_confidence else ("confidence",))
                label = f"{policy.name}-{'greedy' if all_greedy else 'mixed'}" + ("-conf" if with_confidence else "")
                yield pytest.param(verify.acceptance_walk_kernel, policy, none, None, id=f"walk-{label}")


# The resource bounds docs/verification.md states (measured with triton's
# ptxas, no -maxrregcount); the test prints what ptxas reports per variant.
MAX_REGISTERS = {"draft_token_stats_kernel": 48, "acceptance_walk_kernel": 32}


def max_shared_bytes(kernel_name, noise_dtype):
    if kernel_name == "acceptance_walk_kernel":
        return 0
    return 48 if noise_dtype == "fp64" else 32  # the reductions' scratch


def max_spill_bytes(kernel_name, noise_dtype, capability):
    # ptxas keeps the fp64-noise stats kernel (use_fp64_gumbel, off by default)
    # at 32 registers on sm_80 and spills one 8-byte value.
    return 8 if (kernel_name, noise_dtype, capability) == ("draft_token_stats_kernel", "fp64", 80) else 0


@compiled
@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("kernel, policy, none_args, noise_dtype", list(kernel_variants()))
def test_kernel_compiles_for_gpu(kernel, policy, none_args, noise_dtype, capability):
    is_stats = kernel.__name__ == "draft_token_stats_kernel"
    signature = dict(STATS_SIGNATURE if is_stats else WALK_SIGNATURE)
    constexprs = {"POLICY": int(policy)}
    if is_stats:
        constexprs["BLOCK_SIZE"] = verify.VOCAB_BLOCK_SIZE
    if noise_dtype is not None:
        signature["inverse_noise"] = f"*{noise_dtype}"
    for name in none_args:
        signature[name] = "constexpr"
        constexprs[name] = None
    target = GPUTarget("cuda", capability, 32)
    binary = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target)

    # Registers and spills are only known to ptxas (triton reads them from the
    # driver at load time), so ask the ptxas triton itself used.
    ptx = binary.asm["ptx"]
    arch = re.search(r"^\.target (\S+)", ptx, re.MULTILINE).group(1)
    report = subprocess.run(
        [get_ptxas(capability).path, f"-arch={arch}", "-v", "-", "-o", os.devnull],
        input=ptx,
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spill_stores = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    print(f"{kernel.__name__} {policy.name} none={none_args} noise={noise_dtype} sm_{capability}: "
          f"{registers} registers, {spill_stores} B spilled, {binary.metadata.shared} B shared")
    assert "cubin" in binary.asm and binary.metadata.num_warps == 4
    assert registers <= MAX_REGISTERS[kernel.__name__]
    assert spill_stores <= max_spill_bytes(kernel.__name__, noise_dtype, capability)
    assert binary.metadata.shared <= max_shared_bytes(kernel.__name__, noise_dtype)
