"""One core's read bandwidth, measured in the same run as the benchmark that quotes it.

    from bitfx.perf.bandwidth import measure
    measure(256 << 20)        # GB/s streaming a 256 MiB buffer from DRAM (much larger than L2/L3)
    measure(294_912)          # GB/s reading a buffer of one packed 768x3072 weight (cache-resident)

`bandwidth.c` (beside this file) sums the buffer with four independent 64-byte vector accumulators and
reports the best pass, so the figure is the load rate of one core at that working-set size: what a
GEMV that streams its packed weight can reach at best. Built once with clang -O3 -march=native (else
cc), cached under the bitfx cache directory keyed by the source and the flags.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

from bitfx.codegen.build import cache_dir
from bitfx.perf.ceiling import CeilingUnavailable

SOURCE = Path(__file__).with_name("bandwidth.c")
FLAGS = ("-O3", "-march=native")


def binary() -> Path:
    """The compiled bandwidth program (built with clang, else cc, on first use)."""
    compiler = shutil.which("clang") or shutil.which("cc")
    if compiler is None:
        raise CeilingUnavailable("no C compiler found (clang or cc); install clang (apt-get install clang)")
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    out = cache_dir() / f"bandwidth-{digest}"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.{id(out)}.tmp")
        proc = subprocess.run([compiler, *FLAGS, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True)
        if proc.returncode:
            raise CeilingUnavailable(f"{compiler} could not build {SOURCE.name}:\n{proc.stderr.strip()}")
        tmp.replace(out)
    return out


def measure(nbytes: int, reps: int | None = None) -> float:
    """Best-pass read bandwidth (GB/s, 1e9 bytes) of one core over a buffer of `nbytes` (>= 256)."""
    if nbytes < 256:
        raise ValueError(f"nbytes must be >= 256, got {nbytes}")
    reps = reps or max(5, min(2000, (1 << 30) // nbytes))
    proc = subprocess.run([str(binary()), str(nbytes), str(reps)], capture_output=True, text=True)
    if proc.returncode:
        raise CeilingUnavailable(f"bandwidth {nbytes} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return float(proc.stdout.split()[0])
