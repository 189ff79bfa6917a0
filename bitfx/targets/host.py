"""How bitfx kernels run on the host CPU (x86-64 first, any LLVM host works).

`codegen/compute.py` says *what* each kernel computes (plain `te.compute`). This file says *how* it runs
here: the LLVM target for this machine, and small generators of explicit loop nests, because in TVM 0.27
`s_tir` refuses `vectorize` on a spatial loop that sits inside a reduction (DESIGN §5).

The binary GEMM keeps a `rows x cols` tile of int64 accumulators in registers: 8 consecutive output columns
of packed weight words fill one 512-bit register; each activation word is broadcast, then `xor`/`and` ->
`vpopcntq` -> add. A linear layer's packed weight is stored in *panels* (`layout="panel"`,
`[ceil(N/32), KW, 32]` uint64: column-block major, each block's K words contiguous, N padded with zero
columns that are never stored), so the GEMM reads it front to back; at M = 1 (decode) each word is used
once and the kernel is a stream over the weight. The K-major layout (`[KW, N]`, a weight row of N words
per K word) stays for the attention GEMMs, whose "weights" are activations packed per call. Each accumulator
row is its own stack buffer: TVM moves an allocation of 1 KiB or more to the heap workspace, after which LLVM
can no longer keep it in registers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import tvm
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T
from tvm.target import codegen

# Bump when a generator below changes the code it emits: it is part of every kernel-cache key.
SCHEDULE_VERSION = 3

WORD = 64  # bits per packed word
PANEL = 32  # output columns per weight panel (layout="panel"); every tile width divides it
_LAYOUTS = ("kmajor", "panel")
_GEMM_MODES = ("xnor", "xnor_ternary", "and", "and_ternary")


@functools.cache
def host_target() -> tvm.target.Target:
    """The LLVM target of this CPU, with `mcpu` set so LLVM may use `vpopcntq`, AVX-512, AVX2..."""
    return tvm.target.Target(
        {"kind": "llvm", "mtriple": codegen.llvm_get_system_triple(), "mcpu": codegen.llvm_get_system_cpu()}
    )


def has_feature(name: str, target: tvm.target.Target | None = None) -> bool:
    """Whether LLVM's view of `target` (default: this host) has a CPU feature, e.g. "avx512vpopcntdq"."""
    return bool(codegen.llvm_cpu_has_features([name], target or host_target()))


@dataclass(frozen=True)
class Tile:
    """Register tile of the GEMM: `rows` activation rows x `cols` output columns (int64 lanes)."""

    rows: int
    cols: int


@functools.cache
def gemm_tile(target: tvm.target.Target | None = None) -> Tile:
    """4 x 32 on AVX-512 (16 zmm accumulators), 3 x 16 on 256-bit vectors (12 ymm), 2 x 8 otherwise."""
    width = codegen.llvm_get_vector_width(target or host_target())
    if width >= 512:
        return Tile(4, 32)
    if width >= 256:
        return Tile(3, 16)
    return Tile(2, 8)


# --------------------------------------------------------------------------------------------- helpers
def _u64(v: int) -> tirx.PrimExpr:
    return tirx.const(v, "uint64")


def _vec_store(buf, value, index_prefix, lanes: int, start) -> None:
    T.buffer_store(buf, value, [*index_prefix, T.ramp(start, 1, lanes)])


def _vec_load(buf, index_prefix, lanes: int, start):
    return tirx.BufferLoad(buf, [*index_prefix, T.ramp(start, 1, lanes)])


def _mask_word(cond_vec) -> tirx.PrimExpr:
    """A 64-lane bool vector as one uint64 word, lane j -> bit j (LLVM: compare into k-masks)."""
    return T.reinterpret("uint64", tirx.Cast("uint1x64", cond_vec))


