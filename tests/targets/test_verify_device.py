"""verify: every output, several inputs, an ARMv8.0 and a v8.2 CPU model; it fails for the right reasons."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bitfx.deploy.verify import (VerifyError, cpus_for, extension_instructions, flatten_outputs,
                                 random_like, verify_library)
from bitfx.targets import cross
from conftest import ToyModel
from target_tools import needs_gnu, needs_qemu

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/models.py
arm64 = pytest.mark.usefixtures("arm64_runtime")


def _toy_model(bias_error: float = 0.0) -> ToyModel:
    torch.manual_seed(0)  # the weights of the `toy` fixture's model
    model = ToyModel().eval()
    with torch.no_grad():
        model.fc2.bias[3] += bias_error
    return model


@needs_gnu
@needs_qemu
@arm64
def test_a_wrong_output_is_named_with_input_cpu_and_difference(toy, toy_libs):
    _, x, _ = toy
    lib = toy_libs["linux-arm64"]
    assert verify_library(lib, _toy_model(), (torch.from_numpy(x),), "linux-arm64") < 1e-5
    with pytest.raises(VerifyError) as err:
        verify_library(lib, _toy_model(0.5), (torch.from_numpy(x),), "linux-arm64")
    e = err.value
    assert (e.output, e.inputs, e.cpu) == ("output", "the example inputs", "cortex-a53")
    assert abs(e.max_diff - 0.5) < 1e-4
    assert "output output of linux-arm64.so differs from the host model on cortex-a53 (ARMv8.0-A)" in str(e)
    assert isinstance(e, AssertionError)


class _TwoOutputs(torch.nn.Module):
    """A Hugging Face style model: a ModelOutput with two tensors."""

    def __init__(self, example: torch.Tensor | None = None):
        super().__init__()
        torch.manual_seed(1)
        self.fc = torch.nn.Linear(8, 4)
        self.example = example  # when set: pooler_output is wrong on every other input

    def forward(self, x):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        h = self.fc(x)
        pooled = torch.tanh(h[:, 0])
        if self.example is not None and not torch.equal(x, self.example):
            pooled = pooled + 0.25
        return BaseModelOutputWithPooling(last_hidden_state=h, pooler_output=pooled)


@pytest.fixture(scope="module")
def two_outputs_lib(tmp_path_factory):
    pytest.importorskip("transformers")
    from tvm.relax.frontend.torch import from_exported_program

    class Flat(torch.nn.Module):  # what the device returns: the leaves, in pytree order
        def __init__(self):
            super().__init__()
            self.inner = _TwoOutputs().eval()

        def forward(self, x):
            return tuple(self.inner(x).values())

    x = torch.randn(3, 8)
    ep = torch.export.export(Flat(), (x,))
    exe = cross.build_relax(from_exported_program(ep), "linux-arm64")
    return cross.export_library(exe, tmp_path_factory.mktemp("two") / "two.so", "linux-arm64"), x


@needs_gnu
@needs_qemu
@arm64
def test_every_output_of_a_model_output_on_random_inputs_too(two_outputs_lib):
    lib, x = two_outputs_lib
    assert verify_library(lib, _TwoOutputs().eval(), (x,), "linux-arm64", variants=2) < 1e-5
    # Right on the example only: the random input sets catch it, and the output is named.
    with pytest.raises(VerifyError) as err:
        verify_library(lib, _TwoOutputs(example=x).eval(), (x,), "linux-arm64", variants=2)
    e = err.value
    assert (e.output, e.inputs, e.cpu) == ("pooler_output", "random inputs #1 (seed 0)", "cortex-a53")
    assert abs(e.max_diff - 0.25) < 1e-4
    # Only the example, when no host model is given.
    with torch.no_grad():
        expected = _TwoOutputs().eval()(x)
    assert verify_library(lib, None, (x,), "linux-arm64", expected=expected) < 1e-5


@needs_gnu
@needs_qemu
@arm64
def test_udot_dies_with_sigill_on_cortex_a53_and_verify_says_so(tmp_path):
    # A target that asks for ARMv8.2 dot product (+dotprod) gets udot in its kernels, as
    # android-arm64 had before it became ARMv8.0. A Cortex-A53 has no udot.
    import bitfx
    from bitfx.export import export
    from models import CASES

    case = CASES["mlp"]
    inputs = case.inputs(2, 4)
    gm = bitfx.binarize(case.model(), inputs)
    dt = cross.get_target("linux-arm64-dotprod")
    assert "+dotprod" in dt.target["mattr"]
    lib = export(gm, inputs, dt, tmp_path / "mlp.so", bundle=False)
    found = extension_instructions(lib)
    assert found.get("udot", 0) > 0
    with pytest.raises(VerifyError) as err:
        verify_library(lib, gm, inputs, dt, cpus=["cortex-a53", "cortex-a76"])
    e = err.value
    assert e.cpu == "cortex-a53" and e.max_diff is None
    assert f"died with SIGILL (illegal instruction) on cortex-a53 (ARMv8.0-A)" in str(e)
    assert f"{found['udot']} × udot" in str(e)
    # The target asked for dotprod by name: verified where it can run, and it is right there.
    assert cpus_for(dt) == ("cortex-a76",)
    assert verify_library(lib, gm, inputs, dt, variants=1) <= 1e-4 * 10


def test_cpu_models_follow_the_target():
    assert cpus_for("linux-arm64") == ("cortex-a53", "cortex-a76")
    assert cpus_for("android-arm64") == ("cortex-a53", "cortex-a76")
    assert cpus_for("android-arm64-dotprod") == ("cortex-a76",)


def test_random_inputs_keep_shapes_dtypes_and_ranges():
    ids = torch.tensor([[3, 7, 9, 4]])
    mask = torch.tensor([[1, 1, 0, 0]])
    x = torch.randn(2, 5) * 3 + 1
    flags = torch.tensor([True, False, True])
    a = random_like((ids, mask, x, flags, 0.5), torch.Generator().manual_seed(0))
    b = random_like((ids, mask, x, flags, 0.5), torch.Generator().manual_seed(0))
    for got, want in zip(a[:4], (ids, mask, x, flags)):
        assert got.shape == want.shape and got.dtype == want.dtype
    assert int(a[0].min()) >= 3 and int(a[0].max()) <= 9
    assert set(a[1].flatten().tolist()) <= {0, 1}
    assert not torch.equal(a[2], x) and a[4] == 0.5
    assert all(torch.equal(p, q) for p, q in zip(a[:4], b[:4]))  # seeded


def test_outputs_flatten_like_torch_export_and_are_named():
    t = torch.ones(2)
    names, arrays = flatten_outputs({"a": t, "b": (t * 2, None, t * 3)})
    assert names == ["a", "b[0]", "b[2]"]
    np.testing.assert_array_equal(arrays[2], np.full(2, 3.0))
    assert flatten_outputs(t)[0] == ["output"] and flatten_outputs((t, t))[0] == ["[0]", "[1]"]


def test_output_names_come_from_the_captured_structure():
    import bitfx
    from bitfx.deploy.verify import output_names
    from bitfx.inputs import flat_module

    class Dicty(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 64)

        def forward(self, x):
            return {"logits": self.fc(x), "aux": (x * 2, self.fc(x).relu())}

    gm = bitfx.binarize(Dicty().eval(), (torch.randn(2, 64),))
    assert output_names(gm) == ["logits", "aux[0]", "aux[1]"]
    assert output_names(flat_module(gm)) is None  # the device form: flat, unnamed
