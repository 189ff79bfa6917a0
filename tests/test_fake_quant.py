"""recognize_fake_quant: models that carry their own binarizer (BitNet, BitNet b1.58, BiT/BiPFT-style
fake-quant linears written from the papers' formulas in fake_quant_models.py) become bit_linear with
the model's own numbers, on the reference and on the kernels; the author's other layers stay float."""
import pytest
import torch
import torch.fx as fx

import bitfx
import bitfx.backend
from bitfx import BinarizeConfig
from bitfx.ops import BIT_LINEAR
from bitfx.passes import PassContext
from bitfx.passes.binarize_linear import binarize_linear
from bitfx.passes.recognize_fake_quant import OWN, recognize_fake_quant
from fake_quant_models import BitLinear, BitLinear158, BitNetLM, QuantizeLinear, randomize, ste

aten = torch.ops.aten
# layer class -> (weight_mode, act_mode, act_bits, uses the model's α and move)
METHODS = {
    BitLinear: ("sign_tensor", "absmax", 8, False),
    BitLinear158: ("ternary", "absmax", 8, False),
    QuantizeLinear: ("sign_tensor", "sign", 1, True),
}
TOKENS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def rel_err(out, ref):
    return ((out - ref).abs().max() / ref.abs().max()).item()


def bit_linears(gm):
    return [n for n in gm.graph.nodes if n.target == BIT_LINEAR]


@pytest.mark.parametrize("layer", list(METHODS), ids=lambda c: c.__name__)
def test_own_binarizer_becomes_bit_linear_with_the_models_numbers(layer):
    model = randomize(BitNetLM(layer, depth=1))
    gm = bitfx.binarize(model, (TOKENS,), {"preset": "bipft", "kernels": "reference"})
    nodes = bit_linears(gm)
    weight_mode, act_mode, bits, own_params = METHODS[layer]
    assert len(nodes) == 6 and all(n.meta[OWN] for n in nodes)  # q, k, v, o, up, down
    assert {tuple(n.args[6:9]) for n in nodes} == {(weight_mode, act_mode, bits)}
    # BiT-style: the model's own α and per-channel move are the op's (move folded into the kernel)
    assert all((n.args[4] is not None and n.args[5] is not None) == own_params for n in nodes)
    report = gm.bitfx_report
    assert report.count("linear", "bit_linear") == 6 and report.count("attention", "bit_attention") == 0
    kept = {s.module: s.reason for s in report.skips}
    assert kept["output"] == "config" and set(kept.values()) == {"config"}, report.summary()
    with torch.no_grad():  # absmax: code flips across layers possible (see the kernels test); per layer 1e-5
        assert rel_err(gm(TOKENS), model(TOKENS)) < (1e-5 if act_mode == "sign" else 2e-2)


def test_calibrate_leaves_the_models_alpha_and_move():
    model = randomize(BitNetLM(QuantizeLinear, depth=1))
    gm = bitfx.binarize(model, (TOKENS,), {"preset": "bipft", "kernels": "reference"})
    bitfx.calibrate(gm, [(TOKENS,)])
    layer = model.blocks[0].q
    (node,) = [n for n in bit_linears(gm) if "blocks.0.q" in str(n.meta.get("nn_module_stack"))]
    assert torch.equal(gm.get_parameter(node.args[5].target), layer.alpha)
    assert torch.equal(gm.get_parameter(node.args[4].target), layer.move)


@pytest.mark.parametrize("layer", [QuantizeLinear, pytest.param(BitLinear, marks=pytest.mark.slow)],
                         ids=lambda c: c.__name__)
def test_compiled_on_kernels_matches_the_model(layer):
    """End to end on the TVM kernels. Sign activations (BiT-style) are far from any rounding
    boundary: float rounding. 8-bit absmax (BitNet): a last-ulp difference of one layer's output
    (exact integer sums vs the model's float matmul) can flip a code of the next quantizer, so the
    floor is one code step; the per-layer contract is the test below."""
    model = randomize(BitNetLM(layer, depth=1))
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="bitfx")(TOKENS)
        ref = model(TOKENS)
    report = bitfx.backend.REPORTS[-1]
    assert report.count("linear", "bit_linear") == 6, report.summary()
    assert rel_err(out, ref) < (1e-4 if layer is QuantizeLinear else 2e-2)


@pytest.mark.parametrize("layer", [BitLinear, BitLinear158], ids=lambda c: c.__name__)
def test_one_layer_on_kernels_equals_the_models_layer(layer):
    torch.manual_seed(0)
    model = torch.nn.Sequential(layer(256, 192)).eval()
    x = torch.randn(2, 16, 256)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="bitfx")(x)
        ref = model(x)
    assert bitfx.backend.REPORTS[-1].count("linear", "bit_linear") == 1
    assert rel_err(out, ref) < 1e-5


def test_extend_binarizes_the_rest_and_ignore_leaves_the_fake_quant_float():
    model = randomize(BitNetLM(BitLinear, depth=1))
    extend = bitfx.binarize(model, (TOKENS,), {"preset": "bipft", "own_binarizer": "extend",
                                               "keep": (), "kernels": "reference"})
    assert len(bit_linears(extend)) == 7  # 6 own + the output head
    assert extend.bitfx_report.count("attention", "bit_attention") == 1
    ignore = bitfx.binarize(model, (TOKENS,), {"preset": "bipft", "own_binarizer": "ignore", "keep": ()})
    assert len(bit_linears(ignore)) == 1  # the head; the fake-quant linears stay as written
    details = [s.detail for s in ignore.bitfx_report.skips if s.kind == "linear"]
    assert len(details) == 6 and all("computed from parameter" in d and "by add" in d for d in details), details


