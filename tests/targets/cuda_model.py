"""A NumPy model of ``mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc``, written from the PTX ISA,
and a replay of what the ``"cuda"`` tensor-core GEMM of ``bitfx.targets.cuda`` computes with its index maps.

PTX ISA, "Matrix Fragments for mma.m16n8k256" (.b1): groupID = %laneid >> 2, threadID_in_group = %laneid % 4.
- A (16 x 256): four .b32 registers, 32 b1 elements each, element i = 32 * reg + bit:
  row = groupID for 0 <= i < 32 or 64 <= i < 96, else groupID + 8;
  col = threadID_in_group * 32 + (i & 0x1F) for i < 64, else threadID_in_group * 32 + (i & 0x1F) + 128.
- B (256 x 8): two .b32 registers, element i = 32 * reg + bit:
  row = threadID_in_group * 32 + (i & 0x1F) for i < 32, else the same + 128; col = groupID.
- C/D (16 x 8, .s32): four registers, element i: row = groupID for i < 2, else groupID + 8;
  col = threadID_in_group * 2 + (i & 0x1).
- ``.and.popc``: D[m, n] = C[m, n] + popc(AND over k of A[m, k], B[k, n]) (bits, element j in bit j).
"""
from __future__ import annotations

import numpy as np

from bitfx.targets import cuda


def isa_a(lane: int, i: int) -> tuple[int, int]:
    g, t = lane >> 2, lane % 4
    row = g if (i < 32 or 64 <= i < 96) else g + 8
    col = t * 32 + (i & 0x1F) + (0 if i < 64 else 128)
    return row, col


def isa_b(lane: int, i: int) -> tuple[int, int]:
    g, t = lane >> 2, lane % 4
    return t * 32 + (i & 0x1F) + (0 if i < 32 else 128), g


def isa_c(lane: int, i: int) -> tuple[int, int]:
    g, t = lane >> 2, lane % 4
    return (g if i < 2 else g + 8), t * 2 + (i & 1)


