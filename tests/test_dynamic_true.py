"""torch.compile(..., dynamic=True): every size symbolic from the first compile (no recompiles)."""
import pytest
import torch

import bitfx  # noqa: F401
import bitfx.backend
from models import CASES


@pytest.mark.parametrize("name", ["bert", "encoder_layer", "mha"])
def test_dynamic_true_does_not_recompile_per_shape(name):
    case = CASES[name]
    torch._dynamo.reset()
    # (REPORTS keeps the newest 64: counted from empty, a long test session before this one cannot hide a compile)
    bitfx.backend.REPORTS.clear()
    model = case.model()
    compiled = torch.compile(model, backend="bitfx", dynamic=True, options={"kernels": "reference"})
    with torch.no_grad():
        first = case.inputs(2, 8)
        y0 = compiled(*first)
        for b, s in [(3, 12), (2, 5), (4, 8)]:
            y = compiled(*case.inputs(b, s))
            assert y.shape[0] == b
    # one compile for all shapes (an attempt that dynamo restarts is not counted)
    assert len(bitfx.backend.REPORTS) == 1
    # the values added by the passes were calibrated on the first batch, like bitfx.binarize
    ref = bitfx.binarize(model, first)
    torch.testing.assert_close(y0, ref(*first), rtol=1e-4, atol=1e-4)
