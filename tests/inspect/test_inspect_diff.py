"""bitfx.diff on small models: what was rewritten, grouped how, and bytes / OPs computed by hand."""
import diff_models
import pytest
import torch
import torch.fx as fx

import bitfx
from bitfx.inspect.graphs import concrete_shapes, pass_changes

_CACHE = {}


def run(name, config=None):
    key = (name, str(config))
    if key not in _CACHE:
        model, inputs = getattr(diff_models, name)()
        _CACHE[key] = bitfx.diff(model, inputs, config)
    return _CACHE[key]


def layer(d, module, target=None):
    found = [ly for ly in d.layers if ly.module == module and (target is None or ly.target == target)]
    assert len(found) == 1, [(ly.module, ly.target) for ly in d.layers]
    return found[0]


def targets(d):
    return sorted(ly.target for ly in d.layers if ly.status == "binary")


# -- counts -----------------------------------------------------------------------------------
def test_mlp_rewrites_both_linears():
    d = run("mlp")
    assert d.changed
    assert d.totals["rewritten"] == {"linear": 2, "attention": 0}
    assert targets(d) == ["bit_linear", "bit_linear"]
    assert d.float_candidates == []
    assert {r["module"]: [x["target"] for x in r["replaced"]] for r in d.replacements} == {
        "0": ["aten.linear.default"], "2": ["aten.linear.default"]}
    assert {r["module"]: r["passes"] for r in d.replacements} == {"0": ["binarize_linear"], "2": ["binarize_linear"]}


def test_linear_layer_bytes_and_ops_by_hand():
    """Linear(64→32) on M = 16 tokens, preset bipft (W1A1, per-tensor scale, learnable α and move)."""
    ly = layer(run("mlp"), "0")
    m, k, n = 16, 64, 32
    assert ly.bytes_before == k * n * 4 + n * 4                                  # fp32 weight + bias = 8320
    assert ly.bytes_after == k * n // 8 + 4 + n * 4 + k * 4 + 4                  # bits, scale, bias, move, α = 648
    assert ly.before.flops == 2 * m * k * n                                      # a MAC is 2 FLOPs
    assert ly.after.bops == m * k * n                                            # 1-bit × 1-bit: 1 BOP per MAC
    assert ly.after.flops == m * k + m * n + m * n                               # +move; scale (α·s folded); bias
    assert ly.after.ops == m * k * n / 64 + 2048                                 # OPs = BOPs/64 + FLOPs
    assert (ly.weight_bits, ly.act_bits) == (1, 1)
    row = next(r for r in run("mlp").to_dict()["layers"] if r["node"] == ly.node)
    assert row["ops_saving"] == pytest.approx(65536 / 2560)
    assert row["bytes_saving"] == pytest.approx(8320 / 648)


