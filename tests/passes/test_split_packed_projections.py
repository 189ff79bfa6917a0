"""split_packed_projections: a packed q/k/v projection becomes one linear per part (each its own rows of
the packed weight and bias), in every spelling of the split; the float numbers do not change; a
packed output that is not all attention inputs, or a layer the config keeps, stays one linear."""
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import bitfx
from bitfx.api import trace
from bitfx.ops import BIT_LINEAR
from bitfx.passes import PIPELINE
from bitfx.passes.split_packed_projections import split_packed_projections

aten = torch.ops.aten
E, HEADS = 32, 4
#: up to and including the split (recognize_fake_quant sits before it and changes nothing here)
SPLIT = PIPELINE[:PIPELINE.index(split_packed_projections) + 1]


class Packed(nn.Module):
    """One packed projection ``qkv`` (a [3E, E] weight) split into q, k, v by ``spelling``, then SDPA."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling
        self.qkv, self.proj = nn.Linear(E, 3 * E), nn.Linear(E, E)

    def heads(self, t, b, n):
        return t.view(b, n, HEADS, E // HEADS).transpose(1, 2)

    def forward(self, x):
        b, n, _ = x.shape
        if self.spelling == "split":  # GPT-2 / nanoGPT
            q, k, v = (self.heads(t, b, n) for t in self.qkv(x).split(E, dim=-1))
        elif self.spelling == "chunk":
            q, k, v = (self.heads(t, b, n) for t in self.qkv(x).chunk(3, dim=-1))
        elif self.spelling == "unbind":  # timm / BinaryViT
            q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, E // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        elif self.spelling == "select":  # older timm: qkv[0], qkv[1], qkv[2]
            qkv = self.qkv(x).reshape(b, n, 3, HEADS, E // HEADS).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
        elif self.spelling == "flat_split":  # a 2-D projection, viewed back with -1, then split
            q, k, v = (self.heads(t, b, n) for t in self.qkv(x.reshape(b * n, E)).view(b, n, -1).split(E, -1))
        elif self.spelling == "flat":  # a 2-D projection, viewed into [b, n, 3, h, d] directly
            y = self.qkv(x.reshape(b * n, E))
            q, k, v = y.view(b, n, 3, HEADS, E // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        else:  # "unflatten": [b, n, 3E] -> [b, n, 3, E] -> parts first (nn.MultiheadAttention's spelling)
            qkv = self.qkv(x).unflatten(-1, (3, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            q, k, v = (self.heads(qkv[i], b, n) for i in range(3))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, E))


class MHA(nn.Module):
    """``nn.MultiheadAttention``: self attention (one packed in_proj) or cross attention (w_q, w_kv)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True)

    def forward(self, x, memory=None):
        kv = x if memory is None else memory
        return self.attn(x, kv, kv, need_weights=False)[0]


