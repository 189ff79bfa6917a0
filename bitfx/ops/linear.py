"""``bitfx::bit_linear`` — a binary linear layer.

    y = (Qa(x) · Qw(W)ᵀ) ⊙ scales + bias
      = (acc * row_scale[m]) * col_scale[n] + bias[n],   acc = Σ_k a_codes[m,k] · w_codes[n,k]

``acc`` is an exact integer (a popcount GEMM in the kernels); ``row_scale`` comes from the
activation quantizer (α, per-token mean|x+move|, or absmax γ/Qp), ``col_scale`` from the weight
quantizer. The reference below is the definition every kernel is tested against.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from bitfx.ops import methods
from bitfx.ops._autograd import register_ste


def check_modes(weight_mode: str, act_mode: str, act_bits: int) -> None:
    """``weight_mode`` / ``act_mode`` name registered methods (``bitfx.ops.methods``); bits fit the act method."""
    if weight_mode not in methods.WEIGHT:
        raise ValueError(f"bit_linear: weight_mode={weight_mode!r} (accepted: {', '.join(map(repr, methods.WEIGHT))})")
    if act_mode not in methods.ACT:
        raise ValueError(f"bit_linear: act_mode={act_mode!r} (accepted: {', '.join(map(repr, methods.ACT))})")
    try:
        methods.check_act_bits(act_mode, act_bits)
    except ValueError as e:
        raise ValueError(f"bit_linear: {e}") from None


def quantize_activation(x: Tensor, move: Optional[Tensor], alpha: Optional[Tensor], act_mode: str, act_bits: int):
    return methods.act_method(act_mode).quantize(x, move, alpha, act_bits)


def quantize_weight(weight: Tensor, weight_scale: Optional[Tensor], weight_mode: str):
    return methods.weight_method(weight_mode).quantize(weight, weight_scale)


def bit_linear_reference(x, weight, bias, weight_scale, move, alpha, weight_mode, act_mode, act_bits):
    """The definition: exact integer accumulation, then the fp32 epilogue."""
    check_modes(weight_mode, act_mode, act_bits)
    dtype = x.dtype
    x = x.float()
    w_codes, col_scale, _ = quantize_weight(weight.float(), weight_scale, weight_mode)
    a_codes, row_scale, _ = quantize_activation(x, move, alpha, act_mode, act_bits)
    # ±1 / small-integer products summed in fp32 are exact while |acc| < 2**24.
    acc = a_codes @ w_codes.t()
    row = row_scale[..., None] if row_scale.dim() else row_scale
    y = (acc * row) * col_scale
    if bias is not None:
        y = y + bias
    return y.to(dtype)


def bit_linear_surrogate(x, weight, bias, weight_scale, move, alpha, weight_mode, act_mode, act_bits):
    """Same value as the reference; its gradient is the straight-through estimator."""
    _, _, wv = quantize_weight(weight.float(), weight_scale, weight_mode)
    _, _, av = quantize_activation(x.float(), move, alpha, act_mode, act_bits)
    return F.linear(av, wv, bias).to(x.dtype)


@torch.library.custom_op("bitfx::bit_linear", mutates_args=())
def bit_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    weight_scale: Optional[Tensor],
    move: Optional[Tensor],
    alpha: Optional[Tensor],
    weight_mode: str,
    act_mode: str,
    act_bits: int,
) -> Tensor:
    """Binary linear layer (see the module docstring). Shapes: x [..., K], weight [N, K] -> [..., N]."""
    return bit_linear_reference(x, weight, bias, weight_scale, move, alpha, weight_mode, act_mode, act_bits)


@bit_linear.register_fake
def _(x, weight, bias, weight_scale, move, alpha, weight_mode, act_mode, act_bits):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


register_ste(bit_linear, bit_linear_surrogate, ["x", "weight", "bias", "weight_scale", "move", "alpha"])
