"""bit_attention and the canonical attention op against independent NumPy formulations."""
import math

import numpy as np
import pytest
import torch

import bitfx  # noqa: F401
from bitfx.ops import quantizers as q

OP = torch.ops.bitfx.bit_attention


def np_sign(u):
    return np.where(u < 0, -1.0, 1.0)


def np_softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_bit_attention(qt, k, v, mask, prob_mode, beta=0.25, alpha_p=None, est=None, causal=False):
    d = qt.shape[-1]
    qs, ks = np.abs(qt).mean(-1), np.abs(k).mean(-1)
    s_int = np_sign(qt) @ np.swapaxes(np_sign(k), -1, -2)
    s = s_int * qs[..., :, None] * ks[..., None, :]
    if est is not None:
        eq, ek, _ = est
        r = eq.shape[-1] // 2
        rq, uq, rk, uk = eq[..., :r], eq[..., r:], ek[..., :r], ek[..., r:]
        s = s + uq @ np.swapaxes(rk, -1, -2) + rq @ np.swapaxes(uk, -1, -2) + rq @ np.swapaxes(rk, -1, -2)
    s = s / math.sqrt(d)
    if causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
    if mask is not None:
        s = s + mask
    if prob_mode == "bool":
        pb = (s > 0).astype(np.float64)
    else:
        p = np_softmax(s)
        if prob_mode == "bivit":
            pb = (p >= beta * p.max(-1, keepdims=True)).astype(np.float64)
        else:
            a = 4 * p.mean() if alpha_p is None else alpha_p
            pb = a * np.clip(np.round(p / a), 0, 1)
    vs = np.abs(v).mean(axis=(-2, -1), keepdims=True)
    out = pb @ (vs * np_sign(v))
    if est is not None:
        out = out + pb @ est[2]
    return out


@pytest.mark.parametrize("prob_mode", ["bivit", "elastic", "bool"])
@pytest.mark.parametrize("with_est", [False, True])
def test_reference_matches_numpy(prob_mode, with_est):
    g = torch.Generator().manual_seed(3)
    B, H, L, D = 2, 3, 6, 10
    qt, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    mask = torch.randn(B, 1, L, L, generator=g)
    est = [torch.randn(B, H, L, 2, generator=g) * 0.1, torch.randn(B, H, L, 2, generator=g) * 0.1,
           torch.randn(B, H, L, 1, generator=g) * 0.1] if with_est else [None] * 3
    y = OP(qt, k, v, mask, None, None, None, None, *est, None, False, prob_mode)
    expect = np_bit_attention(qt.double().numpy(), k.double().numpy(), v.double().numpy(),
                              mask.double().numpy(), prob_mode,
                              est=[e.double().numpy() for e in est] if with_est else None)
    np.testing.assert_allclose(y.numpy(), expect, rtol=1e-4, atol=1e-4)


def test_causal_and_bool_mask():
    g = torch.Generator().manual_seed(4)
    qt, k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))
    keep = torch.rand(1, 1, 5, 5, generator=g) > 0.2
    keep[..., 0] = True
    y = OP(qt, k, v, keep, None, None, None, torch.tensor(0.25), None, None, None, None, True, "bivit")
    additive = np.where(keep.numpy(), 0.0, -np.inf)
    expect = np_bit_attention(qt.double().numpy(), k.double().numpy(), v.double().numpy(), additive,
                              "bivit", causal=True)
    np.testing.assert_allclose(y.numpy(), expect, rtol=1e-4, atol=1e-4)


def test_integer_scores_are_exact():
    qt = torch.randn(2, 4, 7, 33)
    k = torch.randn(2, 4, 9, 33)
    qc, kc = q.sign(qt), q.sign(k)
    s = (qc @ kc.transpose(-2, -1)).long()
    pq, pk = (qt >= 0).numpy(), (k >= 0).numpy()
    expect = 33 - 2 * (pq[..., :, None, :] ^ pk[..., None, :, :]).sum(-1)
    assert torch.equal(s, torch.from_numpy(expect))


