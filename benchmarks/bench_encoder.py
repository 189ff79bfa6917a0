"""One BERT-base encoder layer and a 12-layer model: bitfx vs fp32 eager vs inductor, in one run.

    python benchmarks/bench_encoder.py            # (b) layer speed, (c) compile time, (d) bytes
    python benchmarks/bench_encoder.py --skip-compile-time

(b) one encoder layer (hidden 768, 12 heads, FFN 3072, seq 128, batch 1): median wall time of
    fp32 eager, torch.compile(inductor) fp32, bitfx (TVM kernels) and bitfx (reference ops), with the
    time of the float parts (softmax, LayerNorm, GELU, residual adds) measured separately.
(c) compile time of the 12-layer BERT-base-shaped model with bitfx, and with inductor on the float model as
    the baseline: cold (every cache empty, fresh process) and warm (the caches filled, fresh process).
(d) bytes of linear-layer parameters before (fp32) and after (1 bit per weight + fp32 scales, bias).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import bitfx  # noqa: F401  (registers the ops; the backend is found by entry point)
from bitfx.models import BertConfig, Layer, bert_encoder
from bitfx.perf import ceiling


def median_ms(fn, repeat=20, warmup=3):
    for _ in range(warmup):
        fn()
    t = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        t.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(t)


def layer_speed(seq: int, threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layer = Layer(BertConfig()).eval()
    x = torch.randn(1, seq, 768)
    mask = torch.zeros(1, 1, 1, seq)
    rows = []
    with torch.no_grad():
        eager = median_ms(lambda: layer(x, mask))
        rows.append(("fp32 eager", eager))
        torch._dynamo.reset()
        inductor = torch.compile(layer)
        inductor(x, mask)
        rows.append(("inductor fp32", median_ms(lambda: inductor(x, mask))))
        for kernels in ("tvm", "reference"):
            torch._dynamo.reset()
            fast = torch.compile(layer, backend="bitfx", options={"kernels": kernels})
            fast(x, mask)
            rows.append((f"bitfx ({kernels})", median_ms(lambda: fast(x, mask))))
        # the float parts that stay in PyTorch in the binarized layer
        h = torch.randn(1, seq, 768)
        s = torch.randn(1, 12, seq, seq)
        ln = layer.attention_norm
        f = torch.randn(1, seq, 3072)
        float_parts = median_ms(lambda: (torch.softmax(s, -1), ln(h + h), F.gelu(f), layer.output_norm(h + h)))
    print(f"\n(b) BERT-base encoder layer, seq {seq}, batch 1, {threads} thread(s)")
    print(f"{'':22s} {'ms':>9s} {'vs eager':>9s} {'vs inductor':>12s}")
    for name, ms in rows:
        print(f"{name:22s} {ms:9.3f} {eager / ms:8.2f}x {rows[1][1] / ms:11.2f}x")
    print(f"{'float parts alone':22s} {float_parts:9.3f}   (softmax + 2 LayerNorm + GELU + residuals)")
    # the limit on this machine: the linears' bit-MACs at the same-run ceiling, plus the float parts
    c = ceiling.measure(128, 768, 3072)
    bitmacs = seq * (4 * 768 * 768 + 2 * 768 * 3072)
    limit = bitmacs / (c.gbit_per_s * 1e9 * threads) * 1e3 + float_parts
    bit_ms = dict(rows)["bitfx (tvm)"]
    print(f"{'limit (this CPU)':22s} {limit:9.3f} {eager / limit:8.2f}x {rows[1][1] / limit:11.2f}x   "
          f"(linears {bitmacs / 1e6:.0f} M bit-MACs at {c.gbit_per_s:.0f} G/s/core ({c.isa}) x {threads}"
          f" + float parts); bitfx reaches {100 * limit / bit_ms:.0f}% of it")


def compile_time(layers: int) -> None:
    """Compile + first call in fresh processes, bitfx and, as the baseline, inductor on the float model.

    Each runs twice against its own empty cache directories: "cold" (nothing cached: bitfx's kernels, packed
    weights and calibration, and inductor's and AOTAutograd's caches, `TORCHINDUCTOR_CACHE_DIR`), then "warm"
    (the same directories, now filled). "whole model" is `torch.compile(model)`: for bitfx, its default, each
    repeated block compiled once (`bitfx.regions`); "one graph" is bitfx with ``regions=False`` (what the
    whole model was before). "regional" compiles each encoder layer by hand (`layer.compile(...)`, PyTorch's
    recipe for repeated blocks: one graph, compiled once, runs every layer; the embeddings and the head stay
    eager). "trace_once" is `bitfx.trace_once(model)` before `torch.compile(model)`: dynamo traces the layer once
    (`torch.compiler.nested_compile_region`); the compiled model is the whole model's."""
    def run(backend: str, mode: str, env: dict) -> float:
        call = {"regional": f"    [layer.compile({backend}) for layer in m.layer]\n    m(*inp)\n",
                "trace_once": f"    import bitfx; torch.compile(bitfx.trace_once(m), {backend})(*inp)\n",
                "whole": f"    torch.compile(m{', ' if backend else ''}{backend})(*inp)\n"}[mode]
        code = (
            "import time, torch; from bitfx.models import bert_encoder\n"
            f"m, inp = bert_encoder(layers={layers})\n"
            "t = time.perf_counter()\n"
            "with torch.no_grad():\n" + call +
            "print(f'{time.perf_counter() - t:.2f}')\n"
        )
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    rows = []
    bitfx_, inductor = "backend='bitfx'", ""
    one_graph = "backend='bitfx', options={'regions': False}"
    for name, backend, mode in (
            ("bitfx, whole model", bitfx_, "whole"), ("bitfx, trace_once + whole model", bitfx_, "trace_once"),
            ("bitfx, one graph (regions=False)", one_graph, "whole"), ("inductor fp32, whole model", inductor, "whole"),
            ("bitfx, regional (layer.compile)", bitfx_, "regional"), ("inductor fp32, regional", inductor, "regional")):
        with tempfile.TemporaryDirectory() as bitfx_cache, tempfile.TemporaryDirectory() as inductor_cache:
            env = {**os.environ, "BITFX_CACHE_DIR": bitfx_cache, "TORCHINDUCTOR_CACHE_DIR": inductor_cache}
            rows.append((name, run(backend, mode, env), run(backend, mode, env)))
    print(f"\n(c) compile + first call of the {layers}-layer BERT-base-shaped model (fresh process each)")
    print(f"{'':34s} {'cold':>8s} {'warm':>8s}")
    for name, cold, warm in rows:
        print(f"{name:34s} {cold:7.2f}s {warm:7.2f}s")


