"""Time CM-ASD verification against vLLM's rejection sampler on the same inputs.

    .venv/bin/python scripts/bench_kernels.py [--vocab 49152] [--repeats 5]

With a CUDA GPU both sides run their Triton kernels. On vLLM's CPU build both
run what the engine runs there: vLLM its C++ fallbacks, CM-ASD the torch twins
of its kernels. Times are per call of ``rejection_sample`` /
``cmasd_rejection_sample`` (target logits in, output token ids out), median of
``--repeats`` after one warm-up call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from vllm.platforms import current_platform
from vllm.triton_utils import HAS_TRITON
from vllm.v1.sample.logits_processor import LogitsProcessors
from vllm.v1.sample.metadata import SamplingMetadata
from vllm.v1.sample.rejection_sampler import rejection_sample

from vllm_cmasd.config import CmasdConfig
from vllm_cmasd.policies import PolicyParams
from vllm_cmasd.verification import cmasd_rejection_sample
from vllm_cmasd.vllm_patch import register_cpu_kernels

# Each policy with the config's default knobs.
POLICIES = {
    name: PolicyParams.from_config(CmasdConfig(k_max=8, verification=verification))
    for name, verification in {"exact": "exact", "confidence": "confidence", "topk": "topk-tolerance"}.items()
}


def sampling_metadata(batch_size: int, greedy: bool, device: torch.device) -> SamplingMetadata:
    return SamplingMetadata(
        temperature=torch.full((batch_size,), 0.0 if greedy else 1.0, device=device),
        all_greedy=greedy,
        all_random=not greedy,
        top_p=None,
        top_k=None,
        generators={},
        max_num_logprobs=None,
        no_penalties=True,
        prompt_token_ids=None,
        frequency_penalties=torch.zeros(batch_size, device=device),
        presence_penalties=torch.zeros(batch_size, device=device),
        repetition_penalties=torch.ones(batch_size, device=device),
        output_token_ids=[[] for _ in range(batch_size)],
        allowed_token_ids_mask=None,
        bad_words_token_ids={},
        logitsprocs=LogitsProcessors(),
    )


def make_inputs(batch_size: int, k: int, vocab_size: int, greedy: bool, device: torch.device) -> dict:
    num_tokens = batch_size * k
    target_logits = torch.randn(num_tokens, vocab_size, device=device) * 3
    draft_probs = (target_logits + torch.randn_like(target_logits)).softmax(dim=-1)
    return dict(
        draft_token_ids=torch.multinomial(draft_probs, 1).squeeze(1).int(),
        num_draft_tokens=[k] * batch_size,
        max_spec_len=k,
        cu_num_draft_tokens=torch.arange(1, batch_size + 1, device=device, dtype=torch.int32) * k,
        # Greedy drafters (ngram, argmax drafts) give no distribution.
        draft_probs=None if greedy else draft_probs,
        target_logits=target_logits,
        bonus_token_ids=torch.randint(vocab_size, (batch_size, 1), device=device),
        sampling_metadata=sampling_metadata(batch_size, greedy, device),
    )


def time_ms(fn, repeats: int, device: torch.device) -> float:
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3

    once()  # warm-up: JIT compilation, allocator
    return statistics.median(once() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8])
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not HAS_TRITON:  # what vLLM's CPU worker and the plugin do
        current_platform.import_kernels()
        current_platform.register_triton_kernel_overrides()
        register_cpu_kernels()
    path = "Triton" if device.type == "cuda" else "CPU (vLLM C++ / CM-ASD torch twins)"
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"{torch.get_num_threads()} threads; path: {path}; vocab {args.vocab}; "
          f"median of {args.repeats}, ms per call; ratio = CM-ASD / vLLM")
    header = f"{'batch':>5} {'k':>2} {'drafts':>8} {'vLLM':>9} " + " ".join(
        f"{name:>10} {'ratio':>5}" for name in POLICIES
    )
    print(header)
    print("-" * len(header))
    torch.manual_seed(0)
    for greedy in (True, False):
        for batch_size in args.batch_sizes:
            for k in args.ks:
                inputs = make_inputs(batch_size, k, args.vocab, greedy, device)
                vllm_ms = time_ms(lambda: rejection_sample(**inputs), args.repeats, device)
                cells = []
                for params in POLICIES.values():
                    confidence = torch.rand(batch_size * k, device=device)
                    ms = time_ms(
                        lambda: cmasd_rejection_sample(**inputs, confidence=confidence, policy_params=params),
                        args.repeats,
                        device,
                    )
                    cells.append(f"{ms:10.2f} {ms / vllm_ms:5.2f}")
                kind = "greedy" if greedy else "random"
                print(f"{batch_size:>5} {k:>2} {kind:>8} {vllm_ms:9.2f} " + " ".join(cells))


if __name__ == "__main__":
    main()
