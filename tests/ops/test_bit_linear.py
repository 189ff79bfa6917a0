"""bit_linear: the reference against an independent NumPy formulation, edge cases, STE, opcheck."""
import numpy as np
import pytest
import torch

import bitfx  # noqa: F401
from bitfx.ops import quantizers as q

OP = torch.ops.bitfx.bit_linear


def np_sign(u):
    return np.where(u < 0, -1.0, 1.0)


def np_bit_linear(x, w, b, w_mode, a_mode, bits, move=None, alpha=None):
    """Independent formulation: bit-plane / popcount arithmetic in NumPy integers."""
    x = x.astype(np.float32)
    if w_mode == "sign_channel":
        codes = np_sign(w - w.mean(axis=1, keepdims=True)).astype(np.int64)
        col = np.abs(w).mean(axis=1).astype(np.float32)
    elif w_mode == "sign_tensor":
        codes = np_sign(w - w.mean()).astype(np.int64)
        col = np.float32(np.abs(w).mean())
    else:
        gamma = np.float32(max(np.abs(w).mean(), 1e-5))
        codes = np.clip(np.round(w / gamma), -1, 1).astype(np.int64)
        col = gamma
    if a_mode == "sign":
        u = x if move is None else x + move
        a = np_sign(u).astype(np.int64)
        # XNOR-popcount: dot = K - 2 * popcount(pa XOR pw) with bits = (value == +1)
        pa, pw, nz = a > 0, codes > 0, codes != 0
        # ternary: dot = popcount(nz) - 2 * popcount(nz AND (pa XOR pw)); binary: nz is all ones
        # and this is the XNOR form K - 2 * popcount(pa XOR pw)
        acc = nz.sum(-1)[None, :] - 2 * (nz[None] & (pa[:, None, :] ^ pw[None, :, :])).sum(-1)
        row = np.abs(u).mean(-1).astype(np.float32) if alpha is None else np.float32(alpha)
    else:
        qp = 2 ** (bits - 1) - 1
        gamma = np.maximum(np.abs(x).max(-1), 1e-5).astype(np.float32)
        inv = (np.float32(qp) / gamma).astype(np.float32)
        a = np.clip(np.round(x * inv[:, None]), -qp - 1, qp).astype(np.int64)
        # bit-serial: two's complement planes, the top one weighted -2^(bits-1)
        unsigned = a & ((1 << bits) - 1)
        acc = np.zeros((x.shape[0], w.shape[0]), np.int64)
        for plane in range(bits):
            p = (unsigned >> plane) & 1
            weight = -(1 << plane) if plane == bits - 1 else (1 << plane)
            acc += weight * (p @ codes.T)
        row = (np.float32(1.0) / inv).astype(np.float32)
    rowv = row[:, None] if np.ndim(row) else row
    y = (acc.astype(np.float32) * rowv) * col
    return y + b if b is not None else y, acc


CASES = [
    ("sign_channel", "sign", 1),
    ("sign_tensor", "sign", 1),
    ("ternary", "sign", 1),
    ("sign_tensor", "absmax", 8),
    ("ternary", "absmax", 8),
    ("sign_channel", "absmax", 4),
]


@pytest.mark.parametrize("w_mode,a_mode,bits", CASES)
@pytest.mark.parametrize("m,k,n", [(1, 7, 3), (5, 64, 9), (3, 65, 4), (4, 200, 17)])
def test_reference_matches_numpy(w_mode, a_mode, bits, m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g)
    move = torch.randn(k, generator=g) * 0.1 if a_mode == "sign" else None
    y = OP(x, w, b, None, move, None, w_mode, a_mode, bits)
    expect, acc = np_bit_linear(x.numpy(), w.numpy(), b.numpy(), w_mode, a_mode, bits,
                                None if move is None else move.numpy())
    np.testing.assert_allclose(y.numpy(), expect, rtol=1e-5, atol=1e-5)
    # the integer part is exact
    w_codes, _, _ = q.WEIGHT_QUANTIZERS[w_mode](w)
    a_codes = q.act_sign(x, move)[0] if a_mode == "sign" else q.act_absmax(x, bits)[0]
    assert torch.equal((a_codes @ w_codes.t()).long(), torch.from_numpy(acc))


