"""BiT's unsigned {0, α} activations (act_mode "unsigned", arXiv 2205.13016 Eq. 4-5): the formula and
its straight-through gradient against an independent computation, the kernels equal to the reference
on the integer sums (including values at the α/2 threshold), the ``bit`` preset giving every linear
after a ReLU unsigned activations, and a model's own BiT unsigned fake-quant layer recognised."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bitfx
from bitfx import BinarizeConfig
from bitfx.codegen import runtime
from bitfx.ops import BIT_LINEAR, methods
from bitfx.ops.linear import bit_linear_reference, quantize_weight
from bitfx.passes.context import module_of
from bitfx.passes.recognize_fake_quant import OWN
from targets.target_tools import needs_gnu, needs_qemu

G = torch.Generator().manual_seed(0)


def np_unsigned(x, move, alpha):
    """The paper's forward, in numpy: α·clip(round((x + move)/α), 0, 1) (numpy rounds half to even)."""
    u = (x + move).astype(np.float32)
    return alpha * np.clip(np.round(u / np.float32(alpha)), 0, 1)


def test_forward_is_the_papers_formula():
    x = torch.randn(4, 33, generator=G) * 2
    move = torch.randn(33, generator=G) * 0.1
    alpha = torch.tensor(0.8)
    codes, scale, value = methods.act_method("unsigned").quantize(x, move, alpha, 1)
    expected = np_unsigned(x.numpy(), move.numpy(), np.float32(0.8))
    np.testing.assert_array_equal(value.detach().numpy(), expected)
    assert set(codes.unique().tolist()) <= {0.0, 1.0} and float(scale) == pytest.approx(0.8)
    # the threshold: u/α = 0.5 rounds (half to even) to 0, just above it to 1; NaN gives 0
    edge = torch.tensor([0.4, np.nextafter(np.float32(0.4), np.float32(1)), 0.0, -3.0, 9.0, float("nan")])
    codes, _, _ = methods.act_method("unsigned").quantize(edge, None, torch.tensor(0.8), 1)
    assert codes.tolist() == [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]


def test_straight_through_gradient_is_the_papers():
    """∂Qa/∂u = 1[0 <= u/α <= 1]; ∂Qa/∂α = round(u/α) - u/α inside, 1 above, 0 below (Eq. 5)."""
    x = torch.tensor([-0.5, 0.1, 0.3, 0.5, 0.7, 1.5, 3.0], requires_grad=True)
    move = torch.zeros(7, requires_grad=True)
    alpha = torch.tensor(1.0, requires_grad=True)
    upstream = torch.arange(1.0, 8.0)
    _, _, value = methods.act_method("unsigned").quantize(x, move, alpha, 1)
    (value * upstream).sum().backward()
    r = x.detach().numpy() / 1.0
    inside = (r >= 0) & (r <= 1)
    np.testing.assert_allclose(x.grad.numpy(), upstream.numpy() * inside)
    np.testing.assert_allclose(move.grad.numpy(), upstream.numpy() * inside)
    d_alpha = np.where(inside, np.round(r) - r, np.where(r > 1, 1.0, 0.0))
    assert float(alpha.grad) == pytest.approx(float((upstream.numpy() * d_alpha).sum()), rel=1e-6)


def test_without_alpha_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match="act_scale='learnable'"):
        methods.act_method("unsigned").quantize(torch.randn(3), None, None, 1)
    with pytest.raises(ValueError, match="act_nonneg='unsigned' needs act_scale='learnable'"):
        BinarizeConfig.preset("bit", act_scale="token")
    with pytest.raises(ValueError, match="act_nonneg='float'"):
        BinarizeConfig(act_nonneg="float")


@pytest.mark.parametrize("weight_mode", ["sign_tensor", "ternary"])
@pytest.mark.parametrize("with_move", [False, True])
def test_kernels_equal_the_reference_on_the_integer_sums(weight_mode, with_move):
    K, N, alpha = 130, 24, torch.tensor(0.75)  # K not a multiple of 64: tail bits
    w = torch.randn(N, K, generator=G)
    x = torch.relu(torch.randn(9, K, generator=G))
    move = torch.randn(K, generator=G) * 0.1 if with_move else None
    # values at the threshold: u = α/2 (code 0) and one float above it (code 1); exactly so without move
    half = np.float32(0.375)
    x[0, :8] = torch.tensor(half) - (0 if move is None else move[:8])
    x[1, :8] = torch.from_numpy(np.nextafter(half, np.float32(1)) * np.ones(8, np.float32)) - (
        0 if move is None else move[:8])
    codes_w, _, _ = quantize_weight(w, None, weight_mode)
    packed = runtime.pack_weight(codes_w.to(torch.int8), ternary=weight_mode == "ternary")
    acc, row_scale = runtime.bit_linear_int(x, packed, act="unsigned", bits=1, move=move, alpha=alpha)
    a_codes, _, _ = methods.act_method("unsigned").quantize(x, move, alpha, 1)
    expected = (a_codes.double() @ codes_w.double().t()).to(torch.int32)  # independent: exact integers
    assert torch.equal(acc, expected)
    assert torch.equal(row_scale, torch.full((9,), 0.75))