def _bit_predicate(mode: str, value, dtype: str, lanes: int):
    """`(cond, inverted)`: the packed bit is `cond`, or NOT `cond` when `inverted`.

    "sign" is NOT(u < 0), so sign(0) = +1 and NaN -> +1; it is spelled as an inverted `<` because TVM's
    simplifier rewrites `!(u < 0)` to `u >= 0`, which is wrong for NaN.
    """
    zero = _zero(dtype, lanes)
    if mode == "sign":
        return value < zero, True
    if mode == "pos":
        return value > zero, False
    if mode == "neg":
        return value < zero, False
    if mode == "nonzero":
        return value != zero, False
    raise ValueError(f"unknown bit mode {mode!r}; expected sign, pos, neg or nonzero")


def _packed_word(mode: str, value, dtype: str):
    cond, inverted = _bit_predicate(mode, value, dtype, WORD)
    word = _mask_word(cond)
    return ~word if inverted else word


def _packed_bytes(mode: str, value, dtype: str, lanes: int):
    """`lanes` (a multiple of 8) packed bits as `lanes/8` bytes (uint8, or a uint8 vector), lane j -> bit j % 8 of
    byte j // 8: the bytes of `_packed_word`'s word, in memory order (little-endian)."""
    cond, inverted = _bit_predicate(mode, value, dtype, lanes)
    n = lanes // 8
    word = T.reinterpret("uint8" if n == 1 else f"uint8x{n}", tirx.Cast(f"uint1x{lanes}", cond))
    return ~word if inverted else word


def _packed_bit(mode: str, value, dtype: str, j):
    cond, inverted = _bit_predicate(mode, value, dtype, 1)
    one = _u64(1) << j.astype("uint64")
    return tirx.Select(cond, _u64(0), one) if inverted else tirx.Select(cond, one, _u64(0))


def _zero(dtype: str, lanes: int = 1):
    z = tirx.const(0, dtype)
    return z if lanes == 1 else T.broadcast(z, lanes)


