"""Every linear spelling becomes ``aten.linear(x, W, b)`` with ``W`` of shape [N, K].

Before (any of)::

    addmm(b, x, t(W))            # F.linear under decomposition, torch.addmm
    matmul(x, t(W)) [+ b]        # x @ W.T + b, 2-D or batched x
    mm(x, t(W)) [+ b]
    matmul(x, P) [+ b]           # P is a [K, N] parameter (GPT-2 Conv1D style)

After::

    linear(x, W, b)              # linear(x, t(P), b) for the last form

Only matmuls whose right operand is a parameter (possibly transposed), or a model's own
straight-through fake-quant of one (``W + (q(W) - W).detach()``, for ``recognize_fake_quant``),
are linears; a matmul of two activations is left alone (attention is handled by ``canonicalize_attention``). The numbers
do not change: ``linear`` computes the same products and bias addition.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from bitfx.passes.context import PassContext, fake_value
from bitfx.passes.graph import call, copy_meta, erase_unused, propagate_val

aten = torch.ops.aten
_TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default}
_MATMULS = {aten.matmul.default, aten.mm.default}


def _is_2d_transpose(node: fx.Node) -> bool:
    if node.target == aten.t.default:
        return True
    if node.target == aten.transpose.int:
        dims = {d % 2 for d in node.args[1:3]}
        return dims == {0, 1}
    if node.target == aten.permute.default:
        return list(node.args[1]) in ([1, 0], [-1, -2], [1, -2], [-1, 0])
    return False


def _is_weight_or_fake_quant(node, ctx: PassContext) -> bool:
    """A parameter, or a model's own straight-through fake-quant of one, ``W + (q(W) - W).detach()``
    (left for ``recognize_fake_quant``), so that ``x @ wq.t()`` is a linear like ``F.linear(x, wq)``."""
    if ctx.is_weight(node):
        return True
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target == aten.add.Tensor):
        return False
    for base, det in (node.args[:2], node.args[1::-1]):
        if (isinstance(det, fx.Node) and det.target == aten.detach.default and ctx.is_weight(base)
                and isinstance(det.args[0], fx.Node) and det.args[0].target == aten.sub.Tensor
                and det.args[0].args[1] is base):
            return True
    return False


def _weight_of(rhs, ctx: PassContext):
    """For a matmul right operand: (W [N,K] source node or None, needs_transpose)."""
    if not isinstance(rhs, fx.Node):
        return None, False
    v = fake_value(rhs)
    if isinstance(v, torch.Tensor) and v.dim() != 2:
        return None, False
    if rhs.op == "call_function" and rhs.target in _TRANSPOSES and _is_2d_transpose(rhs):
        src = rhs.args[0]
        if _is_weight_or_fake_quant(src, ctx):
            return src, False
    if _is_weight_or_fake_quant(rhs, ctx):
        return rhs, True
    return None, False


def _bias_add(node: fx.Node, ctx: PassContext, n_out: int | None):
    """If ``node``'s only user adds a 1-D parameter bias of size N, return (add node, bias)."""
    if len(node.users) != 1:
        return None, None
    user = next(iter(node.users))
    if user.op != "call_function" or user.target != aten.add.Tensor or len(user.args) != 2:
        return None, None
    if user.kwargs.get("alpha", 1) != 1:
        return None, None
    other = user.args[1] if user.args[0] is node else user.args[0]
    if not ctx.is_weight(other):
        return None, None
    v = fake_value(other)
    if not isinstance(v, torch.Tensor) or v.dim() != 1 or (n_out is not None and v.shape[0] != n_out):
        return None, None
    return user, other


def canonicalize_linear(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == aten.addmm.default:
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                continue
            bias, x, rhs = node.args[:3]
            weight, needs_t = _weight_of(rhs, ctx)
            if weight is None:
                continue
            _replace(gm, node, x, weight, needs_t, bias, [node, rhs])
        elif node.target in _MATMULS:
            x, rhs = node.args[:2]
            weight, needs_t = _weight_of(rhs, ctx)
            if weight is None:
                continue
            v = fake_value(weight)
            n_out = None if v is None else v.shape[1 if needs_t else 0]
            add, bias = _bias_add(node, ctx, n_out)
            if add is not None:
                _replace(gm, add, x, weight, needs_t, bias, [add, node, rhs])
            else:
                _replace(gm, node, x, weight, needs_t, None, [node, rhs])
    return gm


def _replace(gm, anchor: fx.Node, x, weight, needs_t: bool, bias, old: list) -> None:
    if needs_t:
        weight = call(gm, aten.t.default, (weight,), before=anchor)
    new = call(gm, aten.linear.default, (x, weight, bias), before=anchor)
    copy_meta(anchor, new)
    if "val" not in new.meta:
        propagate_val(gm, new)
    anchor.replace_all_uses_with(new)
    erase_unused(gm, old)
