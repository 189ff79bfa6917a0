"""Relax converters of the bitfx ops, registered by decorator keyed by the op object.

    @converter(torch.ops.bitfx.bit_linear.default)
    def convert_bit_linear(node, importer, ctx): ...        # -> the Relax value of ``node``

Every converter takes ``(node, importer, ctx)``: the ``torch.fx`` node, TVM's
``ExportedProgramImporter`` (``importer.env`` maps fx nodes to Relax values, ``importer.block_builder``
emits), and a ``ConvertContext`` (the frozen constant tensors and the target's kernel set). Kernels
come from ``ctx.kernel(op, **params)``, i.e. ``bitfx.targets.registry.implementation(ctx.kernels, op)``:
the same generators the torch-process lowering builds, with the same buffers in the same order.

How the ops lower:

- ``bit_linear``: the weight is binarized (or ternarized) and packed ahead, in NumPy, into the K-major
  ``[KW, N]`` uint64 layout and embedded as a Relax constant (the export freezes weights); the
  activation is sign-packed (``pack_rows``, with ``move`` and the per-token mean |x| scale) or
  absmax-quantized into bit planes (``absmax_planes``), then one popcount ``gemm`` with the fused float
  epilogue ``(acc * row_scale) * col_scale + bias``. The token count M stays symbolic.
- ``sign_scores`` (``sign(q)·sign(k)ᵀ``): ``pack_rows`` of q and k + batched xnor ``gemm``.
- ``binary_pv`` (``P_b·sign(v)``): ``pack_rows(nonzero)`` of P + ``pack_cols`` of v + batched and-``gemm``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.fx as fx

from bitfx.ops import methods
from bitfx.relax.importer import ExportError

__all__ = ["converter", "converted_ops", "convert_map", "ConvertContext"]

WORD = 64

_CONVERTERS: dict = {}  # op object (torch OpOverload) -> converter


def converter(op) -> Callable[[Callable], Callable]:
    """Decorator: ``fn(node, importer, ctx)`` converts ``op`` (an ``OpOverload``); duplicates are refused."""
    if not isinstance(op, torch._ops.OpOverload):
        raise TypeError(f"converter() takes an op overload such as torch.ops.bitfx.bit_linear.default, got {op!r}")

    def deco(fn: Callable) -> Callable:
        old = _CONVERTERS.get(op)
        if old is not None and old is not fn:
            raise ValueError(f"a Relax converter for {op} is already registered ({old.__module__}."
                             f"{old.__qualname__}); remove it before registering {fn.__module__}.{fn.__qualname__}")
        _CONVERTERS[op] = fn
        return fn

    return deco


def converted_ops() -> list:
    """The ops that have a converter."""
    return list(_CONVERTERS)


@dataclass
class ConvertContext:
    """What converters share: ``values`` (placeholder name -> constant tensor) and the kernel set."""

    values: dict[str, torch.Tensor] = field(default_factory=dict)
    kernels: str = "reference"

    def kernel(self, op: str, **params):
        """The PrimFunc of kernel ``op`` as this context's kernel set implements it."""
        from bitfx.targets.registry import implementation

        return implementation(self.kernels, op)(**params)

    def constant(self, arg) -> torch.Tensor | None:
        if isinstance(arg, fx.Node) and arg.name in self.values:
            return self.values[arg.name].detach().float()
        return None


def convert_map(ctx: ConvertContext) -> dict[str, Callable]:
    """``custom_convert_map`` for ``from_exported_program``: ``"bit_linear.default"`` -> handler."""
    return {op.__name__: (lambda node, importer, fn=fn: fn(node, importer, ctx)) for op, fn in _CONVERTERS.items()}


# ------------------------------------------------------------------------------------ helpers
def pack_k_major(bits: np.ndarray) -> np.ndarray:
    """bool [N, K] -> uint64 [ceil(K/64), N]: bit j of word w = element 64w + j; tail bits zero."""
    n, k = bits.shape
    kw = (k + WORD - 1) // WORD
    padded = np.zeros((n, kw * WORD), dtype=np.uint64)
    padded[:, :k] = bits
    words = (padded.reshape(n, kw, WORD) << np.arange(WORD, dtype=np.uint64)).sum(-1, dtype=np.uint64)
    return np.ascontiguousarray(words.T)


def add_kernel(bb, func, name: str):
    """Add a PrimFunc under ``name`` (generators name their functions "main", "gemm_xnor"...), marked
    opaque (``op_pattern`` 8, ``kOpaque``): the float-op fusion before the build leaves kernels whole.
    A generator's loop nest without a root block gets one: Relax's passes (``RewriteDataflowReshape``)
    expect every ``call_tir`` callee to start with one."""
    from tvm import s_tir

    if not isinstance(func.body, s_tir.SBlockRealize):
        func = func.with_body(s_tir.SBlockRealize([], True, s_tir.SBlock([], [], [], "root", func.body)))
    return bb.add_func(func.with_attrs({"global_symbol": name, "op_pattern": 8}), name)


