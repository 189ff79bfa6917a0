"""Fixtures for the cross-compile tests: the arm64 runtime and a toy model with a custom op."""

from __future__ import annotations

import shutil

import pytest
import torch

from tvm import relax
from tvm.script import tirx as T


@pytest.fixture(scope="session")
def arm64_runtime(tmp_path_factory):
    """The aarch64 libtvm_runtime.so/libtvm_ffi.so (downloaded once into the bitfx cache)."""
    from bitfx.targets import emulate

    try:
        return emulate.fetch_arm64_runtime()
    except (RuntimeError, FileNotFoundError) as err:
        pytest.skip(f"aarch64 TVM runtime unavailable (offline?): {err}")


# --- a toy model: nn.Linear + a custom op lowered through custom_convert_map -------------------

@torch.library.custom_op("bitfxtest::toy_sign", mutates_args=())
def toy_sign(x: torch.Tensor) -> torch.Tensor:
    """sign(x) with sign(0) = +1, as DESIGN §2."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


@toy_sign.register_fake
def _(x):
    return torch.empty_like(x)


def _sign_prim_func(rows: int, cols: int):
    @T.prim_func(s_tir=True)
    def toy_sign_tir(x: T.Buffer((rows, cols), "float32"), y: T.Buffer((rows, cols), "float32")):
        T.func_attr({"tir.noalias": True})
        for i, j in T.grid(rows, cols):
            with T.sblock("sign"):
                vi, vj = T.axis.remap("SS", [i, j])
                y[vi, vj] = T.Select(x[vi, vj] >= T.float32(0), T.float32(1), T.float32(-1))

    return toy_sign_tir


def toy_sign_converter(node, importer):
    """custom_convert_map handler: ``toy_sign`` becomes ``call_tir`` of a TIR kernel."""
    x = importer.env[node.args[0]]
    shape = [int(s) for s in x.ty.shape]
    gv = importer.block_builder.add_func(_sign_prim_func(*shape), "toy_sign")
    return importer.block_builder.emit(relax.call_tir(gv, [x], relax.TensorType(shape, "float32")))


class ToyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(32, 16)
        self.fc2 = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(torch.ops.bitfxtest.toy_sign(self.fc1(x)))


@pytest.fixture(scope="session")
def toy():
    """(relax IRModule, input array, torch output) of the toy model."""
    from tvm.relax.frontend.torch import from_exported_program

    torch.manual_seed(0)
    model = ToyModel().eval()
    x = torch.randn(3, 32)
    ep = torch.export.export(model, (x,))
    mod = from_exported_program(ep, custom_convert_map={"toy_sign.default": toy_sign_converter})
    with torch.no_grad():
        expected = model(x).numpy()
    return mod, x.numpy(), expected


@pytest.fixture(scope="session")
def toy_libs(toy, tmp_path_factory):
    """The toy model exported for each device target that links here: {target: path}."""
    from bitfx.targets import cross

    mod, _, _ = toy
    out = tmp_path_factory.mktemp("toy_libs")
    libs = {}
    for name, tool in (("linux-arm64", "aarch64-linux-gnu-g++"), ("android-arm64", "clang"),
                       ("android-armv7", "clang")):
        if shutil.which(tool):
            libs[name] = cross.export_library(cross.build_relax(mod, name), out / f"{name}.so", name)
    return libs
