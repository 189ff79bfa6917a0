"""The host kernels as ``torch.library`` ops, so that a compiled graph calls them as extern kernels.

    y = torch.ops.bitfx_kernels.bit_linear(x, W, b, s, move, alpha, "sign_tensor", "sign", 1)
    c = torch.ops.bitfx_kernels.bit_linear_to_bits(x, W1, ..., activation="gelu", out_move=m2)  # int64 codes
    y = torch.ops.bitfx_kernels.bit_linear_on_bits(c, W2, b2, s2, None, α2, "sign_tensor", "sign", 1)
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

``bit_linear_to_bits`` / ``bit_linear_on_bits`` are one ``bit_linear`` feeding another whose activation is
``sign(· + move)`` with a given α, with the sign-and-pack in the first one's GEMM epilogue: the first
writes the second's packed codes (int64 ``[..., N/64]``, ``(act(y) + out_move) >= 0`` per bit), never its
float output; the second runs its GEMM on them. ``on_bits(to_bits(x, out_move=m2), ..., move=None, α2)``
equals ``bit_linear(act(bit_linear(x, ...)), ..., move=m2, α2)`` with the codes bit-exact (a value within
float rounding of 0 may take the other sign).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from bitfx.ops import methods, native
from bitfx.ops.linear import quantize_weight

__all__ = ["linear_plan", "BIT_LINEAR_KERNEL", "BIT_LINEAR_TO_BITS", "BIT_LINEAR_ON_BITS", "SIGN_SCORES_KERNEL",
           "BINARY_PV_KERNEL", "bit_attention_on_kernels", "pack_signs", "unpack_signs"]

#: parameter (a view's base) -> {view geometry: (key, LinearPlan)}; weak: dropped with the parameter.
_PLANS: "WeakIdKeyDictionary[Tensor, dict]" = WeakIdKeyDictionary()


def _key(*tensors) -> tuple:
    return tuple(None if t is None else (t.data_ptr(), t._version) for t in tensors)


def linear_plan(weight: Tensor, bias: Optional[Tensor], weight_scale: Optional[Tensor], move: Optional[Tensor],
                alpha: Optional[Tensor], weight_mode: str, act_mode: str, act_bits: int, cache: bool = True,
                view: Optional[tuple] = None, activation: str = "none", output: str = "float",
                out_move: Optional[Tensor] = None):
    """The ``runtime.LinearPlan`` of this layer: the weight binarized and packed once per version.

    ``view`` (size, stride, offset): the layer's weight is that view of ``weight`` (a parameter).
    ``activation``: applied to the output in the GEMM's epilogue (``runtime.ACTIVATIONS``).
    ``output="sign_bits"``, ``out_move``: the plan writes the next layer's packed codes (``runtime.OUTPUTS``).
    """
    param = weight
    if view is not None:
        weight = param.as_strided(view[0], view[1], view[2])
    extra = dict(activation=activation, output=output, out_move=out_move)
    if not cache:
        return _new_plan(weight, bias, weight_scale, move, alpha, weight_mode, act_mode, act_bits, False, **extra)
    base = param if param._base is None else param._base
    views = _PLANS.get(base)
    if views is None:
        views = _PLANS[base] = {}
    geometry = (weight.storage_offset(), tuple(weight.shape), weight.stride(), activation, output)
    # the version of the parameter (a view made here shares it; an alias inductor makes does not)
    key = (_key(param, bias, weight_scale, move, alpha, out_move), weight_mode, act_mode, act_bits)
    hit = views.get(geometry)
    if hit is None or hit[0] != key:
        # the disk cache is asked for this weight's first packing in this process only
        hit = views[geometry] = (key, _new_plan(weight, bias, weight_scale, move, alpha, weight_mode,
                                                act_mode, act_bits, use_disk=hit is None, **extra))
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


def _new_plan(weight, bias, weight_scale, move, alpha, weight_mode, act_mode, act_bits, use_disk, activation="none",
              output="float", out_move=None):
    from bitfx.codegen import runtime

    # (the packed-codes output is the host GEMM's: other devices compute it from the float output)
    packs = {"output": output, "out_move": None if out_move is None else out_move.detach()} \
        if output != "float" else {}
    with torch.no_grad():
        packed, col_scale = _packed_weight(weight, weight_mode, use_disk)
        col = col_scale if weight_scale is None else weight_scale.detach().float().reshape(-1)
        plan = runtime.LinearPlan(packed, act=act_mode, bits=act_bits,
                                  move=None if move is None else move.detach(),
                                  alpha=None if alpha is None else alpha.detach(),
                                  col_scale=col, bias=None if bias is None else bias.detach(),
                                  activation=activation, **packs)
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
_LIB.define(f"bit_linear_to_bits(Tensor x, Tensor weight, {_PLAN_ARGS}, Tensor? out_move=None) -> Tensor")
_LIB.define(f"bit_linear_on_bits(Tensor bits, Tensor weight, {_PLAN_ARGS}) -> Tensor")
_LIB.define("sign_scores(Tensor q, Tensor k) -> Tensor")
_LIB.define("binary_pv(Tensor p, Tensor v) -> Tensor")
# what the C++ kernels ask Python for, once per layer version / attention width (native.cpp)
_LIB.define(f"_linear_plan_parts(Tensor weight, {_PLAN_ARGS}, Tensor? out_move=None, str output=\"float\") "
            "-> (Tensor[], int[])")
_LIB.define("_attention_kernels(str which, int width) -> int[]")
_LIB.define(f"_bit_linear_python(Tensor x, Tensor weight, {_PLAN_ARGS}) -> Tensor")
_LIB.define(f"_bit_linear_to_bits_python(Tensor x, Tensor weight, {_PLAN_ARGS}, Tensor? out_move=None) -> Tensor")


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


def bit_linear_to_bits(x: Tensor, weight: Tensor, bias: Optional[Tensor], weight_scale: Optional[Tensor],
                       move: Optional[Tensor], alpha: Optional[Tensor], weight_mode: str, act_mode: str,
                       act_bits: int, cache: bool = True, view_size: Optional[list[int]] = None,
                       view_stride: Optional[list[int]] = None, view_offset: int = 0, activation: str = "none",
                       out_move: Optional[Tensor] = None) -> Tensor:
    """The next binary linear's packed sign codes of ``bit_linear(x, ...)`` (``activation`` applied, then
    ``+ out_move``): int64 ``[..., N/64]``, bit j of word w set where ``u[..., 64w + j] >= 0`` (sign(0) = +1).
    On the host, the GEMM's epilogue writes them (the float output is never stored); elsewhere they are
    packed from the float output."""
    view = None if view_size is None else (tuple(view_size), tuple(view_stride), view_offset)
    if x.device.type != "cpu":
        y = linear_plan(weight, bias, weight_scale, move, alpha, weight_mode, act_mode, act_bits, cache, view,
                        activation)(x)
        return pack_signs(y.float() if out_move is None else y.float() + out_move.detach().float())
    return linear_plan(weight, bias, weight_scale, move, alpha, weight_mode, act_mode, act_bits, cache, view,
                       activation, output="sign_bits", out_move=out_move).to_bits(x)


def bit_linear_on_bits(bits: Tensor, weight: Tensor, bias: Optional[Tensor], weight_scale: Optional[Tensor],
                       move: Optional[Tensor], alpha: Optional[Tensor], weight_mode: str, act_mode: str,
                       act_bits: int, cache: bool = True, view_size: Optional[list[int]] = None,
                       view_stride: Optional[list[int]] = None, view_offset: int = 0,
                       activation: str = "none") -> Tensor:
    """``bit_linear`` on activation codes already signed and packed (``bit_linear_to_bits``, which applied the
    move): float32 ``[..., N]``. Needs act_mode "sign" with a given α (the row scale) and no ``move``."""
    if act_mode != "sign" or alpha is None or move is not None:
        raise ValueError(f"bit_linear_on_bits takes codes signed with a given alpha: act_mode='sign', alpha given, "
                         f"move=None (applied by the producer); got act_mode={act_mode!r}, alpha "
                         f"{'given' if alpha is not None else 'None'}, move {'given' if move is not None else 'None'}")
    view = None if view_size is None else (tuple(view_size), tuple(view_stride), view_offset)
    plan = linear_plan(weight, bias, weight_scale, None, alpha, weight_mode, act_mode, act_bits, cache, view,
                       activation)
    if bits.device.type != "cpu" or getattr(plan, "on_bits", None) is None:  # ±1 codes have themselves as signs
        K = weight.shape[1] if view_size is None else view_size[1]
        return plan(unpack_signs(bits, K))
    return plan.on_bits(bits)


def pack_signs(u: Tensor) -> Tensor:
    """``u[..., N]`` (N a multiple of 64) -> int64 ``[..., N/64]``, bit j of word w = ``NOT(u[..., 64w + j] < 0)``
    (the host packing's order, in PyTorch: the reference of ``bit_linear_to_bits``)."""
    if u.shape[-1] % 64:
        raise ValueError(f"pack_signs packs whole 64-bit words: the last dim must be a multiple of 64, got "
                         f"{u.shape[-1]}")
    bits = (~(u < 0)).reshape(*u.shape[:-1], -1, 64).to(torch.int64)
    # distinct powers of two: their int64 sum is their OR (bit 63 wraps to the sign bit, as a word's top bit)
    return (bits << torch.arange(64, device=u.device, dtype=torch.int64)).sum(-1)


def unpack_signs(bits: Tensor, K: int) -> Tensor:
    """int64/uint64 ``[..., ceil(K/64)]`` packed sign codes -> float32 ±1 ``[..., K]`` (``pack_signs``' inverse)."""
    words = bits.view(torch.int64) if bits.dtype == torch.uint64 else bits
    shifts = torch.arange(64, device=bits.device, dtype=torch.int64)
    b = (words[..., None] >> shifts) & 1
    return (b * 2 - 1).reshape(*bits.shape[:-1], -1)[..., :K].to(torch.float32)


def sign_scores(q: Tensor, k: Tensor) -> Tensor:
    """``S[..., i, j] = Σ_d sign(q[..., i, d]) · sign(k[..., j, d])`` as int32, on the popcount kernel."""
    from bitfx.codegen import runtime

    return runtime.sign_scores(q, k)


def binary_pv(p: Tensor, v: Tensor) -> Tensor:
    """``O[..., i, d] = Σ_j p[..., i, j] · sign(v[..., j, d])`` as int32 for p in {0, 1}."""
    from bitfx.codegen import runtime

    return runtime.binary_pv(p, v)


def _linear_plan_parts(weight, bias, weight_scale, move, alpha, weight_mode, act_mode, act_bits, cache=True,
                       view_size=None, view_stride=None, view_offset=0, activation="none", out_move=None,
                       output="float"):
    """The C++ ``bit_linear``'s view of ``linear_plan(...)``: ``(tensors, ints)``, laid out as native.cpp reads
    them: tensors ``[packed planes, (nnz), col_scale, (bias), (move), (alpha), (threshold), (out_move)]``; ints
    ``[quant kernel handle, GEMM handle, quantizer kind (0 sign with mean|x|, 1 sign with α, 2 absmax, 3
    unsigned: then the threshold tensor follows), bits, K, N, number of weight tensors, has bias, has move,
    has alpha, output (0 float, 1 packed sign codes), has out_move]``. The handles stay valid: ``build``
    memoises every kernel.
    A plan whose activation quantizer is none of these (kind -1, e.g. a newer method) is run per call by
    the Python implementation (``_bit_linear_python``), as before the C++ kernels."""
    view = None if view_size is None else (tuple(view_size), tuple(view_stride), view_offset)
    plan = linear_plan(weight, bias, weight_scale, move, alpha, weight_mode, act_mode, act_bits, cache, view,
                       activation, output, out_move)
    packing = getattr(plan, "pack", None) or ("sign" if plan.act == "sign" else "absmax")
    if packing == "sign" and plan.act == "sign":
        kind = 0 if plan.alpha is None else 1
    elif packing == "absmax" and plan.act != "sign":
        kind = 2
    elif packing == "unsigned" and plan.alpha is not None and getattr(plan, "threshold", None) is not None:
        kind = 3  # {0, α}: codes (x + move) > α/2, threshold -α/2 as the pack kernel's move (one more tensor)
    else:
        return [], [0, 0, -1, plan.bits, plan.K, plan.N, 0, 0, 0, 0, 0, 0]
    extra = [t for t in (plan.bias, plan.move, plan.alpha) if t is not None]
    extra += [plan.threshold] if kind == 3 else []
    out_move = getattr(plan, "out_move", None)
    extra += [out_move] if out_move is not None else []
    ints = [plan.quant.__chandle__(), plan.gemm.__chandle__(), kind, plan.bits, plan.K, plan.N, len(plan.weights),
            int(plan.bias is not None), int(plan.move is not None), int(plan.alpha is not None),
            int(output == "sign_bits"), int(out_move is not None)]
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
_LIB.impl("bit_linear_to_bits", _loading_native(bit_linear_to_bits), "CompositeExplicitAutograd")
_LIB.impl("bit_linear_on_bits", _loading_native(bit_linear_on_bits), "CompositeExplicitAutograd")
_LIB.impl("sign_scores", _loading_native(sign_scores), "CompositeExplicitAutograd")
_LIB.impl("binary_pv", _loading_native(binary_pv), "CompositeExplicitAutograd")
_LIB.impl("_linear_plan_parts", _linear_plan_parts, "CPU")
_LIB.impl("_attention_kernels", _attention_kernels, "CPU")
_LIB.impl("_bit_linear_python", bit_linear, "CPU")
_LIB.impl("_bit_linear_to_bits_python", bit_linear_to_bits, "CPU")


@torch.library.register_fake("bitfx_kernels::bit_linear", lib=_LIB)
def _(x, weight, bias, weight_scale, move, alpha, weight_mode, act_mode, act_bits, cache=True,
      view_size=None, view_stride=None, view_offset=0, activation="none"):
    n = weight.shape[0] if view_size is None else view_size[0]
    return x.new_empty((*x.shape[:-1], n))


@torch.library.register_fake("bitfx_kernels::bit_linear_to_bits", lib=_LIB)
def _(x, weight, bias, weight_scale, move, alpha, weight_mode, act_mode, act_bits, cache=True,
      view_size=None, view_stride=None, view_offset=0, activation="none", out_move=None):
    n = weight.shape[0] if view_size is None else view_size[0]
    return x.new_empty((*x.shape[:-1], n // 64), dtype=torch.int64)


@torch.library.register_fake("bitfx_kernels::bit_linear_on_bits", lib=_LIB)
def _(bits, weight, bias, weight_scale, move, alpha, weight_mode, act_mode, act_bits, cache=True,
      view_size=None, view_stride=None, view_offset=0, activation="none"):
    n = weight.shape[0] if view_size is None else view_size[0]
    return bits.new_empty((*bits.shape[:-1], n), dtype=torch.float32)


@torch.library.register_fake("bitfx_kernels::sign_scores", lib=_LIB)
def _(q, k):
    return q.new_empty((*q.shape[:-1], k.shape[-2]), dtype=torch.int32)


@torch.library.register_fake("bitfx_kernels::binary_pv", lib=_LIB)
def _(p, v):
    return v.new_empty((*p.shape[:-1], v.shape[-1]), dtype=torch.int32)


BIT_LINEAR_KERNEL = torch.ops.bitfx_kernels.bit_linear.default
BIT_LINEAR_TO_BITS = torch.ops.bitfx_kernels.bit_linear_to_bits.default
BIT_LINEAR_ON_BITS = torch.ops.bitfx_kernels.bit_linear_on_bits.default
SIGN_SCORES_KERNEL = torch.ops.bitfx_kernels.sign_scores.default
BINARY_PV_KERNEL = torch.ops.bitfx_kernels.binary_pv.default


def bit_attention_on_kernels(*args):
    """``bit_attention``'s one formula with its integer products on the kernel ops (traceable)."""
    from bitfx.ops.attention import bit_attention_formula

    return bit_attention_formula(*args, sign_scores=torch.ops.bitfx_kernels.sign_scores,
                                 binary_pv=torch.ops.bitfx_kernels.binary_pv)
