"""bitfx binary linear vs fp32 on BERT-base shapes, measured in one run; prints ratios.

    python benchmarks/bench_linear.py            # full table, 1 and 2 threads (~2-3 minutes)
    python benchmarks/bench_linear.py --quick    # M=128 only

Columns (median wall time per call, microseconds):
  fp32       F.linear (MKL)
  inductor   torch.compile(F.linear) (inductor, fp32, dynamic shapes)
  bitfx      bitfx.codegen.runtime.bit_linear: sign(x) packing + per-token scale + GEMM + fused epilogue
  pack       the activation packing kernel alone (sign bits + mean|x|)
  gemm       the bit-serial GEMM alone on pre-packed activations, int32 out; G bit-MAC/s and `ceil%`, its
             share of `threads` x the one-core ceiling measured in this run (`bitfx/perf/ceiling.c`,
             clang -O3 -march=native, same K x N at M=128: DESIGN §5)
  e2e%       the same share for `bitfx` (packing, GEMM, epilogue and dispatch)
  plan       `runtime.LinearPlan(...)(x)`: the per-layer plan a compiled model calls (kernels and vectors
             resolved once), and plan%, its share of the ceiling: the figure that counts
  epi        GEMM with the fused float epilogue minus `gemm`
  disp       bitfx - (pack + GEMM with epilogue): Python dispatch, argument checks, allocations
Nothing here is asserted; tests never assert on time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")  # the bitfx pool size, fixed when TVM's pool starts

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bitfx.codegen import runtime  # noqa: E402
from bitfx.codegen.build import kernel  # noqa: E402
from bitfx.perf import ceiling  # noqa: E402

SHAPES_KN = [(768, 768), (768, 3072), (3072, 768)]


def bench(fn, min_time: float = 0.04, repeats: int = 5) -> float:
    """Median seconds per call over `repeats` batches of at least `min_time` each."""
    time.sleep(0.02)  # let the other framework's spinning worker threads go idle
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_time / 4:
        fn()
        n += 1
    n = max(1, int(n * 4))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples)


def row(M: int, K: int, N: int, threads: int, compiled, ceil: float) -> dict:
    torch.set_num_threads(threads)
    par = runtime._parallel(threads)  # threads=1: single-threaded kernel variants
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g)
    bias, cs = torch.randn(N, generator=g), torch.rand(N, generator=g)
    packed = runtime.pack_weight(torch.where(w < 0, -1, 1).to(torch.int8), ternary=False)

    fp32 = bench(lambda: F.linear(x, w, bias))
    ind = bench(lambda: compiled(x, w, bias))
    bit = bench(lambda: runtime.bit_linear(x, packed, col_scale=cs, bias=bias, threads=threads))
    plan = runtime.LinearPlan(packed, col_scale=cs, bias=bias, threads=threads)
    planned = bench(lambda: plan(x))

    a = torch.empty(M, (K + 63) // 64, dtype=torch.uint64)
    rs = torch.empty(M)
    pack_fn = kernel("pack_rows", mode="sign", K=K, move=False, mean=True, parallel=par)
    pack = bench(lambda: pack_fn(x, a, rs))
    acc = torch.empty(M, N, dtype=torch.int32)
    gemm_fn = kernel("gemm", mode="xnor", K=K, N=N, planes=1, epilogue="int", bias=False, parallel=par,
                     **runtime.weight_walk(packed))
    gemm = bench(lambda: gemm_fn(a, packed.w, acc))
    y = torch.empty(M, N)
    epi_fn = kernel("gemm", mode="xnor", K=K, N=N, planes=1, epilogue="float", bias=True, parallel=par,
                    **runtime.weight_walk(packed))
    gemm_epi = bench(lambda: epi_fn(a, packed.w, rs, cs, bias, y))
    gbit = M * N * K / gemm / 1e9
    return {
        "M": M, "K": K, "N": N, "thr": threads, "fp32": fp32, "inductor": ind, "bitfx": bit,
        "x_fp32": fp32 / bit, "x_ind": ind / bit, "pack": pack, "gemm": gemm, "Gbit/s": gbit,
        "ceil%": 100 * gbit / (ceil * threads), "e2e%": 100 * M * N * K / bit / 1e9 / (ceil * threads),
        "plan": planned, "plan%": 100 * M * N * K / planned / 1e9 / (ceil * threads),
        "epi": gemm_epi - gemm, "disp": bit - pack - gemm_epi,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="M=128 only")
    args = ap.parse_args()
    ms = [128] if args.quick else [1, 32, 128, 512]
    from bitfx.ops import native

    # as a compiled model does when it lowers: the C++ library, which runs the kernels' parallel loops on
    # torch's OpenMP pool (BITFX_POOL=0: on TVM's own pool, idle workers asleep between calls)
    native.load()
    compiled = torch.compile(F.linear, dynamic=True)
    ceilings = {(K, N): ceiling.measure(128, N, K) for K, N in SHAPES_KN}
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads available, "
          f"torch {torch.__version__}")
    print(f"# kernel thread pool: {native.pool_status()}")
    print("# same-run ceiling, 1 core: " + ", ".join(
        f"K={K} N={N}: {c.gbit_per_s:.0f} G bit-MACs/s ({c.isa})" for (K, N), c in ceilings.items()))
    cols = ["M", "K", "N", "thr", "fp32", "inductor", "bitfx", "x_fp32", "x_ind", "pack", "gemm", "Gbit/s",
            "ceil%", "e2e%", "plan", "plan%", "epi", "disp"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for threads in (1, 2):
        for K, N in SHAPES_KN:
            for M in ms:
                r = row(M, K, N, threads, compiled, ceilings[(K, N)].gbit_per_s)
                cells = []
                for c in cols:
                    v = r[c]
                    if c in ("fp32", "inductor", "bitfx", "plan", "pack", "gemm", "epi", "disp"):
                        cells.append(f"{v * 1e6:.1f}")
                    elif isinstance(v, float):
                        cells.append(f"{v:.1f}" if c.startswith("x_") or c.endswith("%") else f"{v:.0f}")
                    else:
                        cells.append(str(v))
                print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
