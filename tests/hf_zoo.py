"""A zoo of real model code: Hugging Face ``transformers`` models with tiny random-init configs
(no downloads), ``torch.nn`` transformers with masks, and a BinaryViT-style pyramid.

Every factory takes no arguments and returns ``(model.eval(), args, kwargs)`` as a user holds
them (HF models take a tokenizer-style dict of keyword inputs; ``use_cache`` is left at HF's
default, True, for the decoders). A factory is also a valid ``bitfx`` CLI factory
(``bitfx diff tests/hf_zoo.py:bert``).

``ZOO[name]`` holds the factory and what the default ``bipft`` config should produce when every
projection is binarized: ``linears`` (``bit_linear`` nodes; embeddings, ``pooler``, ``lm_head``,
``head`` and ``classifier`` modules stay float under the default keep patterns) and
``attentions`` (``bit_attention`` nodes). How the counts follow from the config:

========================  =======================================  ==========================
model                     linears                                  attentions
========================  =======================================  ==========================
BERT / RoBERTa / ViT      6 L (q, k, v, o, intermediate, output)   L
DistilBERT                6 L (q_lin, k_lin, v_lin, out_lin, 2 ffn) L
GPT-2                     6 L (c_attn packed qkv split in 3,       L
                          c_proj, c_fc, mlp.c_proj; Conv1D = x @ P + b)
Llama                     7 L (q, k, v, o, gate, up, down)         L (GQA: 4 q heads, 2 kv)
T5 / BART                 6 L_enc + 10 L_dec (decoder: self 4,     L_enc + 2 L_dec
                          cross 4, ffn 2)
nn.Transformer (2 masks)  6 L_enc + 10 L_dec                       L_enc + 2 L_dec
nn.TransformerDecoderLyr  10 (self 3 + 1, cross 3 + 1, ffn 2)      2
BinaryViT pyramid         6 per block (qkv in 3, proj, fc1, fc2)   1 per block
========================  =======================================  ==========================

A packed q/k/v projection (``nn.MultiheadAttention``'s ``in_proj_weight``, GPT-2's ``c_attn``, a
``qkv`` linear) is split by ``split_packed_projections`` into one binary linear per part, each with
its own scales: 3 linears for q, k, v (cross attention: ``w_q``, and ``w_kv`` split into k and v),
4 with ``out_proj``.

Sizes are tiny (hidden 32-64, 1-2 layers, seq 8-12) so a model builds in milliseconds.
Nothing here imports bitfx.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH, SEQ, VOCAB = 2, 8, 64
HIDDEN, HEADS, FFN, LAYERS = 32, 4, 64, 2


@dataclass
class ZooModel:
    """A zoo entry: ``make()`` -> (model, args, kwargs) and the expected bipft counts."""

    make: Callable[[], tuple[nn.Module, tuple, dict]]
    linears: int
    attentions: int
    family: str                 # "encoder" | "decoder" | "encoder-decoder" | "vision" | "torch.nn"
    cache: bool = False         # returns a KV cache with its default use_cache
    notes: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)


def _tokens(batch: int = BATCH, seq: int = SEQ, seed: int = 0, pad: bool = True) -> dict[str, torch.Tensor]:
    """A tokenizer-style dict: input_ids and attention_mask (the last two tokens of row 0 padded)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _hf(cls, config, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls(config).eval()


# ------------------------------------------------------------------------- Hugging Face encoders
def bert(layers: int = LAYERS):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
                     intermediate_size=FFN, max_position_embeddings=64, attn_implementation="sdpa")
    x = _tokens()
    x["token_type_ids"] = torch.zeros_like(x["input_ids"])
    return _hf(BertModel, cfg), (), x


def roberta(layers: int = LAYERS):
    from transformers import RobertaConfig, RobertaModel

    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
                        intermediate_size=FFN, max_position_embeddings=64, pad_token_id=0,
                        attn_implementation="sdpa")
    return _hf(RobertaModel, cfg), (), _tokens()


def distilbert(layers: int = LAYERS):
    from transformers import DistilBertConfig, DistilBertModel

    cfg = DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=layers, n_heads=HEADS, hidden_dim=FFN,
                           max_position_embeddings=64, attn_implementation="sdpa")
    return _hf(DistilBertModel, cfg), (), _tokens()


