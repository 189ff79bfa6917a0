"""Small models for the diff tests (seeded, eval mode), each returned with its example inputs.

Sizes are chosen so the expected counts can be written by hand in the tests.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def mlp():
    """Linear(64→32), ReLU, Linear(32→16) on M = 16 tokens (2 × 8)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)).eval(), (torch.randn(2, 8, 64),)


def encoder_layer():
    """nn.TransformerEncoderLayer(d=32, 4 heads, ffn 64): in_proj, out_proj, linear1, linear2 + one attention."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    return layer, (torch.randn(2, 8, 32),)


class BertSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, mask):
        b, n, _ = x.shape
        q, k, v = (m(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
                   for m in (self.query, self.key, self.value))
        probs = F.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask, dim=-1)
        return (probs @ v).transpose(1, 2).reshape(b, n, -1)


class BertAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.self, self.output = BertSelfAttention(d, heads), nn.Linear(d, d)

    def forward(self, x, mask):
        return self.output(self.self(x, mask))


class BertLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.attention, self.norm1 = BertAttention(d, heads), nn.LayerNorm(d)
        self.intermediate, self.output, self.norm2 = nn.Linear(d, ffn), nn.Linear(ffn, d), nn.LayerNorm(d)

    def forward(self, x, mask):
        x = self.norm1(x + self.attention(x, mask))
        return self.norm2(x + self.output(F.gelu(self.intermediate(x))))


class TinyBert(nn.Module):
    """Hugging Face names: encoder.layer.N.attention.self.query...; pooler and classifier stay float."""

    def __init__(self, d: int = 32, heads: int = 2, ffn: int = 64, layers: int = 2, vocab: int = 50):
        super().__init__()
        self.embeddings = nn.Embedding(vocab, d)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(d, heads, ffn) for _ in range(layers))
        self.pooler = nn.Linear(d, d)
        self.classifier = nn.Linear(d, 3)

    def forward(self, ids, attention_mask):
        x = self.embeddings(ids)
        mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


def bert():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 6:] = 0
    return TinyBert().eval(), (ids, mask)


class ViTBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(y.transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """Conv patch embedding (not a linear: stays float, untouched), 2 blocks, a head kept in float."""

    def __init__(self, d: int = 32, heads: int = 2, depth: int = 2):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, d, 4, stride=4)
        self.blocks = nn.ModuleList(ViTBlock(d, heads) for _ in range(depth))
        self.head = nn.Linear(d, 10)

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


def vit():
    torch.manual_seed(0)
    return TinyViT().eval(), (torch.randn(2, 3, 16, 16),)


class Manual(nn.Module):
    """``x @ W.t() + b`` with bare parameters: canonicalize_linear, then binarize_linear, rewrite it."""

    def __init__(self):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(32, 64)), nn.Parameter(torch.randn(32))

    def forward(self, x):
        return torch.relu(torch.matmul(x, self.weight.t()) + self.bias)


def manual():
    torch.manual_seed(0)
    return Manual().eval(), (torch.randn(2, 8, 64),)


def nothing():
    """No linear, no attention: nothing to rewrite."""
    torch.manual_seed(0)
    return nn.Sequential(nn.LayerNorm(16), nn.ReLU()).eval(), (torch.randn(2, 16),)
