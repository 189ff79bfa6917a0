"""Capture: every entry point produces one IR, a pre-dispatch ATen ``torch.fx`` graph.

* ``bitfx.binarize`` / ``export`` / ``diff`` use ``torch.export`` (pre-dispatch ATen, parameters
  lifted to placeholders and named in the graph signature); we work on ``ep.module()``, where
  parameters are the module's own (get_attr), so the result trains like any module.
* ``torch.compile`` hands the backend a dynamo graph whose parameters are placeholders; we re-trace
  it with ``make_fx(pre_dispatch=True)`` under dynamo's fake mode (symbolic shapes stay symbolic),
  so both entry points see the same ops (``aten.linear``, ``aten.scaled_dot_product_attention``,
  ``aten.matmul``...), and composite ops keep their autograd meaning for the binarized graph.
  Fused module fast paths that dynamo records (``aten._transformer_encoder_layer_fwd``, taken by
  ``nn.TransformerEncoderLayer`` under ``no_grad``, with or without masks) are decomposed back into
  those ops.

Inputs as users hold them (:func:`example_call`): positional inputs, keyword inputs (a mapping
such as a tokenizer's output, and/or ``example_kwargs``), and ``*args``/``**kwargs`` forwards.
They are bound to the model's ``forward`` signature, flattened with ``torch.utils._pytree`` and
exported as one flat tuple of leaves (every tensor dim ``Dim.AUTO``: one dynamic-shapes spec that
fits any input structure); the GraphModule then gets the user's input structure back as its
calling convention (``_PyTreeCodeGen``: same names, positional or keyword) and the model's output
structure (HF ``ModelOutput``, tuples, dicts, caches) from ``torch.export``'s output spec.
Keyword inputs that hold no tensor (``use_cache=False``, ``return_dict=True``) are constants of
the capture. Hugging Face caches (``DynamicCache``, ``EncoderDecoderCache``) are registered as
pytrees, so decoders capture with ``use_cache=True`` (HF's default) and carry the cache through.
"""
from __future__ import annotations

import contextlib
import operator
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx

from bitfx.inputs import CaptureError, ExampleCall, example_call, explain_capture_failure, pytree_codegen


def capture_export(model: torch.nn.Module, example_inputs: Any = (), dynamic_shapes=None, *,
                   example_kwargs: Any = None, call: ExampleCall | None = None):
    """``torch.export`` -> (GraphModule with parameters as attributes, names of weight nodes).

    ``example_inputs`` may be a tuple of positional inputs, one tensor, or a mapping of keyword
    inputs; ``example_kwargs`` adds keyword inputs (see :func:`bitfx.inputs.example_call`).
    ``dynamic_shapes`` (for the flat leaves; default: every tensor dim ``Dim.AUTO``).
    The GraphModule is called like ``model`` and returns its output structure.

    Raises:
        TypeError: the inputs do not fit ``model.forward``'s signature (naming both).
        CaptureError: ``torch.export`` failed; the message names the cause and the way out.
    """
    if isinstance(model, fx.GraphModule) and _has_bitfx_ops(model):
        gm = model
    else:
        call = call or example_call(model, example_inputs, example_kwargs)
        gm = _export_flat(model, call, dynamic_shapes)
    weights = {n.name for n in gm.graph.nodes if n.op == "get_attr"}
    return gm, weights


