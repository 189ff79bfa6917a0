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

from bitfx.targets.host import gemm_output

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


# ============================================================================================ kernel set
# The "arm64" kernel set (``bitfx.targets.registry``): what every arm64 export runs. Same buffers, in the
# same order, as ``bitfx/codegen/compute.py`` (K-major ``[KW, N]`` uint64 weights), so one ``call_tir``
# serves any set and the kernels are tested against the reference compute directly.
#
# GEMM: output columns in lanes. Two adjacent columns of a K-major weight word row are one q register
# (uint64x2); the activation word is broadcast to both lanes. Per (row, column pair, word) the inner loop
# is ``eor`` + ``cnt .16b`` + ``add .16b`` into a uint8x16 accumulator (each byte gains at most 8 per
# word, so up to 31 words cannot overflow), widened to the int64 tile once per chunk of words — the same
# 3 instructions per 128 bit-MACs as the row-major kernel above, with no repacking of the export's
# weights. A tile of ``rows`` x ``cols`` columns keeps rows*cols/2 accumulators plus cols/2 weight and
# ``rows`` activation registers live (4 x 8: 24 of the 32 q registers).

SCHEDULE_VERSION = 2
WORD = 64
_GEMM_MODES = ("xnor", "xnor_ternary", "and", "and_ternary")


def _u64(v: int):
    from tvm import tirx

    return tirx.const(v, "uint64")


def _lanes_type(base: str, words: int) -> str:
    """``uint8`` over ``words`` 64-bit words: "uint8x16" for 2 words, "uint8x8" for one."""
    lanes = {"uint8": 8, "uint16": 4, "uint32": 2, "uint64": 1}[base] * words
    return base if lanes == 1 else f"{base}x{lanes}"


