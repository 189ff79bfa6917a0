"""The binary-GEMM ceiling of this CPU, measured in the same run as the benchmark that quotes it.

    from bitfx.perf.ceiling import measure
    c = measure(M=128, N=768, K=3072)        # builds ceiling.c once (clang -O3 -march=native), runs it
    print(c.gbit_per_s, c.isa)               # e.g. 1178 G bit-MACs/s per core, "avx512-vpopcntdq"

`ceiling.c` (beside this file) is a hand-written register-tiled xor → popcount → add kernel over the
same K-major packed layout as bitfx's GEMM (DESIGN §5); on a Zen 4 core it reaches ~1,180 G bit-MACs/s,
on Zen 5 ~2,350, which is why benchmarks report `ceil%` against this run's figure, not a constant.
The binary is cached under the bitfx cache directory, keyed by the source and the compiler flags.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bitfx.codegen.build import cache_dir

SOURCE = Path(__file__).with_name("ceiling.c")
FLAGS = ("-O3", "-march=native")


class CeilingUnavailable(RuntimeError):
    """The ceiling kernel cannot be built or run here; the message says why and what to install."""


@dataclass(frozen=True)
class Ceiling:
    """One measurement: best time of one M×N×K binary GEMM on one core."""

    M: int
    N: int
    K: int
    us: float
    gbit_per_s: float
    isa: str

    def fraction(self, gbit_per_s: float, threads: int = 1) -> float:
        """`gbit_per_s` as a fraction of `threads` × this one-core ceiling."""
        return gbit_per_s / (self.gbit_per_s * threads)


def binary() -> Path:
    """The compiled ceiling program (built with clang, else cc, on first use)."""
    return build_program(SOURCE, "ceiling")


def build_program(source: Path, name: str) -> Path:
    """`source` (C) compiled with clang, else cc, and `FLAGS`; cached under the bitfx cache directory as
    `<name>-<digest of the source, compiler and flags>`, published whole (a per-process temporary name)."""
    compiler = shutil.which("clang") or shutil.which("cc")
    if compiler is None:
        raise CeilingUnavailable("no C compiler found (clang or cc); install clang (apt-get install clang)")
    digest = hashlib.sha256(source.read_bytes() + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    out = cache_dir() / f"{name}-{digest}"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
        proc = subprocess.run([compiler, *FLAGS, "-o", str(tmp), str(source)], capture_output=True, text=True)
        if proc.returncode:
            raise CeilingUnavailable(f"{compiler} could not build {source.name}:\n{proc.stderr.strip()}")
        tmp.replace(out)
    return out


def measure(M: int = 128, N: int = 768, K: int = 3072, reps: int = 50) -> Ceiling:
    """Run the ceiling kernel on an M×N×K GEMM (M a multiple of 4, N of 32, K of 64); best of `reps`."""
    proc = subprocess.run([str(binary()), str(M), str(N), str(K), str(reps)], capture_output=True, text=True)
    if proc.returncode:
        raise CeilingUnavailable(f"ceiling {M} {N} {K} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    us, _, gbit, _, isa = proc.stdout.split()
    return Ceiling(M, N, K, float(us), float(gbit), isa)