def vit(layers: int = LAYERS):
    """ViT on 16x16 images in 4x4 patches (16 patches + CLS); pixel_values positional."""
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=layers,
                    num_attention_heads=HEADS, intermediate_size=FFN, attn_implementation="sdpa")
    torch.manual_seed(1)
    return _hf(ViTModel, cfg), (torch.randn(BATCH, 3, 16, 16),), {}


# ------------------------------------------------------------------------- Hugging Face decoders
def gpt2(layers: int = LAYERS):
    """GPT-2 with its defaults: use_cache=True (returns a DynamicCache), Conv1D projections."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=HIDDEN, n_layer=layers, n_head=HEADS,
                     n_inner=FFN, bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    return _hf(GPT2LMHeadModel, cfg), (), _tokens()


def llama(layers: int = LAYERS):
    """Llama with grouped-query attention (4 query heads, 2 key/value heads) and rotary embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=layers,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS // 2, max_position_embeddings=64,
                      attn_implementation="sdpa")
    return _hf(LlamaForCausalLM, cfg), (), _tokens()


def t5(layers: int = 1):
    """T5 (relative position bias, no 1/sqrt(d) scale); encoder and decoder inputs as keywords."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=FFN, num_layers=layers,
                   num_decoder_layers=layers, num_heads=HEADS, relative_attention_num_buckets=8,
                   decoder_start_token_id=0, pad_token_id=0, attn_implementation="sdpa")
    x = _tokens()
    x["decoder_input_ids"] = _tokens(seq=SEQ // 2, seed=1)["input_ids"]
    return _hf(T5ForConditionalGeneration, cfg), (), x


def bart(layers: int = 1):
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=layers, decoder_layers=layers,
                     encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
                     decoder_ffn_dim=FFN, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                     eos_token_id=2, decoder_start_token_id=2, attn_implementation="sdpa")
    x = _tokens()
    x["decoder_input_ids"] = _tokens(seq=SEQ // 2, seed=1)["input_ids"]
    return _hf(BartForConditionalGeneration, cfg), (), x


# ------------------------------------------------------------------------- torch.nn transformers
class Seq2Seq(nn.Module):
    """``nn.Transformer`` as users call it: a causal target mask and key padding masks."""

    def __init__(self, d: int = HIDDEN, layers: int = 1, float_causal: bool = False):
        super().__init__()
        self.float_causal = float_causal
        self.transformer = nn.Transformer(d, HEADS, layers, layers, FFN, dropout=0.1, batch_first=True)

    def forward(self, src, tgt, src_key_padding_mask=None, tgt_key_padding_mask=None):
        n = tgt.shape[1]
        if self.float_causal:  # PyTorch's own helper (0 / -inf), beside boolean padding masks
            causal = nn.Transformer.generate_square_subsequent_mask(n, device=tgt.device)
        else:  # a boolean causal mask, like the boolean padding masks (True = masked)
            causal = torch.ones(n, n, dtype=torch.bool, device=tgt.device).triu(1)
        return self.transformer(src, tgt, tgt_mask=causal, src_key_padding_mask=src_key_padding_mask,
                                tgt_key_padding_mask=tgt_key_padding_mask,
                                memory_key_padding_mask=src_key_padding_mask, tgt_is_causal=True)


def nn_transformer(float_causal: bool = False):
    torch.manual_seed(0)
    model = Seq2Seq(float_causal=float_causal).eval()
    src, tgt = torch.randn(BATCH, SEQ, HIDDEN), torch.randn(BATCH, SEQ // 2, HIDDEN)
    src_pad = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    src_pad[0, -2:] = True
    tgt_pad = torch.zeros(BATCH, SEQ // 2, dtype=torch.bool)
    tgt_pad[1, -1] = True
    return model, (src, tgt), {"src_key_padding_mask": src_pad, "tgt_key_padding_mask": tgt_pad}


class DecoderWithMemory(nn.Module):
    """``nn.TransformerDecoderLayer``: causal self attention, then cross attention to ``memory``."""

    def __init__(self, d: int = HIDDEN):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(d, HEADS, FFN, dropout=0.1, batch_first=True)

    def forward(self, tgt, memory):
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], device=tgt.device)
        return self.layer(tgt, memory, tgt_mask=causal)


def decoder_layer():
    torch.manual_seed(0)
    model = DecoderWithMemory().eval()
    return model, (torch.randn(BATCH, SEQ // 2, HIDDEN), torch.randn(BATCH, SEQ, HIDDEN)), {}


# ------------------------------------------------------------------------- BinaryViT-style pyramid
class Affine(nn.Module):
    """Per-channel ``x * gamma + beta`` (BinaryViT puts one before each residual add)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma, self.beta = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return x * self.gamma + self.beta


