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

import subprocess
from pathlib import Path

from bitfx.perf.ceiling import CeilingUnavailable, build_program

SOURCE = Path(__file__).with_name("bandwidth.c")


def binary() -> Path:
    """The compiled bandwidth program (built with clang, else cc, on first use)."""
    return build_program(SOURCE, "bandwidth")


def measure(nbytes: int, reps: int | None = None) -> float:
    """Best-pass read bandwidth (GB/s, 1e9 bytes) of one core over a buffer of `nbytes` (>= 256)."""
    if nbytes < 256:
        raise ValueError(f"nbytes must be >= 256, got {nbytes}")
    reps = reps or max(5, min(2000, (1 << 30) // nbytes))
    proc = subprocess.run([str(binary()), str(nbytes), str(reps)], capture_output=True, text=True)
    if proc.returncode:
        raise CeilingUnavailable(f"bandwidth {nbytes} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return float(proc.stdout.split()[0])
