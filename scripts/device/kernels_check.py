"""The verification kernels compiled by Triton for the GPU against their torch twins on the
same GPU tensors (every scenario x policy of tests/test_kernels.py), then the time of one
verification call (stats + walk) at SmolLM2's vocabulary, kernel and twin.

    python3 scripts/device/kernels_check.py     # on a machine with a CUDA GPU

Runs without vLLM installed (the lent GPU machine has none): then the two names the
kernels and their tests take from vLLM stand in below.
"""

import statistics
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

try:
    import vllm.triton_utils.dispatcher  # noqa: F401
except ImportError:
    class KernelOverride:
        """``kernel[grid](**kwargs)`` routed to the torch twin by keyword, as vLLM's dispatcher does."""

        def __init__(self, kernel, impl):
            self.impl = impl

        def __getitem__(self, grid):
            return lambda **kwargs: self.impl(**kwargs)

    names = {"vllm.v1.sample.rejection_sampler": {"PLACEHOLDER_TOKEN_ID": -1},
             "vllm.triton_utils.dispatcher": {"KernelOverride": KernelOverride}}
    for name in ("vllm", "vllm.v1", "vllm.v1.sample", "vllm.triton_utils", *names):
        sys.modules[name] = types.ModuleType(name)
        vars(sys.modules[name]).update(names.get(name, {}))

import test_kernels as tk  # noqa: E402
from vllm.triton_utils.dispatcher import KernelOverride  # noqa: E402

from vllm_cmasd.kernels import verify  # noqa: E402
from vllm_cmasd.policies import Policy  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK, CHUNK = verify.VOCAB_BLOCK_SIZE, verify.TWIN_CHUNK_ELEMENTS


def on_device(inputs):
    return {k: (v.to(DEVICE) if torch.is_tensor(v) else v) for k, v in inputs.items()}


def verify_with(inputs, policy, twin: bool):
    for kernel, impl in verify.KERNELS_AND_TWINS:
        setattr(verify, kernel.__name__, KernelOverride(kernel, impl) if twin else kernel)
    out = tk.verify_batch(inputs, policy)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return out


def main() -> None:
    n, bad = 0, []
    for name, (lengths, vocab, greedy, with_q, block, knobs) in tk.SCENARIOS.items():
        verify.VOCAB_BLOCK_SIZE, verify.TWIN_CHUNK_ELEMENTS = block, 3 * vocab
        inputs = on_device(tk.make_inputs(lengths, vocab, greedy, with_q, **knobs))
        for policy in Policy:
            n += 1
            try:
                tk.assert_same(verify_with(inputs, policy, False), verify_with(inputs, policy, True))
            except AssertionError as e:
                bad.append(f"{name}/{policy.name}: {str(e)[:300]}")
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"kernels vs twins on {gpu} (triton {tk.triton.__version__}, torch {torch.__version__}): "
          f"{n - len(bad)}/{n} identical", *bad, sep="\n")
    verify.VOCAB_BLOCK_SIZE, verify.TWIN_CHUNK_ELEMENTS = BLOCK, CHUNK
    print("batch k policy sampled kernel_us twin_us")
    for batch in (1, 16, 64):
        for greedy in (1, 0):
            inputs = on_device(tk.make_inputs([4] * batch, 49152, [greedy] * batch, True))
            for policy in Policy:
                times = {}
                for twin in (False, True):
                    verify_with(inputs, policy, twin)
                    runs = []
                    for _ in range(20):
                        t0 = time.perf_counter()
                        verify_with(inputs, policy, twin)
                        runs.append(time.perf_counter() - t0)
                    times[twin] = statistics.median(runs) * 1e6
                print(f"{batch} 4 {policy.name} {not greedy} {times[False]:.0f} {times[True]:.0f}", flush=True)


if __name__ == "__main__":
    main()
