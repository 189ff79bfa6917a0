"""``bitfx.binarize``: a trainable binary model from a float one, through the one pass pipeline."""
from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx

from bitfx.calibrate import calibrate
from bitfx.config import BinarizeConfig
from bitfx.passes import PIPELINE, PassContext, run_passes
from bitfx.inputs import example_call
from bitfx.passes.capture import _has_bitfx_ops, capture_export


def _auto_dynamic_shapes(example_inputs: Sequence[Any]):
    def spec(x):
        if isinstance(x, torch.Tensor):
            return {i: torch.export.Dim.AUTO for i in range(x.dim())}
        return None
    return tuple(spec(x) for x in example_inputs)


def trace(model: torch.nn.Module, example_inputs: Any = (), config=None, *, snapshot: bool = False,
          passes=PIPELINE, example_kwargs: Mapping[str, Any] | None = None) -> tuple[fx.GraphModule, PassContext]:
    """Capture ``model`` with torch.export and run ``passes``; returns (graph module, context).

    ``example_inputs`` / ``example_kwargs``: inputs as users hold them (:mod:`bitfx.inputs`);
    ``ctx.example_inputs`` holds their flat leaves, in the order of the graph's placeholders.
    """
    cfg = BinarizeConfig.coerce(config)
    call = example_call(model, example_inputs, example_kwargs)
    gm, weights = capture_export(model, call=call)
    ctx = PassContext(cfg, weights, snapshot=snapshot, example_inputs=call.flat)
    if _has_bitfx_ops(gm):
        return gm, ctx
    return run_passes(gm, ctx, passes), ctx


def binarize(model: torch.nn.Module, example_inputs: Any = (), config=None, *,
             example_kwargs: Mapping[str, Any] | None = None) -> fx.GraphModule:
    """Rewrite ``model``'s linears and attentions into binary ops; the result is trainable.

    Args:
        model: any ``nn.Module`` that ``torch.export`` can capture (in ``eval()`` mode: attention
            dropout keeps attention in float).
        example_inputs: one batch as the model takes it: a tuple of positional inputs, one tensor,
            or a mapping of keyword inputs (a tokenizer's output). Sequence lengths and batch sizes
            are kept dynamic where the model allows it.
        config: a :class:`BinarizeConfig`, a preset name (``"bipft"``, ``"bivit"``, ``"bibert"``,
            ``"bit"``, ``"bitnet"``, ``"bitnet158"``) or a dict of fields; default ``"bipft"``.
        example_kwargs: keyword inputs (as ``torch.export`` takes ``kwargs``), alone or with
            positional ``example_inputs``. Keywords holding no tensor (``use_cache=False``) are
            fixed at capture.

    Returns:
        A ``torch.fx.GraphModule`` calling ``torch.ops.bitfx.bit_linear`` / ``bit_attention``,
        called like ``model`` (the same input names, positionally or by name) and returning the
        model's output structure (a Hugging Face ``ModelOutput``, tuples, dicts, a KV cache).
        Its parameters and buffers are its own copies (``model`` is left as it was: training the
        result never changes ``model``; weights tied in ``model`` stay tied in the result).
        Gradients flow (straight-through) to the weights, scales, offsets and estimators, whose
        initial values come from the example inputs (the first batch, as in the papers); refine
        them with :func:`bitfx.calibrate`. ``gm.bitfx_report`` lists what was rewritten and what
        stayed float, and why; ``gm.bitfx_call`` the captured inputs (names, constants, caches).

    Raises:
        TypeError: the example inputs do not fit ``model.forward`` (the message shows both).
        bitfx.CaptureError: ``torch.export`` cannot capture the model (the message names the
            cause and the way out, e.g. a returned cache type that is not a pytree).

    Example: ``examples/qat.py``; a Hugging Face model with a tokenizer's dict::

        qat = bitfx.binarize(bert, tokenizer(texts, return_tensors="pt", padding=True))
        out = qat(**batch)           # a BaseModelOutputWithPoolingAndCrossAttentions
    """
    gm, ctx = trace(model, example_inputs, config, example_kwargs=example_kwargs)
    if gm is not model:
        own_tensors(gm, model)
    if ctx.report.rewrites:
        calibrate(gm, [ctx.example_inputs])
    gm.bitfx_report = ctx.report
    gm.bitfx_config = ctx.config
    return gm



def own_tensors(gm: torch.nn.Module, model: torch.nn.Module) -> int:
    """Replace every parameter, buffer and tensor attribute of ``gm`` that shares storage with one
    of ``model``'s by a copy (``torch.export``'s ``ep.module()`` reuses the model's tensors).

    One ``copy.deepcopy`` over all of them with one memo: each storage is copied once, so tensors
    tied in ``model`` (or views of one storage) stay tied in ``gm``; a parameter stays a
    ``Parameter`` with its ``requires_grad``. Returns the number of tensors replaced.
    """
    def storage(t: torch.Tensor):
        return (t.device, t.untyped_storage().data_ptr()) if t.numel() else None

    theirs = {storage(t) for t in (*model.parameters(), *model.buffers())} - {None}
    for mod in model.modules():
        theirs |= {storage(v) for v in vars(mod).values() if isinstance(v, torch.Tensor)} - {None}
    slots = []  # (owner dict, key, tensor)
    for mod in gm.modules():
        for table in (mod._parameters, mod._buffers, vars(mod)):
            for key, t in list(table.items()):
                if isinstance(t, torch.Tensor) and storage(t) in theirs:
                    slots.append((table, key, t))
    copies = copy.deepcopy([t for _, _, t in slots])  # one memo: shared storages are copied once
    for (table, key, _), new in zip(slots, copies):
        table[key] = new
    return len(slots)
