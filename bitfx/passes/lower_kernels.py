"""bitfx ops -> calls of TVM-generated kernels (``config.kernels == "tvm"``).

With ``kernels="reference"`` the graph is left as it is and the ops run their PyTorch reference.
"""
from __future__ import annotations

import torch.fx as fx

from bitfx.passes.context import PassContext


def lower_kernels(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    return gm