def test_learnable_alpha_matches_numpy():
    x, w = torch.randn(6, 33), torch.randn(5, 33)
    y = OP(x, w, None, None, None, torch.tensor(0.7), "sign_tensor", "sign", 1)
    expect, _ = np_bit_linear(x.numpy(), w.numpy(), None, "sign_tensor", "sign", 1, alpha=0.7)
    np.testing.assert_allclose(y.numpy(), expect, rtol=1e-5, atol=1e-5)


def test_sign_zero_and_nan_are_plus_one():
    u = torch.tensor([0.0, -0.0, float("nan"), -1e-30, 1e-30])
    assert q.sign(u).tolist() == [1.0, 1.0, 1.0, -1.0, 1.0]
    x = torch.zeros(2, 4)
    w = torch.ones(3, 4)
    # sign(0) = +1 for both activations and (centered, all-zero) weights -> acc = K
    codes, _, _ = q.act_sign(x)
    assert torch.all(codes == 1)
    y = OP(x, w, None, None, None, torch.tensor(1.0), "sign_tensor", "sign", 1)
    assert torch.all(y == 4.0)


def test_batched_and_noncontiguous_inputs():
    x = torch.randn(2, 7, 16).transpose(0, 1)  # [7, 2, 16], non-contiguous
    w = torch.randn(8, 16)
    y = OP(x, w, None, None, None, None, "sign_channel", "sign", 1)
    flat = OP(x.reshape(-1, 16), w, None, None, None, None, "sign_channel", "sign", 1)
    assert y.shape == (7, 2, 8)
    torch.testing.assert_close(y.reshape(-1, 8), flat)


