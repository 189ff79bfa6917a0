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
The cache copy-in is the same for every row.

First (``--gemv-only``: only this), the GEMV alone: the GEMM kernel at M = 1 with its float epilogue, the
activation already packed, for both weight layouts, ``kmajor`` (``[KW, N]``, the layout before the panels)
and ``panel`` (``[N/32, KW, 32]``, what ``pack_weight`` makes), timed in turns round by round (best sample),
so load changes on a shared machine hit both alike. GB/s = packed weight bytes (N·KW·8) per call. ``hot``:
the same weight every call (cache-resident, as when a layer runs again), as a share of one core's read
bandwidth over a buffer of the weight's size (``bitfx/perf/bandwidth.c``, measured in this run). ``stream``:
calls cycle through copies of the weight totalling 256 MiB (far larger than L3), so every call reads its
weight from memory, as a model larger than the caches does; a share of the streaming rate over 256 MiB.
``net`` columns subtract the cost of one call of the same kernel on a 64 x 32 weight (the Python -> TVM FFI
call and DLPack conversion of six tensors; the best sample so far, timed in turns with the hot rows): the
kernel's own rate.
Nothing here is asserted; tests never assert on time.
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
    return statistics.median(sample(fn, min_time) for _ in range(repeats))


def best(fn, min_time: float = 0.02, repeats: int = 15) -> float:
    """Best over ``repeats`` of the mean time per call (µs) over >= ``min_time`` s: on a loaded machine
    the least disturbed sample is the closest to the kernel's own speed."""
    fn()
    return min(sample(fn, min_time) for _ in range(repeats))


