"""A weight that is a slice of a parameter (MHA's packed in_proj split for cross attention) becomes a
bit_linear; a weight the graph computes or an activation stays float with the true reason; the packed
weight of a slice follows in-place updates of the parameter."""
import operator

import torch
import torch.fx as fx

import bitfx  # noqa: F401
from bitfx import BinarizeConfig
from bitfx.ops import BIT_LINEAR
from bitfx.passes import PassContext
from bitfx.passes.binarize_linear import binarize_linear
from bitfx.passes.lower_kernels import BitLinearKernel, lower_kernels

aten = torch.ops.aten
W = torch.randn(12, 8)
X = torch.randn(3, 8)


def graph(weight_of):
    """linear(x, weight_of(graph, W node, x node)) with W a parameter of the root module."""
    root = torch.nn.Module()
    root.register_parameter("w", torch.nn.Parameter(W.clone()))
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = X
    w = g.get_attr("w")
    w.meta["val"] = W
    weight = weight_of(g, w, x)
    g.output(g.call_function(aten.linear.default, (x, weight)))
    return fx.GraphModule(root, g)


def kv_slice(g, w, x):  # F._in_projection_packed: w_q, w_kv = w.split([E, 2E])
    parts = g.call_function(aten.split_with_sizes.default, (w, [4, 8]))
    kv = g.call_function(operator.getitem, (parts, 1))
    kv.meta["val"] = W[4:]
    return kv


def run(gm):
    ctx = PassContext(BinarizeConfig.preset("bibert"))
    gm = binarize_linear(gm, ctx)
    gm.graph.lint()
    gm.recompile()
    return gm, ctx


def test_slice_of_a_parameter_becomes_bit_linear_with_its_own_rows():
    gm, ctx = run(graph(kv_slice))
    (node,) = [n for n in gm.graph.nodes if n.target == BIT_LINEAR]
    assert not ctx.report.skips and ctx.report.count("linear", "bit_linear") == 1
    expected = torch.ops.bitfx.bit_linear(X, W[4:], None, None, None, None, "sign_channel", "sign", 1)
    torch.testing.assert_close(gm(X), expected, rtol=0, atol=0)


def test_computed_weight_is_reported_with_its_parameter():
    gm, ctx = run(graph(lambda g, w, x: g.call_function(aten.mul.Tensor, (w, 2.0))))
    (skip,) = ctx.report.skips
    assert skip.reason == "unsupported" and "computed from parameter w by mul" in skip.detail, skip.detail
    assert not [n for n in gm.graph.nodes if n.target == BIT_LINEAR]


def test_activation_weight_is_reported_as_activation():
    gm, ctx = run(graph(lambda g, w, x: x))
    (skip,) = ctx.report.skips
    assert skip.detail == "weight is an activation (activation x activation product)"


def lowered(weight_of):
    """lower_kernels on bit_linear(x, weight_of(...)) built by hand; returns (kernel module, gm)."""
    gm = graph(weight_of)
    (lin,) = [n for n in gm.graph.nodes if n.target == aten.linear.default]
    lin.target, lin.args = BIT_LINEAR, (*lin.args, None, None, None, None, "sign_channel", "sign", 1)
    gm = lower_kernels(gm, PassContext(BinarizeConfig.preset("bibert")))
    gm.recompile()
    (kernel,) = [m for m in gm.modules() if isinstance(m, BitLinearKernel)]
    return kernel, gm


def test_slice_weight_kernel_caches_and_computed_weight_does_not():
    kernel, gm = lowered(kv_slice)
    assert kernel.cache is True
    kernel, gm = lowered(lambda g, w, x: g.call_function(aten.mul.Tensor, (w, 2.0)))
    assert kernel.cache is False  # a fresh tensor per call: its address may be reused
    expected = torch.ops.bitfx.bit_linear(X, 2 * W, None, None, None, None, "sign_channel", "sign", 1)
    torch.testing.assert_close(gm(X), expected, rtol=1e-5, atol=1e-5)


def test_packed_slice_is_rebuilt_after_in_place_update_of_the_parameter():
    k = BitLinearKernel("sign_tensor", "sign", 1)
    w = torch.randn(12, 16)
    kv = w[4:]  # a view: its own data_ptr, the parameter's _version
    p1, _ = k.packed(kv, None)
    assert k.packed(w[4:], None)[0] is p1
    w[4:].neg_()  # in place through another view of the same parameter
    p2, _ = k.packed(w[4:], None)
    assert p2 is not p1
    assert not torch.equal(p2.planes, p1.planes)
    uncached = BitLinearKernel("sign_tensor", "sign", 1, cache=False)
    assert uncached.packed(kv, None)[0] is not uncached.packed(kv, None)[0]
