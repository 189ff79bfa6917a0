"""Cross-compile a small model with a custom op for arm64, run it under qemu, and write a device bundle.

    python examples/export_arm64_bundle.py [OUT_DIR]

Needs the Debian packages g++-aarch64-linux-gnu and qemu-user (plus clang and lld for Android),
and network once, to fetch the aarch64 TVM runtime. The plumbing is the one `bitfx.export` uses:
torch.export -> Relax (`custom_convert_map` turns the custom op into `call_tir`) -> a device
library -> emulation -> bundle.
"""

import sys
from pathlib import Path

import numpy as np
import torch
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program
from tvm.script import tirx as T

from bitfx.deploy import write_bundle
from bitfx.targets import cross, emulate


@torch.library.custom_op("bitfx_example::sign", mutates_args=())
def sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


@sign.register_fake
def _(x):
    return torch.empty_like(x)


def convert_sign(node, importer):
    """custom_convert_map handler: the op becomes ``call_tir`` of a TIR kernel."""
    x = importer.env[node.args[0]]
    rows, cols = (int(s) for s in x.ty.shape)

    @T.prim_func(s_tir=True)
    def sign_tir(a: T.Buffer((rows, cols), "float32"), b: T.Buffer((rows, cols), "float32")):
        for i, j in T.grid(rows, cols):
            with T.sblock("sign"):
                vi, vj = T.axis.remap("SS", [i, j])
                b[vi, vj] = T.Select(a[vi, vj] >= T.float32(0), T.float32(1), T.float32(-1))

    gv = importer.block_builder.add_func(sign_tir, "sign")
    return importer.block_builder.emit(relax.call_tir(gv, [x], relax.TensorType([rows, cols], "float32")))


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(64, 32), torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(torch.ops.bitfx_example.sign(self.fc1(x)))


def main(out_dir: Path) -> None:
    model, x = Model().eval(), torch.randn(4, 64)
    ep = torch.export.export(model, (x,))
    mod = from_exported_program(ep, custom_convert_map={"sign.default": convert_sign})
    for target in ("linux-arm64", "android-arm64"):
        path = cross.export_library(cross.build_relax(mod, target), out_dir / target / "model.so",
                                    target)
        (y,) = emulate.run_emulated(path, [x.numpy()], target, cpu="cortex-a53")  # an ARMv8.0 core
        err = np.abs(y - model(x).detach().numpy()).max()
        print(f"{target}: {path} under qemu -cpu cortex-a53, max |device - torch| = {err:.2e}")
        bundle = write_bundle(path, target, inputs=[x])  # its README.md: what to copy, how to run
        print(f"  bundle: {bundle}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "arm64_bundle"))
