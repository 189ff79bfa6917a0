"""``bit_attention`` as one call of the fused host kernel (``bitfx/targets/host_attention.py``).

    out = fused_attention(q, k, v, bias, est_v, alpha_q, alpha_k, alpha_v, prob_param, scale, is_causal, "bivit")

Covered (``unsupported_reason`` is None): CPU tensors; prob modes ``bivit`` (β given or the default 0.25),
``bool``, and ``elastic`` with a given α_P; q, k, v with the same leading dims (any number, flattened to
(batch, heads)); D up to 1024 and Dv up to 256 (any width, not only multiples of 64); any mask (boolean,
additive, broadcastable), causality, the BiPFT estimators, α_q/α_k/α_v given (scalars) or None (the means).
Everything else (elastic with α_P None: a batch-wide mean of the softmax; other prob modes; broadcast
q/k/v; CUDA tensors; empty sequences) keeps the two-kernel formula: the lowering asks first.
``BITFX_FUSED_ATTENTION=0`` keeps it everywhere (A/B measurements).

The additive ``bias`` (masks as 0/-inf) is built by ``score_bias`` with torch ops (the compiled glue); the
kernel adds it broadcast over batch, heads and query rows as its shape says. BiPFT's score estimators
(rank r ≤ 8) go to the kernel as they are: their residual is 2r multiply-adds per score there, where a
``[B, H, Lq, Lk]`` float bias built outside cost more than the whole kernel (MiniLM: 3.9 vs 1.7 ms a call).
Inputs are computed in float32 (fp16/bf16 cast here); the output is float32.

The kernel op ``bitfx_kernels::fused_attention`` has a C++ CPU kernel (``bitfx/ops/native.cpp``, loaded with the
other kernel ops): for 4-D float32 q/k/v, a ``[bB, bH, bQ, Lk]`` bias and contiguous estimators it reads the
scalars, finds the kernel by configuration (``_kernel_handle``, once) and calls it without Python; anything else
goes to ``fused_attention`` here (``_fused_attention_python``). ``calls()`` counts both paths.
"""

from __future__ import annotations

import collections
import math
from typing import Optional

import torch
from torch import Tensor

from bitfx.env import switched_off

__all__ = ["fused_attention", "calls", "score_bias", "unsupported_reason", "bit_attention_fused",
           "bit_attention_on_fused_kernel", "FUSED_ATTENTION_KERNEL", "STATS", "MAX_D", "MAX_DV", "MAX_EST_RANK"]

#: "calls" of the fused kernel through this Python implementation (``calls()`` adds the C++ op's); "fused" /
#: "two_kernels": bit_attention calls (or traces) routed each way.
STATS: collections.Counter = collections.Counter()
MAX_D = 1024
MAX_DV = 256
MAX_EST_RANK = 8
_MODES = ("bivit", "bool", "elastic")


def unsupported_reason(qt, k, v, attn_mask, alpha_q, alpha_k, alpha_v, prob_param, est_q, est_k, est_v,
                       scale, is_causal, prob_mode) -> Optional[str]:
    """Why this ``bit_attention`` call keeps the two-kernel path, or None when the fused kernel runs it."""
    if switched_off("BITFX_FUSED_ATTENTION"):  # every call on the two-kernel path (A/B runs)
        return "BITFX_FUSED_ATTENTION=0"
    if prob_mode not in _MODES:
        return f"prob_mode {prob_mode!r}"
    if prob_mode == "elastic" and prob_param is None:
        return "elastic with alpha_P None (4·mean(P) over the whole batch)"
    if any(t.device.type != "cpu" for t in (qt, k, v)):
        return "not on the CPU"
    if qt.dim() < 2 or qt.shape[:-2] != k.shape[:-2] or qt.shape[:-2] != v.shape[:-2]:
        return "q, k, v leading dims differ (broadcast)"
    if qt.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        return "shapes do not match"
    if not (1 <= qt.shape[-1] <= MAX_D and 1 <= v.shape[-1] <= MAX_DV):
        return f"D={qt.shape[-1]} or Dv={v.shape[-1]} out of range (1..{MAX_D}, 1..{MAX_DV})"
    if qt.shape[-2] == 0 or k.shape[-2] == 0 or qt.numel() == 0:
        return "empty"
    if any(t is not None and t.numel() != 1 for t in (alpha_q, alpha_k, alpha_v, prob_param)):
        return "a scale is not a scalar"
    if est_v is not None and (est_v.shape[-1] != 1 or est_v.shape[:-1] != v.shape[:-1]):
        return f"est_v of shape {tuple(est_v.shape)} is not [..., Lk, 1] with v's leading dims"
    if est_q is not None and est_k is not None:
        w = est_q.shape[-1]
        if est_q.shape[:-1] != qt.shape[:-1] or est_k.shape[:-1] != k.shape[:-1] or est_k.shape[-1] != w \
                or w % 2 or not 2 <= w <= 2 * MAX_EST_RANK:
            return f"score estimators of shapes {tuple(est_q.shape)}, {tuple(est_k.shape)}"
    return None


