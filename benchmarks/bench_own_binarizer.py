"""A model that carries its own binarizer: its fake-quant forward (float matmuls of quantized values)
vs the same model through bitfx (recognised as bit_linear, on the TVM kernels), in one run.

    python benchmarks/bench_own_binarizer.py                   # BitNet b1.58, dim 768, seq 128
    python benchmarks/bench_own_binarizer.py --layer BitLinear --dim 512 --threads 1

Prints the median wall time of each, their ratio, and the relative difference of the outputs (the
bitfx model computes the model's own numbers). The model is tests/fake_quant_models.BitNetLM: BitLinear
q/k/v/o and feed-forward (written from the BitNet papers' formulas), float attention and output head.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import bitfx  # noqa: E402,F401
import fake_quant_models as fq  # noqa: E402


def median_ms(fn, repeat=10, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", default="BitLinear158", choices=["BitLinear", "BitLinear158", "QuantizeLinear"])
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = fq.randomize(fq.BitNetLM(getattr(fq, a.layer), vocab=1000, dim=a.dim, heads=12, depth=a.depth))
    tokens = torch.randint(0, 1000, (1, a.seq))
    with torch.no_grad():
        fast = torch.compile(model, backend="bitfx")
        ref, out = model(tokens), fast(tokens)
        eager_ms = median_ms(lambda: model(tokens))
        bitfx_ms = median_ms(lambda: fast(tokens))
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    print(f"{a.layer} dim {a.dim} depth {a.depth} seq {a.seq}, {a.threads} thread(s), {os.cpu_count()} CPUs")
    print(f"  fake-quant eager (the model as written): {eager_ms:8.2f} ms")
    print(f"  bitfx (recognised, TVM kernels):         {bitfx_ms:8.2f} ms   {eager_ms / bitfx_ms:.2f}x")
    print(f"  max |bitfx - model| / max |model| = {rel:.2e}")


if __name__ == "__main__":
    main()
