"""Small graph-editing helpers shared by the passes (meta propagation, parameters, tracing back)."""
from __future__ import annotations

import operator
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from bitfx.passes.context import fake_value, unique_attr

aten = torch.ops.aten

#: Ops that only move data (what a weight may pass through on its way to a matmul).
VIEW_OPS = {
    aten.t.default, aten.transpose.int, aten.permute.default, aten.view.default,
    aten.reshape.default, aten._unsafe_view.default, aten.contiguous.default, aten.clone.default,
    aten.alias.default, aten.expand.default,
}

#: Ops that take a part of a tensor (a slice of a packed parameter, e.g. MHA's in_proj_weight).
SLICE_OPS = {
    aten.slice.Tensor, aten.narrow.default, aten.select.int, aten.split.Tensor,
    aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int, operator.getitem,
}

#: Meta keys copied from a replaced node to its replacement (module grouping, source lines).
INHERITED_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node", "seq_nr")


def copy_meta(src: fx.Node, dst: fx.Node) -> None:
    for key in INHERITED_META:
        if key in src.meta and key not in dst.meta:
            dst.meta[key] = src.meta[key]


def propagate_val(gm: fx.GraphModule, node: fx.Node) -> None:
    """Set ``node.meta["val"]`` by running its target on the fake values of its inputs."""
    if node.op != "call_function":
        return
    vals = [fake_value(a) for a in node.all_input_nodes]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if mode is None:
        return

    def fake(a: Any) -> Any:
        if isinstance(a, fx.Node):
            v = fake_value(a)
            if v is None and a.op == "get_attr":
                v = mode.from_tensor(getattr_path(gm, a.target), static_shapes=True)
                a.meta["val"] = v
            return v
        return a

    args = fx.node.map_aggregate(node.args, fake)
    kwargs = fx.node.map_aggregate(node.kwargs, fake)
    try:
        with mode:
            node.meta["val"] = node.target(*args, **kwargs)
    except Exception:  # meta is a convenience for later passes and the diff tool, never required
        pass


def getattr_path(mod: torch.nn.Module, target: str) -> Any:
    obj = mod
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def add_parameter(gm: fx.GraphModule, base: str, value: torch.Tensor, before: fx.Node,
                  trainable: bool = True) -> fx.Node:
    """Register ``value`` on ``gm`` and return a get_attr node for it, inserted before ``before``."""
    name = unique_attr(gm, base)
    if trainable:
        gm.register_parameter(name, torch.nn.Parameter(value))
    else:
        gm.register_buffer(name, value)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    copy_meta(before, node)
    return node


def call(gm: fx.GraphModule, target, args: tuple, kwargs: dict | None = None, *,
         before: fx.Node, like: fx.Node | None = None) -> fx.Node:
    """Insert ``target(*args)`` before ``before`` with meta inherited from ``like`` and a fake value."""
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(target, args, kwargs or {})
    copy_meta(like if like is not None else before, node)
    propagate_val(gm, node)
    return node


def trace_back(node: Any, through: Iterable = VIEW_OPS) -> tuple[Any, list[fx.Node]]:
    """Follow ``node`` up through data-movement ops; return (source, ops passed)."""
    through = set(through)
    passed = []
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in through:
        passed.append(node)
        node = node.args[0]
    return node, passed


def static_shape(node: Any) -> tuple[int, ...] | None:
    """The shape of ``node`` if every dimension is a plain int, else None."""
    v = fake_value(node)
    if not isinstance(v, torch.Tensor):
        return None
    try:
        return tuple(int(d) for d in v.shape)
    except Exception:
        return None


def last_dim(node: Any) -> int | None:
    v = fake_value(node)
    if not isinstance(v, torch.Tensor) or v.dim() == 0:
        return None
    d = v.shape[-1]
    return d if isinstance(d, int) else None


def erase_unused(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> None:
    """Erase ``nodes`` (in reverse topological order) that no longer have users."""
    for n in sorted(set(nodes), key=lambda n: -_index(gm, n)):
        if n.op == "call_function" and not n.users:
            gm.graph.erase_node(n)


def _index(gm: fx.GraphModule, node: fx.Node) -> int:
    # memoised on the graph, not on the module: a module attribute holding the graph makes the module
    # unpicklable, and AOTAutograd's cache pickles the module to key it
    order = getattr(gm.graph, "_bitfx_order", None)
    if order is None:
        order = gm.graph._bitfx_order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return order.get(node, 0)
