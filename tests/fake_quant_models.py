"""Models that carry their own binarizer, written from the papers' formulas (not copied from any
package): the straight-through fake-quant form ``x + (q(x) - x).detach()`` on activations and weights.

* :class:`BitLinear` — BitNet (arXiv 2310.11453): RMSNorm, then 8-bit absmax activations per token
  ``Q(x) = clamp(round(x·127/γ), -128, 127)·γ/127``, ``γ = max(max|x|, 1e-5)``; 1-bit weights
  ``sign(W - mean W)·mean|W|``.
* :class:`BitLinear158` — BitNet b1.58 (arXiv 2402.17764): the same activations; ternary weights
  ``clamp(round(W/γ), -1, 1)·γ``, ``γ = max(mean|W|, 1e-5)``.
* :class:`QuantizeLinear` — BiT / BiPFT style (arXiv 2205.13016, 2312.08937): elastic 1-bit
  activations ``α·sign(x + move)`` (learnable scalar α, per-channel ``move``), sign weights
  ``sign(W - mean W)·mean|W|`` (BWN).

:class:`BitNetLM` is a small BitNet-style transformer: token embedding, blocks of (self attention
with BitLinear q/k/v/o, BitLinear feed-forward), a final RMSNorm and a *float* output head, as the
papers keep it. Nothing here imports bitfx.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-5


def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Forward ``q``, gradient of ``x`` (straight through)."""
    return x + (q - x).detach()


def absmax_8bit(x: torch.Tensor) -> torch.Tensor:
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    return (x * scale).round().clamp(-128, 127) / scale


def sign_bwn(w: torch.Tensor) -> torch.Tensor:
    return torch.sign(w - w.mean()) * w.abs().mean()


def ternary_absmean(w: torch.Tensor) -> torch.Tensor:
    scale = 1.0 / w.abs().mean().clamp(min=EPS)
    return (w * scale).round().clamp(-1, 1) / scale


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * self.weight


class BitLinear(nn.Linear):
    """BitNet BitLinear: RMSNorm → 8-bit absmax activations × 1-bit weights."""

    weight_quant = staticmethod(sign_bwn)

    def __init__(self, d_in: int, d_out: int, bias: bool = False):
        super().__init__(d_in, d_out, bias=bias)
        self.norm = RMSNorm(d_in)

    def forward(self, x):
        x = self.norm(x)
        return F.linear(ste(x, absmax_8bit(x)), ste(self.weight, self.weight_quant(self.weight)), self.bias)


class BitLinear158(BitLinear):
    """BitNet b1.58: ternary absmean weights."""

    weight_quant = staticmethod(ternary_absmean)


class QuantizeLinear(nn.Linear):
    """BiT / BiPFT-style: elastic 1-bit activations α·sign(x + move), BWN sign weights."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True):
        super().__init__(d_in, d_out, bias=bias)
        self.alpha = nn.Parameter(torch.tensor(1.0))
        self.move = nn.Parameter(torch.zeros(d_in))

    def forward(self, x):
        u = x + self.move
        xq = ste(u, self.alpha * torch.sign(u))
        return F.linear(xq, ste(self.weight, sign_bwn(self.weight)), self.bias)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, linear: type):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (linear(dim, dim) for _ in range(4))
        self.up, self.down = linear(dim, 2 * dim), linear(2 * dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, d // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(b, n, d))
        return x + self.down(F.gelu(self.up(x)))


class BitNetLM(nn.Module):
    """Embedding → blocks of BitLinear layers → RMSNorm → float output head (the author's choice)."""

    def __init__(self, linear: type = BitLinear, vocab: int = 64, dim: int = 64, heads: int = 4, depth: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, linear) for _ in range(depth))
        self.norm, self.output = RMSNorm(dim), nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.output(self.norm(x))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial α and move (their inits are 1 and 0) so that a recogniser must read them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantizeLinear):
                m.alpha.fill_(0.5 + torch.rand((), generator=g).item())
                m.move.copy_(0.1 * torch.randn(m.move.shape, generator=g))
    return model.eval()