def score_bias(attn_mask: Optional[Tensor]) -> Optional[Tensor]:
    """The additive score term the kernel reads: the mask as float32 (boolean: 0 where kept, -inf where
    masked); None without a mask. (BiPFT's score residual is computed in the kernel.)"""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return torch.where(attn_mask, 0.0, float("-inf"))
    return attn_mask.float()


def _heads(lead) -> tuple[int, int]:
    if len(lead) == 0:
        return 1, 1
    return math.prod(lead[:-1]), lead[-1]


def _canonical_bias(bias: Tensor, lead, Bt: int, H: int, Lq: int, Lk: int):
    """``bias`` broadcastable to ``[*lead, Lq, Lk]`` as a contiguous float32 ``[bB, bH, bQ, Lk]`` (each of
    the first three dims full or 1) and its pattern (which are full)."""
    if bias.dim() == 4 == len(lead) + 2 and bias.dtype == torch.float32 and bias.shape[-1] == Lk \
            and bias.is_contiguous() and all(d in (1, want) for d, want in zip(bias.shape[:3], (Bt, H, Lq))):
        return bias, (bias.shape[0] != 1, bias.shape[1] != 1, bias.shape[2] != 1)  # as it is (~10 µs less)
    n = len(lead) + 2
    if bias.dim() > n:
        raise ValueError(f"bit_attention mask/bias of shape {tuple(bias.shape)} has more dims than the scores "
                         f"{(*lead, Lq, Lk)}")
    b = bias.reshape((1,) * (n - bias.dim()) + tuple(bias.shape))
    if any(d not in (1, want) for d, want in zip(b.shape, (*lead, Lq, Lk))):
        raise ValueError(f"bit_attention mask/bias of shape {tuple(bias.shape)} does not broadcast to the "
                         f"scores {(*lead, Lq, Lk)}")
    nf = len(lead) - 1  # batch dims in front of the heads, merged into one
    if nf >= 1:
        rest = tuple(b.shape[nf:])
        if all(d == 1 for d in b.shape[:nf]):
            b = b.reshape(1, *rest)
        else:
            b = b.expand(*lead[:-1], *rest).reshape(Bt, *rest)
    else:
        b = b.reshape((1,) * (-nf) + tuple(b.shape))
    if b.shape[-1] != Lk:
        b = b.expand(*b.shape[:-1], Lk)
    full = tuple(bool(s != 1) for s in b.shape[:3])
    return b.to(torch.float32).contiguous(), full


def _rows(t: Tensor, Bt: int, H: int) -> Tensor:
    if t.dim() == 4 and t.dtype == torch.float32 and t.is_contiguous():
        return t  # the common case, without three no-op calls (~5 µs)
    return t.reshape(Bt, H, t.shape[-2], t.shape[-1]).to(torch.float32).contiguous()


