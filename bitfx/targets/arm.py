"""ARM (AArch64 NEON) schedules: the binary GEMM as a tiled TVMScript loop nest.

What is computed (the contract of ``bitfx.bit_linear``'s integer core, DESIGN §2)::

    out[m, n] = K - 2 * popcount(a[m, :] XOR w[n, :])       # = dot(sign a[m], sign w[n])

How it runs here. NEON's ``cnt`` counts bits per *byte*, so the K axis lives in the 16 byte lanes
of a q register: both operands are stored row-major over packed K (``a`` is [M, KB], ``w`` is
[N, KB] bytes, KB a multiple of 16), and for each output of a ``tm`` x ``tn`` register tile the
inner loop is ``eor`` + ``cnt`` + ``add`` on 16-byte vectors, accumulating per-byte counts in
uint8 (at most 8 per step, so ``chunk`` <= 31 steps cannot overflow), then widens once per chunk.
That is 3 vector instructions per 128 bit-MACs, and ``tm + tn`` loads per ``tm * tn * 128``. The
alternative, the x86 layout with output columns in lanes (K-major weights), must widen every
count (``cnt`` + two ``uaddlp``) before adding: 5 instructions for the same work.

Bits follow ``bitfx/codegen/compute.py``: bit j of a uint64 word holds element 64*w + j, bit 1
means +1 (sign(0) = +1, NaN -> +1), tail bits are zero in both operands (so they add nothing to
the popcount; ``K`` in the formula is the true reduction length). Those words viewed as bytes on
a little-endian machine are this kernel's rows: activations ``[M, KW]`` words are
``a.view(np.uint8)`` once KW is padded to even (whole 128-bit vectors); codegen's K-major
``[KW, N]`` weights become ``np.ascontiguousarray(w.T).view(np.uint8)``, packed once ahead of
the first call like any weight.

``benchmarks/mca_arm.py`` measures the inner loop with llvm-mca next to ``fp32_gemm_neon``.
"""

from __future__ import annotations

import numpy as np

from tvm.script import tirx as T

LANES = 16  # bytes per NEON q register
MAX_CHUNK = 31  # 31 * 8 = 248 <= 255: uint8 lane counts cannot overflow