def _bits(regs: np.ndarray) -> np.ndarray:
    """uint32 [32 lanes, R] -> bool [32, R, 32] (bit j of each register)."""
    return ((regs[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(bool)


def _isa_maps(fn, elements: int):
    idx = np.array([[fn(lane, i) for i in range(elements)] for lane in range(32)])
    return idx[..., 0], idx[..., 1]


_A_MAP, _B_MAP, _C_MAP = _isa_maps(isa_a, 128), _isa_maps(isa_b, 64), _isa_maps(isa_c, 4)


def mma_and_popc(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """One warp's instruction: a uint32 [32, 4], b uint32 [32, 2], c int64 [32, 4] -> d int64 [32, 4]."""
    A = np.zeros((16, 256), dtype=np.int64)
    B = np.zeros((256, 8), dtype=np.int64)
    A[_A_MAP] = _bits(a).reshape(32, 128)  # element i = 32 * reg + bit
    B[_B_MAP] = _bits(b).reshape(32, 64)
    D = A @ B  # popc(a AND b) of 0/1 bits
    return c + D[_C_MAP]


def _popc32(v: np.ndarray) -> np.ndarray:
    return np.unpackbits(v.astype("<u4").view(np.uint8).reshape(*v.shape, 4), axis=-1).sum(-1).astype(np.int64)


def _quad_sum(v: np.ndarray) -> np.ndarray:
    """The kernel's two ``__shfl_xor_sync`` steps (1, 2) over the lane axis (last)."""
    lanes = np.arange(32)
    v = v + v[..., lanes ^ 1]
    return v + v[..., lanes ^ 2]


def replay_gemm(mode: str, a64: np.ndarray, w64: np.ndarray, *, K: int, M: int, N: int, G: int = 1,
                planes: int = 1, signed: bool = True, nnz=None, tile=cuda.MmaTile()) -> np.ndarray:
    """What ``bitfx.targets.cuda.gemm`` computes (int result [G, M, N]), step by step, with its index maps.

    Loads go through ``cuda.a_fragment``/``b_fragment`` and ``cuda.a_word_index``/``w_word_index`` exactly
    as the generator emits them, the instruction through the ISA model above, and the epilogue combines the
    AND products with the quad-reduced row/column popcounts in the generator's formulas.
    """
    A32 = np.ascontiguousarray(a64).reshape(-1).view("<u4")
    W32 = np.ascontiguousarray(w64).reshape(-1).view("<u4")
    kw = (K + 63) // 64
    ternary = mode.endswith("ternary")
    chains = 2 if ternary else 1
    need_rpop = mode in ("xnor", "and")
    mt, nt = tile.mt, tile.nt
    lanes = np.arange(32)
    out = np.full((G, M, N), -(2 ** 40), dtype=np.int64)  # sentinel: every element must be written
    for g in range(G):
        for by in range(-(-M // tile.rows)):
            for bx in range(-(-N // tile.cols)):
                for warp in range(tile.warps):
                    m0, n0 = by * tile.rows, bx * tile.cols + warp * 8 * nt
                    acc = np.zeros((chains, mt * nt, 32, 4), dtype=np.int64)
                    rpop = np.zeros((2 * mt, 32), dtype=np.int64)
                    cpop = np.zeros((nt, 32), dtype=np.int64)
                    for b in reversed(range(planes)):
                        if b != planes - 1:
                            acc *= 2
                            rpop *= 2
                        for ks in range(-(-kw // 4)):
                            af = np.zeros((mt, 32, 4), dtype=np.uint32)
                            for i in range(mt):
                                for r in range(4):
                                    row, u = cuda.a_fragment(lanes, r)
                                    row, u = m0 + 16 * i + row, ks * 8 + u
                                    ok = (row < M) & (u < 2 * kw)
                                    idx = cuda.a_word_index(g, np.minimum(row, M - 1), b, np.minimum(u, 2 * kw - 1),
                                                            M=M, planes=planes, kw=kw)
                                    af[i, :, r] = np.where(ok, A32[idx], 0)
                                    rpop[2 * i + r % 2] += _popc32(af[i, :, r])
                            for j in range(nt):
                                bf = np.zeros((chains, 32, 2), dtype=np.uint32)
                                for p in range(chains):
                                    for r in range(2):
                                        col, u = cuda.b_fragment(lanes, r)
                                        col, u = n0 + 8 * j + col, ks * 8 + u
                                        ok = (col < N) & (u < 2 * kw)
                                        idx = cuda.w_word_index(g, p, np.minimum(col, N - 1), np.minimum(u, 2 * kw - 1),
                                                                chains=chains, kw=kw, N=N)
                                        bf[p, :, r] = np.where(ok, W32[idx], 0)
                                        if p == 0 and b == planes - 1:
                                            cpop[j] += _popc32(bf[p, :, r])
                                for i in range(mt):
                                    for p in range(chains):
                                        acc[p, i * nt + j] = mma_and_popc(af[i], bf[p], acc[p, i * nt + j])
                        if signed and planes > 1 and b == planes - 1:
                            acc, rpop = -acc, -rpop
                    rpop, cpop = _quad_sum(rpop), _quad_sum(cpop)
                    tq = lanes % 4
                    for i in range(mt):
                        for j in range(nt):
                            cps = [cpop[j][(2 * tq + h) * 4] for h in range(2)]
                            for r in range(4):
                                rrow, rcol = cuda.c_fragment(lanes, r)
                                row, col = m0 + 16 * i + rrow, n0 + 8 * j + rcol
                                s0 = acc[0, i * nt + j, :, r]
                                rp = rpop[2 * i + r // 2] if need_rpop else None
                                if mode == "xnor":
                                    val = K - 2 * (rp + cps[r % 2] - 2 * s0)
                                elif mode == "xnor_ternary":
                                    val = nnz[np.minimum(col, N - 1)] - 2 * (cps[r % 2] - s0 + acc[1, i * nt + j, :, r])
                                elif mode == "and":
                                    val = 2 * s0 - rp
                                else:
                                    val = s0 - acc[1, i * nt + j, :, r]
                                ok = (row < M) & (col < N)
                                out[g, row[ok], col[ok]] = val[ok]
    return out
