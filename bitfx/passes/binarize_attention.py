"""``bitfx.attention`` -> ``bitfx.bit_attention`` (+ BiPFT estimators) under ``ctx.config``.

Before::

    out = attention(q, k, v, mask, scale, is_causal, 0.0)

After (preset "bipft")::

    est_q = linear(q, W_eq)        # [.., Lq, 2r] = [r_q | u_q]   BiPFT score estimators
    est_k = linear(k, W_ek)        # [.., Lk, 2r] = [r_k | u_k]
    est_v = linear(v, W_ev)        # [.., Lk, 1]  = r_v           BiPFT value estimator
    out = bit_attention(q, k, v, mask, α_q, α_k, α_v, α_P, est_q, est_k, est_v, scale, is_causal, "elastic")

The estimators project each head's q/k/v (a rank-r function of the block input x through
W_q/W_k/W_v), with weights shared across heads, so they apply to every attention spelling and
head layout; they are plain linear nodes, so the diff tool shows them and every target runs
them. They start at zero and are fitted by ``bitfx.calibrate`` (least squares on the residual).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from bitfx.ops import ATTENTION, BIT_ATTENTION, methods
from bitfx.passes.context import Added, PassContext, Rewrite, Skip, fake_value, module_of
from bitfx.passes.graph import add_parameter, call, last_dim

aten = torch.ops.aten


def head_dim(t: fx.Node, q: fx.Node) -> int | None:
    """The last dim of q, k or v as an int.

    Export cannot always prove a size static: an ``nn.MultiheadAttention`` cross attention views
    memory-side k/v with ``E·B_mem // B`` (B_mem = B is not known to the shape env). Then the
    size hint (the example's value) is used: for k it must equal q's static head dim (``q·kᵀ``),
    and the model's own views fail loudly on inputs where the expression differs.
    """
    d = last_dim(t)
    if d is not None:
        return d
    v = fake_value(t)
    if t is not q and last_dim(q) is not None and isinstance(v, torch.Tensor) and v.dim():
        hint = getattr(getattr(v.shape[-1], "node", None), "hint", None)
        if isinstance(hint, int):
            return hint
    return None


def _refusal(node: fx.Node, ctx: PassContext) -> tuple[str, str] | None:
    q, k, v, mask, scale, is_causal, dropout_p = node.args
    cfg = ctx.config
    if not cfg.attention:
        return "config", "config.attention is False"
    own = ctx.own_binarizer_keeps()
    if own is not None:
        return "config", own
    name = module_of(node)
    pattern = cfg.keeps(name)
    if pattern is not None:
        return "config", f"module {name!r} matches keep pattern {pattern!r}"
    if dropout_p:
        return "unsupported", f"attention dropout p={dropout_p} (binary attention has none: call model.eval())"
    if any(head_dim(t, q) is None for t in (q, k, v)):
        return "unsupported", "head dimension is not static"
    qv = fake_value(q)
    if isinstance(qv, torch.Tensor) and not qv.is_floating_point():
        return "unsupported", f"dtype {qv.dtype}"
    return None


def binarize_attention(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != ATTENTION:
            continue
        refusal = _refusal(node, ctx)
        if refusal is not None:
            ctx.report.skips.append(Skip("binarize_attention", "attention", module_of(node), *refusal, [node.name]))
            continue
        _rewrite(gm, node, ctx)
    return gm


def _rewrite(gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> None:
    cfg = ctx.config
    q, k, v, mask, scale, is_causal, _ = node.args
    module = module_of(node)
    tag = module.replace(".", "_") or node.name
    qv = fake_value(q)
    device = qv.device if isinstance(qv, torch.Tensor) and qv.device.type != "meta" else torch.device("cpu")

    def param(name, value, trainable=True):
        return add_parameter(gm, f"bitfx_{name}__{tag}", value.to(device), node, trainable)

    alpha_q = alpha_k = alpha_v = prob = None
    if cfg.act_scale == "learnable":
        alpha_q, alpha_k, alpha_v = (param(n, torch.ones(())) for n in ("alpha_q", "alpha_k", "alpha_v"))
    prob_param = methods.prob_method(cfg.prob).param  # e.g. BiViT's β, BiT's α_P
    if prob_param is not None:
        name, init, trainable = prob_param
        prob = param(name, init(cfg), trainable)

    est_q = est_k = est_v = None
    if cfg.estimators:
        r = cfg.estimator_rank
        # the estimators are linears of q/k/v: their weights take the activations' dtype (fp16 models)
        dt = qv.dtype if isinstance(qv, torch.Tensor) and qv.dtype.is_floating_point else torch.float32
        weights = [
            param("est_q", torch.zeros(2 * r, head_dim(q, q), dtype=dt)),
            param("est_k", torch.zeros(2 * r, head_dim(k, q), dtype=dt)),
            param("est_v", torch.zeros(1, head_dim(v, q), dtype=dt)),
        ]
        est_q, est_k, est_v = (
            call(gm, aten.linear.default, (src, w), before=node, like=node)
            for src, w in zip((q, k, v), weights)
        )
        ctx.report.added.append(Added("binarize_attention", "estimator", module,
                                      [est_q.name, est_k.name, est_v.name]))

    new = call(
        gm, BIT_ATTENTION,
        (q, k, v, mask, alpha_q, alpha_k, alpha_v, prob, est_q, est_k, est_v, scale, is_causal, cfg.prob),
        before=node, like=node,
    )
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    ctx.report.rewrites.append(Rewrite("binarize_attention", "attention", module, [node.name], new.name, "bit_attention"))
