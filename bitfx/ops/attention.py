"""``bitfx::attention`` (canonical float attention) and ``bitfx::bit_attention`` (binary attention).

Shapes follow ``F.scaled_dot_product_attention``: q ``[..., Lq, D]``, k ``[..., Lk, D]``,
v ``[..., Lk, Dv]``, mask broadcastable to ``[..., Lq, Lk]`` — boolean (True = attend) or additive.

``bit_attention`` (DESIGN.md §2)::

    S   = (α_q sign(q)) · (α_k sign(k))ᵀ            # integer popcount scores times α_q[i]·α_k[j]
        + u_q r_kᵀ + r_q u_kᵀ + r_q r_kᵀ             # BiPFT score residual estimators (optional)
    S   = S * scale + mask                           # causal / boolean masks become -inf
    P_b = binarize_probs(softmax(S) or S)            # bivit | elastic | bool
    out = P_b · (α_v sign(v)) + P_b · (r_v 1ᵀ)      # BiPFT value residual (optional)

α_q, α_k default to the per-token mean |·| (outer product, so Q·Kᵀ stays one integer GEMM);
α_v defaults to mean |v| per head (so P·V stays one integer GEMM). ``est_q = [r_q | u_q]``,
``est_k = [r_k | u_k]`` (each ``[..., L, 2r]``) and ``est_v = r_v`` (``[..., Lk, 1]``) are the
outputs of plain linear nodes of the block input, so any target runs them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from bitfx.ops import methods
from bitfx.ops import quantizers as q
from bitfx.ops._autograd import register_ste

PROB_MODES = tuple(methods.PROB)  # registered probability methods (bitfx.ops.methods)


def _default_scale(qt: Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(qt.shape[-1]) if scale is None else scale


def apply_mask(s: Tensor, attn_mask: Optional[Tensor], is_causal: bool) -> Tensor:
    """Additive masks are added; boolean masks (True = attend) and causality become -inf."""
    if is_causal:
        lq, lk = s.shape[-2], s.shape[-1]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask
    return s


# -- canonical float attention ----------------------------------------------------------------
def attention_reference(qt, k, v, attn_mask, scale, is_causal, dropout_p):
    s = (qt @ k.transpose(-2, -1)) * _default_scale(qt, scale)
    p = masked_softmax(apply_mask(s, attn_mask, is_causal), masked=attn_mask is not None)
    if dropout_p > 0.0:
        p = torch.nn.functional.dropout(p, dropout_p, training=True)
    return p @ v


@torch.library.custom_op("bitfx::attention", mutates_args=())
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor],
    scale: Optional[float],
    is_causal: bool,
    dropout_p: float,
) -> Tensor:
    """Float attention, the one spelling canonicalize gives every attention subgraph."""
    return attention_reference(q, k, v, attn_mask, scale, is_causal, dropout_p)


@attention.register_fake
def _(q, k, v, attn_mask, scale, is_causal, dropout_p):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


register_ste(attention, attention_reference, ["q", "k", "v", "attn_mask"])


# -- binary attention -------------------------------------------------------------------------
def _value_codes(v: Tensor, alpha_v: Optional[Tensor]):
    codes = q.sign(v).detach()
    if alpha_v is None:
        scale = v.abs().mean(dim=(-2, -1), keepdim=True).detach()
        return codes, scale, scale * q._ste(codes, v.clamp(-1.0, 1.0))
    scale = alpha_v.reshape(())  # (the divisor floored as in quantizers.act_sign: all-zero values give α_v = 0)
    return codes, scale, scale * q._ste(codes, torch.clamp(v / scale.clamp(min=q.EPS), -1.0, 1.0))


def _score_residual(est_q: Optional[Tensor], est_k: Optional[Tensor]) -> Optional[Tensor]:
    if est_q is None or est_k is None:
        return None
    r = est_q.shape[-1] // 2
    est_q, est_k = est_q.float(), est_k.float()  # the scores are float32, whatever the model's dtype
    rq, uq = est_q[..., :r], est_q[..., r:]
    rk, uk = est_k[..., :r], est_k[..., r:]
    # u_q r_kᵀ + r_q u_kᵀ + r_q r_kᵀ = (u_q + r_q) r_kᵀ + r_q u_kᵀ
    return (uq + rq) @ rk.transpose(-2, -1) + rq @ uk.transpose(-2, -1)


def masked_softmax(s: Tensor, masked: bool = True) -> Tensor:
    """``softmax(s, -1)``, with a row whose every score is -inf (every key masked: a left-padded
    query under a causal mask) giving probabilities 0, as ``F.scaled_dot_product_attention`` gives
    since torch 2.5, not NaN. Such rows are softmaxed as zeros first, so gradients stay finite.
    ``masked=False`` (no mask given; causality alone always keeps the diagonal): a plain softmax."""
    if not masked:
        return torch.softmax(s, dim=-1)
    empty = (s != float("-inf")).sum(dim=-1, keepdim=True) == 0  # no amax: exports as a plain sum
    p = torch.softmax(torch.where(empty, 0.0, s), dim=-1)
    return torch.where(empty, 0.0, p)


def _probs(s: Tensor, prob_param: Optional[Tensor], prob_mode: str, masked: bool = True):
    method = methods.prob_method(prob_mode)
    return method.binarize(masked_softmax(s, masked) if method.softmax else s, prob_param)


def check_prob_mode(prob_mode: str) -> None:
    if prob_mode not in methods.PROB:
        raise ValueError(f"bit_attention: prob_mode={prob_mode!r} (accepted: {', '.join(map(repr, methods.PROB))})")


def sign_scores_reference(qt: Tensor, k: Tensor) -> Tensor:
    """Exact integer scores ``sign(q)·sign(k)ᵀ`` (as float)."""
    return q.act_sign_codes(qt) @ q.act_sign_codes(k).transpose(-2, -1)


def binary_pv_reference(p_codes: Tensor, v: Tensor) -> Tensor:
    """Exact integer ``P_b·sign(v)`` for P_b in {0, 1} (as float)."""
    return p_codes @ q.act_sign_codes(v)


def bit_attention_scores(qt, k, alpha_q, alpha_k, est_q, est_k, attn_mask, scale, is_causal,
                         sign_scores=sign_scores_reference):
    """Masked, scaled scores S (float) from exact integer sign(q)·sign(k)ᵀ (+ BiPFT residual)."""
    qf, kf = qt.float(), k.float()
    qs = qf.abs().mean(dim=-1) if alpha_q is None else alpha_q.reshape(())
    ks = kf.abs().mean(dim=-1) if alpha_k is None else alpha_k.reshape(())
    s = sign_scores(qf, kf).float()  # exact integers in [-D, D]
    s = s * (qs[..., :, None] if qs.dim() else qs) * (ks[..., None, :] if ks.dim() else ks)
    res = _score_residual(est_q, est_k)
    if res is not None:
        s = s + res
    return apply_mask(s * _default_scale(qt, scale), attn_mask, is_causal)


def bit_attention_formula(qt, k, v, attn_mask, alpha_q, alpha_k, alpha_v, prob_param,
                          est_q, est_k, est_v, scale, is_causal, prob_mode, *,
                          sign_scores=sign_scores_reference, binary_pv=binary_pv_reference):
    """The definition of ``bit_attention``, with its two integer products as parameters.

    The reference uses exact float matmuls of ±1/{0,1} codes; the host lowering passes the TVM
    kernels and the export the ops that become ``call_tir`` — one formula for all three.
    """
    check_prob_mode(prob_mode)
    dtype = qt.dtype
    vf = v.float()
    s = bit_attention_scores(qt, k, alpha_q, alpha_k, est_q, est_k, attn_mask, scale, is_causal, sign_scores)
    p_codes, p_scale, _ = _probs(s, prob_param, prob_mode, masked=attn_mask is not None)
    out = binary_pv(p_codes, vf).float()  # exact integers: Σ_j P_b[i,j]·sign(v[j,d])
    if p_scale is not None:
        out = out * p_scale
    v_scale = vf.abs().mean(dim=(-2, -1), keepdim=True) if alpha_v is None else alpha_v.reshape(())
    out = out * v_scale
    if est_v is not None:
        pb = p_codes if p_scale is None else p_codes * p_scale
        out = out + pb @ est_v.float()  # in float32, as every other term (fp16 models)
    return out.to(dtype)


def bit_attention_reference(qt, k, v, attn_mask, alpha_q, alpha_k, alpha_v, prob_param,
                            est_q, est_k, est_v, scale, is_causal, prob_mode):
    return bit_attention_formula(qt, k, v, attn_mask, alpha_q, alpha_k, alpha_v, prob_param,
                                 est_q, est_k, est_v, scale, is_causal, prob_mode)


def bit_attention_surrogate(qt, k, v, attn_mask, alpha_q, alpha_k, alpha_v, prob_param,
                            est_q, est_k, est_v, scale, is_causal, prob_mode):
    _, _, qv = q.act_sign(qt.float(), None, alpha_q)
    _, _, kv = q.act_sign(k.float(), None, alpha_k)
    s = qv @ kv.transpose(-2, -1)
    res = _score_residual(est_q, est_k)
    if res is not None:
        s = s + res
    s = apply_mask(s * _default_scale(qt, scale), attn_mask, is_causal)
    _, _, pv = _probs(s, prob_param, prob_mode, masked=attn_mask is not None)
    _, _, vv = _value_codes(v.float(), alpha_v)
    out = pv @ vv
    if est_v is not None:
        out = out + pv @ est_v
    return out.to(qt.dtype)


@torch.library.custom_op("bitfx::bit_attention", mutates_args=())
def bit_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor],
    alpha_q: Optional[Tensor],
    alpha_k: Optional[Tensor],
    alpha_v: Optional[Tensor],
    prob_param: Optional[Tensor],
    est_q: Optional[Tensor],
    est_k: Optional[Tensor],
    est_v: Optional[Tensor],
    scale: Optional[float],
    is_causal: bool,
    prob_mode: str,
) -> Tensor:
    """Binary attention (see the module docstring)."""
    return bit_attention_reference(q, k, v, attn_mask, alpha_q, alpha_k, alpha_v, prob_param,
                                   est_q, est_k, est_v, scale, is_causal, prob_mode)


@bit_attention.register_fake
def _(q, k, v, attn_mask, alpha_q, alpha_k, alpha_v, prob_param, est_q, est_k, est_v, scale, is_causal, prob_mode):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


register_ste(
    bit_attention,
    bit_attention_surrogate,
    ["q", "k", "v", "attn_mask", "alpha_q", "alpha_k", "alpha_v", "prob_param", "est_q", "est_k", "est_v"],
)
