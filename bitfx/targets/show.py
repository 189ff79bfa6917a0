"""``bitfx kernels``: write what bitfx generates for one op and shape on one target, for people to read.

    bitfx kernels --target cuda-sm90 --op bit_linear --shape 128x768x3072 -o out/
    bitfx kernels --target linux-arm64 --op bit_linear --shape 1x768x768 --act absmax --bits 8 -o out/
    bitfx kernels --target host --op bit_attention --shape 128x128x64 -o out/

CUDA targets (``cuda-sm80``, ``cuda-sm90``, ``jetson-orin``: device targets of ``bitfx.targets.cross`` whose
TVM target is CUDA) write, per kernel, the CUDA C++ TVM generates (``.cu``), the PTX
(``.ptx``, nvcc), the cubin and ``ptxas -v``'s report (``.ptxas.txt``: registers, spills). LLVM targets (``host``,
``linux-arm64``, ``android-arm64``, ...) write the assembly (``.s``)
of the kernel set that target runs. Shapes: ``bit_linear`` MxKxN (tokens, in, out features); ``bit_attention``
LqxLkxD (query length, key length, head dim). The same kernel parameters as the torch-process lowering use.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

OPS = ("bit_linear", "bit_attention")


@dataclass(frozen=True)
class KernelSpec:
    """One kernel call of an op: a file stem, the kernel op and its parameters."""

    name: str
    op: str
    params: dict
    rows: int  # the GEMM's rows per call (CUDA: tensor cores or CUDA cores)


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"128x768x3072"`` -> (128, 768, 3072); ValueError naming the text otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*[x,]\s*(\d+)\s*[x,]\s*(\d+)\s*", text)
    if not m or 0 in (dims := tuple(int(g) for g in m.groups())):
        raise ValueError(f"shape {text!r} is not three positive sizes like 128x768x3072")
    return dims


def kernel_specs(op: str, shape: tuple[int, int, int], *, weight: str = "binary", act: str = "sign",
                 bits: int = 1) -> list[KernelSpec]:
    """The kernels one call of ``op`` runs, with the parameters ``bitfx.codegen.runtime`` gives them."""
    if op == "bit_linear":
        M, K, N = shape
        ternary = weight == "ternary"
        if weight not in ("binary", "ternary"):
            raise ValueError(f"weight={weight!r}; expected 'binary' or 'ternary'")
        if act == "sign":
            if bits != 1:
                raise ValueError(f"act='sign' is 1-bit; got bits={bits}")
            quant = KernelSpec("pack_sign", "pack_rows", dict(mode="sign", K=K, move=True, mean=True), M)
            mode = "xnor"
        elif act == "absmax":
            if not 2 <= bits <= 8:
                raise ValueError(f"act='absmax' takes bits in 2..8; got {bits}")
            quant = KernelSpec("absmax_planes", "absmax_planes", dict(K=K, bits=bits), M)
            mode = "and"
        else:
            raise ValueError(f"act={act!r}; expected 'sign' or 'absmax'")
        gemm = dict(mode=mode + ("_ternary" if ternary else ""), K=K, N=N, planes=bits, epilogue="float", bias=True)
        return [quant, KernelSpec("bit_linear_gemm", "gemm", gemm, M)]
    if op == "bit_attention":
        Lq, Lk, D = shape
        return [KernelSpec("pack_qk", "pack_rows", dict(mode="sign", K=D), Lq),
                KernelSpec("scores_gemm", "gemm", dict(mode="xnor", K=D, N=None, batched=True), Lq),
                KernelSpec("pack_probs", "pack_rows", dict(mode="nonzero", K=None, dtype="float32"), Lq),
                KernelSpec("pack_values", "pack_cols", dict(K=None, N=D), Lk),
                KernelSpec("pv_gemm", "gemm", dict(mode="and", K=None, N=D, signed=False, batched=True), Lq)]
    raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


def write_kernels(target: str, op: str, shape: tuple[int, int, int], out: str | Path, **opts) -> list[Path]:
    """Write the kernels of ``op`` at ``shape`` for ``target`` into ``out``; returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from bitfx.targets.cross import get_target

    specs = kernel_specs(op, shape, **opts)
    device = get_target(target)
    if device.target.get("kind") == "cuda":
        return _write_cuda(device.target["arch"], specs, out)
    return _write_llvm(target, specs, out)


def _write_cuda(arch: str, specs: list[KernelSpec], out: Path) -> list[Path]:
    from bitfx.targets.cuda_runtime import MMA_MIN_ROWS, artifacts

    written = []
    for spec in specs:
        impl = "cuda" if spec.op != "gemm" or spec.rows >= MMA_MIN_ROWS else "cuda-popc"
        art = artifacts(spec.op, impl=impl, arch=arch, **spec.params)
        for suffix, src in ((".cu", art.source), (".ptx", art.ptx), (".cubin", art.cubin)):
            path = out / f"{spec.name}{suffix}"
            path.write_bytes(src.read_bytes())
            written.append(path)
        report = out / f"{spec.name}.ptxas.txt"
        report.write_text(f"kernel set {impl}, {spec.op} {spec.params}\n{art.ptxas_log}")
        written.append(report)
        print(f"{spec.name:16s} {impl:9s} {arch}: {art.registers} registers, {art.spill_stores} B spill stores, "
              f"{art.stack_frame} B stack")
    return written


def _write_llvm(target: str, specs: list[KernelSpec], out: Path) -> list[Path]:
    import tvm

    from bitfx.targets import registry
    from bitfx.targets.cross import get_target

    device = get_target(target)
    written = []
    for spec in specs:
        func = registry.implementation(device.kernels, spec.op)(**spec.params).with_attr("global_symbol", spec.name)
        lib = tvm.compile(tvm.IRModule({spec.name: func}), target=device.tvm_target)
        path = out / f"{spec.name}.s"
        path.write_text(lib.mod.inspect_source("asm"))
        written.append(path)
        print(f"{spec.name:16s} {device.kernels:9s} {target}: {path}")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    from bitfx.targets.cross import list_targets

    parser = argparse.ArgumentParser(prog="bitfx kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help=f"one of {', '.join(list_targets())}")
    parser.add_argument("--op", required=True, choices=OPS)
    parser.add_argument("--shape", required=True, help="bit_linear: MxKxN; bit_attention: LqxLkxD")
    parser.add_argument("--weight", choices=("binary", "ternary"), default="binary")
    parser.add_argument("--act", choices=("sign", "absmax"), default="sign")
    parser.add_argument("--bits", type=int, default=None, help="activation bits (absmax: 2..8; default 8)")
    parser.add_argument("-o", "--output", required=True, help="directory to write into")
    args = parser.parse_args(argv)
    bits = args.bits if args.bits is not None else (8 if args.act == "absmax" else 1)
    if args.target not in list_targets():
        print(f"bitfx kernels: unknown target {args.target!r}; expected one of {', '.join(list_targets())}",
              file=sys.stderr)
        return 2
    try:
        files = write_kernels(args.target, args.op, parse_shape(args.shape), args.output,
                              weight=args.weight, act=args.act, bits=bits)
    except (ValueError, RuntimeError) as e:
        print(f"bitfx kernels: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(files)} files to {args.output}")
    return 0
