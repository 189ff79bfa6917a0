"""What the bitfx kernels compute, written once in `te.compute`.

Each function returns a `PrimFunc` (unscheduled: `parallel` and `tile` are accepted and unused) with
exactly the arguments (names, order, shapes, dtypes) of the tiled
generator of the same name in `bitfx/targets/host.py`, so the two are interchangeable: this one is the
definition the fast kernels are tested against, and the fallback for a target without a schedule.

Layout (DESIGN §3): bits are packed along the reduction axis into uint64 words, bit j of word w holds
element 64*w + j; bit = 1 means +1 (or "set" for {0,1} operands); tail bits are zero in both operands.
Weights are K-major, `[KW, N]` (ternary: `[2, KW, N]`, planes pos and neg). Activation bit planes are
`[M, planes, KW]`, plane b = bit b of the two's-complement code.

Notation as in DESIGN §2: sign(u) = +1 if u >= 0 else -1, with sign(0) = +1 and NaN -> +1.
"""

from __future__ import annotations

from tvm import te, tirx

WORD = 64
BIT_MODES = ("sign", "pos", "neg", "nonzero")

_bit_or = te.comm_reducer(lambda a, b: a | b, lambda dtype: tirx.const(0, dtype), name="bit_or")


def _dim(name: str, static: int | None):
    return te.var(name, "int64") if static is None else static


def _bit(mode: str, v, dtype: str) -> tirx.PrimExpr:
    zero = tirx.const(0, dtype)
    cond = {"sign": v < zero, "pos": v > zero, "neg": v < zero, "nonzero": v != zero}[mode]
    one, nil = tirx.const(1, "uint64"), tirx.const(0, "uint64")
    # sign is NOT(u < 0): NaN and -0.0 give +1.
    return tirx.Select(cond, nil, one) if mode == "sign" else tirx.Select(cond, one, nil)


