"""canonicalize_attention on tiny graphs: each spelling becomes one bitfx.attention, same outputs;
near-misses are left whole and reported."""
import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import bitfx  # noqa: F401
from bitfx import BinarizeConfig
from bitfx.ops import ATTENTION
from bitfx.passes import PassContext
from bitfx.passes.canonicalize_attention import canonicalize_attention

aten = torch.ops.aten
B, H, L, D = 2, 2, 5, 4
SCALE = 1 / math.sqrt(D)


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, L, D, generator=g) for _ in range(3))


def kT(k):
    return k.transpose(-2, -1)


class Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def export(fn, args):
    return torch.export.export(Fn(fn), tuple(args), strict=False).module()


def run_pass(gm, args):
    """(outputs before, outputs after, context) of canonicalize_attention on ``gm``."""
    with torch.no_grad():
        torch.manual_seed(0)
        before = gm(*args)
    ctx = PassContext(BinarizeConfig())
    gm = canonicalize_attention(gm, ctx)
    gm.graph.lint()
    gm.recompile()
    with torch.no_grad():
        torch.manual_seed(0)
        after = gm(*args)
    return before, after, ctx


def count(gm, target=ATTENTION):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


BOOL_MASK = torch.rand(L, L, generator=torch.Generator().manual_seed(3)) > 0.6  # True = masked
BOOL_MASK[:, 0] = False  # every row keeps a key
CAUSAL = torch.tril(torch.ones(L, L))
ADD_MASK = torch.zeros(B, 1, 1, L)
ADD_MASK[0, ..., -2:] = -10000.0

# name -> (function, extra inputs after q, k, v)
SPELLINGS = {
    "div_sqrt": (lambda q, k, v: F.softmax(q @ kT(k) / math.sqrt(D), dim=-1) @ v, ()),
    "mul_after": (lambda q, k, v: torch.softmax(torch.matmul(q, kT(k)) * 0.3, -1) @ v, ()),
    "scale_on_q": (lambda q, k, v: ((q * SCALE) @ kT(k)).softmax(-1) @ v, ()),
    "scale_on_k": (lambda q, k, v: (q @ kT(k * SCALE)).softmax(-1) @ v, ()),
    "scale_on_kT": (lambda q, k, v: (q @ (kT(k) / 3.0)).softmax(-1) @ v, ()),
    "permute_k": (lambda q, k, v: (q @ k.permute(0, 1, 3, 2)).softmax(-1) @ v, ()),
    "no_scale": (lambda q, k, v: (q @ kT(k)).softmax(-1) @ v, ()),
    "softmax_dim_index": (lambda q, k, v: (q @ kT(k)).softmax(3) @ v, ()),
    "additive_mask": (lambda q, k, v, m: ((q @ kT(k)) * SCALE + m).softmax(-1) @ v, (ADD_MASK,)),
    "mask_then_scale": (lambda q, k, v, m: ((m + q @ kT(k)) / math.sqrt(D)).softmax(-1) @ v, (ADD_MASK,)),
    "masked_fill": (lambda q, k, v, m: (q @ kT(k) * SCALE).masked_fill(m, float("-inf")).softmax(-1) @ v,
                    (BOOL_MASK,)),
    "masked_fill_eq0": (lambda q, k, v, m: (q @ kT(k)).masked_fill(m == 0, float("-inf")).softmax(-1) @ v,
                        (CAUSAL,)),
    "masked_fill_then_scale": (lambda q, k, v, m: ((q @ kT(k)).masked_fill(m, float("-inf")) * SCALE)
                               .softmax(-1) @ v, (BOOL_MASK,)),
    "where": (lambda q, k, v, m: torch.where(m, q @ kT(k), float("-inf")).softmax(-1) @ v, (~BOOL_MASK,)),
    "dropout_eval": (lambda q, k, v: F.dropout((q @ kT(k)).softmax(-1), 0.1, training=False) @ v, ()),
    "dropout_train": (lambda q, k, v: F.dropout((q @ kT(k)).softmax(-1), 0.25, training=True) @ v, ()),
    "softmax_float32_to": (lambda q, k, v: F.softmax(q @ kT(k), -1, dtype=torch.float32).to(q.dtype) @ v, ()),
    "k_already_transposed": (lambda q, kt, v: (q @ kt).softmax(-1) @ v, ()),
    "heads_split": (lambda x, k, v: (x.view(B, L, H, D).transpose(1, 2) @ kT(k)).softmax(-1) @ v, ()),
    "bmm": (lambda q, k, v: torch.bmm(torch.bmm(q.flatten(0, 1) * SCALE, kT(k.flatten(0, 1))).softmax(-1),
                                      v.flatten(0, 1)), ()),
    "baddbmm": (lambda q, k, v, m: torch.bmm(torch.baddbmm(m, q.flatten(0, 1), kT(k.flatten(0, 1)))
                                             .softmax(-1), v.flatten(0, 1)), (ADD_MASK[0, 0],)),
    "sdpa": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), ()),
    "sdpa_causal_scale": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3), ()),
    "sdpa_bool_mask": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), (~BOOL_MASK,)),
    "sdpa_float_mask": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, m), (ADD_MASK,)),
    "flash_for_cpu": (lambda q, k, v: aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0], ()),
    # finite fills: exact as an additive finfo.min mask, fully masked rows (FULL_MASK row 1) included
    "masked_fill_finfo_min": (lambda q, k, v, m: (q @ kT(k) * SCALE).masked_fill(m, torch.finfo(q.dtype).min)
                              .softmax(-1) @ v, ("FULL_MASK",)),
    "masked_fill_minus_1e9_then_scale": (lambda q, k, v, m: ((q @ kT(k)).masked_fill(m, -1e9) * SCALE)
                                         .softmax(-1) @ v, ("FULL_MASK",)),
    "where_finfo_min": (lambda q, k, v, m: torch.where(m, q @ kT(k), torch.finfo(q.dtype).min).softmax(-1) @ v,
                        ("FULL_ATTEND",)),
    "einsum": (lambda q, k, v: torch.einsum("bhqk,bhkd->bhqd",
                                            torch.einsum("bhqd,bhkd->bhqk", q, k).mul(SCALE).softmax(-1), v), ()),
    "einsum_heads_in_dim2": (lambda q, k, v: torch.einsum(  # q, k, v as [B, L, H, D], output [B, L, H, D]
        "bhij,bjhd->bihd", torch.einsum("bihd,bjhd->bhij", q, k).softmax(-1), v), ()),
    "einsum_ellipsis": (lambda q, k, v: torch.einsum("...ij,...jd->...id",
                                                     torch.einsum("...id,...jd->...ij", q, k).softmax(-1), v), ()),
    "sdpa_gqa": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), ()),
    # GPT-2 (older HF): where(causal, s, full([], finfo.min)); DistilBERT: masked_fill(m, tensor(finfo.min))
    "where_tensor_value": (lambda q, k, v, m: torch.where(m, q @ kT(k), torch.full([], torch.finfo(q.dtype).min))
                           .softmax(-1) @ v, ("FULL_ATTEND",)),
    "masked_fill_tensor_value": (lambda q, k, v, m: (q @ kT(k)).masked_fill(m, torch.tensor(torch.finfo(q.dtype).min))
                                 .softmax(-1) @ v, ("FULL_MASK",)),
    "two_additive_masks": (lambda q, k, v, bias, m: (q @ kT(k) + bias + m).softmax(-1) @ v,  # T5: bias, mask
                           (torch.randn(1, H, L, L, generator=torch.Generator().manual_seed(5)), ADD_MASK)),
}

