"""``bitfx.diff``: what the pipeline did to a model, read from the pass manager's snapshots.

The numbers follow :mod:`bitfx.inspect.cost` (``OPs = BOPs/64 + FLOPs``, 1 bit per binary
weight). The graphs are the pass manager's own snapshots (``trace(..., snapshot=True)``), the
first being ``capture`` and the last the final graph: there is no second code path.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import networkx as nx
import torch
import torch.fx as fx

from bitfx.config import BinarizeConfig
from bitfx.inspect import cost as C
from bitfx.inspect.graphs import (
    PassChanges,
    changes_by_pass,
    concrete_shapes,
    group_of,
    is_bitfx,
    origins,
    short_name,
    support_of,
    target_name,
    to_networkx,
)
from bitfx.passes.context import Report
from bitfx.passes.graph import SLICE_OPS, VIEW_OPS, getattr_path, trace_back

SCHEMA_VERSION = 1


@dataclass
class Layer:
    """One candidate of the final graph: a bitfx op, or an op left in float (and why)."""

    node: str
    module: str
    kind: str
    target: str
    status: str                  # "binary" | "float"
    reason: str | None           # config | unrecognised | unsupported | untouched (float only)
    detail: str
    replaced: list[str]          # capture nodes this node stands for
    support: list[str]           # new nodes that only feed it (parameters, estimators)
    weight_bits: int | None
    act_bits: int | None
    bytes_before: int
    bytes_after: int
    before: C.Cost
    after: C.Cost


@dataclass
class GraphDiff:
    """The result of :func:`diff`; render it with ``print()``, ``to_json()`` or ``to_html()``."""

    model: str
    config: BinarizeConfig
    inputs: list[dict]
    snapshots: list[tuple[str, fx.GraphModule]]
    graphs: list[tuple[str, nx.DiGraph]]
    passes: list[PassChanges]
    replacements: list[dict]
    float_candidates: list[dict]
    added: list[dict]
    layers: list[Layer]
    totals: dict
    report: Report = field(repr=False, default_factory=Report)

    @property
    def changed(self) -> bool:
        """Whether a pass made anything binary (False for a float model with nothing to rewrite,
        and for a model that was binary already)."""
        return any(r["binary"] for r in self.replacements)

    @property
    def before(self) -> nx.DiGraph:
        return self.graphs[0][1]

    @property
    def after(self) -> nx.DiGraph:
        return self.graphs[-1][1]

    def modules(self) -> list[dict]:
        """Per-module sums of the layers (modules in graph order)."""
        rows: dict[str, dict] = {}
        for ly in self.layers:
            m = rows.setdefault(ly.module, {"module": ly.module, "layers": [], "binary": 0, "float": 0,
                                           **_cost_fields(0, 0, C.Cost(), C.Cost())})
            m["layers"].append(ly.node)
            m[ly.status] += 1
            _accumulate(m, _cost_fields(ly.bytes_before, ly.bytes_after, ly.before, ly.after))
        return list(rows.values())

    def to_dict(self) -> dict:
        from bitfx.inspect.render import to_dict
        return to_dict(self)

    def to_json(self, path: str | None = None) -> str:
        import json
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def to_html(self, path: str | None = None, engine: str = "auto") -> str:
        """One self-contained page; ``engine``: "dot" (Graphviz), "python" (built-in layout) or "auto"."""
        from bitfx.inspect.html import to_html
        page = to_html(self, engine)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(page)
        return page

    def print(self, console=None) -> None:
        from bitfx.inspect.render import print_summary
        print_summary(self, console)

    def summary(self) -> str:
        from bitfx.inspect.render import summary_text
        return summary_text(self)


def diff(model: torch.nn.Module, example_inputs: Any = (), config=None, *,
         example_kwargs: Mapping[str, Any] | None = None) -> GraphDiff:
    """What bitfx does to ``model``: rewrites per module, what stayed float and why, bytes and OPs.

    Args:
        model: any ``nn.Module`` that ``torch.export`` can capture (put it in ``eval()`` mode
            first: attention dropout keeps attention in float).
        example_inputs: one batch as the model takes it: a tuple of positional inputs, one tensor,
            or a mapping of keyword inputs (a tokenizer's output); shapes and counts are for these sizes.
        config: a :class:`BinarizeConfig`, a preset name or a dict (default ``"bipft"``).
        example_kwargs: keyword inputs, alone or with positional ``example_inputs`` (as for
            :func:`bitfx.binarize`).

    Returns:
        A :class:`GraphDiff`: ``print()`` shows a terminal summary, ``to_json(path)`` writes the
        document described by ``bitfx/inspect/diff.schema.json``, ``to_html(path)`` one
        self-contained page with the graphs before and after side by side.

    Example: ``examples/diff_bert.py`` (``bitfx diff examples/diff_bert.py:make --html diff.html``).
    """
    from bitfx.api import trace

    gm, ctx = trace(model, example_inputs, config, snapshot=True, example_kwargs=example_kwargs)
    snapshots = list(ctx.snapshots) or [("capture", gm)]
    return build(type(model).__name__, ctx.config, ctx.example_inputs, snapshots, ctx.report)


@dataclass
class _Ends:
    """The capture and final snapshots, their nodes by name and their concrete shapes."""

    first: fx.GraphModule
    last: fx.GraphModule
    cap: dict[str, fx.Node]
    fin: dict[str, fx.Node]
    cap_shape: Any
    fin_shape: Any


def build(model_name: str, config: BinarizeConfig, example_inputs, snapshots, report: Report) -> GraphDiff:
    """A :class:`GraphDiff` from the pass manager's snapshots (the first is the capture) and report."""
    shapes = [concrete_shapes(gm, example_inputs) for _, gm in snapshots]
    graphs = [(name, to_networkx(gm, s)) for (name, gm), s in zip(snapshots, shapes)]
    steps = changes_by_pass(snapshots)
    origin = origins(snapshots, steps)
    first, last = snapshots[0][1], snapshots[-1][1]
    ends = _Ends(first, last, {n.name: n for n in first.graph.nodes}, {n.name: n for n in last.graph.nodes},
                 _shape_fn(shapes[0]), _shape_fn(shapes[-1]))

    skipped = {name: s for s in report.skips for name in s.nodes if name in ends.fin}
    owners = [n for n in last.graph.nodes if is_bitfx(n) or n.name in skipped]
    support = support_of(last.graph, set(ends.cap), {n.name for n in owners})
    taken = {n.name for n in owners} | {s for v in support.values() for s in v}
    # other counted work that no pass touched (convolutions, matmuls of activations, softmax...)
    owners += [n for n in last.graph.nodes if n.name not in taken and C.node_cost(n, ends.fin_shape).flops]
    order = {name: i for i, name in enumerate(ends.fin)}
    cap_order = {name: i for i, name in enumerate(ends.cap)}
    layers = [
        _layer(n, sorted(origin.get(n.name, {n.name}) & cap_order.keys(), key=cap_order.__getitem__),
               support.get(n.name, []), skipped.get(n.name), ends)
        for n in sorted(owners, key=lambda n: order[n.name])
    ]
    return GraphDiff(
        model=model_name, config=config, inputs=[_describe(x) for x in example_inputs],
        snapshots=snapshots, graphs=graphs, passes=steps,
        replacements=_replacements(layers, steps, ends.cap),
        float_candidates=[dict(kind=s.kind, module=s.module, reason=s.reason, detail=s.detail,
                               pass_name=s.pass_name, nodes=list(s.nodes)) for s in report.skips],
        added=_added(report, snapshots, shapes[-1], ends.cap),
        layers=layers, totals=_totals(layers, ends, report), report=report,
    )


def _shape_fn(shapes: dict):
    return lambda node: shapes.get(node.name) if isinstance(node, fx.Node) else None


def _describe(x: Any) -> dict:
    if isinstance(x, torch.Tensor):
        return {"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")}
    return {"shape": None, "dtype": type(x).__name__}


