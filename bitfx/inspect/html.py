"""A :class:`GraphDiff` as one self-contained HTML page (inline SVG, CSS and a few lines of JS).

Layout of the page: totals; the graph before (capture snapshot) and after (final snapshot) side by
side, each module folded into one box that shows its op counts (the fold depth is chosen so a
12-layer model fits in a few dozen boxes); the per-layer table (every box and node links to its
rows); one ``<details>`` per folded module with that module's node-level graphs before and after;
what stayed float and why; what was added; what each pass changed; the counting conventions.
"""
from __future__ import annotations

import html
import re
from collections import Counter
from typing import TYPE_CHECKING

import networkx as nx

from bitfx.inspect import layout as L
from bitfx.inspect.graphs import fold_depth, folder, visible
from bitfx.inspect.render import CONVENTIONS, headline, nbytes, ratio, si

if TYPE_CHECKING:
    from bitfx.inspect.model import GraphDiff

KEY_OPS = ("bit_linear", "bit_attention", "attention", "linear", "scaled_dot_product_attention", "matmul",
           "bmm", "mm", "addmm", "softmax", "conv2d", "embedding", "layer_norm", "gelu", "relu")
STATUS_RANK = ("binary", "replaced", "float", "support", "dropped", "io", "plain", "ext")


def slug(module: str) -> str:
    return "mod-" + (re.sub(r"[^A-Za-z0-9_-]", "-", module) if module else "root")


class _Statuses:
    """Colour and link of every node of the graph before and after."""

    def __init__(self, d: "GraphDiff"):
        self.before: dict[str, str] = {}
        self.after: dict[str, str] = {}
        self.row_before: dict[str, str] = {}
        self.row_after: dict[str, str] = {}
        dropped = {n for p in d.passes for n in p.dropped}
        for ly in d.layers:
            if ly.status == "binary":
                mark_b, mark_a = "replaced", "binary"
            elif ly.reason != "untouched":
                mark_b, mark_a = "float", "float"
            else:
                mark_b = mark_a = None
            for r in ly.replaced:
                self.row_before[r] = ly.node
                if mark_b:
                    self.before[r] = mark_b
            self.row_after[ly.node] = ly.node
            if mark_a:
                self.after[ly.node] = mark_a
            for s in ly.support:
                self.row_after[s] = ly.node
                self.after.setdefault(s, "support")
        for n in dropped:
            self.before.setdefault(n, "dropped")
        for g, st in ((d.before, self.before), (d.after, self.after)):
            for n, a in g.nodes(data=True):
                if a["op"] in ("placeholder", "output"):
                    st.setdefault(n, "io")


def _node_lines(name: str, a: dict) -> list[str]:
    shape = "×".join(map(str, a["shape"])) if a["shape"] is not None else ""
    if a["op"] == "get_attr":
        param = a["target"].rpartition(".")[2]
        m = re.match(r"bitfx_(.+?)__", param)
        return [m.group(1) if m else param, shape or "scalar"]
    if a["op"] in ("placeholder", "output"):
        return [name, shape] if shape else [name]
    lines = [a["label"], name]
    return lines + [shape] if shape else lines


def _counts(g: nx.DiGraph, nodes: list[str]) -> list[str]:
    counts = Counter(g.nodes[n]["label"] for n in nodes if g.nodes[n]["op"] == "call_function")
    key = [f"{op}×{counts[op]}" if counts[op] > 1 else op for op in KEY_OPS if counts.get(op)]
    rest = sum(c for op, c in counts.items() if op not in KEY_OPS)
    lines = [" ".join(key[i:i + 2]) for i in range(0, len(key), 2)][:3]
    if rest:
        lines.append(f"+{rest} other op{'s' * (rest != 1)}")
    return lines


def _worst(statuses) -> str:
    found = set(statuses)
    return next((s for s in STATUS_RANK if s in found and s not in ("io", "ext")), "plain")


def overview(g: nx.DiGraph, status: dict[str, str], rows: dict[str, str], box_of) -> L.VGraph:
    """One box per folded module (``box_of``, op counts inside); ops outside them stay nodes."""
    nodes = visible(g, with_params=False)
    key = {n: box_of(g.nodes[n]["module"]) for n in nodes}
    members: dict[str, list[str]] = {}
    for n in nodes:
        members.setdefault(key[n] or f"n:{n}", []).append(n)
    vg = L.VGraph()
    for box, ns in members.items():
        if box.startswith("n:"):
            n = ns[0]
            href = f"#layer-{rows[n]}" if n in rows else None
            vg.nodes.append(L.VNode(box, _node_lines(n, g.nodes[n]), status.get(n, "plain"), href))
        else:
            vg.nodes.append(L.VNode(f"m:{box}", [box, *_counts(g, ns)],
                                    _worst(status.get(n, "plain") for n in ns), f"#{slug(box)}",
                                    f"{box}: {len(ns)} nodes (click to expand)"))
    ids = {n: (f"m:{key[n]}" if key[n] else f"n:{n}") for n in nodes}
    vg.edges = sorted({(ids[u], ids[v]) for u, v in g.edges() if u in ids and v in ids and ids[u] != ids[v]})
    return vg


