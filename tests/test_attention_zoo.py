"""Attention everywhere (issue 8, item 3): on real model code (tests/hf_zoo.py) and on small modules
written in the spellings people use, every projection and every attention becomes binary, and the
canonical attention keeps the model's numbers.

Default run: the hand-written cross-attention spellings (einsum, masked_fill with finfo.min or -1e9,
SDPA enable_gqa). ``slow``: the zoo (every model: no attention left float, only config skips; the
fast zoo subset with counts and compile == binarize is tests/test_entry_points.py), and every HF
model with attn_implementation="eager" (T5's position bias + mask, Llama's repeat_kv after rotary,
GPT-2/BERT additive masks).
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bitfx
from bitfx.api import trace
from bitfx.ops import ATTENTION, BIT_ATTENTION, BIT_LINEAR
from bitfx.passes import PIPELINE
import hf_zoo

FAST: set = set()  # tests/test_entry_points.py binarizes bert, gpt2, decoder_layer in the fast run
HF_EAGER = ["bert", "roberta", "distilbert", "vit", "gpt2", "llama", "t5", "bart"]
FAST_EAGER: set = set()  # each is a whole HF model: slow


def count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def marks(name, fast):
    return pytest.param(name, marks=() if name in fast else pytest.mark.slow)


def first_tensor(out):
    """The main output of a model (last_hidden_state / logits / a tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]


@pytest.mark.parametrize("name", [marks(n, FAST) for n in hf_zoo.ZOO])
def test_zoo_every_projection_and_attention_is_binary(name):
    entry = hf_zoo.ZOO[name]
    model, args, kwargs = entry.make()
    gm = bitfx.binarize(model, args, {"preset": "bipft", "kernels": "reference"}, example_kwargs=kwargs)
    report = gm.bitfx_report
    assert count(gm, BIT_LINEAR) == report.count("linear", "bit_linear") == entry.linears, report.summary()
    assert count(gm, BIT_ATTENTION) == report.count("attention", "bit_attention") == entry.attentions
    assert not [s for s in report.skips if s.kind == "attention"], report.summary()
    assert {s.reason for s in report.skips} <= {"config"}, report.summary()  # only the kept heads/pooler
    out = first_tensor(gm(*args, **kwargs))
    ref = first_tensor(hf_zoo.call(model, args, kwargs))
    assert out.shape == ref.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", [marks(n, FAST_EAGER) for n in HF_EAGER])
def test_hf_eager_attention_canonicalizes_without_changing_numbers(name):
    """attn_implementation="eager": explicit matmul/softmax with HF's additive masks, repeat_kv
    (Llama GQA) after rotary, T5's position bias added to the mask; canonicalize only."""
    entry = hf_zoo.ZOO[name]
    model, args, kwargs = entry.make()
    model.set_attn_implementation("eager")
    gm, ctx = trace(model, args, "bipft", passes=PIPELINE[:3], example_kwargs=kwargs)
    assert count(gm, ATTENTION) == entry.attentions and not ctx.report.skips, ctx.report.summary()
    with torch.no_grad():
        out, ref = first_tensor(gm(*args, **kwargs)), first_tensor(model(*args, **kwargs))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# -- spellings as people write them -----------------------------------------------------------------
class Attention(nn.Module):
    """q from ``x``, k/v from ``context`` (cross attention when given), in one of several spellings."""

    def __init__(self, spelling: str, dim: int = 32, heads: int = 4, kv_heads: int = 4):
        super().__init__()
        self.spelling, self.heads, self.kv_heads, self.d = spelling, heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.k, self.v = nn.Linear(dim, self.d * kv_heads), nn.Linear(dim, self.d * kv_heads)
        self.o = nn.Linear(dim, dim)

    def forward(self, x, context, pad):  # pad: [B, Lk] True = padding
        b = x.shape[0]
        q = self.q(x).view(b, -1, self.heads, self.d).transpose(1, 2)
        k, v = (p(context).view(b, -1, self.kv_heads, self.d).transpose(1, 2) for p in (self.k, self.v))
        if self.spelling == "einsum":  # lucidrains-style, with spaces
            s = torch.einsum("b h i d, b h j d -> b h i j", q, k) * self.d ** -0.5
            s = s.masked_fill(pad[:, None, None, :], -math.inf)
            y = torch.einsum("b h i j, b h j d -> b h i d", s.softmax(dim=-1), v)
        elif self.spelling == "finfo_min":  # older HF: masked_fill(mask == 0, finfo.min)
            s = q @ k.transpose(-1, -2) / math.sqrt(self.d)
            keep = (~pad)[:, None, None, :].float()
            s = s.masked_fill(keep == 0, torch.finfo(s.dtype).min)
            y = F.softmax(s, dim=-1) @ v
        elif self.spelling == "minus_1e9":
            s = (q @ k.transpose(-1, -2)).masked_fill(pad[:, None, None, :], -1e9) / math.sqrt(self.d)
            y = s.softmax(-1) @ v
        elif self.spelling == "sdpa_gqa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=~pad[:, None, None, :], enable_gqa=True)
        else:
            raise ValueError(self.spelling)
        return self.o(y.transpose(1, 2).reshape(b, -1, self.heads * self.d))


SPELLINGS = {"einsum": 4, "finfo_min": 4, "minus_1e9": 4, "sdpa_gqa": 2}  # name -> kv heads


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_cross_attention_spelling_is_binary_and_canonical_attention_is_exact(spelling):
    torch.manual_seed(0)
    model = Attention(spelling, kv_heads=SPELLINGS[spelling]).eval()
    x, context = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, -3:] = True
    args = (x, context, pad)
    canonical, ctx = trace(model, args, "bipft", passes=PIPELINE[:3])
    assert count(canonical, ATTENTION) == 1 and not ctx.report.skips, ctx.report.summary()
    with torch.no_grad():
        torch.testing.assert_close(canonical(*args), model(*args), rtol=1e-5, atol=1e-6)
    gm = bitfx.binarize(model, args, {"preset": "bipft", "kernels": "reference"})
    assert (count(gm, BIT_LINEAR), count(gm, BIT_ATTENTION)) == (4, 1), gm.bitfx_report.summary()
    assert not gm.bitfx_report.skips