def linear_bytes(layers: int) -> None:
    """Bytes of the binarized linears, counted by ``bitfx.diff`` (1 bit per weight + fp32 extras)."""
    model, inputs = bert_encoder(layers=layers, seq=16)
    linears = [ly for ly in bitfx.diff(model, inputs).layers if ly.target == "bit_linear"]
    before = sum(ly.bytes_before for ly in linears)
    after = sum(ly.bytes_after for ly in linears)
    print(f"\n(d) linear-layer parameters of the {layers}-layer model: fp32 {before / 2**20:.2f} MiB, "
          f"bitfx {after / 2**20:.2f} MiB ({before / after:.1f}x smaller)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--skip-compile-time", action="store_true")
    p.add_argument("--skip-speed", action="store_true", help="only (c) and (d)")
    p.add_argument("--skip-bytes", action="store_true")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    if args.skip_speed:
        pass
    elif len(args.threads) == 1 and os.environ.get("TVM_NUM_THREADS") == str(args.threads[0]):
        layer_speed(args.seq, args.threads[0])
    else:
        # TVM's pool is sized once per process: each thread count runs in a process of its own
        for t in args.threads:
            subprocess.run([sys.executable, __file__, "--threads", str(t), "--seq", str(args.seq),
                            "--skip-compile-time", "--skip-bytes"], check=True,
                           env={**os.environ, "TVM_NUM_THREADS": str(t)})
    if not args.skip_compile_time:
        compile_time(args.layers)
    if not args.skip_bytes:
        linear_bytes(args.layers)


if __name__ == "__main__":
    main()