def _pack(shape, K, bit_of):
    """`shape[:-1] + [KW]` words; `bit_of(*idx, k)` is the bit of reduction element k (< K)."""
    j = te.reduce_axis((0, WORD), "j")

    def word(*idx):
        k = idx[-1] * WORD + j
        bit = tirx.if_then_else(k < K, bit_of(*idx[:-1], k), tirx.const(0, "uint64"))
        return _bit_or(bit << j.astype("uint64"), axis=j)

    return te.compute((*shape, (K + WORD - 1) // WORD), word, name="packed")


def pack_rows(*, mode: str, K: int | None, dtype: str = "float32", move: bool = False,
              mean: bool = False, parallel: bool = True) -> tirx.PrimFunc:
    """`bits[m, w]` = pack_k bit(x[m, k] + move[k]); with `mean`, `row_scale[m] = mean_k |x + move|`."""
    if mode not in BIT_MODES:
        raise ValueError(f"unknown bit mode {mode!r}; expected one of {BIT_MODES}")
    M, k = te.var("M", "int64"), _dim("K", K)
    X = te.placeholder((M, k), dtype, name="x")
    MV = te.placeholder((k,), "float32", name="move") if move else None
    u = (lambda m, i: X[m, i] + MV[i]) if move else (lambda m, i: X[m, i])
    A = _pack((M,), k, lambda m, i: _bit(mode, u(m, i), dtype))
    args = [X, *([MV] if move else []), A]
    if mean:
        r = te.reduce_axis((0, k), "r")
        total = te.compute((M,), lambda m: te.sum(tirx.abs(u(m, r)), axis=r), name="abs_sum")
        kf = k.astype("float32") if K is None else tirx.const(K, "float32")
        args.append(te.compute((M,), lambda m: total[m] / kf, name="row_scale"))
    return te.create_prim_func(args)


def pack_cols(*, K: int | None, N: int, batched: bool = True, parallel: bool = True) -> tirx.PrimFunc:
    """`bits[g, w, n]` = pack_k sign(x[g, k, n]): values packed down their columns, K-major."""
    G, k = te.var("G", "int64"), _dim("K", K)
    X = te.placeholder((G, k, N) if batched else (k, N), "float32", name="x")
    j = te.reduce_axis((0, WORD), "j")

    def word(*idx):
        *pre, w, n = idx
        kk = w * WORD + j
        bit = tirx.if_then_else(kk < k, _bit("sign", X[(*pre, kk, n)], "float32"), tirx.const(0, "uint64"))
        return _bit_or(bit << j.astype("uint64"), axis=j)

    kw = (k + WORD - 1) // WORD
    out = te.compute((G, kw, N) if batched else (kw, N), word, name="packed")
    return te.create_prim_func([X, out])


def absmax_planes(*, K: int, bits: int, parallel: bool = True) -> tirx.PrimFunc:
    """BitNet absmax, per row: gamma = max(max|x|, 1e-5); inv = Qp/gamma; q = clamp(rint(x*inv), -Qp-1, Qp).

    Returns planes `[M, bits, KW]` (plane b = bit b of q, two's complement) and `row_scale = 1/inv`.
    `rint` rounds half to even, as `torch.round` does.
    """
    qp = float(2 ** (bits - 1) - 1)
    M = te.var("M", "int64")
    X = te.placeholder((M, K), "float32", name="x")
    r = te.reduce_axis((0, K), "r")
    amax = te.compute((M,), lambda m: te.max(tirx.abs(X[m, r]), axis=r), name="amax")
    f32 = lambda v: tirx.const(v, "float32")  # noqa: E731
    # torch evaluates the reference's `qp / gamma` (int / tensor) as `reciprocal(gamma) * qp`.
    inv = te.compute((M,), lambda m: (f32(1.0) / tirx.max(amax[m], f32(1e-5))) * f32(qp), name="inv")
    q = te.compute((M, K), lambda m, k: tirx.max(tirx.min(tirx.nearbyint(X[m, k] * inv[m]), f32(qp)),
                                                 f32(-qp - 1)).astype("int32"), name="q")
    planes = _pack((M, bits), K, lambda m, b, k: ((q[m, k] >> b.astype("int32")) & 1).astype("uint64"))
    rs = te.compute((M,), lambda m: f32(1.0) / inv[m], name="row_scale")
    return te.create_prim_func([X, planes, rs])


def gemm(*, mode: str, K: int | None, N: int | None, planes: int = 1, signed: bool = True,
         batched: bool = False, epilogue: str = "int", bias: bool = False, tile=None,
         parallel: bool = True) -> tirx.PrimFunc:
    """`acc[m, n] = sum_k a[m, k] * w[n, k]` from packed words; see `bitfx.targets.host.gemm` for modes.

    `epilogue="float"`: `y = (float32(acc) * row_scale[m]) * col_scale[n] (+ bias[n])`.
    """
    del tile  # the definition has no schedule
    ternary = mode.endswith("ternary")
    G, M, n = te.var("G", "int64"), te.var("M", "int64"), _dim("N", N)
    kw = te.var("KW", "int64") if K is None else (K + WORD - 1) // WORD
    bat = (G,) if batched else ()
    A = te.placeholder((*bat, M, *((planes,) if planes > 1 else ()), kw), "uint64", name="a")
    W = te.placeholder((*bat, *((2,) if ternary else ()), kw, n), "uint64", name="w")
    NZ = te.placeholder((n,), "int32", name="nnz") if mode == "xnor_ternary" else None

    def a_word(pre, m, b, w):
        return A[(*pre, m, *((b,) if planes > 1 else ()), w)]

    def w_word(pre, p, w, col):
        return W[(*pre, *((p,) if ternary else ()), w, col)]

    def popc(v):
        return tirx.popcount(v).astype("int32")

    r = te.reduce_axis((0, kw), "r")
    if mode.startswith("xnor"):
        def acc_fn(*idx):
            *pre, m, col = idx
            a, w0 = a_word(pre, m, 0, r), w_word(pre, 0, r, col)
            if mode == "xnor":
                return te.sum(popc(a ^ w0), axis=r)
            return te.sum(popc((a ^ w0) & (w0 | w_word(pre, 1, r, col))), axis=r)

        mism = te.compute((*bat, M, n), acc_fn, name="mismatch")
        first = (lambda *i: tirx.const(K, "int32")) if mode == "xnor" else (lambda *i: NZ[i[-1]])
        acc = te.compute((*bat, M, n), lambda *i: first(*i) - 2 * mism[i], name="acc")
    else:
        b = te.reduce_axis((0, planes), "b")
        def coef(bb):  # 2^b; the top plane of a signed code weighs -2^(planes-1)
            weight = tirx.const(1, "int32") << bb.astype("int32")
            return tirx.if_then_else(bb == planes - 1, -weight, weight) if signed and planes > 1 else weight

        def acc_fn(*idx):
            *pre, m, col = idx
            p, w0 = a_word(pre, m, b, r), w_word(pre, 0, r, col)
            if mode == "and":
                term = 2 * popc(p & w0) - popc(p)
            else:
                term = popc(p & w0) - popc(p & w_word(pre, 1, r, col))
            return te.sum(coef(b) * term, axis=[b, r])

        acc = te.compute((*bat, M, n), acc_fn, name="acc")
    args = [A, W, *([NZ] if NZ is not None else [])]
    if epilogue == "float":
        RS = te.placeholder((M,), "float32", name="row_scale")
        CS = te.placeholder((n,), "float32", name="col_scale")
        BI = te.placeholder((n,), "float32", name="bias") if bias else None

        def epi(*i):
            y = (acc[i].astype("float32") * RS[i[-2]]) * CS[i[-1]]
            return y + BI[i[-1]] if bias else y

        args += [RS, CS, *([BI] if bias else [])]
        acc = te.compute((*bat, M, n), epi, name="y")
    return te.create_prim_func([*args, acc])


def _register() -> None:
    from bitfx.targets.registry import KERNEL_OPS, register_kernel

    for op in KERNEL_OPS:
        register_kernel("reference", op)(globals()[op])


_register()
