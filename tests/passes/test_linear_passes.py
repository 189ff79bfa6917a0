"""canonicalize_linear and binarize_linear on graphs of 3-6 nodes built by hand."""
import pytest
import torch
import torch.fx as fx

import bitfx  # noqa: F401
from bitfx import BinarizeConfig
from bitfx.passes import PassContext
from bitfx.passes.binarize_linear import binarize_linear
from bitfx.passes.canonicalize_linear import canonicalize_linear

aten = torch.ops.aten


def build(fn, weights: dict, x: torch.Tensor):
    """A graph with placeholders x, *weights; ``fn(graph, x_node, weight_nodes)`` adds the body."""
    root = torch.nn.Module()
    g = fx.Graph()
    xn = g.placeholder("x")
    xn.meta["val"] = x
    wn = {}
    for name, value in weights.items():
        root.register_parameter(name, torch.nn.Parameter(value))
        wn[name] = g.get_attr(name)
        wn[name].meta["val"] = value
    out = fn(g, xn, wn)
    g.output(out)
    gm = fx.GraphModule(root, g)
    return gm


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


W = torch.randn(6, 8)
B = torch.randn(6)
X = torch.randn(3, 5, 8)


@pytest.mark.parametrize("spelling", ["addmm", "matmul_t_add", "mm_permute", "matmul_kn", "transpose_no_bias"])
def test_canonicalize_linear_spellings(spelling):
    x2 = X.reshape(-1, 8)

    def body(g, x, w):
        if spelling == "addmm":
            return g.call_function(aten.addmm.default, (w["b"], x, g.call_function(aten.t.default, (w["w"],))))
        if spelling == "matmul_t_add":
            mm = g.call_function(aten.matmul.default, (x, g.call_function(aten.t.default, (w["w"],))))
            return g.call_function(aten.add.Tensor, (mm, w["b"]))
        if spelling == "mm_permute":
            perm = g.call_function(aten.permute.default, (w["w"], [1, 0]))
            return g.call_function(aten.mm.default, (x, perm))
        if spelling == "matmul_kn":  # GPT-2 Conv1D: x @ P with P [K, N]
            return g.call_function(aten.add.Tensor, (g.call_function(aten.matmul.default, (x, w["p"])), w["b"]))
        return g.call_function(aten.matmul.default, (x, g.call_function(aten.transpose.int, (w["w"], 0, 1))))

    x = x2 if spelling in ("addmm", "mm_permute") else X
    gm = build(body, {"w": W, "b": B, "p": W.t().contiguous()}, x)
    before = gm(x)
    ctx = PassContext(BinarizeConfig.preset("bipft"))
    gm = canonicalize_linear(gm, ctx)
    gm.graph.lint()
    gm.recompile()
    assert targets(gm).count(aten.linear.default) == 1
    assert not {aten.addmm.default, aten.mm.default, aten.matmul.default} & set(targets(gm))
    torch.testing.assert_close(gm(x), before, rtol=1e-5, atol=1e-5)


def test_matmul_of_two_activations_is_not_a_linear():
    def body(g, x, w):
        y = g.call_function(aten.transpose.int, (x, -2, -1))
        return g.call_function(aten.matmul.default, (x, y))

    gm = build(body, {}, X)
    gm = canonicalize_linear(gm, PassContext(BinarizeConfig()))
    assert aten.linear.default not in targets(gm)
    assert aten.matmul.default in targets(gm)


def test_addmm_with_beta_is_left_alone():
    x2 = X.reshape(-1, 8)

    def body(g, x, w):
        return g.call_function(aten.addmm.default, (w["b"], x, g.call_function(aten.t.default, (w["w"],))), {"beta": 2})

    gm = build(body, {"w": W, "b": B}, x2)
    gm = canonicalize_linear(gm, PassContext(BinarizeConfig()))
    assert aten.addmm.default in targets(gm)


def _linear_graph(name="fc"):
    def body(g, x, w):
        n = g.call_function(aten.linear.default, (x, w["w"], w["b"]))
        n.meta["nn_module_stack"] = {name: (name, "torch.nn.Linear")}
        return n
    return build(body, {"w": W, "b": B}, X)


def test_binarize_linear_rewrites_and_adds_parameters():
    gm = _linear_graph()
    ctx = PassContext(BinarizeConfig.preset("bipft"))
    gm = binarize_linear(gm, ctx)
    gm.graph.lint()
    gm.recompile()
    assert targets(gm) == [torch.ops.bitfx.bit_linear.default]
    names = {n for n, _ in gm.named_parameters()}
    assert {"bitfx_move__fc", "bitfx_alpha__fc"} <= names
    assert ctx.report.count("linear") == 1
    y = gm(X)
    assert y.shape == (3, 5, 6)


def test_binarize_linear_respects_keep_patterns_and_reports():
    gm = _linear_graph("classifier")
    ctx = PassContext(BinarizeConfig.preset("bipft"))
    gm = binarize_linear(gm, ctx)
    assert targets(gm) == [aten.linear.default]
    (skip,) = ctx.report.skips
    assert skip.reason == "config" and "classifier" in skip.detail


def test_binarize_linear_min_features_and_non_parameter_weight():
    gm = _linear_graph()
    ctx = PassContext(BinarizeConfig.preset("bibert", min_features=1000))
    binarize_linear(gm, ctx)
    assert ctx.report.skips[0].detail.startswith("6x8 weight is smaller")

    def body(g, x, w):  # weight computed from the input: not a parameter
        wt = g.call_function(aten.select.int, (x, 0, 0))
        return g.call_function(aten.linear.default, (x, wt))

    gm = build(body, {}, X)
    gm.graph.find_nodes(op="call_function", target=aten.select.int)[0].meta["val"] = X[0]
    ctx = PassContext(BinarizeConfig())
    gm = binarize_linear(gm, ctx)
    assert aten.linear.default in targets(gm)
    assert ctx.report.skips[0].reason == "unsupported"


def test_binarize_linear_presets_pick_their_quantizers():
    for preset, (wmode, amode, bits) in {
        "bitnet158": ("ternary", "absmax", 8),
        "bibert": ("sign_channel", "sign", 1),
    }.items():
        gm = binarize_linear(_linear_graph(), PassContext(BinarizeConfig.preset(preset)))
        (node,) = [n for n in gm.graph.nodes if n.target == torch.ops.bitfx.bit_linear.default]
        assert node.args[6:] == (wmode, amode, bits)
