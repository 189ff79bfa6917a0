"""The data layout of the CUDA tensor-core GEMM, checked without a GPU (DESIGN §4).

1. ``bitfx.targets.cuda``'s fragment index maps equal the PTX ISA's ``m16n8k256`` element maps
   (``tests/targets/cuda_model.py``, written from the ISA text) and cover each tile element once.
2. Replaying the kernel's loads, instructions (the ISA model of ``and.popc``) and epilogue in NumPy gives,
   bit for bit, the integer products of bitfx's reference ops, for every GEMM mode, with ragged M, N and K.
"""
import numpy as np
import pytest
import torch

from bitfx.ops import attention as A
from bitfx.ops.linear import bit_linear_reference, quantize_activation, quantize_weight
from bitfx.targets import cuda

from tests.codegen.codegen_reference import pack_bits
from tests.targets.cuda_model import isa_a, isa_b, isa_c, mma_and_popc, replay_gemm


def test_index_maps_are_the_isa_fragments():
    seen_a, seen_b, seen_c = set(), set(), set()
    for lane in range(32):
        for reg in range(4):
            row, word = cuda.a_fragment(lane, reg)
            for bit in range(32):
                assert (row, 32 * word + bit) == isa_a(lane, 32 * reg + bit)
                seen_a.add((row, 32 * word + bit))
            assert cuda.c_fragment(lane, reg) == isa_c(lane, reg)
            seen_c.add(cuda.c_fragment(lane, reg))
        for reg in range(2):
            col, word = cuda.b_fragment(lane, reg)
            for bit in range(32):
                assert (32 * word + bit, col) == isa_b(lane, 32 * reg + bit)
                seen_b.add((32 * word + bit, col))
    assert len(seen_a) == 16 * 256 and len(seen_b) == 256 * 8 and len(seen_c) == 16 * 8


def test_isa_model_is_an_and_popcount_product():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2 ** 32, (32, 4), dtype=np.uint32)
    b = rng.integers(0, 2 ** 32, (32, 2), dtype=np.uint32)
    c = rng.integers(-50, 50, (32, 4)).astype(np.int64)
    d = mma_and_popc(a, b, c)
    # lane 0 holds D[0, 0], D[0, 1], D[8, 0], D[8, 1]; rebuild A row 0 and B column 0 by hand
    row0 = [(a[l, 0] >> np.uint32(j)) & 1 for l in range(4) for j in range(32)] + \
           [(a[l, 2] >> np.uint32(j)) & 1 for l in range(4) for j in range(32)]
    col0 = [(b[l, 0] >> np.uint32(j)) & 1 for l in range(4) for j in range(32)] + \
           [(b[l, 1] >> np.uint32(j)) & 1 for l in range(4) for j in range(32)]
    assert d[0, 0] == c[0, 0] + int(np.dot(np.array(row0, dtype=np.int64), np.array(col0, dtype=np.int64)))


def _k_major(bits: np.ndarray) -> np.ndarray:
    """bool [N, K] -> K-major packed words [KW, N]."""
    return np.ascontiguousarray(pack_bits(bits).T)


def _inputs(M, N, K, weight_mode, act_mode, bits, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    x[0, :5] = 0.0  # sign(0) = +1
    w = torch.randn(N, K, generator=g)
    move = torch.randn(K, generator=g) * 0.1 if act_mode == "sign" else None
    a_codes, row_scale, _ = quantize_activation(x, move, None, act_mode, bits)
    w_codes, col_scale, _ = quantize_weight(w, None, weight_mode)
    return x, w, move, a_codes.long(), row_scale, w_codes.long(), col_scale


SHAPES = [(37, 70, 600), (16, 128, 768)]  # ragged M, N and K words (600 bits = 10 words); an exact tile


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("weight_mode,act_mode,bits", [
    ("sign_channel", "sign", 1), ("ternary", "sign", 1), ("sign_channel", "absmax", 8), ("ternary", "absmax", 4)])
def test_replayed_kernel_equals_reference_bit_linear(M, N, K, weight_mode, act_mode, bits):
    x, w, move, a_codes, row_scale, w_codes, col_scale = _inputs(M, N, K, weight_mode, act_mode, bits, seed=M + K)
    ternary = weight_mode == "ternary"
    if act_mode == "sign":
        a64 = pack_bits(a_codes.numpy() > 0)
        mode = "xnor_ternary" if ternary else "xnor"
    else:
        two = a_codes.numpy() & (2 ** bits - 1)  # two's complement planes
        a64 = np.stack([pack_bits(((two >> b) & 1).astype(bool)) for b in range(bits)], axis=1)
        mode = "and_ternary" if ternary else "and"
    wc = w_codes.numpy()
    w64 = np.stack([_k_major(wc > 0), _k_major(wc < 0)]) if ternary else _k_major(wc > 0)
    nnz = (wc != 0).sum(1).astype(np.int64)
    got = replay_gemm(mode, a64, w64, K=K, M=M, N=N, planes=bits, nnz=nnz)[0]
    want = (a_codes @ w_codes.t()).numpy()
    np.testing.assert_array_equal(got, want)
    # and the kernel's float epilogue on those integers is bitfx's reference op
    y = (torch.from_numpy(got).float() * row_scale[:, None]) * col_scale
    ref = bit_linear_reference(x, w, None, None, move, None, weight_mode, act_mode, bits)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-5)


def test_replayed_kernel_equals_reference_attention_products():
    g = torch.Generator().manual_seed(3)
    G, Lq, Lk, D = 2, 20, 45, 64
    q, k, v = torch.randn(G, Lq, D, generator=g), torch.randn(G, Lk, D, generator=g), torch.randn(G, Lk, 40, generator=g)
    p = (torch.rand(G, Lq, Lk, generator=g) > 0.6).float()
    # scores: xnor, batched, N = Lk symbolic in the kernel
    qa = np.stack([pack_bits(~(q[i].numpy() < 0)) for i in range(G)])
    kb = np.stack([_k_major(~(k[i].numpy() < 0)) for i in range(G)])
    s = replay_gemm("xnor", qa, kb, K=D, M=Lq, N=Lk, G=G)
    np.testing.assert_array_equal(s, A.sign_scores_reference(q, k).long().numpy())
    # P.V: and, unsigned one plane, K = Lk symbolic (45 bits: one word, a ragged k-step)
    pa = np.stack([pack_bits(p[i].numpy() != 0) for i in range(G)])
    vb = np.stack([pack_bits(~(v[i].numpy().T < 0)).T for i in range(G)])
    o = replay_gemm("and", np.ascontiguousarray(pa), np.ascontiguousarray(vb), K=Lk, M=Lq, N=40, G=G, signed=False)
    np.testing.assert_array_equal(o, A.binary_pv_reference(p, v).long().numpy())
