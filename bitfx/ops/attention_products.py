"""``bit_attention``'s two integer products as torch.library ops of their own (for the device export).

    S[..., i, j] = sum_d sign(q[..., i, d]) * sign(k[..., j, d])      # sign_scores(q, k)
    O[..., i, d] = sum_j p[..., i, j] * sign(v[..., j, d])            # binary_pv(p, v), p in {0, 1}

``bitfx.export`` decomposes ``bit_attention`` into its reference formula (``bit_attention_formula``)
with these two products kept as ops, so that everything else decomposes into ATen (float Relax ops on
the device) while these two become ``call_tir`` of the popcount kernels (``bitfx/relax/converters.py``).
Both return the exact integers as float32: what the reference's float matmul of ±1/{0,1} codes gives.
"""
from __future__ import annotations

import torch

from bitfx.ops.quantizers import act_sign_codes

__all__ = ["SIGN_SCORES", "BINARY_PV", "bit_attention_with_products"]


@torch.library.custom_op("bitfx_export::sign_scores", mutates_args=())
def sign_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``S[..., i, j] = sum_d sign(q[..., i, d]) * sign(k[..., j, d])`` (float32)."""
    return act_sign_codes(q.float()) @ act_sign_codes(k.float()).transpose(-2, -1)


@sign_scores.register_fake
def _(q, k):
    return q.new_empty((*q.shape[:-1], k.shape[-2]), dtype=torch.float32)


@torch.library.custom_op("bitfx_export::binary_pv", mutates_args=())
def binary_pv(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``O[..., i, d] = sum_j p[..., i, j] * sign(v[..., j, d])`` for p in {0, 1} (float32)."""
    return p.float() @ act_sign_codes(v.float())


@binary_pv.register_fake
def _(p, v):
    return p.new_empty((*p.shape[:-1], v.shape[-1]), dtype=torch.float32)


SIGN_SCORES = torch.ops.bitfx_export.sign_scores.default
BINARY_PV = torch.ops.bitfx_export.binary_pv.default


def bit_attention_with_products(*args):
    """``bit_attention``'s formula with its two integer matmuls as ``sign_scores`` / ``binary_pv``."""
    from bitfx.ops.attention import bit_attention_formula

    return bit_attention_formula(*args, sign_scores=torch.ops.bitfx_export.sign_scores,
                                 binary_pv=torch.ops.bitfx_export.binary_pv)
