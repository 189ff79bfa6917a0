"""The test model zoo: small, seeded models covering every attention spelling bitfx recognises.

Each :class:`Case` builds its model (eval mode, fixed seed) and example inputs for a given
(batch, seq), and states what the default ``bipft`` pipeline should do with it: how many linears
become ``bit_linear`` (embeddings, ``head`` and ``classifier`` modules stay float under the default
keep patterns) and how many attentions become ``bitfx.attention`` / ``bit_attention``.

Dimensions are tiny (hidden 32, 2 heads, seq 8) so that the whole e2e suite runs in seconds.
Nothing here imports bitfx: other test files and benchmarks can use these models as they are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

HIDDEN, HEADS, FFN, SEQ, BATCH, VOCAB, CLASSES = 32, 2, 64, 8, 2, 50, 3


class MLP(nn.Module):
    def __init__(self, d_in: int = 16, hidden: int = HIDDEN, d_out: int = 4):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d_in, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


class SingleLinear(nn.Module):
    """A model that is one ``nn.Linear`` (wrapped so the case can name it)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        return self.proj(x)


class MHA(nn.Module):
    """``nn.MultiheadAttention`` self-attention; ``need_weights`` picks its explicit (bmm/softmax)
    path (True, the module's default) or its SDPA path (False)."""

    def __init__(self, need_weights: bool = True):
        super().__init__()
        self.need_weights = need_weights
        self.attn = nn.MultiheadAttention(HIDDEN, HEADS, batch_first=True)

    def forward(self, x):
        out, _ = self.attn(x, x, x, need_weights=self.need_weights)
        return out


class EncoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(HIDDEN, HEADS, FFN, dropout=0.1, batch_first=True)

    def forward(self, x):
        return self.layer(x)


# -- ViT: patch embed (Conv2d), cls token, timm-style explicit attention with the scale on q ---------
class ViTAttention(nn.Module):
    def __init__(self, dim: int = HIDDEN, heads: int = HEADS):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class ViTBlock(nn.Module):
    def __init__(self, dim: int = HIDDEN):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), ViTAttention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, FFN), nn.GELU(), nn.Linear(FFN, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, image: int = 16, patch: int = 4, dim: int = HIDDEN, depth: int = 2):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(dim) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, CLASSES)

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


# -- BERT: explicit q @ kᵀ / sqrt(d) + additive mask from attention_mask ------------------------------
class BertSelfAttention(nn.Module):
    def __init__(self, dim: int = HIDDEN, heads: int = HEADS):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.dropout = nn.Dropout(0.1)

    def split(self, x):
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x, additive_mask):
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + additive_mask
        probs = self.dropout(F.softmax(scores, dim=-1))
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        return ctx.view(*ctx.shape[:2], -1)


class BertLayer(nn.Module):
    def __init__(self, dim: int = HIDDEN):
        super().__init__()
        self.attention, self.attn_out, self.ln1 = BertSelfAttention(dim), nn.Linear(dim, dim), nn.LayerNorm(dim)
        self.intermediate, self.output, self.ln2 = nn.Linear(dim, FFN), nn.Linear(FFN, dim), nn.LayerNorm(dim)

    def forward(self, x, additive_mask):
        x = self.ln1(x + self.attn_out(self.attention(x, additive_mask)))
        return self.ln2(x + self.output(F.gelu(self.intermediate(x))))


class Bert(nn.Module):
    def __init__(self, dim: int = HIDDEN, depth: int = 2, max_len: int = 64):
        super().__init__()
        self.word_embeddings, self.position_embeddings = nn.Embedding(VOCAB, dim), nn.Embedding(max_len, dim)
        self.embed_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(BertLayer(dim) for _ in range(depth))
        self.classifier = nn.Linear(dim, CLASSES)

    def forward(self, input_ids, attention_mask):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed_norm(self.word_embeddings(input_ids) + self.position_embeddings(positions)[None])
        additive = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, additive)
        return self.classifier(x[:, 0])


# -- causal decoder block: F.scaled_dot_product_attention(..., is_causal=True) -----------------------
class DecoderBlock(nn.Module):
    def __init__(self, dim: int = HIDDEN, heads: int = HEADS):
        super().__init__()
        self.heads = heads
        self.ln1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ln2, self.up, self.down = nn.LayerNorm(dim), nn.Linear(dim, FFN), nn.Linear(FFN, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=-1)
        q, k, v = (t.view(b, n, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, n, c))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class Decoder(nn.Module):
    def __init__(self, dim: int = HIDDEN, max_len: int = 64):
        super().__init__()
        self.embed, self.pos_embed = nn.Embedding(VOCAB, dim), nn.Embedding(max_len, dim)
        self.block, self.ln_f, self.lm_head = DecoderBlock(dim), nn.LayerNorm(dim), nn.Linear(dim, VOCAB)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids) + self.pos_embed(positions)[None]
        return self.lm_head(self.ln_f(self.block(x)))


# -- the zoo ------------------------------------------------------------------------------------------
def _hidden(batch: int, seq: int) -> tuple:
    return (torch.randn(batch, seq, HIDDEN),)


def _tokens(batch: int, seq: int) -> tuple:
    return (torch.randint(0, VOCAB, (batch, seq)),)


def _bert_inputs(batch: int, seq: int) -> tuple:
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - max(1, seq // 4):] = 0  # padding at the end of the first sequence
    return (torch.randint(0, VOCAB, (batch, seq)), mask)


@dataclass(frozen=True)
class Case:
    """A model of the zoo and what the default (``bipft``) pipeline does with it.

    ``linears``: linears that become ``bit_linear``; ``attentions``: attention subgraphs that
    become one ``bitfx.attention`` node each (and then ``bit_attention``); ``seq_dynamic``:
    whether the sequence length may vary between calls (ViT's is fixed by its image size).
    """

    name: str
    build: Callable[[], nn.Module]
    make_inputs: Callable[[int, int], tuple]
    linears: int
    attentions: int
    seq_dynamic: bool = True

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build().eval()

    def inputs(self, batch: int = BATCH, seq: int = SEQ, seed: int = 1) -> tuple:
        torch.manual_seed(seed)
        return self.make_inputs(batch, seq)


CASES: dict[str, Case] = {c.name: c for c in [
    Case("mlp", MLP, lambda b, s: (torch.randn(b, s, 16),), linears=3, attentions=0),
    Case("linear", SingleLinear, _hidden, linears=1, attentions=0),
    # in_proj (packed, split into q, k, v by split_packed_projections) + out_proj
    Case("mha", MHA, _hidden, linears=4, attentions=1),
    Case("mha_sdpa", lambda: MHA(need_weights=False), _hidden, linears=4, attentions=1),
    # in_proj (q, k, v) + out_proj + linear1 + linear2
    Case("encoder_layer", EncoderLayer, _hidden, linears=6, attentions=1),
    # per block: qkv (q, k, v), proj, mlp.0, mlp.2; patch_embed is a conv, head stays float
    Case("vit", ViT, lambda b, s: (torch.randn(b, 3, 16, 16),), linears=12, attentions=2, seq_dynamic=False),
    # per layer: query, key, value, attn_out, intermediate, output; classifier stays float
    Case("bert", Bert, _bert_inputs, linears=12, attentions=2),
    # qkv (q, k, v), proj, up, down; lm_head stays float
    Case("decoder", Decoder, _tokens, linears=6, attentions=1),
]}