def _strided_rows(t: Tensor, Bt: int, H: int) -> Tensor:
    """q, k, v for the kernel, which reads any strides with a unit last one: a transposed view
    (``[B, L, H, D]`` -> ``[B, H, L, D]``, as attention modules make them) is passed without a copy."""
    if t.dim() != 4:
        t = t.reshape(Bt, H, t.shape[-2], t.shape[-1])
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def fused_attention(qt: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], est_v: Optional[Tensor],
                    alpha_q: Optional[Tensor], alpha_k: Optional[Tensor], alpha_v: Optional[Tensor],
                    prob_param: Optional[Tensor], scale: float, is_causal: bool, prob_mode: str,
                    est_q: Optional[Tensor] = None, est_k: Optional[Tensor] = None, *,
                    debug: bool = False, threads: Optional[int] = None):
    """float32 ``[*lead, Lq, Dv]``; with ``debug`` also the packed codes ``[*lead, Lq, ceil(Lk/64)]`` (uint64,
    bit j of word w = key 64w + j) and the integer counts ``Σ_j P[i, j]·sign(v[j, d])`` ``[*lead, Lq, Dv]``.

    ``est_q``/``est_k`` (both, ``[*lead, L, 2r]``): BiPFT's score estimators, whose residual the kernel adds to
    the scores (``bias`` then holds the mask only); one of them None: no residual, as the reference."""
    from bitfx.codegen.build import kernel
    from bitfx.ops.quantizers import EPS

    if prob_mode not in _MODES:
        raise ValueError(f"fused_attention: prob_mode={prob_mode!r} (accepted: {', '.join(map(repr, _MODES))})")
    if prob_mode == "elastic" and prob_param is None:
        raise ValueError("fused_attention: elastic needs a given alpha_P (prob_param); None is the two-kernel path")
    if qt.dim() < 2 or qt.shape[:-2] != k.shape[:-2] or qt.shape[:-2] != v.shape[:-2] \
            or qt.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(f"fused_attention needs q [..., Lq, D], k [..., Lk, D], v [..., Lk, Dv] with the same "
                         f"leading dims; got {tuple(qt.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    lead, (Lq, D), Lk, Dv = qt.shape[:-2], qt.shape[-2:], k.shape[-2], v.shape[-1]
    Bt, H = _heads(lead)
    args = [_strided_rows(qt, Bt, H), _strided_rows(k, Bt, H), _strided_rows(v, Bt, H)]
    pattern = None
    if bias is not None:
        b, pattern = _canonical_bias(bias, lead, Bt, H, Lq, Lk)
        args.append(b)
    if est_v is not None:
        args.append(est_v.reshape(Bt, H, Lk).to(torch.float32).contiguous())
    rank = 0
    if est_q is not None and est_k is not None:
        rank = est_q.shape[-1] // 2
        if est_q.shape[:-1] != qt.shape[:-1] or tuple(est_k.shape) != (*k.shape[:-1], 2 * rank) \
                or est_q.shape[-1] != 2 * rank or not 1 <= rank <= MAX_EST_RANK:
            raise ValueError(f"fused_attention: est_q {tuple(est_q.shape)} and est_k {tuple(est_k.shape)} must be "
                             f"[..., Lq, 2r] and [..., Lk, 2r] with q's leading dims and 1 <= r <= {MAX_EST_RANK}")
        args += [_rows(est_q, Bt, H), _rows(est_k, Bt, H)]
    if prob_mode == "bivit":  # the threshold ln β (β <= 0: every code 1)
        beta = 0.25 if prob_param is None else float(prob_param)
        p = math.log(beta) if beta > 0 else -math.inf
    elif prob_mode == "elastic":
        p = max(float(prob_param), EPS)  # as prob_elastic's clamp(min=EPS)
    else:
        p = 0.0
    scalars = torch.tensor([float(scale), *(0.0 if a is None else float(a) for a in (alpha_q, alpha_k, alpha_v)), p],
                           dtype=torch.float32)
    args.append(scalars)
    out = torch.empty(Bt, H, Lq, Dv, dtype=torch.float32)
    args.append(out)
    if debug:
        codes = torch.empty(Bt, H, Lq, (Lk + 63) // 64, dtype=torch.uint64)
        counts = torch.empty(Bt, H, Lq, Dv, dtype=torch.int32)
        args += [codes, counts]
    op, params = _kernel_spec(D, Dv, prob_mode, pattern, is_causal, alpha_q is not None, alpha_k is not None,
                              alpha_v is not None, est_v is not None, rank, debug=debug, threads=threads)
    fn = kernel(op, **params)
    fn(*args)
    STATS["calls"] += 1
    out = out.view(*lead, Lq, Dv)
    if debug:
        return out, codes.view(*lead, Lq, -1), counts.view(*lead, Lq, Dv)
    return out


def bit_attention_fused(qt, k, v, attn_mask, alpha_q, alpha_k, alpha_v, prob_param, est_q, est_k, est_v,
                        scale, is_causal, prob_mode, *, kernel_op=None, fallback=None):
    """``bit_attention`` on the fused kernel when covered (traceable: the bias is torch ops, the kernel one
    op), else ``fallback(*args)`` (the two-kernel formula)."""
    from bitfx.ops.attention import _default_scale, check_prob_mode

    args = (qt, k, v, attn_mask, alpha_q, alpha_k, alpha_v, prob_param, est_q, est_k, est_v, scale, is_causal,
            prob_mode)
    check_prob_mode(prob_mode)
    count = not torch.compiler.is_dynamo_compiling()  # a counter dynamo traced would be a guard per value
    if unsupported_reason(*args) is not None:
        if count:
            STATS["two_kernels"] += 1
        return fallback(*args)
    if count:
        STATS["fused"] += 1
    s = _default_scale(qt, scale)
    bias = score_bias(attn_mask)
    run = kernel_op or fused_attention
    out = run(qt, k, v, bias, est_v, alpha_q, alpha_k, alpha_v, prob_param, float(s), bool(is_causal), prob_mode,
              est_q=est_q, est_k=est_k)
    return out.to(qt.dtype)


# -- the kernel op: what a compiled graph calls (glue="inductor"), opaque to inductor ---------------------
def _kernel_spec(D: int, Dv: int, prob_mode: str, pattern, causal: bool, alpha_q: bool, alpha_k: bool, alpha_v: bool,
                 est_v: bool, est_rank: int, *, debug: bool = False, threads: Optional[int] = None):
    """``(op, params)`` of the kernel for one configuration, as ``build.kernel`` and ``build.prefetch`` take it.
    ``pattern``: None without a bias, else which of its (batch, heads, query rows) dims are full."""
    from bitfx.codegen.runtime import _parallel

    return "fused_attention", dict(D=D, Dv=Dv, prob_mode=prob_mode, bias=pattern, causal=bool(causal),
                                   alpha_q=alpha_q, alpha_k=alpha_k, alpha_v=alpha_v, est_v=est_v, est_rank=est_rank,
                                   debug=debug, parallel=_parallel(threads))


def kernel_spec(qt, k, v, attn_mask, alpha_q, alpha_k, alpha_v, prob_param, est_q, est_k, est_v, scale, is_causal,
                prob_mode):
    """The kernel a ``bit_attention`` call with these arguments (tensors or their fake values: only shapes,
    dtypes and devices are read) runs on, ``(op, params)``; None when it keeps the two-kernel path or its mask
    is not a plain ``[B, H, Lq, Lk]`` broadcast (the kernel is then chosen at the call)."""
    args = (qt, k, v, attn_mask, alpha_q, alpha_k, alpha_v, prob_param, est_q, est_k, est_v, scale, is_causal,
            prob_mode)
    if unsupported_reason(*args) is not None or qt.dim() != 4:
        return None
    pattern = None
    if attn_mask is not None:
        if attn_mask.dim() > 4 or attn_mask.shape[-1] not in (1, k.shape[-2]):
            return None
        shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
        pattern = tuple(bool(d != 1) for d in shape[:3])
    rank = est_q.shape[-1] // 2 if est_q is not None and est_k is not None else 0
    return _kernel_spec(qt.shape[-1], v.shape[-1], prob_mode, pattern, is_causal, alpha_q is not None,
                        alpha_k is not None, alpha_v is not None, est_v is not None, rank)


def _kernel_handle(D: int, Dv: int, prob_mode: str, bias_pattern: int, causal: bool, alpha_q: bool, alpha_k: bool,
                   alpha_v: bool, est_v: bool, est_rank: int) -> int:
    """The C++ op's kernel (native.cpp, once per configuration): its TVM-FFI handle. ``bias_pattern``: -1 without
    a bias, else bit i set where the bias's dim i (batch, heads, query rows) is full."""
    from bitfx.codegen.build import kernel

    pattern = None if bias_pattern < 0 else tuple(bool(bias_pattern >> i & 1) for i in range(3))
    op, params = _kernel_spec(D, Dv, prob_mode, pattern, causal, alpha_q, alpha_k, alpha_v, est_v, est_rank)
    return kernel(op, **params).__chandle__()


def calls() -> int:
    """Calls of the fused kernel so far: through the Python implementation and through the C++ op."""
    from bitfx.ops import native

    return STATS["calls"] + native.attention_calls()


def _define_op():
    from bitfx.ops import kernel_ops

    lib = torch.library.Library("bitfx_kernels", "FRAGMENT")
    schema = ("(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? est_v, Tensor? alpha_q, Tensor? alpha_k, "
              "Tensor? alpha_v, Tensor? prob_param, float scale, bool is_causal, str prob_mode, Tensor? est_q=None, "
              "Tensor? est_k=None) -> Tensor")
    lib.define("fused_attention" + schema)
    # the C++ CPU kernel (bitfx/ops/native.cpp) takes over once loaded; it sends what it does not cover here
    lib.define("_fused_attention_python" + schema)
    lib.define("_fused_attention_kernel(int D, int Dv, str prob_mode, int bias_pattern, bool causal, bool alpha_q, "
               "bool alpha_k, bool alpha_v, bool est_v, int est_rank) -> int")
    lib.impl("fused_attention", kernel_ops._loading_native(fused_attention), "CompositeExplicitAutograd")
    lib.impl("_fused_attention_python", fused_attention, "CPU")
    lib.impl("_fused_attention_kernel", _kernel_handle, "CPU")

    @torch.library.register_fake("bitfx_kernels::fused_attention", lib=lib)
    def _(q, k, v, bias, est_v, alpha_q, alpha_k, alpha_v, prob_param, scale, is_causal, prob_mode, est_q=None,
          est_k=None):
        return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=torch.float32)

    return lib


_LIB = _define_op()
FUSED_ATTENTION_KERNEL = torch.ops.bitfx_kernels.fused_attention.default


def bit_attention_on_fused_kernel(*args):
    """``bit_attention`` for a compiled graph (glue="inductor"): the fused kernel op when covered, else the
    two kernel ops ``sign_scores``/``binary_pv`` with the float parts between them (traceable)."""
    from bitfx.ops.kernel_ops import bit_attention_on_kernels

    return bit_attention_fused(*args, kernel_op=FUSED_ATTENTION_KERNEL, fallback=bit_attention_on_kernels)
