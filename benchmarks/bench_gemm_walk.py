"""The order in which the panel GEMM walks its tiles (`host.gemm(row_chunk=...)`), measured in one run.

    python benchmarks/bench_gemm_walk.py                 # 1 thread
    TVM_NUM_THREADS=2 python benchmarks/bench_gemm_walk.py --threads 2

For BERT-base (M = 128) and MiniLM (batch 8 x 128 = 1,024 rows, hidden 384) shapes, the float-epilogue GEMM
on pre-packed activations (what `bit_linear` runs after packing), for each walk:
  row_chunk 0   every row block of a 32-column weight panel, then the next panel (the weight panel stays in
                L1; the output is written a panel at a time, one 128-byte piece per row)
  row_chunk c   c row blocks (4 rows each on AVX-512) through every panel, then the next c (the output is
                written front to back; the activation words of those rows stay in L1)
Two outputs per walk: `warm`, the same output tensor every call (it stays in L2/L3, as in a loop that
reuses it), and `fresh`, a different output each call from a pool larger than the L3 cache (as a model's
new activation buffer often is). G bit-MAC/s, and % of `threads` x the one-core ceiling measured in this
run (`bitfx/perf/ceiling.c`). Every walk's output is checked equal to row_chunk 0's. Nothing is asserted
about time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TVM_NUM_THREADS", "1")

import torch  # noqa: E402

from bitfx.codegen import runtime  # noqa: E402
from bitfx.codegen.build import kernel  # noqa: E402
from bitfx.perf import ceiling  # noqa: E402

SHAPES = [(128, 768, 768), (128, 768, 3072), (128, 3072, 768), (1024, 384, 384), (1024, 384, 1536),
          (1024, 1536, 384)]


def per_call_us(fn, calls: int, rounds: int = 7) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(samples)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=int(os.environ["TVM_NUM_THREADS"]))
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 1, 2, 4])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    par = runtime._parallel(args.threads)
    ceil = ceiling.measure().gbit_per_s
    print(f"torch {torch.__version__}, {args.threads} thread(s), ceiling {ceil:.0f} G bit-MAC/s per core, "
          f"load average {os.getloadavg()[0]:.2f}; runtime.ROW_CHUNK = {runtime.ROW_CHUNK}")
    print(f"{'M x K -> N':18s} " + " ".join(f"{'chunk ' + str(c) + ' warm/fresh G/s (%)':>34s}" for c in args.chunks))
    for M, K, N in SHAPES:
        g = torch.Generator().manual_seed(0)
        codes = torch.where(torch.randn(N, K, generator=g) < 0, -1, 1).to(torch.int8)
        packed = runtime.pack_weight(codes, ternary=False)
        x = torch.randn(M, K, generator=g)
        a, rs = torch.empty(M, (K + 63) // 64, dtype=torch.uint64), torch.empty(M)
        kernel("pack_rows", mode="sign", K=K, move=False, mean=True, parallel=par)(x, a, rs)
        cs, bias = torch.rand(N, generator=g), torch.randn(N, generator=g)
        y = torch.empty(M, N)
        pool = [torch.ones(M, N) for _ in range(max(2, int(64e6 // (M * N * 4))))]  # > L3 in all
        calls = max(8, int(3e8 // (M * K * N)))
        cells, first = [], None
        for c in args.chunks:
            fn = kernel("gemm", mode="xnor", K=K, N=N, planes=1, epilogue="float", bias=True, parallel=par,
                        layout="panel", row_chunk=c)
            warm = per_call_us(lambda: fn(a, packed.w, rs, cs, bias, y), calls)
            turn = iter(range(1 << 62))
            fresh = per_call_us(lambda: fn(a, packed.w, rs, cs, bias, pool[next(turn) % len(pool)]), calls)
            fn(a, packed.w, rs, cs, bias, y)
            if first is None:
                first = y.clone()
            elif not torch.equal(first, y):
                raise SystemExit(f"row_chunk {c} gave another output than row_chunk {args.chunks[0]} at {M}x{K}->{N}")
            gw, gf = M * K * N / warm / 1e3, M * K * N / fresh / 1e3
            share = ceil * args.threads
            cells.append(f"{gw:6.0f} ({100 * gw / share:3.0f}%) / {gf:6.0f} ({100 * gf / share:3.0f}%)")
        print(f"{f'{M} x {K} -> {N}':18s} " + " ".join(f"{cell:>34s}" for cell in cells))


if __name__ == "__main__":
    main()