def _byte_sum(Tb, v8, words: int, dot: bool = False):
    """uint8 lanes -> the sum of each 64-bit word's 8 bytes, as uint64 (x2): three pairwise widenings,
    or with ``dot`` (ARMv8.2 dotprod) one ``udot`` by ones (bytes -> uint32 lanes) and one widening."""
    from tvm import tirx

    v, steps = v8, (("uint8", "uint16", 8), ("uint16", "uint32", 16), ("uint32", "uint64", 32))
    if dot and words == 2:
        ones = Tb.broadcast(tirx.const(1, "uint8"), 16)
        v = Tb.call_llvm_pure_intrin("uint32x4", "llvm.aarch64.neon.udot.v4i32.v16i8",
                                     Tb.broadcast(tirx.const(0, "uint32"), 4), v8, ones)
        steps = steps[2:]
    for narrow, wide, shift in steps:
        wt = _lanes_type(wide, words)
        w = Tb.reinterpret(wt, v)
        mask = tirx.const((1 << shift) - 1, wide)
        sh = tirx.const(shift, wide)
        if words > 1:
            mask, sh = Tb.broadcast(mask, words * 64 // int(wide[4:])), Tb.broadcast(sh, words * 64 // int(wide[4:]))
        v = (w & mask) + (w >> sh)
    return v


def gemm_tile(mode: str, K: int | None = None) -> tuple[int, int]:
    """(rows, columns) of the register tile: 4 x 8; 3 x 8 when K fits one chunk of words (there LLVM
    adds register copies to the 4 x 8 loop: 13.9 M vs 11.6 M instructions at 128 x 3072 x 768);
    2 x 8 for and_ternary's two counters per output."""
    if mode == "and_ternary":
        return (2, 8)
    if K is not None and (K + WORD - 1) // WORD <= MAX_CHUNK:
        return (3, 8)
    return (4, 8)


def gemm(*, mode: str, K: int | None, N: int | None, planes: int = 1, signed: bool = True,
         batched: bool = False, epilogue: str = "int", bias: bool = False, tile=None,
         parallel: bool = True, chunk: int = MAX_CHUNK, dot: bool = False):
    """NEON bit-serial GEMM ``acc[m, n] = sum_k a[m, k] * w[n, k]``; the contract of ``compute.gemm``.

    Modes (a = activation bits, w0/w1 = weight planes, K-major ``[KW, N]``), as in ``bitfx.targets.host.gemm``:
      xnor          acc = K - 2 popc(a ^ w0)
      xnor_ternary  acc = nnz_n - 2 popc((a ^ w0) & (w0 | w1))
      and           acc = sum_b c_b (2 popc(p_b & w0) - popc(p_b))      (c_b = 2^b; -2^(planes-1) on top if signed)
      and_ternary   acc = sum_b c_b (popc(p_b & w0) - popc(p_b & w1))
    ``epilogue="float"``: ``y = (float(acc) * row_scale[m]) * col_scale[n] (+ bias[n])``.
    M (and G when ``batched``) are symbolic; ``K=None`` makes the word count symbolic (and modes),
    ``N=None`` makes N symbolic (its ragged tail runs one column at a time). Parallel over
    (batch, column block, row block) tiles, then the ragged rows over column blocks. ``dot`` widens
    the byte counters with ARMv8.2 ``udot`` (the ``arm64-dotprod`` set; SIGILL on ARMv8.0 cores).

    Example::

        f = gemm(mode="xnor", K=768, N=3072, epilogue="float")   # tvm.tirx.PrimFunc, any M
    """
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as Tb

    if mode not in _GEMM_MODES:
        raise ValueError(f"unknown GEMM mode {mode!r}; expected one of {_GEMM_MODES}")
    if mode.startswith("xnor") and (K is None or planes != 1):
        raise ValueError(f"mode {mode!r} needs a static K and one activation plane")
    _check_tile("chunk", chunk, MAX_CHUNK)
    R, C = tile or gemm_tile(mode, K)
    if isinstance(K, int):  # equal chunks: 12 words -> one chunk of 12, 48 -> two of 24
        kw_ = (K + WORD - 1) // WORD
        chunk = -(-kw_ // -(-kw_ // chunk))
    _check_tile("tile rows", R)
    if not isinstance(C, int) or C < 2 or C % 2:
        raise ValueError(f"tile columns must be an even int >= 2, got {C!r}")
    ternary = mode.endswith("ternary")

    def match(handle, shape, dtype):
        return Tb.match_buffer(handle, shape, dtype, align=tvm_dtype_bytes(dtype))

    def body():
        a_h, w_h = Tb.arg("a", Tb.handle()), Tb.arg("w", Tb.handle())
        nz_h = Tb.arg("nnz", Tb.handle()) if mode == "xnor_ternary" else None
        if epilogue == "float":
            rs_h, cs_h = Tb.arg("row_scale", Tb.handle()), Tb.arg("col_scale", Tb.handle())
            b_h = Tb.arg("bias", Tb.handle()) if bias else None
        out_h = Tb.arg("out", Tb.handle())
        G = tirx.Var("G", "int64") if batched else None
        M = tirx.Var("M", "int64")
        n = tirx.Var("N", "int64") if N is None else N
        kw = tirx.Var("KW", "int64") if K is None else (K + WORD - 1) // WORD
        bat = [G] if batched else []
        A = match(a_h, (*bat, M, *([planes] if planes > 1 else []), kw), "uint64")
        W = match(w_h, (*bat, *([2] if ternary else []), kw, n), "uint64")
        NZ = match(nz_h, (n,), "int32") if nz_h is not None else None
        O = match(out_h, (*bat, M, n), "float32" if epilogue == "float" else "int32")
        RS = CS = BI = None  # the float epilogue's vectors
        if epilogue == "float":
            RS, CS = match(rs_h, (M,), "float32"), match(cs_h, (n,), "float32")
            BI = match(b_h, (n,), "float32") if bias else None

        def a_word(g, m, b, w):
            return A[(*([g] if batched else []), m, *([b] if planes > 1 else []), w)]

        def w_vec(g, p, w, col, words):
            idx = [*([g] if batched else []), *([p] if ternary else []), w]
            if words == 1:
                return W[(*idx, col)]
            return tirx.BufferLoad(W, [*idx, Tb.ramp(col, 1, words)])

        def emit_tile(g, rows, col0, width):
            """``rows`` (exprs) x ``width`` (static) columns from ``col0``: accumulate, then store."""
            groups = [(c, min(2, width - c)) for c in range(0, width, 2)]  # (first column, words)
            accs = [Tb.alloc_buffer((width,), "int64") for _ in rows]
            rterm = [Tb.alloc_buffer((1,), "int64") for _ in rows] if mode == "and" else None
            for i in range(len(rows)):
                with Tb.vectorized(0, width) as j:
                    Tb.buffer_store(accs[i], tirx.const(0, "int64"), [j])
                if rterm is not None:
                    Tb.buffer_store(rterm[i], tirx.const(0, "int64"), [0])
            counters = 2 if mode == "and_ternary" else 1

            def chunk_of(b, neg, w0, nwords):
                cnt = {(i, gi, c): Tb.alloc_buffer((8 * words,), "uint8")
                       for i in range(len(rows)) for gi, (_, words) in enumerate(groups) for c in range(counters)}
                rc = [Tb.alloc_buffer((16,), "uint8") for _ in rows] if rterm is not None else None
                zero8 = lambda words: Tb.broadcast(tirx.const(0, "uint8"), 8 * words)  # noqa: E731
                for (i, gi, c), buf in cnt.items():
                    Tb.buffer_store(buf, zero8(groups[gi][1]), [Tb.ramp(0, 1, 8 * groups[gi][1])])
                if rc is not None:
                    for buf in rc:
                        Tb.buffer_store(buf, zero8(2), [Tb.ramp(0, 1, 16)])
                with Tb.serial(0, nwords) as s:
                    w = w0 + s
                    wv = {}
                    for gi, (c0, words) in enumerate(groups):
                        wv[gi, 0] = Tb.bind(w_vec(g, 0, w, col0 + c0, words))
                        if ternary:
                            wv[gi, 1] = Tb.bind(w_vec(g, 1, w, col0 + c0, words))
                        if mode == "xnor_ternary":
                            wv[gi, 2] = Tb.bind(wv[gi, 0] | wv[gi, 1])
                    for i, m in enumerate(rows):
                        a1 = Tb.bind(a_word(g, m, b, w))
                        a2 = Tb.bind(Tb.broadcast(a1, 2))
                        if rc is not None:
                            pc = Tb.popcount(Tb.reinterpret("uint8x16", a2))
                            Tb.buffer_store(rc[i], tirx.BufferLoad(rc[i], [Tb.ramp(0, 1, 16)]) + pc, [Tb.ramp(0, 1, 16)])
                        for gi, (c0, words) in enumerate(groups):
                            a = a2 if words == 2 else a1
                            w0v = wv[gi, 0]
                            if mode == "xnor":
                                terms = [a ^ w0v]
                            elif mode == "xnor_ternary":
                                terms = [(a ^ w0v) & wv[gi, 2]]
                            elif mode == "and":
                                terms = [a & w0v]
                            else:
                                terms = [a & w0v, a & wv[gi, 1]]
                            t8 = _lanes_type("uint8", words)
                            for c, term in enumerate(terms):
                                buf = cnt[i, gi, c]
                                ramp = [Tb.ramp(0, 1, 8 * words)]
                                Tb.buffer_store(buf, tirx.BufferLoad(buf, ramp) + Tb.popcount(Tb.reinterpret(t8, term)), ramp)
                # widen once per chunk: per-word byte sums into the int64 tile (Horner sign for the top plane)
                for i in range(len(rows)):
                    for gi, (c0, words) in enumerate(groups):
                        ramp8 = [Tb.ramp(0, 1, 8 * words)]
                        sums = [_byte_sum(Tb, tirx.BufferLoad(cnt[i, gi, c], ramp8), words, dot)
                                for c in range(counters)]
                        s64 = sums[0]
                        if counters == 2:
                            s64 = s64 - sums[1]  # wraps; exact after the cast to int64 below
                        it = "int64" if words == 1 else f"int64x{words}"
                        s64 = Tb.reinterpret(it, s64)
                        idx = [c0] if words == 1 else [Tb.ramp(c0, 1, words)]
                        old = tirx.BufferLoad(accs[i], idx)
                        Tb.buffer_store(accs[i], old - s64 if neg else old + s64, idx)
                    if rc is not None:
                        s = Tb.reinterpret("int64x2", _byte_sum(Tb, tirx.BufferLoad(rc[i], [Tb.ramp(0, 1, 16)]), 2, dot))
                        lane0 = _lane0(Tb, s)
                        Tb.buffer_store(rterm[i], rterm[i][0] - lane0 if neg else rterm[i][0] + lane0, [0])

            for b in reversed(range(planes)):  # Horner over planes, top plane first
                neg = signed and planes > 1 and b == planes - 1
                if b != planes - 1:
                    for i in range(len(rows)):
                        with Tb.vectorized(0, width) as j:
                            Tb.buffer_store(accs[i], accs[i][j] << tirx.const(1, "int64"), [j])
                        if rterm is not None:
                            Tb.buffer_store(rterm[i], rterm[i][0] << tirx.const(1, "int64"), [0])
                if isinstance(kw, int):
                    full, last = divmod(kw, chunk)
                    if full:
                        with Tb.serial(0, full) as cix:
                            chunk_of(b, neg, cix * chunk, chunk)
                    if last:
                        chunk_of(b, neg, full * chunk, last)
                else:
                    with Tb.serial(0, kw // chunk) as cix:
                        chunk_of(b, neg, cix * chunk, chunk)
                    chunk_of(b, neg, kw // chunk * chunk, kw % chunk)

            for i, m in enumerate(rows):
                with Tb.vectorized(0, width) as j:
                    col = col0 + j
                    val = gemm_output(mode, accs[i][j].astype("int32"), K, NZ, col,
                                      rterm[i][0] if rterm is not None else None, epilogue, RS, m, CS, BI)
                    Tb.buffer_store(O, val, [*([g] if batched else []), m, col])

        def emit_cols(g, rows, nb, n_full):
            if N is not None and N % C:
                with Tb.If(nb < n_full):
                    with Tb.Then():
                        emit_tile(g, rows, nb * C, C)
                    with Tb.Else():
                        emit_tile(g, rows, n_full * C, N % C)
            else:
                emit_tile(g, rows, nb * C, C)

        loop = Tb.parallel if parallel else Tb.serial
        g_count = G if batched else 1
        n_full = n // C
        n_blocks = n_full + (1 if N is not None and N % C else 0)
        m_full, m_rem = M // R, M % R
        with loop(0, g_count * n_blocks * m_full) as t:
            g, r = t // (n_blocks * m_full), t % (n_blocks * m_full)
            nb, mb = r // m_full, r % m_full
            emit_cols(g, [mb * R + i for i in range(R)], nb, n_full)
        if R > 1:  # ragged rows (all of the work when M < R, e.g. decode), parallel over column blocks
            with loop(0, g_count * n_blocks) as t:
                g, nb = t // n_blocks, t % n_blocks
                for rem in range(1, R):
                    with Tb.If(m_rem == rem):
                        with Tb.Then():
                            emit_cols(g, [M - rem + i for i in range(rem)], nb, n_full)
        if N is None:  # ragged columns of a symbolic N, one column at a time
            with loop(0, g_count * M) as t:
                g, m = t // M, t % M
                with Tb.serial(0, n % C) as c:
                    emit_tile(g, [m], n_full * C + c, 1)

    with IRBuilder() as ib:
        with Tb.prim_func():
            Tb.func_name(f"gemm_{mode}")
            Tb.func_attr({"tir.noalias": True})
            body()
    return ib.get()


def _lane0(Tb, v):
    """Lane 0 of an int64x2 vector."""
    from tvm import tirx

    return tirx.Shuffle([v], [tirx.const(0, "int32")])


def tvm_dtype_bytes(dtype: str) -> int:
    import tvm

    return tvm.DataType(dtype).bits // 8


def gemm_dotprod(**params):
    """``gemm`` with ``udot`` widening: the ``arm64-dotprod`` kernel set (targets ``*-arm64-dotprod``)."""
    return gemm(**params, dot=True)


def _register() -> None:
    from bitfx.targets import host
    from bitfx.targets.registry import register_kernel

    register_kernel("arm64", "gemm")(gemm)
    register_kernel("arm64-dotprod", "gemm")(gemm_dotprod)
    # Packing: the host's generators are target-neutral vector code (64 lanes compared at once, the
    # mask bitcast to one uint64 word); on AArch64 LLVM lowers them to NEON compares + narrowing + bit
    # weights + pairwise adds. Dynamic counts under qemu (ARMv8.0): pack_rows(sign, mean) 128 x 768
    # 2.46 instructions per element (reference compute 6.17); pack_rows(nonzero) 3072 x 128 2.07 (12.68).
    for op in ("pack_rows", "pack_cols", "absmax_planes"):
        for kernel_set in ("arm64", "arm64-dotprod"):
            register_kernel(kernel_set, op)(getattr(host, op))


_register()
