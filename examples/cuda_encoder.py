"""A BERT-base encoder on a CUDA GPU: ``torch.compile(model.cuda(), backend="bitfx")`` and what it generated.

    python examples/cuda_encoder.py                 # on a machine with an sm_80+ GPU, nvcc and CUDA torch
    bitfx kernels --target cuda-sm90 --op bit_linear --shape 128x768x3072 -o kernels/   # the generated code

The binarized layer runs its linears and attention products on the bitfx CUDA kernels (binary tensor
cores from 16 rows, CUDA-core popcounts below) on torch's current stream; ``kernels="reference"`` runs the
PyTorch definitions of the same ops on the GPU. The two agree to float rounding. (A float32 model: in a
``.half()`` model the BiPFT estimators that binarize adds are float32 and the compile fails; the kernels
themselves take fp16/bf16 activations and write fp16/bf16.) Without a GPU this script says so and exits.
"""
from __future__ import annotations

import copy
import sys

import torch

import bitfx  # noqa: F401  (the ops and the "bitfx" backend)
from bitfx.models import BertConfig, Layer


def main() -> int:
    if not torch.cuda.is_available():
        print("cuda_encoder: no CUDA GPU here; see `bitfx kernels --target cuda-sm90 ...` for the generated code")
        return 0
    torch.manual_seed(0)
    layer = Layer(BertConfig()).cuda().eval()
    x = torch.randn(4, 128, 768, device="cuda")
    mask = torch.zeros(4, 1, 1, 128, device="cuda")
    reference = torch.compile(copy.deepcopy(layer), backend="bitfx", options={"kernels": "reference"})
    fast = torch.compile(layer, backend="bitfx")
    with torch.no_grad():
        y_ref, y = reference(x, mask), fast(x, mask)
    print(f"output {tuple(y.shape)} {y.dtype} on {y.device}; max |kernels - reference| = "
          f"{(y.float() - y_ref.float()).abs().max().item():.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
