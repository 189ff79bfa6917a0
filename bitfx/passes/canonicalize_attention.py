"""Every attention spelling becomes one ``bitfx.attention`` node, with the meaning it had.

Before (explicit; the scale and the mask in any order, MHA's ``need_weights=True`` path is the
``bmm`` form on ``(B*H, L, D)`` tensors)::

    s = matmul(q * c1, transpose(k, -2, -1))   # matmul | bmm | baddbmm(mask, q, kᵀ) | einsum in any
                                                # index order; the constant scale on q, k or kᵀ
    s = s / c2                                  # mul / div by constants, before or after the mask
    s = s + mask                                # additive; or masked_fill(m, c); or where(m, s, c)
    p = softmax(s, -1)                          # softmax.int | _softmax over the last dim
    p = dropout(p, p_drop, train)               # absent in eval (or train=False)
    out = matmul(p, v)                          # matmul | bmm | einsum

    out = scaled_dot_product_attention(q, k, v, mask, p_drop, is_causal, scale=c, enable_gqa=g)
    out = _scaled_dot_product_flash_attention_for_cpu(q, k, v, ...)[0]   # and the other fused variants

After::

    out = bitfx.attention(q, k, v, mask', c1 / c2, is_causal, p_drop)

``mask'`` keeps SDPA's convention: boolean True = attend (``masked_fill(m, -inf)`` becomes
``logical_not(m)``, ``masked_fill(x == 0, -inf)`` becomes ``x != 0``), additive masks are added to
the scaled scores (a mask added *before* a scale is multiplied by that scale; two additive masks,
such as T5's position bias and its padding mask, are summed first: equal to float rounding). A finite fill
``c <= -1e4`` (``finfo.min``, ``-1e9``; a number or a 0-d constant such as GPT-2's
``full([], finfo.min)``) on float32/float64 scores becomes the additive mask
``where(m, finfo.min, 0)``: both give masked keys probability exactly 0 on a row that keeps a key
(exp underflows while the row's largest kept score exceeds ``c + 104``) and a uniform row when every
key is masked (``s + finfo.min == finfo.min``), where -inf would give NaN. ``einsum`` operands are
permuted to ``[batch.., L, D]`` and the output back. ``enable_gqa=True`` repeats each kv head for
its group of query heads (``unsqueeze → expand → flatten``, as HF's ``repeat_kv``), exactly SDPA's
meaning; HF's own ``repeat_kv`` before the product is a view chain and needs nothing.

Why a walk from each softmax rather than ``SubgraphMatcher``: the pattern has optional parts
(scale on q, on k or after the product; mask before or after the scale; dropout; baddbmm) whose
orders multiply into dozens of fixed patterns, and a mismatch should say what differed. The walk
goes up from the softmax through single-user scale / mask ops to the product of two activations,
and down through an optional dropout to the product with v; only when all of it matches is the
graph changed, so a subgraph is either rewritten whole or left alone and reported as a ``Skip``.

Not rewritten (reported): an op between the scores and the softmax or between the softmax and
P·V other than the above (``softmax(s) * 2 @ v``), softmax over another dim or to another dtype,
probabilities or scores used elsewhere (returned attention weights), a scale that is a tensor,
a fill value above -1e4 (``-5.0``: masked keys keep a weight) or a finite fill on float16/bfloat16
scores, two masks, ``enable_gqa`` with symbolic head counts, an einsum that is not q·kᵀ / P·v,
and the fused ``nn.MultiheadAttention`` /
``TransformerEncoderLayer`` fast-path ops, which hold the projections too (dynamo records them
under ``no_grad``; capture decomposes an unmasked ``_transformer_encoder_layer_fwd``).

Known difference: for a row whose keys are *all* masked, ``bitfx.attention`` (like an explicit
softmax) gives NaN, whereas ``aten.scaled_dot_product_attention`` gives zeros.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from bitfx.ops import ATTENTION
from bitfx.passes.attention_parts import (Mismatch, chain_of_constant, constant, einsum_pv, einsum_scores,
                                          gqa_groups, repeat_heads)
from bitfx.passes.context import PassContext, Rewrite, Skip, fake_value, module_of
from bitfx.passes.graph import call, erase_unused

aten = torch.ops.aten
PASS = "canonicalize_attention"

SOFTMAX = {aten.softmax.int, aten._softmax.default}
PRODUCTS = {aten.matmul.default, aten.bmm.default}
SCALES = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
ADDS = {aten.add.Tensor}
MASKED_FILLS = {aten.masked_fill.Scalar, aten.masked_fill.Tensor}  # Tensor: a 0-d constant value
WHERES = {aten.where.ScalarOther, aten.where.self}                  # self: where(m, s, full([], c))
EINSUM = aten.einsum.default
DROPOUT = aten.dropout.default

#: A finite fill value at or below this acts as -inf on every row that keeps a key: exp(c·f - max)
#: underflows to exactly 0 in float32/float64 while the row's largest kept score exceeds c·f + 104.
FILL_LIMIT = -1e4
ASSERT_META = aten._assert_tensor_metadata.default

#: SDPA and its backend variants: (name of the mask argument, returns a tuple whose [0] is the output).
SDPA: dict[Any, tuple[str | None, bool]] = {
    aten.scaled_dot_product_attention.default: ("attn_mask", False),
    aten._scaled_dot_product_attention_math.default: ("attn_mask", True),
    aten._scaled_dot_product_flash_attention_for_cpu.default: ("attn_mask", True),
    aten._scaled_dot_product_flash_attention.default: (None, True),
    aten._scaled_dot_product_efficient_attention.default: ("attn_bias", True),
    aten._scaled_dot_product_cudnn_attention.default: ("attn_bias", True),
    aten._scaled_dot_product_fused_attention_overrideable.default: ("attn_bias", True),
}

#: Fused ops that also hold the projections (the nn.MultiheadAttention / TransformerEncoderLayer fast path).
FUSED = {
    aten._native_multi_head_attention.default: "nn.MultiheadAttention fast path",
    aten._transformer_encoder_layer_fwd.default: "nn.TransformerEncoderLayer fast path",
}


@dataclass
class _Match:
    q: fx.Node
    k: fx.Node
    v: fx.Node
    anchor: fx.Node  # the P·V product, replaced by the new node
    k_transposed: bool = True  # False: k is the product's right operand itself (insert a transpose)
    scale: float = 1.0
    mask: fx.Node | None = None
    mask_kind: str | None = None  # "add" | "masked" (True = masked) | "attend" (True = attend)
    mask_factor: float = 1.0  # scale applied to an additive mask after it was added
    extra: list[list] = field(default_factory=list)  # further additive masks: [node, factor] (T5's bias + mask)
    fill: float = float("-inf")  # value of a masked_fill / where mask (finite: finfo.min additive mask)
    scores_dtype: Any = None
    dropout_p: Any = 0.0
    nodes: list[fx.Node] = field(default_factory=list)
    # einsum spellings: dims that put q, k, v in [batch..., L, D] and the output back in place
    q_perm: list[int] | None = None
    k_perm: list[int] | None = None
    v_perm: list[int] | None = None
    out_perm: list[int] | None = None


def canonicalize_attention(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in SOFTMAX:
            _explicit(gm, node, ctx)
        elif node.target in SDPA:
            _sdpa(gm, node, ctx)
        elif node.target in FUSED:
            ctx.report.skips.append(Skip(
                PASS, "attention", module_of(node), "unrecognised",
                f"fused {node.target} ({FUSED[node.target]}: it holds the projections too); "
                "run it with gradients enabled or torch.backends.mha.set_fastpath_enabled(False) "
                "so that its Python path is traced",
                [node.name]))
    return gm


# -- explicit matmul → scale → mask → softmax → dropout → matmul ----------------------------------
def _explicit(gm: fx.GraphModule, softmax: fx.Node, ctx: PassContext) -> None:
    if not _looks_like_attention(softmax):
        return  # a classifier's softmax, say: not a candidate, nothing to report
    try:
        match = _match(softmax)
    except Mismatch as e:
        ctx.report.skips.append(Skip(PASS, "attention", module_of(softmax), "unrecognised", str(e), [softmax.name]))
        return
    _rewrite(gm, softmax, match, ctx)


def _match(softmax: fx.Node) -> _Match:
    _check_softmax(softmax)
    nodes = [softmax]
    # down: softmax -> [to(same dtype)] -> [dropout] -> P·V
    probs, dropout_p = softmax, 0.0
    user = _only_user(probs, "probabilities")
    if user.target == aten.to.dtype and _same_dtype(user, probs):
        probs = user
        nodes.append(user)
        user = _only_user(probs, "probabilities")
    if user.target == DROPOUT:
        p = user.args[1] if len(user.args) > 1 else user.kwargs["p"]
        train = user.args[2] if len(user.args) > 2 else user.kwargs["train"]
        dropout_p = p if train else 0.0
        probs = user
        nodes.append(user)
        user = _only_user(probs, "probabilities")
    if not _is_product(user):
        raise Mismatch(f"probabilities feed {_op(user)}, not a matmul/bmm with v")
    if _operands(user)[0] is not probs:
        raise Mismatch(f"probabilities are the right operand of {_op(user)}")
    m = _Match(q=None, k=None, v=_operands(user)[1], anchor=user, dropout_p=dropout_p)  # type: ignore[arg-type]
    if user.target == EINSUM:
        m.v_perm, m.out_perm = einsum_pv(user)
    nodes.append(user)

    # up: softmax input -> (scale / mask ops) -> product of q and kᵀ
    chain = []
    node = softmax.args[0]
    while True:
        if not isinstance(node, fx.Node) or node.op != "call_function":
            raise Mismatch(f"scores come from {_op(node)}, not a matmul/bmm of q and kᵀ")
        _only_user(node, "scores")
        if _is_product(node) or node.target == aten.baddbmm.default:
            break
        chain.append(node)
        node = _chain_input(node)
    chain.reverse()  # bottom-up: product first
    nodes.append(node)
    m.scale *= _product(node, m, nodes)
    for op in chain:
        _apply(op, m)
    nodes.extend(chain)
    if m.mask_kind in ("masked", "attend") and m.mask_factor <= 0:
        raise Mismatch(f"scale {m.mask_factor:g} applied after a -inf mask is not positive")
    if m.mask_kind in ("masked", "attend") and m.fill != float("-inf"):
        _check_fill(m, softmax)
    m.nodes = nodes + m.nodes  # (+ the nodes building a fill constant, from _apply)
    return m


def _check_fill(m: _Match, softmax: fx.Node) -> None:
    """A finite fill c (``finfo.min``, ``-1e9``) is exactly the additive mask ``finfo.min`` of the
    scores' dtype: masked scores get probability exactly 0 on a row that keeps a key (exp
    underflows), and a fully masked row is uniform either way (``s + finfo.min == finfo.min``)."""
    v = fake_value(softmax.args[0])
    dtype = v.dtype if isinstance(v, torch.Tensor) else None
    if dtype not in (torch.float32, torch.float64):
        raise Mismatch(f"masked_fill value {m.fill!r} on {dtype} scores (exact as an additive mask "
                        "for float32/float64 only)")
    if m.fill * m.mask_factor > FILL_LIMIT:
        raise Mismatch(f"masked_fill value {m.fill * m.mask_factor!r} after scaling, not -inf "
                        f"(accepted: -inf or a value <= {FILL_LIMIT:g}, e.g. finfo.min or -1e9)")
    m.scores_dtype = dtype


def _check_softmax(softmax: fx.Node) -> None:
    x, dim = softmax.args[:2]
    v = fake_value(x)
    rank = v.dim() if isinstance(v, torch.Tensor) else None
    if not (dim == -1 or (rank is not None and dim == rank - 1)):
        raise Mismatch(f"softmax over dim {dim}, not the last" + (f" of {rank}" if rank else ""))
    if softmax.target == aten._softmax.default:
        if softmax.args[2]:
            raise Mismatch("softmax with half_to_float=True")
        return
    dtype = softmax.args[2] if len(softmax.args) > 2 else softmax.kwargs.get("dtype")
    if dtype is not None and not (isinstance(v, torch.Tensor) and v.dtype == dtype):
        raise Mismatch(f"softmax to dtype {dtype}")


def _product(node: fx.Node, m: _Match, nodes: list) -> float:
    """q and k from the scores product; returns the constant scale found on q, k or kᵀ."""
    scale = 1.0
    if node.target == aten.baddbmm.default:
        beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
        if beta != 1 or not _is_number(alpha):
            raise Mismatch(f"baddbmm with beta={beta}, alpha={alpha}")
        m.mask, m.mask_kind, scale = node.args[0], "add", float(alpha)
        a, b = node.args[1], node.args[2]
    else:
        a, b = _operands(node)
    if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
        raise Mismatch(f"{_op(node)} of a constant")
    q, s = _strip_scales(a, nodes)
    scale *= s
    if node.target == EINSUM:  # q, k in any layout: permuted to [batch..., L, D], k untransposed
        k, _s = _strip_scales(b, nodes)
        m.q, m.k, m.k_transposed = q, k, True  # (m.k is k itself, as after a stripped transpose)
        m.q_perm, m.k_perm = einsum_scores(node)
        return scale * _s
    k, transposed = b, False
    while True:  # scales and one transpose of the last two dims, in any order
        k, s = _strip_scales(k, nodes)
        scale *= s
        if transposed or not _swaps_last_two(k):
            break
        nodes.append(k)
        k, transposed = k.args[0], True
    m.q, m.k, m.k_transposed = q, k, transposed
    return scale


def _strip_scales(node: fx.Node, nodes: list) -> tuple[fx.Node, float]:
    scale = 1.0
    while node.op == "call_function" and node.target in SCALES and len(node.users) == 1:
        x, c = _scale_operands(node)
        if x is None:
            break
        scale = scale / c if node.target in (aten.div.Tensor, aten.div.Scalar) else scale * c
        nodes.append(node)
        node = x
    return node, scale


def _scale_operands(node: fx.Node) -> tuple[fx.Node | None, float]:
    """(tensor, constant) of a mul/div by a Python number, else (None, 1)."""
    if node.kwargs.get("rounding_mode") is not None:
        return None, 1.0
    a, b = node.args[:2]
    if isinstance(a, fx.Node) and _is_number(b):
        return a, float(b)
    if node.target in (aten.mul.Tensor, aten.mul.Scalar) and isinstance(b, fx.Node) and _is_number(a):
        return b, float(a)
    return None, 1.0


def _chain_input(node: fx.Node) -> fx.Node:
    """The operand of a scale/mask op through which the scores flow (checked by ``_apply``)."""
    if node.target in SCALES:
        x, _ = _scale_operands(node)
        if x is None:
            raise Mismatch(f"scores scaled by a tensor ({_op(node)}), not a constant")
        return x
    if node.target in ADDS:
        a, b = node.args[:2]
        hits = [x for x in (a, b) if isinstance(x, fx.Node) and _reaches_product(x)]
        if len(hits) != 1:
            raise Mismatch(f"{_op(node)}: cannot tell the scores from the mask")
        return hits[0]
    if node.target in MASKED_FILLS:
        return node.args[0]
    if node.target in WHERES:
        return node.args[1]
    raise Mismatch(f"{_op(node)} between the scores and the softmax")


def _apply(op: fx.Node, m: _Match) -> None:
    """Fold one scale/mask op (in the order applied to the scores) into the match."""
    if op.target in SCALES:
        _, c = _scale_operands(op)
        f = 1.0 / c if op.target in (aten.div.Tensor, aten.div.Scalar) else c
        m.scale *= f
        m.mask_factor *= f
        for e in m.extra:
            e[1] *= f
        return
    if m.mask is not None and m.mask_kind == "add" and op.target in ADDS and op.kwargs.get("alpha", 1) == 1:
        m.extra.append([op.args[1] if op.args[0] is _chain_input(op) else op.args[0], 1.0])
        return  # (s + m1) + m2 becomes s + (m1 + m2): equal to float rounding
    if m.mask is not None:
        raise Mismatch(f"two masks ({_op(op)} after {m.mask_kind} mask {m.mask.name})")
    if op.target in ADDS:
        if op.kwargs.get("alpha", 1) != 1:
            raise Mismatch(f"{_op(op)} with alpha={op.kwargs['alpha']}")
        m.mask = op.args[1] if op.args[0] is _chain_input(op) else op.args[0]
        m.mask_kind = "add"
    elif op.target in MASKED_FILLS:
        m.fill = _fill_value(op.args[2], f"masked_fill value {op.args[2]!r}")
        m.nodes.extend(chain_of_constant(op.args[2]))
        m.mask, m.mask_kind = op.args[1], "masked"
    else:  # where(cond, scores, -inf)
        m.fill = _fill_value(op.args[2], f"where(..., {op.args[2]!r})")
        m.nodes.extend(chain_of_constant(op.args[2]))
        m.mask, m.mask_kind = op.args[0], "attend"
    m.mask_factor = 1.0


def _fill_value(c: Any, what: str) -> float:
    c = constant(c)
    if _is_number(c) and (c == float("-inf") or c <= FILL_LIMIT):
        return float(c)
    raise Mismatch(f"{what}, not -inf (accepted: -inf or a value <= {FILL_LIMIT:g}, e.g. finfo.min or -1e9)")


def _rewrite(gm: fx.GraphModule, softmax: fx.Node, m: _Match, ctx: PassContext) -> None:
    anchor = m.anchor
    q, k, v = (x if perm is None else call(gm, aten.permute.default, (x, perm), before=anchor)
               for x, perm in ((m.q, m.q_perm), (m.k, m.k_perm), (m.v, m.v_perm)))
    k = k if m.k_transposed else call(gm, aten.transpose.int, (k, -2, -1), before=anchor)
    mask = m.mask
    if m.mask_kind == "add" and (m.mask_factor != 1.0 or m.extra):
        mask = mask if m.mask_factor == 1.0 else call(gm, aten.mul.Tensor, (mask, m.mask_factor), before=anchor)
        for extra, factor in m.extra:
            extra = extra if factor == 1.0 else call(gm, aten.mul.Tensor, (extra, factor), before=anchor)
            mask = call(gm, aten.add.Tensor, (mask, extra), before=anchor, like=anchor)
    elif m.mask_kind in ("masked", "attend") and m.fill != float("-inf"):
        lowest = torch.finfo(m.scores_dtype).min  # additive, exactly the fill's meaning (_check_fill)
        pair = (lowest, 0.0) if m.mask_kind == "masked" else (0.0, lowest)
        mask = call(gm, aten.where.Scalar, (mask, *pair), before=anchor, like=anchor)
        if m.scores_dtype != torch.get_default_dtype():
            mask = call(gm, aten.to.dtype, (mask, m.scores_dtype), before=anchor, like=anchor)
    elif m.mask_kind == "masked":
        mask = _attend(gm, mask, anchor)
    new = call(gm, ATTENTION, (q, k, v, mask, m.scale, False, m.dropout_p), before=anchor, like=anchor)
    out = new if m.out_perm is None else call(gm, aten.permute.default, (new, m.out_perm), before=anchor,
                                              like=anchor)
    anchor.replace_all_uses_with(out)
    for n in m.nodes:  # shape/dtype asserts of the replaced nodes go with them
        for u in [u for u in n.users if u.target == ASSERT_META]:
            gm.graph.erase_node(u)
    names = [n.name for n in m.nodes]
    erase_unused(gm, m.nodes)
    alive = {n.name for n in gm.graph.nodes}
    replaced = [n for n in names if n not in alive]
    ctx.report.rewrites.append(Rewrite(PASS, "attention", module_of(softmax), replaced, new.name, "attention"))


def _attend(gm: fx.GraphModule, masked: fx.Node, before: fx.Node) -> fx.Node:
    """SDPA's True = attend from a True = masked boolean mask."""
    if masked.target == aten.eq.Scalar and masked.args[1] == 0:  # masked_fill(x == 0, -inf)
        x = masked.args[0]
        v = fake_value(x)
        if isinstance(v, torch.Tensor) and v.dtype == torch.bool:
            return x
        return call(gm, aten.ne.Scalar, (x, 0), before=before, like=masked)
    return call(gm, aten.logical_not.default, (masked,), before=before, like=masked)