KINDS = {"bit_linear": "linear", "linear": "linear", "addmm": "linear", "bit_attention": "attention",
         "attention": "attention", "scaled_dot_product_attention": "attention", "softmax": "softmax",
         "_softmax": "softmax", "_safe_softmax": "softmax", "mm": "matmul", "bmm": "matmul",
         "matmul": "matmul", "conv2d": "conv", "conv1d": "conv", "convolution": "conv"}


def _layer(node: fx.Node, replaced: list[str], support: list[str], skip, ends: _Ends) -> Layer:
    label = short_name(target_name(node))
    binary = label in ("bit_linear", "bit_attention")
    wbits = abits = None
    if label == "bit_linear":
        wbits, abits = C.weight_bits(node.args[6]), node.args[8]
    elif label == "bit_attention":
        abits = 1
    reason, detail = (None, "")
    if not binary:
        reason, detail = (skip.reason, skip.detail) if skip else ("untouched", "no pass recognised this op")
    after_nodes = [ends.fin[s] for s in [node.name, *support]]
    return Layer(
        node=node.name, module=group_of(node), kind=skip.kind if skip else KINDS.get(label, "other"),
        target=label, status="binary" if binary else "float", reason=reason, detail=detail,
        replaced=replaced, support=support, weight_bits=wbits, act_bits=abits,
        bytes_before=_param_bytes(ends.first, [ends.cap[r] for r in replaced], ends.cap_shape),
        bytes_after=_param_bytes(ends.last, after_nodes, ends.fin_shape),
        before=sum((C.node_cost(ends.cap[r], ends.cap_shape) for r in replaced), C.Cost()),
        after=sum((C.node_cost(n, ends.fin_shape) for n in after_nodes), C.Cost()),
    )


