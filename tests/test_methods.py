"""The method registry (bitfx.ops.methods): one entry per method, looked up by the ops, the config,
the passes, calibration and the cost model; a new method is one register() call."""
import pytest
import torch

import bitfx
from bitfx import BinarizeConfig
from bitfx.ops import methods
from bitfx.ops import quantizers as Q


def test_duplicate_method_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="'sign_tensor' is already registered.*another name"):
        methods.register(methods.WeightMethod("sign_tensor", Q.weight_sign_tensor, planes=1,
                                              per_channel=False, paper="-"))


def test_unknown_method_names_the_accepted_ones():
    with pytest.raises(ValueError, match="unknown probability method 'hard' .*'bivit', 'elastic', 'bool'"):
        methods.prob_method("hard")


@pytest.mark.parametrize("name", list(methods.WEIGHT))
def test_weight_method_dequantized_is_codes_times_scale(name):
    w = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    m = methods.weight_method(name)
    codes, scale, value = m.quantize(w)
    assert set(codes.unique().tolist()) <= ({-1.0, 0.0, 1.0} if m.ternary else {-1.0, 1.0})
    assert scale.numel() == (6 if m.per_channel else 1)
    torch.testing.assert_close(m.dequantized(w), value, rtol=0, atol=0)


def sign_row_median(w, scale=None):
    """Test-only method: sign(W - row median) · row mean|W| (straight-through identity)."""
    codes = Q.sign(w - w.median(dim=1, keepdim=True).values).detach()
    s = w.abs().mean(dim=1).detach() if scale is None else scale.reshape(-1)
    return codes, s, (w - w.detach()) + s[:, None] * codes


def test_a_registered_method_is_one_entry_for_config_op_and_cost():
    method = methods.WeightMethod("sign_row_median", sign_row_median, planes=1, per_channel=True, paper="test")
    methods.register(method)
    try:
        cfg = BinarizeConfig.preset("bibert", weight="sign_row_median")
        model = torch.nn.Sequential(torch.nn.Linear(16, 8)).eval()
        x = torch.randn(3, 16)
        gm = bitfx.binarize(model, (x,), cfg.replace(kernels="reference"))
        w = model[0].weight.detach()
        xs = Q.sign(x) * x.abs().mean(-1, keepdim=True)  # bibert activations: per-token mean|x|
        expected = xs @ method.dequantized(w).t() + model[0].bias.detach()
        with torch.no_grad():
            torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)
        d = bitfx.diff(model, (x,), cfg)
        assert d.totals["bops_after"] == 3 * 16 * 8  # 1 BOP per binary MAC: planes=1, 1-bit activations
        # bytes: 16·8 weights at 1 bit + one fp32 scale per output row (per_channel) + fp32 bias
        assert d.totals["bytes_after"] == 16 * 8 // 8 + 4 * 8 + 4 * 8
    finally:
        del methods.WEIGHT["sign_row_median"]
    with pytest.raises(ValueError, match="weight='sign_row_median'"):
        BinarizeConfig(weight="sign_row_median")
