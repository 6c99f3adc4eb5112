"""sha-256 over a checkpoint's tensors (sorted names, raw bytes): the target converted on the
device machine is the one converted here."""

import hashlib
import sys

import torch
from safetensors.torch import load_file

tensors = load_file(sys.argv[1])
digest = hashlib.sha256()
for name in sorted(tensors):
    digest.update(name.encode())
    digest.update(tensors[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
print("target fingerprint", digest.hexdigest()[:16], len(tensors), "tensors")
