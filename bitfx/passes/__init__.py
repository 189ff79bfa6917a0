"""The one ordered pipeline. Each pass is ``fn(gm, ctx) -> gm`` in a file of its own name.

    capture ──► canonicalize ──► binarize ──► lower
    (capture.py) (PIPELINE[:3])   (PIPELINE[3:]) (LOWERING, per target)

The binarize stage first recognises a binarizer the model carries itself (fake-quant linears,
``recognize_fake_quant``), then applies the config's policy to the rest (a packed q/k/v projection
is first split into one linear per part, ``split_packed_projections``).

The pass manager lints the graph after every pass and, when ``ctx.snapshot`` is set, keeps a
copy of each pass's output graph; ``bitfx.diff`` is built on those snapshots.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch.fx as fx

from bitfx.passes.binarize_attention import binarize_attention
from bitfx.passes.binarize_linear import binarize_linear
from bitfx.passes.canonicalize_attention import canonicalize_attention
from bitfx.passes.canonicalize_linear import canonicalize_linear
from bitfx.passes.context import PassContext
from bitfx.passes.eliminate_dead_code import eliminate_dead_code
from bitfx.passes.lower_kernels import lower_kernels
from bitfx.passes.recognize_fake_quant import recognize_fake_quant
from bitfx.passes.split_packed_projections import split_packed_projections

log = logging.getLogger(__name__)

Pass = Callable[[fx.GraphModule, PassContext], fx.GraphModule]

#: Canonicalize (changes no numbers), then binarize (the policy of ``ctx.config``).
PIPELINE: list[Pass] = [
    eliminate_dead_code,
    canonicalize_linear,
    canonicalize_attention,
    recognize_fake_quant,
    split_packed_projections,
    binarize_linear,
    binarize_attention,
]

#: Run on the final inference graph of a target: bitfx ops become kernel calls.
LOWERING: list[Pass] = [lower_kernels]


def snapshot(gm: fx.GraphModule) -> fx.GraphModule:
    """A cheap copy of ``gm``'s graph that shares its parameters."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


def run_passes(gm: fx.GraphModule, ctx: PassContext, passes: Sequence[Pass] = PIPELINE) -> fx.GraphModule:
    if ctx.snapshot and not ctx.snapshots:
        ctx.snapshots.append(("capture", snapshot(gm)))
    for p in passes:
        gm = p(gm, ctx)
        gm.graph.lint()
        gm.recompile()
        log.debug("pass %s: %d nodes", p.__name__, len(gm.graph.nodes))
        if ctx.snapshot:
            ctx.snapshots.append((p.__name__, snapshot(gm)))
    return gm


__all__ = ["PIPELINE", "LOWERING", "PassContext", "run_passes", "snapshot"]
