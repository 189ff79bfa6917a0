"""The host kernels as ``torch.library`` ops, so that a compiled graph calls them as extern kernels.

    y = torch.ops.bitfx_kernels.bit_linear(x, W, b, s, move, alpha, "sign_tensor", "sign", 1)
    S = torch.ops.bitfx_kernels.sign_scores(q, k)        # int32: sign(q) · sign(k)ᵀ
    O = torch.ops.bitfx_kernels.binary_pv(p_codes, v)     # int32: P_b · sign(v)

They are *implementations* of ``bit_linear`` and of the two integer products of ``bit_attention``
(DESIGN §2), opaque to the compiler (fake functions give their shapes): with ``glue="inductor"``
the lowering puts them in the forward graph and inductor compiles everything around them (softmax,
LayerNorm, GELU, residual adds, scales, masks, probability binarizers) into fused C++ loops, while
these stay calls of the TVM kernels. ``bit_linear`` with ``cache=True`` (a weight that is a parameter
or a view/slice of one) keeps one ``runtime.LinearPlan`` per weight, weakly keyed by the parameter (a
slice such as MHA's ``in_proj_weight[E:]`` is a new view each call: its base, offset and strides key
it), rebuilt when the weight or one of its vectors changes (storage pointer and ``_version``: every
in-place update, e.g. ``optimizer.step()``, bumps it), so a packed weight is never stale. A weight
the graph computes (``cache=False``) is packed per call. No autograd: forward graphs only.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from bitfx.ops import methods, native
from bitfx.ops.linear import quantize_weight

__all__ = ["linear_plan", "BIT_LINEAR_KERNEL", "SIGN_SCORES_KERNEL", "BINARY_PV_KERNEL",
           "bit_attention_on_kernels"]

#: parameter (a view's base) -> {view geometry: (key, LinearPlan)}; weak: dropped with the parameter.
_PLANS: "WeakIdKeyDictionary[Tensor, dict]" = WeakIdKeyDictionary()


def _key(*tensors) -> tuple:
    return tuple(None if t is None else (t.data_ptr(), t._version) for t in tensors)


def linear_plan(weight: Tensor, bias: Optional[Tensor], weight_scale: Optional[Tensor], move: Optional[Tensor],
                alpha: Optional[Tensor], weight_mode: str, act_mode: str, act_bits: int, cache: bool = True,
                view: Optional[tuple] = None, activation: str = "none"):
    """The ``runtime.LinearPlan`` of this layer: the weight binarized and packed once per version.

    ``view`` (size, stride, offset): the layer's weight is that view of ``weight`` (a parameter).
    ``activation``: applied to the output in the GEMM's epilogue (``runtime.ACTIVATIONS``).
    """
    param = weight
    if view is not None:
        weight = param.as_strided(view[0], view[1], view[2])
    if not cache:
        return _new_plan(weight, bias, weight_scale, move, alpha, weight_mode, act_mode, act_bits, False, activation)
    base = param if param._base is None else param._base
    views = _PLANS.get(base)
    if views is None:
        views = _PLANS[base] = {}
    geometry = (weight.storage_offset(), tuple(weight.shape), weight.stride(), activation)
    # the version of the parameter (a view made here shares it; an alias inductor makes does not)
    key = (_key(param, bias, weight_scale, move, alpha), weight_mode, act_mode, act_bits)
    hit = views.get(geometry)
    if hit is None or hit[0] != key:
        # the disk cache is asked for this weight's first packing in this process only
        hit = views[geometry] = (key, _new_plan(weight, bias, weight_scale, move, alpha, weight_mode,
                                                act_mode, act_bits, use_disk=hit is None, activation=activation))
    return hit[1]


def _packed_weight(weight: Tensor, weight_mode: str, use_disk: bool):
    """``(PackedWeight, col_scale)`` of ``weight``: binarized and packed, or read from the disk cache.

    The disk is asked only for a parameter's first packing in this process (a warm start); repacks
    after in-place updates (training) stay in memory, so an optimizer step never writes a file.
    """
    from bitfx import compile_cache
    from bitfx.codegen import runtime

    ternary = methods.weight_method(weight_mode).ternary
    # the layout is in the key (CPU weights are packed in panels, CUDA ones K-major): planes of another
    # layout are never read as this one
    layout = "panel" if weight.device.type == "cpu" else "kmajor"
    extra = f"{weight_mode}|panel{runtime.PANEL}" if layout == "panel" else weight_mode
    key = compile_cache.content_key("packed", [weight], extra=extra) if use_disk else None
    hit = compile_cache.load(key) if use_disk else None
    if hit is not None and set(hit) >= {"planes", "col_scale"}:
        try:
            packed = runtime.PackedWeight(hit["planes"], weight.shape[0], weight.shape[1], ternary, hit.get("nnz"),
                                          layout=layout)
            return packed, hit["col_scale"]
        except ValueError:  # planes of another shape under this key: repack (and overwrite) below
            pass
    codes, col_scale, _ = quantize_weight(weight.detach().float(), None, weight_mode)
    packed = runtime.pack_weight(codes.to(torch.int8), ternary=ternary)
    col_scale = col_scale.float()
    if use_disk:
        compile_cache.store(key, {"planes": packed.planes, "col_scale": col_scale,
                                  **({"nnz": packed.nnz} if packed.nnz is not None else {})})
    return packed, col_scale


def _new_plan(weight, bias, weight_scale, move, alpha, weight_mode, act_mode, act_bits, use_disk, activation="none"):
    from bitfx.codegen import runtime

    with torch.no_grad():
        packed, col_scale = _packed_weight(weight, weight_mode, use_disk)
        col = col_scale if weight_scale is None else weight_scale.detach().float().reshape(-1)
        plan = runtime.LinearPlan(packed, act=act_mode, bits=act_bits,
                                  move=None if move is None else move.detach(),
                                  alpha=None if alpha is None else alpha.detach(),
                                  col_scale=col, bias=None if bias is None else bias.detach(),
                                  activation=activation)
    return plan


# Registered with the low-level Library API: a call dispatches straight to the Python function
# (~6 µs), where ``torch.library.custom_op``'s wrappers cost ~30 µs, the whole budget of an M=1 layer.
# The Python implementations below are the CompositeExplicitAutograd kernels; ``bitfx.ops.native`` (loaded
# at the first call) registers C++ CPU kernels, which then take precedence: no Python per call.
_LIB = torch.library.Library("bitfx_kernels", "DEF")
_PLAN_ARGS = ("Tensor? bias, Tensor? weight_scale, Tensor? move, Tensor? alpha, str weight_mode, str act_mode, "
              "int act_bits, bool cache=True, int[]? view_size=None, int[]? view_stride=None, int view_offset=0, "
              "str activation=\"none\"")
_LIB.define(f"bit_linear(Tensor x, Tensor weight, {_PLAN_ARGS}) -> Tensor")
_LIB.define("sign_scores(Tensor q, Tensor k) -> Tensor")
_LIB.define("binary_pv(Tensor p, Tensor v) -> Tensor")
# what the C++ kernels ask Python for, once per layer version / attention width (native.cpp)
_LIB.define(f"_linear_plan_parts(Tensor weight, {_PLAN_ARGS}) -> (Tensor[], int[])")
_LIB.define("_attention_kernels(str which, int width) -> int[]")
_LIB.define(f"_bit_linear_python(Tensor x, Tensor weight, {_PLAN_ARGS}) -> Tensor")


def bit_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], weight_scale: Optional[Tensor],
               move: Optional[Tensor], alpha: Optional[Tensor], weight_mode: str, act_mode: str,
               act_bits: int, cache: bool = True, view_size: Optional[list[int]] = None,
               view_stride: Optional[list[int]] = None, view_offset: int = 0, activation: str = "none") -> Tensor:
    """``bitfx.bit_linear`` on the host kernels (same arguments, same result to float rounding).

    With ``view_size``, ``weight`` is the parameter and the layer's weight is its view
    ``weight.as_strided(view_size, view_stride, view_offset)`` (a transposed Conv1D weight, a slice of
    a packed projection): the packed copy is keyed by the parameter, so in-place updates are seen.
    ``activation="gelu"``: ``F.gelu`` of that result, applied in the GEMM's epilogue (the lowering fuses a
    following GELU this way).
    """
    view = None if view_size is None else (tuple(view_size), tuple(view_stride), view_offset)
    return linear_plan(weight, bias, weight_scale, move, alpha, weight_mode, act_mode, act_bits, cache, view,
                       activation)(x)


def sign_scores(q: Tensor, k: Tensor) -> Tensor:
    """``S[..., i, j] = Σ_d sign(q[..., i, d]) · sign(k[..., j, d])`` as int32, on the popcount kernel."""
    from bitfx.codegen import runtime

    return runtime.sign_scores(q, k)


def binary_pv(p: Tensor, v: Tensor) -> Tensor:
    """``O[..., i, d] = Σ_j p[..., i, j] · sign(v[..., j, d])`` as int32 for p in {0, 1}."""
    from bitfx.codegen import runtime

    return runtime.binary_pv(p, v)


def _linear_plan_parts(weight, bias, weight_scale, move, alpha, weight_mode, act_mode, act_bits, cache=True,
                       view_size=None, view_stride=None, view_offset=0, activation="none"):
    """The C++ ``bit_linear``'s view of ``linear_plan(...)``: ``(tensors, ints)``, laid out as native.cpp reads
    them: tensors ``[packed planes, (nnz), col_scale, (bias), (move), (alpha)]``; ints ``[quant kernel handle,
    GEMM handle, quantizer kind (0 sign with mean|x|, 1 sign with α, 2 absmax, 3 unsigned: then the threshold
    tensor follows), bits, K, N, number of weight tensors, has bias, has move, has alpha]``. The handles stay
    valid: ``build`` memoises every kernel.
    A plan whose activation quantizer is none of these (kind -1, e.g. a newer method) is run per call by
    the Python implementation (``_bit_linear_python``), as before the C++ kernels."""
    view = None if view_size is None else (tuple(view_size), tuple(view_stride), view_offset)
    plan = linear_plan(weight, bias, weight_scale, move, alpha, weight_mode, act_mode, act_bits, cache, view,
                       activation)
    packing = getattr(plan, "pack", None) or ("sign" if plan.act == "sign" else "absmax")
    if packing == "sign" and plan.act == "sign":
        kind = 0 if plan.alpha is None else 1
    elif packing == "absmax" and plan.act != "sign":
        kind = 2
    elif packing == "unsigned" and plan.alpha is not None and getattr(plan, "threshold", None) is not None:
        kind = 3  # {0, α}: codes (x + move) > α/2, threshold -α/2 as the pack kernel's move (one more tensor)
    else:
        return [], [0, 0, -1, plan.bits, plan.K, plan.N, 0, 0, 0, 0]
    extra = [t for t in (plan.bias, plan.move, plan.alpha) if t is not None]
    extra += [plan.threshold] if kind == 3 else []
    ints = [plan.quant.__chandle__(), plan.gemm.__chandle__(), kind, plan.bits, plan.K, plan.N, len(plan.weights),
            int(plan.bias is not None), int(plan.move is not None), int(plan.alpha is not None)]
    return [*plan.weights, plan.col, *extra], ints


def _attention_kernels(which: str, width: int) -> list[int]:
    """Kernel handles of ``sign_scores`` ("scores", D) or ``binary_pv`` ("pv_uint8" / "pv_float32", Dv)."""
    from bitfx.codegen import runtime

    if which == "scores":
        fns = runtime.scores_kernels(width)
    elif which in ("pv_uint8", "pv_float32"):
        fns = runtime.pv_kernels(which[3:], width)
    else:
        raise ValueError(f"unknown attention kernel set {which!r}; expected 'scores', 'pv_uint8' or 'pv_float32'")
    return [f.__chandle__() for f in fns]


def _loading_native(fn):
    """``fn`` as the fallback kernel: a call starts (or, once built, loads) the C++ kernels, which take the
    CPU dispatch from then on (``native.start()``); if they cannot be built, every call stays here."""
    def impl(*args, **kwargs):
        if _native_pending[0]:
            native.start()  # loads the library when built; until then this call and the next stay here
            _native_pending[0] = native.status() in ("building", "built")
        return fn(*args, **kwargs)

    impl.__name__ = impl.__qualname__ = fn.__name__
    return impl


_native_pending = [True]
_LIB.impl("bit_linear", _loading_native(bit_linear), "CompositeExplicitAutograd")
_LIB.impl("sign_scores", _loading_native(sign_scores), "CompositeExplicitAutograd")
_LIB.impl("binary_pv", _loading_native(binary_pv), "CompositeExplicitAutograd")
_LIB.impl("_linear_plan_parts", _linear_plan_parts, "CPU")
_LIB.impl("_attention_kernels", _attention_kernels, "CPU")
_LIB.impl("_bit_linear_python", bit_linear, "CPU")


@torch.library.register_fake("bitfx_kernels::bit_linear", lib=_LIB)
def _(x, weight, bias, weight_scale, move, alpha, weight_mode, act_mode, act_bits, cache=True,
      view_size=None, view_stride=None, view_offset=0, activation="none"):
    n = weight.shape[0] if view_size is None else view_size[0]
    return x.new_empty((*x.shape[:-1], n))


@torch.library.register_fake("bitfx_kernels::sign_scores", lib=_LIB)
def _(q, k):
    return q.new_empty((*q.shape[:-1], k.shape[-2]), dtype=torch.int32)


@torch.library.register_fake("bitfx_kernels::binary_pv", lib=_LIB)
def _(p, v):
    return v.new_empty((*p.shape[:-1], v.shape[-1]), dtype=torch.int32)


BIT_LINEAR_KERNEL = torch.ops.bitfx_kernels.bit_linear.default
SIGN_SCORES_KERNEL = torch.ops.bitfx_kernels.sign_scores.default
BINARY_PV_KERNEL = torch.ops.bitfx_kernels.binary_pv.default


def bit_attention_on_kernels(*args):
    """``bit_attention``'s one formula with its integer products on the kernel ops (traceable)."""
    from bitfx.ops.attention import bit_attention_formula

    return bit_attention_formula(*args, sign_scores=torch.ops.bitfx_kernels.sign_scores,
                                 binary_pv=torch.ops.bitfx_kernels.binary_pv)