def test_half_inputs_cast_in_and_out():
    x, w = torch.randn(3, 16), torch.randn(4, 16)
    y16 = OP(x.bfloat16(), w, None, None, None, None, "sign_tensor", "sign", 1)
    assert y16.dtype == torch.bfloat16
    y32 = OP(x.bfloat16().float(), w, None, None, None, None, "sign_tensor", "sign", 1)
    torch.testing.assert_close(y16.float(), y32, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("w_mode,a_mode,bits", CASES[:4])
def test_opcheck(w_mode, a_mode, bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, generator=g, requires_grad=True)
    w = torch.randn(8, 16, generator=g, requires_grad=True)
    b = torch.randn(8, generator=g, requires_grad=True)
    move = torch.zeros(16, requires_grad=True) if a_mode == "sign" else None
    alpha = torch.tensor(1.3, requires_grad=True) if a_mode == "sign" else None
    torch.library.opcheck(OP.default, (x, w, b, None, move, alpha, w_mode, a_mode, bits))


def test_ste_gradients_bit_elastic():
    """BiT: dQa/du = 1[|u| <= α], dQa/dα = sign(u) - (u/α)·1[|u| <= α]; identity to W."""
    x = torch.tensor([[0.5, -2.0, 0.1, 3.0]], requires_grad=True)
    w = torch.eye(4, requires_grad=True)
    alpha = torch.tensor(1.0, requires_grad=True)
    move = torch.zeros(4, requires_grad=True)
    # weights are the identity with sign_channel: codes = sign(I - 1/4) = 2I - 1, s = 1/4
    y = OP(x, w, None, None, move, alpha, "sign_channel", "sign", 1)
    y.sum().backward()
    gy = torch.ones(1, 4)
    codes = torch.where(torch.eye(4) - 0.25 < 0, -1.0, 1.0)
    grad_qa = gy @ (0.25 * codes)  # dL/dQa
    inside = (x.detach().abs() <= 1.0).float()
    torch.testing.assert_close(x.grad, grad_qa * inside)
    torch.testing.assert_close(move.grad, (grad_qa * inside).sum(0))
    u = x.detach()
    dq_dalpha = torch.sign(u) - u * inside
    torch.testing.assert_close(alpha.grad, (grad_qa * dq_dalpha).sum())
    qa = alpha.detach() * torch.where(u < 0, -1.0, 1.0)
    torch.testing.assert_close(w.grad, (gy.t() @ qa))  # identity STE through the weight binarizer


def test_ste_gradients_at_zero_alpha_are_finite():
    """An input that is all zeros calibrates α = 0 (elastic attention probabilities that all round to 0 give
    one): the forward is 0, and the gradients are those of the divisor floored at EPS, not 0/0 = NaN."""
    x = torch.zeros(2, 4, requires_grad=True)
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    alpha = torch.tensor(0.0, requires_grad=True)
    move = torch.zeros(4, requires_grad=True)
    y = OP(x, w, None, None, move, alpha, "sign_tensor", "sign", 1)
    assert torch.equal(y, torch.zeros(2, 3))
    y.sum().backward()
    codes = torch.where(w.detach() - w.detach().mean() < 0, -1.0, 1.0)
    grad_qa = torch.ones(2, 3) @ (w.detach().abs().mean() * codes)  # dL/dQa
    # below EPS the divisor is EPS: dQa/du = (α/EPS)·1[|u| <= EPS] = 0 at α = 0; dQa/dα = sign(u) = +1 at u = 0
    torch.testing.assert_close(x.grad, torch.zeros(2, 4))
    torch.testing.assert_close(move.grad, torch.zeros(4))
    torch.testing.assert_close(alpha.grad, grad_qa.sum())
    assert torch.isfinite(w.grad).all()


def test_ste_gradient_absmax_is_identity():
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(4, 8, requires_grad=True)
    OP(x, w, None, None, None, None, "ternary", "absmax", 8).sum().backward()
    _, gamma, _ = q.weight_ternary(w.detach())
    codes = torch.clamp(torch.round(w.detach() / gamma), -1, 1)
    torch.testing.assert_close(x.grad, torch.ones(3, 4) @ (gamma * codes))


def test_learnable_weight_scale_gradient():
    x = torch.randn(3, 8)
    w = torch.randn(4, 8)
    s = torch.ones(4, requires_grad=True)
    OP(x, w, None, s, None, None, "sign_channel", "sign", 1).sum().backward()
    a, row, _ = q.act_sign(x)
    codes = torch.where(w - w.mean(1, keepdim=True) < 0, -1.0, 1.0)
    expect = ((row[:, None] * a) @ codes.t()).sum(0)
    torch.testing.assert_close(s.grad, expect)


def test_bad_modes_are_named():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="weight_mode='binary'"):
        OP(x, w, None, None, None, None, "binary", "sign", 1)
    with pytest.raises(ValueError, match="act_bits=3 with act_mode='sign'"):
        OP(x, w, None, None, None, None, "sign_tensor", "sign", 3)
    with pytest.raises(ValueError, match="act_mode='relu'"):
        OP(x, w, None, None, None, None, "sign_tensor", "relu", 1)


@pytest.mark.parametrize("name", ["sign_channel", "sign_tensor", "ternary"])
def test_weight_value_without_autograd_equals_the_straight_through_one(name):
    """Without autograd the quantizers skip the identity term (all zeros): the value is bit for bit the same,
    and with autograd the weight still gets the identity gradient."""
    from bitfx.ops import quantizers as q

    quantize = q.WEIGHT_QUANTIZERS[name]
    w = torch.randn(48, 40, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    codes, scale, with_grad = quantize(w)
    with torch.no_grad():
        _, _, without = quantize(w)
    assert with_grad.requires_grad and not without.requires_grad
    assert torch.equal(with_grad.detach(), without)
    assert torch.equal(without, scale.reshape(-1, 1) * codes)
    with_grad.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
