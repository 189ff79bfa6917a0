"""Boxes and arrows to inline SVG: Graphviz ``dot`` when it is installed, else a small layered layout.

The fallback is the classic Sugiyama recipe, kept short: layers by longest path (sources moved
down next to their first user), dummy points on edges that span layers, barycenter ordering
sweeps, then x positions pulled toward the mean of each node's neighbours without overlaps.
"""
from __future__ import annotations

import html
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass, field

import networkx as nx

log = logging.getLogger(__name__)

#: status -> (fill, stroke); the same palette for both engines and the HTML legend.
PALETTE = {
    "binary": ("#c3f0ca", "#2b8a3e"),     # a bitfx binary op
    "replaced": ("#ffd8a8", "#e8590c"),   # a node of the original graph that was rewritten
    "support": ("#d0ebff", "#1c7ed6"),    # added: parameters, estimators, transposes
    "float": ("#fff3bf", "#e67700"),      # a candidate left in float
    "dropped": ("#f1f3f5", "#adb5bd"),    # removed, not replaced (dead code)
    "io": ("#e9ecef", "#495057"),         # inputs, outputs
    "ext": ("#ffffff", "#ced4da"),        # a neighbour outside the module shown
    "plain": ("#ffffff", "#868e96"),
}
CHAR_W, LINE_H, PAD_X, PAD_Y = 6.6, 13, 8, 5
FONT = "ui-monospace, SFMono-Regular, Menlo, Consolas, monospace"


@dataclass
class VNode:
    id: str
    lines: list[str]
    status: str = "plain"
    href: str | None = None
    title: str = ""


@dataclass
class VGraph:
    nodes: list[VNode] = field(default_factory=list)
    edges: list[tuple[str, str]] = field(default_factory=list)


def engine_available() -> str:
    return "dot" if shutil.which("dot") else "python"


def to_svg(g: VGraph, css_class: str, id_prefix: str, engine: str = "auto") -> str:
    """One ``<svg>`` element (no XML prologue) for ``g``; ``engine`` is "dot", "python" or "auto"."""
    if engine == "auto":
        engine = engine_available()
    if engine == "dot":
        try:
            return _dot_svg(g, css_class, id_prefix)
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            log.warning("dot failed (%s); using the built-in layout", e)
    return _python_svg(g, css_class, id_prefix)


def _size(n: VNode) -> tuple[float, float]:
    return max(len(lv) for lv in n.lines) * CHAR_W + 2 * PAD_X, len(n.lines) * LINE_H + 2 * PAD_Y


# -- Graphviz -------------------------------------------------------------------------------------
def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dot_svg(g: VGraph, css_class: str, id_prefix: str) -> str:
    lines = [
        "digraph G {",
        '  graph [rankdir=TB, nodesep=0.18, ranksep=0.3, bgcolor="transparent", margin=0.05];',
        '  node [shape=box, style="rounded,filled", fontname="monospace", fontsize=9, height=0.25, '
        'margin="0.06,0.03", penwidth=1.2];',
        '  edge [color="#868e96", arrowsize=0.5, penwidth=0.9];',
    ]
    for n in g.nodes:
        fill, stroke = PALETTE.get(n.status, PALETTE["plain"])
        attrs = {
            "id": f"{id_prefix}{n.id}", "label": "\n".join(n.lines), "fillcolor": fill, "color": stroke,
            "class": f"st-{n.status}", "tooltip": n.title or " ".join(n.lines),
        }
        if n.status in ("dropped", "ext"):
            attrs["style"] = "rounded,filled,dashed"
        if n.href:
            attrs["href"] = n.href
        lines.append(f"  {_q(n.id)} [" + ", ".join(f"{k}={_q(v)}" for k, v in attrs.items()) + "];")
    lines += [f"  {_q(a)} -> {_q(b)};" for a, b in g.edges]
    lines.append("}")
    out = subprocess.run(["dot", "-Tsvg"], input="\n".join(lines), capture_output=True, text=True,
                         timeout=120, check=True).stdout
    start = out.find("<svg")
    if start < 0:
        raise ValueError("dot produced no <svg>")
    svg = re.sub(r"<!--.*?-->", "", out[start:], flags=re.S)
    svg = svg.replace("<svg", f'<svg class="{css_class}" role="img"', 1)
    # one page holds many graphs: make dot's own ids ("graph0", "node1", "edge1") unique too
    return re.sub(r'id="(graph|clust|edge|a_node|a_edge)(\d+)"', rf'id="{id_prefix}\1\2"', svg)


