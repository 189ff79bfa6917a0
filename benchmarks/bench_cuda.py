"""bitfx on a CUDA GPU: every kernel checked bit-exact against the reference, then timed against cuBLAS.

    python benchmarks/bench_cuda.py                  # checks, bit_linear table, encoder layer
    python benchmarks/bench_cuda.py --skip-layer     # checks and the bit_linear table only
    python benchmarks/bench_cuda.py --sweep-tiles    # also: the tensor-core GEMM alone under other MmaTiles

1. Checks: ``bit_linear``'s integer result (every weight/activation mode; M = 1 on the CUDA-core kernel,
   M = 37 and 256 on the tensor-core kernel) equals ``codes_a @ codes_w.T`` exactly; the two integer products
   of ``bit_attention`` equal their references exactly; the float epilogue matches ``bit_linear_reference``.
   Any mismatch exits 1 before timing anything.
2. ``bit_linear`` at M in {1, 128, 512, 4096} x the BERT-base linears (K x N = 768x2304 QKV, 768x768 out,
   768x3072 FFN up, 3072x768 FFN down), fp16 activations in and out: bitfx (sign-and-pack + b1 GEMM +
   float epilogue, the whole op) against cuBLAS fp16 (``torch.matmul`` in half, weights pre-transposed) and
   int8 (``torch._int_mm``, which needs M > 16), median of CUDA-event timings; ratios = baseline / bitfx.
3. One BERT-base encoder layer (hidden 768, 12 heads, FFN 3072, seq 128, batch 8): ``torch.compile`` fp16
   (inductor) against ``torch.compile(backend="bitfx")`` on the same layer (float parts in fp16 through
   inductor, the linears and attention products on the bitfx CUDA kernels).

Without a CUDA GPU the script says so and exits 2. Budget: a few minutes on an H100/H200, most of it
compiling (TVM + nvcc, cached under the bitfx cache dir for the next run).
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

import bitfx  # noqa: F401  (ops, backend)
from bitfx.codegen import runtime
from bitfx.ops import attention as A
from bitfx.ops.linear import bit_linear_reference, quantize_activation, quantize_weight

BERT_LINEARS = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
ROWS = [1, 128, 512, 4096]
MODES = [("sign_channel", "sign", 1), ("ternary", "sign", 1), ("sign_channel", "absmax", 8), ("ternary", "absmax", 8)]


def cuda_ms(fn, repeat: int = 50, warmup: int = 5) -> float:
    """Median milliseconds of ``fn`` on the current stream (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------- checks
def check_kernels() -> list[str]:
    failures = []
    g = torch.Generator().manual_seed(0)
    for weight_mode, act_mode, bits in MODES:
        for M, K, N in [(1, 768, 3072), (37, 600, 200), (256, 3072, 768)]:
            x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
            move = torch.randn(K, generator=g) * 0.1 if act_mode == "sign" else None
            w_codes, col, _ = quantize_weight(w, None, weight_mode)
            a_codes, _, _ = quantize_activation(x, move, None, act_mode, bits)
            packed = runtime.pack_weight(w_codes.to(torch.int8).cuda(), ternary=weight_mode == "ternary")
            acc, _ = runtime.bit_linear_int(x.cuda(), packed, act=act_mode, bits=bits,
                                            move=None if move is None else move.cuda())
            want = (a_codes.double() @ w_codes.double().t()).to(torch.int32)
            name = f"bit_linear {weight_mode}/{act_mode}{bits} M={M} K={K} N={N}"
            if not torch.equal(acc.cpu(), want):
                failures.append(f"{name}: {(acc.cpu() != want).sum().item()} integer results differ")
            y = runtime.bit_linear(x.cuda(), packed, act=act_mode, bits=bits, move=None if move is None else move.cuda(),
                                   col_scale=col.cuda())
            ref = bit_linear_reference(x, w, None, None, move, None, weight_mode, act_mode, bits)
            if not torch.allclose(y.cpu(), ref, rtol=1e-5, atol=1e-4):
                failures.append(f"{name}: float epilogue differs by {(y.cpu() - ref).abs().max().item():.3g}")
    for Lq, Lk, D in [(1, 77, 64), (128, 128, 64), (37, 300, 32)]:
        q, k, v = (torch.randn(2, 12, L, D, generator=g) for L in (Lq, Lk, Lk))
        p = (torch.rand(2, 12, Lq, Lk, generator=g) > 0.7).float()
        if not torch.equal(runtime.sign_scores(q.cuda(), k.cuda()).cpu(), A.sign_scores_reference(q, k).to(torch.int32)):
            failures.append(f"sign_scores Lq={Lq} Lk={Lk} D={D} differs")
        if not torch.equal(runtime.binary_pv(p.cuda(), v.cuda()).cpu(), A.binary_pv_reference(p, v).to(torch.int32)):
            failures.append(f"binary_pv Lq={Lq} Lk={Lk} D={D} differs")
    return failures


# ---------------------------------------------------------------------------------------------- linear
def linear_table() -> None:
    print("\nbit_linear (sign x binary weights, fp16 in/out, whole op) vs cuBLAS; ratio = baseline / bitfx")
    print(f"{'M':>5} {'K':>5} {'N':>5} | {'bitfx ms':>9} {'fp16 ms':>9} {'int8 ms':>9} | {'x fp16':>7} {'x int8':>7}")
    for K, N in BERT_LINEARS:
        w = torch.randn(N, K, device="cuda")
        w_codes, col, _ = quantize_weight(w, None, "sign_channel")
        packed = runtime.pack_weight(w_codes.to(torch.int8), ternary=False)
        plan = runtime.LinearPlan(packed, col_scale=col, bias=torch.zeros(N, device="cuda"))
        w_half_t = w.half().t().contiguous()
        w_i8_t = torch.randint(-127, 128, (K, N), dtype=torch.int8, device="cuda")
        for M in ROWS:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            t_bitfx = cuda_ms(lambda: plan(x))
            t_fp16 = cuda_ms(lambda: torch.matmul(x, w_half_t))
            if M > 16:
                x8 = torch.randint(-127, 128, (M, K), dtype=torch.int8, device="cuda")
                t_int8 = cuda_ms(lambda: torch._int_mm(x8, w_i8_t))
                i8 = f"{t_int8:9.4f}"
                r8 = f"{t_int8 / t_bitfx:7.2f}"
            else:
                i8, r8 = f"{'n/a':>9}", f"{'n/a':>7}"
            print(f"{M:5d} {K:5d} {N:5d} | {t_bitfx:9.4f} {t_fp16:9.4f} {i8} | {t_fp16 / t_bitfx:7.2f} {r8}")


def sweep_tiles() -> None:
    """The b1 GEMM alone (packed activations in, float epilogue) under several warp/block tilings."""
    from bitfx.targets.cuda import MmaTile
    from bitfx.targets.cuda_runtime import _kernel, _run

    tiles = [MmaTile(2, 4, 4), MmaTile(1, 4, 4), MmaTile(2, 2, 4), MmaTile(4, 4, 4), MmaTile(4, 2, 4),
             MmaTile(2, 4, 2), MmaTile(1, 2, 4), MmaTile(2, 8, 2)]
    dev = torch.device("cuda", torch.cuda.current_device())
    print("\nb1 GEMM alone (xnor, float epilogue) per MmaTile(mt, nt, warps), ms; * = the default")
    print(f"{'M':>5} {'K':>5} {'N':>5} | " + " ".join(f"{f'{t.mt},{t.nt},{t.warps}':>8}" for t in tiles))
    for K, N in BERT_LINEARS:
        w = torch.randint(0, 2 ** 62, ((K + 63) // 64, N), dtype=torch.int64, device=dev).view(torch.uint64)
        cs = torch.rand(N, device=dev)
        for M in ROWS[1:]:
            a = torch.randint(0, 2 ** 62, (M, (K + 63) // 64), dtype=torch.int64, device=dev).view(torch.uint64)
            rs, y = torch.rand(M, device=dev), torch.empty(M, N, device=dev)
            times = []
            for t in tiles:
                fn = _kernel("gemm", dev, mode="xnor", K=K, N=N, planes=1, epilogue="float", bias=False, tile=t)
                times.append(cuda_ms(lambda: _run(fn, dev, a, w, rs, cs, y)))
            best = min(times)
            cells = " ".join(f"{ms:7.4f}{'*' if i == 0 else ('<' if ms == best else ' ')}" for i, ms in enumerate(times))
            print(f"{M:5d} {K:5d} {N:5d} | {cells}")


# ---------------------------------------------------------------------------------------------- layer
def encoder_layer(seq: int = 128, batch: int = 8) -> None:
    from bitfx.models import BertConfig, Layer

    torch.manual_seed(0)
    layer = Layer(BertConfig()).cuda().eval()
    x = torch.randn(batch, seq, 768, device="cuda")
    mask = torch.zeros(batch, 1, 1, seq, device="cuda")
    with torch.no_grad():
        torch._dynamo.reset()
        half = torch.compile(layer.half())
        xh, mh = x.half(), mask.half()
        t_fp16 = cuda_ms(lambda: half(xh, mh), repeat=30)
        rows = [("torch.compile fp16 (inductor)", t_fp16)]
        # fp16 first; a .half() model's BiPFT estimators are added in float32 (compile fails), so then fp16
        # without estimators, then float32
        attempts = [(torch.float16, "bipft"), (torch.float16, {"preset": "bipft", "estimators": False}),
                    (torch.float32, "bipft")]
        for dtype, config in attempts:
            torch._dynamo.reset()
            try:
                model = layer.to(dtype)
                fast = torch.compile(model, backend="bitfx", options={"config": config})
                xb, mb = x.to(dtype), mask.to(dtype)
                fast(xb, mb)
                label = f"bitfx ({str(dtype)[6:]}, {config if isinstance(config, str) else 'bipft, no estimators'})"
                rows.append((label, cuda_ms(lambda: fast(xb, mb), repeat=30)))
                break
            except Exception as err:  # noqa: BLE001 - report and try the next setting
                print(f"bitfx with {dtype} and config {config} failed: {type(err).__name__}: {str(err)[:300]}")
    print(f"\nBERT-base encoder layer, batch {batch}, seq {seq}; ratio = torch.compile fp16 / row")
    for name, ms in rows:
        print(f"  {name:40s} {ms:8.3f} ms  x{t_fp16 / ms:5.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-layer", action="store_true", help="skip the encoder-layer comparison")
    parser.add_argument("--sweep-tiles", action="store_true", help="also time the GEMM under other MmaTiles")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA GPU here (torch.cuda.is_available() is False); nothing to measure. "
              "Run it on a machine with an sm_80 or newer GPU, nvcc and the CUDA build of torch.")
        return 2
    from bitfx.targets.cuda_runtime import device_arch

    print(f"device: {torch.cuda.get_device_name()} ({device_arch()}), torch {torch.__version__}")
    failures = check_kernels()
    if failures:
        print("kernel checks FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("kernel checks: every bit_linear mode, sign_scores and binary_pv bit-exact against the reference")
    linear_table()
    if args.sweep_tiles:
        sweep_tiles()
    if not args.skip_layer:
        encoder_layer()
    return 0


if __name__ == "__main__":
    sys.exit(main())
