"""Dynamic aarch64 instructions of one binary GEMM call: the exported "arm64" kernel vs the hand-tiled one.

    python benchmarks/arm_gemm.py [--shapes 128x3072x768 128x768x3072] [--cpu cortex-a53]

For each M x N x K, builds three one-kernel Relax libraries for ``linux-arm64`` (ARMv8.0 + NEON):
``bitfx.targets.arm.gemm`` (what every arm64 export runs: reference buffers, K-major uint64 weights),
``arm.binary_gemm_neon`` (the hand-tiled row-major kernel) and the reference ``te.compute``
(``bitfx/codegen/compute.py``, what exports ran before), and counts instructions under
``qemu-aarch64`` with ``benchmarks/arm_profile.py``'s TCG plugin, calling ``main`` once and twice:
the difference is one call. Checks the three outputs are equal, prints instructions per 128 bit-MACs
and the ratio to the hand-tiled kernel (target: <= 1.15x). One thread, xnor mode, int output.
Also counts ``arm.fp32_gemm_neon`` (4 x 16 ``fmla`` tile) at the same shape and prints how many times
fewer instructions per multiply-accumulate the exported binary GEMM takes (target: >= 10x).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import arm_profile  # noqa: E402


def _library(func, arg_types, out_type, path: Path) -> Path:
    from tvm import relax

    from bitfx.targets import cross

    bb = relax.BlockBuilder()
    params = [relax.Var(f"a{i}", relax.TensorType(list(s), d)) for i, (s, d) in enumerate(arg_types)]
    with bb.function("main", params):
        gv = bb.add_func(func.with_attr("global_symbol", "kernel"), "kernel")
        bb.emit_func_output(bb.emit(relax.call_tir(gv, params, relax.TensorType(*out_type))))
    return cross.export_library(cross.build_relax(bb.get(), "linux-arm64"), path, "linux-arm64")


def one_call(plugin: Path, lib: Path, inputs: list[np.ndarray], cpu: str, work: Path) -> tuple[int, np.ndarray]:
    paths = []
    for i, x in enumerate(inputs):
        paths.append(work / f"input_{lib.stem}_{i}.npy")
        np.save(paths[-1], x)
    totals = []
    for calls in (1, 2):
        blocks, _ = arm_profile.run_counts(plugin, lib, paths, "linux-arm64", cpu, calls, work)
        totals.append(sum(n * e for n, e in blocks.values()))
    return totals[1] - totals[0], np.load(work / "output_0.npy")


def main() -> None:
    from bitfx.codegen import compute
    from bitfx.targets import arm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["128x3072x768", "128x768x3072"], help="MxNxK")
    p.add_argument("--cpu", default="cortex-a53")
    args = p.parse_args()
    from bitfx.targets import emulate

    cache = emulate.cache_dir() / "qemu-plugin"
    cache.mkdir(parents=True, exist_ok=True)
    plugin = arm_profile.build_plugin(arm_profile.plugin_header(True, cache), cache)
    print(f"{'M x N x K':>16} {'kernel':>12} {'instructions':>14} {'per 128 bit-MACs':>17} {'vs hand':>8}")
    for shape in args.shapes:
        M, N, K = (int(v) for v in shape.split("x"))
        KW = (K + 63) // 64
        rng = np.random.default_rng(0)
        a = rng.integers(0, 2 ** 64, size=(M, KW), dtype=np.uint64)
        w = rng.integers(0, 2 ** 64, size=(KW, N), dtype=np.uint64)
        if K % 64:
            a[:, -1] &= np.uint64((1 << K % 64) - 1)
            w[-1] &= np.uint64((1 << K % 64) - 1)
        kb = arm.packed_bytes(K)
        a8 = np.zeros((M, kb), np.uint8)
        a8[:, :KW * 8] = a.view(np.uint8).reshape(M, -1)
        w8 = np.zeros((N, kb), np.uint8)
        w8[:, :KW * 8] = np.ascontiguousarray(w.T).view(np.uint8).reshape(N, -1)
        words = [((M, KW), "uint64"), ((KW, N), "uint64")]
        cases = {
            "hand-tiled": (arm.binary_gemm_neon(M, N, K), [((M, kb), "uint8"), ((N, kb), "uint8")], [a8, w8]),
            "arm64": (arm.gemm(mode="xnor", K=K, N=N), words, [a, w]),
            "reference": (compute.gemm(mode="xnor", K=K, N=N), words, [a, w]),
        }
        counts, outs = {}, {}
        with tempfile.TemporaryDirectory(prefix="bitfx-armgemm-") as tmp:
            for name, (func, types, inputs) in cases.items():
                lib = _library(func, types, ((M, N), "int32"), Path(tmp) / f"{name}.so")
                counts[name], outs[name] = one_call(plugin, lib, inputs, args.cpu, Path(tmp))
            fa = rng.standard_normal((M, K), dtype=np.float32)
            fw = rng.standard_normal((K, N), dtype=np.float32)
            lib = _library(arm.fp32_gemm_neon(M, N, K), [((M, K), "float32"), ((K, N), "float32")],
                           ((M, N), "float32"), Path(tmp) / "fp32.so")
            fp32, _ = one_call(plugin, lib, [fa, fw], args.cpu, Path(tmp))
        for name in cases:
            if not np.array_equal(outs[name], outs["hand-tiled"]):
                sys.exit(f"{shape}: {name} differs from the hand-tiled kernel")
            per = counts[name] / (M * N * K / 128)
            print(f"{shape:>16} {name:>12} {counts[name]:>14,d} {per:>17.2f} "
                  f"{counts[name] / counts['hand-tiled']:>7.2f}x", flush=True)
        print(f"{shape:>16} {'fp32 fmla':>12} {fp32:>14,d} {fp32 / (M * N * K) * 128:>17.2f}   "
              f"binary arm64 takes {fp32 / counts['arm64']:.1f}x fewer instructions per MAC", flush=True)


if __name__ == "__main__":
    main()
