"""What bitfx does to a BERT: ``bitfx diff`` on a small model written the way Hugging Face writes BERT.

    bitfx diff examples/diff_bert.py:make --html diff.html --json diff.json
    python examples/diff_bert.py                  # the same through the Python API

The module names follow Hugging Face (``encoder.layer.0.attention.self.query``...), so the diff
groups rewrites the way a BERT user reads them; 12 layers show how the HTML page folds modules.
With the default ``bipft`` preset every encoder linear becomes ``bit_linear`` and every attention
``bit_attention`` (with BiPFT estimators); embeddings, the pooler and the classifier stay float.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class BertEmbeddings(nn.Module):
    def __init__(self, vocab: int, hidden: int, max_positions: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.token_type_embeddings = nn.Embedding(2, hidden)
        self.LayerNorm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(0.1)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        x = x + self.token_type_embeddings(torch.zeros_like(input_ids))
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(0.1)

    def split(self, x):
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x, mask):
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask
        probs = self.dropout(F.softmax(scores, dim=-1))
        out = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        return out.view(*out.shape[:2], -1)


class BertOutput(nn.Module):
    """``attention.output`` (hidden -> hidden) and ``output`` (ffn -> hidden): dense, dropout, residual, norm."""

    def __init__(self, d_in: int, hidden: int):
        super().__init__()
        self.dense, self.LayerNorm, self.dropout = nn.Linear(d_in, hidden), nn.LayerNorm(hidden), nn.Dropout(0.1)

    def forward(self, h, residual):
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.self = BertSelfAttention(hidden, heads)
        self.output = BertOutput(hidden, hidden)

    def forward(self, x, mask):
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.dense = nn.Linear(hidden, ffn)

    def forward(self, x):
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.attention = BertAttention(hidden, heads)
        self.intermediate = BertIntermediate(hidden, ffn)
        self.output = BertOutput(ffn, hidden)

    def forward(self, x, mask):
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, layers: int, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(hidden, heads, ffn) for _ in range(layers))

    def forward(self, x, mask):
        for layer in self.layer:
            x = layer(x, mask)
        return x


class BertPooler(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.dense, self.activation = nn.Linear(hidden, hidden), nn.Tanh()

    def forward(self, x):
        return self.activation(self.dense(x[:, 0]))


class Bert(nn.Module):
    """A BERT classifier: embeddings, ``layers`` encoder layers, pooler, classifier."""

    def __init__(self, layers: int = 12, hidden: int = 64, heads: int = 4, ffn: int = 256,
                 vocab: int = 1000, max_positions: int = 128, labels: int = 2):
        super().__init__()
        self.embeddings = BertEmbeddings(vocab, hidden, max_positions)
        self.encoder = BertEncoder(layers, hidden, heads, ffn)
        self.pooler = BertPooler(hidden)
        self.classifier = nn.Linear(hidden, labels)

    def forward(self, input_ids, attention_mask):
        mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
        return self.classifier(self.pooler(self.encoder(self.embeddings(input_ids), mask)))


def make(layers: int = 12, batch: int = 2, seq: int = 16, seed: int = 0):
    """The factory ``bitfx diff`` calls: ``(model in eval mode, (input_ids, attention_mask))``."""
    torch.manual_seed(seed)
    model = Bert(layers=layers).eval()
    input_ids = torch.randint(0, 1000, (batch, seq))
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[0, seq - seq // 4:] = 0  # padding at the end of the first sequence
    return model, (input_ids, attention_mask)


if __name__ == "__main__":
    import bitfx

    d = bitfx.diff(*make(), config="bipft")
    d.print()
    d.to_json("diff.json")
    d.to_html("diff.html")
    print("wrote diff.json and diff.html")
