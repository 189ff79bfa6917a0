"""The Relax converter registry (keyed by op object) and the importer's report of unsupported ops."""

from __future__ import annotations

import pytest
import torch

import bitfx
from bitfx.ops.attention_products import BINARY_PV, SIGN_SCORES
from bitfx.relax import converters
from bitfx.relax.importer import ExportError, to_relax


def test_every_bitfx_export_op_has_one_converter():
    ops = converters.converted_ops()
    assert {torch.ops.bitfx.bit_linear.default, SIGN_SCORES, BINARY_PV} <= set(ops)
    ctx = converters.ConvertContext()
    assert {"bit_linear.default", "sign_scores.default", "binary_pv.default"} <= set(converters.convert_map(ctx))


def test_duplicate_converter_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"already registered \(bitfx.relax.converters.convert_bit_linear\)"):
        converters.converter(torch.ops.bitfx.bit_linear.default)(lambda node, importer, ctx: None)


def test_converter_key_must_be_an_op_object():
    with pytest.raises(TypeError, match="got 'bit_linear.default'"):
        converters.converter("bit_linear.default")


class _TwoOdd(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x):
        y = torch.cummax(self.fc(x), -1).values
        return torch.special.i0e(y)


def test_every_unsupported_op_is_reported_at_once():
    inputs = (torch.randn(2, 4, 16),)
    gm = bitfx.binarize(_TwoOdd().eval(), inputs)
    with pytest.raises(ExportError, match=r"cannot export 2 node\(s\).*cummax.*special_i0e") as err:
        to_relax(gm, inputs, dynamic=False)
    assert "keep those layers out" in str(err.value)


def test_a_target_lowers_to_its_kernel_set(monkeypatch):
    """to_relax asks bitfx.targets.registry for the target's kernel set, not codegen directly."""
    from bitfx.targets import registry

    asked = []
    real = registry.implementation

    def spy(kernel_set, op):
        asked.append((kernel_set, op))
        return real(kernel_set, op)

    monkeypatch.setattr(registry, "implementation", spy)
    inputs = (torch.randn(2, 3, 64),)
    gm = bitfx.binarize(torch.nn.Sequential(torch.nn.Linear(64, 32)).eval(), inputs)
    to_relax(gm, inputs, target="linux-arm64")
    assert ("arm64", "gemm") in asked and ("arm64", "pack_rows") in asked
    assert not any(kernel_set != "arm64" for kernel_set, _ in asked)


def test_gelu_rational_erf_is_within_its_error_floor():
    from bitfx.relax.importer import erf_rational, gelu

    x = torch.linspace(-12, 12, 100001)
    assert float((erf_rational(x) - torch.erf(x)).abs().max()) < 5e-7
    assert float((gelu(x) - torch.nn.functional.gelu(x)).abs().max()) < 2e-6
    assert float((gelu(x, "tanh") - torch.nn.functional.gelu(x, approximate="tanh")).abs().max()) < 2e-6
