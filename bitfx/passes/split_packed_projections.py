"""A packed projection whose output is split into the q, k, v of attention becomes one linear per part.

Before (GPT-2's ``c_attn``; timm/ViT ``qkv``; ``nn.MultiheadAttention``'s ``in_proj`` in self
attention, and its ``k+v`` part in cross attention)::

    y = linear(x, W, b)                                   # W: [P·E, K]
    q, k, v = split(view(y, [B, L, 3E]), E, -1)           # split | split_with_sizes | chunk
    q, k, v = unbind(permute(view(y, [B, L, 3, H, D]), [2, 0, 3, 1, 4]))   # view | unflatten, then
                                                          # permute | transpose | (un)squeeze | contiguous,
                                                          # then unbind | select along the parts axis

After::

    q = permute(view(linear(x, W[0:E], b[0:E]), [B, L, H, D]), [0, 2, 1, 3])   # part 0, the same
    k = ...W[E:2E]...                                                         # moves without the
    v = ...W[2E:3E]...                                                        # parts axis

so ``binarize_linear`` gives each part its own ``bit_linear``: its own weight scale α, its own
activation ``move``/α, its bias slice. The weights are slices (views) of the packed parameter, which
the kernels take as the parameter plus its view (one packed copy per slice, updated in place).

A linear is split only when every part that is used feeds the q, k or v of a ``bitfx.attention``
(a packed gate/up projection of a gated MLP stays whole), when nothing else reads the packed output,
and when ``binarize_linear`` would binarize it (the float numbers of a kept layer are not touched);
a model's own fake-quant linears (a weight that is not a parameter view) are never split.
Numbers: the same products and bias additions as before the split.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from bitfx.ops import ATTENTION
from bitfx.passes.binarize_linear import PART, refusal
from bitfx.passes.context import PassContext, Rewrite, fake_value, module_of
from bitfx.passes.graph import call, erase_unused

aten = torch.ops.aten
PASS = "split_packed_projections"

_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}
_COPIES = {aten.contiguous.default, aten.clone.default}


@dataclass
class _Match:
    sizes: list[int]                                   # rows of each part (equal for view splits)
    lead: list[fx.Node] = field(default_factory=list)  # views keeping the last dim N (before the split)
    split: fx.Node | None = None                       # split/chunk of the last dim, or the parts view
    axis: int = -1                                     # the parts axis in the parts view's output
    moves: list[fx.Node] = field(default_factory=list)  # permute/transpose/(un)squeeze/copy after it
    parts: dict[int, fx.Node] = field(default_factory=dict)  # part index -> the node that extracts it
    nodes: list[fx.Node] = field(default_factory=list)  # everything replaced (erased when unused)


def split_packed_projections(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != aten.linear.default:
            continue
        m = _match(node)
        if m is None or len(m.parts) < 2 or not all(_feeds_attention(p) for p in m.parts.values()):
            continue
        if refusal(node, ctx) is not None:
            continue  # stays float (and is reported) as one linear
        _rewrite(gm, node, m, ctx)
    return gm


# -- matching ---------------------------------------------------------------------------------------
def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _shape(node) -> tuple | None:
    v = fake_value(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _same(a, b) -> bool:
    return a is b or statically_known_true(a == b)


def _norm(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _match(linear: fx.Node) -> _Match | None:
    shape = _shape(linear)
    if not shape or not isinstance(shape[-1], int):
        return None
    n = shape[-1]
    m = _Match(sizes=[])
    z = linear
    while True:  # views that keep the feature dim last (GPT-2's [B·L, 3E] -> [B, L, 3E])
        u = _only_user(z)
        if u is None:
            return None
        if u.target in _RESHAPES and _lead_view(u, n):
            m.lead.append(u)
            z = u
            continue
        break
    rank = len(_shape(z) or ())
    if rank == 0:
        return None
    if u.target in _SPLITS:
        return _match_split(m, u, n, rank)
    if u.target in _RESHAPES or u.target == aten.unflatten.int:
        return _match_parts_view(m, z, u, n, rank)
    return None


def _lead_view(u: fx.Node, n: int) -> bool:
    out = _shape(u)
    return bool(out) and isinstance(out[-1], int) and out[-1] == n and list(u.args[1])[-1] in (n, -1)


def _match_split(m: _Match, u: fx.Node, n: int, rank: int) -> _Match | None:
    dim = u.args[2] if len(u.args) > 2 else u.kwargs.get("dim", 0)
    if _norm(dim, rank) != rank - 1:
        return None
    if u.target == aten.split_with_sizes.default:
        sizes = list(u.args[1])
    elif u.target == aten.split.Tensor:
        e = u.args[1]
        sizes = [e] * (n // e) + ([n % e] if n % e else []) if isinstance(e, int) and e > 0 else []
    else:  # chunk: ceil(n / chunks) rows each, the last one shorter
        c = u.args[1]
        e = -(-n // c) if isinstance(c, int) and c > 0 else 0
        sizes = [min(e, n - i) for i in range(0, n, e)] if e else []
    if not sizes or sum(sizes) != n or not all(isinstance(s, int) and s > 0 for s in sizes):
        return None
    m.sizes, m.split = sizes, u
    for g in u.users:
        if g.target != operator.getitem or not isinstance(g.args[1], int):
            return None
        m.parts[g.args[1] % len(sizes)] = g
    m.nodes = [*m.lead, u, *u.users]
    return m


def _match_parts_view(m: _Match, z: fx.Node, u: fx.Node, n: int, rank: int) -> _Match | None:
    """``view(z, [lead.., P, r..])`` / ``unflatten(z, -1, [P, r..])``, axis moves, then unbind/select."""
    zs, out = _shape(z), _shape(u)
    if out is None:
        return None
    if u.target == aten.unflatten.int:
        if _norm(u.args[1], rank) != rank - 1:
            return None
        axis = rank - 1
    else:  # the parts axis: the first dim from which the trailing sizes multiply to N
        axis = next((i for i in range(len(out)) if all(isinstance(d, int) for d in out[i:])
                     and math.prod(out[i:]) == n), None)
        if axis is None or axis == len(out) - 1 or not isinstance(u.args[1][axis], int):
            return None
        lead_in, lead_out = math.prod(zs[:-1]) if rank > 1 else 1, math.prod(out[:axis]) if axis else 1
        if not _same(lead_in, lead_out):
            return None
    p = out[axis]
    if not (isinstance(p, int) and p >= 2 and n % p == 0):
        return None
    m.sizes, m.split, m.axis = [n // p] * p, u, axis
    t, a, r = u, axis, len(out)
    while True:
        users = list(t.users)
        if users and all(s.target == aten.select.int and _norm(s.args[1], r) == a for s in users):
            for s in users:
                m.parts[s.args[2] % p] = s
            break
        if len(users) != 1:
            return None
        s = users[0]
        if s.target == aten.unbind.int and _norm(s.args[1] if len(s.args) > 1 else 0, r) == a:
            if not all(g.target == operator.getitem for g in s.users):
                return None
            for g in s.users:
                m.parts[g.args[1] % p] = g
            m.moves.append(s)
            break
        moved = _move_axis(s, a, r)
        if moved is None:
            return None
        a, r = moved
        m.moves.append(s)
        t = s
    m.nodes = [*m.lead, u, *m.moves, *m.parts.values()]
    return m


def _move_axis(s: fx.Node, a: int, r: int) -> tuple[int, int] | None:
    """Where axis ``a`` of a rank-``r`` tensor is after ``s`` (and the new rank), or None."""
    if s.target in _COPIES:
        return a, r
    perm = _perm(s, r)
    if perm is not None:
        return perm.index(a), r
    if s.target == aten.unsqueeze.default:
        d = _norm(s.args[1], r + 1)
        return a + (d <= a), r + 1
    if s.target == aten.squeeze.dim and isinstance(s.args[1], int):
        d, out = _norm(s.args[1], r), _shape(s)
        if d == a or out is None or len(out) != r - 1:
            return None  # the parts axis itself, or a dim that is not 1 (squeeze keeps it)
        return a - (d < a), r - 1
    return None


def _perm(s: fx.Node, r: int) -> list[int] | None:
    if s.target == aten.permute.default:
        return [_norm(d, r) for d in s.args[1]]
    if s.target == aten.transpose.int:
        perm = list(range(r))
        i, j = _norm(s.args[1], r), _norm(s.args[2], r)
        perm[i], perm[j] = perm[j], perm[i]
        return perm
    return None


def _feeds_attention(node: fx.Node, limit: int = 256) -> bool:
    """Whether ``node`` reaches the q, k or v of a ``bitfx.attention`` (through any ops: rotary,
    caches, head repeats)."""
    seen, frontier = {node}, [node]
    while frontier and len(seen) < limit:
        n = frontier.pop()
        for u in n.users:
            if u.target == ATTENTION and n in u.args[:3]:
                return True
            if u not in seen and u.op == "call_function":
                seen.add(u)
                frontier.append(u)
    return False


# -- rewriting --------------------------------------------------------------------------------------
def _rewrite(gm: fx.GraphModule, linear: fx.Node, m: _Match, ctx: PassContext) -> None:
    x, weight = linear.args[:2]
    bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    offsets = [sum(m.sizes[:i]) for i in range(len(m.sizes))]
    news = []
    for i, before in sorted(m.parts.items()):
        lo, hi = offsets[i], offsets[i] + m.sizes[i]
        w = call(gm, aten.slice.Tensor, (weight, 0, lo, hi), before=before, like=linear)
        b = None if bias is None else call(gm, aten.slice.Tensor, (bias, 0, lo, hi), before=before, like=linear)
        y = call(gm, aten.linear.default, (x, w, b), before=before, like=linear)
        y.meta[PART] = (linear.name, i, len(m.sizes))
        news.append(y.name)
        for v in m.lead:
            y = _again(gm, v, (y, [*list(v.args[1])[:-1], m.sizes[i]]), before)
        if m.split is not None and m.split.target not in _SPLITS:
            y = _parts_view(gm, m, y, before)
            a, r = m.axis, len(_shape(m.split))
            for s in m.moves:
                if s.target == aten.unbind.int:
                    break
                y, (a, r) = _move_again(gm, s, y, a, r, before), _move_axis(s, a, r)
        before.replace_all_uses_with(y)
    erase_unused(gm, [linear, *m.nodes])
    ctx.report.rewrites.append(Rewrite(PASS, "linear", module_of(linear), [linear.name], ",".join(news), "linear"))


def _again(gm, like: fx.Node, args: tuple, before: fx.Node) -> fx.Node:
    return call(gm, like.target, args, dict(like.kwargs), before=before, like=like)


def _parts_view(gm, m: _Match, y: fx.Node, before: fx.Node) -> fx.Node:
    """The parts view without its parts axis: ``view(y, [lead.., r..])``."""
    u = m.split
    if u.target == aten.unflatten.int:
        rest = list(u.args[2])[1:]
        return y if len(rest) == 1 else call(gm, aten.unflatten.int, (y, -1, rest), before=before, like=u)
    shape = list(u.args[1])
    return _again(gm, u, (y, shape[:m.axis] + shape[m.axis + 1:]), before)


def _move_again(gm, s: fx.Node, y: fx.Node, a: int, r: int, before: fx.Node) -> fx.Node:
    """``s`` (which moved the parts axis ``a`` of a rank-``r`` tensor) applied to one part."""
    if s.target in _COPIES:
        return _again(gm, s, (y, *s.args[1:]), before)
    perm = _perm(s, r)
    if perm is not None:
        part = [d - (d > a) for d in perm if d != a]
        return y if part == sorted(part) else call(gm, aten.permute.default, (y, part), before=before, like=s)
    if s.target == aten.unsqueeze.default:
        d = _norm(s.args[1], r + 1)
        a_out = a + (d <= a)
        return call(gm, aten.unsqueeze.default, (y, d - (d > a_out)), before=before, like=s)
    d = _norm(s.args[1], r)  # squeeze.dim of another axis
    return call(gm, aten.squeeze.dim, (y, d - (d > a)), before=before, like=s)