# -- the built-in layered layout ------------------------------------------------------------------
def _layers(dag: nx.DiGraph) -> dict[str, int]:
    layer: dict[str, int] = {}
    for n in nx.topological_sort(dag):
        layer[n] = max((layer[p] + 1 for p in dag.predecessors(n)), default=0)
    for n in dag.nodes:  # a source sits just above its first user, not at the top of the page
        if dag.in_degree(n) == 0 and dag.out_degree(n) > 0:
            layer[n] = min(layer[s] for s in dag.successors(n)) - 1
    return layer


def _orient(g: VGraph) -> list[tuple[str, str, bool]]:
    """Edges as (top, bottom, flipped). Folded graphs can have cycles (a module used twice): inside
    a strongly connected part, edges that go back in node order are laid out reversed."""
    index = {n.id: i for i, n in enumerate(g.nodes)}
    edges = [(a, b) for a, b in dict.fromkeys(g.edges) if a != b]
    part = {n: i for i, c in enumerate(nx.strongly_connected_components(nx.DiGraph(edges))) for n in c}
    return [(b, a, True) if part[a] == part[b] and index[a] > index[b] else (a, b, False) for a, b in edges]


def _order(rows: dict[int, list[str]], levels: list[int], nbrs_up, nbrs_down) -> None:
    """Barycenter sweeps, down then up: each node moves toward the mean position of its neighbours."""
    pos = {k: float(i) for lv in levels for i, k in enumerate(rows[lv])}
    for sweep in range(6):
        nbrs = nbrs_up if sweep % 2 == 0 else nbrs_down
        for lv in levels if sweep % 2 == 0 else levels[::-1]:
            bary = {k: (sum(pos[n] for n in nbrs[k]) / len(nbrs[k]) if nbrs[k] else pos[k]) for k in rows[lv]}
            rows[lv].sort(key=lambda k: bary[k])
            for i, k in enumerate(rows[lv]):
                pos[k] = float(i)


def layout(g: VGraph) -> tuple[dict[str, tuple[float, float, float, float]], list[list[tuple[float, float]]]]:
    """Node boxes ``{id: (x, y, w, h)}`` (x, y = top-left) and one polyline per edge."""
    sizes = {n.id: _size(n) for n in g.nodes}
    edges = _orient(g)
    dag = nx.DiGraph()
    dag.add_nodes_from(sizes)
    dag.add_edges_from((a, b) for a, b, _ in edges)
    layer = _layers(dag)
    chains = []  # each edge through one dummy point per layer it crosses
    for a, b, _ in edges:
        chain = [a]
        for lv in range(layer[a] + 1, layer[b]):
            d = f"\0{len(sizes)}"
            layer[d], sizes[d] = lv, (4.0, LINE_H)
            chain.append(d)
        chains.append(chain + [b])
    nbrs_up: dict[str, list[str]] = {k: [] for k in layer}
    nbrs_down: dict[str, list[str]] = {k: [] for k in layer}
    for chain in chains:
        for u, v in zip(chain, chain[1:]):
            nbrs_down[u].append(v)
            nbrs_up[v].append(u)
    order_index = {n.id: i for i, n in enumerate(g.nodes)}
    rows: dict[int, list[str]] = {}
    for k in sorted(layer, key=lambda k: order_index.get(k, len(order_index))):
        rows.setdefault(layer[k], []).append(k)
    levels = sorted(rows)
    _order(rows, levels, nbrs_up, nbrs_down)
    x = _x_positions(rows, levels, sizes, nbrs_up, nbrs_down)
    boxes, centers, y = {}, {}, 10.0
    for lv in levels:
        h = max(sizes[k][1] for k in rows[lv])
        for k in rows[lv]:
            w, hk = sizes[k]
            centers[k] = (x[k], y + h / 2)
            if not k.startswith("\0"):
                boxes[k] = (x[k] - w / 2, y + (h - hk) / 2, w, hk)
        y += h + 26
    lines = []
    for chain, (a, b, flipped) in zip(chains, edges):
        pts = [(centers[a][0], boxes[a][1] + boxes[a][3]), *(centers[d] for d in chain[1:-1]),
               (centers[b][0], boxes[b][1])]
        lines.append(pts[::-1] if flipped else pts)
    return boxes, lines


