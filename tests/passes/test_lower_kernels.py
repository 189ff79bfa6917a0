"""lower_kernels: the compiled model on TVM kernels equals the reference ops; packed weights follow
in-place parameter updates (tensor._version)."""
import pytest
import torch

import bitfx  # noqa: F401
import bitfx.backend
from bitfx.passes.lower_kernels import BitLinearKernel
from models import CASES


def compiled(model, kernels, config="bipft"):
    return torch.compile(model, backend="bitfx", options={"config": config, "kernels": kernels})


@pytest.mark.parametrize("name,config", [("mlp", "bipft"), ("bert", "bipft"), ("decoder", "bivit"),
                                         ("vit", "bibert"), ("mlp", "bitnet158")])
def test_tvm_kernels_match_reference(name, config):
    case = CASES[name]
    model = case.model()
    x = case.inputs(2, 8)
    torch._dynamo.reset()
    with torch.no_grad():
        ref = compiled(model, "reference", config)(*x)
        torch._dynamo.reset()
        fast = compiled(model, "tvm", config)
        out = fast(*x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * max(1.0, ref.abs().max().item()))


def test_packed_weight_rebuilt_after_in_place_update():
    case = CASES["mlp"]
    model = case.model()
    x = case.inputs(2, 8)
    torch._dynamo.reset()
    with torch.no_grad():
        fast = compiled(model, "tvm")
        before = fast(*x)
        weight = next(p for n, p in model.named_parameters() if n.endswith("weight"))
        weight.mul_(-1.0)  # in place: bumps weight._version, the packed copy must not be reused
        after = fast(*x)
        torch._dynamo.reset()
        ref_after = compiled(model, "reference")(*x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, ref_after, rtol=1e-4, atol=1e-4)


def test_kernel_module_packs_once_per_version():
    k = BitLinearKernel("sign_tensor", "sign", 1)
    w = torch.randn(8, 16)
    p1, _ = k.packed(w, None)
    p2, _ = k.packed(w, None)
    assert p1 is p2
    w.add_(1.0)
    p3, _ = k.packed(w, None)
    assert p3 is not p1