def _match(handle, shape, dtype: str):
    """Bind an argument buffer. Only element alignment is assumed: torch views (x[1:], ...) may start
    anywhere, and TVM's default of 64 bytes would let LLVM emit aligned loads that fault on them."""
    return T.match_buffer(handle, shape, dtype, align=tvm.DataType(dtype).bits // 8)


def _outer(parallel: bool, extent):
    """The outermost loop: TVM's thread pool, or serial (`threads=1` callers skip the pool entirely)."""
    return T.parallel(0, extent) if parallel else T.serial(0, extent)


def _when(cond, emit) -> None:
    """Emit `emit()` under `cond`: statically when `cond` is a Python bool, else as a TIR `if`."""
    if isinstance(cond, bool):
        if cond:
            emit()
        return
    with T.If(cond):
        with T.Then():
            emit()


def _build(body, name: str) -> tirx.PrimFunc:
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            T.func_attr({"tir.noalias": True})
            body()
    return ib.get()


# --------------------------------------------------------------------------------------- float math
def _fc(v, lanes: int = 1):
    c = tirx.const(v, "float32")
    return T.broadcast(c, lanes) if lanes > 1 else c


def fast_exp(x, lanes: int = 1):
    """exp(x) in float32 without libm (as topi's fast_exp: Cody-Waite range reduction, degree-7 polynomial,
    2^n by exponent bits); exp(-inf) and anything below -88.37 give exactly 0."""
    c = lambda v: _fc(v, lanes)  # noqa: E731
    xc = T.max(T.min(x, c(88.3762626647950)), c(-88.3762626647949))
    n = T.floor(xc * c(1.44269504088896341) + c(0.5))
    f = xc - n * c(0.6931471805)
    p = c(1.9875691500e-4)
    for coef in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * f + c(coef)
    y = p * f * f + f + c(1.0)
    i32 = "int32" if lanes == 1 else f"int32x{lanes}"
    bits = (n + c(127.0)).astype(i32) << (tirx.const(23, "int32") if lanes == 1 else T.broadcast(
        tirx.const(23, "int32"), lanes))
    e = y * T.reinterpret("float32" if lanes == 1 else f"float32x{lanes}", bits)
    return tirx.Select(x < c(-88.3762626647949), c(0.0), e)


def fast_erf(x):
    """erf(x) in float32 as a rational minimax approximation over [-4, 4] (Eigen's and TVM's `fast_erf`:
    odd degree-13 numerator, even degree-8 denominator, in x^2), +-1 beyond: one division, no exp, no libm;
    absolute error below 4.2e-7 (PyTorch's vectorised kernels: 1.5e-7, with an exp per value)."""
    xc = T.max(T.min(x, _fc(4.0)), _fc(-4.0))
    x2 = xc * xc
    p = _fc(-2.72614225801306e-10)
    for coef in (2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05, -7.34990630326855e-04,
                 -2.95459980854025e-03, -1.60960333262415e-02):
        p = p * x2 + _fc(coef)
    q = _fc(-1.45660718464996e-05)
    for coef in (-2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03, -1.42647390514189e-02):
        q = q * x2 + _fc(coef)
    return xc * p / q


def gelu(x):
    """GELU, exact form: ``x/2 * (1 + erf(x / sqrt 2))``, in the order inductor's C++ kernel evaluates it."""
    return (x * _fc(0.5)) * (fast_erf(x * _fc(0.7071067811865476)) + _fc(1.0))


#: Activations the GEMM's float epilogue can apply to its output (`gemm(activation=...)`).
ACTIVATIONS = {"none": None, "gelu": gelu}


# --------------------------------------------------------------------------------------------- packing
def pack_rows(*, mode: str, K: int | None, dtype: str = "float32", move: bool = False,
              mean: bool = False, parallel: bool = True) -> tirx.PrimFunc:
    """`x[M, K] -> bits[M, ceil(K/64)]` uint64, bit j of word w = predicate(x[m, 64w + j] (+ move)).

    With `mean`, also `row_scale[M] = mean_k |x + move|` from the same pass over x. `K=None` makes K
    symbolic (attention probabilities, packed along the key length). Tail bits are zero.
    """

    def body():
        x_h = T.arg("x", T.handle())
        mv_h = T.arg("move", T.handle()) if move else None
        out_h = T.arg("out", T.handle())
        rs_h = T.arg("row_scale", T.handle()) if mean else None
        M = tirx.Var("M", "int64")
        k = tirx.Var("K", "int64") if K is None else K
        kw = (k + WORD - 1) // WORD
        X = _match(x_h, (M, k), dtype)
        MV = _match(mv_h, (k,), "float32") if move else None
        A = _match(out_h, (M, kw), "uint64")
        RS = _match(rs_h, (M,), "float32") if mean else None

        def value(m, start, lanes):
            v = _vec_load(X, [m], lanes, start) if lanes > 1 else X[m, start]
            if move:
                v = v + (_vec_load(MV, [], lanes, start) if lanes > 1 else MV[start])
            return v

        with _outer(parallel, M) as m:
            if mean:
                acc = T.alloc_buffer((16,), "float32")
                _vec_store(acc, _zero("float32", 16), [], 16, 0)
            with T.serial(0, k // WORD) as w:
                T.buffer_store(A, _packed_word(mode, value(m, w * WORD, WORD), dtype), [m, w])
                if mean:
                    for c in range(WORD // 16):
                        u = value(m, w * WORD + c * 16, 16)
                        _vec_store(acc, _vec_load(acc, [], 16, 0) + T.abs(u), [], 16, 0)
            tail = k % WORD

            def pack_tail():
                word = T.alloc_buffer((1,), "uint64")
                T.buffer_store(word, _u64(0), [0])
                base = k - tail
                with T.serial(0, tail) as j:
                    u = value(m, base + j, 1)
                    bit = _packed_bit(mode, u, dtype, j)
                    T.buffer_store(word, word[0] | bit, [0])
                    if mean:
                        T.buffer_store(acc, acc[0] + T.abs(u), [0])
                T.buffer_store(A, word[0], [m, k // WORD])

            _when(tail > 0, pack_tail)
            if mean:
                total = acc[0]
                for i in range(1, 16):
                    total = total + acc[i]
                T.buffer_store(RS, total / (k.astype("float32") if K is None else tirx.const(K, "float32")), [m])

    return _build(body, "pack_rows")


def pack_cols(*, K: int | None, N: int, batched: bool = True, parallel: bool = True) -> tirx.PrimFunc:
    """`x[G, K, N] -> bits[G, ceil(K/64), N]`, sign packed *down* the columns (K-major, for P.V's values).

    Bit j of word `[g, w, n]` is `NOT(x[g, 64w + j, n] < 0)`; tail bits are zero.
    """
    chunk = min(N, 64)

    def body():
        x_h = T.arg("x", T.handle())
        out_h = T.arg("out", T.handle())
        G = tirx.Var("G", "int64") if batched else 1
        k = tirx.Var("K", "int64") if K is None else K
        kw = (k + WORD - 1) // WORD
        X = _match(x_h, (G, k, N) if batched else (k, N), "float32")
        A = _match(out_h, (G, kw, N) if batched else (kw, N), "uint64")
        with _outer(parallel, G * kw) as t:
            g, w = t // kw, t % kw
            pre = [g] if batched else []
            rows = T.bind(tirx.Min(k - w * WORD, tirx.const(WORD, "int64")))
            for n0 in range(0, N, chunk):
                lanes = min(chunk, N - n0)
                acc = T.alloc_buffer((lanes,), "uint64")
                _vec_store(acc, _zero("uint64", lanes), [], lanes, 0)
                with T.serial(0, rows) as j:
                    v = _vec_load(X, [*pre, w * WORD + j], lanes, n0)
                    one = T.broadcast(_u64(1) << j.astype("uint64"), lanes)
                    bit = tirx.Select(v < T.broadcast(tirx.const(0.0, "float32"), lanes), _zero("uint64", lanes), one)
                    _vec_store(acc, _vec_load(acc, [], lanes, 0) | bit, [], lanes, 0)
                _vec_store(A, _vec_load(acc, [], lanes, 0), [*pre, w], lanes, n0)

    return _build(body, "pack_cols")


def absmax_planes(*, K: int, bits: int, parallel: bool = True) -> tirx.PrimFunc:
    """BitNet absmax quantizer, per row, into `bits` two's-complement bit planes `[M, bits, KW]`.

    gamma = max(max_k |x|, 1e-5); inv = Qp / gamma; q = clamp(nearbyint(x * inv), -Qp-1, Qp);
    plane b holds bit b of q; row_scale = 1 / inv.  (Qp = 2^(bits-1) - 1; nearbyint is half-to-even.)
    `Qp / gamma` is evaluated as torch evaluates `int / tensor`: `(1 / gamma) * Qp`, so codes match.
    """
    qp = float(2 ** (bits - 1) - 1)
    kw = (K + WORD - 1) // WORD

    def body():
        x_h, p_h, rs_h = T.arg("x", T.handle()), T.arg("planes", T.handle()), T.arg("row_scale", T.handle())
        M = tirx.Var("M", "int64")
        X = _match(x_h, (M, K), "float32")
        P = _match(p_h, (M, bits, kw), "uint64")
        RS = _match(rs_h, (M,), "float32")
        f32 = lambda v: tirx.const(v, "float32")  # noqa: E731

        def quant(v, inv, lanes):
            bc = (lambda s: T.broadcast(f32(s), lanes)) if lanes > 1 else f32
            q = T.nearbyint(v * (T.broadcast(inv, lanes) if lanes > 1 else inv))
            return T.max(T.min(q, bc(qp)), bc(-qp - 1)).astype("int32" if lanes == 1 else f"int32x{lanes}")

        with _outer(parallel, M) as m:
            mx = T.alloc_buffer((16,), "float32")
            _vec_store(mx, _zero("float32", 16), [], 16, 0)
            with T.serial(0, K // 16) as c:
                _vec_store(mx, T.max(_vec_load(mx, [], 16, 0), T.abs(_vec_load(X, [m], 16, c * 16))), [], 16, 0)
            for j in range(K - K % 16, K):
                T.buffer_store(mx, T.max(mx[0], T.abs(X[m, j])), [0])
            gamma = mx[0]
            for i in range(1, 16):
                gamma = T.max(gamma, mx[i])
            inv = T.bind((f32(1.0) / T.max(gamma, f32(1e-5))) * f32(qp))  # as torch's `qp / gamma`
            T.buffer_store(RS, f32(1.0) / inv, [m])
            with T.serial(0, K // WORD) as w:
                q = quant(_vec_load(X, [m], WORD, w * WORD), inv, WORD)
                for b in range(bits):
                    plane = (q >> T.broadcast(tirx.const(b, "int32"), WORD)) & T.broadcast(tirx.const(1, "int32"), WORD)
                    T.buffer_store(P, _mask_word(plane != _zero("int32", WORD)), [m, b, w])
            if K % WORD:
                words = T.alloc_buffer((bits,), "uint64")
                for b in range(bits):
                    T.buffer_store(words, _u64(0), [b])
                with T.serial(0, K % WORD) as j:
                    q = quant(X[m, K - K % WORD + j], inv, 1)
                    for b in range(bits):
                        bit = ((q >> b) & 1).astype("uint64") << j.astype("uint64")
                        T.buffer_store(words, words[b] | bit, [b])
                for b in range(bits):
                    T.buffer_store(P, words[b], [m, b, K // WORD])

    return _build(body, "absmax_planes")


# --------------------------------------------------------------------------------------------- GEMM
def gemm(*, mode: str, K: int | None, N: int | None, planes: int = 1, signed: bool = True,
         batched: bool = False, epilogue: str = "int", bias: bool = False,
         tile: Tile | None = None, parallel: bool = True, layout: str = "kmajor",
         row_chunk: int = 0, activation: str = "none", out_move: bool = False) -> tirx.PrimFunc:
    """Bit-serial GEMM `acc[m, n] = sum_k a[m, k] * w[n, k]` on packed words, tiled for registers.

    Weight layout: `layout="kmajor"`: `w[(2,) KW, N]`; `layout="panel"` (static N, not batched):
    `w[(2,) ceil(N/PANEL), KW, PANEL]`, word `[p, k, j]` = column `PANEL*p + j` (zero past N).
    Modes (a = activation bits, w0/w1 = weight planes):
      xnor          a, w in {+-1}:            acc = K - 2 popc(a ^ w0)
      xnor_ternary  a in {+-1}, w0=pos w1=neg: acc = nnz_n - 2 popc((a ^ w0) & (w0 | w1))
      and           `planes` activation planes x w in {+-1}: acc = sum_b c_b (2 popc(p_b & w0) - popc(p_b))
      and_ternary   planes x pos/neg weights:   acc = sum_b c_b (popc(p_b & w0) - popc(p_b & w1))
    c_b = 2^b, and -2^(planes-1) for the top plane when `signed` (two's complement).
    `epilogue="float"`: y = (float(acc) * row_scale[m]) * col_scale[n] (+ bias[n]), written once; with
    `activation="gelu"`, GELU(y) is written instead (the float glue's next op, fused: no pass over y).
    `epilogue="sign_bits"`: the next binary linear's sign-and-pack, fused: `u = act(y) (+ out_move[n])` is
    never written; `out` is `uint8[M, N/8]`, the bytes of the packed rows `uint64[M, N/64]` (bit j of word w
    = `NOT(u[m, 64w + j] < 0)`, as `pack_rows(mode="sign")` packs them). Needs a static N, a multiple of 64,
    not batched: every tile then covers whole bytes of one row.
    M (and G when `batched`) are symbolic; `K=None` makes the word count symbolic (and modes only),
    `N=None` makes N symbolic (its ragged tail then runs one column at a time).
    Walk of the full tiles: `row_chunk=0` runs every row block of a column block before the next column
    block (a weight block stays in L1; the output is written a column block at a time, rows apart);
    `row_chunk=c` takes c row blocks at a time through every column block (their activation words stay
    in L1, the output is written front to back, c*R rows at a time: a fresh output buffer then streams
    in instead of missing on every row, and a long M no longer evicts its own activation).
    """
    if mode not in _GEMM_MODES:
        raise ValueError(f"unknown GEMM mode {mode!r}; expected one of {_GEMM_MODES}")
    if mode.startswith("xnor") and (K is None or planes != 1):
        raise ValueError(f"mode {mode!r} needs a static K and one activation plane")
    if layout not in _LAYOUTS:
        raise ValueError(f"unknown weight layout {layout!r}; expected one of {_LAYOUTS}")
    panel = layout == "panel"
    if panel and (N is None or batched):
        raise ValueError(f"layout='panel' needs a static N and batched=False; got N={N}, batched={batched}")
    tile = tile or gemm_tile()
    R, C = tile.rows, tile.cols
    if panel and PANEL % C:
        raise ValueError(f"layout='panel' needs a tile width dividing {PANEL}; got {C}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown GEMM activation {activation!r}; expected one of {tuple(ACTIVATIONS)}")
    if epilogue not in ("int", "float", "sign_bits"):
        raise ValueError(f"unknown GEMM epilogue {epilogue!r}; expected 'int', 'float' or 'sign_bits'")
    bits_out = epilogue == "sign_bits"
    if activation != "none" and epilogue == "int":
        raise ValueError(f"activation={activation!r} needs epilogue='float' or 'sign_bits' (it applies to the "
                         "float output)")
    if bits_out and (N is None or N % WORD or batched):
        raise ValueError(f"epilogue='sign_bits' needs a static N that is a multiple of {WORD}, not batched; "
                         f"got N={N}, batched={batched}")
    if out_move and not bits_out:
        raise ValueError("out_move applies to epilogue='sign_bits' only (the next layer's move, before its sign)")
    if not isinstance(row_chunk, int) or row_chunk < 0:
        raise ValueError(f"row_chunk must be an int >= 0 (0: column-block major); got {row_chunk!r}")
    ternary = mode.endswith("ternary")

    def body():
        a_h, w_h = T.arg("a", T.handle()), T.arg("w", T.handle())
        nz_h = T.arg("nnz", T.handle()) if mode == "xnor_ternary" else None
        float_out = epilogue != "int"  # the float epilogue runs (its result written, or signed and packed)
        if float_out:
            rs_h, cs_h = T.arg("row_scale", T.handle()), T.arg("col_scale", T.handle())
            b_h = T.arg("bias", T.handle()) if bias else None
        mv_h = T.arg("out_move", T.handle()) if out_move else None
        out_h = T.arg("out", T.handle())
        G = tirx.Var("G", "int64") if batched else None
        M = tirx.Var("M", "int64")
        n = tirx.Var("N", "int64") if N is None else N
        kw = tirx.Var("KW", "int64") if K is None else (K + WORD - 1) // WORD
        bat = [G] if batched else []
        A = _match(a_h, (*bat, M, *([planes] if planes > 1 else []), kw), "uint64")
        w_cols = ((n + PANEL - 1) // PANEL, kw, PANEL) if panel else (kw, n)
        W = _match(w_h, (*bat, *([2] if ternary else []), *w_cols), "uint64")
        NZ = _match(nz_h, (n,), "int32") if nz_h is not None else None
        if bits_out:
            O = _match(out_h, (M, n // 8), "uint8")
        else:
            O = _match(out_h, (*bat, M, n), "float32" if float_out else "int32")
        MV = _match(mv_h, (n,), "float32") if out_move else None
        RS = CS = BI = None  # the float epilogue's vectors
        if float_out:
            RS = _match(rs_h, (M,), "float32")
            CS = _match(cs_h, (n,), "float32")
            BI = _match(b_h, (n,), "float32") if bias else None

        def a_word(g, m, b, w):
            return A[(*([g] if batched else []), m, *([b] if planes > 1 else []), w)]

        def w_word(g, p, w, col, at=None):
            """Weight word (plane p, K word w) of column `col`; `at` = (panel, offset in it) when panelled."""
            if at is not None:
                return W[(*([p] if ternary else []), at[0], w, at[1])]
            return W[(*([g] if batched else []), *([p] if ternary else []), w, col)]

        def emit_tile(g, rows, col0, width, at=None):
            """`rows` (consecutive row exprs) x `width` (static) columns starting at `col0`, accumulate, store.
            `at` = (panel, static offset): where the columns' words sit in the panel layout."""
            wat = (lambda j: (at[0], at[1] + j)) if at is not None else (lambda j: None)
            accs = [T.alloc_buffer((width,), "int64") for _ in rows]
            rterm = T.alloc_buffer((len(rows),), "int64") if mode == "and" else None
            for i, acc in enumerate(accs):
                with T.vectorized(0, width) as j:
                    T.buffer_store(acc, _zero("int64"), [j])
                if rterm is not None:
                    T.buffer_store(rterm, _zero("int64"), [i])
            for b in reversed(range(planes)):  # Horner over planes, top plane first
                neg = signed and planes > 1 and b == planes - 1
                if b != planes - 1:
                    for i, acc in enumerate(accs):
                        with T.vectorized(0, width) as j:
                            T.buffer_store(acc, acc[j] << _one64(), [j])
                        if rterm is not None:
                            T.buffer_store(rterm, rterm[i] << _one64(), [i])
                with T.serial(0, kw) as w:
                    for i, (m, acc) in enumerate(zip(rows, accs)):
                        a = a_word(g, m, b, w)
                        if rterm is not None:
                            pa = T.popcount(a).astype("int64")
                            T.buffer_store(rterm, rterm[i] - pa if neg else rterm[i] + pa, [i])
                        with T.vectorized(0, width) as j:
                            w0 = w_word(g, 0, w, col0 + j, wat(j))
                            if mode == "xnor":
                                term = T.popcount(a ^ w0)
                            elif mode == "xnor_ternary":
                                term = T.popcount((a ^ w0) & (w0 | w_word(g, 1, w, col0 + j, wat(j))))
                            elif mode == "and":
                                term = T.popcount(a & w0)
                            else:
                                term = T.popcount(a & w0).astype("int64") - T.popcount(
                                    a & w_word(g, 1, w, col0 + j, wat(j))).astype("int64")
                            term = term.astype("int64")
                            T.buffer_store(acc, acc[j] - term if neg else acc[j] + term, [j])
            # the float results go to the output, or (sign_bits) to a tile on the stack, signed and packed below
            dst = T.alloc_buffer((len(rows), width), "float32") if bits_out else None
            for i, (m, acc) in enumerate(zip(rows, accs)):
                with T.vectorized(0, width) as j:
                    col = col0 + j
                    val = gemm_output(mode, acc[j].astype("int32"), K, NZ, col, rterm[i] if rterm is not None else None,
                                      "float" if float_out else "int", RS, m, CS, BI)
                    if bits_out:
                        T.buffer_store(dst, val, [i, j])
                    else:
                        T.buffer_store(O, val, [*([g] if batched else []), m, col])
            if bits_out:
                # per row: u = act(y) (+ move) in place, then its `width` sign bits as width/8 bytes of the row
                fn = ACTIVATIONS[activation]
                with (T.unroll if len(rows) == R else T.serial)(0, len(rows)) as i:
                    with T.vectorized(0, width) as j:
                        u = dst[i, j] if fn is None else fn(dst[i, j])
                        T.buffer_store(dst, u + MV[col0 + j] if out_move else u, [i, j])
                    byte = _packed_bytes("sign", _vec_load(dst, [i], width, 0), "float32", width)
                    nbytes = width // 8
                    if nbytes == 1:
                        T.buffer_store(O, byte, [rows[0] + i, col0 // 8])
                    else:
                        _vec_store(O, byte, [rows[0] + i], nbytes, col0 // 8)
            elif ACTIVATIONS[activation] is not None:
                # over the tile just written (in L1). A full tile's rows unrolled (independent vectors in
                # flight: GELU 1.1 -> 0.8 ms at 1024 x 1536); the ragged rows' tiles (M % R) in a loop, so the
                # activation's code is not copied per row there (a GELU per row in every tile shape made a
                # kernel 3-6x slower to build)
                fn, pre = ACTIVATIONS[activation], [g] if batched else []
                with (T.unroll if len(rows) == R else T.serial)(0, len(rows)) as i:
                    with T.vectorized(0, width) as j:
                        T.buffer_store(O, fn(O[(*pre, rows[0] + i, col0 + j)]), [*pre, rows[0] + i, col0 + j])

        def emit_panel(rows, pb):
            """Panel `pb`: PANEL // C tiles side by side, or the static ragged tail (N % PANEL) in the last."""
            def tiles(p, cols):
                for s0 in range(0, cols, C):
                    emit_tile(None, rows, p * PANEL + s0, min(C, cols - s0), (p, s0))

            if N % PANEL:
                with T.If(pb < N // PANEL):
                    with T.Then():
                        tiles(pb, PANEL)
                    with T.Else():
                        tiles(N // PANEL, N % PANEL)
            else:
                tiles(pb, PANEL)

        def emit_cols(g, rows, nb, n_full):
            """Column block `nb`: a full tile, or the static ragged tail when nb == n_full."""
            if panel:
                emit_panel(rows, nb)
            elif N is not None and N % C:
                with T.If(nb < n_full):
                    with T.Then():
                        emit_tile(g, rows, nb * C, C)
                    with T.Else():
                        emit_tile(g, rows, n_full * C, N % C)
            else:
                emit_tile(g, rows, nb * C, C)

        g_count = G if batched else 1
        n_full = n // C
        n_blocks = n_full + (1 if N is not None and N % C else 0)
        if panel:  # a column block is one panel
            n_blocks = (N + PANEL - 1) // PANEL
        m_full, m_rem = M // R, M % R
        # Full row blocks, column-block major, or in chunks of `row_chunk` row blocks (the last may be short).
        with _outer(parallel, g_count * n_blocks * m_full) as t:
            g, r = t // (n_blocks * m_full), t % (n_blocks * m_full)
            if row_chunk == 0:
                nb, mb = r // m_full, r % m_full
            else:
                c = r // (row_chunk * n_blocks)
                size = T.bind(tirx.Min(m_full - c * row_chunk, tirx.const(row_chunk, "int64")))
                local = r - c * row_chunk * n_blocks
                nb, mb = local // size, c * row_chunk + local % size
            emit_cols(g, [mb * R + i for i in range(R)], nb, n_full)
        # Ragged rows (M % R), parallel over column blocks: this is all of the work when M < R (decode).
        if R > 1:
            with _outer(parallel, g_count * n_blocks) as t:
                g, nb = t // n_blocks, t % n_blocks
                for rem in range(1, R):
                    with T.If(m_rem == rem):
                        with T.Then():
                            emit_cols(g, [M - rem + i for i in range(rem)], nb, n_full)
        # Ragged columns of a symbolic N, one column at a time.
        if N is None:
            with _outer(parallel, g_count * M) as t:
                g, m = t // M, t % M
                with T.serial(0, n % C) as c:
                    emit_tile(g, [m], n_full * C + c, 1)

    return _build(body, f"gemm_{mode}")


def gemm_output(mode: str, s, K, NZ, col, rterm, epilogue: str, RS, m, CS, BI):
    """One output element of the bit-serial GEMM from its popcount sum ``s`` (int32), the same on every CPU
    kernel set (host, arm64): the integer dot product of the mode (xnor: ``K - 2s``; ternary: ``nnz - 2s``;
    and: ``2s - rterm``, the row's popcount term; otherwise ``s``), then the float epilogue
    ``(int · row_scale[m]) · col_scale[col] (+ bias[col])`` when ``epilogue == "float"`` (``BI``: None
    without bias)."""
    if mode == "xnor":
        val = tirx.const(K, "int32") - s * 2
    elif mode == "xnor_ternary":
        val = NZ[col] - s * 2
    elif mode == "and":
        val = s * 2 - rterm.astype("int32")
    else:
        val = s
    if epilogue == "float":
        val = (val.astype("float32") * RS[m]) * CS[col]
        if BI is not None:
            val = val + BI[col]
    return val


def _one64():
    return tirx.const(1, "int64")


def _register() -> None:
    from bitfx.targets.registry import register_kernel

    for op, fn in (("pack_rows", pack_rows), ("pack_cols", pack_cols), ("absmax_planes", absmax_planes),
                   ("gemm", gemm)):
        register_kernel("host", op)(fn)


_register()
