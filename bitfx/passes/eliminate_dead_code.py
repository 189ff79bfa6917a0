"""Remove nodes whose results are never used (e.g. MHA's averaged attention weights)."""
from __future__ import annotations

import torch.fx as fx

from bitfx.passes.context import PassContext


def eliminate_dead_code(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    gm.graph.eliminate_dead_code()
    return gm