class PyramidBlock(nn.Module):
    """Token mixer = multi-head attention + average-pooling branches (3x3 and 5x5 over the token
    grid) ; an MLP; a per-channel affine before each residual add (BinaryViT, arXiv 2305.14730)."""

    def __init__(self, dim: int, heads: int, side: int):
        super().__init__()
        self.heads, self.side = heads, side
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.affine1, self.affine2 = Affine(dim), Affine(dim)

    def mix(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
        grid = x.transpose(1, 2).reshape(b, c, self.side, self.side)
        pools = sum(F.avg_pool2d(grid, s, 1, s // 2, count_include_pad=False) for s in (3, 5))
        return attn + pools.flatten(2).transpose(1, 2)

    def forward(self, x):
        x = x + self.affine1(self.mix(self.norm1(x)))
        return x + self.affine2(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class BinaryViTPyramid(nn.Module):
    """Two stages (8x8 tokens of dim 32, then 4x4 of dim 64), conv patch embedding and merging
    (float), global average pooling, a float ``head``."""

    def __init__(self, dims=(32, 64), depths=(1, 1), classes: int = 10):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dims[0], 4, 4)
        self.merge = nn.Conv2d(dims[0], dims[1], 2, 2)
        self.stage1 = nn.Sequential(*[PyramidBlock(dims[0], 2, 8) for _ in range(depths[0])])
        self.stage2 = nn.Sequential(*[PyramidBlock(dims[1], 4, 4) for _ in range(depths[1])])
        self.norm, self.head = nn.LayerNorm(dims[1]), nn.Linear(dims[1], classes)

    def forward(self, images):
        x = self.patch_embed(images)                        # [B, C, 8, 8]
        x = self.stage1(x.flatten(2).transpose(1, 2))
        b, n, c = x.shape
        x = self.merge(x.transpose(1, 2).reshape(b, c, 8, 8))
        x = self.stage2(x.flatten(2).transpose(1, 2))
        return self.head(self.norm(x.mean(1)))


def binary_vit():
    torch.manual_seed(0)
    return BinaryViTPyramid().eval(), (torch.randn(BATCH, 3, 32, 32),), {}


ZOO: dict[str, ZooModel] = {
    "bert": ZooModel(bert, 6 * LAYERS, LAYERS, "encoder"),
    "roberta": ZooModel(roberta, 6 * LAYERS, LAYERS, "encoder"),
    "distilbert": ZooModel(distilbert, 6 * LAYERS, LAYERS, "encoder"),
    "vit": ZooModel(vit, 6 * LAYERS, LAYERS, "vision"),
    "gpt2": ZooModel(gpt2, 6 * LAYERS, LAYERS, "decoder", cache=True),
    "llama": ZooModel(llama, 7 * LAYERS, LAYERS, "decoder", cache=True, notes="GQA 4/2 heads, rotary"),
    "t5": ZooModel(t5, 6 + 10, 1 + 2, "encoder-decoder", cache=True, notes="relative position bias"),
    "bart": ZooModel(bart, 6 + 10, 1 + 2, "encoder-decoder", cache=True),
    "nn_transformer": ZooModel(nn_transformer, 6 + 10, 1 + 2, "torch.nn", notes="causal + padding masks"),
    "nn_transformer_float_mask": ZooModel(lambda: nn_transformer(float_causal=True), 6 + 10, 1 + 2, "torch.nn",
                                          notes="float causal mask + bool padding masks"),
    "decoder_layer": ZooModel(decoder_layer, 10, 2, "torch.nn", notes="cross attention to memory"),
    "binary_vit": ZooModel(binary_vit, 6 * 2, 2, "vision", notes="avg-pool token mixer, affine"),
}


def call(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    """``model(*args, **kwargs)`` without gradients."""
    with torch.no_grad():
        return model(*args, **kwargs)
