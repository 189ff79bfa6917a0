"""The C++ ``bit_linear`` op in a loop, at chosen shapes and a thread count: what a compiled model's call costs.

    TVM_NUM_THREADS=2 python benchmarks/bench_op_rows.py                       # BERT-base and MiniLM shapes
    TVM_NUM_THREADS=1 python benchmarks/bench_op_rows.py --shape 128 768 768 --rounds 40

For each ``M x K -> N`` (sign activations with a per-token mean|x|, per-channel sign weights, bias: a BERT
layer's projection), ``torch.ops.bitfx_kernels.bit_linear`` is called 500 times a round; printed are the min and
median microseconds per call over the rounds, and the share of ``threads`` x the one-core ceiling measured in
this run (``bitfx/perf/ceiling.c``, the best of three readings per shape). With two threads and at least 16 rows
per thread the op is one team launch (each thread quantizes and multiplies its own rows); the count of team
launches per call is printed too. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")

import torch  # noqa: E402

import bitfx  # noqa: E402,F401
from bitfx.ops import native  # noqa: E402
from bitfx.perf import ceiling  # noqa: E402

SHAPES = [(128, 768, 768), (128, 768, 3072), (128, 3072, 768), (1024, 384, 1536)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", nargs=3, type=int, action="append", metavar=("M", "K", "N"),
                   help="M K N (repeatable); default: BERT-base's three at M=128 and MiniLM's FFN at M=1024")
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args(argv)
    threads = int(os.environ["TVM_NUM_THREADS"])
    torch.set_num_threads(threads)
    if not native.load():
        raise SystemExit(f"the C++ kernel ops are not available: {native.status()}")
    op = torch.ops.bitfx_kernels.bit_linear.default
    print(f"torch {torch.__version__}, {threads} thread(s), pool {native.pool_status()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'M x K -> N':22s} {'min us':>9s} {'median':>9s} {'ceil%':>7s} {'teams/call':>10s}")
    for M, K, N in args.shape or SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(M, K, generator=g)
        w = torch.nn.Parameter(torch.randn(N, K, generator=g))
        b = torch.randn(N, generator=g)
        call = (x, w, b, None, None, None, "sign_channel", "sign", 1, True)
        ceil = max(ceiling.measure(M, N, K).gbit_per_s for _ in range(3))
        with torch.no_grad():
            for _ in range(200):
                op(*call)
            t0 = native.pool_launches()[1]
            op(*call)
            teams = native.pool_launches()[1] - t0
            rounds = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                for _ in range(500):
                    op(*call)
                rounds.append((time.perf_counter() - start) / 500 * 1e6)
        best, med = min(rounds), statistics.median(rounds)
        ideal_us = M * K * N / (threads * ceil * 1e3)
        print(f"{f'{M} x {K} -> {N}':22s} {best:9.1f} {med:9.1f} {100 * ideal_us / med:6.1f}% {teams:10d}")
    print("ceil%: the median's share of threads x the one-core ceiling of the same shape (best of three readings)")


if __name__ == "__main__":
    main()