def packed_bytes(k: int) -> int:
    """Bytes per packed row for ``k`` bits: whole 128-bit vectors."""
    return -(-k // (8 * LANES)) * LANES


def pack_signs(x: np.ndarray) -> np.ndarray:
    """Pack ``sign(x)`` of a [R, K] array along K: bit 1 for +1 (``not x < 0``: 0 and NaN are +1).

    Returns uint8 [R, packed_bytes(K)], LSB-first, zero padded.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"pack_signs expects a [rows, K] array, got shape {x.shape}")
    bits = np.zeros((x.shape[0], packed_bytes(x.shape[1]) * 8), dtype=bool)
    bits[:, :x.shape[1]] = ~(x < 0)
    return np.packbits(bits, axis=1, bitorder="little")


def binary_gemm_reference(a: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """NumPy reference: ``K - 2 * popcount(a[m] ^ w[n])`` for packed uint8 rows; int32 [M, N]."""
    x = np.bitwise_xor(a[:, None, :], w[None, :, :])
    return (k - 2 * np.unpackbits(x, axis=2).sum(axis=2, dtype=np.int64)).astype(np.int32)


def _check_tile(name: str, value: int, upper: int | None = None) -> None:
    if not isinstance(value, int) or value < 1 or (upper is not None and value > upper):
        bound = f" and at most {upper}" if upper is not None else ""
        raise ValueError(f"{name} must be a positive int{bound}, got {value!r}")


def binary_gemm_neon(m: int, n: int, k: int, *, tile: tuple[int, int] = (4, 4),
                     chunk: int = MAX_CHUNK, name: str = "bit_gemm_neon"):
    """The binary GEMM ``out[m, n] = k - 2 * popcount(a[m] ^ w[n])`` as a NEON-shaped prim_func.

    Args:
        m, n: output rows (tokens) and columns (output features); any sizes, tails are handled.
        k: bits per row (the true reduction length); rows hold ``packed_bytes(k)`` bytes.
        tile: the register tile (rows, columns). 4 x 4 keeps 16 accumulators plus 8 operands in
            the 32 q registers.
        chunk: 16-byte steps accumulated in uint8 before widening, 1..31.

    Returns:
        ``tvm.tirx.PrimFunc`` with arguments ``a: uint8[m, KB]``, ``w: uint8[n, KB]``,
        ``out: int32[m, n]``. Tiles run in parallel over (row tile, column tile), so decode
        (m = 1) still uses every core.
    """
    for label, value in (("m", m), ("n", n), ("k", k), ("tile rows", tile[0]),
                         ("tile columns", tile[1])):
        _check_tile(label, value)
    _check_tile("chunk", chunk, MAX_CHUNK)
    tm, tn = tile
    kb = packed_bytes(k)
    steps = kb // LANES
    full_chunks, last_chunk = divmod(steps, chunk)
    mt, nt, m_rem, n_rem = m // tm, n // tn, m % tm, n % tn

    @T.macro
    def chunk_of(a, w, acc, m0, n0, rows, cols, step0, nsteps):
        cnt8 = T.alloc_buffer((rows, cols, LANES), "uint8", scope="global")
        for i in T.unroll(rows):
            for j in T.unroll(cols):
                for lane in T.vectorized(LANES):
                    cnt8[i, j, lane] = T.uint8(0)
        for s in T.serial(nsteps):
            for i in T.unroll(rows):
                for j in T.unroll(cols):
                    for lane in T.vectorized(LANES):
                        cnt8[i, j, lane] = cnt8[i, j, lane] + T.popcount(
                            a[m0 + i, (step0 + s) * LANES + lane]
                            ^ w[n0 + j, (step0 + s) * LANES + lane])
        for i in T.unroll(rows):
            for j in T.unroll(cols):
                for lane in T.unroll(LANES):
                    acc[i, j] = acc[i, j] + T.Cast("int32", cnt8[i, j, lane])

    # "global" scope: TVM puts small constant-size global allocations on the stack, where LLVM
    # promotes them to registers; "local" would become a TVMBackendAllocWorkspace heap buffer
    # whose stores LLVM cannot remove.
    @T.macro
    def tile_at(a, w, out, m0, n0, rows, cols):
        acc = T.alloc_buffer((rows, cols), "int32", scope="global")
        for i in T.unroll(rows):
            for j in T.unroll(cols):
                acc[i, j] = 0
        if full_chunks > 0:
            for c in T.serial(full_chunks):
                chunk_of(a, w, acc, m0, n0, rows, cols, c * chunk, chunk)
        if last_chunk > 0:
            chunk_of(a, w, acc, m0, n0, rows, cols, full_chunks * chunk, last_chunk)
        for i in T.unroll(rows):
            for j in T.unroll(cols):
                out[m0 + i, n0 + j] = k - 2 * acc[i, j]

    @T.prim_func
    def bit_gemm(a: T.Buffer((m, kb), "uint8"), w: T.Buffer((n, kb), "uint8"),
                 out: T.Buffer((m, n), "int32")):
        T.func_attr({"tir.noalias": True})
        if mt > 0 and nt > 0:
            for t in T.parallel(mt * nt):
                tile_at(a, w, out, t // nt * tm, t % nt * tn, tm, tn)
        if mt > 0 and n_rem > 0:
            for t in T.parallel(mt):
                tile_at(a, w, out, t * tm, nt * tn, tm, n_rem)
        if m_rem > 0 and nt > 0:
            for t in T.parallel(nt):
                tile_at(a, w, out, mt * tm, t * tn, m_rem, tn)
        if m_rem > 0 and n_rem > 0:
            tile_at(a, w, out, mt * tm, nt * tn, m_rem, n_rem)

    return bit_gemm.with_attr("global_symbol", name)


def fp32_gemm_neon(m: int, n: int, k: int, *, tile: tuple[int, int] = (4, 16),
                   name: str = "fp32_gemm_neon"):
    """The fp32 baseline ``out = a @ w`` (``w`` K-major, [k, n]) with the same kind of schedule.

    A 4 x 16 tile is 16 ``fmla v.4s`` accumulators per k step: the float peak of a NEON core.
    ``m`` and ``n`` must be multiples of the tile (it exists to be measured, not to serve models).
    """
    tm, tn = tile
    if m % tm or n % tn:
        raise ValueError(f"fp32_gemm_neon needs m % {tm} == 0 and n % {tn} == 0, got m={m}, n={n}")

    @T.prim_func
    def fp32_gemm(a: T.Buffer((m, k), "float32"), w: T.Buffer((k, n), "float32"),
                  out: T.Buffer((m, n), "float32")):
        T.func_attr({"tir.noalias": True})
        for t in T.parallel((m // tm) * (n // tn)):
            acc = T.alloc_buffer((tm, tn), "float32", scope="global")
            for i in T.unroll(tm):
                for j in T.vectorized(tn):
                    acc[i, j] = T.float32(0)
            for kk in T.serial(k):
                for i in T.unroll(tm):
                    for j in T.vectorized(tn):
                        acc[i, j] = acc[i, j] + a[t // (n // tn) * tm + i, kk] * w[
                            kk, t % (n // tn) * tn + j]
            for i in T.unroll(tm):
                for j in T.vectorized(tn):
                    out[t // (n // tn) * tm + i, t % (n // tn) * tn + j] = acc[i, j]

    return fp32_gemm.with_attr("global_symbol", name)