def _with_shape(bb, x, fx_arg):
    """``x`` with a known shape: the importer loses it after some ops under symbolic dims (e.g.
    native_layer_norm), so match_cast to the fx value's shape, symbolic dims as fresh variables."""
    from tvm import relax, tirx

    if x.ty.shape is not None:
        return x
    val = fx_arg.meta.get("val") if isinstance(fx_arg, fx.Node) else None
    if val is None:
        raise ExportError(f"{getattr(fx_arg, 'name', fx_arg)}: the importer gives no shape and the graph records none")
    dims = [int(d) if isinstance(d, int) else tirx.Var(f"{fx_arg.name}_d{i}", "int64")
            for i, d in enumerate(val.shape)]
    return bb.match_cast(x, relax.TensorType(dims, x.ty.dtype))


def _batched(bb, x):
    """x [..., L, C] -> ([G*L, C] float32 var, G, L, lead dims)."""
    from tvm import relax

    shape = list(x.ty.shape)
    lead, L, C = shape[:-2], shape[-2], shape[-1]
    G = math.prod(lead[1:], start=lead[0]) if lead else 1
    x2 = bb.emit(relax.op.reshape(x, [G * L, C])) if len(shape) != 2 else x
    if x.ty.dtype != "float32":
        x2 = bb.emit(relax.op.astype(x2, "float32"))
    return x2, G, L, lead


# ------------------------------------------------------------------------------------ bit_linear
@converter(torch.ops.bitfx.bit_linear.default)
def convert_bit_linear(node: fx.Node, importer, ctx: ConvertContext):
    from tvm import relax

    from bitfx.ops import linear as L

    x_node, w_node, b_node, ws_node, mv_node, al_node, weight_mode, act_mode, act_bits = node.args
    L.check_modes(weight_mode, act_mode, act_bits)
    weight = ctx.constant(w_node)
    if weight is None:
        raise ExportError(f"bit_linear {node.name}: the weight is computed in the graph, not a parameter; "
                          "the device export freezes weights and needs it constant")
    for what, n in (("bias", b_node), ("weight_scale", ws_node), ("move", mv_node), ("alpha", al_node)):
        if n is not None and ctx.constant(n) is None:
            raise ExportError(f"bit_linear {node.name}: {what} is computed in the graph, not a parameter")
    bias, wscale = ctx.constant(b_node), ctx.constant(ws_node)
    move, alpha = ctx.constant(mv_node), ctx.constant(al_node)

    with torch.no_grad():
        codes, col_scale, _ = L.quantize_weight(weight, wscale, weight_mode)
    codes = codes.numpy()
    N, K = codes.shape
    ternary = methods.weight_method(weight_mode).ternary  # the method registry (bitfx.ops.methods)
    w_packed = (np.stack([pack_k_major(codes > 0), pack_k_major(codes < 0)]) if ternary
                else pack_k_major(codes > 0))
    cs = np.ascontiguousarray(np.broadcast_to(col_scale.reshape(-1).numpy().astype(np.float32), (N,)))

    bb = importer.block_builder
    x = _with_shape(bb, importer.env[x_node], x_node)
    shape = list(x.ty.shape)
    lead = shape[:-1]
    M = math.prod(lead[1:], start=lead[0]) if lead else 1
    x2 = x if len(shape) == 2 else bb.emit(relax.op.reshape(x, [M, K]))
    if x.ty.dtype != "float32":
        x2 = bb.emit(relax.op.astype(x2, "float32"))
    M = x2.ty.shape[0]
    KW = (K + WORD - 1) // WORD
    tag = f"{act_mode}{act_bits}_k{K}_n{N}"

    if methods.act_method(act_mode).kernel == "xnor":  # ±1 codes: sign-and-pack; else k-bit absmax planes
        mv = [relax.const(move.reshape(-1).expand(K).contiguous().numpy().astype(np.float32))] if move is not None else []
        mean = alpha is None
        f = ctx.kernel("pack_rows", mode="sign", K=K, move=move is not None, mean=mean)
        gv = add_kernel(bb, f, f"bitfx_pack_sign_{tag}")
        packed_si = relax.TensorType([M, KW], "uint64")
        if mean:
            res = bb.emit(relax.call_tir(gv, [x2, *mv], [packed_si, relax.TensorType([M], "float32")]))
            a, row_scale = bb.emit(relax.TupleGetItem(res, 0)), bb.emit(relax.TupleGetItem(res, 1))
        else:
            a = bb.emit(relax.call_tir(gv, [x2, *mv], packed_si))
            al = relax.const(alpha.reshape(1).numpy().astype(np.float32))
            row_scale = bb.emit(relax.op.broadcast_to(al, [M]))
        mode, planes = ("xnor_ternary" if ternary else "xnor"), 1
    else:
        f = ctx.kernel("absmax_planes", K=K, bits=act_bits)
        gv = add_kernel(bb, f, f"bitfx_absmax_{tag}")
        res = bb.emit(relax.call_tir(gv, [x2], [relax.TensorType([M, act_bits, KW], "uint64"),
                                                relax.TensorType([M], "float32")]))
        a, row_scale = bb.emit(relax.TupleGetItem(res, 0)), bb.emit(relax.TupleGetItem(res, 1))
        mode, planes = ("and_ternary" if ternary else "and"), act_bits

    extra = []
    if mode == "xnor_ternary":
        extra = [relax.const((codes != 0).sum(1).astype(np.int32))]
    args = [a, relax.const(w_packed), *extra, row_scale, relax.const(cs)]
    if bias is not None:
        args.append(relax.const(bias.reshape(-1).numpy().astype(np.float32)))
    g = ctx.kernel("gemm", mode=mode, K=K, N=N, planes=planes, epilogue="float", bias=bias is not None)
    ggv = add_kernel(bb, g, f"bitfx_gemm_{mode}_{tag}{'_bias' if bias is not None else ''}")
    y = bb.emit(relax.call_tir(ggv, args, relax.TensorType([M, N], "float32")))
    if len(shape) != 2:
        y = bb.emit(relax.op.reshape(y, [*lead, N]))
    if x.ty.dtype != "float32":
        y = bb.emit(relax.op.astype(y, x.ty.dtype))
    return y


