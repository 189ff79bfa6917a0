"""bitfx on CUDA tensors: the kernels against the reference ops, bit-exact (GPU only), and what runs here.

GPU tests skip without a CUDA device; ``benchmarks/bench_cuda.py`` runs the same checks and then times
the kernels. Without a GPU this file still checks that the reference ops (``kernels="reference"``) make
every tensor on their inputs' device (run on ``meta`` tensors: a CPU-made tensor would fail to mix).
"""
import copy

import pytest
import torch

from bitfx.ops import attention as A
from bitfx.ops.linear import bit_linear_reference, quantize_activation, quantize_weight

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


@pytest.mark.parametrize("prob_mode", ["bivit", "elastic", "bool"])
def test_reference_ops_stay_on_their_device(prob_mode):
    d = torch.device("meta")
    x, w = torch.randn(2, 5, 64, device=d), torch.randn(32, 64, device=d)
    for wm, am, bits in [("sign_channel", "sign", 1), ("ternary", "absmax", 8)]:
        y = bit_linear_reference(x, w, torch.randn(32, device=d), None, torch.randn(64, device=d), None, wm, am, bits)
        assert y.device == d and y.shape == (2, 5, 32)
    q, k, v = (torch.randn(2, 4, 7, 16, device=d) for _ in range(3))
    one = torch.ones((), device=d)
    prob = {"bivit": torch.tensor(0.25, device=d), "elastic": one, "bool": None}[prob_mode]
    out = A.bit_attention_reference(q, k, v, None, one, one, one, prob, None, None, None, None, True, prob_mode)
    assert out.device == d and out.shape == (2, 4, 7, 16)


# ------------------------------------------------------------------------------------------ GPU only
def _codes(M, N, K, weight_mode, act_mode, bits, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    x[0, :3] = 0.0
    w = torch.randn(N, K, generator=g)
    move = torch.randn(K, generator=g) * 0.1 if act_mode == "sign" else None
    return x.to(dtype), w, move


LINEAR = [("sign_channel", "sign", 1), ("ternary", "sign", 1), ("sign_channel", "absmax", 8),
          ("ternary", "absmax", 8), ("sign_channel", "absmax", 3)]


@GPU
@pytest.mark.parametrize("M", [1, 5, 16, 37, 130])  # CUDA cores below 16 rows, tensor cores from 16
@pytest.mark.parametrize("K", [600, 768])
@pytest.mark.parametrize("weight_mode,act_mode,bits", LINEAR)
def test_bit_linear_int_is_exact(M, K, weight_mode, act_mode, bits):
    from bitfx.codegen import runtime

    N = 200
    x, w, move = _codes(M, N, K, weight_mode, act_mode, bits, seed=M * K)
    w_codes, _, _ = quantize_weight(w, None, weight_mode)
    a_codes, row_scale, _ = quantize_activation(x, move, None, act_mode, bits)
    packed = runtime.pack_weight(w_codes.to(torch.int8).cuda(), ternary=weight_mode == "ternary")
    assert packed.planes.is_cuda
    cpu = runtime.pack_weight(w_codes.to(torch.int8), ternary=weight_mode == "ternary")
    # the CPU stores panels (the host GEMM's layout); its K-major view is the CUDA layout
    assert torch.equal(packed.planes.cpu().view(torch.int64), cpu.kmajor().view(torch.int64))
    acc, rs = runtime.bit_linear_int(x.cuda(), packed, act=act_mode, bits=bits,
                                     move=None if move is None else move.cuda())
    assert acc.is_cuda and acc.dtype == torch.int32
    torch.testing.assert_close(acc.cpu(), (a_codes.double() @ w_codes.double().t()).to(torch.int32), rtol=0, atol=0)
    torch.testing.assert_close(rs.cpu(), row_scale.float().reshape(-1), rtol=2e-5, atol=0)  # sum order differs


@GPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 64])
def test_bit_linear_float_epilogue_and_dtype(dtype, M):
    from bitfx.codegen import runtime

    x, w, move = _codes(M, 96, 768, "sign_channel", "sign", 1, dtype=dtype, seed=1)
    w_codes, col, _ = quantize_weight(w, None, "sign_channel")
    bias = torch.randn(96)
    packed = runtime.pack_weight(w_codes.to(torch.int8).cuda(), ternary=False)
    y = runtime.bit_linear(x.cuda(), packed, move=move.cuda(), col_scale=col.cuda(), bias=bias.cuda())
    assert y.dtype == dtype and y.is_cuda
    ref = bit_linear_reference(x.float(), w, bias, None, move, None, "sign_channel", "sign", 1)
    torch.testing.assert_close(y.float().cpu(), ref, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-3)