FULL_MASK = BOOL_MASK.clone()
FULL_MASK[1] = True  # row 1: every key masked (a finite fill gives a uniform row, -inf gives NaN)


def spelling_inputs(name, extra):
    q, k, v = qkv()
    if name == "k_already_transposed":
        k = kT(k).contiguous()
    if name == "heads_split":
        q = q.transpose(1, 2).reshape(B, L, H * D)
    if name == "einsum_heads_in_dim2":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if name == "sdpa_gqa":  # 4 query heads over 2 kv heads
        q = torch.cat([q, q.flip(-1)], dim=1)
    extra = tuple({"FULL_MASK": FULL_MASK, "FULL_ATTEND": ~FULL_MASK}.get(e, e) if isinstance(e, str) else e
                  for e in extra)
    return (q, k, v, *extra)


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_spelling_becomes_one_attention(name):
    fn, extra = SPELLINGS[name]
    args = spelling_inputs(name, extra)
    gm = export(fn, args)
    before, after, ctx = run_pass(gm, args)
    assert count(gm) == 1, gm.graph
    left = {aten.softmax.int, aten._softmax.default, aten.matmul.default, aten.bmm.default,
            aten.baddbmm.default, aten.scaled_dot_product_attention.default, aten.dropout.default}
    assert not left & {n.target for n in gm.graph.nodes}, gm.graph
    assert [r.target for r in ctx.report.rewrites] == ["attention"] and not ctx.report.skips
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_dropout_probability_is_kept():
    gm = export(SPELLINGS["dropout_train"][0], qkv())
    canonicalize_attention(gm, PassContext(BinarizeConfig()))
    (node,) = [n for n in gm.graph.nodes if n.target == ATTENTION]
    assert node.args[4:] == (1.0, False, 0.25)


