"""The "arm64" kernel set: bit-exact against a NumPy definition of each mode, on the host and under qemu.

The GEMM takes the reference compute's buffers (``bitfx/codegen/compute.py``): activations ``[M, KW]`` /
``[M, planes, KW]`` uint64, K-major weights ``[KW, N]`` (ternary ``[2, KW, N]``), tail bits zero. One
Relax library holds every case, so one cross build and one qemu run per thread count cover them all.
"""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest

import tvm
from tvm import relax
from bitfx.targets import arm, cross, emulate, registry
from target_tools import needs_gnu, needs_llvm_tools, needs_qemu

WORD = 64

# (mode, M, K, N, planes, signed, batched, epilogue, bias): every mode, odd K, K < 64, K a multiple of
# the word, M = 1 and ragged rows, ragged columns (odd and even tails), symbolic N and K (attention).
CASES = [
    ("xnor", 9, 777, 13, 1, True, False, "float", True),
    ("xnor", 1, 37, 8, 1, True, False, "int", False),
    ("xnor", 6, 2048, 21, 1, True, False, "int", False),        # 32 words: two chunks of 16
    ("xnor_ternary", 5, 300, 11, 1, True, False, "float", False),
    ("and", 7, 200, 10, 4, True, False, "float", True),         # 4-bit signed absmax planes
    ("and", 4, 128, 9, 8, True, False, "int", False),
    ("and_ternary", 3, 333, 17, 3, True, False, "float", True),
    ("xnor", 6, 64, None, 1, True, True, "int", False),         # sign(q)·sign(k)ᵀ: symbolic N
    ("and", 5, None, 12, 1, False, True, "int", False),         # P_b·sign(v): symbolic K
]
N_SYM, K_SYM, G = 11, 150, 2  # the sizes symbolic N and K take, and the batch of batched cases


def _popc(x: np.ndarray) -> np.ndarray:
    return np.unpackbits(np.ascontiguousarray(x)[..., None].view(np.uint8), axis=-1).sum(-1, dtype=np.int64)


def _words(rng, shape, k: int) -> np.ndarray:
    """Random packed words with the bits past ``k`` zero (the layout's tail rule)."""
    w = rng.integers(0, 2 ** 64, size=(*shape[:-1], (k + WORD - 1) // WORD), dtype=np.uint64)
    if k % WORD:
        w[..., -1] &= np.uint64((1 << (k % WORD)) - 1)
    return w


def _case_arrays(case, seed):
    """(inputs in kernel order, expected output) with the output computed from the DESIGN §2 formulas."""
    mode, m, k, n, planes, signed, batched, epilogue, bias = case
    k, n = k or K_SYM, n or N_SYM
    rng = np.random.default_rng(seed)
    ternary = mode.endswith("ternary")
    lead = (G,) if batched else ()
    a = _words(rng, (*lead, m, planes, k), k)  # [.., M, planes, KW]
    w = np.swapaxes(_words(rng, (*lead, 2 if ternary else 1, n, k), k), -1, -2)  # [.., P, KW, N]
    if ternary:
        w[..., 1, :, :] &= ~w[..., 0, :, :]  # a weight is +1, -1 or 0, never both
    def pc(op, b, p):  # [.., M, N]: sum over words of popcount(op(plane b of a, weight plane p))
        return _popc(op(a[..., :, None, b, :], np.swapaxes(w[..., p, :, :], -1, -2)[..., None, :, :])).sum(-1)

    nnz = None
    if mode == "xnor":
        acc = k - 2 * pc(np.bitwise_xor, 0, 0)
    elif mode == "xnor_ternary":
        nnz = (_popc(w[..., 0, :, :]) + _popc(w[..., 1, :, :])).sum(-2).astype(np.int32)
        pos_or_neg = np.swapaxes(w[..., 0, :, :] | w[..., 1, :, :], -1, -2)[..., None, :, :]
        acc = nnz - 2 * _popc(np.bitwise_xor(a[..., :, None, 0, :], np.swapaxes(w[..., 0, :, :], -1, -2)[..., None, :, :])
                              & pos_or_neg).sum(-1)
    else:
        acc = 0
        for b in range(planes):
            c = -(2 ** b) if signed and planes > 1 and b == planes - 1 else 2 ** b
            if mode == "and":
                term = 2 * pc(np.bitwise_and, b, 0) - _popc(a[..., :, b, :]).sum(-1)[..., None]
            else:
                term = pc(np.bitwise_and, b, 0) - pc(np.bitwise_and, b, 1)
            acc = acc + c * term
    acc = acc.astype(np.int32)
    a_in = a if planes > 1 else a[..., 0, :]
    w_in = w if ternary else w[..., 0, :, :]
    inputs = [a_in, w_in] + ([nnz] if mode == "xnor_ternary" else [])
    if epilogue == "float":
        rs = rng.standard_normal(m).astype(np.float32)
        cs = rng.standard_normal(n).astype(np.float32)
        inputs += [rs, cs]
        acc = (acc.astype(np.float32) * rs[:, None]) * cs
        if bias:
            b = rng.standard_normal(n).astype(np.float32)
            inputs.append(b)
            acc = acc + b
    return inputs, acc


def _kernel(case, kernel_set: str = "arm64"):
    mode, _, k, n, planes, signed, batched, epilogue, bias = case
    return registry.implementation(kernel_set, "gemm")(mode=mode, K=k, N=n, planes=planes, signed=signed,
                                                    batched=batched, epilogue=epilogue, bias=bias)


def _check(got, want, case):
    if case[7] == "float":  # a fused multiply-add may round the epilogue once instead of twice
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5 * float(np.abs(want).max()))
    else:
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want)


