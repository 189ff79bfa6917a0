"""The `te.compute` definitions and the host loop nests agree, and both meet the NumPy contract."""

import numpy as np
import pytest
import torch

from bitfx.codegen.build import kernel

from codegen_reference import as_numpy_u64, pack_bits

K, N, M = 100, 45, 6


def _both(op, inputs, outputs, **params):
    """Run the reference and the host kernel on the same inputs; return both output lists."""
    results = []
    for impl in ("reference", "host"):
        outs = [torch.empty_like(o) for o in outputs]
        kernel(op, impl=impl, **params)(*inputs, *outs)
        results.append(outs)
    return results


def _words(*shape, seed, k_major=False):
    """Random packed words with zero tail bits (as a packer leaves them); words on the last axis,
    or on the second-to-last when `k_major` (weights `[..., KW, N]`)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-2**62, 2**62, shape, generator=g, dtype=torch.int64)
    tail = (1 << (K % 64)) - 1
    if k_major:
        w[..., -1, :] &= tail
    else:
        w[..., -1] &= tail
    return w


def test_pack_rows_reference():
    x = torch.randn(M, K)
    x[0, :2] = torch.tensor([0.0, float("nan")])
    ref, host = _both("pack_rows", [x], [torch.empty(M, 2, dtype=torch.uint64), torch.empty(M)],
                      mode="sign", K=K, mean=True)
    np.testing.assert_array_equal(as_numpy_u64(ref[0]), pack_bits((~(x < 0)).numpy()))
    assert torch.equal(ref[0], host[0])
    torch.testing.assert_close(ref[1], host[1], rtol=1e-6, atol=0, equal_nan=True)  # NaN row: NaN scale


def test_absmax_reference():
    x = torch.randn(M, K) * 2
    ref, host = _both("absmax_planes", [x], [torch.empty(M, 4, 2, dtype=torch.uint64), torch.empty(M)],
                      K=K, bits=4)
    assert torch.equal(ref[0], host[0]) and torch.equal(ref[1], host[1])


@pytest.mark.parametrize("mode,planes", [("xnor", 1), ("xnor_ternary", 1), ("and", 3), ("and_ternary", 2)])
def test_gemm_reference(mode, planes):
    a = _words(M, *((planes,) if planes > 1 else ()), 2, seed=1).view(torch.uint64)
    w = _words(*((2,) if "ternary" in mode else ()), 2, N, seed=2, k_major=True)
    if "ternary" in mode:
        w[1] &= ~w[0]  # a code is +1 or -1, never both
    inputs = [a, w.view(torch.uint64)] + ([torch.randint(0, K, (N,), dtype=torch.int32)] if mode == "xnor_ternary" else [])
    ref, host = _both("gemm", inputs, [torch.empty(M, N, dtype=torch.int32)], mode=mode, K=K, N=N, planes=planes)
    assert torch.equal(ref[0], host[0])
    if mode == "xnor":
        bits = lambda t: np.unpackbits(as_numpy_u64(t).view(np.uint8), axis=-1, bitorder="little")[..., :K]  # noqa: E731
        sa, sw = bits(a).astype(np.int64) * 2 - 1, bits(w.view(torch.uint64).t().contiguous()).astype(np.int64) * 2 - 1
        np.testing.assert_array_equal(ref[0].numpy(), sa @ sw.T)


def test_gemm_float_epilogue_reference():
    a, w = _words(M, 2, seed=3).view(torch.uint64), _words(2, N, seed=4, k_major=True).view(torch.uint64)
    scales = [torch.rand(M), torch.rand(N), torch.randn(N)]
    ref, host = _both("gemm", [a, w, *scales], [torch.empty(M, N)], mode="xnor", K=K, N=N,
                      epilogue="float", bias=True)
    torch.testing.assert_close(ref[0], host[0], rtol=1e-6, atol=1e-6)


def test_attention_gemms_reference():
    q, k = _words(2, 5, 2, seed=5).view(torch.uint64), _words(2, 2, 37, seed=6, k_major=True).view(torch.uint64)
    ref, host = _both("gemm", [q, k], [torch.empty(2, 5, 37, dtype=torch.int32)], mode="xnor", K=K, N=None,
                      batched=True)
    assert torch.equal(ref[0], host[0])
    v = torch.randn(2, K, 40)
    ref, host = _both("pack_cols", [v], [torch.empty(2, 2, 40, dtype=torch.uint64)], K=None, N=40)
    assert torch.equal(ref[0], host[0])
    ref, host = _both("gemm", [q, ref[0]], [torch.empty(2, 5, 40, dtype=torch.int32)], mode="and", K=None,
                      N=40, signed=False, batched=True)
    assert torch.equal(ref[0], host[0])
