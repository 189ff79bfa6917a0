"""The ``torch.compile`` backend: ``torch.compile(model, backend="bitfx", options={...})``.

Registered through the ``torch_dynamo_backends`` entry point, so no ``import bitfx`` is needed.
Options: ``config`` (a BinarizeConfig, preset name or dict) and ``kernels`` (``"tvm"`` or
``"reference"``).

Flow: the dynamo graph is re-traced to pre-dispatch ATen (``capture_dynamo``), the pipeline
rewrites it (a graph that already holds bitfx ops, e.g. from ``bitfx.binarize``, is lowered as
it is), scales are initialised on the first batch, and AOTAutograd produces the forward (and,
when training, backward) graphs; the forward is lowered to kernels. Parameters added by the
passes are calibrated once per model and reused when dynamo recompiles for new shapes.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx
from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func
from torch.utils.weak import WeakIdKeyDictionary

from bitfx.calibrate import calibrate
from bitfx.config import CompileOptions
from bitfx.passes import LOWERING, PIPELINE, PassContext, run_passes
from bitfx.passes.capture import _has_bitfx_ops, capture_dynamo

log = logging.getLogger(__name__)

#: Calibrated values of added parameters, per model (keyed by its first parameter), so that a
#: recompilation (new shapes) reuses the values of the first compile instead of refitting.
#: Reports of the most recent compilations (newest last), for tools such as ``bitfx demo``.
REPORTS: list = []

#: (Keyed by identity: a WeakKeyDictionary compares tensor keys with ``==``, which is elementwise.)
_CALIBRATED: "WeakIdKeyDictionary[torch.Tensor, dict[str, torch.Tensor]]" = WeakIdKeyDictionary()


def bitfx_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None, **_: Any):
    opts = CompileOptions.from_dict(options)
    traced, weights = capture_dynamo(gm, example_inputs)
    ctx = PassContext(opts.config, weights, example_inputs=tuple(example_inputs))
    if not _has_bitfx_ops(traced):
        before = {name for name, _ in traced.named_parameters()}
        traced = run_passes(traced, ctx, PIPELINE)
        _initialise(traced, before, example_inputs)
    log.info("bitfx: %d rewrites, %d left in float", len(ctx.report.rewrites), len(ctx.report.skips))
    traced.bitfx_report = ctx.report

    def fw_compiler(fw: fx.GraphModule, inputs):
        return make_boxed_func(run_passes(fw, ctx, LOWERING))

    # (dynamo may abort this attempt, e.g. TensorifyScalarRestartAnalysis, and call again)
    compiled = aot_module_simplified(traced, example_inputs, fw_compiler=fw_compiler)
    REPORTS.append(ctx.report)
    del REPORTS[:-64]
    return compiled


def _initialise(traced: fx.GraphModule, before: set[str], example_inputs) -> None:
    added = {n: p for n, p in traced.named_parameters() if n not in before}
    added.update({n: b for n, b in traced.named_buffers() if n.startswith("bitfx_")})
    if not added:
        return
    key = next((x for x in example_inputs if isinstance(x, torch.nn.Parameter)), None)
    cached = _CALIBRATED.get(key) if key is not None else None
    if cached is not None and set(cached) >= set(added):
        with torch.no_grad():
            for name, p in added.items():
                p.copy_(cached[name])
        return
    # dynamo passes SymInts for dynamic sizes: calibrate on their concrete values (hints)
    concrete = tuple(x.node.hint if isinstance(x, torch.SymInt) else x for x in example_inputs)
    calibrate(traced, [concrete])
    if key is not None:
        _CALIBRATED[key] = {n: p.detach().clone() for n, p in added.items()}
