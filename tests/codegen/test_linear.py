"""bit_linear / bit_linear_int: integer contract exact, epilogue to float rounding, shapes and dtypes."""

import pytest
import torch

from bitfx.codegen import runtime

from codegen_reference import absmax_codes, int_matmul, sign, weights

# (leading dims, K, N): M=1, ragged M and N tiles, odd K, K % 64 != 0, large K, batch dims.
SHAPES = [((1,), 64, 32), ((3,), 1, 5), ((7,), 100, 45), ((2, 5), 130, 33), ((13,), 768, 96), ((6,), 3072, 40)]
QUANT = [("sign", 1, False), ("sign", 1, True), ("absmax", 8, False), ("absmax", 2, True), ("absmax", 5, False)]


def _codes(x2, act, bits, move):
    if act == "sign":
        u = x2 + move if move is not None else x2
        return sign(u), u.abs().mean(-1)
    return absmax_codes(x2, bits)


@pytest.mark.parametrize("act,bits,ternary", QUANT)
@pytest.mark.parametrize("lead,K,N", SHAPES)
def test_integer_contract_is_exact(lead, K, N, act, bits, ternary):
    seed = K * 31 + N
    w = weights(N, K, ternary, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g) * 2
    move = torch.randn(K, generator=g) * 0.1 if act == "sign" else None
    acc, row_scale = runtime.bit_linear_int(x, runtime.pack_weight(w, ternary), act=act, bits=bits, move=move)
    codes, scale = _codes(x.reshape(-1, K), act, bits, move)
    assert acc.dtype == torch.int32 and acc.shape == (x.numel() // K, N)
    assert torch.equal(acc, int_matmul(codes, w))
    torch.testing.assert_close(row_scale, scale.float(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("act,bits,ternary", QUANT[:3])
def test_epilogue_matches_reference_order(act, bits, ternary):
    K, N = 130, 45
    w = weights(N, K, ternary, 5)
    g = torch.Generator().manual_seed(5)
    x, cs, bias = torch.randn(2, 3, K, generator=g), torch.rand(N, generator=g), torch.randn(N, generator=g)
    packed = runtime.pack_weight(w, ternary)
    y = runtime.bit_linear(x, packed, act=act, bits=bits, col_scale=cs, bias=bias)
    acc, rs = runtime.bit_linear_int(x, packed, act=act, bits=bits)
    ref = (acc.float() * rs[:, None]) * cs + bias
    assert y.shape == (2, 3, N) and y.dtype == torch.float32
    torch.testing.assert_close(y.reshape(-1, N), ref, rtol=1e-5, atol=1e-6)
    no_bias = runtime.bit_linear(x, packed, act=act, bits=bits, col_scale=cs)
    assert torch.equal(no_bias.reshape(-1, N), (acc.float() * rs[:, None]) * cs)  # no add: no rounding doubt


def test_alpha_scalar_col_scale_noncontiguous_and_half():
    K, N = 100, 45
    w = weights(N, K, False, 9)
    packed = runtime.pack_weight(w, False)
    g = torch.Generator().manual_seed(9)
    base = torch.randn(K, 8, generator=g)
    x = base.t()[::2]  # [4, K], non-contiguous
    assert not x.is_contiguous()
    alpha, gamma = torch.tensor([0.7]), torch.tensor(1.5)
    y = runtime.bit_linear(x, packed, alpha=alpha, col_scale=gamma)
    ref = (int_matmul(sign(x), w).float() * 0.7) * 1.5
    assert torch.equal(y, ref)
    y16 = runtime.bit_linear(x.half(), packed, alpha=alpha, col_scale=gamma)
    assert y16.dtype == torch.float16
    torch.testing.assert_close(y16.float(), (int_matmul(sign(x.half().float()), w).float() * 0.7) * 1.5,
                               rtol=1e-3, atol=1e-2)


def test_one_kernel_serves_every_token_count():
    from bitfx.codegen import build

    w = weights(40, 200, False, 2)
    packed = runtime.pack_weight(w, False)
    runtime.bit_linear_int(torch.randn(3, 200), packed)
    before = build.STATS["compiled"] + build.STATS["loaded"]
    for m in (1, 2, 5, 17, 64):
        x = torch.randn(m, 200)
        assert torch.equal(runtime.bit_linear_int(x, packed)[0], int_matmul(sign(x), w))
    assert build.STATS["compiled"] + build.STATS["loaded"] == before


def test_bad_arguments_are_named():
    packed = runtime.pack_weight(weights(8, 64, False, 0), False)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="bits=4"):
        runtime.bit_linear(x, packed, act="sign", bits=4, col_scale=torch.ones(8))
    with pytest.raises(ValueError, match="bits=9"):
        runtime.bit_linear(x, packed, act="absmax", bits=9, col_scale=torch.ones(8))
    with pytest.raises(ValueError, match="'tanh'"):
        runtime.bit_linear(x, packed, act="tanh", col_scale=torch.ones(8))
    with pytest.raises(ValueError, match="K=64"):
        runtime.bit_linear(torch.randn(2, 65), packed, col_scale=torch.ones(8))
    with pytest.raises(TypeError, match="int64"):
        runtime.bit_linear(x.long(), packed, col_scale=torch.ones(8))
    with pytest.raises(ValueError, match="col_scale must have 1 or 8"):
        runtime.bit_linear(x, packed, col_scale=torch.ones(3))


def test_single_thread_variant_agrees():
    w = weights(45, 130, True, 4)
    packed = runtime.pack_weight(w, True)
    x, cs = torch.randn(9, 130), torch.rand(45)
    assert torch.equal(runtime.bit_linear(x, packed, col_scale=cs, threads=1),
                       runtime.bit_linear(x, packed, col_scale=cs))


@pytest.mark.parametrize("act,bits,ternary,use_alpha", [("sign", 1, False, False), ("sign", 1, True, True),
                                                        ("absmax", 8, False, False), ("absmax", 4, True, False)])
@pytest.mark.parametrize("M", [1, 7])
def test_linear_plan_equals_bit_linear(act, bits, ternary, use_alpha, M):
    """The prepared per-layer plan computes exactly what the one-shot `bit_linear` computes."""
    g = torch.Generator().manual_seed(M + bits)
    K, N = 130, 45
    x = torch.randn(2, M, K, generator=g)
    w = torch.randint(-1 if ternary else 0, 2, (N, K), generator=g)
    w = w if ternary else w * 2 - 1
    packed = runtime.pack_weight(w.to(torch.int8), ternary=ternary)
    kw = dict(act=act, bits=bits, move=torch.randn(K, generator=g) * 0.1,
              alpha=torch.rand(1, generator=g) if use_alpha else None,
              col_scale=torch.rand(N, generator=g), bias=torch.randn(N, generator=g))
    plan = runtime.LinearPlan(packed, **kw)
    assert torch.equal(plan(x), runtime.bit_linear(x, packed, **kw))