def _x_positions(rows, levels, sizes, nbrs_up, nbrs_down, gap: float = 14.0) -> dict[str, float]:
    x: dict[str, float] = {}
    for lv in levels:
        cursor = 0.0
        for k in rows[lv]:
            w = sizes[k][0]
            x[k] = cursor + w / 2
            cursor += w + gap
    for sweep in range(8):
        seq = levels if sweep % 2 == 0 else levels[::-1]
        nbrs = nbrs_up if sweep % 2 == 0 else nbrs_down
        for lv in seq:
            row = rows[lv]
            want = [sum(x[n] for n in nbrs[k]) / len(nbrs[k]) if nbrs[k] else x[k] for k in row]
            placed: list[float] = []
            for i, k in enumerate(row):  # left to right: as wanted, but not over the left neighbour
                lo = placed[-1] + (sizes[row[i - 1]][0] + sizes[k][0]) / 2 + gap if placed else float("-inf")
                placed.append(max(want[i], lo))
            for i in range(len(row) - 2, -1, -1):  # right to left: pull back toward what was wanted
                hi = placed[i + 1] - (sizes[row[i + 1]][0] + sizes[row[i]][0]) / 2 - gap
                placed[i] = min(placed[i], hi) if placed[i] > want[i] else min(max(placed[i], want[i]), hi)
            for k, v in zip(row, placed):
                x[k] = v
    left = min(x[k] - sizes[k][0] / 2 for k in x)
    return {k: v - left + 10 for k, v in x.items()}


def _path(pts: list[tuple[float, float]]) -> str:
    d = f"M{pts[0][0]:.1f},{pts[0][1]:.1f}"
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        my = (y0 + y1) / 2
        d += f" C{x0:.1f},{my:.1f} {x1:.1f},{my:.1f} {x1:.1f},{y1:.1f}"
    return d


def _python_svg(g: VGraph, css_class: str, id_prefix: str) -> str:
    boxes, lines = layout(g)
    width = max((x + w for x, y, w, h in boxes.values()), default=20) + 10
    height = max((y + h for x, y, w, h in boxes.values()), default=20) + 10
    marker = f"{id_prefix}arrow"
    out = [
        f'<svg class="{css_class}" role="img" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" '
        f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" font-family="{FONT}" font-size="11">',
        f'<defs><marker id="{marker}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="6" markerHeight="6" '
        f'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#868e96"/></marker></defs>',
    ]
    for pts in lines:
        out.append(f'<path class="edge" d="{_path(pts)}" fill="none" stroke="#868e96" stroke-width="0.9" '
                   f'marker-end="url(#{marker})"/>')
    for n in g.nodes:
        x, y, w, h = boxes[n.id]
        fill, stroke = PALETTE.get(n.status, PALETTE["plain"])
        dash = ' stroke-dasharray="4 3"' if n.status in ("dropped", "ext") else ""
        body = [f'<title>{html.escape(n.title or " ".join(n.lines))}</title>',
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" rx="4" fill="{fill}" '
                f'stroke="{stroke}" stroke-width="1.2"{dash}/>']
        for i, line in enumerate(n.lines):
            weight = ' font-weight="bold"' if i == 0 else ""
            body.append(f'<text x="{x + w / 2:.1f}" y="{y + PAD_Y + (i + 0.8) * LINE_H:.1f}" '
                        f'text-anchor="middle"{weight}>{html.escape(line)}</text>')
        group = f'<g class="node st-{n.status}" id="{html.escape(id_prefix + n.id)}">{"".join(body)}</g>'
        if n.href:
            group = f'<a href="{html.escape(n.href)}">{group}</a>'
        out.append(group)
    out.append("</svg>")
    return "\n".join(out)