def test_scale_and_mask_are_folded():
    """scale on q and after the product multiply; an additive mask added before a scale is scaled."""
    fn = lambda q, k, v, m: (((q * 0.5) @ kT(k) + m) * 0.25).softmax(-1) @ v  # noqa: E731
    args = (*qkv(), ADD_MASK)
    gm = export(fn, args)
    before, after, _ = run_pass(gm, args)
    (node,) = [n for n in gm.graph.nodes if n.target == ATTENTION]
    assert node.args[4] == pytest.approx(0.125)
    assert node.args[3].target == aten.mul.Tensor and node.args[3].args[1] == 0.25
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_masked_fill_mask_becomes_true_is_attend():
    gm = export(SPELLINGS["masked_fill"][0], (*qkv(), BOOL_MASK))
    canonicalize_attention(gm, PassContext(BinarizeConfig()))
    (node,) = [n for n in gm.graph.nodes if n.target == ATTENTION]
    assert node.args[3].target == aten.logical_not.default
    gm = export(SPELLINGS["masked_fill_eq0"][0], (*qkv(), CAUSAL))
    canonicalize_attention(gm, PassContext(BinarizeConfig()))
    (node,) = [n for n in gm.graph.nodes if n.target == ATTENTION]
    assert node.args[3].target == aten.ne.Scalar  # x == 0 masked  ->  x != 0 attends


# -- near-misses: left whole and reported -------------------------------------------------------
NEAR_MISSES = {
    "probs_times_2": (lambda q, k, v: ((q @ kT(k)).softmax(-1) * 2) @ v, "probabilities feed"),
    "softmax_dim0": (lambda q, k, v: (q @ kT(k)).softmax(0) @ v, "softmax over dim 0"),
    "softmax_dim_minus2": (lambda q, k, v: (q @ kT(k)).softmax(-2) @ v, "softmax over dim -2"),
    "probs_two_users": (lambda q, k, v: ((p := (q @ kT(k)).softmax(-1)) @ v, p), "used by 2 nodes"),
    "scores_two_users": (lambda q, k, v: ((s := q @ kT(k)).softmax(-1) @ v, s), "used by 2 nodes"),
    "op_before_softmax": (lambda q, k, v: torch.tanh(q @ kT(k)).softmax(-1) @ v, "tanh"),
    "small_finite_fill": (lambda q, k, v: (q @ kT(k)).masked_fill(BOOL_MASK, -5.0).softmax(-1) @ v, "not -inf"),
    "fill_scaled_above_limit": (lambda q, k, v: ((q @ kT(k)).masked_fill(BOOL_MASK, -1e5) * 1e-3)
                                .softmax(-1) @ v, "after scaling"),
    "einsum_over_queries": (lambda q, k, v: torch.einsum("bhqk,bhqd->bhkd", torch.einsum(
        "bhqd,bhkd->bhqk", q, k).softmax(-1), v), "not P·v over the key dimension"),
    "tensor_scale": (lambda q, k, v: ((q @ kT(k)) * v.mean()).softmax(-1) @ v, "scaled by a tensor"),
    "probs_right_operand": (lambda q, k, v: kT(v) @ (q @ kT(k)).softmax(-1), "right operand"),
    "two_masks": (lambda q, k, v: ((q @ kT(k)).masked_fill(BOOL_MASK, float("-inf")) + ADD_MASK)
                  .softmax(-1) @ v, "two masks"),
}


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_near_miss_is_left_whole_and_reported(name):
    fn, detail = NEAR_MISSES[name]
    args = qkv()
    gm = export(fn, args)
    n_before = len(gm.graph.nodes)
    before, after, ctx = run_pass(gm, args)
    assert count(gm) == 0
    assert len(gm.graph.nodes) == n_before  # nothing half-rewritten
    (skip,) = ctx.report.skips
    assert (skip.pass_name, skip.kind, skip.reason) == ("canonicalize_attention", "attention", "unrecognised")
    assert detail in skip.detail, skip.detail
    assert not ctx.report.rewrites
    torch.testing.assert_close(after, before)


def test_classifier_softmax_is_not_a_candidate():
    w = torch.randn(3, D)
    gm = export(lambda x: F.linear(x, w).softmax(-1), (torch.randn(B, D),))
    _, _, ctx = run_pass(gm, (torch.randn(B, D),))
    assert count(gm) == 0 and not ctx.report.skips and not ctx.report.rewrites


