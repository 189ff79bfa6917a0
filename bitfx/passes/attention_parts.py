"""Pieces of attention spellings for ``canonicalize_attention``: einsum index maps, SDPA's
grouped-query heads, and the constants that fill masks. Each raises :class:`Mismatch` (saying what
differed) when a subgraph is not the attention it resembles."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from bitfx.passes.context import fake_value
from bitfx.passes.graph import call, getattr_path

aten = torch.ops.aten


class Mismatch(Exception):
    """The subgraph around a softmax is not exactly an attention; the message says what differed."""


# -- einsum spellings ----------------------------------------------------------------------------
def _einsum_terms(node: fx.Node) -> tuple[list[str], str, int]:
    """(operand terms, output term, leading '...' dims) of a two-operand einsum."""
    eq = node.args[0].replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    terms = lhs.split(",")
    if not arrow or len(terms) != 2:
        raise Mismatch(f"einsum {eq!r} is not a two-operand product with an explicit output")
    ell = [t.startswith("...") for t in (*terms, out)]
    if any(ell) and not all(ell):
        raise Mismatch(f"einsum {eq!r}: '...' must lead every term")
    terms, out = [t.removeprefix("...") for t in terms], out.removeprefix("...")
    if any(len(set(t)) != len(t) or not t.isalpha() for t in (*terms, out)):
        raise Mismatch(f"einsum {eq!r}: repeated or non-letter indices")
    v = fake_value(node)
    n_ell = v.dim() - len(out) if isinstance(v, torch.Tensor) else 0
    if any(ell) and not isinstance(v, torch.Tensor):
        raise Mismatch(f"einsum {eq!r}: rank unknown")
    return terms, out, n_ell


def _perm(term: str, order: str, n_ell: int) -> list[int] | None:
    """Dims of a tensor indexed by ``term`` (after ``n_ell`` leading dims) put into ``order``."""
    perm = list(range(n_ell)) + [n_ell + term.index(c) for c in order]
    return None if perm == sorted(perm) else perm


def einsum_scores(node: fx.Node) -> tuple[list[int] | None, list[int] | None]:
    """``einsum("bhid,bhjd->bhij", q, k)`` in any index order: the permutes giving q [.., i, d], k [.., j, d]."""
    (a, b), out, n_ell = _einsum_terms(node)
    batch, i, j = out[:-2], out[-2:-1], out[-1:]
    contracted = (set(a) & set(b)) - set(out)
    if len(out) < 2 or len(contracted) != 1:
        raise Mismatch(f"einsum {node.args[0]!r} does not contract one head dimension into [.., Lq, Lk] scores")
    d = contracted.pop()
    if set(a) != set(batch + i + d) or set(b) != set(batch + j + d):
        raise Mismatch(f"einsum {node.args[0]!r} is not q·kᵀ over shared batch dimensions")
    return _perm(a, batch + i + d, n_ell), _perm(b, batch + j + d, n_ell)


def einsum_pv(node: fx.Node) -> tuple[list[int] | None, list[int] | None]:
    """``einsum("bhij,bhjd->bhid", p, v)`` in any order of v and the output: (v permute, output permute)."""
    (p, w), out, n_ell = _einsum_terms(node)
    if len(p) < 2:
        raise Mismatch(f"einsum {node.args[0]!r}: probabilities need two dimensions")
    batch, i, j = p[:-2], p[-2:-1], p[-1:]
    extra = set(w) - set(p)
    if j in out or len(extra) != 1 or set(w) != set(batch + j) | extra or set(out) != set(batch + i) | extra:
        raise Mismatch(f"einsum {node.args[0]!r} is not P·v over the key dimension")
    e = extra.pop()
    back = _perm(batch + i + e, out, n_ell)  # the attention output [batch.., i, e] -> the einsum's order
    return _perm(w, batch + j + e, n_ell), back


# -- grouped-query attention ----------------------------------------------------------------------
def gqa_groups(kw: dict) -> int | None:
    """q heads per kv head (dim -3), or None when the counts are not static multiples."""
    shapes = [fake_value(kw[n]) for n in ("query", "key", "value")]
    if not all(isinstance(v, torch.Tensor) and v.dim() >= 3 for v in shapes):
        return None
    hq, hk, hv = (v.shape[-3] for v in shapes)
    if not all(isinstance(h, int) for h in (hq, hk, hv)) or hk != hv or hk == 0 or hq % hk:
        return None
    return hq // hk


def repeat_heads(gm: fx.GraphModule, t: fx.Node, groups: int, before: fx.Node) -> fx.Node:
    """``repeat_interleave(t, groups, dim=-3)`` as HF's ``repeat_kv`` writes it (a view, then one copy)."""
    rank = fake_value(t).dim()
    x = call(gm, aten.unsqueeze.default, (t, -3), before=before)
    sizes = [-1] * (rank + 1)
    sizes[-3] = groups
    x = call(gm, aten.expand.default, (x, sizes), before=before)
    return call(gm, aten.flatten.using_ints, (x, -4, -3), before=before)


# -- fill constants ------------------------------------------------------------------------------
def constant(x: Any) -> Any:
    """The Python number a 0-d constant node holds (``full([], c)``, ``scalar_tensor(c)``, a lifted
    0-d tensor constant), GPT-2's ``where(causal, s, mask_value)`` spelling; else ``x`` itself."""
    if not isinstance(x, fx.Node):
        return x
    if x.op == "call_function" and x.target == aten.full.default and list(x.args[0]) == []:
        return x.args[1]
    if x.op == "call_function" and x.target == aten.scalar_tensor.default:
        return x.args[0]
    if x.op == "call_function" and x.target in (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout,
                                                aten.lift_fresh_copy.default, aten.detach_.default,
                                                aten.detach.default):
        return constant(x.args[0])
    if x.op == "get_attr" and x.graph.owning_module is not None:
        t = getattr_path(x.graph.owning_module, x.target)
        if isinstance(t, torch.Tensor) and t.dim() == 0 and t.is_floating_point():
            return t.item()
    return x


def chain_of_constant(x: Any) -> list[fx.Node]:
    """The call nodes that build a 0-d fill constant (erased with the match when left unused)."""
    out = []
    while isinstance(x, fx.Node) and x.op == "call_function":
        out.append(x)
        x = x.args[0] if x.args and isinstance(x.args[0], fx.Node) else None
    return out
