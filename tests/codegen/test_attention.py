"""Attention integer pieces: sign(q)·sign(k)ᵀ and P_b·sign(v)."""

import pytest
import torch

from bitfx.codegen import runtime

from codegen_reference import int_matmul, sign


@pytest.mark.parametrize("lead,Lq,Lk,D", [((2, 3), 5, 7, 64), ((1,), 1, 33, 100), ((4,), 17, 70, 32)])
def test_sign_scores(lead, Lq, Lk, D):
    g = torch.Generator().manual_seed(Lq * Lk)
    q, k = torch.randn(*lead, Lq, D, generator=g), torch.randn(*lead, Lk, D, generator=g)
    q[..., 0, 0] = 0.0
    k[..., 0, 1] = float("nan")
    s = runtime.sign_scores(q, k)
    assert s.dtype == torch.int32 and s.shape == (*lead, Lq, Lk)
    assert torch.equal(s, int_matmul(sign(q), sign(k)))


def test_sign_scores_noncontiguous_and_lengths_share_a_kernel():
    from bitfx.codegen import build

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 64, 9, generator=g).transpose(-1, -2)  # [2, 9, 64], non-contiguous
    k = torch.randn(2, 11, 64, generator=g)
    runtime.sign_scores(q, k)
    before = build.STATS["compiled"] + build.STATS["loaded"]
    for lk in (1, 5, 40):
        kk = torch.randn(2, lk, 64, generator=g)
        assert torch.equal(runtime.sign_scores(q, kk), int_matmul(sign(q), sign(kk)))
    assert build.STATS["compiled"] + build.STATS["loaded"] == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8, torch.bool])
@pytest.mark.parametrize("lead,Lq,Lk,Dv", [((2, 3), 5, 7, 64), ((1,), 1, 130, 48), ((3,), 9, 64, 100)])
def test_binary_pv(lead, Lq, Lk, Dv, dtype):
    g = torch.Generator().manual_seed(Lk + Dv)
    p = torch.rand(*lead, Lq, Lk, generator=g) > 0.5
    v = torch.randn(*lead, Lk, Dv, generator=g)
    v[..., 0, 0] = 0.0
    out = runtime.binary_pv(p.to(dtype), v)
    assert out.dtype == torch.int32 and out.shape == (*lead, Lq, Dv)
    assert torch.equal(out, int_matmul(p.long(), sign(v).transpose(-1, -2)))


def test_attention_shape_errors():
    with pytest.raises(ValueError, match="sign_scores"):
        runtime.sign_scores(torch.randn(2, 3, 8), torch.randn(2, 3, 9))
    with pytest.raises(ValueError, match="binary_pv"):
        runtime.binary_pv(torch.ones(2, 3, 5), torch.randn(2, 4, 8))
