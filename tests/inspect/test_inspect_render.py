"""The renderings of a GraphDiff: JSON (against its schema), HTML (parsed, links checked, screenshot), terminal."""
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import diff_models
import networkx as nx
import pytest
from rich.console import Console

import bitfx
from bitfx.inspect import layout
from bitfx.inspect.graphs import fold_depth, folder

SCHEMA = Path(bitfx.__file__).parent / "inspect" / "diff.schema.json"
NO_DOT = pytest.mark.skipif(not shutil.which("dot"), reason="Graphviz dot not installed")
ENGINES = ["python", pytest.param("dot", marks=NO_DOT)]


@pytest.fixture(scope="module")
def bert():
    return bitfx.diff(*diff_models.bert())


@pytest.fixture(scope="module")
def nothing():
    return bitfx.diff(*diff_models.nothing())


# -- JSON -------------------------------------------------------------------------------------
def test_json_validates_against_schema(bert, nothing, tmp_path):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the test extra: pip install -e .[test]")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for d in (bert, nothing):
        path = tmp_path / "diff.json"
        text = d.to_json(str(path))
        doc = json.loads(path.read_text())
        assert json.loads(text) == doc
        validator.validate(doc)
    assert doc["changed"] is False and doc["layers"] == []


def test_json_content(bert):
    doc = json.loads(bert.to_json())
    assert doc["totals"]["rewritten"] == {"linear": 12, "attention": 2}
    assert doc["conventions"]["flops_per_mac"] == 2 and "BOPs/64" in doc["conventions"]["ops"]
    assert len(doc["layers"]) == len(bert.layers) and doc["graphs"]["before"]["snapshot"] == "capture"
    modules = {m["module"]: m for m in doc["modules"]}
    self_attn = modules["encoder.layer.0.attention.self"]
    assert self_attn["binary"] == 1 and self_attn["ops_saving"] > 1
    names = {n["name"] for n in doc["graphs"]["after"]["nodes"]}
    assert all(u in names and v in names for u, v in doc["graphs"]["after"]["edges"])


def test_schema_rejects_a_broken_document(bert):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the test extra: pip install -e .[test]")
    doc = json.loads(bert.to_json())
    doc["layers"][0]["status"] = "half"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, json.loads(SCHEMA.read_text()), cls=jsonschema.Draft202012Validator)


# -- HTML -------------------------------------------------------------------------------------
class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.svgs, self.ids, self.hrefs, self.details, self.external = [], set(), [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg":
            self.svgs.append(a.get("class", ""))
        if "id" in a:
            self.ids.add(a["id"])
        for key in ("href", "xlink:href"):
            if key in a:
                self.hrefs.append(a[key])
        if tag == "details":
            self.details.append(a.get("id"))
        if tag in ("link", "img", "iframe") or (tag == "script" and "src" in a):
            self.external.append(tag)


@pytest.mark.parametrize("engine", ENGINES)
def test_html_is_one_self_contained_page(bert, engine):
    page = Page()
    page.feed(bert.to_html(engine=engine))
    graphs = [c for c in page.svgs if "graph " in c + " " and "module-graph" not in c]
    assert sorted(graphs) == ["graph graph-after", "graph graph-before"]  # one SVG per graph
    assert page.external == []
    missing = [h for h in page.hrefs if h.startswith("#") and h[1:] not in page.ids]
    assert missing == []  # every box, node and row link lands somewhere
    assert all(f"layer-{ly.node}" in page.ids for ly in bert.layers)
    # every folded module box opens a section of its own with the module's graphs before and after
    boxes = {h[1:] for h in page.hrefs if h.startswith("#mod-")}
    assert boxes and boxes <= set(page.details)
    assert any(d.startswith("mod-encoder-layer-0") for d in page.details)
    assert not [h for h in page.hrefs if h.startswith("http")]


def test_html_highlights_rewrites(bert):
    text = bert.to_html(engine="python")
    green, orange = layout.PALETTE["binary"][0], layout.PALETTE["replaced"][0]
    assert text.count(f'fill="{green}"') >= 12 + 2  # every bitfx op in the module graphs, plus overview boxes
    assert f'fill="{orange}"' in text
    assert "bit_attention" in text and "keep pattern" in text


def test_builtin_layout_keeps_boxes_apart():
    g = layout.VGraph([layout.VNode(n, [n * 8]) for n in "abcde"],
                      [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d"), ("a", "e"), ("d", "b")])  # d->b: a cycle
    boxes, lines = layout.layout(g)
    assert len(lines) == 6
    for i, (x1, y1, w1, h1) in enumerate(boxes.values()):
        for x2, y2, w2, h2 in list(boxes.values())[i + 1:]:
            assert x1 + w1 <= x2 or x2 + w2 <= x1 or y1 + h1 <= y2 or y2 + h2 <= y1


def test_twelve_layers_fold_into_one_box_per_layer():
    g = nx.DiGraph()
    names = ["embeddings.word", "embeddings.norm"] + [
        f"encoder.layer.{i}.{m}" for i in range(12)
        for m in ("attention.self.query", "attention.self.key", "attention.self", "attention.output.dense",
                  "intermediate.dense", "output.dense", "output.LayerNorm")] + ["pooler.dense", "classifier"]
    for i, module in enumerate(names):
        g.add_node(f"n{i}", module=module, op="call_function", hidden=False, order=i)
        if i:
            g.add_edge(f"n{i - 1}", f"n{i}")
    assert fold_depth(g) == 4  # 12 × (attention, intermediate, output) + 3 boxes <= 40
    box = folder(g, fold_depth(g, limit=20))
    assert box("encoder.layer.7.attention.self.key") == "encoder.layer.7"
    assert (box("embeddings.norm"), box("pooler.dense"), box("classifier")) == ("embeddings", "pooler", "classifier")
    assert len({box(m) for m in names}) == 15


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="no Chromium for a headless screenshot (apt-get install chromium)")
def test_html_renders_in_a_headless_browser(bert, tmp_path):
    html_path, png = tmp_path / "diff.html", tmp_path / "diff.png"
    bert.to_html(str(html_path))
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,1600",
                    f"--screenshot={png}", html_path.as_uri()], check=True, capture_output=True, timeout=120)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a blank page is a few kB


# -- terminal ---------------------------------------------------------------------------------
def test_terminal_summary(bert, nothing):
    console = Console(record=True, width=140, color_system=None)
    bert.print(console)
    text = console.export_text()
    assert "12 linear → bit_linear, 2 attention → bit_attention" in text
    assert "encoder.layer.0" in text and "classifier" in text and "keep pattern" in text
    console = Console(record=True, width=100)
    nothing.print(console)
    assert "nothing to rewrite" in console.export_text()