def _export_flat(model: torch.nn.Module, call: ExampleCall, dynamic_shapes) -> fx.GraphModule:
    """Export ``model`` as a function of the flat leaves of its inputs, then give the GraphModule
    the user's calling convention back."""
    if dynamic_shapes is None:
        dynamic_shapes = (tuple({i: torch.export.Dim.AUTO for i in range(x.dim())} if isinstance(x, torch.Tensor)
                                else None for x in call.flat),)
    forward = model.forward
    had_own = "forward" in vars(model)
    own = vars(model).get("forward")

    def flat_forward(*leaves):
        args, kwargs = call.unflatten(leaves)
        return forward(*args, **kwargs)

    model.forward = flat_forward  # the instance attribute shadows the class method during export only
    try:
        ep = torch.export.export(model, tuple(call.flat), dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:
        raise explain_capture_failure(e, model, call) from e
    finally:
        if had_own:
            model.forward = own
        else:
            del model.forward
    gm = inline_regions(ep.module())
    gm.graph._codegen = pytree_codegen(call, gm._out_spec)
    gm.recompile()
    gm.validate_inputs = False  # the Python signature checks names; shapes are symbolic
    gm.bitfx_call = call
    return gm


def inline_regions(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with its ``invoke_subgraph`` calls inlined (nested ones too), or ``gm`` itself when it has none.

    A block whose ``forward`` is a ``torch.compiler.nested_compile_region`` (`bitfx.trace_once` marks a model's
    repeated blocks) is traced once by dynamo, and its graph called once per block. bitfx's passes work on the
    flat graph (torch's own pass for compilers that take no higher-order ops), whose repeated blocks
    `bitfx.regions` then compiles once each, as for an unmarked model: the trace is what the mark saves."""
    hop = getattr(torch.ops.higher_order, "invoke_subgraph", None)
    if hop is None or not any(n.target is hop for m in gm.modules() if isinstance(m, fx.GraphModule)
                              for n in m.graph.nodes):
        return gm
    from torch._higher_order_ops.passes.inline_invoke_subgraph import (inline_invoke_subgraph,
                                                                       inline_invoke_subgraph_nodes)

    for name, sub in list(gm.named_modules()):  # (regions inside regions first, as torch's pass does)
        if name and isinstance(sub, fx.GraphModule):
            inline_invoke_subgraph(sub)
    for call in [n for n in gm.graph.nodes if n.target is hop]:
        before, after = call.prev, call.next
        while after.target is operator.getitem and after.args[0] is call:  # (erased with the call)
            after = after.next
        stack = call.meta.get("nn_module_stack") or {}
        inline_invoke_subgraph_nodes(gm, [call])  # the region's nodes, where the call was
        node = before.next
        while stack and node is not after:
            if node.meta.get("nn_module_stack"):
                node.meta["nn_module_stack"] = _restacked(node.meta["nn_module_stack"], stack)
            node = node.next
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _restacked(inner: dict, call: dict) -> dict:
    """The module stack of a node of an inlined region, for the call it was inlined at: the region was traced
    in the first block (``encoder.layer.0...``), the call is in its own (``encoder.layer.3``). The call's
    stack, then the node's entries below the block, their paths moved to the call's block."""
    block_path, block_type = list(call.values())[-1]
    entries = list(inner.items())
    at = next((i for i, (_, (_, t)) in enumerate(entries) if t is block_type), None)
    if at is None:
        return inner
    traced = str(entries[at][1][0])
    out = dict(call)
    for key, (path, t) in entries[at + 1:]:
        path = str(path)
        moved = str(block_path) + path[len(traced):] if path.startswith(traced) else path
        out[f"{key}@{block_path}"] = (moved, t)
    return out


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
    interpreter = _ScalarFolding(gm, example_inputs)  # reads real values: outside the fake mode
    try:
        if fake_mode is not None:
            # dynamo turns Python floats (e.g. dropout p) into 0-d tensors read with .item()
            fake_mode.allow_scalar_outputs = True
        with ctx, fx.traceback.preserve_node_meta():
            traced = make_fx(
                interpreter.run,
                pre_dispatch=True,
                tracing_mode="fake" if fake_mode is not None else "symbolic",
                decomposition_table=FUSED_DECOMPOSITIONS,
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


def _encoder_layer_fwd(src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, use_gelu,
                       norm_first, eps, ln1_weight, ln1_bias, ln2_weight, ln2_bias,
                       ffn1_weight, ffn1_bias, ffn2_weight, ffn2_bias, mask=None, mask_type=None):
    """``aten._transformer_encoder_layer_fwd`` (the no_grad fast path of a batch-first
    ``nn.TransformerEncoderLayer``, which dynamo traces as one op) in the ops of its Python path,
    so that its linears and attention can be rewritten.

    ``mask`` is the merged mask of ``nn.MultiheadAttention.merge_masks``: ``mask_type`` 0 an
    ``[S, S]`` attention mask, 1 a ``[B, S]`` key padding mask, 2 a ``[B, H, S, S]`` merged mask;
    a nonzero float (``-inf``) or True entry is masked, as in the fused kernel. It becomes the
    additive mask of the attention (0 / -inf), which is what the Python path computes."""
    if src.is_nested or src.dim() != 3:
        return NotImplemented
    F = torch.nn.functional
    b, n, _ = src.shape
    bias = None
    if mask is not None:
        shape = {0: (1, 1, n, n), 1: (b, 1, 1, n)}.get(mask_type) if mask.dim() == 2 else None
        if shape is None and mask.dim() != 4:
            return NotImplemented
        masked = (mask if mask.dtype == torch.bool else mask != 0)
        masked = masked.view(shape) if shape is not None else masked
        bias = torch.zeros(masked.shape, dtype=src.dtype, device=src.device).masked_fill(masked, float("-inf"))

    def norm(x, w, b):
        return F.layer_norm(x, (embed_dim,), w, b, eps)

    def attention(x):
        b, n, _ = x.shape
        qkv = F.linear(x, qkv_weight, qkv_bias).view(b, n, 3, num_heads, embed_dim // num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return F.linear(y.transpose(1, 2).reshape(b, n, embed_dim), proj_weight, proj_bias)

    def ffn(x):
        h = F.linear(x, ffn1_weight, ffn1_bias)
        return F.linear(F.gelu(h) if use_gelu else F.relu(h), ffn2_weight, ffn2_bias)

    if norm_first:
        x = src + attention(norm(src, ln1_weight, ln1_bias))
        return x + ffn(norm(x, ln2_weight, ln2_bias))
    x = norm(src + attention(src), ln1_weight, ln1_bias)
    return norm(x + ffn(x), ln2_weight, ln2_bias)


#: Fused ops that dynamo may record (module fast paths) -> their decomposed Python path.
FUSED_DECOMPOSITIONS = {torch.ops.aten._transformer_encoder_layer_fwd.default: _encoder_layer_fwd}


class _ScalarFolding(fx.Interpreter):
    """Reads ``.item()`` of 0-d tensor inputs as the example's Python number.

    Dynamo turns float attributes (LayerNorm eps, dropout p) into 0-d tensor inputs read with
    ``.item()``; traced symbolically they become data-dependent and any branch on them fails. They
    are module constants, so the compiled graph specialises on their value (dynamo installs no guard
    for them: change such an attribute and call ``torch._dynamo.reset()``).
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]):
        super().__init__(gm)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.constants = {
            n: real.item()
            for n, real in zip(placeholders, example_inputs)
            if isinstance(real, torch.Tensor) and not isinstance(real, torch.nn.Parameter)
            and real.dim() == 0 and real.is_floating_point()
            and n.users and all(u.op == "call_method" and u.target == "item" for u in n.users)
        }

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_method" and n.target == "item" and n.args[0] in self.constants:
            return self.constants[n.args[0]]
        return super().run_node(n)


def _has_bitfx_ops(gm: fx.GraphModule) -> bool:
    return any(
        n.op == "call_function" and getattr(n.target, "namespace", None) == "bitfx"
        for n in gm.graph.nodes
    )