# ------------------------------------------------------------------------------------ attention products
def _products():
    from bitfx.ops import attention_products

    return attention_products


@converter(_products().SIGN_SCORES)
def convert_sign_scores(node: fx.Node, importer, ctx: ConvertContext):
    """sign_scores(q, k) -> call_tir: pack_rows(sign) of q and k, batched xnor gemm, int32 -> float32."""
    from tvm import relax

    bb = importer.block_builder
    q, k = (_with_shape(bb, importer.env[a], a) for a in node.args[:2])
    D = int(q.ty.shape[-1])
    DW = (D + WORD - 1) // WORD
    q2, G, Lq, lead = _batched(bb, q)
    k2, _, Lk, _ = _batched(bb, k)
    pack = add_kernel(bb, ctx.kernel("pack_rows", mode="sign", K=D), f"bitfx_pack_sign_k{D}")
    qp = bb.emit(relax.call_tir(pack, [q2], relax.TensorType([G * Lq, DW], "uint64")))
    kp = bb.emit(relax.call_tir(pack, [k2], relax.TensorType([G * Lk, DW], "uint64")))
    qp = bb.emit(relax.op.reshape(qp, [G, Lq, DW]))
    kp = bb.emit(relax.op.permute_dims(bb.emit(relax.op.reshape(kp, [G, Lk, DW])), [0, 2, 1]))
    gemm = add_kernel(bb, ctx.kernel("gemm", mode="xnor", K=D, N=None, batched=True), f"bitfx_sign_scores_k{D}")
    s = bb.emit(relax.call_tir(gemm, [qp, kp], relax.TensorType([G, Lq, Lk], "int32")))
    s = bb.emit(relax.op.astype(s, "float32"))
    return bb.emit(relax.op.reshape(s, [*lead, Lq, Lk]))


@converter(_products().BINARY_PV)
def convert_binary_pv(node: fx.Node, importer, ctx: ConvertContext):
    """binary_pv(p, v) -> call_tir: pack_rows(nonzero) of p, pack_cols(sign) of v, batched and-gemm."""
    from tvm import relax

    bb = importer.block_builder
    p, v = (_with_shape(bb, importer.env[a], a) for a in node.args[:2])
    Dv = int(v.ty.shape[-1])
    p2, G, Lq, lead = _batched(bb, p)
    Lk = p.ty.shape[-1]
    v2, _, _, _ = _batched(bb, v)
    KW = (Lk + WORD - 1) // WORD
    pack_p = add_kernel(bb, ctx.kernel("pack_rows", mode="nonzero", K=None), "bitfx_pack_nonzero")
    pp = bb.emit(relax.call_tir(pack_p, [p2], relax.TensorType([G * Lq, KW], "uint64")))
    pp = bb.emit(relax.op.reshape(pp, [G, Lq, KW]))
    v3 = bb.emit(relax.op.reshape(v2, [G, Lk, Dv]))
    pack_v = add_kernel(bb, ctx.kernel("pack_cols", K=None, N=Dv), f"bitfx_pack_cols_n{Dv}")
    vp = bb.emit(relax.call_tir(pack_v, [v3], relax.TensorType([G, KW, Dv], "uint64")))
    gemm = add_kernel(bb, ctx.kernel("gemm", mode="and", K=None, N=Dv, signed=False, batched=True),
                     f"bitfx_binary_pv_n{Dv}")
    o = bb.emit(relax.call_tir(gemm, [pp, vp], relax.TensorType([G, Lq, Dv], "int32")))
    o = bb.emit(relax.op.astype(o, "float32"))
    return bb.emit(relax.op.reshape(o, [*lead, Lq, Dv]))
