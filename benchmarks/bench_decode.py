"""The decode step (M = 1): one new token over a KV cache, bitfx vs fp32, measured in one run; prints ratios.

    python benchmarks/bench_decode.py              # GPT-2-small widths, 2 blocks, 128 cached tokens
    python benchmarks/bench_decode.py --layers 4 --past 256
    TVM_NUM_THREADS=1 python benchmarks/bench_decode.py --threads 1   # one thread for torch and the kernels

Rows (median wall time per call, microseconds; ratio = fp32 eager / row):
  linear KxN      one projection at M = 1: F.linear (fp32, MKL) vs bitfx.codegen.runtime.bit_linear
                  (sign packing + per-token scale + popcount GEMV + fused epilogue), and the kernel op
                  ``torch.ops.bitfx_kernels.bit_linear`` as a compiled model calls it (plan cached per
                  parameter; its C++ kernel, or the Python path with BITFX_NATIVE=0)
  decode step     a transformers GPT2Model (n_embd 768, 12 heads, random weights) called with one token and
                  the cache of ``--past`` tokens (use_cache=True, HF's default): eager fp32, then
                  torch.compile(backend="bitfx") with the TVM kernels (every projection bit_linear, every
                  attention bit_attention over the cached keys/values). Each call gets a fresh DynamicCache
                  holding the same past tensors, so every call is the same step.
The cache copy-in is the same for every row. Nothing here is asserted; tests never assert on time.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def bench(fn, min_time: float = 0.2, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean time per call (µs) over >= ``min_time`` seconds."""
    fn()
    times = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            if time.perf_counter() - t0 >= min_time:
                break
        times.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(times)


def linear_rows() -> list[tuple[str, float, float]]:
    from bitfx.codegen import runtime

    rows = []
    for k, n in [(768, 768), (768, 2304), (768, 3072), (3072, 768)]:
        torch.manual_seed(0)
        x, w, b = torch.randn(1, k), torch.randn(n, k), torch.randn(n)
        packed = runtime.pack_weight(torch.where(w < 0, -1, 1).to(torch.int8), ternary=False)
        scale = w.abs().mean(1)
        fp32 = bench(lambda: F.linear(x, w, b))
        bit = bench(lambda: runtime.bit_linear(x, packed, col_scale=scale, bias=b))
        # the kernel op a compiled model calls (its plan cached per parameter; C++ unless BITFX_NATIVE=0)
        param = torch.nn.Parameter(w)
        with torch.no_grad():
            op = bench(lambda: torch.ops.bitfx_kernels.bit_linear(x, param, b, None, None, None, "sign_channel",
                                                                  "sign", 1, True))
        rows.append((f"linear {k}x{n}", fp32, bit, op))
    return rows


def decode_row(layers: int, past: int) -> tuple[str, float, float]:
    from transformers import GPT2Config, GPT2Model
    from transformers.cache_utils import DynamicCache

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=768, n_head=12, n_layer=layers, n_positions=1024, vocab_size=1000,
                     attn_implementation="sdpa")
    model = GPT2Model(cfg).eval()
    with torch.no_grad():
        prefill = model(input_ids=torch.randint(0, 1000, (1, past)))
    kv = [(layer.keys, layer.values) for layer in prefill.past_key_values.layers]
    token, mask = torch.randint(0, 1000, (1, 1)), torch.ones(1, past + 1, dtype=torch.long)

    def step(m):
        cache = DynamicCache()
        for i, (k, v) in enumerate(kv):
            cache.update(k, v, i)
        with torch.no_grad():
            return m(input_ids=token, attention_mask=mask, cache=cache)

    fp32 = bench(lambda: step(model))
    compiled = torch.compile(model, backend="bitfx")
    t0 = time.perf_counter()
    step(compiled)
    print(f"# bitfx compile of the decode step: {time.perf_counter() - t0:.1f} s")
    bit = bench(lambda: step(compiled))
    return (f"decode step ({layers} blocks, {past} cached)", fp32, bit, None)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--past", type=int, default=128)
    p.add_argument("--threads", type=int, help="torch threads (TVM's pool is sized by TVM_NUM_THREADS)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads, TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}, "
          f"load average {os.getloadavg()[0]:.1f}")
    from bitfx.ops import native

    native.load()  # the kernel ops' C++ kernels (built once per machine), unless BITFX_NATIVE=0
    print(f"# kernel ops: {native.status()}")
    print("| row | fp32 eager µs | bitfx µs | x_fp32 | kernel op µs | x_fp32 |")
    print("|---|---|---|---|---|---|")
    for name, fp32, bit, op in [*linear_rows(), decode_row(a.layers, a.past)]:
        ops = f"{op:.1f} | {fp32 / op:.2f}" if op is not None else "| "
        print(f"| {name} | {fp32:.1f} | {bit:.1f} | {fp32 / bit:.2f} | {ops} |", flush=True)


if __name__ == "__main__":
    main()
