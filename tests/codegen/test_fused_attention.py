"""The fused host kernel of ``bit_attention`` (bitfx/targets/host_attention.py) equals the op.

Integers are checked exactly: the kernel's packed probability codes against codes computed here from the
definition (torch softmax and the binarizer's rule), allowing a differing code only where the float
decision is within rounding of its threshold, and its integer P·V counts against ``codes · sign(v)``
computed here from the kernel's own codes. The float output then equals ``bit_attention_reference``.
"""
import math

import numpy as np
import pytest
import torch

from bitfx.codegen import fused_attention as FA
from bitfx.ops import native
from bitfx.ops.attention import bit_attention_reference

from codegen_reference import as_numpy_u64, int_matmul, sign

BOUNDARY = 1e-5  # |decision value - threshold| within which float rounding may flip a code


def _unpack(words: torch.Tensor, Lk: int) -> torch.Tensor:
    """uint64 [..., W] -> {0, 1} int64 [..., Lk], bit j of word w = key 64w + j (bits past Lk must be 0)."""
    w = as_numpy_u64(words.contiguous())
    bits = (w[..., :, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
    bits = torch.from_numpy(bits.reshape(*w.shape[:-1], -1).astype(np.int64))
    assert int(bits[..., Lk:].sum()) == 0  # the tail of the last word is zero
    return bits[..., :Lk]


def _expected_codes(q, k, mask, alpha_q, alpha_k, est_q, est_k, scale, causal, mode, param):
    """(codes, boundary): the binarizer's codes from scores computed here, and where a code may flip."""
    qs = q.abs().mean(-1) if alpha_q is None else alpha_q.reshape(())
    ks = k.abs().mean(-1) if alpha_k is None else alpha_k.reshape(())
    s = int_matmul(sign(q), sign(k)).double()
    s = s * (qs[..., :, None] if qs.dim() else qs).double() * (ks[..., None, :] if ks.dim() else ks).double()
    if est_q is not None:
        r = est_q.shape[-1] // 2
        rq, uq, rk, uk = est_q[..., :r], est_q[..., r:], est_k[..., :r], est_k[..., r:]
        s = s + ((uq + rq) @ rk.transpose(-2, -1) + rq @ uk.transpose(-2, -1)).double()
    s = s * scale
    Lq, Lk = s.shape[-2:]
    if causal:
        s = s.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool).triu(1), -math.inf)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
    empty = torch.isinf(s).all(-1, keepdim=True) & (s < 0).all(-1, keepdim=True)
    m = torch.where(empty, 0.0, s.amax(-1, keepdim=True))
    if mode == "bool":
        return (s > 0).long(), s.abs() < BOUNDARY * (1 + s.abs())
    if mode == "bivit":
        beta = 0.25 if param is None else float(param)
        d = s - m - math.log(beta)
        codes = torch.where(empty, True, d >= 0)  # an all-masked row: P = 0 >= β·0, every code 1
        return codes.long(), d.abs() < BOUNDARY * (1 + (s - m).abs())
    p = torch.where(empty, 0.0, torch.softmax(torch.where(empty, 0.0, s), -1))
    ratio = p / max(float(param), 1e-5)
    return (ratio > 0.5).long(), (ratio - 0.5).abs() < BOUNDARY


def _inputs(lead, Lq, Lk, D, Dv, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*lead, n, d, generator=g) for n, d in ((Lq, D), (Lk, D), (Lk, Dv)))
    q[..., 0, 0] = 0.0  # sign(0) = +1
    return q, k, v, g