# -- SDPA and its variants ------------------------------------------------------------------------
def _sdpa(gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> None:
    mask_name, is_tuple = SDPA[node.target]
    pair = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    kw = pair.kwargs if pair is not None else {}
    refusal = None
    if not kw:
        refusal = "unrecognised", f"cannot read the arguments of {node.target}"
    elif kw.get("enable_gqa") and gqa_groups(kw) is None:
        refusal = "unsupported", "enable_gqa=True with head counts that are not static multiples"
    elif kw.get("dropout_mask") is not None:
        refusal = "unsupported", "explicit dropout_mask"
    outputs = [node]
    if refusal is None and is_tuple:
        outputs = list(node.users)
        bad = [u for u in outputs if u.users and not (u.target == operator.getitem and u.args[1] == 0)]
        if bad:
            refusal = "unrecognised", f"uses outputs other than [0] of {node.target} ({bad[0].name})"
    if refusal is not None:
        ctx.report.skips.append(Skip(PASS, "attention", module_of(node), *refusal, [node.name]))
        return
    mask = kw.get(mask_name) if mask_name else None
    key, value = kw["key"], kw["value"]
    groups = gqa_groups(kw) if kw.get("enable_gqa") else 1
    if groups != 1:  # SDPA's enable_gqa: kv head h serves q heads h·g .. h·g + g - 1
        key, value = (repeat_heads(gm, t, groups, node) for t in (key, value))
    new = call(
        gm, ATTENTION,
        (kw["query"], key, value, mask, kw.get("scale"),
         bool(kw.get("is_causal", False)), kw.get("dropout_p", 0.0)),
        before=node, like=node,
    )
    replaced = [node.name] + ([u.name for u in outputs] if is_tuple else [])
    for out in outputs:
        out.replace_all_uses_with(new)
    erase_unused(gm, outputs + [node] if is_tuple else [node])
    ctx.report.rewrites.append(Rewrite(PASS, "attention", module_of(node), replaced, new.name, "attention"))


# -- small predicates -----------------------------------------------------------------------------
def _is_product(node: Any) -> bool:
    """matmul/bmm, or a two-operand einsum (checked further by the einsum helpers)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target == EINSUM:
        return len(node.args) > 1 and len(node.args[1]) == 2
    return node.target in PRODUCTS


def _operands(node: fx.Node) -> tuple[Any, Any]:
    return tuple(node.args[1]) if node.target == EINSUM else tuple(node.args[:2])


def _looks_like_attention(softmax: fx.Node) -> bool:
    """A softmax of scores from a matmul/bmm (through scale/mask ops), or one that feeds a
    matmul/bmm within two ops: the softmax of a classifier head is not a candidate."""
    x = softmax.args[0]
    if isinstance(x, fx.Node) and _reaches_product(x):
        return True
    frontier = [softmax]
    for _ in range(3):
        frontier = [u for n in frontier for u in n.users]
        if any(_is_product(u) for u in frontier):
            return True
    return False


def _reaches_product(node: Any, depth: int = 8) -> bool:
    """Whether ``node`` is, or flows through scale/mask ops from, a matmul/bmm/baddbmm."""
    for _ in range(depth):
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return False
        if _is_product(node) or node.target == aten.baddbmm.default:
            return True
        if node.target in ADDS:
            return any(_reaches_product(a, depth - 1) for a in node.args[:2])
        if node.target in SCALES | MASKED_FILLS:
            node = node.args[0] if isinstance(node.args[0], fx.Node) else node.args[1]
        elif node.target in WHERES:
            node = node.args[1]
        else:
            return False
    return False


def _only_user(node: fx.Node, what: str) -> fx.Node:
    users = [u for u in node.users if u.target != ASSERT_META]
    if len(users) != 1:
        raise Mismatch(f"{what} ({node.name}) used by {len(users)} nodes ({', '.join(u.name for u in users)})")
    return users[0]


def _same_dtype(to: fx.Node, src: fx.Node) -> bool:
    v = fake_value(src)
    return isinstance(v, torch.Tensor) and to.args[1] == v.dtype and not to.kwargs


def _swaps_last_two(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    v = fake_value(node.args[0]) if node.args else None
    rank = v.dim() if isinstance(v, torch.Tensor) else None
    if node.target == aten.t.default:
        return True
    if node.target == aten.transpose.int:
        dims = set(node.args[1:3])
        if dims == {-2, -1}:
            return True
        return rank is not None and {d % rank for d in dims} == {rank - 2, rank - 1}
    if node.target == aten.permute.default and rank is not None:
        perm = [d % rank for d in node.args[1]]
        return perm == list(range(rank - 2)) + [rank - 1, rank - 2]
    return False


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _op(node: Any) -> str:
    if isinstance(node, fx.Node):
        t = node.target
        return f"{node.name} ({getattr(t, '__name__', t) if node.op == 'call_function' else node.op})"
    return repr(node)

