"""What every pass receives: the config, the report it adds to, and graph facts shared by passes."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from bitfx.config import BinarizeConfig


@dataclass
class Rewrite:
    """A subgraph a pass replaced: ``kind`` is "linear" or "attention"."""

    pass_name: str
    kind: str
    module: str
    replaced: list[str]
    new_node: str
    target: str


@dataclass
class Skip:
    """A candidate left in float, and why (``reason`` is one of the REASONS below, ``detail`` free text)."""

    pass_name: str
    kind: str
    module: str
    reason: str
    detail: str
    nodes: list[str] = field(default_factory=list)


#: Why a candidate stays in float.
REASONS = ("config", "unrecognised", "unsupported")


@dataclass
class Added:
    """Nodes a pass added that do not replace anything (BiPFT estimators, packing)."""

    pass_name: str
    kind: str
    module: str
    nodes: list[str]


#: Rewrite targets that are binary ops (what "rewritten" counts); others are canonicalizations.
BINARY_TARGETS = ("bit_linear", "bit_attention")


@dataclass
class Report:
    """What the pipeline did: ``rewrites`` (canonicalizations and binary ops), ``skips`` (every
    candidate left in float, with its reason) and ``added`` nodes.

    ``summary()`` counts binary ops, one per ``bit_linear`` / ``bit_attention``; canonicalizations
    (a spelling becoming ``aten.linear`` or ``bitfx.attention``) change no numbers and are listed
    apart. Example (MiniLM, 6 layers)::

        binary ops: 42 (36 bit_linear, 6 bit_attention); canonicalized: 6 attention; left in float: 1
          kept linear pooler.dense: config (module 'pooler.dense' matches keep pattern '*pooler*')
    """

    rewrites: list[Rewrite] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    added: list[Added] = field(default_factory=list)

    def count(self, kind: str, target: str | None = None) -> int:
        return sum(1 for r in self.rewrites if r.kind == kind and (target is None or r.target == target))

    @property
    def binary_ops(self) -> list[Rewrite]:
        return [r for r in self.rewrites if r.target in BINARY_TARGETS]

    def summary(self) -> str:
        binary = self.binary_ops
        by_target = ", ".join(f"{sum(r.target == t for r in binary)} {t}" for t in BINARY_TARGETS)
        canon: dict[str, int] = {}
        for r in self.rewrites:
            if r.target not in BINARY_TARGETS:
                canon[r.kind] = canon.get(r.kind, 0) + 1
        canon_text = ", ".join(f"{n} {kind}" for kind, n in canon.items()) or "0"
        lines = [f"binary ops: {len(binary)} ({by_target}); canonicalized: {canon_text}; "
                 f"left in float: {len(self.skips)}"]
        by_pass: dict[tuple[str, str], int] = {}
        for r in binary:
            if r.pass_name not in ("binarize_linear", "binarize_attention"):
                by_pass[(r.target, r.pass_name)] = by_pass.get((r.target, r.pass_name), 0) + 1
        for (target, pass_name), n in by_pass.items():
            lines.append(f"  {n} {target} by {pass_name}")
        for s in self.skips:
            lines.append(f"  kept {s.kind} {s.module or '<root>'}: {s.reason} ({s.detail})")
        return "\n".join(lines)


@dataclass
class PassContext:
    """Shared state of one pipeline run.

    ``weights`` are the nodes that hold parameters (placeholders that are parameters under dynamo or
    export, and get_attr nodes); passes only binarize linears whose weight derives from one of them.
    ``own_quantizers`` counts the model's own fake-quant linears that ``recognize_fake_quant``
    turned into ``bit_linear``; while it is non-zero the other layers keep the author's choice
    unless ``config.own_binarizer == "extend"`` (:meth:`own_binarizer_keeps`).
    """

    config: BinarizeConfig
    weights: set[str] = field(default_factory=set)
    report: Report = field(default_factory=Report)
    snapshot: bool = False
    snapshots: list[tuple[str, fx.GraphModule]] = field(default_factory=list)
    example_inputs: tuple[Any, ...] | None = None
    frozen: bool = False
    own_quantizers: int = 0  # fake-quant linears of the model's own binarizer, recognised
    glue: str = "eager"  # who runs the float glue of a lowered graph: "eager" PyTorch or "inductor"
    instances: int = 1  # the partitions of a split graph this graph serves (`bitfx.regions`): a layer's, 12

    def own_binarizer_keeps(self) -> str | None:
        """The reason other candidates stay float in a model with its own binarizer, or None."""
        if self.own_quantizers and self.config.own_binarizer == "only":
            return (f"the model carries its own binarizer ({self.own_quantizers} fake-quant linears "
                    "recognised): its other layers stay as its author wrote them "
                    "(own_binarizer='extend' binarizes them too)")
        return None

    def is_weight(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and (node.op == "get_attr" or node.name in self.weights)


_DYNAMO_ROOT = re.compile(r"^L\['[^']*'\]\.?")
_GETATTR = re.compile(r"getattr\(([^,]+), '([^']+)'\)")
_INDEX = re.compile(r"\[(\d+)\]")
_MODULES = re.compile(r"_modules\['([^']+)'\]")


def normalize_module_name(path: str) -> str:
    """``L['self'].encoder.layer[0]`` / ``L__self__encoder`` -> ``encoder.layer.0``."""
    path = _DYNAMO_ROOT.sub("", path)
    while _GETATTR.search(path):
        path = _GETATTR.sub(r"\1.\2", path)
    path = _MODULES.sub(r"\1", path)
    path = _INDEX.sub(r".\1", path)
    return path.strip(".")


def module_of(node: fx.Node) -> str:
    """The qualified name of the innermost module that produced ``node`` ('' if unknown)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return normalize_module_name(str(path))


def module_type_of(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    t = list(stack.values())[-1][1]
    return t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}"


def fake_value(node: Any) -> Any:
    """The FakeTensor (or SymInt) recorded for ``node`` by tracing, if any."""
    if not isinstance(node, fx.Node):
        return node
    return node.meta.get("val", node.meta.get("example_value"))


def unique_attr(gm: torch.nn.Module, base: str) -> str:
    base = re.sub(r"[^0-9a-zA-Z_]", "_", base).strip("_") or "param"
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name