def test_the_arm64_set_owns_its_gemm():
    assert registry.implementation("arm64", "gemm") is arm.gemm


@pytest.mark.slow  # the qemu test below covers the same cases on the device; this one runs on the host
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-k{c[2]}-n{c[3]}-m{c[1]}")
def test_gemm_exact_on_host(case):
    """The same TIR built for this CPU: fast, and already the numbers the device must give."""
    lib = tvm.compile(tvm.IRModule({"main": _kernel(case)}), target=cross.get_target("host").tvm_target)
    inputs, want = _case_arrays(case, seed=1)
    out = tvm.runtime.tensor(np.zeros(want.shape, want.dtype))
    lib["main"](*[tvm.runtime.tensor(np.ascontiguousarray(v)) for v in inputs], out)
    _check(out.numpy(), want, case)


def _library(cases, seed, kernel_set: str = "arm64"):
    """One Relax function: every case's kernel as call_tir on its own inputs; the outputs as a tuple."""
    bb = relax.BlockBuilder()
    arrays = [_case_arrays(c, seed + i) for i, c in enumerate(cases)]
    params = [relax.Var(f"x{i}_{j}", relax.TensorType(list(v.shape), str(v.dtype)))
              for i, (ins, _) in enumerate(arrays) for j, v in enumerate(ins)]
    with bb.function("main", params):
        outs, pos = [], 0
        for i, (case, (ins, want)) in enumerate(zip(cases, arrays)):
            gv = bb.add_func(_kernel(case, kernel_set).with_attr("global_symbol", f"gemm_{i}"), f"gemm_{i}")
            args = params[pos:pos + len(ins)]
            pos += len(ins)
            outs.append(bb.emit(relax.call_tir(gv, args, relax.TensorType(list(want.shape), str(want.dtype)))))
        bb.emit_func_output(relax.Tuple(outs))
    return bb.get(), [v for ins, _ in arrays for v in ins], [want for _, want in arrays]


@pytest.fixture(scope="module")
def arm64_library(tmp_path_factory, arm64_runtime):
    mod, inputs, wants = _library(CASES, seed=11)
    path = tmp_path_factory.mktemp("arm_kernels") / "gemms.so"
    return cross.export_library(cross.build_relax(mod, "linux-arm64"), path, "linux-arm64"), inputs, wants


@needs_gnu
@needs_qemu
@pytest.mark.parametrize("threads", [pytest.param(1, marks=pytest.mark.slow), 4])
def test_every_gemm_mode_exact_under_qemu(arm64_library, threads):
    path, inputs, wants = arm64_library
    outs = emulate.run_emulated(path, inputs, "linux-arm64", env={"TVM_NUM_THREADS": str(threads)},
                                cpu="cortex-a53")  # an ARMv8.0 core: no dotprod
    assert len(outs) == len(CASES)
    for got, want, case in zip(outs, wants, CASES):
        _check(got, want, case)


@needs_gnu
@needs_llvm_tools
def test_parallel_and_no_dot_product_in_an_armv8_0_library(arm64_library):
    path = arm64_library[0]
    syms = subprocess.run(["llvm-nm", str(path)], capture_output=True, text=True, check=True).stdout
    assert "__TVMBackendParallelLaunch" in syms  # the runtime's thread pool, bound when the library loads
    asm = subprocess.run(["llvm-objdump", "--mattr=+dotprod,+i8mm", "-d", str(path)],
                         capture_output=True, text=True, check=True).stdout
    assert re.search(r"\bcnt\s+v\d+\.16b", asm)
    assert not re.search(r"\b(udot|sdot|usdot|ummla|smmla|usmmla)\b", asm)


