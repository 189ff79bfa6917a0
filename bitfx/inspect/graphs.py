"""Pass-manager snapshots as networkx graphs, and what each pass changed.

Nodes keep their names across passes (a pass only creates or erases nodes, the snapshot copies
keep names), so two consecutive snapshots differ by the names one removed and the other added.
A *change* is one connected region of such nodes: the removed nodes of the older graph, the added
nodes of the newer one, linked where an untouched node read a removed node and now reads an added
one at the same argument position. In each region the added bitfx op (else the added sinks) is the
*replacement*; the other added nodes (parameters, estimators, transposes) *support* it.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import networkx as nx
import torch
import torch.fx as fx

from bitfx.passes.context import fake_value, module_of
from bitfx.passes.graph import getattr_path


def is_bookkeeping(node: fx.Node) -> bool:
    """Nodes the pictures leave out: shape arithmetic, export's guard call and runtime asserts."""
    if node.op == "call_module" and str(node.target).startswith("_guards"):
        return True
    if node.op == "call_function" and getattr(node.target, "__name__", "").startswith("_assert"):
        return True
    return isinstance(fake_value(node), (torch.SymInt, torch.SymFloat, torch.SymBool, int, float))


def target_name(node: fx.Node) -> str:
    """``aten.linear.default``, ``bitfx.bit_linear.default``, ``mul`` (builtins), or the attribute path."""
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload):
        return str(t)
    return getattr(t, "__name__", str(t))


def short_name(target: str) -> str:
    """``aten.linear.default`` -> ``linear``; ``bitfx.bit_linear.default`` -> ``bit_linear``."""
    parts = target.split(".")
    if len(parts) >= 3 and parts[0] in ("aten", "bitfx", "prims"):
        return parts[1]
    return target


def is_bitfx(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "namespace", None) == "bitfx"


def group_of(node: fx.Node) -> str:
    """The module a node belongs to; parameters (no module stack) belong to their owner module."""
    name = module_of(node)
    if not name and node.op == "get_attr":
        name = str(node.target).rpartition(".")[0]
    return name


# -- concrete shapes ------------------------------------------------------------------------------
def _dim(d: Any) -> int | None:
    if isinstance(d, int):
        return d
    if isinstance(d, torch.SymInt):
        node = d.node
        if node.has_hint():  # the size seen while tracing the example inputs
            return int(node.hint)
    return None


def concrete_shapes(gm: fx.GraphModule, example_inputs: Sequence[Any] | None = None) -> dict[str, list[int] | None]:
    """Each node's output shape for the example inputs (``None`` for non-tensors).

    Symbolic dims of ``meta["val"]`` are read from their hints (the example sizes seen by export);
    parameters are read from the module itself. Only when a hint is missing does the graph run
    once under ``ShapeProp`` with ``example_inputs``.
    """
    shapes: dict[str, list[int] | None] = {}
    missing = False
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            try:
                value = getattr_path(gm, node.target)
            except AttributeError:
                value = fake_value(node)
            shapes[node.name] = [_dim(d) for d in value.shape] if isinstance(value, torch.Tensor) else None
            continue
        v = fake_value(node)
        if not isinstance(v, torch.Tensor):
            shapes[node.name] = None
            missing |= node.op != "output" and v is None
            continue
        dims = [_dim(d) for d in v.shape]
        if any(d is None for d in dims):
            missing = True
        shapes[node.name] = dims
    if missing and example_inputs is not None:
        shapes.update(_shape_prop(gm, example_inputs, shapes))
    return shapes


def _shape_prop(gm: fx.GraphModule, example_inputs, known) -> dict[str, list[int] | None]:
    from torch.fx.passes.shape_prop import ShapeProp

    flat = [x for x in torch.utils._pytree.tree_leaves(tuple(example_inputs))]
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*flat)
    except Exception:  # shapes are a convenience: keep what the hints gave
        return {}
    out = {}
    for node in gm.graph.nodes:
        tm = node.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape") and (known.get(node.name) is None or None in known[node.name]):
            out[node.name] = [int(d) for d in tm.shape]
    return out