@GPU
@pytest.mark.parametrize("Lq,Lk,D", [(1, 50, 64), (128, 128, 64), (37, 200, 32)])
def test_attention_products_are_exact(Lq, Lk, D):
    from bitfx.codegen import runtime

    g = torch.Generator().manual_seed(Lq + Lk)
    q, k, v = torch.randn(2, 3, Lq, D, generator=g), torch.randn(2, 3, Lk, D, generator=g), torch.randn(2, 3, Lk, D, generator=g)
    p = (torch.rand(2, 3, Lq, Lk, generator=g) > 0.7).float()
    s = runtime.sign_scores(q.cuda(), k.cuda())
    o = runtime.binary_pv(p.cuda(), v.cuda())
    assert torch.equal(s.cpu(), A.sign_scores_reference(q, k).to(torch.int32))
    assert torch.equal(o.cpu(), A.binary_pv_reference(p, v).to(torch.int32))


@GPU
def test_kernels_run_on_torchs_current_stream():
    from bitfx.codegen import runtime

    x, w, _ = _codes(256, 512, 768, "sign_channel", "sign", 1, seed=2)
    w_codes, col, _ = quantize_weight(w, None, "sign_channel")
    packed = runtime.pack_weight(w_codes.to(torch.int8).cuda(), ternary=False)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        xc = x.cuda(non_blocking=True)
        acc, _ = runtime.bit_linear_int(xc, packed)
        total = acc.sum()  # same stream: ordered after the kernel without a sync
    s.synchronize()
    a_codes = torch.where(x < 0, -1.0, 1.0)
    assert int(total) == int((a_codes.double() @ w_codes.double().t()).sum())


@GPU
@pytest.mark.parametrize("kernels", ["tvm", "reference"])
def test_torch_compile_on_cuda(kernels, monkeypatch):
    import bitfx  # noqa: F401  (the backend)
    from bitfx.targets import cuda_runtime
    from tests.models import Bert

    calls = []
    real = cuda_runtime._run
    monkeypatch.setattr(cuda_runtime, "_run", lambda fn, dev, *a: (calls.append(dev), real(fn, dev, *a))[1])
    torch.manual_seed(0)
    model = Bert().cuda().eval()
    ids = torch.randint(0, 50, (2, 16), device="cuda")
    mask = torch.ones(2, 16, device="cuda")
    ref = torch.compile(copy.deepcopy(model), backend="bitfx", options={"kernels": "reference"})
    out = torch.compile(model, backend="bitfx", options={"kernels": kernels})
    with torch.no_grad():
        y, y_ref = out(ids, mask), ref(ids, mask)
    assert y.is_cuda
    torch.testing.assert_close(y, y_ref, rtol=1e-3, atol=1e-3)
    assert bool(calls) == (kernels == "tvm")


# ------------------------------------------------------------------------- the dispatch logic, on CPU
def test_gemm_set_follows_rows_and_architecture(monkeypatch):
    from bitfx.targets import cuda_runtime as cr

    caps = {0: (9, 0), 1: (7, 5)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: caps[i])
    cr._arch.cache_clear()
    try:
        assert cr.device_arch(0) == "sm_90" and cr.device_arch(torch.device("cuda", 1)) == "sm_75"
        assert cr._gemm_set(cr.MMA_MIN_ROWS, torch.device("cuda", 0)) == "cuda"
        assert cr._gemm_set(cr.MMA_MIN_ROWS - 1, torch.device("cuda", 0)) == "cuda-popc"  # M = 1 decode
        assert cr._gemm_set(4096, torch.device("cuda", 1)) == "cuda-popc"  # no b1 mma before sm_80
    finally:
        cr._arch.cache_clear()