def _params(nodes: Sequence[fx.Node]) -> dict[Any, tuple[fx.Node, fx.Node, int, fx.Node | None]]:
    """get_attr sources feeding ``nodes`` (through views and slices): key -> (get_attr, user, arg
    index, the slice or None). A whole parameter is keyed by its target, a slice of one (a part of
    a packed projection) by (target, slice node): each part is its own layer's weight."""
    found = {}
    for n in nodes:
        if n.op == "call_function" and n.target in VIEW_OPS | SLICE_OPS:
            continue  # data movement: its users trace their parameters back through it
        for i, a in enumerate(n.args):
            src, passed = trace_back(a, VIEW_OPS | SLICE_OPS)
            if isinstance(src, fx.Node) and src.op == "get_attr":
                part = a if any(p.target in SLICE_OPS for p in passed) else None
                found.setdefault(src.target if part is None else (src.target, part.name), (src, n, i, part))
    return found


def _tensor_bytes(gm: fx.GraphModule, target: str) -> int:
    t = getattr_path(gm, target)
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _binary_weight(user: fx.Node, index: int) -> bool:
    return index == 1 and short_name(target_name(user)) == "bit_linear"


def _param_bytes(gm, nodes, shape_of) -> int:
    total = 0
    for src, user, index, part in _params(nodes).values():
        t = getattr_path(gm, src.target)
        if not isinstance(t, torch.Tensor):
            continue
        n = t.numel() if part is None else C.numel(shape_of(part))
        if _binary_weight(user, index):
            total += C.binary_weight_bytes(n, user.args[6]) + C.derived_scale_bytes(user, shape_of)
        else:
            total += n * t.element_size()
    return total


def _model_bytes(gm: fx.GraphModule, shape_of) -> int:
    """Every parameter and buffer once; weights of ``bit_linear`` nodes at 1 bit (2 ternary) + the
    scales of each ``bit_linear`` that reads them (three for a q/k/v projection split in parts)."""
    users: dict[str, list[fx.Node]] = {}
    bit_linears = [n for n in gm.graph.nodes if short_name(target_name(n)) == "bit_linear"]
    for src, user, index, _ in _params(bit_linears).values():
        if _binary_weight(user, index):
            users.setdefault(src.target, []).append(user)
    total = 0
    for n in _unique_params(gm):
        if n.target in users:
            total += C.binary_weight_bytes(getattr_path(gm, n.target).numel(), users[n.target][0].args[6])
            total += sum(C.derived_scale_bytes(u, shape_of) for u in users[n.target])
        else:
            total += _tensor_bytes(gm, n.target)
    return total