class GatedMLP(nn.Module):
    """A packed gate/up projection split in two that feeds no attention: not a q/k/v projection."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(E, 4 * E), nn.Linear(2 * E, E)

    def forward(self, x):
        a, g = self.fc(x).chunk(2, dim=-1)
        return self.out(a * F.gelu(g))


class Leaky(Packed):
    """The packed output is also returned: nothing may replace it."""

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x)
        q, k, v = (self.heads(t, b, n) for t in qkv.split(E, dim=-1))
        return F.scaled_dot_product_attention(q, k, v), qkv


def linears(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == aten.linear.default]


def count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def weights_called(gm, target, *inputs):
    """The weights (argument 1) ``target`` is called with when ``gm`` runs, in call order."""
    seen = []

    class Record(fx.Interpreter):
        def call_function(self, fn, args, kwargs):
            if fn == target:
                seen.append(args[1].detach().clone())
            return super().call_function(fn, args, kwargs)

    with torch.no_grad():
        Record(gm).run(*inputs)
    return seen


X = torch.randn(2, 6, E)


@pytest.mark.parametrize("spelling", ["split", "chunk", "unbind", "select", "flat", "flat_split", "unflatten"])
def test_each_spelling_becomes_three_linears_with_the_same_numbers(spelling):
    torch.manual_seed(0)
    model = Packed(spelling).eval()
    gm, ctx = trace(model, (X,), "bipft", passes=SPLIT)
    gm.graph.lint()
    assert len(linears(gm)) == 3 + 1, gm.graph  # q, k, v and proj
    (r,) = [r for r in ctx.report.rewrites if r.pass_name == "split_packed_projections"]
    assert (r.module, r.target, len(r.new_node.split(","))) == ("qkv", "linear", 3)
    w = model.qkv.weight.detach()
    assert all(torch.equal(a, b) for a, b in zip(weights_called(gm, aten.linear.default, X)[:3],
                                                 (w[:E], w[E:2 * E], w[2 * E:])))
    other = torch.randn(3, 5, E)  # the graph stays shape-generic
    with torch.no_grad():
        for x in (X, other):
            torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cross, parts", [(False, 3), (True, 3)])
def test_multihead_attention_in_proj_is_split_in_three(cross, parts):
    """Self attention: in_proj -> q, k, v. Cross attention: w_q, and w_kv -> k, v (slices of a slice)."""
    torch.manual_seed(0)
    model = MHA().eval()
    args = (X, torch.randn(2, 9, E)) if cross else (X,)
    gm, ctx = trace(model, args, "bipft", passes=SPLIT)
    assert len(linears(gm)) == parts + 1  # + out_proj
    w = model.attn.in_proj_weight.detach()
    assert all(torch.equal(a, b) for a, b in zip(weights_called(gm, aten.linear.default, *args)[:3],
                                                 (w[:E], w[E:2 * E], w[2 * E:])))
    with torch.no_grad():
        torch.testing.assert_close(gm(*args), model(*args), rtol=1e-6, atol=1e-6)

    binary = bitfx.binarize(model, args, {"preset": "bipft", "kernels": "reference"})
    assert count(binary, BIT_LINEAR) == 4 and not binary.bitfx_report.skips, binary.bitfx_report.summary()
    # each part binarized on its own rows: its own per-tensor scale mean|W_i|, not the packed one
    called = weights_called(binary, BIT_LINEAR, *args)
    assert [round(float(t.abs().mean()), 6) for t in called[:3]] == [
        round(float(w[i * E:(i + 1) * E].abs().mean()), 6) for i in range(3)]
    moves = [n.args[4].target for n in binary.graph.nodes if n.target == BIT_LINEAR]
    assert len(set(moves)) == 4  # an activation move per part (and out_proj)


def test_gated_mlp_and_a_packed_output_used_elsewhere_stay_one_linear():
    torch.manual_seed(0)
    gm, ctx = trace(GatedMLP().eval(), (X,), "bipft", passes=SPLIT)
    assert len(linears(gm)) == 2 and not ctx.report.rewrites
    gm, ctx = trace(Leaky("split").eval(), (X,), "bipft", passes=SPLIT)
    assert len(linears(gm)) == 1 and not [r for r in ctx.report.rewrites if r.kind == "linear"]


# after binarize these count aten.linear: preset "bit" (bipft's attention estimators are linears too)
def test_a_kept_projection_stays_one_float_linear():
    torch.manual_seed(0)
    model = Packed("unbind").eval()
    gm = bitfx.binarize(model, (X,), {"preset": "bit", "kernels": "reference", "keep": ("qkv",)})
    assert count(gm, aten.linear.default) == 1 and count(gm, BIT_LINEAR) == 1  # qkv float, proj binary
    (skip,) = gm.bitfx_report.skips
    assert (skip.module, skip.reason) == ("qkv", "config")


def test_keep_first_keeps_every_part_of_the_first_projection():
    torch.manual_seed(0)
    model = Packed("split").eval()
    gm = bitfx.binarize(model, (X,), {"preset": "bit", "kernels": "reference", "keep_first": True})
    kept = [s for s in gm.bitfx_report.skips if s.detail == "keep_first"]
    assert [s.module for s in kept] == ["qkv"] * 3
    assert count(gm, aten.linear.default) == 3 and count(gm, BIT_LINEAR) == 1
    with torch.no_grad():  # q, k, v float, proj binary: the float parts give the model's own q, k, v
        y = gm(X)
    assert y.shape == X.shape


@pytest.mark.parametrize("spelling", ["split", "unflatten"])
def test_parts_run_on_the_kernels(spelling):
    """The part weights reach the TVM kernels as the packed parameter plus a view of its rows."""
    torch.manual_seed(0)
    model = Packed(spelling).eval()
    torch._dynamo.reset()
    with torch.no_grad():
        ref = torch.compile(model, backend="bitfx", options={"config": "bit", "kernels": "reference"})(X)
        torch._dynamo.reset()
        fast = torch.compile(model, backend="bitfx", options={"config": "bit"})(X)
    torch._dynamo.reset()
    assert float((fast - ref).norm() / ref.norm()) <= 1e-4
