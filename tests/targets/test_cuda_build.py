"""Every CUDA kernel builds here (no GPU needed): TVM -> CUDA source -> nvcc PTX -> ptxas cubin, sm_80 and sm_90.

Checks per build: ``ptxas -v`` reports no spills and no stack frame (nothing in local memory), at most
255 registers; the tensor-core GEMMs' PTX holds the b1 ``mma ... and.popc`` (and no XOR-popc, which sm_90
lacks); the CUDA-core GEMM uses ``popc.b64``; the packers ``vote.sync.ballot``. Builds are cached under the
bitfx cache dir (``bitfx.targets.cuda_runtime.artifacts``); the default run builds a representative set
(~7 s each when cold), the ``slow`` run every kernel for both architectures.
"""
import shutil

import pytest

from bitfx.targets import cuda
from bitfx.targets.cuda_runtime import artifacts

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed")

BERT = dict(K=768, N=3072)
KERNELS = {
    "linear_sign_mma": ("gemm", "cuda", dict(mode="xnor", **BERT, epilogue="float", bias=True)),
    "linear_ternary_mma": ("gemm", "cuda", dict(mode="xnor_ternary", **BERT, epilogue="float", bias=True)),
    "linear_absmax8_mma": ("gemm", "cuda", dict(mode="and", **BERT, planes=8, epilogue="float", bias=True)),
    "linear_ternary_absmax8_mma": ("gemm", "cuda", dict(mode="and_ternary", **BERT, planes=8, epilogue="float")),
    "linear_sign_mma_fp16_out": ("gemm", "cuda", dict(mode="xnor", **BERT, epilogue="float", bias=True,
                                                     out_dtype="float16")),
    "linear_ternary_popc_bf16_out": ("gemm", "cuda-popc", dict(mode="xnor_ternary", **BERT, epilogue="float",
                                                               out_dtype="bfloat16")),
    "linear_sign_int_mma": ("gemm", "cuda", dict(mode="xnor", K=3072, N=768)),
    "scores_mma": ("gemm", "cuda", dict(mode="xnor", K=64, N=None, batched=True)),
    "pv_mma": ("gemm", "cuda", dict(mode="and", K=None, N=64, signed=False, batched=True)),
    "linear_sign_popc": ("gemm", "cuda-popc", dict(mode="xnor", **BERT, epilogue="float", bias=True)),
    "linear_ternary_popc": ("gemm", "cuda-popc", dict(mode="xnor_ternary", **BERT, epilogue="float")),
    "linear_absmax8_popc": ("gemm", "cuda-popc", dict(mode="and", **BERT, planes=8, epilogue="float")),
    "linear_ternary_absmax8_popc": ("gemm", "cuda-popc", dict(mode="and_ternary", **BERT, planes=8)),
    "scores_popc": ("gemm", "cuda-popc", dict(mode="xnor", K=64, N=None, batched=True)),
    "pv_popc": ("gemm", "cuda-popc", dict(mode="and", K=None, N=64, signed=False, batched=True)),
    "pack_sign_mean_move": ("pack_rows", "cuda", dict(mode="sign", K=768, move=True, mean=True)),
    "pack_sign_fp16": ("pack_rows", "cuda", dict(mode="sign", K=768, dtype="float16", mean=True)),
    "pack_sign_bf16_alpha": ("pack_rows", "cuda", dict(mode="sign", K=768, dtype="bfloat16")),
    "pack_weight_pos": ("pack_rows", "cuda", dict(mode="pos", K=768, dtype="int8")),
    "pack_probs": ("pack_rows", "cuda", dict(mode="nonzero", K=None, dtype="float32")),
    "pack_cols": ("pack_cols", "cuda", dict(K=None, N=64)),
    "absmax8": ("absmax_planes", "cuda", dict(K=768, bits=8)),
}
FAST = {("linear_sign_mma", "sm_80"), ("linear_sign_mma_fp16_out", "sm_90"), ("linear_absmax8_mma", "sm_90"),
        ("linear_sign_popc", "sm_90"), ("pack_sign_mean_move", "sm_90"), ("absmax8", "sm_90")}
CASES = [pytest.param(name, arch, id=f"{name}-{arch}",
                      marks=() if (name, arch) in FAST else pytest.mark.slow)
         for name in KERNELS for arch in cuda.ARCHS]


@pytest.mark.parametrize("name,arch", CASES)
def test_kernel_builds_without_spills(name, arch):
    op, impl, params = KERNELS[name]
    art = artifacts(op, impl=impl, arch=arch, **params)
    ptx = art.ptx.read_text()
    assert f".target {arch}" in ptx
    assert art.cubin.read_bytes()[:4] == b"\x7fELF"
    assert (art.spill_stores, art.spill_loads, art.stack_frame) == (0, 0, 0), art.ptxas_log
    assert 0 < art.registers <= 255
    if params.get("out_dtype") in ("float16", "bfloat16"):
        assert f"cvt.rn.{'f16' if params['out_dtype'] == 'float16' else 'bf16'}.f32" in ptx  # rounded once
    if op == "gemm" and impl == "cuda":
        mt, nt = cuda.MmaTile().mt, cuda.MmaTile().nt
        assert ptx.count(cuda.MMA_INSTRUCTION) >= mt * nt * (2 if "ternary" in params["mode"] else 1)
        assert "xor.popc" not in ptx
    elif op == "gemm":
        assert "popc.b64" in ptx and "mma.sync" not in ptx
    elif op in ("pack_rows", "absmax_planes"):
        assert "vote.sync.ballot.b32" in ptx


def test_kernel_sets_are_registered():
    from bitfx.targets import registry

    assert registry.implemented_ops("cuda") == sorted(registry.KERNEL_OPS)
    assert registry.implementation("cuda", "gemm") is cuda.gemm
    assert registry.implementation("cuda-popc", "gemm") is cuda.gemm_popc


def test_bad_mode_is_refused_with_the_accepted_ones():
    with pytest.raises(ValueError, match="unknown GEMM mode 'xor'.*xnor"):
        cuda.gemm(mode="xor", K=64, N=8)
    with pytest.raises(ValueError, match="needs a static K"):
        cuda.gemm(mode="xnor", K=None, N=8)
    with pytest.raises(ValueError, match="out_dtype='float16' with epilogue='int'"):
        cuda.gemm(mode="xnor", K=64, N=8, out_dtype="float16")