# -- networkx -------------------------------------------------------------------------------------
def to_networkx(gm: fx.GraphModule, shapes: dict[str, list[int] | None]) -> nx.DiGraph:
    """One DiGraph per snapshot: nodes keyed by FX name, with op, target, module, shape, order."""
    g = nx.DiGraph()
    for i, node in enumerate(gm.graph.nodes):
        target = target_name(node)
        g.add_node(
            node.name, op=node.op, target=target, label=short_name(target), module=group_of(node),
            shape=shapes.get(node.name), order=i, bitfx=is_bitfx(node), hidden=is_bookkeeping(node),
        )
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


# -- folding modules into boxes (the HTML overview, the terminal table) ---------------------------
def visible(g: nx.DiGraph, with_params: bool) -> list[str]:
    nodes = [n for n, a in g.nodes(data=True) if not a["hidden"] and (with_params or a["op"] != "get_attr")]
    return sorted(nodes, key=lambda n: g.nodes[n]["order"])


def folder(g: nx.DiGraph, depth: int) -> Callable[[str], str]:
    """``module -> box`` at ``depth``: modules fold into their ancestor at that depth, or, when shallower,
    into their outermost ancestor that no deeper box splits. A module split into deeper boxes keeps
    its own ops (residual adds, activations written in ``forward``) as single nodes between the
    boxes of its children, so the folded graph stays in execution order; those, and the root's
    ops, map to ''."""
    split = set()
    for n in visible(g, with_params=True):
        parts = g.nodes[n]["module"].split(".") if g.nodes[n]["module"] else []
        if len(parts) >= depth:
            split.update(".".join(parts[:i]) for i in range(1, depth))

    def box(module: str) -> str:
        parts = module.split(".") if module else []
        if len(parts) >= depth:
            return ".".join(parts[:depth])
        return next((p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if p not in split), "")

    return box


def fold_depth(g: nx.DiGraph, limit: int = 40) -> int:
    """The deepest module depth at which the overview has at most ``limit`` boxes (at least 1)."""
    nodes = visible(g, with_params=False)
    deepest = max((len(g.nodes[n]["module"].split(".")) for n in nodes if g.nodes[n]["module"]), default=1)
    best = 1
    for depth in range(1, deepest + 1):
        box = folder(g, depth)
        if len({box(g.nodes[n]["module"]) or f"\0{n}" for n in nodes}) <= limit:
            best = depth
    return best


# -- what a pass changed --------------------------------------------------------------------------
@dataclass
class Change:
    """One rewritten region: ``removed`` nodes of the older graph became ``replacement`` (+ ``support``)."""

    replacement: str
    target: str
    removed: list[str] = field(default_factory=list)
    support: list[str] = field(default_factory=list)


@dataclass
class PassChanges:
    name: str
    nodes_before: int
    nodes_after: int
    removed: list[str]
    added: list[str]
    changes: list[Change]
    dropped: list[str]  # removed nodes that nothing replaced (dead code)


def _leaves(obj: Any) -> Iterable[Any]:
    if isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _leaves(o)
    elif isinstance(obj, dict):
        for k in sorted(obj):
            yield from _leaves(obj[k])
    else:
        yield obj


def _arg_pairs(old: fx.Node, new: fx.Node) -> Iterable[tuple[str, str]]:
    """(old input, new input) pairs of a node present in both graphs, by argument position."""
    a = list(_leaves((old.args, old.kwargs)))
    b = list(_leaves((new.args, new.kwargs)))
    if len(a) == len(b):
        for x, y in zip(a, b):
            if isinstance(x, fx.Node) and isinstance(y, fx.Node) and x.name != y.name:
                yield x.name, y.name
    else:
        for x in old.all_input_nodes:
            for y in new.all_input_nodes:
                yield x.name, y.name


