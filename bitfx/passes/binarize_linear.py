"""``aten.linear`` -> ``bitfx.bit_linear`` under the policy of ``ctx.config``.

Before::

    y = linear(x, W, b)

After (preset "bipft")::

    move  = get_attr(bitfx_move__<module>)     # [K], BiT elastic offset, init 0
    alpha = get_attr(bitfx_alpha__<module>)    # scalar, init 2·mean|x| on the first batch
    y = bit_linear(x, W, b, None, move, alpha, "sign_tensor", "sign", 1)

With ``config.act_nonneg`` (preset "bit": ``"unsigned"``), a linear whose input is provably
non-negative — a ReLU, ReLU6, softmax, sigmoid, exp or abs output, through dropout, views and
copies — takes that activation method instead (BiT's {0, α} codes after a ReLU)::

    y = bit_linear(relu(h), W, b, None, move, alpha, "sign_tensor", "unsigned", 1)

Linears stay float (and are reported) when the config keeps their module, when they are too
small, or when their weight is not a parameter or their shape/dtype is unsupported.

A weight may be a view or a *slice* of a parameter: ``nn.MultiheadAttention``'s cross attention
splits its packed ``in_proj_weight`` into ``w_q`` and ``w_kv`` (``split_with_sizes`` / ``chunk`` /
``slice``), and ``split_packed_projections`` splits packed q/k/v projections into one slice per part;
each part becomes its own ``bit_linear`` (its scales from its own rows). ``keep_first`` /
``keep_last`` keep all parts of a split projection together.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from bitfx.ops import BIT_LINEAR, methods
from bitfx.passes.context import PassContext, Rewrite, Skip, fake_value, module_of
from bitfx.passes.graph import SLICE_OPS, VIEW_OPS, add_parameter, call, trace_back

#: Meta key on the parts of a packed projection (``split_packed_projections``): (packed linear, part, parts).
PART = "bitfx_packed_part"

aten = torch.ops.aten
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


#: Ops whose output is >= 0 wherever it is a number; and ops that keep their input's sign.
_NON_NEGATIVE = {aten.relu.default, aten.relu_.default, aten.relu6.default, aten.softmax.int,
                 aten._softmax.default, aten.sigmoid.default, aten.exp.default, aten.abs.default}
_SIGN_KEEPING = VIEW_OPS | SLICE_OPS | {aten.dropout.default, aten._to_copy.default, aten.to.dtype,
                                        aten.to.dtype_layout, aten.detach.default, aten.flatten.using_ints,
                                        aten.unflatten.int, aten.squeeze.dim, aten.unsqueeze.default}


def non_negative(x) -> bool:
    """Whether ``x`` is provably >= 0: a ReLU-like output (``clamp``/``hardtanh`` with a minimum
    >= 0 included), seen through dropout, views, slices and dtype copies."""
    x, _ = trace_back(x, _SIGN_KEEPING)
    if not (isinstance(x, fx.Node) and x.op == "call_function"):
        return False
    if x.target in _NON_NEGATIVE:
        return True
    low = {aten.clamp.default: 1, aten.clamp_min.default: 1, aten.hardtanh.default: 1}.get(x.target)
    if low is None:
        return False
    bound = x.args[low] if len(x.args) > low else x.kwargs.get("min", x.kwargs.get("min_val", -1.0))
    return isinstance(bound, (int, float)) and bound >= 0


def weight_source(weight, ctx: PassContext) -> fx.Node | None:
    """The parameter node ``weight`` is a view or slice of, or None."""
    src, _ = trace_back(weight, VIEW_OPS | SLICE_OPS)
    return src if ctx.is_weight(src) else None


def not_a_parameter(weight, ctx: PassContext) -> str:
    """Why ``weight`` is not a (view or slice of a) parameter, naming what it is computed from."""
    seen, stack, params = set(), [weight], []
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if ctx.is_weight(n):
            params.append(n.name)
        elif n.op == "call_function":
            stack.extend(n.all_input_nodes)
    if not params:
        return "weight is an activation (activation x activation product)"
    op = getattr(weight, "target", None)
    return (f"weight is computed from parameter {', '.join(sorted(params)[:3])} by "
            f"{getattr(op, '__name__', op)} (not a view or slice of it)")


def refusal(node: fx.Node, ctx: PassContext) -> tuple[str, str] | None:
    """Why this linear must stay float, as (reason, detail), or None."""
    x, weight = node.args[0], node.args[1]
    if weight_source(weight, ctx) is None:
        return "unsupported", not_a_parameter(weight, ctx)
    own = ctx.own_binarizer_keeps()
    if own is not None:
        return "config", own
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
        if node.meta.get("bitfx_fake_quant_refused"):
            continue  # reported by recognize_fake_quant, with the quantizer it did not match
        why = refusal(node, ctx)
        if why is not None:
            ctx.report.skips.append(Skip("binarize_linear", "linear", module_of(node), *why, [node.name]))
        else:
            candidates.append(node)
    for keep, index in (("keep_first", 0), ("keep_last", -1)):
        if candidates and getattr(cfg, keep):
            # the parts of a split packed projection are one layer: kept together
            packed = candidates[index].meta.get(PART, (None,))[0]
            kept = [n for n in candidates if n is candidates[index]
                    or (packed is not None and n.meta.get(PART, (None,))[0] == packed)]
            candidates = [n for n in candidates if n not in kept]
            for n in kept:
                ctx.report.skips.append(Skip("binarize_linear", "linear", module_of(n), "config", keep, [n.name]))

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
    act, bits = cfg.act, cfg.act_bits
    if cfg.act_nonneg is not None and non_negative(x):  # BiT: {0, α} codes after a ReLU
        act, bits = cfg.act_nonneg, methods.act_method(cfg.act_nonneg).bits[0]
    wm, am = methods.weight_method(cfg.weight), methods.act_method(act)
    if cfg.learnable_weight_scale and wm.scale_init is not None:
        weight_scale = add_parameter(gm, f"bitfx_wscale__{tag}", torch.ones(n, device=device), node)
    if am.takes_move and cfg.act_move:
        move = add_parameter(gm, f"bitfx_move__{tag}", torch.zeros(k, device=device), node)
    if am.takes_alpha and cfg.act_scale == "learnable":
        alpha = add_parameter(gm, f"bitfx_alpha__{tag}", torch.ones((), device=device), node)
    new = call(
        gm, BIT_LINEAR,
        (x, weight, bias, weight_scale, move, alpha, cfg.weight, act, bits),
        before=node, like=node,
    )
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    ctx.report.rewrites.append(Rewrite("binarize_linear", "linear", module, [node.name], new.name, "bit_linear"))
