"""The fused host kernel of ``bit_attention``: one call, one loop nest per (batch, head) block.

``fused_attention`` computes, for each (batch b, head h) in a parallel loop, with only small per-block
buffers (the TVM workspace) and vector registers::

    pack sign(k) key-major per word (8 keys per 512-bit vector), α_k[j] = mean_d |k[j, d]|
    pack sign(v) key-major per output dim (words of 64 keys), α_v = mean |v| of the head
    for each query row i:
        pack sign(q[i]), α_q[i] = mean_d |q[i, d]|
        S[j] = (float(D - 2 popc(q ⊕ k[j])) · α_q[i] · α_k[j] + res[i, j]) · scale + B[b, h, i, j]
               (res: BiPFT's score estimators, (u_q + r_q) r_kᵀ + r_q u_kᵀ, rank ≤ 8; -inf where j > i if causal)
        codes (no full softmax; m = max_j S[j]):
            bivit    S[j] - m >= ln β     (⟺ P >= β·rowmax P; an all -inf row: all ones, as the reference)
            bool     S[j] > 0
            elastic  exp(S[j] - m) > (α_P/2) Σ_j exp(S[j] - m)   (⟺ round(P/α_P) >= 1; polynomial exp)
        packed along keys; cnt[d] = 2 popc(P & vpos_d) - popc(P)
        out[i, d] = cnt[d] (· α_P) · α_v  (+ Σ_j P[j] r_v[j] (· α_P))

``B`` is one additive float tensor ``[bB, bH, bQ, Lk]`` (each of the first three dims full or 1, a static
``bias`` pattern), built by the caller (masks as 0/-inf). q, k, v may be strided views (unit last stride).
α_q, α_k, α_v are the per-row / per-head means when not given, else scalars read from ``scalars``:
``[scale, α_q, α_k, α_v, ln β | α_P]``. ``debug=True`` adds two outputs: the packed codes
``[Bt, H, Lq, ceil(Lk/64)]`` uint64 and the integer counts ``cnt`` ``[Bt, H, Lq, Dv]`` int32.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.script.ir_builder import tirx as T

from bitfx.targets.host import (WORD, _build, _match, _outer, _packed_word, _u64, _vec_load, _vec_store, _zero,
                                fast_exp)

# Bump when the generator changes the code it emits (part of every kernel-cache key).
SCHEDULE_VERSION = 7

PROB_MODES = ("bivit", "bool", "elastic")
LANES = 16  # float32 / int64 lanes per vector step over keys and feature dims
ROWS = 4  # query rows per step of the row loop (their dependency chains overlap)
_F32 = "float32"


def _f(v) -> tirx.PrimExpr:
    return tirx.const(v, _F32)


def _bc(v, lanes: int):
    return T.broadcast(v, lanes) if lanes > 1 else v


def _sign_word(buf, prefix, start, n: int):
    """Sign bits (bit = NOT(u < 0)) of `n` consecutive floats as one uint64, zero above bit n."""
    if n == WORD:
        return _packed_word("sign", _vec_load(buf, prefix, WORD, start), _F32)
    if n in (8, 16, 32):
        neg = tirx.Cast(f"uint1x{n}", _vec_load(buf, prefix, n, start) < _bc(_f(0.0), n))
        return (~T.reinterpret(f"uint{n}", neg)).astype("uint64")
    word = _u64(0)
    for j in range(n):  # static, small: an odd width
        word = word | tirx.Select(buf[(*prefix, start + j)] < _f(0.0), _u64(0), _u64(1 << j))
    return word


def _abs_sum(buf, prefix, n: int, acc):
    """Σ_d |buf[prefix, d]| for d < n (static), through the 16-lane buffer `acc` (left holding partial sums)."""
    _vec_store(acc, _zero(_F32, LANES), [], LANES, 0)
    for c0 in range(0, n - n % LANES, LANES):
        _vec_store(acc, _vec_load(acc, [], LANES, 0) + T.abs(_vec_load(buf, prefix, LANES, c0)), [], LANES, 0)
    total = _lane_reduce(acc, lambda a, b: a + b)
    for d in range(n - n % LANES, n):
        total = total + T.abs(buf[(*prefix, d)])
    return total


def _match_rows(handle, name: str, shape, dtype: str):
    """An input `[Bt, H, L, D]` with any strides but a unit last one (HF's `[B, L, H, D]` views transposed to
    heads come as they are, not copied); element alignment only, as host's `_match`."""
    strides = [tirx.Var(f"{name}_s{i}", "int64") for i in range(len(shape) - 1)] + [1]
    return T.match_buffer(handle, shape, dtype, strides=strides, align=tvm.DataType(dtype).bits // 8)


def _lane_reduce(acc, op):
    """op over the LANES slots of `acc` as a balanced tree (4 dependent steps, not a chain of 15)."""
    terms = [acc[i] for i in range(LANES)]
    while len(terms) > 1:
        terms = [op(terms[i], terms[i + 1]) for i in range(0, len(terms), 2)]
    return terms[0]


def fused_attention(*, D: int, Dv: int, prob_mode: str, bias: tuple | None = None, causal: bool = False,
                    alpha_q: bool = False, alpha_k: bool = False, alpha_v: bool = False, est_v: bool = False,
                    est_rank: int = 0, debug: bool = False, parallel: bool = True) -> tirx.PrimFunc:
    """``out[Bt, H, Lq, Dv] = bit_attention(q, k, v, ...)`` in one kernel (see the module docstring).

    Buffers, in order: q ``[Bt, H, Lq, D]``, k ``[Bt, H, Lk, D]``, v ``[Bt, H, Lk, Dv]`` (float32, any strides
    with a unit last one), then
    ``bias [bB, bH, bQ, Lk]`` when ``bias`` (a pattern of 3 bools: dim full, else size 1), ``rv [Bt, H, Lk]``
    when ``est_v``, ``eq [Bt, H, Lq, 2r]`` and ``ek [Bt, H, Lk, 2r]`` when ``est_rank`` = r > 0 (BiPFT's score
    estimators ``[r_q | u_q]``, ``[r_k | u_k]``: the residual ``(u_q + r_q) r_kᵀ + r_q u_kᵀ`` is added to the
    scores before the scale, in the kernel), ``scalars [5]``, ``out``, and with ``debug`` ``codes`` and
    ``counts``. Bt, H, Lq, Lk are symbolic; ``alpha_q/alpha_k/alpha_v``: the scalar is given (in ``scalars``)
    instead of the mean.
    """
    if prob_mode not in PROB_MODES:
        raise ValueError(f"fused_attention: prob_mode={prob_mode!r} (accepted: {', '.join(map(repr, PROB_MODES))})")
    if not (isinstance(est_rank, int) and 0 <= est_rank <= 8):
        raise ValueError(f"fused_attention: est_rank={est_rank!r} (accepted: integers 0..8)")
    R = est_rank
    if D < 1 or Dv < 1:
        raise ValueError(f"fused_attention needs D >= 1 and Dv >= 1; got D={D}, Dv={Dv}")
    if bias is not None and (len(bias) != 3 or not all(isinstance(b, bool) for b in bias)):
        raise ValueError(f"fused_attention: bias={bias!r} (accepted: None or 3 bools: batch, head, query dim full)")
    DW = (D + WORD - 1) // WORD
    ninf = _f(float("-inf"))

    def body():
        q_h, k_h, v_h = T.arg("q", T.handle()), T.arg("k", T.handle()), T.arg("v", T.handle())
        b_h = T.arg("bias", T.handle()) if bias is not None else None
        rv_h = T.arg("rv", T.handle()) if est_v else None
        eq_h = T.arg("eq", T.handle()) if R else None
        ek_h = T.arg("ek", T.handle()) if R else None
        sc_h, out_h = T.arg("scalars", T.handle()), T.arg("out", T.handle())
        pc_h = T.arg("codes", T.handle()) if debug else None
        cn_h = T.arg("counts", T.handle()) if debug else None
        Bt, H = tirx.Var("Bt", "int64"), tirx.Var("H", "int64")
        Lq, Lk = tirx.Var("Lq", "int64"), tirx.Var("Lk", "int64")
        lkw = (Lk + WORD - 1) // WORD
        Q = _match_rows(q_h, "q", (Bt, H, Lq, D), _F32)
        K = _match_rows(k_h, "k", (Bt, H, Lk, D), _F32)
        V = _match_rows(v_h, "v", (Bt, H, Lk, Dv), _F32)
        BI = None
        if bias is not None:
            BI = _match(b_h, tuple(n if full else 1 for n, full in zip((Bt, H, Lq), bias)) + (Lk,), _F32)
        RV = _match(rv_h, (Bt, H, Lk), _F32) if est_v else None
        EQ = _match(eq_h, (Bt, H, Lq, 2 * R), _F32) if R else None
        EK = _match(ek_h, (Bt, H, Lk, 2 * R), _F32) if R else None
        SC = _match(sc_h, (5,), _F32)
        O = _match(out_h, (Bt, H, Lq, Dv), _F32)
        PC = _match(pc_h, (Bt, H, Lq, lkw), "uint64") if debug else None
        CN = _match(cn_h, (Bt, H, Lq, Dv), "int32") if debug else None
        scale = SC[0]

        with _outer(parallel, Bt * H) as t:
            b, h = t // H, t % H
            lp = lkw * WORD  # keys padded to whole words
            KP = T.alloc_buffer((DW * lp,), "uint64")  # sign(k), word w of key j at w * lp + j
            AK = T.alloc_buffer((lp,), _F32)
            VP = T.alloc_buffer((lkw * Dv,), "uint64")  # sign(v), keys 64w.. of dim d at w * Dv + d
            RVP = T.alloc_buffer((lp,), _F32) if est_v else None
            EKT = T.alloc_buffer((2 * R * lp,), _F32) if R else None  # ek key-major: column c at c * lp
            acc = T.alloc_buffer((LANES,), _F32)
            red = T.alloc_buffer((1,), _F32)
            # scalars, each in its own slot (a bound expression that reads `acc` could be re-evaluated after
            # `acc` is reused): α_v here; per row (svs below) α_q (·α_k when given), row max, max or 0,
            # threshold, Σ P r_v
            sv = T.alloc_buffer((1,), _F32)

            # -- keys: packed sign bits (key-major per word) and α_k
            with T.serial(0, Lk) as j:
                for w in range(DW):
                    T.buffer_store(KP, _sign_word(K, [b, h, j], w * WORD, min(WORD, D - w * WORD)), [w * lp + j])
                if not alpha_k:
                    T.buffer_store(AK, _abs_sum(K, [b, h, j], D, acc) / _f(float(D)), [j])
            if R:
                with T.serial(0, Lk) as j:
                    for c in range(2 * R):
                        T.buffer_store(EKT, EK[b, h, j, c], [c * lp + j])
            # -- values: sign bits packed down the keys per output dim; Σ|v| for α_v in the same pass
            if not alpha_v:
                _vec_store(acc, _zero(_F32, LANES), [], LANES, 0)
                T.buffer_store(red, _f(0.0), [0])
            with T.serial(0, lkw) as w:
                rows = T.bind(tirx.Min(Lk - w * WORD, tirx.const(WORD, "int64")))
                for d in range(Dv):
                    T.buffer_store(VP, _u64(0), [w * Dv + d])
                with T.serial(0, rows) as j:
                    one = _u64(1) << j.astype("uint64")
                    for d0 in range(0, Dv, LANES):
                        n = min(LANES, Dv - d0)
                        vv = _vec_load(V, [b, h, w * WORD + j], n, d0) if n > 1 else V[b, h, w * WORD + j, d0]
                        bit = tirx.Select(vv < _bc(_f(0.0), n), _zero("uint64", n), _bc(one, n))
                        if not alpha_v and n == LANES:
                            _vec_store(acc, _vec_load(acc, [], LANES, 0) + T.abs(vv), [], LANES, 0)
                        elif not alpha_v:  # a narrower tail chunk of Dv
                            tail = T.abs(V[b, h, w * WORD + j, d0])
                            for i in range(1, n):
                                tail = tail + T.abs(V[b, h, w * WORD + j, d0 + i])
                            T.buffer_store(red, red[0] + tail, [0])
                        if n > 1:
                            _vec_store(VP, _vec_load(VP, [], n, w * Dv + d0) | bit, [], n, w * Dv + d0)
                        else:
                            T.buffer_store(VP, VP[w * Dv + d0] | bit, [w * Dv + d0])
            if alpha_v:
                T.buffer_store(sv, SC[3], [0])
            else:
                total = _lane_reduce(acc, lambda a, b_: a + b_) + red[0]
                T.buffer_store(sv, total / (Lk * Dv).astype(_F32), [0])
            av = sv[0]
            if est_v:
                with T.serial(0, lp) as j:
                    T.buffer_store(RVP, tirx.Select(j < Lk, RV[b, h, tirx.Min(j, Lk - 1)], _f(0.0)), [j])

            # -- query rows, ROWS at a time: their independent chains (max, sums, thresholds) interleave
            slots = ROWS

            def per_slot(shape, dtype):
                return [T.alloc_buffer(shape, dtype) for _ in range(slots)]

            Ss, PWs, accs = per_slot((lp,), _F32), per_slot((lkw,), "uint64"), per_slot((LANES,), _F32)
            qws, cnts, svs = per_slot((DW,), "uint64"), per_slot((Dv,), "int64"), per_slot((6,), _F32)
            nposs = per_slot((1,), "int64")
            coefs = per_slot((2 * R,), _F32) if R else None

            def emit_rows(rows):
                """The whole row pipeline for `rows` (static list of (slot, row index)), interleaved per loop."""
                for r, i in rows:
                    qw, acc, sv = qws[r], accs[r], svs[r]
                    for w in range(DW):
                        T.buffer_store(qw, _sign_word(Q, [b, h, i], w * WORD, min(WORD, D - w * WORD)), [w])
                    aq = SC[1] if alpha_q else _abs_sum(Q, [b, h, i], D, acc) / _f(float(D))
                    T.buffer_store(sv, aq * SC[2] if alpha_k else aq, [1])  # α_q (·α_k when given)
                    for c in range(R):
                        T.buffer_store(coefs[r], EQ[b, h, i, R + c] + EQ[b, h, i, c], [c])
                        T.buffer_store(coefs[r], EQ[b, h, i, c], [R + c])

                def score(r, i, j, lanes):
                    """S of row i at keys j.. (`lanes` of them), masked; j + lanes <= Lk."""
                    qw = qws[r]
                    x = _bc(qw[0], lanes) ^ (_vec_load(KP, [], lanes, j) if lanes > 1 else KP[j])
                    pc = T.popcount(x).astype("int32" if lanes == 1 else f"int32x{lanes}")
                    for w in range(1, DW):
                        y = _bc(qw[w], lanes) ^ (_vec_load(KP, [], lanes, w * lp + j) if lanes > 1 else KP[w * lp + j])
                        pc = pc + T.popcount(y).astype("int32" if lanes == 1 else f"int32x{lanes}")
                    s = (_bc(tirx.const(D, "int32"), lanes) - pc * _bc(tirx.const(2, "int32"), lanes))
                    s = s.astype(_F32 if lanes == 1 else f"float32x{lanes}") * _bc(svs[r][1], lanes)
                    if not alpha_k:
                        s = s * (_vec_load(AK, [], lanes, j) if lanes > 1 else AK[j])
                    if R:  # + (u_q + r_q)·r_k + r_q·u_k, as the reference's two products
                        coef = coefs[r]

                        def col(c):
                            return _vec_load(EKT, [], lanes, c * lp + j) if lanes > 1 else EKT[c * lp + j]
                        res1 = _bc(coef[0], lanes) * col(0)
                        res2 = _bc(coef[R], lanes) * col(R)
                        for c in range(1, R):
                            res1 = res1 + _bc(coef[c], lanes) * col(c)
                            res2 = res2 + _bc(coef[R + c], lanes) * col(R + c)
                        s = s + (res1 + res2)
                    s = s * _bc(scale, lanes)
                    if bias is not None:
                        idx = [b if bias[0] else 0, h if bias[1] else 0, i if bias[2] else 0]
                        s = s + (_vec_load(BI, idx, lanes, j) if lanes > 1 else BI[(*idx, j)])
                    if causal:
                        jj = T.ramp(j, 1, lanes) if lanes > 1 else j
                        s = tirx.Select(jj > _bc(i, lanes), _bc(ninf, lanes), s)
                    return s

                with T.serial(0, Lk // LANES) as c:
                    for r, i in rows:
                        _vec_store(Ss[r], score(r, i, c * LANES, LANES), [], LANES, c * LANES)
                with T.serial(Lk - Lk % LANES, Lk) as j:
                    for r, i in rows:
                        T.buffer_store(Ss[r], score(r, i, j, 1), [j])
                with T.serial(Lk, lp) as j:
                    for r, _ in rows:
                        T.buffer_store(Ss[r], ninf, [j])
                # row max
                for r, _ in rows:
                    _vec_store(accs[r], _bc(ninf, LANES), [], LANES, 0)
                with T.serial(0, lp // LANES) as c:
                    for r, _ in rows:
                        acc = accs[r]
                        _vec_store(acc, T.max(_vec_load(acc, [], LANES, 0), _vec_load(Ss[r], [], LANES, c * LANES)),
                                   [], LANES, 0)
                for r, _ in rows:
                    T.buffer_store(svs[r], _lane_reduce(accs[r], T.max), [2])

                def m(r):
                    return svs[r][2]

                def empty(r):
                    return svs[r][2] == ninf

                if prob_mode == "elastic":
                    for r, _ in rows:  # an all -inf row: every exp is 0
                        T.buffer_store(svs[r], tirx.Select(empty(r), _f(0.0), m(r)), [3])
                        _vec_store(accs[r], _zero(_F32, LANES), [], LANES, 0)
                    with T.serial(0, lp // LANES) as c:
                        for r, _ in rows:
                            acc, S = accs[r], Ss[r]
                            e = fast_exp(_vec_load(S, [], LANES, c * LANES) - _bc(svs[r][3], LANES), LANES)
                            _vec_store(acc, _vec_load(acc, [], LANES, 0) + e, [], LANES, 0)  # e reads S: sum first
                            _vec_store(S, e, [], LANES, c * LANES)
                    for r, _ in rows:
                        T.buffer_store(svs[r], (SC[4] * _f(0.5)) * _lane_reduce(accs[r], lambda a, b_: a + b_), [4])

                    def cond(r, w):
                        return _vec_load(Ss[r], [], WORD, w * WORD) > _bc(svs[r][4], WORD)
                elif prob_mode == "bivit":
                    def cond(r, w):
                        keep = (_vec_load(Ss[r], [], WORD, w * WORD) - _bc(m(r), WORD)) >= _bc(SC[4], WORD)
                        return keep | _bc(empty(r), WORD)
                else:
                    def cond(r, w):
                        return _vec_load(Ss[r], [], WORD, w * WORD) > _bc(_f(0.0), WORD)

                for r, _ in rows:
                    T.buffer_store(nposs[r], tirx.const(0, "int64"), [0])
                with T.serial(0, lkw) as w:
                    # keys past Lk (the last word's tail) are cleared with one scalar mask
                    left = Lk - w * WORD
                    tail = T.bind(tirx.Select(left >= WORD, ~_u64(0), (_u64(1) << left.astype("uint64")) - _u64(1)))
                    for r, i in rows:
                        word = T.bind(T.reinterpret("uint64", tirx.Cast("uint1x64", cond(r, w))) & tail)
                        T.buffer_store(PWs[r], word, [w])
                        T.buffer_store(nposs[r], nposs[r][0] + T.popcount(word).astype("int64"), [0])
                        if debug:
                            T.buffer_store(PC, word, [b, h, i, w])
                # P·V: cnt[d] = 2 popc(P & vpos_d) - popc(P)
                for r, _ in rows:
                    for d0 in range(0, Dv, LANES):
                        n = min(LANES, Dv - d0)
                        if n > 1:
                            _vec_store(cnts[r], _zero("int64", n), [], n, d0)
                        else:
                            T.buffer_store(cnts[r], tirx.const(0, "int64"), [d0])
                with T.serial(0, lkw) as w:
                    for d0 in range(0, Dv, LANES):
                        n = min(LANES, Dv - d0)
                        vp = _vec_load(VP, [], n, w * Dv + d0) if n > 1 else VP[w * Dv + d0]
                        for r, _ in rows:
                            cnt, pw = cnts[r], PWs[r][w]
                            if n > 1:
                                term = T.popcount(_bc(pw, n) & vp).astype(f"int64x{n}")
                                _vec_store(cnt, _vec_load(cnt, [], n, d0) + term, [], n, d0)
                            else:
                                term = T.popcount(pw & vp).astype("int64")
                                T.buffer_store(cnt, cnt[d0] + term, [d0])
                if est_v:  # Σ_j P[j] r_v[j], a masked float sum
                    for r, _ in rows:
                        _vec_store(accs[r], _zero(_F32, LANES), [], LANES, 0)
                    with T.serial(0, lkw) as w:
                        for c0 in range(0, WORD, LANES):
                            rv = _vec_load(RVP, [], LANES, w * WORD + c0)
                            for r, _ in rows:
                                acc = accs[r]
                                bits = (_bc(PWs[r][w], LANES) >> T.ramp(_u64(c0), _u64(1), LANES)) & _bc(_u64(1), LANES)
                                _vec_store(acc, _vec_load(acc, [], LANES, 0)
                                           + tirx.Select(bits != _zero("uint64", LANES), rv, _zero(_F32, LANES)),
                                           [], LANES, 0)
                    for r, _ in rows:
                        T.buffer_store(svs[r], _lane_reduce(accs[r], lambda a, b_: a + b_), [5])
                for r, i in rows:
                    for d0 in range(0, Dv, LANES):
                        n = min(LANES, Dv - d0)
                        c = (_vec_load(cnts[r], [], n, d0) if n > 1 else cnts[r][d0])
                        c = c * _bc(tirx.const(2, "int64"), n) - _bc(nposs[r][0], n)
                        ci = c.astype("int32" if n == 1 else f"int32x{n}")
                        if debug:
                            if n > 1:
                                _vec_store(CN, ci, [b, h, i], n, d0)
                            else:
                                T.buffer_store(CN, ci, [b, h, i, d0])
                        o = ci.astype(_F32 if n == 1 else f"float32x{n}")
                        if prob_mode == "elastic":
                            o = o * _bc(SC[4], n)
                        o = o * _bc(av, n)
                        if est_v:
                            rsum = svs[r][5]
                            o = o + _bc(rsum * SC[4] if prob_mode == "elastic" else rsum, n)
                        if n > 1:
                            _vec_store(O, o, [b, h, i], n, d0)
                        else:
                            T.buffer_store(O, o, [b, h, i, d0])

            with T.serial(0, Lq // ROWS) as ib:
                emit_rows([(r, ib * ROWS + r) for r in range(ROWS)])
            with T.serial(Lq - Lq % ROWS, Lq) as i:
                emit_rows([(0, i)])

    return _build(body, "fused_attention")


def _register() -> None:
    from bitfx.targets.registry import register_kernel

    register_kernel("host", "fused_attention")(fused_attention)


_register()