# --- packing: pack_rows (sign with move and mean, nonzero with a symbolic K), pack_cols, absmax_planes ---
def _bits_to_words(bits: np.ndarray) -> np.ndarray:
    """bool [..., K] -> uint64 [..., ceil(K/64)], bit j of word w = element 64w + j."""
    k = bits.shape[-1]
    padded = np.zeros((*bits.shape[:-1], -(-k // WORD) * WORD), bool)
    padded[..., :k] = bits
    return np.packbits(padded, axis=-1, bitorder="little").view(np.uint64)


def _pack_cases(rng):
    """[(kernel op, params, inputs, expected outputs)] with the outputs from DESIGN §2's definitions."""
    x = rng.standard_normal((5, 777)).astype(np.float32)
    x[0, :4] = [0.0, -0.0, np.nan, -1.0]  # sign(0) = sign(-0) = +1, NaN -> +1
    move = rng.standard_normal(777).astype(np.float32)
    u = x + move
    sign_bits = _bits_to_words(~(u < 0))
    mean = np.abs(u).mean(-1, dtype=np.float64).astype(np.float32)  # row 0: NaN, as torch gives
    p = np.where(rng.random((7, 150)) < 0.3, rng.random((7, 150)), 0).astype(np.float32)
    v = rng.standard_normal((2, 150, 13)).astype(np.float32)
    cols = np.swapaxes(_bits_to_words(np.swapaxes(~(v < 0), -1, -2)), -1, -2)  # [G, KW, N]
    xa = (rng.standard_normal((3, 200)) * 3).astype(np.float32)
    inv = (np.float32(1) / np.maximum(np.abs(xa).max(-1), np.float32(1e-5))) * np.float32(7)
    q = np.clip(np.rint(xa * inv[:, None]), -8, 7).astype(np.int32)
    planes = np.stack([_bits_to_words(((q >> b) & 1).astype(bool)) for b in range(4)], axis=1)
    return [
        ("pack_rows", dict(mode="sign", K=777, move=True, mean=True), [x, move], [sign_bits, mean]),
        ("pack_rows", dict(mode="nonzero", K=None), [p], [_bits_to_words(p != 0)]),
        ("pack_cols", dict(K=None, N=13), [v], [cols]),
        ("absmax_planes", dict(K=200, bits=4), [xa], [planes, (np.float32(1) / inv).astype(np.float32)]),
    ]


@pytest.fixture(scope="module")
def arm64_pack_library(tmp_path_factory, arm64_runtime):
    from bitfx.relax.converters import add_kernel

    cases = _pack_cases(np.random.default_rng(5))
    bb = relax.BlockBuilder()
    params = [relax.Var(f"x{i}_{j}", relax.TensorType(list(v.shape), str(v.dtype)))
              for i, (_, _, ins, _) in enumerate(cases) for j, v in enumerate(ins)]
    with bb.function("main", params):
        outs, pos = [], 0
        for i, (op, kw, ins, wants) in enumerate(cases):
            gv = add_kernel(bb, registry.implementation("arm64", op)(**kw), f"{op}_{i}")
            types = [relax.TensorType(list(w.shape), str(w.dtype)) for w in wants]
            res = bb.emit(relax.call_tir(gv, params[pos:pos + len(ins)], types if len(types) > 1 else types[0]))
            pos += len(ins)
            outs += [bb.emit(relax.TupleGetItem(res, j)) for j in range(len(types))] if len(types) > 1 else [res]
        bb.emit_func_output(relax.Tuple(outs))
    path = tmp_path_factory.mktemp("arm_packs") / "packs.so"
    lib = cross.export_library(cross.build_relax(bb.get(), "linux-arm64"), path, "linux-arm64")
    return lib, [v for c in cases for v in c[2]], [w for c in cases for w in c[3]]


@needs_gnu
@needs_qemu
def test_pack_kernels_exact_under_qemu(arm64_pack_library):
    path, inputs, wants = arm64_pack_library
    outs = emulate.run_emulated(path, inputs, "linux-arm64", env={"TVM_NUM_THREADS": "4"}, cpu="cortex-a53")
    assert len(outs) == len(wants) == 6
    for i, (got, want) in enumerate(zip(outs, wants)):
        if want.dtype == np.float32:  # row scales: a float sum in another order
            np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"output {i}")
        else:
            np.testing.assert_array_equal(got, want, err_msg=f"output {i}")


@needs_gnu
@needs_qemu
@needs_llvm_tools
def test_a_dotprod_target_gets_udot_and_needs_armv8_2(tmp_path, arm64_runtime):
    """linux-arm64-dotprod runs the arm64-dotprod set: udot in its code, exact on a v8.2 core (cortex-a76),
    SIGILL on an ARMv8.0 one (cortex-a53) — which is why the default targets never ask for it."""
    assert cross.get_target("linux-arm64-dotprod").kernels == "arm64-dotprod"
    cases = [CASES[0], CASES[4]]
    mod, inputs, wants = _library(cases, seed=3, kernel_set="arm64-dotprod")
    path = cross.export_library(cross.build_relax(mod, "linux-arm64-dotprod"), tmp_path / "dot.so",
                                "linux-arm64-dotprod")
    asm = subprocess.run(["llvm-objdump", "--mattr=+dotprod,+i8mm", "-d", str(path)],
                         capture_output=True, text=True, check=True).stdout
    assert re.search(r"\budot\s+v\d+\.4s", asm)
    outs = emulate.run_emulated(path, inputs, "linux-arm64-dotprod", cpu="cortex-a76")
    for got, want, case in zip(outs, wants, cases):
        _check(got, want, case)
    with pytest.raises(emulate.EmulationError) as err:
        emulate.run_emulated(path, inputs, "linux-arm64-dotprod", cpu="cortex-a53")
    assert err.value.signal == 4  # SIGILL
