"""`host.gemm(epilogue="sign_bits")`: the next binary linear's sign-and-pack in the GEMM's epilogue.

The kernel writes `pack(NOT(act(y) + out_move < 0))` as the bytes of packed rows, never the float y. It is
checked bit-exact against the two kernels it replaces (the float GEMM, then `pack_rows(mode="sign")` with the
move), and against an independent float64 computation packed by NumPy, where only values within float
rounding of zero may take the other sign: for every tile shape (AVX-512, AVX2 and 128-bit widths), ragged M
(the tile's remainder rows), with and without GELU, bias and move.
"""
import math

import numpy as np
import pytest
import torch

import bitfx  # noqa: F401
from bitfx.codegen import runtime
from bitfx.targets import host

from codegen_reference import pack_bits, weights


def _compile(fn):
    import tvm

    return tvm.compile(fn, target=host.host_target())


def _case(M, K, N, seed):
    g = torch.Generator().manual_seed(seed)
    w = weights(N, K, False, seed=seed)
    codes = torch.where(torch.randn(M, K, generator=g) < 0, -1, 1)
    a = torch.from_numpy(pack_bits((codes > 0).numpy()).view(np.int64)).view(torch.uint64).contiguous()
    rs = torch.rand(M, generator=g) * 0.2
    cs = torch.rand(N, generator=g) * 0.2
    bias = torch.randn(N, generator=g)
    move = torch.randn(N, generator=g) * 0.3
    return w, codes, a, rs, cs, bias, move


@pytest.mark.parametrize("tile,activation,bias,out_move", [
    (None, "gelu", True, True), (None, "none", False, True), (None, "none", True, False),  # this CPU's tile
    (host.Tile(3, 16), "gelu", True, True), (host.Tile(2, 8), "gelu", True, True),  # AVX2's and 128-bit tiles
], ids=["gelu-bias-move", "move", "bias", "3x16", "2x8"])
def test_sign_bits_epilogue_equals_float_gemm_then_pack(tile, activation, bias, out_move):
    K, N = 200, 128
    common = dict(mode="xnor", K=K, N=N, bias=bias, layout="panel", row_chunk=4, activation=activation, tile=tile)
    fused = _compile(host.gemm(epilogue="sign_bits", out_move=out_move, **common))
    # the two kernels it replaces
    gemm = _compile(host.gemm(epilogue="float", **common))
    pack = _compile(host.pack_rows(mode="sign", K=N, move=out_move))
    for M in (1, 2, 7, 37):  # ragged rows of every tile height (M is symbolic: one kernel for all)
        w, codes, a, rs, cs, b, mv = _case(M, K, N, seed=M)
        packed = runtime.pack_weight(w, ternary=False)
        vectors = [rs, cs] + ([b] if bias else [])
        out = torch.full((M, N // 8), 0xA5, dtype=torch.uint8)  # a sentinel: every byte must be written
        fused(a, packed.w, *vectors, *([mv] if out_move else []), out)
        y = torch.empty(M, N)
        gemm(a, packed.w, *vectors, y)
        unfused = torch.empty(M, N // 64, dtype=torch.uint64)
        pack(y, *([mv] if out_move else []), unfused)
        assert torch.equal(out.view(torch.int64), unfused.view(torch.int64)), f"M={M}"

        # an independent float64 reference, packed by NumPy
        y64 = (codes.double() @ w.double().t()) * rs.double()[:, None] * cs.double() + (b.double() if bias else 0)
        if activation == "gelu":
            erf = torch.tensor([math.erf(v / math.sqrt(2)) for v in y64.flatten().tolist()],
                               dtype=torch.float64).view(M, N)
            y64 = 0.5 * y64 * (1 + erf)
        u64 = y64 + (mv.double() if out_move else 0)
        expected = np.unpackbits(pack_bits((u64 >= 0).numpy()).view(np.uint8), axis=1, bitorder="little")
        got = np.unpackbits(out.numpy(), axis=1, bitorder="little")
        differ = got != expected
        assert np.all(np.abs(u64.numpy()[differ]) < 1e-5), f"M={M}: a sign away from zero differs"
        assert differ.sum() <= 1


def test_sign_bits_epilogue_is_checked():
    with pytest.raises(ValueError, match="epilogue='sign_bits' needs a static N that is a multiple of 64"):
        host.gemm(mode="xnor", K=64, N=96, epilogue="sign_bits", layout="panel")
    with pytest.raises(ValueError, match="out_move applies to epilogue='sign_bits' only"):
        host.gemm(mode="xnor", K=64, N=64, epilogue="float", out_move=True)
    with pytest.raises(ValueError, match="unknown GEMM epilogue 'bits'"):
        host.gemm(mode="xnor", K=64, N=64, epilogue="bits")
    with pytest.raises(ValueError, match="N must be a multiple of 64, got N=96"):
        runtime.LinearPlan(runtime.pack_weight(weights(96, 64, False, seed=0), ternary=False),
                           col_scale=torch.ones(96), output="sign_bits")
