"""Capture: every entry point produces one IR, a pre-dispatch ATen ``torch.fx`` graph.

* ``bitfx.binarize`` / ``export`` / ``diff`` use ``torch.export`` (pre-dispatch ATen, parameters
  lifted to placeholders and named in the graph signature); we work on ``ep.module()``, where
  parameters are the module's own (get_attr), so the result trains like any module.
* ``torch.compile`` hands the backend a dynamo graph whose parameters are placeholders; we re-trace
  it with ``make_fx(pre_dispatch=True)`` under dynamo's fake mode (symbolic shapes stay symbolic),
  so both entry points see the same ops (``aten.linear``, ``aten.scaled_dot_product_attention``,
  ``aten.matmul``...), and composite ops keep their autograd meaning for the binarized graph.
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx


def capture_export(model: torch.nn.Module, example_inputs: Sequence[Any], dynamic_shapes=None):
    """``torch.export`` -> (GraphModule with parameters as attributes, names of weight nodes)."""
    if isinstance(model, fx.GraphModule) and _has_bitfx_ops(model):
        gm = model
    else:
        ep = torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes, strict=False)
        gm = ep.module()
    weights = {n.name for n in gm.graph.nodes if n.op == "get_attr"}
    return gm, weights


def capture_dynamo(gm: fx.GraphModule, example_inputs: Sequence[Any]):
    """A dynamo graph -> (pre-dispatch ATen GraphModule, names of placeholder nodes that are parameters)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fakes = [n.meta.get("example_value") for n in placeholders]
    if any(f is None for f in fakes):  # not from dynamo: trace the real inputs symbolically
        fakes, fake_mode = list(example_inputs), None
    else:
        fake_mode = detect_fake_mode(fakes)
    ctx = fake_mode if fake_mode is not None else contextlib.nullcontext()
    allow = getattr(fake_mode, "allow_scalar_outputs", None)
    try:
        if fake_mode is not None:
            # dynamo turns Python floats (e.g. dropout p) into 0-d tensors read with .item()
            fake_mode.allow_scalar_outputs = True
        with ctx, fx.traceback.preserve_node_meta():
            traced = make_fx(
                fx.Interpreter(gm).run,
                pre_dispatch=True,
                tracing_mode="fake" if fake_mode is not None else "symbolic",
            )(*fakes)
    finally:
        if fake_mode is not None:
            fake_mode.allow_scalar_outputs = allow
    new_placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    weights = {
        new.name
        for new, real in zip(new_placeholders, example_inputs)
        if isinstance(real, torch.nn.Parameter)
    }
    return traced, weights


def _has_bitfx_ops(gm: fx.GraphModule) -> bool:
    return any(
        n.op == "call_function" and getattr(n.target, "namespace", None) == "bitfx"
        for n in gm.graph.nodes
    )
