"""Packing kernels: bits, sign edge cases, per-row scales, weight codes."""

import numpy as np
import pytest
import torch

from bitfx.codegen import runtime
from bitfx.codegen.build import kernel

from codegen_reference import absmax_codes, as_numpy_u64, pack_bits, weights


def _pack_sign(x, move=None):
    K = x.shape[-1]
    out = torch.empty(x.shape[0], (K + 63) // 64, dtype=torch.uint64)
    rs = torch.empty(x.shape[0])
    args = [x] + ([move] if move is not None else []) + [out, rs]
    kernel("pack_rows", mode="sign", K=K, move=move is not None, mean=True)(*args)
    return out, rs


@pytest.mark.parametrize("K", [1, 63, 64, 100, 768])
def test_sign_pack_bits_and_mean(K):
    g = torch.Generator().manual_seed(K)
    x = torch.randn(5, K, generator=g)
    move = torch.randn(K, generator=g)
    out, rs = _pack_sign(x, move)
    u = x + move
    np.testing.assert_array_equal(as_numpy_u64(out), pack_bits((~(u < 0)).numpy()))
    torch.testing.assert_close(rs, u.abs().mean(-1), rtol=1e-5, atol=0)


def test_sign_of_zero_negative_zero_and_nan_is_plus_one():
    x = torch.tensor([[0.0, -0.0, float("nan"), -1.0, 1.0, -float("nan"), -1e-30, float("inf"), -float("inf")]])
    out, _ = _pack_sign(x)
    word = int(as_numpy_u64(out)[0, 0])
    assert [(word >> j) & 1 for j in range(9)] == [1, 1, 1, 0, 1, 1, 0, 1, 0]
    assert word >> 9 == 0, "tail bits must be zero"


@pytest.mark.parametrize("bits", [2, 3, 8])
@pytest.mark.parametrize("K", [70, 256])
def test_absmax_planes(bits, K):
    g = torch.Generator().manual_seed(bits * K)
    x = torch.randn(6, K, generator=g) * 3
    x[1] = 0.0  # gamma floor 1e-5
    x[2, :6] = torch.tensor([0.5, -0.5, 1.5, 2.5, -2.5, 3.0])  # ties round half to even
    planes = torch.empty(6, bits, (K + 63) // 64, dtype=torch.uint64)
    rs = torch.empty(6)
    kernel("absmax_planes", K=K, bits=bits)(x, planes, rs)
    codes, scale = absmax_codes(x, bits)
    two = codes.numpy() & ((1 << bits) - 1)
    ref = np.stack([pack_bits(((two >> b) & 1).astype(bool)) for b in range(bits)], axis=1)
    np.testing.assert_array_equal(as_numpy_u64(planes), ref)
    assert torch.equal(rs, scale)


@pytest.mark.parametrize("ternary", [False, True])
def test_pack_weight_is_k_major(ternary):
    """The K-major view `[P, KW, N]` of the packed weight (stored in panels: tests/codegen/test_panel_layout.py)."""
    w = weights(33, 130, ternary, seed=1)
    packed = runtime.pack_weight(w, ternary=ternary)
    assert (packed.N, packed.K, packed.ternary) == (33, 130, ternary)
    pos = pack_bits((w > 0).numpy()).T
    np.testing.assert_array_equal(as_numpy_u64(packed.kmajor()[0]), pos)
    if ternary:
        np.testing.assert_array_equal(as_numpy_u64(packed.kmajor()[1]), pack_bits((w < 0).numpy()).T)
        assert torch.equal(packed.nnz, (w != 0).sum(1).int())


def test_pack_weight_rejects_bad_codes():
    w = torch.tensor([[1, -1, 0, 2]], dtype=torch.int8)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        runtime.pack_weight(w, ternary=False)
    with pytest.raises(ValueError, match=r"\[2\]"):
        runtime.pack_weight(w, ternary=True)


def test_pack_cols_packs_down_columns():
    g = torch.Generator().manual_seed(3)
    v = torch.randn(2, 70, 40, generator=g)
    v[0, 0, 0] = 0.0
    out = torch.empty(2, 2, 40, dtype=torch.uint64)
    kernel("pack_cols", K=None, N=40)(v, out)
    ref = pack_bits((~(v < 0)).transpose(1, 2).numpy()).transpose(0, 2, 1)
    np.testing.assert_array_equal(as_numpy_u64(out), ref)