@pytest.mark.parametrize("prob_mode", ["bivit", "elastic", "bool"])
def test_opcheck(prob_mode):
    g = torch.Generator().manual_seed(0)
    B, H, L, D = 2, 2, 5, 8
    t = lambda *s: torch.randn(*s, generator=g, requires_grad=True)  # noqa: E731
    args = (t(B, H, L, D), t(B, H, L, D), t(B, H, L, D), torch.randn(B, 1, L, L, generator=g),
            torch.tensor(1.0, requires_grad=True), None, torch.tensor(0.7, requires_grad=True),
            torch.tensor(0.3, requires_grad=True) if prob_mode == "elastic" else None,
            t(B, H, L, 2), t(B, H, L, 2), t(B, H, L, 1), None, False, prob_mode)
    torch.library.opcheck(OP.default, args)


def test_canonical_attention_matches_sdpa_and_opcheck():
    g = torch.Generator().manual_seed(1)
    qt, k, v = (torch.randn(2, 3, 6, 8, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.randn(2, 1, 6, 6, generator=g)
    for args, kw in [((mask, None, False, 0.0), dict(attn_mask=mask)),
                     ((None, 0.3, True, 0.0), dict(scale=0.3, is_causal=True))]:
        ours = torch.ops.bitfx.attention(qt, k, v, *args)
        ref = torch.nn.functional.scaled_dot_product_attention(qt, k, v, **kw)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.bitfx.attention.default, (qt, k, v, mask, None, False, 0.0))


def test_bivit_ste_passes_through_softmax():
    """BiViT: P_b = 1[P >= β rowmax P]; gradient is P_b.detach() - P.detach() + P."""
    p = torch.softmax(torch.randn(3, 5), -1).requires_grad_(True)
    codes, _, value = q.prob_bivit(p, 0.25)
    torch.testing.assert_close(value, codes)
    value.sum().backward()
    torch.testing.assert_close(p.grad, torch.ones(3, 5))


def test_elastic_probs_and_gradient():
    p = torch.tensor([[0.05, 0.2, 0.5, 0.9]], requires_grad=True)
    alpha = torch.tensor(0.4, requires_grad=True)
    codes, _, value = q.prob_elastic(p, alpha)
    assert codes.tolist() == [[0.0, 0.0, 1.0, 1.0]]  # round(p/α) clamped to {0, 1}
    torch.testing.assert_close(value, 0.4 * codes)
    value.sum().backward()
    ratio = p.detach() / 0.4
    inside = (ratio <= 1).float()
    torch.testing.assert_close(p.grad, inside)
    torch.testing.assert_close(alpha.grad, ((codes - ratio) * inside + (1 - inside)).sum())


def test_bool_probs():
    s = torch.tensor([[-1.0, 0.0, 0.5, float("-inf")]])
    codes, _, _ = q.prob_bool(s)
    assert codes.tolist() == [[0.0, 0.0, 1.0, 0.0]]


def test_bad_prob_mode_is_named():
    x = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="prob_mode='hard'"):
        OP(x, x, x, None, None, None, None, None, None, None, None, None, False, "hard")


@pytest.mark.parametrize("preset", ["bit", "bipft"])
def test_uniform_attention_trains_with_finite_gradients(preset):
    """A random-init HF BERT attends almost uniformly (P ≈ 1/24): elastic binarization rounds every probability
    to 0 (α_P = 4·mean P, P/α_P ≈ 1/4), the attention output is all zeros and the next linear's α calibrates
    to 0. Its STE divided u by α = 0, and every gradient upstream was NaN (56 of the binarized model's
    parameters under `bit`); the divisor is floored at EPS now, the forward unchanged."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=300, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    qat = bitfx.binarize(model, {"input_ids": ids}, preset)
    alphas = {n: p for n, p in qat.named_parameters() if n.startswith("bitfx_alpha__")}
    assert any(float(a) == 0.0 for a in alphas.values())  # the case above occurs in this model
    out = qat(input_ids=ids)
    (out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state).pow(2).mean().backward()
    grads = {n: p.grad for n, p in qat.named_parameters() if p.grad is not None}
    assert len(grads) > 30
    assert all(torch.isfinite(g).all() for g in grads.values()), [n for n, g in grads.items() if not g.isfinite().all()]


def test_value_codes_at_zero_alpha_have_finite_gradients():
    from bitfx.ops import attention as A

    v = torch.zeros(1, 2, 3, 4, requires_grad=True)
    alpha_v = torch.tensor(0.0, requires_grad=True)
    _, _, value = A._value_codes(v, alpha_v)
    value.sum().backward()
    torch.testing.assert_close(v.grad, torch.zeros_like(v))
    torch.testing.assert_close(alpha_v.grad, torch.tensor(24.0))  # dQ/dα_v = sign(0) = +1 below EPS, 24 values
