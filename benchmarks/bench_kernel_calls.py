"""Per-call cost of the kernel ops: the C++ path (bitfx/ops/native.cpp) against the Python path, one run.

    python benchmarks/bench_kernel_calls.py            # 1 thread (TVM_NUM_THREADS=1), BERT-base shapes
    python benchmarks/bench_kernel_calls.py --quick

For each shape, microseconds per call (median of interleaved batches, so that load from other processes
hits both paths alike):
  kernels   the TVM kernels alone, called from Python on preallocated outputs (quantize/pack + GEMM):
            the floor the op call adds to
  python    ``torch.ops`` call of the Python implementation (as before issue 11: dispatcher -> Python ->
            plan lookup -> ``runtime.LinearPlan`` -> TVM through DLPack), registered here as a second op
  c++       ``torch.ops.bitfx_kernels.bit_linear`` with the C++ kernel: dispatcher -> C++ plan lookup ->
            one ``at::empty`` -> two TVM-FFI calls with DLTensor pointers
  over      the call minus ``kernels``: what each path adds per call
  ceil%     (M=128) the C++ op's bit-MACs per second as a share of the one-core ceiling of the same shape,
            measured in this run (``bitfx/perf/ceiling.c``, the best of three readings)
Also ``sign_scores`` / ``binary_pv`` / ``fused_attention`` at attention shapes, and BERT-base's feed-forward pair (768 -> 3072 with
GELU -> 768, M=128) two ways: ``bit_linear`` twice (the second packs the GELU's float output itself), and
``bit_linear_to_bits`` + ``bit_linear_on_bits`` (the first GEMM's epilogue writes the second's packed codes:
the float intermediate is never stored, the second op is its GEMM alone). Inference calls (no_grad). Nothing
is asserted.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TVM_NUM_THREADS", "1")

import torch  # noqa: E402

import bitfx  # noqa: E402,F401
from bitfx.ops import kernel_ops, native  # noqa: E402
from bitfx.perf import ceiling  # noqa: E402

_LIB = torch.library.Library("bitfx_bench", "DEF")
_LIB.define(f"bit_linear(Tensor x, Tensor weight, {kernel_ops._PLAN_ARGS}) -> Tensor")
_LIB.define("sign_scores(Tensor q, Tensor k) -> Tensor")
_LIB.define("binary_pv(Tensor p, Tensor v) -> Tensor")
_LIB.impl("bit_linear", kernel_ops.bit_linear, "CPU")
_LIB.impl("sign_scores", kernel_ops.sign_scores, "CPU")
_LIB.impl("binary_pv", kernel_ops.binary_pv, "CPU")
PY = torch.ops.bitfx_bench


def interleaved(fns: dict, calls: int, rounds: int = 9) -> dict:
    """Median microseconds per call of each function, batches of `calls` interleaved over `rounds`."""
    for fn in fns.values():
        for _ in range(20):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - t0) / calls * 1e6)
    return {name: statistics.median(s) for name, s in samples.items()}


def linear_row(M: int, K: int, N: int, calls: int, ceil_g: float | None = None) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g)
    w = torch.nn.Parameter(torch.randn(N, K, generator=g))
    b = torch.randn(N, generator=g)
    args = (x, w, b, None, None, None, "sign_tensor", "sign", 1, True)
    plan = kernel_ops.linear_plan(*args[1:])
    a = torch.empty(M, (K + 63) // 64, dtype=torch.uint64)
    rs, y = torch.empty(M), torch.empty(M, N)
    t = interleaved({
        "kernels": lambda: (plan.quant(x, a, rs), plan.gemm(a, *plan.weights, rs, plan.col, plan.bias, y)),
        "python": lambda: PY.bit_linear(*args),
        "c++": lambda: torch.ops.bitfx_kernels.bit_linear(*args),
    }, calls)
    assert torch.equal(PY.bit_linear(*args), torch.ops.bitfx_kernels.bit_linear(*args))
    _print(f"bit_linear M={M:<4d} {K}->{N}", t, _share(M * K * N, t["c++"], ceil_g))


def _share(work: int, us: float, ceil_g: float | None) -> str:
    """`work` bit-MACs in `us` microseconds as a percentage of `ceil_g` G bit-MACs/s."""
    return "" if ceil_g is None else f"  {100 * work / (us * 1e3) / ceil_g:5.1f}%"


def ffn_pair_rows(M: int, calls: int, ceilings: dict) -> None:
    """768 -> 3072 (GELU) -> 768, sign codes with a move and a given α (bipft): unfused, and packed in the
    first GEMM's epilogue."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, 768, generator=g)
    w1, w2 = (torch.nn.Parameter(torch.randn(n, k, generator=g)) for n, k in ((3072, 768), (768, 3072)))
    b1, b2 = torch.randn(3072, generator=g), torch.randn(768, generator=g)
    m1, m2 = torch.randn(768, generator=g) * 0.1, torch.randn(3072, generator=g) * 0.1
    a1, a2 = torch.tensor(0.8), torch.tensor(0.5)
    ops = torch.ops.bitfx_kernels
    first = (x, w1, b1, None, m1, a1, "sign_tensor", "sign", 1, True)
    # (its own copy of W2: a layer's plan is keyed by its parameter and move, and the unfused call has a move)
    second = (torch.nn.Parameter(w2.detach().clone()), b2, None, None, a2, "sign_tensor", "sign", 1, True)

    def unfused():
        h = ops.bit_linear(*first, activation="gelu")
        return ops.bit_linear(h, w2, b2, None, m2, a2, "sign_tensor", "sign", 1, True)

    def fused():
        return ops.bit_linear_on_bits(ops.bit_linear_to_bits(*first, activation="gelu", out_move=m2), *second)

    bits = ops.bit_linear_to_bits(*first, activation="gelu", out_move=m2)
    t = interleaved({"unfused": unfused, "fused": fused,
                     "to_bits": lambda: ops.bit_linear_to_bits(*first, activation="gelu", out_move=m2),
                     "on_bits": lambda: ops.bit_linear_on_bits(bits, *second),
                     "gelu": lambda: ops.bit_linear(*first, activation="gelu")}, calls)
    torch.testing.assert_close(fused(), unfused(), rtol=1e-4, atol=1e-3)  # (a near-zero code may flip)
    work = M * 768 * 3072
    c1, c2 = ceilings.get((768, 3072)), ceilings.get((3072, 768))
    both = None if c1 is None or c2 is None else 2 / (1 / c1 + 1 / c2)  # the pair's ceiling: time-weighted
    print(f"{'ffn pair M=' + str(M) + ' 768->3072->768':30s} unfused {t['unfused']:7.1f}  fused {t['fused']:7.1f} us "
          f"({t['unfused'] / t['fused']:.2f}x){_share(2 * work, t['unfused'], both)} ->{_share(2 * work, t['fused'], both)}")
    print(f"{'  768->3072 +gelu: float out':30s} {t['gelu']:8.1f} us{_share(work, t['gelu'], c1)}; packed codes out "
          f"{t['to_bits']:7.1f} us{_share(work, t['to_bits'], c1)}")
    print(f"{'  3072->768 on packed codes':30s} {t['on_bits']:8.1f} us{_share(work, t['on_bits'], c2)} (the GEMM alone)")


