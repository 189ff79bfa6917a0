"""The panel weight layout of the host GEMM (`[ceil(N/32), KW, 32]`, what `pack_weight` makes on the CPU):
the words where an independent NumPy packing puts them, zero padding columns, and GEMMs bit-exact against
the op reference (`torch.ops.bitfx.bit_linear`) for ragged N and K, M = 1 (decode), 2, 5 and 128, binary
and ternary weights, sign and multi-plane absmax activations."""

import numpy as np
import pytest
import torch

import bitfx  # noqa: F401
from bitfx.codegen import runtime
from bitfx.ops.linear import quantize_activation, quantize_weight

from codegen_reference import as_numpy_u64, pack_bits, weights

REFERENCE = torch.ops.bitfx.bit_linear.default
# (weight mode, activation mode, bits): binary and ternary weights x 1-bit and multi-plane activations
CASES = [("sign_channel", "sign", 1), ("ternary", "sign", 1), ("sign_tensor", "absmax", 8), ("ternary", "absmax", 3)]


def _panels_np(bits_nk: np.ndarray) -> np.ndarray:
    """bool [N, K] -> uint64 [ceil(N/32), KW, 32], written from the layout's definition."""
    rows = pack_bits(bits_nk)  # [N, KW]
    n, kw = rows.shape
    nb = -(-n // 32)
    out = np.zeros((nb, kw, 32), dtype=np.uint64)
    for col in range(n):
        out[col // 32, :, col % 32] = rows[col]
    return out


@pytest.mark.parametrize("ternary", [False, True])
@pytest.mark.parametrize("N,K", [(33, 130), (70, 64), (32, 1)])
def test_pack_weight_makes_panels(N, K, ternary):
    w = weights(N, K, ternary, seed=N + K)
    packed = runtime.pack_weight(w, ternary=ternary)
    nb, kw = -(-N // 32), -(-K // 64)
    assert packed.layout == "panel"
    assert tuple(packed.planes.shape) == (2 if ternary else 1, nb, kw, 32)
    np.testing.assert_array_equal(as_numpy_u64(packed.planes[0]), _panels_np((w > 0).numpy()))
    if ternary:
        np.testing.assert_array_equal(as_numpy_u64(packed.planes[1]), _panels_np((w < 0).numpy()))
    # padding columns past N are zero words (never stored, but read by the last panel's tiles)
    assert not packed.planes[..., -1, :, N - 32 * (nb - 1):].any()
    # the K-major view is the old layout: [P, KW, N]
    np.testing.assert_array_equal(as_numpy_u64(packed.kmajor()[0]), pack_bits((w > 0).numpy()).T)


def test_packed_weight_checks_its_shape_and_layout():
    w = weights(40, 100, False, seed=3)
    packed = runtime.pack_weight(w, ternary=False)
    with pytest.raises(ValueError, match=r"layout 'kmajor' with N=40, K=100: expected \(1, 2, 40\)"):
        runtime.PackedWeight(packed.planes, 40, 100, False)
    with pytest.raises(ValueError, match="layout must be 'kmajor' or 'panel', got 'rows'"):
        runtime.PackedWeight(packed.planes, 40, 100, False, layout="rows")


@pytest.mark.parametrize("M", [1, 2, 5, 128])
@pytest.mark.parametrize("w_mode,a_mode,bits", CASES)
def test_panel_gemm_equals_op_reference(w_mode, a_mode, bits, M):
    K, N = 200, 70  # K % 64 = 8 (a ragged last word), N % 32 = 6 (a ragged last panel)
    g = torch.Generator().manual_seed(M * 7 + bits)
    weight, x = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g) * 2
    alpha = torch.tensor([0.37]) if a_mode == "sign" else None  # a given α: the row scale is exact
    w_codes, col, _ = quantize_weight(weight, None, w_mode)
    packed = runtime.pack_weight(w_codes.to(torch.int8), ternary=w_mode == "ternary")
    assert packed.layout == "panel" and tuple(packed.planes.shape[1:]) == (3, 4, 32)

    # integers: the GEMM's accumulator against the codes' product, computed apart from bitfx's kernels
    a_codes, _, _ = quantize_activation(x, None, alpha, a_mode, bits)
    acc, _ = runtime.bit_linear_int(x, packed, act=a_mode, bits=bits)
    assert torch.equal(acc, (a_codes.double() @ w_codes.double().t()).to(torch.int32))

    # floats: the fused epilogue against the op reference, bit for bit (same product order, no bias)
    plan = runtime.LinearPlan(packed, act=a_mode, bits=bits, alpha=alpha, col_scale=col)
    ref = REFERENCE(x, weight, None, None, None, alpha, w_mode, a_mode, bits)
    assert torch.equal(plan(x), ref)
    assert torch.equal(runtime.bit_linear(x, packed, act=a_mode, bits=bits, alpha=alpha, col_scale=col,
                                          threads=1), ref)


@pytest.mark.parametrize("ternary", [False, True])
def test_kmajor_weight_still_runs_and_agrees(ternary):
    """A weight packed K-major by hand (the CUDA layout) takes the K-major host GEMM: same integers."""
    w = weights(45, 130, ternary, seed=8)
    panel = runtime.pack_weight(w, ternary=ternary)
    kmajor = runtime.PackedWeight(panel.kmajor(), 45, 130, ternary, panel.nnz)
    assert kmajor.layout == "kmajor"
    x = torch.randn(9, 130, generator=torch.Generator().manual_seed(8))
    for act, bits in (("sign", 1), ("absmax", 4)):
        acc_p, _ = runtime.bit_linear_int(x, panel, act=act, bits=bits)
        acc_k, _ = runtime.bit_linear_int(x, kmajor, act=act, bits=bits)
        assert torch.equal(acc_p, acc_k)


def test_panel_layout_needs_a_static_n():
    from bitfx.targets import host

    with pytest.raises(ValueError, match="layout='panel' needs a static N"):
        host.gemm(mode="xnor", K=64, N=None, layout="panel")
    with pytest.raises(ValueError, match="unknown weight layout 'rows'"):
        host.gemm(mode="xnor", K=64, N=32, layout="rows")


@pytest.mark.parametrize("tile", [(3, 16), (2, 8)])  # the AVX2 and 128-bit (NEON) tiles: 2 or 4 tiles a panel
@pytest.mark.parametrize("mode,planes", [("xnor", 1), ("and_ternary", 3)])
def test_narrow_tiles_walk_each_panel(tile, mode, planes):
    """Tiles narrower than a panel (other CPUs' vector widths) cover it side by side, the ragged last panel
    included; forced here on this CPU through the generator's `tile`."""
    from bitfx.codegen.build import kernel
    from bitfx.targets.host import Tile

    K, N, ternary = 200, 70, mode.endswith("ternary")
    w = weights(N, K, ternary, seed=tile[1])
    packed = runtime.pack_weight(w, ternary=ternary)
    g = torch.Generator().manual_seed(tile[0])
    for M in (1, 4, 7):
        if planes == 1:
            codes = torch.where(torch.randn(M, K, generator=g) < 0, -1, 1)
            a = torch.from_numpy(pack_bits((codes > 0).numpy()).view(np.int64)).view(torch.uint64)
        else:  # 3 two's-complement planes of codes in [-4, 3]
            codes = torch.randint(-4, 4, (M, K), generator=g)
            two = (codes & 7).numpy()
            a = torch.from_numpy(np.stack([pack_bits(((two >> b) & 1).astype(bool)) for b in range(3)], axis=1)
                                 .view(np.int64)).view(torch.uint64)
        out = torch.empty(M, N, dtype=torch.int32)
        fn = kernel("gemm", mode=mode, K=K, N=N, planes=planes, tile=Tile(*tile), layout="panel")
        fn(a.contiguous(), packed.w, out)
        assert torch.equal(out, (codes.double() @ w.double().t()).to(torch.int32)), M


def test_packed_weights_on_disk_are_never_read_in_the_wrong_layout(tmp_path, monkeypatch):
    """The warm-start cache of packed weights (`bitfx.compile_cache`): an entry written before the panels
    (K-major planes under the key of that time) is not hit, and planes of the wrong shape under the current key
    are packed again; either way the layer gets panels equal to a fresh packing."""
    from bitfx import compile_cache
    from bitfx.ops import kernel_ops

    monkeypatch.setenv("BITFX_COMPILE_CACHE_DIR", str(tmp_path))
    weight = torch.randn(70, 200, generator=torch.Generator().manual_seed(11))
    codes, col, _ = quantize_weight(weight, None, "sign_channel")
    fresh = runtime.pack_weight(codes.to(torch.int8), ternary=False)
    stale = {"planes": fresh.kmajor(), "col_scale": col}
    compile_cache.store(compile_cache.content_key("packed", [weight], extra="sign_channel"), stale)  # pre-panel key
    hits = compile_cache.STATS["hit"]
    packed, _ = kernel_ops._packed_weight(weight, "sign_channel", use_disk=True)
    assert compile_cache.STATS["hit"] == hits  # the old entry is not this layout's
    assert packed.layout == "panel" and torch.equal(packed.planes.view(torch.int64), fresh.planes.view(torch.int64))

    monkeypatch.setattr(compile_cache, "load", lambda key: stale)  # any key answers K-major planes
    packed, _ = kernel_ops._packed_weight(weight, "sign_channel", use_disk=True)
    assert packed.layout == "panel" and torch.equal(packed.planes.view(torch.int64), fresh.planes.view(torch.int64))


# column-panel major; one row block at a time; chunks of 3 (the last one short for most M); the plans' 4
@pytest.mark.parametrize("row_chunk,parallel", [(0, True), (1, False), (3, True), (4, False)])
def test_every_tile_walk_covers_every_output_once(row_chunk, parallel):
    """The GEMM's walks (`row_chunk`: column-panel major, or chunks of row blocks, the last chunk short)
    write every output exactly once: integer results equal an independent float64 matmul for M from one
    row block to several chunks with ragged rows, and N with a ragged last panel. The output starts as a
    sentinel, so a tile skipped (or written twice with another value) shows."""
    from bitfx.codegen.build import kernel

    K, N = 130, 70
    w = weights(N, K, False, seed=row_chunk)
    packed = runtime.pack_weight(w, ternary=False)
    fn = kernel("gemm", mode="xnor", K=K, N=N, planes=1, layout="panel", row_chunk=row_chunk, parallel=parallel)
    g = torch.Generator().manual_seed(row_chunk)
    for M in (4, 12, 13, 28, 35, 64):
        codes = torch.where(torch.randn(M, K, generator=g) < 0, -1, 1)
        a = torch.from_numpy(pack_bits((codes > 0).numpy()).view(np.int64)).view(torch.uint64)
        out = torch.full((M, N), -(1 << 30), dtype=torch.int32)
        fn(a.contiguous(), packed.w, out)
        assert torch.equal(out, (codes.double() @ w.double().t()).to(torch.int32)), M


@pytest.mark.parametrize("bad", [-1, 1.5, "4"])
def test_row_chunk_must_be_a_count(bad):
    from bitfx.targets import host

    with pytest.raises(ValueError, match="row_chunk must be an int >= 0"):
        host.gemm(mode="xnor", K=64, N=32, layout="panel", row_chunk=bad)


def test_cpu_linear_plans_use_the_chunked_walk():
    """What a compiled model calls: the plan's GEMM is built with `runtime.ROW_CHUNK` (the walk measured
    fastest), and gives the op reference's result."""
    from bitfx.codegen.build import _MEMO

    w = weights(70, 130, False, seed=5)
    packed = runtime.pack_weight(w, ternary=False)
    plan = runtime.LinearPlan(packed, col_scale=torch.ones(70))
    keys = [dict(k[3]) for k, fn in _MEMO.items() if fn is plan.gemm]
    assert keys and keys[0]["row_chunk"] == runtime.ROW_CHUNK > 0 and keys[0]["layout"] == "panel"
    x = torch.randn(37, 130, generator=torch.Generator().manual_seed(5))
    codes = torch.where(x < 0, -1.0, 1.0)
    expected = (codes.double() @ w.double().t()) * x.abs().mean(-1, keepdim=True).double()
    torch.testing.assert_close(plan(x).double(), expected, rtol=1e-5, atol=1e-4)


def test_gelu_epilogue_equals_an_independent_float64_gelu():
    """`activation="gelu"`: the float epilogue writes GELU((acc * row_scale) * col_scale + bias); against the
    exact GELU computed in float64 from an independent matmul (erf from Python's math), to 2e-6 of the
    output's range (the epilogue's erf is a rational approximation: |error| < 4.2e-7)."""
    import math

    from bitfx.codegen.build import kernel

    K, N, M = 200, 70, 37
    w = weights(N, K, False, seed=11)
    packed = runtime.pack_weight(w, ternary=False)
    g = torch.Generator().manual_seed(11)
    codes = torch.where(torch.randn(M, K, generator=g) < 0, -1, 1)
    a = torch.from_numpy(pack_bits((codes > 0).numpy()).view(np.int64)).view(torch.uint64).contiguous()
    rs, cs, bias = torch.rand(M, generator=g) * 0.5, torch.rand(N, generator=g) * 0.5, torch.randn(N, generator=g)
    out = torch.empty(M, N)
    fn = kernel("gemm", mode="xnor", K=K, N=N, planes=1, epilogue="float", bias=True, layout="panel", row_chunk=4,
                activation="gelu")
    fn(a, packed.w, rs, cs, bias, out)
    y = (codes.double() @ w.double().t()) * rs.double()[:, None] * cs.double() + bias.double()
    erf = torch.tensor([math.erf(v / math.sqrt(2)) for v in y.flatten().tolist()], dtype=torch.float64).view(M, N)
    expected = 0.5 * y * (1 + erf)
    assert y.min() < -3 and y.max() > 3  # both tails and the middle of the curve are covered
    assert (out.double() - expected).abs().max() <= 2e-6 * y.abs().max()


def test_gemm_activation_is_checked():
    from bitfx.targets import host

    with pytest.raises(ValueError, match="unknown GEMM activation 'relu'"):
        host.gemm(mode="xnor", K=64, N=32, epilogue="float", activation="relu")
    with pytest.raises(ValueError, match="activation='gelu' needs epilogue='float'"):
        host.gemm(mode="xnor", K=64, N=32, activation="gelu")