def test_plan_and_bit_linear_equal_the_reference_op():
    K, N = 96, 40
    w, b = torch.randn(N, K, generator=G), torch.randn(N, generator=G)
    x = torch.relu(torch.randn(2, 7, K, generator=G))
    move, alpha = torch.randn(K, generator=G) * 0.05, torch.tensor(0.6)
    ref = bit_linear_reference(x, w, b, None, move, alpha, "sign_tensor", "unsigned", 1)
    codes_w, col, _ = quantize_weight(w, None, "sign_tensor")
    packed = runtime.pack_weight(codes_w.to(torch.int8), ternary=False)
    plan = runtime.LinearPlan(packed, act="unsigned", bits=1, move=move, alpha=alpha, col_scale=col, bias=b)
    direct = runtime.bit_linear(x, packed, act="unsigned", move=move, alpha=alpha, col_scale=col, bias=b)
    torch.testing.assert_close(plan(x), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(direct, ref, rtol=1e-6, atol=1e-6)


def test_kernel_op_with_a_parameter_view_equals_the_reference():
    """``bitfx_kernels.bit_linear`` (what a compiled graph calls; C++ dispatch falls back for this mode)."""
    K, N = 70, 24
    w = nn.Parameter(torch.randn(3 * N, K, generator=G))
    x, alpha = torch.relu(torch.randn(5, K, generator=G)), torch.tensor(0.5)
    move = torch.randn(K, generator=G) * 0.05
    part = w[N:2 * N]  # a part of a packed projection: the parameter plus its view
    with torch.no_grad():
        y = torch.ops.bitfx_kernels.bit_linear(x, w, None, None, move, alpha, "sign_tensor", "unsigned", 1, True,
                                               list(part.shape), list(part.stride()), part.storage_offset())
        ref = bit_linear_reference(x, part, None, None, move, alpha, "sign_tensor", "unsigned", 1)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
@pytest.mark.parametrize("M", [1, 37])  # CUDA cores, tensor cores
def test_cuda_integer_sums_equal_the_reference(M):
    K, N, alpha = 600, 200, torch.tensor(0.7)
    x = torch.relu(torch.randn(M, K, generator=G))
    move, w = torch.randn(K, generator=G) * 0.1, torch.randn(N, K, generator=G)
    codes_w, col, _ = quantize_weight(w, None, "sign_tensor")
    packed = runtime.pack_weight(codes_w.to(torch.int8).cuda(), ternary=False)
    acc, rs = runtime.bit_linear_int(x.cuda(), packed, act="unsigned", move=move.cuda(), alpha=alpha.cuda())
    a_codes, _, _ = methods.act_method("unsigned").quantize(x, move, alpha, 1)
    assert torch.equal(acc.cpu(), (a_codes.double() @ codes_w.double().t()).to(torch.int32))
    plan = runtime.LinearPlan(packed, act="unsigned", move=move, alpha=alpha, col_scale=col.cuda())
    ref = bit_linear_reference(x, w, None, None, move, alpha, "sign_tensor", "unsigned", 1)
    torch.testing.assert_close(plan(x.cuda()).cpu(), ref, rtol=1e-5, atol=1e-5)


class ReluMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(48, 96), nn.Linear(96, 80), nn.Linear(80, 16)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(self.drop(F.relu(self.fc1(x))))))


def test_bit_preset_binarizes_every_linear_of_a_relu_mlp():
    torch.manual_seed(0)
    model, x = ReluMLP().eval(), torch.randn(3, 5, 48)
    gm = bitfx.binarize(model, (x,), {"preset": "bit", "kernels": "reference"})
    modes = [n.args[7] for n in gm.graph.nodes if n.target == BIT_LINEAR]
    assert modes == ["sign", "unsigned", "unsigned"]  # fc1 reads x; fc2, fc3 read ReLU outputs
    assert not gm.bitfx_report.skips and gm.bitfx_report.count("linear", "bit_linear") == 3
    other = bitfx.binarize(model, (x,), {"preset": "bipft", "kernels": "reference"})
    assert {n.args[7] for n in other.graph.nodes if n.target == BIT_LINEAR} == {"sign"}  # only "bit" opts in
    with torch.no_grad():
        ref = gm(x)
        torch._dynamo.reset()
        fast = torch.compile(model, backend="bitfx", options={"config": "bit"})(x)  # TVM kernels
        torch._dynamo.reset()
    assert float((fast - ref).norm() / ref.norm()) <= 1e-5
    d = bitfx.diff(model, (x,), "bit")  # the cost report counts them: 1 BOP per binary MAC, M = 15 tokens
    assert d.totals["rewritten"]["linear"] == 3
    assert d.totals["bops_after"] == 15 * (48 * 96 + 96 * 80 + 80 * 16)
    # every unsigned layer computes α·{0, 1} codes of its own input: check fc2 by hand
    h = F.relu(model.fc1(x)).detach()  # not the binarized fc1: fc2 alone, on a float input
    (fc2,) = [n for n in gm.graph.nodes if n.target == BIT_LINEAR and n.args[7] == "unsigned"][:1]
    alpha, move = gm.get_parameter(fc2.args[5].target).detach(), gm.get_parameter(fc2.args[4].target).detach()
    codes = np.clip(np.round((h + move).numpy() / np.float32(alpha)), 0, 1)
    wc = np.where(model.fc2.weight.detach().numpy() - model.fc2.weight.detach().numpy().mean() < 0, -1.0, 1.0)
    scale = float(alpha) * float(model.fc2.weight.detach().abs().mean())
    expected = (codes @ wc.T) * scale + model.fc2.bias.detach().numpy()
    y = torch.ops.bitfx.bit_linear(h, model.fc2.weight.detach(), model.fc2.bias.detach(), None, move, alpha,
                                   "sign_tensor", "unsigned", 1)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-5, atol=1e-5)


