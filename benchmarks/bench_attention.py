"""One ``bit_attention`` call: the fused host kernel against the two-kernel path, 1 thread (default), one run.

    python benchmarks/bench_attention.py            # BERT-base (1 x 12 heads x 128 x 64) and MiniLM (8 x 12 x 128 x 32)
    python benchmarks/bench_attention.py --quick
    python benchmarks/bench_attention.py --threads 2   # the kernels' parallel variants over batch x heads

Microseconds per call as wall/CPU (medians of interleaved batches, so load from other processes hits every path
alike; CPU is this process's time, which load inflates less than wall time),
with a boolean padding mask [B, 1, 1, L] (the last 16 keys of batch 0 masked), per probability mode (and
"bipft": elastic with BiPFT's rank-1 score and value estimators, as that preset compiles):
  fused kernel   the TVM kernel alone on prepared float32 inputs and outputs (no Python around it)
  fused op       ``torch.ops.bitfx_kernels.fused_attention`` (dispatcher + the Python impl + the kernel)
  fused graph    ``bit_attention_on_fused_kernel`` compiled by inductor (the score bias in the glue + the op):
                 what a compiled model runs
  two-kernel     ``bit_attention_on_kernels`` compiled by inductor (sign_scores op, float glue with softmax and
                 the binarizer, binary_pv op): the path before the fused kernel
  ratio          two-kernel / fused graph (wall/CPU)
Nothing is asserted. Prints the load average at the start and the end.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

# TVM sizes its pool from this at the first kernel call: set before anything runs
_THREADS = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--threads"), "1")
os.environ.setdefault("TVM_NUM_THREADS", _THREADS)

import torch  # noqa: E402

import bitfx  # noqa: E402,F401
from bitfx.codegen import fused_attention as FA  # noqa: E402
from bitfx.ops.kernel_ops import bit_attention_on_kernels  # noqa: E402


def interleaved(fns: dict, calls: int, rounds: int = 9) -> dict:
    """{name: (median wall µs, median CPU µs of this process)} per call, batches interleaved over rounds."""
    for fn in fns.values():
        for _ in range(5):
            fn()
    samples = {name: ([], []) for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(calls):
                fn()
            samples[name][0].append((time.perf_counter() - t0) / calls * 1e6)
            samples[name][1].append((time.process_time() - c0) / calls * 1e6)
    return {name: (statistics.median(w), statistics.median(c)) for name, (w, c) in samples.items()}


def row(label: str, B: int, H: int, L: int, D: int, mode: str, calls: int, rounds: int) -> None:
    from bitfx.codegen.build import kernel
    from bitfx.codegen.runtime import _parallel

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    mask = torch.ones(B, 1, 1, L, dtype=torch.bool)
    mask[0, ..., -16:] = False
    est = mode == "bipft"  # elastic with BiPFT's rank-1 estimators (scores and values), as the preset
    prob = "elastic" if est else mode
    param = {"bivit": None, "elastic": torch.tensor(0.03), "bool": None}[prob]
    eq, ek, ev = (torch.randn(B, H, L, n, generator=g) * 0.1 for n in (2, 2, 1)) if est else (None, None, None)
    args = (q, k, v, mask, None, None, None, param, eq, ek, ev, None, False, prob)
    scale = 1.0 / math.sqrt(D)
    # the kernel alone, on the arguments the op prepares
    bias = FA.score_bias(mask).reshape(B, 1, 1, L).contiguous()
    p = torch.tensor(math.log(0.25)) if prob == "bivit" else (param if param is not None else torch.tensor(0.0))
    scalars = torch.tensor([scale, 0.0, 0.0, 0.0, float(p)])
    out = torch.empty(B, H, L, D)
    fn = kernel("fused_attention", D=D, Dv=D, prob_mode=prob, bias=(True, False, False), causal=False,
                alpha_q=False, alpha_k=False, alpha_v=False, est_v=est, est_rank=1 if est else 0, debug=False,
                parallel=_parallel())
    extra = [ev.reshape(B, H, L), eq, ek] if est else []
    torch._dynamo.reset()
    fused_graph = torch.compile(FA.bit_attention_on_fused_kernel, backend="inductor", fullgraph=True)
    two_graph = torch.compile(bit_attention_on_kernels, backend="inductor", fullgraph=True)
    ref = two_graph(*args)
    got = fused_graph(*args)
    err = (got - ref).abs().max().item() / max(ref.abs().max().item(), 1e-9)
    t = interleaved({
        "fused kernel": lambda: fn(q, k, v, bias, *extra, scalars, out),
        "fused op": lambda: FA.FUSED_ATTENTION_KERNEL(q, k, v, FA.score_bias(mask), ev, None,
                                                      None, None, param, scale, False, prob, eq, ek),
        "fused graph": lambda: fused_graph(*args),
        "two-kernel": lambda: two_graph(*args),
    }, calls, rounds)
    cells = "  ".join(f"{name} {w:7.1f}/{c:7.1f}" for name, (w, c) in t.items())
    ratio = t["two-kernel"][0] / t["fused graph"][0], t["two-kernel"][1] / t["fused graph"][1]
    print(f"{label:<22} {mode:<8} {cells}  ratio {ratio[0]:5.2f}x/{ratio[1]:5.2f}x  (max rel diff {err:.1e})",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer calls (a smoke run)")
    ap.add_argument("--modes", default="bivit,elastic,bool,bipft",
                    help="probability modes; bipft = elastic with rank-1 score and value estimators")
    ap.add_argument("--threads", type=int, default=1, help="torch and TVM threads (default 1)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    calls, rounds = (3, 3) if a.quick else (20, 9)
    print(f"load average at start: {os.getloadavg()}; torch threads {torch.get_num_threads()}, "
          f"TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}; microseconds per call", flush=True)
    with torch.no_grad():
        for mode in a.modes.split(","):
            row("BERT-base 1x12x128x64", 1, 12, 128, 64, mode, calls, rounds)
            row("MiniLM 8x12x128x32", 8, 12, 128, 32, mode, max(1, calls // 4), rounds)
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