def _check(q, k, v, mask, alpha_q, alpha_k, alpha_v, param, est_q, est_k, est_v, causal, mode, threads=1):
    """Run the fused kernel (debug outputs) and check codes, counts and the output; returns the codes."""
    D, Lk = q.shape[-1], k.shape[-2]
    scale = 1.0 / math.sqrt(D)
    bias = FA.score_bias(mask)  # the estimators' residual is the kernel's
    out, words, counts = FA.fused_attention(q, k, v, bias, est_v, alpha_q, alpha_k, alpha_v, param, scale, causal,
                                            mode, est_q, est_k, debug=True, threads=threads)
    codes = _unpack(words, Lk)
    want, boundary = _expected_codes(q, k, mask, alpha_q, alpha_k, est_q, est_k, scale, causal, mode, param)
    flips = codes != want
    assert not (flips & ~boundary).any(), f"{int((flips & ~boundary).sum())} codes differ away from a threshold"
    assert int(flips.sum()) <= max(1, want.numel() // 1000)
    # the integer P·V counts, exactly, from the kernel's own codes
    assert torch.equal(counts, int_matmul(codes, sign(v).transpose(-1, -2)))
    # the float output equals the op reference (rows whose codes all agree)
    ref = bit_attention_reference(q, k, v, mask, alpha_q, alpha_k, alpha_v, param, est_q, est_k, est_v, None,
                                  causal, mode)
    same = ~flips.any(-1)
    assert same.any()
    torch.testing.assert_close(out[same], ref[same], rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))
    return codes


MODES = [("bivit", None), ("bivit", 0.1), ("bool", None), ("elastic", 0.05)]


@pytest.mark.parametrize("mode,param", MODES)
@pytest.mark.parametrize("D,Lk,mask_kind,causal", [
    (64, 128, None, False),        # BERT-base head width, whole words of keys
    (32, 70, "bool", True),        # MiniLM head width, Lk not a multiple of 64, causal and a padding mask
    (100, 33, "additive", False),  # D not a multiple of 64 (two words, a 36-bit tail)
])
def test_codes_counts_and_output_equal_the_reference(mode, param, D, Lk, mask_kind, causal):
    lead, Lq = (2, 3), 9
    q, k, v, g = _inputs(lead, Lq, Lk, D, D, seed=D + Lk)  # Dv = D: 100 has a 4-lane tail chunk
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 1, Lk, generator=g) > 0.3
        mask[0, ..., :] = False            # batch 0: every key masked, every row empty
    elif mask_kind == "additive":
        mask = torch.randn(2, 1, Lq, Lk, generator=g)
        mask[1, 0, 2, :] = -math.inf       # one fully masked query row
    p = None if param is None else torch.tensor(param)
    codes = _check(q, k, v, mask, None, None, None, p, None, None, None, causal, mode)
    # rows whose every key is masked, found here from the mask and causality: the reference's codes
    # (masked_softmax gives P = 0: bivit's 0 >= β·0 sets every code, the others none)
    keep = torch.ones(*lead, Lq, Lk, dtype=torch.bool)
    if causal:
        keep &= torch.ones(Lq, Lk, dtype=torch.bool).tril()
    if mask is not None:
        keep &= mask if mask.dtype == torch.bool else mask != -math.inf
    empty = ~keep.any(-1)
    assert int(empty.sum()) >= {None: 0, "bool": 3 * Lq, "additive": 3}[mask_kind]  # the rows made empty above
    assert bool((codes[empty] == (1 if mode == "bivit" else 0)).all())


@pytest.mark.parametrize("mode,param", MODES)
def test_estimators_and_given_scales(mode, param):
    """BiPFT estimators (scores and values), α_q, α_k, α_v given; batch·heads (12) above the threads."""
    lead, Lq, Lk, D, r = (3, 4), 7, 65, 32, 2
    q, k, v, g = _inputs(lead, Lq, Lk, D, 32, seed=7)
    est_q, est_k = torch.randn(*lead, Lq, 2 * r, generator=g) * 0.3, torch.randn(*lead, Lk, 2 * r, generator=g) * 0.3
    est_v = torch.randn(*lead, Lk, 1, generator=g) * 0.2
    mask = torch.randn(Lq, Lk, generator=g)    # one additive mask for every batch and head
    a = [torch.tensor(x) for x in (0.8, 1.1, 0.7)]
    p = None if param is None else torch.tensor(param)
    _check(q, k, v, mask, *a, p, est_q, est_k, est_v, False, mode, threads=None)
    _check(q, k, v, mask, None, None, None, p, est_q, est_k, est_v, True, mode, threads=None)


