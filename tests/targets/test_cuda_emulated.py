"""The CUDA C++ that TVM generates, run on the CPU (``tests/targets/cuda_emulator.py``: one std::thread per
CUDA thread, warp collectives in lockstep, the b1 ``mma`` through the PTX ISA's fragment layout), against
bitfx's reference ops. This runs the generated index arithmetic, guards and epilogues themselves; what it
cannot show is the hardware: timing, and the ISA model being the silicon (the GPU tests and
``benchmarks/bench_cuda.py`` do that on a GPU). Two kernels run by default, the rest with ``-m slow``.
"""
import shutil

import numpy as np
import pytest
import torch

from bitfx.codegen.build import cache_dir
from bitfx.ops import attention as A
from bitfx.ops.linear import bit_linear_reference, quantize_activation, quantize_weight
from bitfx.targets import cuda
from bitfx.targets.cuda_runtime import kernel_source

from tests.codegen.codegen_reference import absmax_codes, pack_bits
from tests.targets.cuda_emulator import run_kernel

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20) to run the emulated kernels")
EXE = cache_dir() / "cuda-emu"


def _k_major(bits):
    return np.ascontiguousarray(pack_bits(bits).T)


def _grid_mma(M, N, G=1, tile=cuda.MmaTile()):
    return (-(-N // tile.cols), -(-M // tile.rows), G), 32 * tile.warps


def _grid_popc(M, N, G=1, rows=4):
    return (-(-N // 128), -(-M // rows), G), 128


def test_tensor_core_bit_linear_equals_reference():
    M, K, N = 37, 600, 70  # ragged rows, columns and k-steps (10 words)
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    move = torch.randn(K, generator=g) * 0.1
    x[0, :7] = -move[:7]  # x + move == 0 -> +1
    a_codes, row_scale, _ = quantize_activation(x, move, None, "sign", 1)
    w_codes, col_scale, _ = quantize_weight(w, None, "sign_channel")
    grid, block = _grid_mma(M, N)
    out = run_kernel(kernel_source("gemm", mode="xnor", K=K, N=N, epilogue="float", bias=True), grid=grid, block=block,
                     buffers=dict(a=pack_bits(a_codes.numpy() > 0), w=_k_major(w_codes.numpy() > 0),
                                  row_scale=row_scale.numpy().astype(np.float32), col_scale=col_scale.numpy(),
                                  bias=b.numpy(), out=np.zeros((M, N), np.float32)),
                     scalars={"M": M}, exe_dir=EXE)["out"]
    ref = bit_linear_reference(x, w, b, None, move, None, "sign_channel", "sign", 1)
    torch.testing.assert_close(torch.from_numpy(out), ref, rtol=1e-6, atol=1e-5)


def test_sign_and_pack_equals_reference():
    M, K = 5, 100  # a ragged word: 36 lanes of the second ballot pair are past K
    rng = np.random.default_rng(1)
    x = rng.standard_normal((M, K)).astype(np.float32)
    move = (rng.standard_normal(K) * 0.1).astype(np.float32)
    x[0, :4] = -move[:4]
    x[1, 3] = np.nan  # NOT(NaN < 0): +1
    x[2, 5] = -1e-45  # a negative denormal stays negative (no flush to zero)
    res = run_kernel(kernel_source("pack_rows", mode="sign", K=K, move=True, mean=True), grid=(M, 1, 1), block=32,
                     buffers=dict(x=x, move=move, out=np.zeros((M, 2), np.uint64), row_scale=np.zeros(M, np.float32)),
                     scalars={"M": M}, exe_dir=EXE)
    u = x + move
    np.testing.assert_array_equal(res["out"], pack_bits(~(u < 0)))
    keep = ~np.isnan(u).any(1)
    np.testing.assert_allclose(res["row_scale"][keep], np.abs(u[keep]).mean(1), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["cuda", "cuda-popc"])
@pytest.mark.parametrize("weight_mode,act_mode,bits", [("ternary", "sign", 1), ("sign_channel", "absmax", 3),
                                                        ("ternary", "absmax", 2)])
def test_integer_modes_equal_reference(impl, weight_mode, act_mode, bits):
    M, K, N = (33, 300, 20) if impl == "cuda" else (3, 300, 20)
    g = torch.Generator().manual_seed(bits)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    a_codes, _, _ = quantize_activation(x, None, None, act_mode, bits)
    w_codes, _, _ = quantize_weight(w, None, weight_mode)
    wc, ac = w_codes.numpy().astype(np.int64), a_codes.numpy().astype(np.int64)
    ternary = weight_mode == "ternary"
    if act_mode == "sign":
        a = pack_bits(ac > 0)
        mode = "xnor_ternary" if ternary else "xnor"
    else:
        two = ac & (2 ** bits - 1)
        a = np.ascontiguousarray(np.stack([pack_bits(((two >> p) & 1).astype(bool)) for p in range(bits)], axis=1))
        mode = "and_ternary" if ternary else "and"
    w64 = np.stack([_k_major(wc > 0), _k_major(wc < 0)]) if ternary else _k_major(wc > 0)
    bufs = dict(a=a, w=w64, out=np.zeros((M, N), np.int32))
    if mode == "xnor_ternary":
        bufs["nnz"] = (wc != 0).sum(1).astype(np.int32)
    grid, block = (_grid_mma if impl == "cuda" else _grid_popc)(M, N)
    out = run_kernel(kernel_source("gemm", impl=impl, mode=mode, K=K, N=N, planes=bits), grid=grid, block=block,
                     buffers=bufs, scalars={"M": M}, exe_dir=EXE)["out"]
    np.testing.assert_array_equal(out, ac @ wc.T)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["cuda", "cuda-popc"])
def test_attention_products_equal_reference(impl):
    G, Lq, Lk, D = 2, 20 if impl == "cuda" else 3, 45, 64
    g = torch.Generator().manual_seed(7)
    q, k, v = torch.randn(G, Lq, D, generator=g), torch.randn(G, Lk, D, generator=g), torch.randn(G, Lk, 40, generator=g)
    p = (torch.rand(G, Lq, Lk, generator=g) > 0.6).float()
    grid, block = (_grid_mma if impl == "cuda" else _grid_popc)(Lq, Lk, G)
    s = run_kernel(kernel_source("gemm", impl=impl, mode="xnor", K=D, N=None, batched=True), grid=grid, block=block,
                   buffers=dict(a=np.stack([pack_bits(~(q[i].numpy() < 0)) for i in range(G)]),
                                w=np.stack([_k_major(~(k[i].numpy() < 0)) for i in range(G)]),
                                out=np.zeros((G, Lq, Lk), np.int32)),
                   scalars={"G": G, "M": Lq, "N": Lk}, exe_dir=EXE)["out"]
    np.testing.assert_array_equal(s, A.sign_scores_reference(q, k).numpy().astype(np.int32))
    grid, block = (_grid_mma if impl == "cuda" else _grid_popc)(Lq, 40, G)
    o = run_kernel(kernel_source("gemm", impl=impl, mode="and", K=None, N=40, signed=False, batched=True), grid=grid,
                   block=block, buffers=dict(a=np.stack([pack_bits(p[i].numpy() != 0) for i in range(G)]),
                                             w=np.stack([pack_bits(~(v[i].numpy().T < 0)).T for i in range(G)]).copy(),
                                             out=np.zeros((G, Lq, 40), np.int32)),
                   scalars={"G": G, "M": Lq, "KW": 1}, exe_dir=EXE)["out"]
    np.testing.assert_array_equal(o, A.binary_pv_reference(p, v).numpy().astype(np.int32))


def _symbolic_k_source(op, **params):
    """With a symbolic K, TVM's CSE hoists ceil(K/64) into a kernel parameter that its host code computes;
    the emulator has no host code, so these sources are generated without that (semantics-preserving) CSE."""
    import tvm

    with tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        return kernel_source(op, **params)


@pytest.mark.slow
def test_packers_and_absmax_equal_reference():
    rng = np.random.default_rng(3)
    G, K, N = 2, 70, 40  # pack_cols: values packed down the columns (P.V's right operand)
    v = rng.standard_normal((G, K, N)).astype(np.float32)
    cols = run_kernel(_symbolic_k_source("pack_cols", K=None, N=N), grid=(1, 2, G), block=128,
                      buffers=dict(x=v, out=np.zeros((G, 2, N), np.uint64)), scalars={"G": G, "K": K}, exe_dir=EXE)
    np.testing.assert_array_equal(cols["out"], np.stack([pack_bits(~(v[i].T < 0)).T for i in range(G)]))
    p = (rng.random((6, 70)) > 0.5).astype(np.uint8)  # probabilities, K symbolic
    rows = run_kernel(_symbolic_k_source("pack_rows", mode="nonzero", K=None, dtype="uint8"), grid=(6, 1, 1), block=32,
                      buffers=dict(x=p, out=np.zeros((6, 2), np.uint64)), scalars={"M": 6, "K": 70}, exe_dir=EXE)
    np.testing.assert_array_equal(rows["out"], pack_bits(p != 0))
    codes = rng.integers(-1, 2, (9, 130)).astype(np.int8)  # ternary weight codes, plane "neg"
    neg = run_kernel(kernel_source("pack_rows", mode="neg", K=130, dtype="int8"), grid=(9, 1, 1), block=32,
                     buffers=dict(x=codes, out=np.zeros((9, 3), np.uint64)), scalars={"M": 9}, exe_dir=EXE)
    np.testing.assert_array_equal(neg["out"], pack_bits(codes < 0))
    M, K, bits = 4, 200, 8
    x = torch.from_numpy(rng.standard_normal((M, K)).astype(np.float32))
    res = run_kernel(kernel_source("absmax_planes", K=K, bits=bits), grid=(M, 1, 1), block=32,
                     buffers=dict(x=x.numpy(), planes=np.zeros((M, bits, 4), np.uint64),
                                  row_scale=np.zeros(M, np.float32)), scalars={"M": M}, exe_dir=EXE)
    want, scale = absmax_codes(x, bits)
    two = want.numpy() & (2 ** bits - 1)
    np.testing.assert_array_equal(res["planes"], np.stack([pack_bits(((two >> b) & 1).astype(bool)) for b in range(bits)], 1))
    np.testing.assert_array_equal(res["row_scale"], scale.numpy().astype(np.float32))
