"""Plain torch/NumPy statements of the kernel contract (DESIGN §2), independent of bitfx."""

import numpy as np
import torch


def sign(u: torch.Tensor) -> torch.Tensor:
    """+1 if u >= 0 else -1; sign(0) = +1 and NaN -> +1 (bit = NOT(u < 0))."""
    return torch.where(u < 0, -1, 1).to(torch.int64)


def absmax_codes(x: torch.Tensor, bits: int):
    qp = 2 ** (bits - 1) - 1
    gamma = x.abs().amax(-1).clamp_min(1e-5)
    inv = qp / gamma
    codes = torch.clamp(torch.round(x * inv[..., None]), -qp - 1, qp).to(torch.int64)
    return codes, 1.0 / inv


def int_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """a[..., K] @ b_t[N, K]^T, exactly (int64 via float64 is exact below 2^53)."""
    return (a.double() @ b_t.double().transpose(-1, -2)).to(torch.int32)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """bool [..., K] -> uint64 [..., ceil(K/64)], bit j of word w = element 64w + j, zero tail."""
    k = bits.shape[-1]
    kw = (k + 63) // 64
    padded = np.zeros(bits.shape[:-1] + (kw * 64,), dtype=np.uint64)
    padded[..., :k] = bits
    words = padded.reshape(bits.shape[:-1] + (kw, 64)) << np.arange(64, dtype=np.uint64)
    return words.sum(-1, dtype=np.uint64)


def as_numpy_u64(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int64).numpy().view(np.uint64)


def weights(n: int, k: int, ternary: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if ternary:
        return torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    return (torch.randint(0, 2, (n, k), generator=g, dtype=torch.int8) * 2 - 1).to(torch.int8)