def sample(fn, min_time: float) -> float:
    """Mean time per call (µs) over >= ``min_time`` seconds."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        if time.perf_counter() - t0 >= min_time:
            break
    return (time.perf_counter() - t0) / n * 1e6


def interleaved(fns: dict, min_time: float, rounds: int = 15) -> dict:
    """Best sample (µs) per function, the functions taking turns round by round, so a load change on a
    shared machine hits every variant alike (a fair A/B where back-to-back runs are not)."""
    for fn in fns.values():
        fn()
    out = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            out[name] = min(out[name], sample(fn, min_time))
    return out


SHAPES = [(768, 768), (768, 2304), (768, 3072), (3072, 768)]


def gemv_rows(dram: float) -> None:
    """The M = 1 GEMM kernel per layout: µs, GB/s of packed weight, share of the same-run bandwidths."""
    from bitfx.codegen import runtime
    from bitfx.codegen.build import kernel
    from bitfx.perf import bandwidth

    par = runtime._parallel()

    def args(k, n, weight):
        a = torch.randint(-2**62, 2**62, (1, runtime._words(k)), dtype=torch.int64).view(torch.uint64)
        return [a, weight, torch.ones(1), torch.rand(n), torch.randn(n), torch.empty(1, n)]

    tiny = runtime.pack_weight(torch.ones(32, 64, dtype=torch.int8), ternary=False)
    fn_tiny = kernel("gemm", mode="xnor", K=64, N=32, planes=1, epilogue="float", bias=True, parallel=par,
                     layout="panel")
    tiny_args = args(64, 32, tiny.w)
    call = best(lambda: fn_tiny(*tiny_args))
    print(f"# GEMV (M = 1 GEMM kernel, float epilogue), DRAM stream 1 core: {dram:.1f} GB/s; one kernel call "
          f"(64 x 32 weight): {call:.2f} µs; load average {os.getloadavg()[0]:.1f}")
    print("| K x N | layout | weight | µs | GB/s | % of bandwidth | net µs | net GB/s | net % |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k, n in SHAPES:
        torch.manual_seed(0)
        w = torch.randn(n, k)
        packed = runtime.pack_weight(torch.where(w < 0, -1, 1).to(torch.int8), ternary=False)
        nbytes = n * runtime._words(k) * 8
        l2 = bandwidth.measure(nbytes)
        copies = max(1, (256 << 20) // nbytes)  # 256 MiB of weights per layout, far past L3
        hot, stream = {}, {}
        for layout, weight in (("kmajor", packed.kmajor()[0]), ("panel", packed.w)):
            fn = kernel("gemm", mode="xnor", K=k, N=n, planes=1, epilogue="float", bias=True, parallel=par,
                        layout=layout)
            one, it = args(k, n, weight), iter(range(1 << 62))
            many = [args(k, n, weight.clone()) for _ in range(copies)]
            hot[layout] = lambda fn=fn, one=one: fn(*one)
            stream[layout] = lambda fn=fn, many=many, it=it: fn(*many[next(it) % copies])
        hot["call"] = lambda: fn_tiny(*tiny_args)  # the call's cost, timed in the same turns
        times = {("hot", lay): t for lay, t in interleaved(hot, 0.01).items()}
        call = min(call, times.pop(("hot", "call")))
        times.update({("stream", lay): t for lay, t in interleaved(stream, 0.03).items()})
        del hot, stream
        print(f"| {k}x{n} | | | | | read bandwidth, {nbytes // 1024} KiB buffer: {l2:.1f} GB/s | | | |")
        for (name, layout), us in sorted(times.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            ref, ref_name = (l2, "L2") if name == "hot" else (dram, "DRAM")
            cells = []
            for t in (us, us - call):
                gbs = nbytes / t / 1e3
                cells.append(f"{t:.2f} | {gbs:.1f} | {100 * gbs / ref:.0f}")
            cells[0] += f" of {ref_name}"
            print(f"| {k}x{n} | {layout} | {name} | {' | '.join(cells)} |", flush=True)


def layout_ab(ms: list[int]) -> None:
    """The GEMM kernel alone (1 thread's share of the pool, float epilogue) at each M, both weight layouts
    timed in turns: panel / K-major time (below 1: the panels are faster)."""
    from bitfx.codegen import runtime
    from bitfx.codegen.build import kernel

    par = runtime._parallel()
    print(f"# GEMM kernel, K-major vs panel weights, timed in turns; load average {os.getloadavg()[0]:.1f}")
    print("| M | K x N | K-major µs | panel µs | panel / K-major |")
    print("|---|---|---|---|---|")
    for m in ms:
        for k, n in SHAPES:
            torch.manual_seed(0)
            w = torch.randn(n, k)
            packed = runtime.pack_weight(torch.where(w < 0, -1, 1).to(torch.int8), ternary=False)
            a = torch.randint(-2**62, 2**62, (m, runtime._words(k)), dtype=torch.int64).view(torch.uint64)
            rest = [torch.ones(m), torch.rand(n), torch.randn(n), torch.empty(m, n)]
            fns = {}
            for layout, weight in (("kmajor", packed.kmajor()[0]), ("panel", packed.w)):
                fn = kernel("gemm", mode="xnor", K=k, N=n, planes=1, epilogue="float", bias=True, parallel=par,
                            layout=layout)
                fns[layout] = lambda fn=fn, weight=weight: fn(a, weight, *rest)
            t = interleaved(fns, 0.02)
            print(f"| {m} | {k}x{n} | {t['kmajor']:.1f} | {t['panel']:.1f} | {t['panel'] / t['kmajor']:.3f} |",
                  flush=True)


def linear_rows() -> list[tuple[str, float, float]]:
    from bitfx.codegen import runtime

    rows = []
    for k, n in SHAPES:
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
    p.add_argument("--gemv-only", action="store_true", help="only the GEMV table (no torch rows, no model)")
    p.add_argument("--layout-ab", metavar="M,M,...", help="only the K-major vs panel GEMM at these M, e.g. 1,5,128")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads, TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}, "
          f"load average {os.getloadavg()[0]:.1f}")
    from bitfx.perf import bandwidth

    if a.layout_ab:
        layout_ab([int(m) for m in a.layout_ab.split(",")])
        return
    gemv_rows(bandwidth.measure(256 << 20))
    if a.gemv_only:
        return
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
