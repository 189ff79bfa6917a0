"""The report tells the truth: binary ops are counted once each, canonicalizations apart; every
candidate left float is listed with its reason."""
import torch

import bitfx  # noqa: F401
from bitfx.passes.context import Report, Rewrite, Skip


def test_summary_counts_binary_ops_not_canonicalizations():
    report = Report(
        rewrites=[Rewrite("canonicalize_attention", "attention", "l0", ["softmax"], "a", "attention"),
                  Rewrite("binarize_attention", "attention", "l0", ["a"], "b", "bit_attention"),
                  Rewrite("binarize_linear", "linear", "l0.q", ["linear"], "c", "bit_linear"),
                  Rewrite("recognize_fake_quant", "linear", "l0.k", ["linear_1"], "d", "bit_linear")],
        skips=[Skip("binarize_linear", "linear", "pooler.dense", "config", "keep pattern '*pooler*'")])
    lines = report.summary().splitlines()
    assert lines[0] == ("binary ops: 3 (2 bit_linear, 1 bit_attention); canonicalized: 1 attention; "
                        "left in float: 1")
    assert "  1 bit_linear by recognize_fake_quant" in lines
    assert lines[-1] == "  kept linear pooler.dense: config (keep pattern '*pooler*')"
    assert [r.target for r in report.binary_ops] == ["bit_attention", "bit_linear", "bit_linear"]


def test_model_summary_lists_an_einsum_attention_left_float():
    """An einsum attention that is not q·kᵀ / P·v is reported (it was invisible before)."""
    class Odd(torch.nn.Module):
        def forward(self, q, k, v):
            p = torch.einsum("bhqd,bhkd->bhqk", q, k).softmax(-1)
            return torch.einsum("bhqk,bhqd->bhkd", p, v)  # contracts the queries: not attention

    x = torch.randn(1, 2, 4, 8)
    gm = bitfx.binarize(Odd(), (x, x.flip(-1), x * 2), {"preset": "bipft", "kernels": "reference"})
    (skip,) = gm.bitfx_report.skips
    assert (skip.kind, skip.reason) == ("attention", "unrecognised") and "einsum" in skip.detail
    assert "kept attention <root>: unrecognised (einsum" in gm.bitfx_report.summary()