@pytest.mark.parametrize("preset, bytes_after, bops, flops", [
    # per-channel scales (N floats), per-token mean|x| (2 FLOPs per input), row × column scales (2 per output)
    ("bibert", 64 * 32 // 8 + 32 * 4 + 32 * 4, 16 * 64 * 32, 2 * 16 * 64 + 3 * 16 * 32),
    # ternary weights (2 bits) × 8-bit activations: 16 BOPs per MAC; absmax: 3 FLOPs per input
    ("bitnet158", 64 * 32 * 2 // 8 + 4 + 32 * 4, 16 * 64 * 32 * 8 * 2, 3 * 16 * 64 + 3 * 16 * 32),
])
def test_linear_layer_by_hand_other_presets(preset, bytes_after, bops, flops):
    ly = layer(run("mlp", preset), "0")
    assert (ly.bytes_before, ly.bytes_after, ly.after.bops, ly.after.flops) == (8320, bytes_after, bops, flops)


def test_totals_cover_the_whole_model():
    d = run("mlp")
    t = d.totals
    assert t["bytes_before"] == 8320 + (32 * 16 * 4 + 16 * 4)
    assert t["bytes_after"] == sum(ly.bytes_after for ly in d.layers)  # every parameter belongs to a linear here
    assert t["flops_before"] == sum(ly.before.flops for ly in d.layers)
    assert t["ops_after"] == pytest.approx(sum(ly.after.ops for ly in d.layers))
    assert t["ops_saving"] == pytest.approx(t["flops_before"] / t["ops_after"])


def test_canonicalized_then_binarized_linear_is_traced_to_capture_nodes():
    d = run("manual")
    (r,) = d.replacements
    assert r["target"] == "bit_linear" and r["passes"] == ["canonicalize_linear", "binarize_linear"]
    assert sorted(x["target"] for x in r["replaced"]) == ["aten.add.Tensor", "aten.matmul.default", "aten.t.default"]
    assert layer(d, "").bytes_before == 32 * 64 * 4 + 32 * 4
    canon = next(p for p in d.passes if p.name == "canonicalize_linear")
    assert len(canon.changes) == 1 and canon.changes[0].target == "aten.linear.default"


def test_encoder_layer_linears():
    d = run("encoder_layer")
    assert d.totals["rewritten"]["linear"] == 6
    linears = [ly for ly in d.layers if ly.target == "bit_linear"]
    # the packed in_proj split into q, k, v (each its own bit_linear), out_proj, linear1, linear2
    assert [ly.module for ly in linears] == ["self_attn"] * 4 + ["linear1", "linear2"]
    # each part: its 32x32 rows of in_proj_weight at 1 bit, one fp32 per-tensor scale, its 32 bias
    # values, its move [32] and α (the learnable parameters binarize adds)
    assert [ly.bytes_after for ly in linears[:3]] == [32 * 32 // 8 + 4 + 32 * 4 + 32 * 4 + 4] * 3
    # the whole model, by hand: in_proj_weight once at 1 bit with three scales, in_proj_bias fp32;
    # out_proj, linear1, linear2 at 1 bit + a scale, their fp32 biases; two LayerNorms; the moves
    # (K = 32, 32, 32, 32, 32, 64) and α of the six bit_linears; the attention's α_q, α_k, α_v, α_P
    # and estimator weights
    params = (96 * 32 // 8 + 3 * 4) + 96 * 4 + (32 * 32 // 8 + 4) + 32 * 4 + (64 * 32 // 8 + 4) + 64 * 4
    params += (32 * 64 // 8 + 4) + 32 * 4 + 4 * 32 * 4
    added = (5 * 32 + 64) * 4 + 6 * 4 + 4 * 4 + (2 * 8 + 2 * 8 + 8) * 4
    assert d.totals["bytes_after"] == params + added


def test_encoder_layer_attention_by_hand():
    """B=2, H=4, L=8, D=8 (bipft: learnable α, elastic probabilities, rank-1 estimators)."""
    d = run("encoder_layer")
    assert d.totals["rewritten"]["attention"] == 1
    a = layer(d, "self_attn", "bit_attention")
    s = 2 * 4 * 8 * 8                                       # scores B·H·Lq·Lk
    assert a.before.flops == 2 * s * 8 * 2 + 5 * s          # Q·Kᵀ and P·V, 2 FLOPs per MAC; softmax 5 per score
    assert a.after.bops == s * 8 + s * 8                    # 1-bit scores, 1-bit probabilities × 1-bit values
    op = s + 5 * s + 2 * s + (4 * s + 64 + 2 * s) + (2 * s + 512) + 2 * 512
    estimators = 2 * (2 * 512 * 2) + 2 * 512                # est_q, est_k: [.., 2]; est_v: [.., 1]; K = 8
    assert a.after.flops == op + estimators
    assert a.bytes_after == (2 * 8 + 2 * 8 + 8) * 4 + 4 * 4  # estimator weights + α_q, α_k, α_v, α_P
    assert sorted(x["kind"] for x in d.added if x["kind"] != "parameter") == ["estimator"]
    # move and α of 6 linears (q, k, v, out_proj, linear1, linear2); α_q, α_k, α_v, α_P; 3 estimators
    assert len([x for x in d.added if x["kind"] == "parameter"]) == 6 * 2 + 4 + 3


def test_bert_grouped_by_module():
    d = run("bert")
    assert d.totals["rewritten"] == {"linear": 12, "attention": 2}
    mods = {r["module"]: r["target"] for r in d.replacements}
    assert mods["encoder.layer.0.attention.self"] == "bit_attention"
    assert mods["encoder.layer.1.attention.self.query"] == "bit_linear"
    attn = next(r for r in d.replacements if r["module"] == "encoder.layer.0.attention.self")
    assert {"aten.softmax.int", "aten.matmul.default"} <= {x["target"] for x in attn["replaced"]}
    kept = {(c["module"], c["reason"]) for c in d.float_candidates}
    assert kept == {("pooler", "config"), ("classifier", "config")}
    assert "*classifier*" in next(c["detail"] for c in d.float_candidates if c["module"] == "classifier")


def test_bert_linears_without_attention_config():
    d = run("bert", {"preset": "bipft", "attention": False})
    assert d.totals["rewritten"] == {"linear": 12, "attention": 0}
    kept = [(c["module"], c["reason"]) for c in d.float_candidates if c["kind"] == "attention"]
    assert kept == [("encoder.layer.0.attention.self", "config"), ("encoder.layer.1.attention.self", "config")]
    attn = layer(d, "encoder.layer.0.attention.self")
    assert (attn.target, attn.status, attn.after.flops) == ("attention", "float", attn.before.flops)


def test_vit():
    d = run("vit")
    assert d.totals["rewritten"] == {"linear": 12, "attention": 2}  # per block: q, k, v, proj, fc1, fc2
    assert layer(d, "head").reason == "config"
    conv = layer(d, "patch_embed")
    assert (conv.kind, conv.status, conv.reason) == ("conv", "float", "untouched")
    assert conv.before.flops == conv.after.flops == 2 * (2 * 32 * 4 * 4) * (3 * 4 * 4)


def test_nothing_to_rewrite():
    d = run("nothing")
    assert not d.changed and d.layers == [] and d.replacements == []
    assert "nothing to rewrite" in d.summary()


def test_binarized_model_has_nothing_to_rewrite():
    model, inputs = diff_models.mlp()
    d = bitfx.diff(bitfx.binarize(model, inputs), inputs)
    assert not d.changed and [ly.target for ly in d.layers] == ["bit_linear", "bit_linear"]
    assert d.totals["bytes_before"] == d.totals["bytes_after"] and d.totals["ops_saving"] == 1.0
    assert "binary already (2 bitfx ops)" in d.summary()


def test_everything_kept_by_config():
    d = run("mlp", {"preset": "bipft", "linear": False})
    assert not d.changed
    assert [(c["kind"], c["reason"]) for c in d.float_candidates] == [("linear", "config")] * 2
    assert all(ly.status == "float" and ly.bytes_after == ly.bytes_before for ly in d.layers)


# -- graphs -----------------------------------------------------------------------------------
def test_snapshots_become_networkx_graphs_with_concrete_shapes():
    d = run("mlp")
    assert [name for name, _ in d.graphs][0] == "capture" and len(d.graphs) == len(d.snapshots)
    attrs = d.after.nodes[layer(d, "0").node]
    assert attrs["target"] == "bitfx.bit_linear.default" and attrs["module"] == "0"
    assert attrs["shape"] == [2, 8, 32]  # symbolic batch/sequence dims read from their hints
    assert all(all(isinstance(x, int) for x in a["shape"]) for _, a in d.after.nodes(data=True) if a["shape"])


def test_shape_prop_fills_in_graphs_without_meta():
    gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()))
    shapes = concrete_shapes(gm, (torch.randn(5, 4),))  # no meta["val"]: ShapeProp runs the example
    assert (shapes["input_1"], shapes["_0"], shapes["_1"]) == ([5, 4], [5, 3], [5, 3])


def _graph(build):
    g = fx.Graph()
    build(g)
    return g


def test_pass_changes_on_hand_built_graphs():
    def before(g):
        x = g.placeholder("x")
        r = g.call_function(torch.relu, (x,))
        dead = g.call_function(torch.neg, (x,))  # noqa: F841
        g.output(g.call_function(torch.add, (r, x)))

    def after(g):
        x = g.placeholder("x")
        p = g.get_attr("scale")
        s = g.call_function(torch.mul, (x, p))
        g.output(g.call_function(torch.add, (s, x)))

    ch = pass_changes("p", _graph(before), _graph(after))
    assert (ch.removed, ch.added) == (["relu", "neg"], ["scale", "mul"])
    (change,) = ch.changes
    assert (change.replacement, change.removed, change.support) == ("mul", ["relu"], ["scale"])
    assert ch.dropped == ["neg"]


def test_pass_changes_nothing_changed():
    def g(graph):
        graph.output(graph.call_function(torch.relu, (graph.placeholder("x"),)))

    ch = pass_changes("p", _graph(g), _graph(g))
    assert ch.removed == ch.added == ch.changes == ch.dropped == []
