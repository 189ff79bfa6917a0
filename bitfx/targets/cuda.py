"""How bitfx kernels run on CUDA GPUs: binary tensor cores (``mma ... b1.b1.s32.and.popc``) and CUDA cores.

``codegen/compute.py`` says *what* each kernel computes; this file generates the CUDA loop nests (TVMScript,
IR builder) with the same buffers in the same order, so one runtime call serves every kernel set. Two sets:

- ``"cuda"``: ``gemm`` on binary tensor cores, ``mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc``
  (sm_80 and later). Only AND exists on Hopper (no XOR-popc on sm_90, no b1 ``wgmma``), so XOR goes through
  the identity (DESIGN §2)::

      popc(a ^ w) = popc(a) + popc(w) - 2 popc(a & w)

  ``popc(a)`` (per row) and ``popc(w)`` (per column) are counted on the CUDA cores from the fragment registers
  the thread already holds, beside the tensor-core work, and summed over the warp with shuffles at the end.
- ``"cuda-popc"``: ``gemm`` on CUDA cores (``__popcll`` per 64-bit word, one thread per output column and
  ``rows`` rows). Weights are K-major (``[KW, N]``), so a warp reads 32 consecutive columns of one word:
  coalesced, the layout of a memory-bound GEMV. For M=1 decode, and for GPUs without b1 tensor cores.

Both sets share the packing kernels: ``pack_rows`` (sign-and-pack of activations in one pass: each warp reads
32 consecutive values per step and ``__ballot_sync`` makes the word; ``mean`` adds ``mean|x + move|`` from
the same read), ``pack_cols``, ``absmax_planes`` (BitNet codes, one ballot per plane).

Fragments of ``m16n8k256`` (PTX ISA, "Matrix Fragments for mma.m16n8k256"): lane = 4 * groupID + tid, each
register holds 32 b1 elements, element j in bit j. ``a_fragment``, ``b_fragment`` and ``c_fragment`` below are
those index maps; the generator uses them symbolically, ``tests/targets/test_cuda_fragments.py`` checks them
against the ISA and replays the kernel's arithmetic in NumPy with them. Packed uint64 words are read as pairs
of uint32 (little-endian: the low half holds elements 64w .. 64w+31), so an m16n8k256 tile spans 4 words.
"""
from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from bitfx.targets.host import _bit_predicate, _when

# Bump when a generator below changes the code it emits (part of every CUDA kernel-cache key).
SCHEDULE_VERSION = 3

WORD = 64
MMA_SHAPE = "m16n8k256"
MMA_INSTRUCTION = "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc"
ARCHS = ("sm_80", "sm_90")
UNROLL_MMA = 16  # k-steps (x planes) of 256 bits unrolled in the tensor-core GEMM
UNROLL_POPC = 64  # words (x planes) unrolled in the CUDA-core GEMM
_GEMM_MODES = ("xnor", "xnor_ternary", "and", "and_ternary")
_FULL = 0xFFFFFFFF