def test_invalid_own_binarizer_is_refused():
    with pytest.raises(ValueError, match="own_binarizer='all'.*'only', 'extend', 'ignore'"):
        BinarizeConfig(own_binarizer="all")


# -- graphs built by hand: a fake-quant the pass must not take ------------------------------------
def fake_quant_linear(weight_quant, act_quant=None):
    """linear(ste(x, act_quant(x)) or x, ste(W, weight_quant(W))) exported, W a parameter."""
    class Layer(torch.nn.Linear):
        def forward(self, x):
            xq = x if act_quant is None else ste(x, act_quant(x))
            return torch.nn.functional.linear(xq, ste(self.weight, weight_quant(self.weight)))

    torch.manual_seed(0)
    model = Layer(16, 8, bias=False).eval()
    x = torch.randn(3, 16)
    gm = torch.export.export(model, (x,), strict=False).module()
    return gm, x


def run(gm, x, config="bipft"):
    ctx = PassContext(BinarizeConfig.coerce(config), example_inputs=(x,))
    before = gm(x)
    gm = binarize_linear(recognize_fake_quant(gm, ctx), ctx)
    gm.graph.lint()
    gm.recompile()
    return before, gm(x), ctx


def two_bit_weights(w):  # 4 levels: not a bitfx method
    s = w.abs().mean()
    return (w / s).round().clamp(-2, 1) * s


def test_unknown_weight_quantizer_is_reported_and_left_whole():
    gm, x = fake_quant_linear(two_bit_weights, lambda t: t.sign() * t.abs().mean(-1, keepdim=True))
    before, after, ctx = run(gm, x)
    assert not bit_linears(gm) and aten.linear.default in {n.target for n in gm.graph.nodes}
    (skip,) = ctx.report.skips  # once, by recognize_fake_quant (binarize_linear does not repeat it)
    assert (skip.pass_name, skip.reason) == ("recognize_fake_quant", "unrecognised")
    assert "weight quantizer matches none of sign_channel, sign_tensor, ternary" in skip.detail
    torch.testing.assert_close(after, before)


def test_float_activations_are_reported():
    gm, x = fake_quant_linear(lambda w: torch.sign(w - w.mean()) * w.abs().mean())
    before, after, ctx = run(gm, x)
    assert not bit_linears(gm)
    (skip,) = ctx.report.skips
    assert "fake-quant weights with float activations" in skip.detail
    torch.testing.assert_close(after, before)


def test_xnor_sign_activations_per_token_are_recognised():
    """α = mean|x| per token (XNOR-Net) with per-channel weights sign(W - row mean)·row mean|W|."""
    def per_channel(w):
        return torch.sign(w - w.mean(1, keepdim=True)) * w.abs().mean(1, keepdim=True)

    gm, x = fake_quant_linear(per_channel, lambda t: torch.sign(t) * t.abs().mean(-1, keepdim=True))
    before, after, ctx = run(gm, x)
    (node,) = bit_linears(gm)
    assert node.args[3:9] == (None, None, None, "sign_channel", "sign", 1) and node.meta[OWN] == "sign1/sign_channel"
    assert [n.op for n in gm.graph.nodes].count("call_function") == 1  # the quantizer subgraphs are gone
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("layer", [BitLinear158, QuantizeLinear], ids=lambda c: c.__name__)
def test_own_binarizer_exports_for_arm64_and_verifies_under_qemu(layer, tmp_path):
    """The recognised layers are bit_linear on the device too; verify compares the library with the
    binarized model (== the model's own fake-quant output) under qemu (raises VerifyError otherwise)."""
    import shutil

    if shutil.which("aarch64-linux-gnu-g++") is None or shutil.which("qemu-aarch64") is None:
        pytest.skip("aarch64-linux-gnu-g++ / qemu-aarch64 missing (Debian g++-aarch64-linux-gnu, qemu-user)")
    model = randomize(BitNetLM(layer, depth=1))
    path = bitfx.export(model, (TOKENS,), target="linux-arm64", path=tmp_path / "model.so", verify=True,
                        bundle=False)
    assert path.stat().st_size > 0


def test_matmul_spelling_of_a_fake_quant_linear_is_recognised():
    """``x_q @ w_q.t() + b`` (no F.linear) is canonicalized to a linear and recognised the same way."""
    class Layer(torch.nn.Linear):
        def forward(self, x):
            w = self.weight
            xq = ste(x, torch.sign(x) * x.abs().mean(-1, keepdim=True))
            return xq @ ste(w, torch.sign(w - w.mean()) * w.abs().mean()).t() + self.bias

    torch.manual_seed(0)
    model = Layer(16, 8).eval()
    x = torch.randn(3, 16)
    gm = bitfx.binarize(model, (x,), {"preset": "bipft", "kernels": "reference"})
    (node,) = bit_linears(gm)
    assert node.meta[OWN] == "sign1/sign_tensor" and node.args[2] is not None  # the bias is the op's
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_recognised_layers_train_through_straight_through_gradients():
    model = randomize(BitNetLM(QuantizeLinear, depth=1))
    gm = bitfx.binarize(model, (TOKENS,), {"preset": "bipft", "kernels": "reference"})
    gm(TOKENS).float().pow(2).mean().backward()  # (the graph is the eval graph; its ops have STE autograd)
    (node,) = [n for n in bit_linears(gm) if "blocks.0.q" in str(n.meta.get("nn_module_stack"))]
    weight, move, alpha = (gm.get_parameter(node.args[i].target) for i in (1, 4, 5))
    for p in (weight, move, alpha):  # W: identity STE; move: 1[|u| <= α]; α: sign(u) - (u/α)·1[|u| <= α]
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
