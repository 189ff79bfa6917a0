"""Graph spellings that TVM's Relax importer or legalization got wrong, and bitfx now rewrites before
import: each module is imported with symbolic shapes, built for the host with LLVM, run in the Relax
VM, and compared with eager PyTorch (the expected values come from torch, not from bitfx)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bitfx.ops.attention import attention_reference, masked_softmax
from bitfx.relax.importer import to_relax

tvm = pytest.importorskip("tvm")


def run_on_host(module: torch.nn.Module, *inputs: torch.Tensor) -> list[np.ndarray]:
    """``module`` through ``to_relax`` (symbolic dims) → ``relax.build(llvm)`` → VM outputs."""
    from tvm import relax

    mod = to_relax(module, inputs)
    assert to_relax.last_dynamic is True, "fell back to the example shapes"
    vm = relax.VirtualMachine(relax.build(mod, target="llvm"), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(x.numpy()) for x in inputs])

    def leaves(v):
        return [v.numpy()] if hasattr(v, "numpy") else [a for item in v for a in leaves(item)]

    return leaves(out)


class CacheLikeCat(torch.nn.Module):
    """Hugging Face's DynamicCache: each layer's keys start as ``torch.tensor([])`` (1-D, empty) and
    the new keys (4-D) are concatenated onto them; torch skips the empty 1-D operand."""

    def forward(self, k):
        empty = torch.tensor([], dtype=k.dtype)
        return torch.cat([empty, k], dim=-2) * 2.0


def test_cat_with_an_empty_1d_operand_imports_and_equals_torch():
    k = torch.randn(2, 3, 5, 4)
    (out,) = run_on_host(CacheLikeCat(), k)
    np.testing.assert_array_equal(out, (k * 2.0).numpy())


class CausalFloatMask(torch.nn.Module):
    """``nn.Transformer.generate_square_subsequent_mask``: ``full((n, n), -inf).triu(1)``."""

    def forward(self, x):
        mask = torch.nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return torch.softmax(x @ x.transpose(-1, -2) + mask, dim=-1)


def test_full_with_minus_inf_and_a_symbolic_size_imports_and_equals_torch():
    x = torch.randn(2, 6, 8)
    (out,) = run_on_host(CausalFloatMask(), x)
    want = CausalFloatMask()(x).numpy()
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    assert (out[:, 0, 1:] == 0).all()  # the -inf entries really are -inf (softmax weight exactly 0)


class HiddenResidual(torch.nn.Module):
    """An input whose last dim torch specialises (32) added to a tensor with the literal 32:
    the importer named the specialised dim ``32`` as a symbolic var and lost the add's shape."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(32)
        self.fc = torch.nn.Linear(32, 32)

    def forward(self, x):
        y = x + self.fc(self.norm(x))
        return y + self.fc(self.norm(y))


def test_specialised_input_dims_are_static_in_the_import():
    from tvm import tirx

    x = torch.randn(2, 5, 32)
    mod = to_relax(HiddenResidual().eval(), (x,))  # a float module: the importer path alone
    dims = mod["main"].params[0].ty.shape.values
    assert isinstance(dims[0], tirx.Var) and isinstance(dims[1], tirx.Var)  # batch and sequence stay symbolic
    assert not isinstance(dims[2], tirx.Var) and int(dims[2]) == 32
    torch.manual_seed(0)
    model = HiddenResidual().eval()
    (out,) = run_on_host(model, x)
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), rtol=1e-5, atol=1e-5)


class RowMax(torch.nn.Module):
    def forward(self, x):
        return torch.amax(x, dim=-1)


def test_amax_of_a_row_of_minus_inf_is_minus_inf():
    """TVM's argmax of an all -inf row returns index -1; bitfx's amax (argmax + gather) clamps it."""
    x = torch.randn(3, 4)
    x[1] = float("-inf")
    (out,) = run_on_host(RowMax(), x)
    np.testing.assert_array_equal(out, torch.amax(x, dim=-1).numpy())


def test_masked_softmax_gives_zero_for_a_fully_masked_row_as_sdpa_does():
    q, k, v = torch.randn(3, 2, 4, 8).unbind(0)
    mask = torch.ones(2, 4, 4, dtype=torch.bool).tril()
    mask[0, :2] = False  # two queries of batch 0 see no key (left padding under a causal mask)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (want[0, :2] == 0).all()  # torch's own semantics, independent of bitfx
    got = attention_reference(q, k, v, mask, None, False, 0.0)
    torch.testing.assert_close(got, want)


def test_masked_softmax_gradients_stay_finite_on_a_fully_masked_row():
    s = torch.randn(2, 5, requires_grad=True)
    masked = s.masked_fill(torch.tensor([[True] * 5, [False, True, False, True, False]]), float("-inf"))
    p = masked_softmax(masked)
    assert (p[0] == 0).all() and torch.allclose(p[1].sum(), torch.tensor(1.0))
    (p * torch.arange(5.0)).sum().backward()
    assert torch.isfinite(s.grad).all()
    assert (s.grad[0] == 0).all()


class FixedGrid(torch.nn.Module):
    """Patch tokens mixed on their fixed 4x4 grid (BinaryViT's pooling token mixer): the reshape to the
    grid ties the image size, so only the batch can stay symbolic on the device."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.patch = torch.nn.Conv2d(3, d, 4, stride=4)
        self.fc = torch.nn.Linear(d, d)
        self.pool = torch.nn.AvgPool2d(3, 1, 1)
        self.head = torch.nn.Linear(d, 10)

    def forward(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)  # [B, N, d]
        b, _, d = x.shape
        grid = x.transpose(1, 2).reshape(b, d, 4, 4)
        x = x + self.pool(grid).reshape(b, d, 16).transpose(1, 2)
        x = x + self.fc(x)
        return self.head(x.mean(1))


def test_a_fixed_token_grid_exports_with_a_symbolic_batch(tmp_path):
    """All dims symbolic fails to build (the grid reshape), so export retries with the batch alone symbolic
    before the example shapes: the library then runs at another batch size, equal to the host model."""
    import bitfx
    from tvm import relax

    torch.manual_seed(0)
    img = torch.randn(2, 3, 16, 16)
    gm = bitfx.binarize(FixedGrid().eval(), (img,))
    path = bitfx.export(gm, (img,), "host", tmp_path / "grid.so", bundle=False)
    assert to_relax.last_dynamic == "batch"
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    other = torch.randn(3, 3, 16, 16)  # another batch size than the example's
    out = vm["main"](tvm.runtime.tensor(other.numpy()))
    out = out[0] if not hasattr(out, "numpy") else out
    with torch.no_grad():
        np.testing.assert_allclose(out.numpy(), gm(other).numpy(), rtol=1e-4, atol=1e-4)
