"""A :class:`GraphDiff` as a JSON document (``diff.schema.json``) and as a terminal summary (rich)."""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import TYPE_CHECKING

import networkx as nx

from bitfx.inspect import cost as C

if TYPE_CHECKING:
    from bitfx.inspect.model import GraphDiff

CONVENTIONS = {
    "ops": "OPs = BOPs/64 + FLOPs (BiT, BiViT, BiPFT)",
    "flops_per_mac": 2,
    "bops_per_binary_mac": "1 for 1-bit x 1-bit; k for k-bit activations x 1-bit weights; x2 for ternary weights",
    "softmax_flops_per_score": C.SOFTMAX_FLOPS,
    "counted": "matmul-family ops and softmax, before and after; after also activation quantization, "
               "epilogue scaling, probability binarization and estimators",
    "not_counted": "norms, activations, residual adds, masks, views, bias adds of float linears",
    "binary_weight_bits": 1,
    "ternary_weight_bits": 2,
    "scale_bytes": C.SCALE_BYTES,
    "bytes": "numel x element size for every parameter and buffer; binarized weights at 1 bit (ternary 2), "
             "no padding, plus their derived scales",
}


def _graph(name: str, g: nx.DiGraph) -> dict:
    return {
        "snapshot": name,
        "nodes": [
            {"name": n, "op": a["op"], "target": a["target"], "module": a["module"], "shape": a["shape"]}
            for n, a in sorted(g.nodes(data=True), key=lambda kv: kv[1]["order"])
        ],
        "edges": [[u, v] for u, v in g.edges()],
    }


def to_dict(d: "GraphDiff") -> dict:
    from bitfx.inspect.model import SCHEMA_VERSION, _cost_fields, config_dict

    layers = []
    for ly in d.layers:
        row = {k: v for k, v in dataclasses.asdict(ly).items() if k not in ("before", "after")}
        row.update(_cost_fields(ly.bytes_before, ly.bytes_after, ly.before, ly.after))
        layers.append(row)
    return {
        "schema_version": SCHEMA_VERSION,
        "model": d.model,
        "config": config_dict(d.config),
        "inputs": d.inputs,
        "conventions": CONVENTIONS,
        "changed": d.changed,
        "totals": d.totals,
        "modules": d.modules(),
        "layers": layers,
        "replacements": d.replacements,
        "float_candidates": d.float_candidates,
        "added": d.added,
        "passes": [
            {"name": p.name, "nodes_before": p.nodes_before, "nodes_after": p.nodes_after,
             "removed": p.removed, "added": p.added, "dropped": p.dropped,
             "changes": [dataclasses.asdict(c) for c in p.changes]}
            for p in d.passes
        ],
        "graphs": {"before": _graph(*d.graphs[0]), "after": _graph(*d.graphs[-1])},
    }


# -- numbers for people ---------------------------------------------------------------------------
def _3(x: float) -> str:
    """Three significant digits: 1.23, 12.3, 123."""
    return f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}" if abs(x) < 100 else f"{x:.0f}"


def si(x: float | None) -> str:
    if x is None:
        return "–"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{_3(x / scale)} {unit}"
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def nbytes(x: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= scale:
            return f"{_3(x / scale)} {unit}"
    return f"{x:.0f} B"


def ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}×"


def headline(d: "GraphDiff") -> str:
    t = d.totals
    if not d.changed:
        kept, binary = len(d.float_candidates), t["layers_binary"]
        why = (f": it is binary already ({binary} bitfx op{'s' * (binary != 1)})" if binary
               else f"; {kept} candidate{'s' * (kept != 1)} left in float" if kept
               else "; no linear or attention found")
        return f"nothing to rewrite in {d.model} (preset {d.config.method}){why}"
    return (f"{d.model} (preset {d.config.method}): {t['rewritten']['linear']} linear → bit_linear, "
            f"{t['rewritten']['attention']} attention → bit_attention, {len(d.float_candidates)} left in float")


