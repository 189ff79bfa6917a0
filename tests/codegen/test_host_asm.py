"""The host GEMM is compiled for this CPU: vpopcntq where AVX512-VPOPCNTDQ exists."""

import pytest
import tvm

from bitfx.targets import host


@pytest.mark.skipif(not host.has_feature("avx512vpopcntdq"),
                    reason="this CPU has no AVX512-VPOPCNTDQ, so there is no vpopcntq to look for")
@pytest.mark.parametrize("mode", ["xnor", "and_ternary"])
def test_gemm_uses_vpopcntq(mode):
    func = host.gemm(mode=mode, K=256, N=64, planes=1 if mode == "xnor" else 2)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=host.host_target())
    asm = lib.mod.inspect_source("asm")
    assert "vpopcntq" in asm and "zmm" in asm


def test_host_target_names_this_cpu():
    target = host.host_target()
    assert target.kind.name == "llvm"
    assert str(target.attrs["mcpu"]) == tvm.target.codegen.llvm_get_system_cpu()
    assert host.gemm_tile().rows * host.gemm_tile().cols > 0
