"""``bitfx.binarize``: a trainable binary model from a float one, through the one pass pipeline."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx

from bitfx.calibrate import calibrate
from bitfx.config import BinarizeConfig
from bitfx.passes import PIPELINE, PassContext, run_passes
from bitfx.passes.capture import _has_bitfx_ops, capture_export


def _auto_dynamic_shapes(example_inputs: Sequence[Any]):
    def spec(x):
        if isinstance(x, torch.Tensor):
            return {i: torch.export.Dim.AUTO for i in range(x.dim())}
        return None
    return tuple(spec(x) for x in example_inputs)


def trace(model: torch.nn.Module, example_inputs: Sequence[Any], config=None, *, snapshot: bool = False,
          passes=PIPELINE) -> tuple[fx.GraphModule, PassContext]:
    """Capture ``model`` with torch.export and run ``passes``; returns (graph module, context)."""
    cfg = BinarizeConfig.coerce(config)
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    gm, weights = capture_export(model, example_inputs, _auto_dynamic_shapes(example_inputs))
    ctx = PassContext(cfg, weights, snapshot=snapshot, example_inputs=example_inputs)
    if _has_bitfx_ops(gm):
        return gm, ctx
    return run_passes(gm, ctx, passes), ctx


def binarize(model: torch.nn.Module, example_inputs: Sequence[Any], config=None) -> fx.GraphModule:
    """Rewrite ``model``'s linears and attentions into binary ops; the result is trainable.

    Args:
        model: any ``nn.Module`` that ``torch.export`` can capture.
        example_inputs: a tuple of inputs (one batch). Sequence lengths and batch sizes are kept
            dynamic where the model allows it.
        config: a :class:`BinarizeConfig`, a preset name (``"bipft"``, ``"bivit"``, ``"bibert"``,
            ``"bit"``, ``"bitnet"``, ``"bitnet158"``) or a dict of fields; default ``"bipft"``.

    Returns:
        A ``torch.fx.GraphModule`` calling ``torch.ops.bitfx.bit_linear`` / ``bit_attention``.
        Gradients flow (straight-through) to the weights, scales, offsets and estimators, whose
        initial values come from ``example_inputs`` (the first batch, as in the papers); refine
        them with :func:`bitfx.calibrate`. ``gm.bitfx_report`` lists what was rewritten and what
        stayed float, and why.

    Example: ``examples/qat.py``.
    """
    gm, ctx = trace(model, example_inputs, config)
    if ctx.report.rewrites:
        calibrate(gm, [ctx.example_inputs])
    gm.bitfx_report = ctx.report
    gm.bitfx_config = ctx.config
    return gm