def summary_text(d: "GraphDiff") -> str:
    t = d.totals
    lines = [headline(d),
             f"bytes {nbytes(t['bytes_before'])} → {nbytes(t['bytes_after'])} ({ratio(t['bytes_saving'])} smaller); "
             f"OPs {si(t['ops_before'])} → {si(t['ops_after'])} ({si(t['bops_after'])} BOPs/64 + "
             f"{si(t['flops_after'])} FLOPs; {ratio(t['ops_saving'])} fewer)"]
    for c in d.float_candidates:
        lines.append(f"  kept {c['kind']} {c['module'] or '<root>'}: {c['reason']} ({c['detail']})")
    return "\n".join(lines)


def groups(d: "GraphDiff") -> list[tuple[str, list, dict]]:
    """Layers grouped the way the HTML folds modules: (module, layers, summed costs), in graph order."""
    from bitfx.inspect.graphs import fold_depth, folder
    from bitfx.inspect.model import _accumulate, _cost_fields

    box_of = folder(d.after, fold_depth(d.after))
    out: dict[str, tuple[list, dict]] = {}
    for ly in d.layers:
        key = box_of(ly.module) or ly.module
        row = _cost_fields(ly.bytes_before, ly.bytes_after, ly.before, ly.after)
        if key in out:
            out[key][0].append(ly)
            _accumulate(out[key][1], row)
        else:
            out[key] = ([ly], row)
    return [(k, ls, c) for k, (ls, c) in out.items()]


def _ops_text(layers) -> str:
    binary = Counter(ly.target for ly in layers if ly.status == "binary")
    floats = Counter(f"{ly.target} ({ly.reason})" for ly in layers if ly.status == "float")
    fmt = lambda c, style: [f"[{style}]{k}×{n}[/]" if n > 1 else f"[{style}]{k}[/]" for k, n in c.items()]  # noqa: E731
    return ", ".join(fmt(binary, "green") + fmt(floats, "yellow"))


def print_summary(d: "GraphDiff", console=None) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    console.print(f"[bold]bitfx diff[/]: {headline(d)}", highlight=False)
    t = d.totals
    if d.layers:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left",
                      title="per module: parameter bytes, and OPs = BOPs/64 + FLOPs (a MAC is 2 FLOPs)")
        table.add_column("module", overflow="fold")
        table.add_column("ops ([green]binary[/], [yellow]float[/])")
        table.add_column("bytes", justify="right", no_wrap=True)
        table.add_column("OPs", justify="right", no_wrap=True)
        table.add_column("×", justify="right", no_wrap=True)
        for name, layers, c in groups(d):
            table.add_row(name or "<root>", _ops_text(layers),
                          f"{nbytes(c['bytes_before'])} → {nbytes(c['bytes_after'])}",
                          f"{si(c['ops_before'])} → {si(c['ops_after'])}", ratio(c["ops_saving"]))
        table.add_row("[bold]model[/]", f"{t['layers_binary']} binary, {t['layers_float']} float",
                      f"{nbytes(t['bytes_before'])} → {nbytes(t['bytes_after'])}",
                      f"{si(t['ops_before'])} → {si(t['ops_after'])}", ratio(t["ops_saving"]), style="bold")
        console.print(table)
    console.print(f"model: parameters {nbytes(t['bytes_before'])} → {nbytes(t['bytes_after'])} "
                  f"({ratio(t['bytes_saving'])} smaller); OPs {si(t['ops_before'])} → {si(t['ops_after'])} "
                  f"= {si(t['bops_after'])} BOPs/64 + {si(t['flops_after'])} FLOPs ({ratio(t['ops_saving'])} fewer)",
                  highlight=False)
    for c in d.float_candidates:
        console.print(f"  [yellow]kept {c['kind']}[/] {c['module'] or '<root>'}: {c['reason']} ({c['detail']})",
                      highlight=False)
    steps = "; ".join(f"{p.name} −{len(p.removed)} +{len(p.added)}" for p in d.passes if p.removed or p.added)
    console.print(f"passes: {steps or 'no pass changed the graph'}", highlight=False)