def detail(g: nx.DiGraph, status: dict[str, str], rows: dict[str, str], box_of, box: str) -> L.VGraph:
    """The node-level graph of one folded module, with its outside inputs as dashed boxes."""
    inside = [n for n in visible(g, with_params=True) if box_of(g.nodes[n]["module"]) == box]
    inside_set = set(inside)
    vg = L.VGraph()
    for n in inside:
        href = f"#layer-{rows[n]}" if n in rows else None
        vg.nodes.append(L.VNode(n, _node_lines(n, g.nodes[n]), status.get(n, "plain"), href,
                                f"{n}: {g.nodes[n]['target']} in {g.nodes[n]['module'] or '<root>'}"))
    ext = []
    for n in inside:
        for p in g.predecessors(n):
            if p not in inside_set and not g.nodes[p]["hidden"]:
                if p not in ext:
                    ext.append(p)
                vg.edges.append((f"ext:{p}", n))
    for p in ext:
        a = g.nodes[p]
        outer = box_of(a["module"])
        vg.nodes.append(L.VNode(f"ext:{p}", [p, a["module"] or a["label"]], "ext",
                                f"#{slug(outer)}" if outer else None, f"from {p} ({a['target']})"))
    vg.edges += [(u, v) for u, v in g.edges() if u in inside_set and v in inside_set]
    return vg