def pass_changes(name: str, before: fx.Graph, after: fx.Graph) -> PassChanges:
    old = {n.name: n for n in before.nodes}
    new = {n.name: n for n in after.nodes}
    # a node kept under its name but with another target is a removal plus an addition
    modified = {k for k in old.keys() & new.keys() if old[k].op != new[k].op or old[k].target != new[k].target}
    removed = [k for k in old if k not in new or k in modified]
    added = [k for k in new if k not in old or k in modified]
    rset, aset = set(removed), set(added)

    links = nx.Graph()
    links.add_nodes_from(("-", r) for r in removed)
    links.add_nodes_from(("+", a) for a in added)
    for r in removed:
        links.add_edges_from((("-", r), ("-", u.name)) for u in old[r].users if u.name in rset)
    for a in added:
        links.add_edges_from((("+", a), ("+", u.name)) for u in new[a].users if u.name in aset)
    for k in old.keys() & new.keys():
        if k in modified:
            continue
        for x, y in _arg_pairs(old[k], new[k]):
            if x in rset and y in aset:
                links.add_edge(("-", x), ("+", y))

    changes, dropped = [], []
    for comp in nx.connected_components(links):
        gone = sorted((n for s, n in comp if s == "-"), key=list(old).index)
        born = sorted((n for s, n in comp if s == "+"), key=list(new).index)
        if not born:
            dropped.extend(gone)
            continue
        changes.extend(_split(gone, born, old, new))
    order = list(new)
    changes.sort(key=lambda c: order.index(c.replacement))
    return PassChanges(name, len(old), len(new), removed, added, changes, dropped)


def _split(gone: list[str], born: list[str], old, new) -> list[Change]:
    """Name the replacement(s) of one region and share its removed nodes among them."""
    born_set = set(born)
    primaries = [b for b in born if is_bitfx(new[b])]
    if not primaries:
        primaries = [b for b in born if not any(u.name in born_set for u in new[b].users)]
    changes = {p: Change(p, target_name(new[p])) for p in primaries}
    first = changes[primaries[0]]
    if len(primaries) == 1:
        first.removed = list(gone)
    else:
        owner = _upstream_owner(gone, primaries, old, new)
        for g in gone:
            changes[owner.get(g, primaries[0])].removed.append(g)
    for b in born:
        if b not in changes:
            changes[_downstream(b, changes, new, born_set) or primaries[0]].support.append(b)
    return list(changes.values())


def _downstream(name: str, primaries, new, born_set) -> str | None:
    seen, frontier = {name}, [name]
    while frontier:
        n = frontier.pop(0)
        for u in new[n].users:
            if u.name in primaries:
                return u.name
            if u.name in born_set and u.name not in seen:
                seen.add(u.name)
                frontier.append(u.name)
    return None


def _upstream_owner(gone, primaries, old, new) -> dict[str, str]:
    """With several replacements in one region, a removed node belongs to the one whose users it fed."""
    owner: dict[str, str] = {}
    gone_set = set(gone)
    for p in primaries:
        for u in new[p].users:
            if u.name in old:
                for x, y in _arg_pairs(old[u.name], u):
                    if y == p and x in gone_set:
                        owner.setdefault(x, p)
    changed = True
    while changed:  # a removed node whose users all belong to one replacement belongs to it too
        changed = False
        for g in gone:
            if g in owner:
                continue
            users = {owner.get(u.name) for u in old[g].users}
            if len(users) == 1 and None not in users:
                owner[g] = users.pop()
                changed = True
    return owner


def origins(snapshots: Sequence[tuple[str, fx.GraphModule]], steps: Sequence[PassChanges]) -> dict[str, set[str]]:
    """For every node of every snapshot, the capture nodes it stands for (empty for new support)."""
    origin: dict[str, set[str]] = {n.name: {n.name} for n in snapshots[0][1].graph.nodes}
    for step in steps:
        for ch in step.changes:
            origin[ch.replacement] = set().union(*(origin.get(r, {r}) for r in ch.removed)) if ch.removed else set()
            for s in ch.support:
                origin.setdefault(s, set())
    return origin


def changes_by_pass(snapshots: Sequence[tuple[str, fx.GraphModule]]) -> list[PassChanges]:
    return [
        pass_changes(name, prev.graph, gm.graph)
        for (_, prev), (name, gm) in zip(snapshots, snapshots[1:])
    ]


def support_of(final: fx.Graph, capture_names: set[str], owners: set[str]) -> dict[str, list[str]]:
    """New nodes of the final graph that exist only to feed one of ``owners`` (params, estimators, t)."""
    by_owner: dict[str, list[str]] = defaultdict(list)
    nodes = {n.name: n for n in final.nodes}
    new = {k for k in nodes if k not in capture_names and k not in owners}
    for name in new:
        owner = _downstream(name, owners, nodes, new)
        if owner is not None:
            by_owner[owner].append(name)
    order = list(nodes)
    return {k: sorted(v, key=order.index) for k, v in by_owner.items()}
