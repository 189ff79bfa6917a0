"""Where a cold compile's time goes: a timeline of `torch.compile(model, backend="bitfx")` + its first call.

    python benchmarks/compile_timeline.py                 # 12-layer BERT-base-shaped model, every cache empty
    python benchmarks/compile_timeline.py --layers 2 --warm

Runs the compile in a fresh process against empty bitfx and inductor cache directories (``--warm``: then again
against the same ones) and prints, with seconds since the compile call and the thread, when each of these
starts and ends: bitfx's compile of a partition (``bitfx.regions``), inductor's ``compile_fx_inner``, its
g++ builds (SIMD test libraries and kernels), its SIMD load probes, bitfx's wait for the SIMD checks, and
each TVM kernel build; then the first call's end, with the time Python's garbage collector took. Nothing is
asserted; times are this machine's at that moment.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

_CHILD = r"""
import functools, sys, threading, time
import torch
T0 = time.perf_counter()

def log(msg):
    print(f"[{time.perf_counter() - T0:6.2f}] {threading.current_thread().name[:24]:24s} {msg}", flush=True)

def timed(owner, name, label):
    real = getattr(owner, name)

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        log(f"> {label}")
        try:
            return real(*args, **kwargs)
        finally:
            log(f"< {label} {time.perf_counter() - start:.2f} s")
    setattr(owner, name, wrapper)

import torch._inductor.compile_fx as compile_fx
import torch._inductor.cpp_builder as cpp_builder
import torch._inductor.cpu_vec_isa as cpu_vec_isa
from bitfx import backend
from bitfx.codegen import build
from bitfx.models import bert_encoder

timed(build, "_compile_and_store", "TVM kernel build")
timed(backend, "_compile", "bitfx: compile a partition")
timed(backend, "_simd_checked", "wait for the SIMD checks")
timed(compile_fx, "compile_fx_inner", "inductor compile_fx_inner")
timed(cpp_builder.CppBuilder, "build", "g++ build")
timed(cpu_vec_isa.VecISA, "_probe_load", "SIMD load probe")
import gc
GC = {"n": 0, "s": 0.0}

def gc_timed(phase, info):  # Python's garbage collector, on any thread (it holds the GIL meanwhile)
    if phase == "start":
        GC["t"] = time.perf_counter()
    else:
        GC["n"] += 1
        GC["s"] += time.perf_counter() - GC["t"]

model, inputs = bert_encoder(layers=int(sys.argv[1]))
gc.callbacks.append(gc_timed)
T0 = time.perf_counter()
with torch.no_grad():
    if sys.argv[3] == "1":
        import bitfx
        bitfx.trace_once(model)
    torch.compile(model, backend="bitfx", options={"regions": sys.argv[2] == "1"})(*inputs)
log(f"first call done; Python's garbage collector ran {GC['n']} times, {GC['s']:.2f} s in all")
"""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--one-graph", action="store_true", help="options={'regions': False}")
    p.add_argument("--warm", action="store_true", help="a second process against the same caches too")
    p.add_argument("--trace-once", action="store_true", help="bitfx.trace_once(model) first: dynamo traces one layer")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as bitfx_dir, tempfile.TemporaryDirectory() as inductor_dir:
        env = {**os.environ, "BITFX_CACHE_DIR": bitfx_dir, "TORCHINDUCTOR_CACHE_DIR": inductor_dir}
        for run in ("cold", "warm") if args.warm else ("cold",):
            print(f"# {run}: {args.layers}-layer BERT-base-shaped model, "
                  f"{'one graph' if args.one_graph else 'split at the repeated blocks'}"
                  f"{', trace_once' if args.trace_once else ''}", flush=True)
            out = subprocess.run([sys.executable, "-c", _CHILD, str(args.layers), "0" if args.one_graph else "1",
                                  "1" if args.trace_once else "0"],
                                 env=env, capture_output=True, text=True)
            print(out.stdout if out.returncode == 0 else out.stderr[-4000:], flush=True)


if __name__ == "__main__":
    main()