def _totals(layers, ends: _Ends, report) -> dict:
    before = sum((C.node_cost(n, ends.cap_shape) for n in ends.cap.values()), C.Cost())
    after = sum((C.node_cost(n, ends.fin_shape) for n in ends.fin.values()), C.Cost())
    out = _cost_fields(_model_bytes(ends.first, ends.cap_shape), _model_bytes(ends.last, ends.fin_shape), before, after)
    out.update(
        layers_binary=sum(ly.status == "binary" for ly in layers),
        layers_float=sum(ly.status == "float" for ly in layers),
        rewritten={"linear": report.count("linear", "bit_linear"),
                   "attention": report.count("attention", "bit_attention")},
        float_candidates=len(report.skips),
    )
    return out


def _unique_params(gm: fx.GraphModule) -> list[fx.Node]:
    seen, out = set(), []
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target not in seen:
            seen.add(n.target)
            out.append(n)
    return out


def _ratio(a: float, b: float) -> float | None:
    """``a / b``, or None when either is zero (nothing to save, or nothing left)."""
    return a / b if a and b else None


def _cost_fields(bytes_before, bytes_after, before: C.Cost, after: C.Cost) -> dict:
    """``ops_before`` is ``flops_before`` for a float model (it counts BOPs/64 too if the input
    was binary already)."""
    return {
        "bytes_before": bytes_before, "bytes_after": bytes_after,
        "macs_before": before.macs, "flops_before": before.flops, "ops_before": before.ops,
        "bops_after": after.bops, "flops_after": after.flops, "ops_after": after.ops,
        "ops_saving": _ratio(before.ops, after.ops), "bytes_saving": _ratio(bytes_before, bytes_after),
    }


def _accumulate(into: dict, add: dict) -> None:
    for k in ("bytes_before", "bytes_after", "macs_before", "flops_before", "ops_before", "bops_after",
              "flops_after", "ops_after"):
        into[k] += add[k]
    into["ops_saving"] = _ratio(into["ops_before"], into["ops_after"])
    into["bytes_saving"] = _ratio(into["bytes_before"], into["bytes_after"])


def _replacements(layers, steps, cap_nodes) -> list[dict]:
    out = []
    for ly in layers:
        if ly.node in cap_nodes:
            continue  # a capture node no pass replaced
        lineage, passes = {ly.node}, []
        for step in reversed(steps):
            for ch in step.changes:
                if ch.replacement in lineage:
                    passes.append(step.name)
                    lineage |= set(ch.removed)
        out.append(dict(
            node=ly.node, target=ly.target, kind=ly.kind, module=ly.module, binary=ly.status == "binary",
            replaced=[{"name": r, "target": target_name(cap_nodes[r])} for r in ly.replaced],
            support=ly.support, passes=sorted(set(passes), key=[s.name for s in steps].index),
        ))
    return out


def _added(report, snapshots, final_shapes, cap_nodes) -> list[dict]:
    """The report's added nodes (BiPFT estimators...) and every new parameter of the final graph."""
    def introduced(name):
        return next((p for p, gm in snapshots if any(n.name == name for n in gm.graph.nodes)), None)

    out = [dict(kind=a.kind, module=a.module, pass_name=a.pass_name, nodes=list(a.nodes),
                shapes=[final_shapes.get(n) for n in a.nodes], bytes=0) for a in report.added]
    last = snapshots[-1][1]
    for n in last.graph.nodes:
        if n.op == "get_attr" and n.name not in cap_nodes:
            out.append(dict(kind="parameter", module=group_of(n), pass_name=introduced(n.name),
                            nodes=[n.name], shapes=[final_shapes.get(n.name)],
                            bytes=_tensor_bytes(last, n.target)))
    return out


def config_dict(config: BinarizeConfig) -> dict:
    d = dataclasses.asdict(config)
    d["keep"] = list(d["keep"])
    return d