@pytest.mark.skipif(__import__("shutil").which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed")
def test_tvm_compiles_cuda_source_through_bitfx_nvcc(monkeypatch, tmp_path):
    """The callback TVM's CUDA runtime calls on module load: nvcc, IEEE math, the device's arch, cached."""
    import tvm_ffi

    from bitfx.targets import cuda_runtime as cr

    monkeypatch.setenv("BITFX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cr, "device_arch", lambda device=None: "sm_80")
    cr.install_compiler()
    source = cr.kernel_source("pack_rows", mode="sign", K=96, arch="sm_80")
    cubin = bytes(tvm_ffi.get_global_func("tvm_callback_cuda_compile")(source))
    assert cubin[:4] == b"\x7fELF"
    assert list((tmp_path / "cuda" / "cubin").glob("*.cubin"))  # cached: the next process loads it
    assert cr.compile_cubin(source, "sm_80") == cubin


_TORCH_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int8: "int8",
                 torch.uint8: "uint8", torch.int32: "int32", torch.uint64: "uint64"}


@pytest.mark.parametrize("weight_mode,act_mode,bits", LINEAR)
@pytest.mark.parametrize("M", [1, 40])
def test_runtime_calls_match_the_kernel_signatures(monkeypatch, weight_mode, act_mode, bits, M):
    """Every kernel call of the CUDA runtime passes the buffers its generator declares (count, dtype, rank,
    static sizes), checked on CPU tensors with the launches recorded instead of run."""
    from bitfx.codegen import runtime
    from bitfx.targets import cuda_runtime as cr
    from bitfx.targets import registry

    calls = []

    def fake_kernel(op, device, impl="cuda", **params):
        return (op, impl, params)

    def fake_run(fn, device, *args):
        op, impl, params = fn
        func = registry.implementation(impl, op)(**params)
        bufs = list(func.params)  # TVM 0.27: a PrimFunc's params are its buffers
        assert len(bufs) == len(args), (op, params, [tuple(a.shape) for a in args])
        for buf, arg in zip(bufs, args):
            assert str(buf.dtype) == _TORCH_DTYPES[arg.dtype], (op, buf.name, arg.dtype)
            assert len(buf.shape) == arg.dim(), (op, buf.name, tuple(arg.shape))
            for dim, size in zip(buf.shape, arg.shape):
                if isinstance(dim, int) or hasattr(dim, "value"):
                    assert int(dim) == size, (op, buf.name, tuple(buf.shape), tuple(arg.shape))
            assert arg.is_contiguous(), (op, buf.name)
        calls.append((op, impl))

    monkeypatch.setattr(cr, "_kernel", fake_kernel)
    monkeypatch.setattr(cr, "_run", fake_run)
    monkeypatch.setattr(cr, "_gemm_set", lambda rows, device: "cuda" if rows >= cr.MMA_MIN_ROWS else "cuda-popc")
    monkeypatch.setattr(cr, "_rows", lambda x, K, name: (x.reshape(-1, K).contiguous(), x.shape[:-1], x.dtype))
    K, N = 600, 72
    w_codes, col, _ = quantize_weight(torch.randn(N, K), None, weight_mode)
    packed = cr.pack_weight(w_codes.to(torch.int8), ternary=weight_mode == "ternary")
    assert packed.planes.shape == (2 if weight_mode == "ternary" else 1, (K + 63) // 64, N)
    x = torch.randn(2, M, K, dtype=torch.float16)
    y = cr.bit_linear(x, packed, act=act_mode, bits=bits, move=torch.zeros(K) if act_mode == "sign" else None,
                      col_scale=col, bias=torch.zeros(N))
    assert y.shape == (2, M, N) and y.dtype == torch.float16
    cr.bit_linear_int(x.float(), packed, act=act_mode, bits=bits)
    cr.LinearPlan(packed, act=act_mode, bits=bits, alpha=torch.ones(()) if act_mode == "sign" else None,
                  col_scale=col)(x)
    q, k = torch.randn(2, 3, M, 64), torch.randn(2, 3, 50, 64)
    cr.sign_scores(q, k)
    cr.binary_pv(torch.rand(2, 3, M, 50) > 0.5, torch.randn(2, 3, 50, 64))
    gemm = "cuda" if 2 * M >= cr.MMA_MIN_ROWS else "cuda-popc"
    assert ("gemm", gemm) in calls and ("pack_cols", "cuda") in calls
    assert sum(op == "gemm" for op, _ in calls) == 5
    assert isinstance(runtime.LinearPlan(packed, col_scale=col), runtime.LinearPlan)  # a CPU weight: the host plan