def attention_rows(Lq: int, calls: int) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 12, L, 64, generator=g) for L in (Lq, 128, 128))
    p = (torch.rand(1, 12, Lq, 128, generator=g) > 0.5).float()
    t = interleaved({"python": lambda: PY.sign_scores(q, k), "c++": lambda: torch.ops.bitfx_kernels.sign_scores(q, k)},
                    calls)
    _print(f"sign_scores 12x{Lq}x128 d64", t)
    t = interleaved({"python": lambda: PY.binary_pv(p, v), "c++": lambda: torch.ops.bitfx_kernels.binary_pv(p, v)},
                    calls)
    _print(f"binary_pv 12x{Lq}x128 d64", t)
    # the fused attention kernel as BiPFT calls it (elastic codes, a padding mask, rank-1 score estimators,
    # est_v, α's given): the Python implementation against the C++ entry
    from bitfx.codegen import fused_attention as FA

    mask = FA.score_bias(torch.ones(1, 1, 1, 128, dtype=torch.bool))
    est_q, est_k = torch.randn(1, 12, Lq, 2, generator=g), torch.randn(1, 12, 128, 2, generator=g)
    est_v = torch.randn(1, 12, 128, 1, generator=g)
    a = torch.tensor(0.5)
    fa = (q, k, v, mask, est_v, a, a, a, torch.tensor(0.02), 0.125, False, "elastic", est_q, est_k)
    t = interleaved({"python": lambda: FA.fused_attention(*fa[:12], est_q=est_q, est_k=est_k),
                     "c++": lambda: FA.FUSED_ATTENTION_KERNEL(*fa)}, calls)
    _print(f"fused_attention 12x{Lq}x128 d64", t)


def _print(name: str, t: dict, tail: str = "") -> None:
    base = t.get("kernels")
    cells = [f"{t.get('kernels', float('nan')):8.1f}", f"{t['python']:8.1f}", f"{t['c++']:8.1f}"]
    if base is not None:
        cells += [f"{t['python'] - base:8.1f}", f"{t['c++'] - base:8.1f}"]
    else:
        cells += [f"{'':8s}", f"{'':8s}"]
    print(f"{name:30s} {' '.join(cells)} {t['python'] / t['c++']:7.2f}x{tail}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="768->768 only")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ["TVM_NUM_THREADS"]))
    if not native.load():
        raise SystemExit(f"the C++ kernel ops are not available: {native.status()}")
    print(f"torch {torch.__version__}, TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}, "
          f"load average {os.getloadavg()[0]:.2f} (1 min)")
    shapes = [(768, 768)] if args.quick else [(768, 768), (768, 3072), (3072, 768)]
    try:
        # the best of three readings per shape, spread over a few seconds: one reading can come out 10-25 % low
        # when the CPU is slow for a moment (then a figure above 100 % appears), never high
        ceilings = {(K, N): 0.0 for K, N in shapes}
        for _ in range(3):
            for K, N in shapes:
                ceilings[(K, N)] = max(ceilings[(K, N)], ceiling.measure(128, N, K).gbit_per_s)
        print("same-run ceiling, 1 core (best of 3): " +
              ", ".join(f"{K}->{N} {g:.0f} G bit-MACs/s" for (K, N), g in ceilings.items()))
    except ceiling.CeilingUnavailable as err:
        ceilings = {}
        print(f"no ceiling in this run ({err}): no ceil% column")
    print(f"{'us per call':30s} {'kernels':>8s} {'python':>8s} {'c++':>8s} {'py over':>8s} {'c++ over':>8s} "
          f"{'speedup':>7s}  {'ceil%' if ceilings else ''}")
    with torch.no_grad():
        for M in (1, 128):
            for K, N in shapes:
                linear_row(M, K, N, calls=2000 if M == 1 else 100, ceil_g=ceilings.get((K, N)) if M == 128 else None)
        for Lq in (1, 128):
            attention_rows(Lq, calls=1000 if Lq == 1 else 100)
        if not args.quick:
            ffn_pair_rows(128, 100, ceilings)


if __name__ == "__main__":
    main()
