"""The NEON binary GEMM: integer-exact against NumPy on the host and under qemu; `cnt` in its code."""

from __future__ import annotations

import re

import numpy as np
import pytest

import tvm
from tvm import relax
from bitfx.targets import arm, cross, emulate
from target_tools import needs_clang, needs_gnu, needs_qemu

# (m, n, k, tile, chunk): full tiles, every tail, m = 1 decode, several uint8 chunks + a remainder.
SHAPES = [
    (8, 8, 128, (4, 4), 31),
    (5, 7, 200, (4, 4), 31),
    (1, 13, 64, (4, 4), 31),
    (9, 12, 5000, (4, 4), 31),   # 40 steps: one 31-step chunk + 9
    (6, 6, 1000, (2, 3), 2),     # chunk 2: four full chunks of 2 steps, no remainder
    (3, 5, 777, (3, 5), 4),
]


def _operands(m, n, k, seed=0):
    rng = np.random.default_rng(seed)
    return arm.pack_signs(rng.standard_normal((m, k))), arm.pack_signs(rng.standard_normal((n, k)))


def test_reference_is_the_sign_dot_product():
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((4, 77)), rng.standard_normal((5, 77))
    x[0, :5] = 0.0  # sign(0) = +1
    sx, sw = np.where(x >= 0, 1, -1), np.where(w >= 0, 1, -1)
    got = arm.binary_gemm_reference(arm.pack_signs(x), arm.pack_signs(w), 77)
    np.testing.assert_array_equal(got, sx @ sw.T)


def test_pack_signs_pins_zero_nan_and_padding():
    packed = arm.pack_signs(np.array([[0.0, -0.0, np.nan, -1.0, 2.0]]))
    assert packed.shape == (1, 16)
    assert packed[0, 0] == 0b10111  # bit 1 = +1: 0, -0 and NaN are +1, -1 is 0; padding 0
    assert not packed[0, 1:].any()


@pytest.mark.parametrize("m, n, k, tile, chunk", SHAPES)
def test_exact_on_host(m, n, k, tile, chunk):
    a, w = _operands(m, n, k)
    func = arm.binary_gemm_neon(m, n, k, tile=tile, chunk=chunk)
    lib = tvm.compile(tvm.IRModule({"g": func}), target=cross.get_target("host").tvm_target)
    out = tvm.runtime.tensor(np.zeros((m, n), np.int32))
    lib["bit_gemm_neon"](tvm.runtime.tensor(a), tvm.runtime.tensor(w), out)
    np.testing.assert_array_equal(out.numpy(), arm.binary_gemm_reference(a, w, k))


@pytest.mark.parametrize("kwargs, message", [
    ({"chunk": 32}, "chunk must be a positive int and at most 31, got 32"),
    ({"tile": (0, 4)}, "tile rows must be a positive int, got 0"),
])
def test_bad_schedule_parameters_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        arm.binary_gemm_neon(4, 4, 128, **kwargs)


def _arm64(func):
    return tvm.compile(tvm.IRModule({"main": func}), target=cross.get_target("linux-arm64").tvm_target)


def test_aarch64_code_uses_cnt_with_register_accumulators():
    lib = _arm64(arm.binary_gemm_neon(64, 64, 3072))
    asm = lib.mod.inspect_source("asm")
    assert re.search(r"\bcnt\s+v\d+\.16b", asm)
    assert len(re.findall(r"\bcnt\s+v\d+\.16b", asm)) == 16  # one per output of the 4 x 4 tile
    # "global" scope kept the tile on the stack (promoted to registers), not in a heap workspace.
    assert "load ptr, ptr @__TVMBackendAllocWorkspace" not in lib.mod.inspect_source("ll")


def test_fp32_baseline_uses_fmla_and_is_right():
    asm = _arm64(arm.fp32_gemm_neon(8, 32, 64)).mod.inspect_source("asm")
    assert re.search(r"\bfmla\s+v\d+\.4s", asm)
    rng = np.random.default_rng(2)
    a, w = rng.standard_normal((8, 64), np.float32), rng.standard_normal((64, 32), np.float32)
    lib = tvm.compile(tvm.IRModule({"main": arm.fp32_gemm_neon(8, 32, 64)}),
                      target=cross.get_target("host").tvm_target)
    out = tvm.runtime.tensor(np.zeros((8, 32), np.float32))
    lib["fp32_gemm_neon"](tvm.runtime.tensor(a), tvm.runtime.tensor(w), out)
    np.testing.assert_allclose(out.numpy(), a @ w, rtol=1e-4, atol=1e-4)


def _relax_gemm(m, n, k):
    """``main(a, w) = call_tir(bit_gemm, a, w)``: how the export lowers a binary linear's core."""
    kb = arm.packed_bytes(k)
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType([m, kb], "uint8"))
    w = relax.Var("w", relax.TensorType([n, kb], "uint8"))
    with bb.function("main", [a, w]):
        gv = bb.add_func(arm.binary_gemm_neon(m, n, k), "bit_gemm")
        bb.emit_func_output(bb.emit(relax.call_tir(gv, [a, w], relax.TensorType([m, n], "int32"))))
    return bb.get()


@needs_gnu
@needs_qemu
@pytest.mark.parametrize("target, m, n, k", [
    ("linux-arm64", 6, 10, 300),
    ("linux-arm64", 17, 9, 4100),
    pytest.param("android-arm64", 5, 6, 1000, marks=needs_clang),
])
def test_exact_on_arm64_under_qemu(target, m, n, k, tmp_path, arm64_runtime):
    path = cross.export_library(cross.build_relax(_relax_gemm(m, n, k), target),
                                tmp_path / "gemm.so", target)
    a, w = _operands(m, n, k, seed=7)
    # Two threads: the T.parallel tiles go through libtvm_runtime's thread pool.
    (out,) = emulate.run_emulated(path, [a, w], target, env={"TVM_NUM_THREADS": "2"})
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, arm.binary_gemm_reference(a, w, k))
