"""Built-in models for the demo, the benchmarks and the examples (random weights, no downloads).

``bert_encoder`` is written the way Hugging Face's BERT is: explicit attention
(``q @ kᵀ / √d + mask → softmax → dropout → @ v``) with an additive mask built from an
``attention_mask`` input, so bitfx sees the spelling real models use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class BertConfig:
    vocab_size: int = 1000
    hidden: int = 768
    heads: int = 12
    ffn: int = 3072
    layers: int = 2
    max_positions: int = 512
    num_labels: int = 2
    dropout: float = 0.1


class SelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.heads, self.head_dim = c.heads, c.hidden // c.heads
        self.query = nn.Linear(c.hidden, c.hidden)
        self.key = nn.Linear(c.hidden, c.hidden)
        self.value = nn.Linear(c.hidden, c.hidden)
        self.dropout = nn.Dropout(c.dropout)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask
        probs = self.dropout(torch.softmax(scores, dim=-1))
        out = (probs @ v).transpose(1, 2)
        return out.reshape(x.shape[0], x.shape[1], -1)


class Layer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = SelfAttention(c)
        self.attention_output = nn.Linear(c.hidden, c.hidden)
        self.attention_norm = nn.LayerNorm(c.hidden)
        self.intermediate = nn.Linear(c.hidden, c.ffn)
        self.output = nn.Linear(c.ffn, c.hidden)
        self.output_norm = nn.LayerNorm(c.hidden)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.dropout(self.attention_output(self.attention(x, mask))))
        return self.output_norm(x + self.dropout(self.output(F.gelu(self.intermediate(x)))))


class BertEncoder(nn.Module):
    """Embeddings, ``layers`` encoder layers, a pooled classifier head."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.config = c
        self.embeddings = nn.Embedding(c.vocab_size, c.hidden)
        self.position_embeddings = nn.Embedding(c.max_positions, c.hidden)
        self.embeddings_norm = nn.LayerNorm(c.hidden)
        self.layer = nn.ModuleList(Layer(c) for _ in range(c.layers))
        self.classifier = nn.Linear(c.hidden, c.num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embeddings_norm(self.embeddings(input_ids) + self.position_embeddings(positions))
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.layer:
            x = layer(x, mask)
        return self.classifier(x[:, 0])


def bert_encoder(layers: int = 2, hidden: int = 768, heads: int = 12, ffn: int = 3072,
                 batch: int = 1, seq: int = 128, seed: int = 0):
    """A BERT-base-shaped encoder (random weights, eval mode) and example inputs."""
    torch.manual_seed(seed)
    model = BertEncoder(BertConfig(hidden=hidden, heads=heads, ffn=ffn, layers=layers)).eval()
    input_ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[:, seq - seq // 8:] = 0  # some padding
    return model, (input_ids, attention_mask)


def tiny_bert(layers: int = 2, seq: int = 16):
    """A small BERT-style encoder for examples and tests."""
    return bert_encoder(layers=layers, hidden=64, heads=4, ffn=128, batch=2, seq=seq)