# ------------------------------------------------------------------------------ fragment index maps
def a_fragment(lane, reg):
    """A (16 x 256, row-major): register ``reg`` (0..3) of ``lane`` -> (row, u32 word along K) in the tile."""
    g, t = lane // 4, lane % 4
    return g + 8 * (reg % 2), t + 4 * (reg // 2)


def b_fragment(lane, reg):
    """B (256 x 8, column-major): register ``reg`` (0..1) of ``lane`` -> (column, u32 word along K)."""
    g, t = lane // 4, lane % 4
    return g, t + 4 * reg


def c_fragment(lane, reg):
    """C/D (16 x 8, int32): register ``reg`` (0..3) of ``lane`` -> (row, column) in the tile."""
    g, t = lane // 4, lane % 4
    return g + 8 * (reg // 2), 2 * t + reg % 2


def a_word_index(g, row, b, u, *, M, planes, kw):
    """Flat uint32 index of word ``u`` of plane ``b`` of activation row ``row`` (group ``g``) in ``a``."""
    return ((g * M + row) * planes + b) * (kw * 2) + u


def w_word_index(g, p, col, u, *, chains, kw, N):
    """Flat uint32 index of word ``u`` (along K) of column ``col`` of weight plane ``p`` in K-major ``w``."""
    return ((g * chains + p) * kw + u // 2) * N * 2 + col * 2 + u % 2


@dataclass(frozen=True)
class MmaTile:
    """Tensor-core tiling: each warp owns ``mt`` x ``nt`` mma tiles (16 x 8); ``warps`` warps side by side in N."""

    mt: int = 2
    nt: int = 4
    warps: int = 4

    @property
    def rows(self) -> int:
        return 16 * self.mt

    @property
    def cols(self) -> int:
        return 8 * self.nt * self.warps


# --------------------------------------------------------------------------------------------- helpers
def _u32(v: int):
    return tirx.const(v, "uint32")


def _i32(v: int):
    return tirx.const(v, "int32")


def _build(body, name: str) -> tirx.PrimFunc:
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            # scheduled already: Relax's GPU pipeline (dlight) must leave it as it is
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            body()
    return ib.get()


def _match(handle, shape, dtype: str):
    buf = T.match_buffer(handle, shape, dtype, align=tvm.DataType(dtype).bits // 8)
    IRBuilder.name(handle.name, buf)  # the CUDA kernel's parameters keep the buffers' names
    return buf


def _flat32(buf, words):
    """A uint64 buffer seen as ``2 * words`` uint32 (the same memory, the same parameter name)."""
    view = T.decl_buffer((words * 2,), "uint32", data=buf.data)
    IRBuilder.name(buf.name, view)
    return view


def _ballot(pred):
    return T.call_extern("uint32", "__ballot_sync", _u32(_FULL), pred)


def _shfl_xor(value, mask: int, dtype: str):
    return T.call_extern(dtype, "__shfl_xor_sync", _u32(_FULL), value, _i32(mask), _i32(32))


def _shfl(value, lane, dtype: str = "int32"):
    return T.call_extern(dtype, "__shfl_sync", _u32(_FULL), value, lane, _i32(32))


def _local(n: int, dtype: str):
    return T.alloc_buffer((n,), dtype, scope="local")


def _store(buf, value, idx) -> None:
    T.buffer_store(buf, value, [idx] if not isinstance(idx, (list, tuple)) else list(idx))


def _dim(name: str, static):
    return tirx.Var(name, "int64") if static is None else static


def _bit_pred(mode: str, u, dtype: str):
    """(predicate, inverted) of one scalar: the host kernels' rule (``host._bit_predicate``), so that the
    packed bits are the same on every target (sign = NOT(u < 0): 0, -0, NaN -> 1)."""
    return _bit_predicate(mode, u, dtype, 1)


# --------------------------------------------------------------------------------------------- packing
def pack_rows(*, mode: str, K: int | None, dtype: str = "float32", move: bool = False,
              mean: bool = False, parallel: bool = True) -> tirx.PrimFunc:
    """``bits[m, w]`` = pack_k bit(x[m, k] (+ move[k])), one warp per row, one ``__ballot_sync`` per 32 values.

    Floating inputs (float32/16, bfloat16) are compared in float32 after adding ``move``; int8/uint8 as
    integers. With ``mean``: ``row_scale[m] = mean_k |x + move|`` from the same read (warp-shuffle sum).
    """
    del parallel
    _bit_pred(mode, tirx.const(0, "float32"), "float32")  # validates mode
    is_float = dtype.startswith(("float", "bfloat"))
    cdt = "float32" if is_float else dtype

    def body():
        x_h = T.arg("x", T.handle())
        mv_h = T.arg("move", T.handle()) if move else None
        out_h = T.arg("out", T.handle())
        rs_h = T.arg("row_scale", T.handle()) if mean else None
        M = tirx.Var("M", "int64")
        k = _dim("K", K)
        kw = (k + WORD - 1) // WORD
        X = _match(x_h, (M, k), dtype)
        MV = _match(mv_h, (k,), "float32") if move else None
        A = _match(out_h, (M, kw), "uint64")
        RS = _match(rs_h, (M,), "float32") if mean else None
        with T.launch_thread("blockIdx.x", M) as m:
            with T.launch_thread("threadIdx.x", 32) as lane:
                acc = _local(1, "float32") if mean else None
                if mean:
                    _store(acc, tirx.const(0.0, "float32"), 0)
                word = _local(1, "uint64")
                with T.serial(0, kw) as w:
                    _store(word, tirx.const(0, "uint64"), 0)
                    for half in range(2):
                        idx = w * WORD + half * 32 + lane
                        valid = idx < k
                        raw = tirx.if_then_else(valid, X[m, idx], tirx.const(0, dtype))
                        u = raw.astype(cdt) if is_float and dtype != "float32" else raw
                        if move:
                            u = u + tirx.if_then_else(valid, MV[idx], tirx.const(0.0, "float32"))
                        pred, inverted = _bit_pred(mode, u, cdt)
                        bits = ~_ballot(tirx.Or(pred, tirx.Not(valid))) if inverted else _ballot(
                            tirx.And(pred, valid))
                        _store(word, word[0] | (bits.astype("uint64") << tirx.const(32 * half, "uint64")), 0)
                        if mean:
                            _store(acc, acc[0] + T.abs(u), 0)
                    _when(lane == 0, lambda: _store(A, word[0], [m, w]))
                if mean:
                    for s in (16, 8, 4, 2, 1):
                        _store(acc, acc[0] + _shfl_xor(acc[0], s, "float32"), 0)
                    kf = k.astype("float32") if K is None else tirx.const(K, "float32")
                    _when(lane == 0, lambda: _store(RS, acc[0] / kf, [m]))

    return _build(body, "pack_rows")


def pack_cols(*, K: int | None, N: int, batched: bool = True, parallel: bool = True) -> tirx.PrimFunc:
    """``bits[g, w, n]`` = pack_k sign(x[g, k, n]) down the columns, one thread per (g, w, n) (coalesced in n)."""
    del parallel
    threads = 128

    def body():
        x_h, out_h = T.arg("x", T.handle()), T.arg("out", T.handle())
        G = tirx.Var("G", "int64") if batched else 1
        k = _dim("K", K)
        kw = (k + WORD - 1) // WORD
        X = _match(x_h, (G, k, N) if batched else (k, N), "float32")
        A = _match(out_h, (G, kw, N) if batched else (kw, N), "uint64")
        with T.launch_thread("blockIdx.z", G) as g, T.launch_thread("blockIdx.y", kw) as w, \
                T.launch_thread("blockIdx.x", (N + threads - 1) // threads) as bx, \
                T.launch_thread("threadIdx.x", threads) as tx:
            n = bx * threads + tx
            pre = [g] if batched else []
            word = _local(1, "uint64")
            _store(word, tirx.const(0, "uint64"), 0)

            def pack():
                with T.serial(0, WORD) as j:
                    kk = w * WORD + j
                    neg = tirx.Or(kk >= k, X[(*pre, tirx.Min(kk, k - 1), n)] < tirx.const(0.0, "float32"))
                    bit = tirx.Select(neg, tirx.const(0, "uint64"), tirx.const(1, "uint64") << j.astype("uint64"))
                    _store(word, word[0] | bit, 0)
                _store(A, word[0], [*pre, w, n])

            _when(n < N, pack)

    return _build(body, "pack_cols")


def absmax_planes(*, K: int, bits: int, parallel: bool = True) -> tirx.PrimFunc:
    """BitNet absmax codes in ``bits`` two's-complement planes ``[M, bits, KW]``, one warp per row.

    gamma = max(max_k |x|, 1e-5); inv = (1 / gamma) * Qp (as torch evaluates ``Qp / gamma``);
    q = clamp(nearbyint(x * inv), -Qp-1, Qp); plane b word = ballot(bit b of q); row_scale = 1 / inv.
    """
    del parallel
    qp = float(2 ** (bits - 1) - 1)
    kw = (K + WORD - 1) // WORD
    f32 = lambda v: tirx.const(v, "float32")  # noqa: E731

    def body():
        x_h, p_h, rs_h = T.arg("x", T.handle()), T.arg("planes", T.handle()), T.arg("row_scale", T.handle())
        M = tirx.Var("M", "int64")
        X = _match(x_h, (M, K), "float32")
        P = _match(p_h, (M, bits, kw), "uint64")
        RS = _match(rs_h, (M,), "float32")
        with T.launch_thread("blockIdx.x", M) as m:
            with T.launch_thread("threadIdx.x", 32) as lane:
                mx = _local(1, "float32")
                _store(mx, f32(0.0), 0)
                with T.serial(0, (K + 31) // 32) as s:
                    idx = s * 32 + lane
                    v = tirx.if_then_else(idx < K, T.abs(X[m, tirx.Min(idx, K - 1)]), f32(0.0))
                    _store(mx, T.max(mx[0], v), 0)
                for s in (16, 8, 4, 2, 1):
                    _store(mx, T.max(mx[0], _shfl_xor(mx[0], s, "float32")), 0)
                inv = T.bind((f32(1.0) / T.max(mx[0], f32(1e-5))) * f32(qp))
                _when(lane == 0, lambda: _store(RS, f32(1.0) / inv, [m]))
                words = _local(bits, "uint64")
                with T.serial(0, kw) as w:
                    for b in range(bits):
                        _store(words, tirx.const(0, "uint64"), b)
                    for half in range(2):
                        idx = w * WORD + half * 32 + lane
                        x = tirx.if_then_else(idx < K, X[m, tirx.Min(idx, K - 1)], f32(0.0))
                        q = T.bind(T.max(T.min(T.nearbyint(x * inv), f32(qp)), f32(-qp - 1)).astype("int32"))
                        for b in range(bits):
                            plane = _ballot(((q >> _i32(b)) & _i32(1)) != _i32(0))
                            _store(words, words[b] | (plane.astype("uint64") << tirx.const(32 * half, "uint64")), b)

                    def write():
                        for b in range(bits):
                            _store(P, words[b], [m, b, w])

                    _when(lane == 0, write)

    return _build(body, "absmax_planes")


# --------------------------------------------------------------------------------------- GEMM shapes
_OUT_DTYPES = ("float32", "float16", "bfloat16")


def _gemm_args(mode, K, N, planes, batched, epilogue, bias, out_dtype="float32"):
    """Declare the GEMM's buffers exactly as ``compute.gemm`` does; returns a namespace of them.

    ``out_dtype`` (float epilogue only) is the one CUDA extension: the epilogue computes in float32 and
    rounds once into float16/bfloat16, as the reference's final ``.to(dtype)`` does, so a half-precision
    model's output is written once, in half (no float32 round trip through memory, no cast kernel).
    """
    if out_dtype not in _OUT_DTYPES or (out_dtype != "float32" and epilogue != "float"):
        raise ValueError(f"out_dtype={out_dtype!r} with epilogue={epilogue!r}; expected one of {_OUT_DTYPES} "
                         "(half precision only with the float epilogue)")
    if mode not in _GEMM_MODES:
        raise ValueError(f"unknown GEMM mode {mode!r}; expected one of {_GEMM_MODES}")
    if mode.startswith("xnor") and (K is None or planes != 1):
        raise ValueError(f"mode {mode!r} needs a static K and one activation plane")
    ternary = mode.endswith("ternary")
    a_h, w_h = T.arg("a", T.handle()), T.arg("w", T.handle())
    nz_h = T.arg("nnz", T.handle()) if mode == "xnor_ternary" else None
    rs_h = cs_h = b_h = None
    if epilogue == "float":
        rs_h, cs_h = T.arg("row_scale", T.handle()), T.arg("col_scale", T.handle())
        b_h = T.arg("bias", T.handle()) if bias else None
    out_h = T.arg("out", T.handle())
    G = tirx.Var("G", "int64") if batched else 1
    M = tirx.Var("M", "int64")
    n = _dim("N", N)
    kw = tirx.Var("KW", "int64") if K is None else (K + WORD - 1) // WORD
    bat = [G] if batched else []
    P = [planes] if planes > 1 else []
    ns = dict(G=G, M=M, N=n, KW=kw, batched=batched, ternary=ternary, planes=planes)
    ns["A"] = _match(a_h, (*bat, M, *P, kw), "uint64")
    ns["W"] = _match(w_h, (*bat, *([2] if ternary else []), kw, n), "uint64")
    ns["NZ"] = _match(nz_h, (n,), "int32") if nz_h is not None else None
    ns["O"] = _match(out_h, (*bat, M, n), out_dtype if epilogue == "float" else "int32")
    ns["RS"] = _match(rs_h, (M,), "float32") if rs_h is not None else None
    ns["CS"] = _match(cs_h, (n,), "float32") if cs_h is not None else None
    ns["BI"] = _match(b_h, (n,), "float32") if b_h is not None else None
    return type("GemmArgs", (), ns)


def _finish(args, val, g, row, col, K):
    """The float epilogue (or the int32 result) stored at (g, row, col)."""
    if args.RS is not None:
        val = (val.astype("float32") * args.RS[row]) * args.CS[col]
        if args.BI is not None:
            val = val + args.BI[col]
        val = val.astype(args.O.dtype)
    _store(args.O, val, [*([g] if args.batched else []), row, col])


# ------------------------------------------------------------------------------ GEMM on tensor cores
def gemm(*, mode: str, K: int | None, N: int | None, planes: int = 1, signed: bool = True,
         batched: bool = False, epilogue: str = "int", bias: bool = False, tile: MmaTile | None = None,
         parallel: bool = True, out_dtype: str = "float32") -> tirx.PrimFunc:
    """``acc[m, n] = sum_k a[m, k] * w[n, k]`` on binary tensor cores (modes as ``bitfx.targets.host.gemm``).

    Per k-step of 256 bits a warp loads ``mt`` A fragments and ``nt`` B fragments straight from the packed
    uint64 buffers (read as uint32) and issues ``mt * nt`` AND-popc mma. With P = popc(a & w) accumulated:

      xnor          acc = K - 2 (popc(a) + popc(w0) - 2 P0)
      xnor_ternary  acc = nnz_n - 2 (popc(w0) - P0 + P1)        [(a^w0)&(w0|w1) with w0, w1 disjoint]
      and           acc = sum_b c_b (2 P_b - popc(p_b))          [Horner over planes, top plane first]
      and_ternary   acc = sum_b c_b (P0_b - P1_b)
    Rows past M, columns past N and words past KW load as zero (they add nothing); stores are guarded.
    """
    del parallel
    tile = tile or MmaTile()
    mt, nt, warps = tile.mt, tile.nt, tile.warps

    def body():
        a = _gemm_args(mode, K, N, planes, batched, epilogue, bias, out_dtype)
        G, M, n, kw, P = a.G, a.M, a.N, a.KW, planes
        A32 = _flat32(a.A, G * M * P * kw)
        W32 = _flat32(a.W, G * (2 if a.ternary else 1) * kw * n)
        chains = 2 if a.ternary else 1
        need_rpop = mode in ("xnor", "and")
        need_cpop = mode in ("xnor", "xnor_ternary")
        ksteps = (kw + 3) // 4
        ragged_k = K is None or ((K + WORD - 1) // WORD) % 4 != 0
        with T.launch_thread("blockIdx.z", G) as g, \
                T.launch_thread("blockIdx.y", (M + tile.rows - 1) // tile.rows) as by, \
                T.launch_thread("blockIdx.x", (n + tile.cols - 1) // tile.cols) as bx, \
                T.launch_thread("threadIdx.x", 32 * warps) as tx:
            lane, warp = tx % 32, tx // 32
            m0 = by * tile.rows
            n0 = bx * tile.cols + warp * (8 * nt)
            acc = [_local(mt * nt * 4, "int32") for _ in range(chains)]
            rpop = _local(2 * mt, "int32") if need_rpop else None
            cpop = _local(nt, "int32") if need_cpop else None
            af = _local(4 * mt, "uint32")
            bf = [_local(2 * nt, "uint32") for _ in range(chains)]
            for c in range(chains):
                for i in range(mt * nt * 4):
                    _store(acc[c], _i32(0), i)
            for i in range(2 * mt if need_rpop else 0):
                _store(rpop, _i32(0), i)
            for j in range(nt if need_cpop else 0):
                _store(cpop, _i32(0), j)

            def a_index(row, b, u):
                return a_word_index(g, row, b, u, M=M, planes=P, kw=kw)

            def w_index(p, col, u):
                return w_word_index(g, p, col, u, chains=chains, kw=kw, N=n)

            for b in reversed(range(P)):  # Horner over activation planes, top plane first
                if b != P - 1:
                    for c in range(chains):
                        for i in range(mt * nt * 4):
                            _store(acc[c], acc[c][i] * _i32(2), i)
                    for i in range(2 * mt if need_rpop else 0):
                        _store(rpop, rpop[i] * _i32(2), i)
                # unrolled when short (static K): nvcc can then issue the next k-step's loads early
                with (T.unroll if K is not None and ksteps * P <= UNROLL_MMA else T.serial)(0, ksteps) as ks:
                    for i in range(mt):
                        for r in range(4):
                            row, u = a_fragment(lane, r)
                            row, u = m0 + 16 * i + row, ks * 8 + u
                            ok = tirx.And(row < M, u < kw * 2) if ragged_k else row < M
                            val = tirx.if_then_else(ok, A32[a_index(tirx.Min(row, M - 1), b, tirx.Min(u, kw * 2 - 1))],
                                                    _u32(0))
                            _store(af, val, 4 * i + r)
                            if need_rpop:
                                _store(rpop, rpop[2 * i + r % 2] + T.popcount(af[4 * i + r]).astype("int32"),
                                       2 * i + r % 2)
                    for j in range(nt):
                        for p in range(chains):
                            for r in range(2):
                                col, u = b_fragment(lane, r)
                                col, u = n0 + 8 * j + col, ks * 8 + u
                                ok = tirx.And(col < n, u < kw * 2) if ragged_k else col < n
                                val = tirx.if_then_else(
                                    ok, W32[w_index(p, tirx.Min(col, n - 1), tirx.Min(u, kw * 2 - 1))], _u32(0))
                                _store(bf[p], val, 2 * j + r)
                                if need_cpop and p == 0 and b == P - 1:
                                    _store(cpop, cpop[j] + T.popcount(bf[p][2 * j + r]).astype("int32"), j)
                        for i in range(mt):
                            for p in range(chains):
                                T.evaluate(T.ptx_legacy.mma(
                                    MMA_SHAPE, "row", "col", "int1", "int1", "int32",
                                    af.data, 4 * i, bf[p].data, 2 * j, acc[p].data, (i * nt + j) * 4, False,
                                    operator="and", dtype="int32"))
                if signed and P > 1 and b == P - 1:  # the top plane of a two's-complement code weighs -2^(P-1)
                    for c in range(chains):
                        for i in range(mt * nt * 4):
                            _store(acc[c], _i32(0) - acc[c][i], i)
                    for i in range(2 * mt if need_rpop else 0):
                        _store(rpop, _i32(0) - rpop[i], i)
            # Row and column popcounts: each lane holds a quarter of a row / a column; sum over the quad.
            for buf, size in ((rpop, 2 * mt), (cpop, nt)):
                if buf is None:
                    continue
                for i in range(size):
                    for s in (1, 2):
                        _store(buf, buf[i] + _shfl_xor(buf[i], s, "int32"), i)
            tq = lane % 4
            cpl = _local(2 * nt, "int32") if need_cpop else None
            for j in range(nt if need_cpop else 0):
                # the columns this lane stores (2t, 2t+1) were counted by quads 2t and 2t+1; every lane
                # shuffles here, outside the store guards (a partial warp in __shfl_sync is undefined)
                for h in range(2):
                    _store(cpl, _shfl(cpop[j], (2 * tq + h) * 4), 2 * j + h)
            for i in range(mt):
                for j in range(nt):
                    cps = [cpl[2 * j], cpl[2 * j + 1]] if need_cpop else [None, None]
                    for r in range(4):
                        rrow, rcol = c_fragment(lane, r)
                        row, col = m0 + 16 * i + rrow, n0 + 8 * j + rcol
                        s0 = acc[0][(i * nt + j) * 4 + r]
                        s1 = acc[1][(i * nt + j) * 4 + r] if a.ternary else None
                        if mode == "xnor":
                            val = _i32(K) - _i32(2) * (rpop[2 * i + r // 2] + cps[r % 2] - _i32(2) * s0)
                        elif mode == "xnor_ternary":  # nnz[col] is loaded under the store guard
                            val = a.NZ[col] - _i32(2) * (cps[r % 2] - s0 + s1)
                        elif mode == "and":
                            val = _i32(2) * s0 - rpop[2 * i + r // 2]
                        else:
                            val = s0 - s1

                        def emit(val=val, row=row, col=col):
                            _finish(a, val, g, row, col, K)

                        _when(tirx.And(row < M, col < n), emit)

    return _build(body, f"gemm_{mode}_mma")


# ------------------------------------------------------------------------------ GEMM on CUDA cores
def gemm_popc(*, mode: str, K: int | None, N: int | None, planes: int = 1, signed: bool = True,
              batched: bool = False, epilogue: str = "int", bias: bool = False, tile: int | None = None,
              parallel: bool = True, out_dtype: str = "float32") -> tirx.PrimFunc:
    """The same GEMM on CUDA cores: thread = one column x ``tile`` rows (default 4), ``__popcll`` per word.

    The formulas of ``bitfx.targets.host.gemm`` (XOR exists on CUDA cores): for M = 1 decode the weights,
    K-major, stream through coalesced: every weight word is read once per ``tile`` rows.
    """
    del parallel
    rows = tile or 4
    threads = 128

    def body():
        a = _gemm_args(mode, K, N, planes, batched, epilogue, bias, out_dtype)
        G, M, n, kw, P = a.G, a.M, a.N, a.KW, planes
        need_rterm = mode == "and"
        with T.launch_thread("blockIdx.z", G) as g, \
                T.launch_thread("blockIdx.y", (M + rows - 1) // rows) as by, \
                T.launch_thread("blockIdx.x", (n + threads - 1) // threads) as bx, \
                T.launch_thread("threadIdx.x", threads) as tx:
            col = bx * threads + tx
            m0 = by * rows
            pre = [g] if batched else []

            def compute():
                acc = _local(rows, "int32")
                rterm = _local(rows, "int32") if need_rterm else None
                for i in range(rows):
                    _store(acc, _i32(0), i)
                    if need_rterm:
                        _store(rterm, _i32(0), i)
                for b in reversed(range(P)):
                    neg = signed and P > 1 and b == P - 1
                    if b != P - 1:
                        for i in range(rows):
                            _store(acc, acc[i] * _i32(2), i)
                            if need_rterm:
                                _store(rterm, rterm[i] * _i32(2), i)
                    # unrolled when short: the weight loads of a column are independent, let them all fly
                    with (T.unroll if K is not None and kw * P <= UNROLL_POPC else T.serial)(0, kw) as w:
                        w0 = a.W[(*pre, *([0] if a.ternary else []), w, col)]
                        w1 = a.W[(*pre, 1, w, col)] if a.ternary else None
                        for i in range(rows):
                            m = tirx.Min(m0 + i, M - 1)
                            x = a.A[(*pre, m, *([b] if P > 1 else []), w)]
                            pc = lambda v: T.popcount(v).astype("int32")  # noqa: E731
                            if mode == "xnor":
                                term = pc(x ^ w0)
                            elif mode == "xnor_ternary":
                                term = pc((x ^ w0) & (w0 | w1))
                            elif mode == "and":
                                term = pc(x & w0)
                                _store(rterm, rterm[i] - pc(x) if neg else rterm[i] + pc(x), i)
                            else:
                                term = pc(x & w0) - pc(x & w1)
                            _store(acc, acc[i] - term if neg else acc[i] + term, i)
                for i in range(rows):
                    s = acc[i]
                    if mode == "xnor":
                        val = _i32(K) - _i32(2) * s
                    elif mode == "xnor_ternary":
                        val = a.NZ[col] - _i32(2) * s
                    elif mode == "and":
                        val = _i32(2) * s - rterm[i]
                    else:
                        val = s
                    _when(m0 + i < M, lambda val=val, i=i: _finish(a, val, g, m0 + i, col, K))

            _when(col < n, compute)

    return _build(body, f"gemm_{mode}_popc")


def _register() -> None:
    from bitfx.targets.registry import register_kernel

    for kernel_set, gemm_fn in (("cuda", gemm), ("cuda-popc", gemm_popc)):
        for op, fn in (("pack_rows", pack_rows), ("pack_cols", pack_cols), ("absmax_planes", absmax_planes),
                       ("gemm", gemm_fn)):
            register_kernel(kernel_set, op)(fn)


_register()