class BiTUnsignedLinear(nn.Linear):
    """A BiT-style fake-quant linear after a ReLU, as its author writes it: unsigned elastic activations
    α·clip(round((x + move)/α), 0, 1) through the detach STE, BWN sign weights (the paper's formulas)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__(d_in, d_out)
        self.alpha = nn.Parameter(torch.tensor(0.9))
        self.move = nn.Parameter(torch.randn(d_in) * 0.05)

    def forward(self, x):
        u = x + self.move
        q = self.alpha * torch.clamp(torch.round(u / self.alpha), 0, 1)
        xq = u + (q - u).detach()
        w = self.weight
        wq = w + ((w - w.mean()).sign() * w.abs().mean() - w).detach()
        return F.linear(xq, wq, self.bias)


def test_own_bit_unsigned_fake_quant_layer_is_recognised():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), BiTUnsignedLinear(64, 16)).eval()
    x = torch.randn(4, 32)
    gm = bitfx.binarize(model, (x,), {"preset": "bipft", "kernels": "reference"})
    (node,) = [n for n in gm.graph.nodes if n.target == BIT_LINEAR]
    assert node.args[7] == "unsigned" and node.meta[OWN] == "unsigned1_alpha_move/sign_tensor"
    assert [s.module for s in gm.bitfx_report.skips] == ["0"]  # the author's float layer stays float
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


@needs_gnu
@needs_qemu
def test_unsigned_layers_export_for_arm64_with_the_hosts_numbers(tmp_path):
    """The device export lowers unsigned layers as sign kernels with the same codes (bitfx.export's
    _unsigned_as_sign); the library under qemu gives the host model's outputs."""
    from bitfx.export import _fold_parameter_expressions, _unsigned_as_sign, export, verify
    from bitfx.inputs import flat_module
    from bitfx.targets import emulate

    try:
        emulate.fetch_arm64_runtime()
    except (RuntimeError, FileNotFoundError) as err:
        pytest.skip(f"aarch64 TVM runtime unavailable (offline?): {err}")
    torch.manual_seed(0)
    model, x = ReluMLP().eval(), torch.randn(3, 5, 48)
    gm = bitfx.binarize(model, (x,), {"preset": "bit", "kernels": "reference"})
    with torch.no_grad():  # trained-looking α and move
        for name, p in gm.named_parameters():
            if "alpha" in name:
                p.fill_(0.9)
            elif "move" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        expected = gm(x)
        flat = _unsigned_as_sign(_fold_parameter_expressions(flat_module(gm)))
        assert [n.args[7] for n in flat.graph.nodes if n.target == BIT_LINEAR] == ["sign"] * 3
        host = flat(x)
    host = host[0] if isinstance(host, (tuple, list)) else host
    torch.testing.assert_close(host, expected, rtol=1e-5, atol=1e-5)
    path = export(gm, (x,), "linux-arm64", tmp_path / "relu_mlp.so", bundle=False)
    assert verify(path, (x,), expected, "linux-arm64") <= 1e-4 * max(1.0, float(expected.abs().max()))


def test_decoder_layer_ffn_after_relu_is_unsigned_and_compile_agrees():
    """nn.TransformerDecoderLayer (ReLU FFN) under "bit": q, k, v, out of self and cross attention and
    linear1 take sign activations, linear2 (after ReLU and dropout) unsigned; TVM kernels == reference."""
    from hf_zoo import ZOO

    model, args, _ = ZOO["decoder_layer"].make()
    gm = bitfx.binarize(model, args, {"preset": "bit", "kernels": "reference"})
    modes = {(module_of(n), n.name): n.args[7] for n in gm.graph.nodes if n.target == BIT_LINEAR}
    assert sorted(modes.values()) == ["sign"] * 9 + ["unsigned"]
    assert [m for (m, _), mode in modes.items() if mode == "unsigned"] == ["layer.linear2"]
    with torch.no_grad():
        ref = gm(*args)
        torch._dynamo.reset()
        fast = torch.compile(model, backend="bitfx", options={"config": "bit"})(*args)
        torch._dynamo.reset()
    assert float((fast - ref).norm() / ref.norm()) <= 1e-5
