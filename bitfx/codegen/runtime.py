"""Torch-facing calls of the bitfx kernels (zero copy through DLPack; outputs allocated by torch).

    packed = pack_weight(w_int, ternary=False)            # once, ahead of the first call
    y = bit_linear(x, packed, act="sign", col_scale=s, bias=b)

Public functions (the lowering pass `bitfx.passes.lower_kernels` calls exactly these):

- `pack_weight(w_int, ternary) -> PackedWeight`
- `bit_linear(x, packed, *, act="sign", bits=1, move=None, alpha=None, col_scale, bias=None, threads=None)`
- `bit_linear_int(x, packed, *, act="sign", bits=1, move=None) -> (acc int32 [M, N], row_scale [M])`
- `sign_scores(q, k) -> int32`, `binary_pv(p, v) -> int32`

Inputs may be non-contiguous (made contiguous), have any leading batch dims (flattened to M and
restored), and be float16/bfloat16 (computed in float32, the float output cast back). One compiled kernel
serves every M (token count); K and N are fixed per kernel, by the weight. Kernels come from
`bitfx.codegen.build` (compiled once per machine, then loaded from the disk cache).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from bitfx.codegen.build import kernel

log = logging.getLogger(__name__)

__all__ = ["PackedWeight", "pack_weight", "bit_linear", "bit_linear_int", "sign_scores", "binary_pv"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
WORD = 64


PANEL = 32  # output columns per weight panel (`bitfx.targets.host.PANEL`)


@dataclass(frozen=True)
class PackedWeight:
    """Weight codes packed along K into uint64 words (KW = ceil(K/64) words per output column).

    `layout="panel"` (what `pack_weight` makes on the CPU): `planes[P, ceil(N/32), KW, 32]`, column
    panels of 32, each panel's K words contiguous, so the host GEMM reads the weight front to back;
    columns past N are zero. `layout="kmajor"` (CUDA, and a weight built by hand): `planes[P, KW, N]`.
    Binary: P = 1, bit = 1 for +1. Ternary: P = 2 (plane 0 = "is +1", plane 1 = "is -1") and `nnz[n]`,
    the number of nonzero codes of output channel n. Tail bits (K not a multiple of 64) are zero.
    """

    planes: torch.Tensor
    N: int
    K: int
    ternary: bool
    nnz: torch.Tensor | None = None
    layout: str = "kmajor"

    def __post_init__(self):
        if self.layout not in ("kmajor", "panel"):
            raise ValueError(f"PackedWeight layout must be 'kmajor' or 'panel', got {self.layout!r}")
        P, kw = 2 if self.ternary else 1, _words(self.K)
        want = (P, _panels(self.N), kw, PANEL) if self.layout == "panel" else (P, kw, self.N)
        if tuple(self.planes.shape) != want:
            raise ValueError(f"PackedWeight planes of shape {tuple(self.planes.shape)} do not fit layout "
                             f"{self.layout!r} with N={self.N}, K={self.K}: expected {want}")

    @property
    def w(self) -> torch.Tensor:
        """The argument the GEMM takes: `planes`, without the plane dim when binary."""
        return self.planes if self.ternary else self.planes[0]

    def kmajor(self) -> torch.Tensor:
        """`planes` as `[P, KW, N]` (a copy when panelled): the layout of the CUDA and reference kernels."""
        if self.layout == "kmajor":
            return self.planes
        P, nb, kw, _ = self.planes.shape
        return self.planes.permute(0, 2, 1, 3).reshape(P, kw, nb * PANEL)[:, :, :self.N].contiguous()


def _panels(n: int) -> int:
    return (n + PANEL - 1) // PANEL


def to_panels(rows: torch.Tensor) -> torch.Tensor:
    """Packed rows `[N, KW]` (one output column's K words per row) -> panels `[ceil(N/32), KW, 32]`."""
    N, kw = rows.shape
    padded = torch.zeros(_panels(N) * PANEL, kw, dtype=rows.dtype)
    padded[:N] = rows
    return padded.view(-1, PANEL, kw).transpose(1, 2).contiguous()


def pack_weight(w_int: torch.Tensor, ternary: bool) -> PackedWeight:
    """Pack integer weight codes `w_int[N, K]` (values in {-1, +1}, or {-1, 0, +1} when `ternary`).

    Raises ValueError naming any other value. Runs the `pack_rows` kernel, so it costs one pass over W.
    """
    if w_int.is_cuda:  # packed on the GPU and kept there
        return _cuda().pack_weight(w_int, ternary)
    if w_int.dim() != 2:
        raise ValueError(f"w_int must be [N, K], got shape {tuple(w_int.shape)}")
    codes = w_int.detach().to("cpu", torch.int8).contiguous()
    allowed = (-1, 0, 1) if ternary else (-1, 1)
    # comparisons (torch.isin took 12-16 ms of a 3072 x 768 weight, most of its packing)
    outside = (codes > 1) | (codes < -1)
    if not ternary:
        outside |= codes == 0
    bad = torch.unique(codes[outside])
    if bad.numel() or not torch.equal(codes.to(w_int.dtype), w_int.detach().cpu()):
        values = bad.tolist() if bad.numel() else "non-integer values"
        raise ValueError(f"{'ternary' if ternary else 'binary'} weight codes must be in {allowed}; got {values}")
    N, K = codes.shape
    planes = torch.stack([to_panels(_pack_int8(codes, m)) for m in (("pos", "neg") if ternary else ("pos",))])
    nnz = (codes != 0).sum(1, dtype=torch.int32) if ternary else None
    return PackedWeight(planes.contiguous(), N, K, ternary, nnz, layout="panel")


def _pack_int8(codes: torch.Tensor, mode: str) -> torch.Tensor:
    """`[N, KW]`: each output column's codes packed along K (the `pack_rows` kernel)."""
    N, K = codes.shape
    out = torch.empty(N, _words(K), dtype=torch.uint64)
    op, params = _weight_pack_spec(K, mode)
    kernel(op, **params)(codes, out)
    return out


def _weight_pack_spec(K: int, mode: str) -> tuple[str, dict]:
    return "pack_rows", dict(mode=mode, K=K, dtype="int8", parallel=_parallel())


def bit_linear(x: torch.Tensor, packed: PackedWeight, *, act: str = "sign", bits: int = 1,
               move: torch.Tensor | None = None, alpha: torch.Tensor | None = None,
               col_scale: torch.Tensor, bias: torch.Tensor | None = None,
               threads: int | None = None) -> torch.Tensor:
    """`y[..., n] = (acc * row_scale[m]) * col_scale[n] + bias[n]`, `acc = Qa(x) . W^T` (bit-exact int).

    act="sign" (bits=1): codes sign(x + move); row_scale = `alpha` (1 element) or mean_k |x + move|.
    act="absmax" (bits 2..8): BitNet per-token absmax codes in two's-complement planes; row_scale = 1/inv.
    act="unsigned" (bits=1, BiT {0, α}): codes 1[(x + move) / α > 0.5] in one plane; row_scale = α.
    `move` and `alpha` apply to act="sign" and "unsigned" only (ignored otherwise, as in the reference op).
    `col_scale` is `[N]` or one element. `threads=1` runs single-threaded kernels; otherwise TVM's pool
    is used, sized once (see `_parallel`: `threads`, else $TVM_NUM_THREADS, else torch.get_num_threads()). Returns float32, or x's dtype when x is float16/bfloat16.
    """
    if x.is_cuda:
        return _cuda().bit_linear(x, packed, act=act, bits=bits, move=move, alpha=alpha, col_scale=col_scale,
                                  bias=bias)
    x2, lead, dtype = _rows(x, packed.K, "x")
    par = _parallel(threads)
    M, N = x2.shape[0], packed.N
    if _act_pack(act) == "sign" and alpha is not None:  # a given α: sign codes, one row scale
        _check_bits(act, bits)
        a = _pack_sign(x2, packed.K, move, mean=False, par=par)
        row_scale = _vector(alpha, 1, "alpha").expand(M).contiguous()
    else:
        a, row_scale = _quantize(x2, packed.K, act, bits, move, par, alpha)
    cs = _vector(col_scale, N, "col_scale")
    if cs.numel() == 1:
        cs = cs.expand(N).contiguous()
    args = [a, packed.w, *_nnz(packed, act), row_scale, cs]
    if bias is not None:
        args.append(_vector(bias, N, "bias"))
    y = torch.empty(M, N, dtype=torch.float32)
    _gemm(packed, act, bits, par, epilogue="float", bias=bias is not None)(*args, y)
    y = y.view(*lead, N)
    return y if dtype == torch.float32 else y.to(dtype)


def bit_linear_int(x: torch.Tensor, packed: PackedWeight, *, act: str = "sign", bits: int = 1,
                   move: torch.Tensor | None = None,
                   alpha: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer contract: `(acc int32 [M, N], row_scale float32 [M])`, M = all leading dims of x.
    `alpha` is used by act="unsigned" only (its threshold α/2; sign codes do not depend on α)."""
    if x.is_cuda:
        return _cuda().bit_linear_int(x, packed, act=act, bits=bits, move=move, alpha=alpha)
    x2, _, _ = _rows(x, packed.K, "x")
    par = _parallel()
    a, row_scale = _quantize(x2, packed.K, act, bits, move, par, alpha)
    acc = torch.empty(x2.shape[0], packed.N, dtype=torch.int32)
    _gemm(packed, act, bits, par, epilogue="int", bias=False)(a, packed.w, *_nnz(packed, act), acc)
    return acc, row_scale


def sign_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`S[..., i, j] = sum_d sign(q[..., i, d]) * sign(k[..., j, d])` as int32 (leading dims kept)."""
    if q.is_cuda:
        return _cuda().sign_scores(q, k)
    if q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"sign_scores needs q [..., Lq, D] and k [..., Lk, D]; got {tuple(q.shape)}, {tuple(k.shape)}")
    lead, (Lq, D), Lk = q.shape[:-2], q.shape[-2:], k.shape[-2]
    q2, _, _ = _rows(q, D, "q")
    k2, _, _ = _rows(k, D, "k")
    G = q2.shape[0] // Lq if Lq else 0
    pack, gemm = scores_kernels(D)
    qp = torch.empty(q2.shape[0], _words(D), dtype=torch.uint64)
    kp = torch.empty(k2.shape[0], _words(D), dtype=torch.uint64)
    pack(q2, qp)
    pack(k2, kp)
    out = torch.empty(G, Lq, Lk, dtype=torch.int32)
    gemm(qp.view(G, Lq, -1), kp.view(G, Lk, -1).transpose(1, 2).contiguous(), out)
    return out.view(*lead, Lq, Lk)


def scores_kernels(D: int) -> list:
    """``sign_scores``' kernels for width D: [pack_rows (sign bits), batched xnor GEMM]."""
    par = _parallel()
    return [kernel("pack_rows", mode="sign", K=D, move=False, mean=False, parallel=par),
            kernel("gemm", mode="xnor", K=D, N=None, batched=True, parallel=par)]


def pv_kernels(p_dtype: str, Dv: int) -> list:
    """``binary_pv``'s kernels for p of dtype "uint8" or "float32" and width Dv: [pack_rows (nonzero bits),
    pack_cols (sign bits of v), batched and-GEMM]."""
    par = _parallel()
    return [kernel("pack_rows", mode="nonzero", K=None, dtype=p_dtype, parallel=par),
            kernel("pack_cols", K=None, N=Dv, parallel=par),
            kernel("gemm", mode="and", K=None, N=Dv, signed=False, batched=True, parallel=par)]


def binary_pv(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`O[..., i, d] = sum_j p[..., i, j] * sign(v[..., j, d])` as int32, for p in {0, 1}.

    p may be float32/16, uint8 or bool; any nonzero entry counts as 1.
    """
    if v.is_cuda:
        return _cuda().binary_pv(p, v)
    if p.shape[:-2] != v.shape[:-2] or p.shape[-1] != v.shape[-2]:
        raise ValueError(f"binary_pv needs p [..., Lq, Lk] and v [..., Lk, Dv]; got {tuple(p.shape)}, {tuple(v.shape)}")
    lead, (Lq, Lk), Dv = p.shape[:-2], p.shape[-2:], v.shape[-1]
    if p.dtype == torch.bool:
        p = p.view(torch.uint8)
    dt = {torch.uint8: "uint8"}.get(p.dtype, "float32")
    p2 = p.reshape(-1, Lk)
    p2 = (p2 if p.dtype == torch.uint8 else p2.float()).contiguous()
    v3, _, _ = _rows(v, Dv, "v")
    G = v3.shape[0] // Lk if Lk else p2.shape[0] // max(Lq, 1)
    pack_p, pack_v, gemm = pv_kernels(dt, Dv)
    pp = torch.empty(p2.shape[0], _words(Lk), dtype=torch.uint64)
    pack_p(p2, pp)
    vp = torch.empty(G, _words(Lk), Dv, dtype=torch.uint64)
    pack_v(v3.view(G, Lk, Dv), vp)
    out = torch.empty(G, Lq, Dv, dtype=torch.int32)
    gemm(pp.view(G, Lq, -1), vp, out)
    return out.view(*lead, Lq, Dv)


# ------------------------------------------------------------------------------------------ helpers
def _cuda():
    """CUDA tensors run the CUDA kernel sets (`bitfx.targets.cuda_runtime`: same calls, same contracts)."""
    from bitfx.targets import cuda_runtime

    return cuda_runtime


def _words(k: int) -> int:
    return (k + WORD - 1) // WORD


def check_features(x: torch.Tensor, K: int, name: str) -> None:
    """The activation contract of every kernel set: a float dtype and K features in the last dim."""
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, float16 or bfloat16; got {x.dtype}")
    if x.shape[-1] != K:
        raise ValueError(f"{name} has {x.shape[-1]} features in its last dim; the kernel expects K={K}")


def _rows(x: torch.Tensor, K: int, name: str):
    """x[..., K] -> (contiguous float32 [M, K], leading shape, original dtype)."""
    check_features(x, K, name)
    if x.device.type != "cpu":
        raise ValueError(f"{name} is on {x.device}; the host kernels run on CPU tensors")
    return x.reshape(-1, K).to(torch.float32).contiguous(), x.shape[:-1], x.dtype


def _vector(t: torch.Tensor, n: int, name: str) -> torch.Tensor:
    t = t.detach().reshape(-1).to(torch.float32).contiguous()
    if t.numel() not in (1, n):
        raise ValueError(f"{name} must have 1 or {n} elements, got {t.numel()}")
    return t


def _check_bits(act: str, bits: int) -> None:
    """``act`` is a registered activation method (``bitfx.ops.methods``) and ``bits`` fits it."""
    from bitfx.ops import methods

    methods.check_act_bits(act, bits)


def _act_kernel(act: str) -> str:
    """The GEMM family of an activation method: "xnor" (±1 codes) or "and" (k-bit planes)."""
    from bitfx.ops import methods

    return methods.act_method(act).kernel


def _act_pack(act: str) -> str:
    """How an activation method's codes are made: "sign", "absmax" or "unsigned" (``ActMethod.packing``)."""
    from bitfx.ops import methods

    return methods.act_method(act).packing


def unsigned_threshold(alpha: torch.Tensor | None, K: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(α [1], -α/2 [K])`` of act="unsigned": α clamped to >= 1e-5 as the reference clamps it. The
    code is ``u > α/2`` (``pack_rows(mode="pos")`` of ``u + (-α/2)``), which equals the reference's
    ``clip(round(u / α), 0, 1)`` for every float u: no float lies in (α/2, α/2·(1 + 2^-24)], the
    values whose quotient rounds down to 0.5."""
    from bitfx.ops.quantizers import EPS

    if alpha is None:
        raise ValueError("act='unsigned' needs alpha (one element): its codes are u > alpha/2")
    a = alpha.detach().reshape(-1).to(torch.float32)
    if a.numel() != 1:
        raise ValueError(f"alpha must have 1 element, got {a.numel()}")
    a = a.clamp(min=EPS).to(device if device is not None else a.device).contiguous()
    return a, (a * -0.5).expand(K).contiguous()


def _pack_unsigned(x2: torch.Tensor, K: int, move, alpha, par: bool):
    """{0, 1} codes ``(x + move) > α/2`` packed in one plane, and the row scale α."""
    a, threshold = unsigned_threshold(alpha, K)
    u = x2 if move is None else (x2 + _vector(move, K, "move")).contiguous()
    out = torch.empty(x2.shape[0], _words(K), dtype=torch.uint64)
    kernel("pack_rows", mode="pos", K=K, move=True, parallel=par)(u, threshold, out)
    return out, a.expand(x2.shape[0]).contiguous()


def _pack_sign(x2: torch.Tensor, K: int, move, mean: bool, par: bool):
    out = torch.empty(x2.shape[0], _words(K), dtype=torch.uint64)
    args = [x2] + ([_vector(move, K, "move")] if move is not None else []) + [out]
    fn = kernel("pack_rows", mode="sign", K=K, move=move is not None, mean=mean, parallel=par)
    if mean:
        rs = torch.empty(x2.shape[0], dtype=torch.float32)
        fn(*args, rs)
        return out, rs
    fn(*args)
    return out


def _quantize(x2: torch.Tensor, K: int, act: str, bits: int, move, par: bool, alpha=None):
    """Activation codes, packed, and the per-row scale (`move` is used by act="sign"/"unsigned" only)."""
    _check_bits(act, bits)
    pack = _act_pack(act)
    if pack == "sign":  # ±1 codes; else one {0, 1} plane (unsigned) or k-bit absmax planes
        return _pack_sign(x2, K, move, mean=True, par=par)
    if pack == "unsigned":
        return _pack_unsigned(x2, K, move, alpha, par)
    planes = torch.empty(x2.shape[0], bits, _words(K), dtype=torch.uint64)
    rs = torch.empty(x2.shape[0], dtype=torch.float32)
    kernel("absmax_planes", K=K, bits=bits, parallel=par)(x2, planes, rs)
    return planes, rs


#: Row blocks per chunk of the panel GEMM's walk (`host.gemm(row_chunk=...)`): four, so the output is
#: written 16 rows at a time front to back and each weight panel is used four times from L1. At M = 1024,
#: K = 384 (MiniLM, batch 8 x 128) the column-panel walk (0) ran at 540-820 G bit-MAC/s into a warm output
#: and 360-400 into a fresh one; in chunks of four: 900-920 and 370-670; BERT-base shapes (M = 128) equal
#: or better, most of all into fresh outputs (`python benchmarks/bench_gemm_walk.py`; BENCHMARKS.md).
ROW_CHUNK = 4


def weight_walk(packed: PackedWeight) -> dict:
    """The GEMM generator's layout arguments for this weight: `layout` and `row_chunk` for panels; none for
    K-major (whose kernels keep their keys)."""
    return _walk(packed.layout)


def _walk(layout: str) -> dict:
    return {"layout": "panel", "row_chunk": ROW_CHUNK} if layout == "panel" else {}


#: What a linear plan's GEMM may apply to its float output (`host.gemm(activation=...)`): the float glue's
#: next op fused into the epilogue by `bitfx.passes.lower_kernels`.
ACTIVATIONS = ("none", "gelu")

#: What a linear plan's GEMM writes: its float output, or ("sign_bits") the next binary linear's packed sign
#: codes of that output (`LinearPlan.to_bits`; `host.gemm(epilogue="sign_bits")`).
OUTPUTS = ("float", "sign_bits")


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown bit_linear output activation {activation!r}; expected one of {ACTIVATIONS}")


def check_output(output: str, N: int) -> None:
    if output not in OUTPUTS:
        raise ValueError(f"unknown bit_linear output {output!r}; expected one of {OUTPUTS}")
    if output == "sign_bits" and N % WORD:
        raise ValueError(f"output='sign_bits' packs whole 64-bit words of each row: N must be a multiple of "
                         f"{WORD}, got N={N}")


def packed_sign_rows(bits: torch.Tensor, K: int, name: str = "bits") -> torch.Tensor:
    """Packed sign codes ``[..., ceil(K/64)]`` (int64 or uint64, as `LinearPlan.to_bits` returns them) as the
    GEMM's ``uint64 [M, KW]`` (a view; contiguous)."""
    if bits.dtype not in (torch.int64, torch.uint64):
        raise TypeError(f"{name} must be packed words (int64 or uint64); got {bits.dtype}")
    if bits.dim() < 1 or bits.shape[-1] != _words(K):
        raise ValueError(f"{name} has {bits.shape[-1] if bits.dim() else 0} words in its last dim; K={K} "
                         f"needs {_words(K)}")
    if bits.device.type != "cpu":
        raise ValueError(f"{name} is on {bits.device}; the host kernels run on CPU tensors")
    return bits.reshape(-1, _words(K)).contiguous().view(torch.uint64)


def _gemm(packed: PackedWeight, act: str, bits: int, par: bool, *, epilogue: str, bias: bool,
          activation: str = "none", out_move: bool = False):
    op, params = _gemm_spec(packed.K, packed.N, packed.ternary, packed.layout, act, bits, par, epilogue=epilogue,
                            bias=bias, activation=activation, out_move=out_move)
    return kernel(op, **params)


def _gemm_spec(K: int, N: int, ternary: bool, layout: str, act: str, bits: int, par: bool, *, epilogue: str,
               bias: bool, activation: str = "none", out_move: bool = False) -> tuple[str, dict]:
    mode = _act_kernel(act) + ("_ternary" if ternary else "")
    fused = {"activation": activation} if activation != "none" else {}  # the plain kernels keep their keys
    if out_move:
        fused["out_move"] = True
    return "gemm", dict(mode=mode, K=K, N=N, planes=bits, epilogue=epilogue, bias=bias, parallel=par,
                        **_walk(layout), **fused)


def plan_kernels(K: int, N: int, *, ternary: bool, act: str = "sign", bits: int = 1, move: bool = False,
                 alpha: bool = False, bias: bool = False, activation: str = "none", output: str = "float",
                 out_move: bool = False, threads: int | None = None, layout: str = "panel") -> list[tuple[str, dict]]:
    """``[(op, params), ...]``: the kernels a host ``LinearPlan`` of these options calls (its quantizer, its GEMM,
    then the weight's packing), as ``build.kernel`` / ``build.prefetch`` take them. The flags say which tensors
    the plan is given; ``layout``: the packed weight's (``pack_weight`` makes panels). ``LinearPlan`` builds its
    kernels from this list, so what the lowering prefetches is what the plan calls."""
    _check_bits(act, bits)
    par = _parallel(threads)
    pack = _act_pack(act)
    if pack == "unsigned":
        quant = ("pack_rows", dict(mode="pos", K=K, move=True, parallel=par))
    elif act == "sign":
        quant = ("pack_rows", dict(mode="sign", K=K, move=move, mean=not alpha, parallel=par))
    else:
        quant = ("absmax_planes", dict(K=K, bits=bits, parallel=par))
    gemm = _gemm_spec(K, N, ternary, layout, act, bits, par, epilogue=output if output == "sign_bits" else "float",
                      bias=bias, activation=activation, out_move=out_move)
    return [quant, gemm, *(_weight_pack_spec(K, m) for m in (("pos", "neg") if ternary else ("pos",)))]


def _nnz(packed: PackedWeight, act: str) -> list:
    return [packed.nnz] if packed.ternary and _act_kernel(act) == "xnor" else []


_pool_size: int | None = None


def _parallel(threads: int | None = None) -> bool:
    """Whether to run the pooled (parallel) kernel variants; sizes TVM's pool once.

    `threads=1` runs single-threaded kernel variants and never touches the pool. Otherwise the pool size
    is fixed at first use: `threads`, else $TVM_NUM_THREADS, else torch.get_num_threads(). TVM reads
    TVM_NUM_THREADS when its pool starts; resizing it later (`runtime.config_threadpool`) also pins the
    calling thread's CPU affinity, which slows torch down, so a later different count is only logged.
    """
    global _pool_size
    if threads == 1:
        return False
    if _pool_size is None:
        n = threads or int(os.environ.get("TVM_NUM_THREADS") or torch.get_num_threads())
        os.environ.setdefault("TVM_NUM_THREADS", str(n))
        _pool_size = int(os.environ["TVM_NUM_THREADS"])
    elif threads is not None and threads != _pool_size:
        log.warning("bitfx kernels keep their %d-thread pool; threads=%d is honoured only as 1", _pool_size, threads)
    return _pool_size > 1


class LinearPlan:
    """One ``bit_linear`` layer with everything but the activation resolved ahead: the compiled
    kernels, the contiguous float32 scale/bias/move vectors and the pool choice.

        plan = LinearPlan(packed, act="sign", bits=1, move=m, alpha=None, col_scale=s, bias=b)
        y = plan(x)        # the same result as bit_linear(x, packed, ...), with less work per call

    Calls then cost a reshape, the output allocations and two kernel calls (this is the decode path,
    where M = 1 and the per-call overhead is the whole cost). Build a new plan when a parameter
    changes (``bitfx.passes.lower_kernels`` keys it by the tensors' ``_version``).
    ``activation="gelu"``: the GEMM's epilogue writes GELU(y) (exact form), ``F.gelu(plan(x))`` to float
    rounding, without a pass over y.
    ``output="sign_bits"``: the plan feeds a binary linear whose activation is ``sign(· + out_move)`` with a
    given α (BiT/BiPFT's elastic codes): ``plan.to_bits(x)`` returns those codes packed, int64
    ``[..., N/64]``, and the float output is never written; the next layer's plan takes them with
    ``next_plan.on_bits(bits)``. Together: ``next_plan(plan(x))`` with the sign-and-pack in this GEMM's
    epilogue (bit-exact on the codes; a value within float rounding of 0 may take the other sign).
    """

    def __new__(cls, packed: PackedWeight, **kwargs):
        if packed.planes.is_cuda:  # a weight packed on a GPU: the CUDA plan (`bitfx.targets.cuda_runtime`)
            return _cuda().LinearPlan(packed, **kwargs)
        return super().__new__(cls)

    def __init__(self, packed: PackedWeight, *, act: str = "sign", bits: int = 1,
                 move: torch.Tensor | None = None, alpha: torch.Tensor | None = None,
                 col_scale: torch.Tensor, bias: torch.Tensor | None = None, threads: int | None = None,
                 activation: str = "none", output: str = "float", out_move: torch.Tensor | None = None):
        _check_bits(act, bits)
        check_activation(activation)
        check_output(output, packed.N)
        if out_move is not None and output != "sign_bits":
            raise ValueError("out_move (the next layer's move) needs output='sign_bits'")
        self.K, self.N, self.act, self.bits, self.activation = packed.K, packed.N, act, bits, activation
        self.output = output
        self.out_move = None if out_move is None else _vector(out_move, packed.N, "out_move")
        cs = _vector(col_scale, packed.N, "col_scale")
        self.col = cs.expand(packed.N).contiguous() if cs.numel() == 1 else cs
        self.bias = None if bias is None else _vector(bias, packed.N, "bias")
        self.pack = _act_pack(act)
        self.alpha = None if (self.pack == "absmax" or alpha is None) else _vector(alpha, 1, "alpha")
        self.move = None if (self.pack == "absmax" or move is None) else _vector(move, packed.K, "move")
        self.weights = [packed.w, *_nnz(packed, act)]
        self.words = _words(packed.K)
        if self.pack == "unsigned":  # u = x + move in torch, then u > α/2 (the threshold as pack's move)
            self.alpha, self.threshold = unsigned_threshold(self.alpha, packed.K)
        (qop, qparams), (gop, gparams), *_ = plan_kernels(
            packed.K, packed.N, ternary=packed.ternary, act=act, bits=bits, move=self.move is not None,
            alpha=self.alpha is not None, bias=self.bias is not None, activation=activation, output=output,
            out_move=self.out_move is not None, threads=threads, layout=packed.layout)
        self.quant, self.gemm = kernel(qop, **qparams), kernel(gop, **gparams)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.output != "float":
            raise ValueError(f"this plan writes output={self.output!r}: call plan.to_bits(x)")
        a, rs, lead, dtype = self._quantized(x)
        y = self._float_gemm(a, rs)
        y = y.view(*lead, self.N)
        return y if dtype == torch.float32 else y.to(dtype)

    def to_bits(self, x: torch.Tensor) -> torch.Tensor:
        """The next layer's packed sign codes of this layer's output (``output="sign_bits"``): int64
        ``[..., N/64]``, bit j of word w = ``NOT(act(y)[..., 64w + j] + out_move < 0)``."""
        if self.output != "sign_bits":
            raise ValueError("to_bits needs a plan built with output='sign_bits'")
        a, rs, lead, _ = self._quantized(x)
        out = torch.empty(a.shape[0], self.N // WORD, dtype=torch.int64)
        args = [a, *self.weights, rs, self.col] + [t for t in (self.bias, self.out_move) if t is not None]
        self.gemm(*args, out.view(torch.uint8))
        return out.view(*lead, self.N // WORD)

    def on_bits(self, bits: torch.Tensor) -> torch.Tensor:
        """This layer on activation codes already signed and packed (``to_bits`` of the layer before, its move
        applied there): float32 ``[..., N]``. Needs act="sign" with a given α (the row scale)."""
        if self.act != "sign" or self.pack != "sign" or self.alpha is None or self.output != "float":
            raise ValueError(f"on_bits needs a plan of act='sign' with a given alpha and a float output; this one "
                             f"has act={self.act!r}, alpha {'given' if self.alpha is not None else 'None'}, "
                             f"output={self.output!r}")
        a = packed_sign_rows(bits, self.K)
        y = self._float_gemm(a, self.alpha.expand(a.shape[0]).contiguous())
        return y.view(*bits.shape[:-1], self.N)

    def _float_gemm(self, a: torch.Tensor, rs: torch.Tensor) -> torch.Tensor:
        y = torch.empty(a.shape[0], self.N, dtype=torch.float32)
        args = [a, *self.weights, rs, self.col] + ([self.bias] if self.bias is not None else [])
        self.gemm(*args, y)
        return y

    def _quantized(self, x: torch.Tensor):
        """``(packed codes, row scale, leading shape, x's dtype)`` of an input."""
        if x.dtype == torch.float32 and x.is_contiguous() and x.device.type == "cpu" and x.shape[-1] == self.K:
            x2, lead, dtype = x.view(-1, self.K), x.shape[:-1], torch.float32  # the common case, no checks
        else:
            x2, lead, dtype = _rows(x, self.K, "x")
        M = x2.shape[0]
        pre = [x2] if self.move is None else [x2, self.move]
        if self.pack == "unsigned":
            a = torch.empty(M, self.words, dtype=torch.uint64)
            self.quant(x2 if self.move is None else x2 + self.move, self.threshold, a)
            rs = self.alpha.expand(M).contiguous()
        elif self.act == "sign":
            a = torch.empty(M, self.words, dtype=torch.uint64)
            if self.alpha is None:
                rs = torch.empty(M, dtype=torch.float32)
                self.quant(*pre, a, rs)
            else:
                self.quant(*pre, a)
                rs = self.alpha.expand(M).contiguous()
        else:
            a = torch.empty(M, self.bits, self.words, dtype=torch.uint64)
            rs = torch.empty(M, dtype=torch.float32)
            self.quant(x2, a, rs)
        return a, rs, lead, dtype


__all__.append("LinearPlan")