# -- the page -------------------------------------------------------------------------------------
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 18px 40px;color:#212529}
h1{font-size:20px;margin:14px 0 4px} h2{font-size:16px;margin:26px 0 8px;border-bottom:1px solid #dee2e6}
.meta{color:#495057} code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
.cards{display:flex;gap:10px;flex-wrap:wrap;margin:10px 0}
.card{border:1px solid #dee2e6;border-radius:6px;padding:6px 12px;background:#f8f9fa}
.card b{display:block;font-size:18px}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:12px}
.pane{border:1px solid #dee2e6;border-radius:6px;overflow:auto;max-height:82vh;background:#fff}
.pane h3{position:sticky;top:0;left:0;margin:0;padding:4px 8px;font-size:13px;background:#f1f3f5;z-index:1}
.pane svg{display:block;margin:6px auto}
svg a:hover rect,svg a:hover path,svg a:hover polygon{stroke-width:2.5}
.legend span{display:inline-block;margin-right:12px}
.sw{display:inline-block;width:12px;height:12px;border-radius:3px;border:1px solid;vertical-align:-2px;margin-right:4px}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0}
th,td{border:1px solid #dee2e6;padding:3px 7px;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.module td{background:#f1f3f5;font-weight:600} tr.total td{font-weight:700;background:#e9ecef}
.binary{color:#2b8a3e;font-weight:600} .float{color:#c26e00;font-weight:600}
details{border:1px solid #dee2e6;border-radius:6px;margin:6px 0;padding:2px 8px}
details>summary{cursor:pointer;padding:4px 0} details[open]>summary{border-bottom:1px solid #e9ecef}
.flash{outline:3px solid #fab005;outline-offset:2px}
button{font-size:12px;margin-right:6px}
"""

JS = """
function openTarget(){var id=decodeURIComponent(location.hash.slice(1));if(!id)return;
var el=document.getElementById(id);if(!el)return;if(el.tagName==='DETAILS')el.open=true;
for(var d=el.parentElement&&el.parentElement.closest('details');d;
    d=d.parentElement&&d.parentElement.closest('details'))d.open=true;
el.scrollIntoView({block:'center'});el.classList.add('flash');setTimeout(function(){el.classList.remove('flash')},1600);}
function setAll(open){document.querySelectorAll('details.module').forEach(function(d){d.open=open})}
window.addEventListener('hashchange',openTarget);window.addEventListener('load',openTarget);
"""

LEGEND = (("binary", "bitfx binary op"), ("replaced", "rewritten (before)"), ("support", "added (params, estimators)"),
          ("float", "candidate left in float"), ("dropped", "removed (dead code)"), ("io", "input / output"))


def _e(x) -> str:
    return html.escape(str(x))


def _pair(title_b: str, svg_b: str, title_a: str, svg_a: str) -> str:
    return (f'<div class="pair"><div class="pane"><h3>{title_b}</h3>{svg_b}</div>'
            f'<div class="pane"><h3>{title_a}</h3>{svg_a}</div></div>')


def _nums(m: dict) -> str:
    vals = (nbytes(m["bytes_before"]), nbytes(m["bytes_after"]), si(m["ops_before"]), si(m["bops_after"]),
            si(m["flops_after"]), si(m["ops_after"]), ratio(m["ops_saving"]), ratio(m["bytes_saving"]))
    return "".join(f'<td class="n">{v}</td>' for v in vals)


def _layer_table(d: "GraphDiff", box_of) -> str:
    """One row per layer, under a subtotal row per folded module (the boxes of the graphs)."""
    from bitfx.inspect.model import _accumulate, _cost_fields

    head = ("module", "node", "op", "status", "replaces", "bytes before", "bytes after", "OPs before",
            "BOPs after", "FLOPs after", "OPs after", "OPs saving", "bytes saving")
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    groups: dict[str, list] = {}
    for ly in d.layers:
        groups.setdefault(box_of(ly.module) or ly.module, []).append(ly)
    for box, layers in groups.items():
        rows = [(ly, _cost_fields(ly.bytes_before, ly.bytes_after, ly.before, ly.after)) for ly in layers]
        if len(layers) > 1:
            total = dict(rows[0][1])
            for _, r in rows[1:]:
                _accumulate(total, r)
            out.append(f'<tr class="module"><td colspan="5"><a href="#{slug(box)}">{_e(box or "<root>")}</a>'
                       f" — {len(layers)} layers</td>{_nums(total)}</tr>")
        for ly, r in rows:
            st = ('<span class="binary">binary</span>' if ly.status == "binary"
                  else f'<span class="float">float: {_e(ly.reason)}</span><br><small>{_e(ly.detail)}</small>')
            bits = f" (W{ly.weight_bits}A{ly.act_bits})" if ly.weight_bits else ""
            out.append(
                f'<tr id="layer-{_e(ly.node)}"><td class="mono">{_e(ly.module or "<root>")}</td>'
                f'<td class="mono">{_e(ly.node)}</td><td class="mono">{_e(ly.target)}{bits}</td><td>{st}</td>'
                f'<td class="mono">{_e(", ".join(ly.replaced))}</td>{_nums(r)}</tr>')
    out.append(f'<tr class="total"><td colspan="5">model (all parameters, all counted ops)</td>{_nums(d.totals)}</tr>')
    return "\n".join(out) + "</table>"


def _simple_table(head: tuple, rows: list[tuple]) -> str:
    if not rows:
        return "<p>none</p>"
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + f"</tr>{body}</table>"


def _module_sections(d: "GraphDiff", st: _Statuses, box_of, engine: str) -> list[str]:
    """A ``<details>`` per folded module: its node-level graphs before and after (one if unchanged)."""
    boxes = []
    for n in visible(d.after, False) + visible(d.before, False):
        g = d.after if n in d.after else d.before
        box = box_of(g.nodes[n]["module"])
        if box and box not in boxes:
            boxes.append(box)
    sections = []
    for i, box in enumerate(boxes):
        vb = detail(d.before, st.before, st.row_before, box_of, box)
        va = detail(d.after, st.after, st.row_after, box_of, box)
        mark = _worst(n.status for n in vb.nodes + va.nodes)
        badge = {"binary": '<span class="binary">rewritten</span>', "float": '<span class="float">left in float</span>',
                 "support": '<span class="binary">added nodes</span>', "dropped": "dead code removed"}.get(mark)
        counts = ", ".join(_counts(d.after, [n.id for n in va.nodes if n.id in d.after]))
        svg_a = L.to_svg(va, "module-graph", f"ma{i}-", engine) if va.nodes else "<p>(no nodes)</p>"
        if badge is None:
            body = f'<div class="pane"><h3>unchanged</h3>{svg_a}</div>'
        else:
            svg_b = L.to_svg(vb, "module-graph", f"mb{i}-", engine) if vb.nodes else "<p>(no nodes)</p>"
            body = _pair("before", svg_b, "after", svg_a)
        sections.append(f'<details class="module" id="{slug(box)}"><summary><b class="mono">{_e(box)}</b> — '
                        f'{badge or "unchanged"} <small>{_e(counts)}</small></summary>{body}</details>')
    return sections


def _shape(s) -> str:
    return "?" if s is None else "×".join(map(str, s)) or "scalar"


def to_html(d: "GraphDiff", engine: str = "auto") -> str:
    st = _Statuses(d)
    depth = fold_depth(d.after)
    box_of = folder(d.after, depth)
    name_b, name_a = d.graphs[0][0], d.graphs[-1][0]
    ov_b = L.to_svg(overview(d.before, st.before, st.row_before, box_of), "graph graph-before", "b-", engine)
    ov_a = L.to_svg(overview(d.after, st.after, st.row_after, box_of), "graph graph-after", "a-", engine)

    sections = _module_sections(d, st, box_of, engine)
    t = d.totals
    cards = [
        ("parameter bytes", f"{nbytes(t['bytes_before'])} → {nbytes(t['bytes_after'])}",
         ratio(t["bytes_saving"]) + " smaller"),
        ("OPs (BOPs/64 + FLOPs)", f"{si(t['ops_before'])} → {si(t['ops_after'])}", ratio(t["ops_saving"]) + " fewer"),
        ("rewritten", f"{t['rewritten']['linear']} linear, {t['rewritten']['attention']} attention",
         f"{len(d.float_candidates)} left in float"),
    ]
    legend = "".join(f'<span><i class="sw" style="background:{L.PALETTE[s][0]};border-color:{L.PALETTE[s][1]}">'
                     f'</i>{_e(label)}</span>'
                     for s, label in LEGEND)
    floats = _simple_table(("module", "kind", "reason", "detail", "pass", "nodes"), [
        (_e(c["module"] or "<root>"), _e(c["kind"]), f'<span class="float">{_e(c["reason"])}</span>', _e(c["detail"]),
         _e(c["pass_name"]), "<br>".join(f'<a class="mono" href="#layer-{_e(n)}">{_e(n)}</a>' for n in c["nodes"]))
        for c in d.float_candidates])
    added = _simple_table(("pass", "kind", "module", "nodes", "shapes", "bytes"), [
        (_e(a["pass_name"]), _e(a["kind"]), _e(a["module"]), f'<span class="mono">{_e(", ".join(a["nodes"]))}</span>',
         _e("; ".join(_shape(s) for s in a["shapes"])), nbytes(a["bytes"]) if a["kind"] == "parameter" else "–")
        for a in d.added])
    passes = _simple_table(("pass", "nodes", "removed", "added", "rewrites"), [
        (f'<b class="mono">{_e(p.name)}</b>', f"{p.nodes_before} → {p.nodes_after}", len(p.removed), len(p.added),
         "<br>".join(f'<span class="mono">{_e(", ".join(c.removed) or "∅")} → <b>{_e(c.replacement)}</b>'
                     f'{(" + " + _e(", ".join(c.support))) if c.support else ""}</span>' for c in p.changes)
         + ("<br><i>dropped: " + _e(", ".join(p.dropped)) + "</i>" if p.dropped else ""))
        for p in d.passes])
    conventions = "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in CONVENTIONS.items())
    inputs = ", ".join(f"{'×'.join(map(str, x['shape'] or []))} {x['dtype']}" for x in d.inputs)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>bitfx diff: {_e(d.model)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>
<body>
<h1>bitfx diff — {_e(d.model)}</h1>
<div class="meta">{_e(headline(d))}. Preset <code>{_e(d.config.method)}</code>; inputs {_e(inputs)};
graphs: <code>{_e(name_b)}</code> snapshot → <code>{_e(name_a)}</code> snapshot.</div>
<div class="cards">{"".join(f'<div class="card">{_e(a)}<b>{_e(b)}</b>{_e(c)}</div>' for a, b, c in cards)}</div>
<h2>Graphs</h2>
<div class="legend">{legend}</div>
<p class="meta">Modules are folded at depth {depth}: a box lists the module's ops; click it to open the
module's own graphs below. Nodes link to their row in the per-layer table.</p>
{_pair(f"before — {_e(name_b)} ({d.before.number_of_nodes()} nodes)", ov_b,
       f"after — {_e(name_a)} ({d.after.number_of_nodes()} nodes)", ov_a)}
<h2>Per layer</h2>
{_layer_table(d, box_of)}
<h2>Modules <button onclick="setAll(true)">expand all</button><button onclick="setAll(false)">collapse all</button></h2>
{"".join(sections) or "<p>none</p>"}
<h2>Left in float</h2>
{floats}
<h2>Added nodes</h2>
{added}
<h2>Per pass</h2>
{passes}
<h2>How this page counts</h2>
<ul>{conventions}</ul>
<script>{JS}</script>
</body></html>
"""