def _captured_bert_qkv(hidden: int, heads: int, seq: int):
    """q, k, v [batch, heads, seq, D] and the padding mask from a random-init HF BertModel's first layer."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=heads,
                     intermediate_size=2 * hidden, max_position_embeddings=128)
    model = BertModel(cfg).eval()
    att = model.encoder.layer[0].attention.self
    got = {}
    hooks = [getattr(att, n).register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o))
             for n in ("query", "key", "value")]
    ids = torch.randint(1, 64, (2, seq), generator=torch.Generator().manual_seed(1))
    attn = torch.ones(2, seq, dtype=torch.long)
    attn[0, -5:] = 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attn)
    for h in hooks:
        h.remove()
    split = lambda t: t.view(2, seq, heads, hidden // heads).transpose(1, 2)  # noqa: E731
    return split(got["query"]), split(got["key"]), split(got["value"]), attn.bool()[:, None, None, :]


@pytest.mark.parametrize("hidden,heads", [(128, 2), (96, 3)])  # D = 64, 32
@pytest.mark.parametrize("mode,param", MODES)
def test_real_bert_activations(hidden, heads, mode, param):
    q, k, v, mask = _captured_bert_qkv(hidden, heads, seq=37)
    p = None if param is None else torch.tensor(param)
    _check(q, k, v, mask, None, None, None, p, None, None, None, False, mode)


def test_unsupported_calls_are_named_and_bad_input_is_refused(monkeypatch):
    q = torch.randn(2, 5, 32)
    args = [q, q, q, None, None, None, None, None, None, None, None, None, False]
    assert FA.unsupported_reason(*args, "bivit") is None
    assert "elastic" in FA.unsupported_reason(*args, "elastic")  # α_P None: the two-kernel path
    assert "broadcast" in FA.unsupported_reason(q, q[:1], q, *args[3:], "bool")
    est_v = torch.zeros(2, 1, 5, 1)  # broadcast over a dim: the two-kernel path, not a crash
    assert "est_v" in FA.unsupported_reason(*args[:10], est_v, None, False, "bool")
    monkeypatch.setenv("BITFX_FUSED_ATTENTION", "0")
    assert FA.unsupported_reason(*args, "bivit") == "BITFX_FUSED_ATTENTION=0"
    with pytest.raises(ValueError, match="prob_mode='softmax'.*accepted: 'bivit', 'bool', 'elastic'"):
        FA.fused_attention(q, q, q, None, None, None, None, None, None, 0.2, False, "softmax")
    with pytest.raises(ValueError, match=r"does not broadcast to the scores"):
        FA.fused_attention(q, q, q, torch.zeros(3, 5, 5), None, None, None, None, None, 0.2, False, "bool")


def test_two_kernel_path_keeps_what_the_fused_kernel_does_not_cover():
    """elastic with α_P None (a batch-wide mean) goes through the two kernels and still equals the reference."""
    from bitfx.passes.lower_kernels import tvm_bit_attention

    q, k, v, _ = _inputs((2, 2), 6, 20, 32, 16, seed=3)
    args = (q, k, v, None, None, None, None, None, None, None, None, None, False, "elastic")
    before = FA.STATS["fused"]
    out = tvm_bit_attention(*args)
    assert FA.STATS["fused"] == before and FA.STATS["two_kernels"] > 0
    torch.testing.assert_close(out, bit_attention_reference(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config,glue", [("bipft", "inductor"), ("bivit", "inductor"), ("bivit", "eager")])
def test_compiled_hf_bert_uses_the_fused_kernel_and_equals_the_reference(config, glue):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=64)
    model = BertModel(cfg).eval()
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    attn = torch.ones(2, 12, dtype=torch.long)
    attn[1, -3:] = 0
    with torch.no_grad():
        torch._dynamo.reset()
        ref = torch.compile(model, backend="bitfx", options={"config": config, "kernels": "reference"})(
            input_ids=ids, attention_mask=attn).last_hidden_state
        torch._dynamo.reset()
        if glue == "inductor":  # (on a cold cache the C++ ops still build here; calls before that run in Python)
            assert native.load(), native.status()
        before, native_before = FA.calls(), native.attention_calls()
        out = torch.compile(model, backend="bitfx", options={"config": config, "glue": glue})(
            input_ids=ids, attention_mask=attn).last_hidden_state
    assert FA.calls() > before  # the fused kernel ran
    if glue == "inductor":  # the kernel op, through its C++ entry
        assert native.attention_calls() > native_before
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * max(1.0, ref.abs().max().item()))


def _op_cases():
    """(name, args of bitfx_kernels::fused_attention, whether the C++ entry runs it itself)."""
    g = torch.Generator().manual_seed(7)
    B, H, Lq, Lk, D, Dv = 2, 3, 5, 70, 40, 24
    q, k, v = (torch.randn(B, H, n, d, generator=g) for n, d in ((Lq, D), (Lk, D), (Lk, Dv)))
    qt = torch.randn(B, Lq, H, D, generator=g).transpose(1, 2)  # a transposed view, unit last stride
    keep = torch.rand(B, 1, 1, Lk, generator=g) > 0.2
    bias = FA.score_bias(keep)
    full_bias = torch.randn(B, H, Lq, Lk, generator=g)
    est_q, est_k = torch.randn(B, H, Lq, 4, generator=g) * 0.1, torch.randn(B, H, Lk, 4, generator=g) * 0.1
    est_v = torch.randn(B, H, Lk, 1, generator=g) * 0.1
    a = lambda x: torch.tensor(x)  # noqa: E731
    none3 = (None, None, None)
    return [
        ("bivit, mask, beta given", (q, k, v, bias, None, *none3, a(0.3), 0.15, False, "bivit"), True),
        ("bivit default beta, causal", (q, k, v, None, None, *none3, None, 0.15, True, "bivit"), True),
        ("bool, full bias, alphas", (q, k, v, full_bias, None, a(0.5), a(0.7), a(0.9), None, 0.15, False, "bool"), True),
        ("elastic, estimators (bipft)", (qt, k, v, bias, est_v, a(0.5), a(0.7), a(0.9), a(0.02), 0.15, False,
                                         "elastic", est_q, est_k), True),
        ("elastic, alpha_P below EPS", (q, k, v, None, None, *none3, a(0.0), 0.15, False, "elastic"), True),
        ("3-D q, k, v (one head)", (q[0], k[0], v[0], None, None, *none3, None, 0.15, False, "bivit"), False),
        ("a 2-D bias to broadcast", (q, k, v, full_bias[0, 0], None, *none3, None, 0.15, False, "bool"), False),
        ("float64 q, k, v", (q.double(), k.double(), v.double(), None, None, *none3, None, 0.15, False, "bool"), False),
    ]


@pytest.mark.parametrize("name,args,in_cpp", _op_cases(), ids=[c[0] for c in _op_cases()])
def test_fused_attention_cpp_entry_equals_the_python_implementation(name, args, in_cpp):
    """``bitfx_kernels::fused_attention`` through its C++ entry (no Python per call) equals the Python
    implementation bit for bit; what the entry does not cover (other ranks, a bias to broadcast, other dtypes)
    goes to the Python implementation, with the same result."""
    assert native.load(), native.status()  # (waits for the build on a cold cache)
    before, py_before = native.attention_calls(), FA.STATS["calls"]
    out = FA.FUSED_ATTENTION_KERNEL(*args)
    assert (native.attention_calls() - before, FA.STATS["calls"] - py_before) == ((1, 0) if in_cpp else (0, 1))
    *head, est_q, est_k = (*args, None, None)[:14]
    assert torch.equal(out, FA.fused_attention(*head, est_q=est_q, est_k=est_k))


def test_fused_attention_cpp_entry_constants_are_bitfx_constants():
    from bitfx.ops.quantizers import EPS

    assert native.load(), native.status()
    assert native._state["lib"].bitfx_native_eps() == EPS
    with pytest.raises(ValueError, match="fused_attention: prob_mode='softmax'"):
        q = torch.randn(1, 2, 4, 8)
        FA.FUSED_ATTENTION_KERNEL(q, q, q, None, None, None, None, None, None, 0.2, False, "softmax")
