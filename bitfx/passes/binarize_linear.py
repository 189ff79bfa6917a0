"""``aten.linear`` -> ``bitfx.bit_linear`` under the policy of ``ctx.config``.

Before::

    y = linear(x, W, b)

After (preset "bipft")::

    move  = get_attr(bitfx_move__<module>)     # [K], BiT elastic offset, init 0
    alpha = get_attr(bitfx_alpha__<module>)    # scalar, init 2·mean|x| on the first batch
    y = bit_linear(x, W, b, None, move, alpha, "sign_tensor", "sign", 1)

Linears stay float (and are reported) when the config keeps their module, when they are too
small, or when their weight is not a parameter or their shape/dtype is unsupported.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from bitfx.ops import BIT_LINEAR
from bitfx.passes.context import PassContext, Rewrite, Skip, fake_value, module_of
from bitfx.passes.graph import add_parameter, call, trace_back

aten = torch.ops.aten
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _refusal(node: fx.Node, ctx: PassContext) -> tuple[str, str] | None:
    """Why this linear must stay float, as (reason, detail), or None."""
    x, weight = node.args[0], node.args[1]
    src, _ = trace_back(weight)
    if not (ctx.is_weight(weight) or ctx.is_weight(src)):
        return "unsupported", "weight is not a parameter (activation x activation product)"
    w = fake_value(weight)
    xv = fake_value(x)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return "unsupported", "weight shape unknown or not 2-D"
    if not all(isinstance(d, int) for d in w.shape):
        return "unsupported", f"weight shape {tuple(w.shape)} is not static"
    if isinstance(xv, torch.Tensor) and xv.dtype not in FLOAT_DTYPES:
        return "unsupported", f"input dtype {xv.dtype} (accepted: float32, float16, bfloat16)"
    cfg = ctx.config
    if not cfg.linear:
        return "config", "config.linear is False"
    name = module_of(node)
    pattern = cfg.keeps(name)
    if pattern is not None:
        return "config", f"module {name!r} matches keep pattern {pattern!r}"
    n, k = w.shape
    if n * k < cfg.min_features:
        return "config", f"{n}x{k} weight is smaller than min_features={cfg.min_features}"
    return None


def binarize_linear(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    cfg = ctx.config
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == aten.linear.default]
    candidates = []
    for node in linears:
        refusal = _refusal(node, ctx)
        if refusal is not None:
            ctx.report.skips.append(Skip("binarize_linear", "linear", module_of(node), *refusal, [node.name]))
        else:
            candidates.append(node)
    if candidates and cfg.keep_first:
        first = candidates.pop(0)
        ctx.report.skips.append(Skip("binarize_linear", "linear", module_of(first), "config", "keep_first", [first.name]))
    if candidates and cfg.keep_last:
        last = candidates.pop()
        ctx.report.skips.append(Skip("binarize_linear", "linear", module_of(last), "config", "keep_last", [last.name]))

    for node in candidates:
        _rewrite(gm, node, ctx)
    return gm


def _rewrite(gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> None:
    cfg = ctx.config
    x, weight = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    w = fake_value(weight)
    n, k = (int(d) for d in w.shape)
    module = module_of(node)
    tag = module.replace(".", "_") or node.name
    device = w.device if w.device.type != "meta" else torch.device("cpu")

    weight_scale = move = alpha = None
    if cfg.learnable_weight_scale and cfg.weight == "sign_channel":
        weight_scale = add_parameter(gm, f"bitfx_wscale__{tag}", torch.ones(n, device=device), node)
    if cfg.act == "sign" and cfg.act_move:
        move = add_parameter(gm, f"bitfx_move__{tag}", torch.zeros(k, device=device), node)
    if cfg.act == "sign" and cfg.act_scale == "learnable":
        alpha = add_parameter(gm, f"bitfx_alpha__{tag}", torch.ones((), device=device), node)
    new = call(
        gm, BIT_LINEAR,
        (x, weight, bias, weight_scale, move, alpha, cfg.weight, cfg.act, cfg.act_bits),
        before=node, like=node,
    )
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    ctx.report.rewrites.append(Rewrite("binarize_linear", "linear", module, [node.name], new.name, "bit_linear"))
