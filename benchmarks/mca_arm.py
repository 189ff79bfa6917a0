"""Static throughput of the NEON inner loops: binary GEMM (bit-MACs/cycle) vs fp32 GEMM (MACs/cycle).

    python benchmarks/mca_arm.py [--cpus cortex-a76 cortex-a55] [--mca llvm-mca-19]

Builds ``bitfx.targets.arm.binary_gemm_neon`` and ``fp32_gemm_neon`` for ``linux-arm64``, cuts the
hottest loop out of each one's assembly (the self-looping block with the most ``cnt`` / ``fmla``),
and asks llvm-mca for its steady-state cycles per iteration on each CPU model. Work per iteration
is counted from the assembly itself: each ``cnt v.16b`` is 128 bit-MACs, each ``fmla v.4s`` 4 MACs.
No device is needed; the numbers are the scheduling model's, not a measurement (on a board, use
the RPC recipe in bitfx/deploy/README.md). LLVM's ``cortex-a76`` shares the Cortex-A57 model;
``neoverse-n1`` (an A76 derivative) has its own and is printed as a cross-check.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tvm

from bitfx.targets import arm, cross

_LABEL = re.compile(r"^(\.?L\w+):")
_BRANCH = re.compile(r"^\s+(b\.\w+|b|cbnz|cbz|tbnz|tbz)\s+(?:.*,\s*)?(\.?L\w+)\s*$")
WORK = {"bit": (re.compile(r"^\s+cnt\s+v\d+\.16b"), 128), "fp32": (re.compile(r"^\s+fmla\s+v\d+\.4s"), 4)}


def hot_loop(asm: str, key: re.Pattern) -> list[str]:
    """The instructions of the self-looping block that holds the most ``key`` instructions."""
    best: list[str] = []
    label, body = None, []
    for line in asm.splitlines():
        if m := _LABEL.match(line):
            label, body = m.group(1), []
            continue
        if label is None or not line.startswith("\t") or line.strip().startswith((".", "//")):
            continue
        body.append(line)
        if (b := _BRANCH.match(line)) and b.group(2) == label:
            if sum(bool(key.match(x)) for x in body) > sum(bool(key.match(x)) for x in best):
                best = list(body)
            label = None
    return best


def find_mca(explicit: str | None) -> str:
    for tool in [explicit] if explicit else ["llvm-mca-19", "llvm-mca-18", "llvm-mca-17",
                                            "llvm-mca-16", "llvm-mca"]:
        if shutil.which(tool):
            return tool
    sys.exit("llvm-mca not found: install the Debian package llvm (or llvm-19 for newer models)")


def mca_cycles(mca: str, loop: list[str], cpu: str, iterations: int = 1000) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".s") as f:
        f.write("\n".join(loop) + "\n")
        f.flush()
        out = subprocess.run([mca, "-mtriple=aarch64", f"-mcpu={cpu}", f"-iterations={iterations}",
                              f.name], capture_output=True, text=True, check=True).stdout
    cycles = int(re.search(r"Total Cycles:\s+(\d+)", out).group(1))
    return cycles / iterations


def kernel_asm(kind: str) -> str:
    if kind == "bit":  # BERT-base FFN shape: K = 3072 bits = 24 NEON steps
        func = arm.binary_gemm_neon(64, 768, 3072)
    else:
        func = arm.fp32_gemm_neon(64, 768, 3072)
    lib = tvm.compile(tvm.IRModule({"main": func}), target=cross.get_target("linux-arm64").tvm_target)
    return lib.mod.inspect_source("asm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", nargs="+", default=["cortex-a76", "cortex-a55", "neoverse-n1"])
    parser.add_argument("--mca", default=None, help="llvm-mca binary (default: newest found)")
    parser.add_argument("--dump", type=Path, default=None, help="write the two loops here")
    args = parser.parse_args()
    mca = find_mca(args.mca)
    loops = {}
    for kind, (key, per) in WORK.items():
        loop = hot_loop(kernel_asm(kind), key)
        if not loop:
            sys.exit(f"no {kind} inner loop with {key.pattern!r} found in the assembly")
        loops[kind] = (loop, per * sum(bool(key.match(x)) for x in loop))
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            (args.dump / f"{kind}_loop.s").write_text("\n".join(loop) + "\n")
    version = subprocess.run([mca, "--version"], capture_output=True, text=True).stdout
    release = re.search(r"version ([\d.]+)", version)
    print(f"{mca}: LLVM {release.group(1) if release else '?'}")
    for kind, (loop, work) in loops.items():
        print(f"{kind:>5} loop: {len(loop)} instructions, {work} "
              f"{'bit-MACs' if kind == 'bit' else 'MACs'} per iteration")
    print(f"{'cpu':<12} {'bit cyc/it':>10} {'bit-MAC/cyc':>12} {'fp32 cyc/it':>11} "
          f"{'MAC/cyc':>8} {'ratio':>6}")
    for cpu in args.cpus:
        bit_c = mca_cycles(mca, loops["bit"][0], cpu)
        fp_c = mca_cycles(mca, loops["fp32"][0], cpu)
        bit_rate, fp_rate = loops["bit"][1] / bit_c, loops["fp32"][1] / fp_c
        print(f"{cpu:<12} {bit_c:>10.2f} {bit_rate:>12.1f} {fp_c:>11.2f} {fp_rate:>8.2f} "
              f"{bit_rate / fp_rate:>5.1f}x")


if __name__ == "__main__":
    main()
