"""How the diff tool counts operations and bytes — the convention of BiT / BiViT / BiPFT.

Operations::

    OPs = BOPs / 64 + FLOPs

* A float multiply-accumulate is **2 FLOPs** (a linear ``[M, K] x [K, N]`` is ``2·M·K·N``; its bias
  add is not counted, as in the papers' tables).
* A binary multiply-accumulate is **1 BOP** for 1-bit × 1-bit, **k BOPs** for k-bit activations
  × 1-bit weights (bit-serial over k planes), and twice that for ternary (2-plane) weights.
  Attention probabilities are {0, 1} (or {0, α_P}) codes: 1 bit.
* Counted: matmul-family ops (linear, addmm, mm, bmm, matmul, convolution, attention's
  ``Q·Kᵀ`` and ``P·V``, ``2·B·H·Lq·Lk·D`` each) and softmax (5 FLOPs per score: max, subtract,
  exp, sum, divide) — before and after alike, so the ratio compares like with like.
  Not counted, on either side: norms, activations, residual adds, masks and views.
* Counted after binarization only, because binarization adds them: quantizing activations
  (1 FLOP per element to add ``move``, 2 for a per-token ``mean|x|``, 3 for absmax),
  the epilogue (1 FLOP per output for a per-tensor scale, 2 when a scale varies per row or
  column, +1 for bias), probability binarization (1–2 per score), output scaling, and BiPFT's
  estimators (their linears are ordinary float linears; their low-rank score/value products are
  counted here).

Bytes: a parameter or buffer costs ``numel · element_size`` (fp32: 4 bytes); a binarized weight
costs 1 bit per weight (ternary: 2 bits), no padding, plus the scales derived from it at 4 bytes
each (one per output channel for ``sign_channel``, one per tensor otherwise).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch.fx as fx

from bitfx.inspect.graphs import short_name, target_name
from bitfx.ops import methods

Shape = Optional[list]
ShapeOf = Callable[[object], Shape]

MATMULS = {"linear", "mm", "bmm", "matmul"}
ADD_MATMULS = {"addmm", "baddbmm", "addbmm"}
CONVS = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution"}
SOFTMAXES = {"softmax", "_softmax", "_safe_softmax"}
ATTENTIONS = {
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "attention",
}
SOFTMAX_FLOPS = 5
SCALE_BYTES = 4  # derived weight scales are stored as fp32


@dataclass
class Cost:
    macs: int = 0   # float multiply-accumulates
    flops: int = 0  # float operations (2 per MAC + counted elementwise work)
    bops: int = 0   # binary operations

    @property
    def ops(self) -> float:
        return self.bops / 64 + self.flops

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.macs + other.macs, self.flops + other.flops, self.bops + other.bops)


def numel(shape: Shape) -> int:
    return math.prod(shape) if shape is not None else 0


def weight_bits(weight_mode: str) -> int:
    return methods.weight_method(weight_mode).planes


def node_cost(node: fx.Node, shape_of: ShapeOf) -> Cost:
    """The cost of one node for the example inputs (zero for uncounted ops or unknown shapes)."""
    if node.op != "call_function":
        return Cost()
    name = short_name(target_name(node))
    try:
        if target_name(node).startswith("bitfx.bit_linear"):
            return _bit_linear(node, shape_of)
        if target_name(node).startswith("bitfx.bit_attention"):
            return _bit_attention(node, shape_of)
        if name in MATMULS:
            return _matmul(shape_of(node), shape_of(node.args[0]))
        if name in ADD_MATMULS:
            return _matmul(shape_of(node), shape_of(node.args[1]))
        if name in CONVS:
            w = shape_of(node.args[1])
            macs = numel(shape_of(node)) * numel(w[1:])
            return Cost(macs, 2 * macs)
        if name in SOFTMAXES:
            return Cost(flops=SOFTMAX_FLOPS * numel(shape_of(node)))
        if name in ATTENTIONS:
            return _attention(node, shape_of)
    except (TypeError, IndexError, ZeroDivisionError):  # a shape was unknown: not counted
        return Cost()
    return Cost()


def _matmul(out: Shape, lhs: Shape) -> Cost:
    macs = numel(out) * lhs[-1]
    return Cost(macs, 2 * macs)


def _scores(node: fx.Node, shape_of: ShapeOf) -> tuple[int, int, int, int, int]:
    """(B·H, Lq, Lk, D, Dv) of an attention node."""
    q, k, v = (shape_of(a) for a in node.args[:3])
    lq, d, lk, dv = q[-2], q[-1], k[-2], v[-1]
    return numel(q) // (lq * d), lq, lk, d, dv


def _attention(node: fx.Node, shape_of: ShapeOf) -> Cost:
    bh, lq, lk, d, dv = _scores(node, shape_of)
    s = bh * lq * lk
    macs = s * (d + dv)
    return Cost(macs, 2 * macs + SOFTMAX_FLOPS * s)


def _bit_linear(node: fx.Node, shape_of: ShapeOf) -> Cost:
    x, weight, bias, weight_scale, move, alpha, weight_mode, act_mode, act_bits = node.args[:9]
    xs = shape_of(x)
    k, n = xs[-1], shape_of(weight)[0]
    m = numel(xs) // k
    bops = m * k * n * act_bits * weight_bits(weight_mode)
    per_in = methods.act_method(act_mode).flops_per_input(move is not None, alpha is not None)
    row_is_scalar = alpha is not None  # one α per tensor; else a scale per token
    col_is_scalar = not methods.weight_method(weight_mode).per_channel
    per_out = (1 if row_is_scalar and col_is_scalar else 2) + (1 if bias is not None else 0)
    return Cost(flops=per_in * m * k + per_out * m * n, bops=bops)




def _bit_attention(node: fx.Node, shape_of: ShapeOf) -> Cost:
    (q, k, v, mask, alpha_q, alpha_k, alpha_v, prob_param, est_q, est_k, est_v,
     scale, is_causal, prob_mode) = node.args[:14]
    bh, lq, lk, d, dv = _scores(node, shape_of)
    s = bh * lq * lk
    bops = s * d + s * dv
    flops = 0
    flops += 2 * numel(shape_of(q)) if alpha_q is None else 0  # per-token mean|q|
    flops += 2 * numel(shape_of(k)) if alpha_k is None else 0
    flops += 2 * numel(shape_of(v)) if alpha_v is None else 0
    flops += (1 if alpha_q is not None and alpha_k is not None else 2) * s  # α_q·α_k·scale
    prob = methods.prob_method(prob_mode)
    flops += SOFTMAX_FLOPS * s if prob.softmax else 0
    flops += prob.flops_per_score * s
    if est_q is not None and est_k is not None:
        r = shape_of(est_q)[-1] // 2
        flops += 2 * 2 * s * r + bh * lq * r + 2 * s  # (u_q + r_q)·r_kᵀ + r_q·u_kᵀ, added to S
    if est_v is not None:
        flops += 2 * s + bh * lq * dv  # P_b·r_v, broadcast over Dv
    flops += (2 if prob.scaled else 1) * bh * lq * dv  # α_P, α_v
    return Cost(flops=flops, bops=bops)


def derived_scale_bytes(node: fx.Node, shape_of: ShapeOf) -> int:
    """Bytes of the weight scales a packed ``bit_linear`` stores beyond its parameters."""
    weight, weight_scale, weight_mode = node.args[1], node.args[3], node.args[6]
    if weight_scale is not None:
        return 0  # a learnable scale is a parameter, counted as one
    if methods.weight_method(weight_mode).per_channel:
        return SCALE_BYTES * shape_of(weight)[0]
    return SCALE_BYTES


def binary_weight_bytes(numel_: int, weight_mode: str) -> int:
    return -(-numel_ * weight_bits(weight_mode) // 8)