def test_sdpa_enable_gqa_repeats_kv_heads():
    """4 query heads over 1 kv head: k and v are repeated per group before the canonical node."""
    q, k, v = qkv()
    q = torch.cat([q, -q], dim=1)
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    args = (q, k[:, :1], v[:, :1])
    gm = export(fn, args)
    before, after, ctx = run_pass(gm, args)
    (node,) = [n for n in gm.graph.nodes if n.target == ATTENTION]
    assert tuple(node.args[1].meta["val"].shape) == (B, 2 * H, L, D) and not ctx.report.skips
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_sdpa_enable_gqa_with_symbolic_heads_is_reported():
    def build(g, q, k, v, m):
        return g.call_function(aten.scaled_dot_product_attention.default, (q, k, v), {"enable_gqa": True})

    gm = hand_graph(build)  # no fake values: the head counts are unknown
    ctx = PassContext(BinarizeConfig())
    canonicalize_attention(gm, ctx)
    assert count(gm) == 0
    assert [(s.reason, "enable_gqa" in s.detail) for s in ctx.report.skips] == [("unsupported", True)]


def test_finite_fill_keeps_uniform_fully_masked_row():
    """masked_fill(m, finfo.min) on a fully masked row is uniform, not NaN (an -inf mask would give NaN)."""
    fn, extra = SPELLINGS["masked_fill_finfo_min"]
    args = spelling_inputs("masked_fill_finfo_min", extra)
    gm = export(fn, args)
    before, after, _ = run_pass(gm, args)
    torch.testing.assert_close(after[:, :, 1], args[2].mean(dim=-2), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(after).all()
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_flash_for_cpu_with_logsumexp_used_is_reported():
    fn = lambda q, k, v: aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)  # noqa: E731
    gm = export(lambda q, k, v: fn(q, k, v)[0] + fn(q, k, v)[1].sum(), qkv())
    _, _, ctx = run_pass(gm, qkv())
    # the first call's [0] is rewritten only if [1] is unused; here each call has one used output
    assert count(gm) == 1
    assert [s.reason for s in ctx.report.skips] == ["unrecognised"]


# -- graphs built by hand (no fake values: dims must be literal) ---------------------------------
def hand_graph(build):
    g = fx.Graph()
    q, k, v, m = (g.placeholder(n) for n in "qkvm")
    g.output(build(g, q, k, v, m))
    return fx.GraphModule(torch.nn.Module(), g)


def test_hand_built_baddbmm_softmax_bmm():
    def build(g, q, k, v, m):
        t = g.call_function(aten.transpose.int, (k, -2, -1))
        s = g.call_function(aten.baddbmm.default, (m, q, t), {"alpha": 0.5})
        p = g.call_function(aten._softmax.default, (s, -1, False))
        return g.call_function(aten.bmm.default, (p, v))

    gm = hand_graph(build)
    q, k, v = (t.flatten(0, 1) for t in qkv())
    args = (q, k, v, ADD_MASK[0, 0])
    before, after, ctx = run_pass(gm, args)
    assert count(gm) == 1 and len(ctx.report.rewrites) == 1
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [ATTENTION]
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_hand_built_softmax_dim_unknown_rank_is_reported():
    def build(g, q, k, v, m):
        s = g.call_function(aten.matmul.default, (q, g.call_function(aten.transpose.int, (k, -2, -1))))
        p = g.call_function(aten.softmax.int, (s, 3))  # last dim, but the graph has no shapes to tell
        return g.call_function(aten.matmul.default, (p, v))

    gm = hand_graph(build)
    args = (*qkv(), None)
    before, after, ctx = run_pass(gm, args)
    assert count(gm) == 0 and ctx.report.skips[0].detail.startswith("softmax over dim 3")
    torch.testing.assert_close(after, before)


def test_fused_encoder_layer_op_is_reported_not_crashed():
    def build(g, q, k, v, m):
        weights = (k,) * 4 + (False, False, 1e-5) + (v,) * 10
        return g.call_function(aten._transformer_encoder_layer_fwd.default, (q, 4, 2, *weights, None, None))

    gm = hand_graph(build)
    ctx = PassContext(BinarizeConfig())
    canonicalize_attention(gm, ctx)
    gm.graph.lint()
    (skip,) = ctx.report.skips
    assert skip.reason == "unrecognised" and "fused" in skip.detail
    assert count(gm, aten._transformer_encoder_layer_fwd.default) == 1


def test_fill_constant_nodes_go_with_the_match():
    fn, extra = SPELLINGS["where_tensor_value"]
    args = spelling_inputs("where_tensor_value", extra)
    gm = export(fn, args)
    run_pass(gm, args)
    assert aten.full.default not in {n.target for n in gm.graph.nodes}, gm.graph
