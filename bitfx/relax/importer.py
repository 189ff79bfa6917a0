"""``to_relax``: a binarized GraphModule as a Relax IRModule for one kernel set.

    mod = to_relax(gm, (x,), target="linux-arm64")     # R.call_tir of the arm64 kernels

The steps: ``torch.export`` (batch and sequence dims symbolic where the model allows) →
decompositions (``bit_attention`` into its formula with its integer products as ops of their own,
``bitfx.attention`` into its float reference, ``aten.amax`` into argmax + gather, which the importer
takes; ``aten.gelu`` into a rational erf that vectorises, instead of a libm ``erff`` call per element) → a check that names every op the importer has no converter for, all at once →
``from_exported_program`` with the converters of ``bitfx/relax/converters.py``.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.fx as fx

log = logging.getLogger(__name__)

__all__ = ["ExportError", "to_relax"]


class ExportError(RuntimeError):
    """The model cannot be exported for a device; the message names the op(s) and the layer(s)."""


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def to_relax(gm: torch.nn.Module, example_inputs: Sequence[Any], *, dynamic: bool | str = True, target=None):
    """The binarized GraphModule as a Relax IRModule (see ``bitfx.export`` for the lowering).

    Args:
        target: the device target (name or ``DeviceTarget``) whose kernel set the bitfx ops lower to;
            ``None``: the reference compute.
        dynamic: ``True``: keep the batch and sequence dims symbolic where the model allows
            (``torch.export.Dim.AUTO`` on every dim); ``"batch"``: only the first dim of each input;
            ``False``: the example shapes. If an import fails it is retried with the next of these
            (a warning says so); ``to_relax.last_dynamic`` says which one the last call produced.
    """
    inputs = _as_tuple(example_inputs)
    kernels = "reference"
    if target is not None:
        from bitfx.targets import cross

        kernels = cross.get_target(target).kernels
    if dynamic not in (True, False, "batch"):
        raise ValueError(f"to_relax: dynamic={dynamic!r} (accepted: True, 'batch', False)")
    modes = {True: [True, "batch"], "batch": ["batch"], False: []}[dynamic]
    for mode in modes:
        try:
            mod = _import(gm, inputs, _dynamic_shapes(inputs, mode), kernels)
            to_relax.last_dynamic = mode
            return mod
        except ExportError:
            raise
        except Exception as e:  # noqa: BLE001 — retried with fewer symbolic dims below
            log.warning("bitfx.export: %s failed (%s: %s); trying %s", SHAPE_MODES[mode], type(e).__name__,
                        str(e).splitlines()[0][:200] if str(e) else "",
                        SHAPE_MODES[next_shape_mode(mode)])
    mod = _import(gm, inputs, None, kernels)
    to_relax.last_dynamic = False
    return mod


#: How each ``dynamic`` mode reads in a warning.
SHAPE_MODES = {True: "symbolic shapes", "batch": "a symbolic batch only", False: "the example shapes"}


def next_shape_mode(mode):
    """The mode to retry with when ``mode`` fails: all symbolic → batch only → the example shapes."""
    return {True: "batch", "batch": False}.get(mode, False)


def _dynamic_shapes(inputs: tuple, mode):
    if mode is True:
        from bitfx.api import _auto_dynamic_shapes

        return _auto_dynamic_shapes(inputs)
    return tuple({0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() else None for x in inputs)


to_relax.last_dynamic = None


def _import(gm, inputs: tuple, dynamic_shapes, kernels: str):
    from tvm.relax.frontend.torch import from_exported_program

    from bitfx.relax.converters import ConvertContext, convert_map

    ep = torch.export.export(gm, inputs, dynamic_shapes=dynamic_shapes)
    if dynamic_shapes is not None:
        symbolic = _symbolic_dims(ep, inputs)
        if symbolic != dynamic_shapes:
            ep = torch.export.export(gm, inputs, dynamic_shapes=symbolic)
    ep = _exact_symbolic_slices(_finite_full_fills(_drop_empty_cat_operands(_decompose(ep))))
    _check_supported(ep, gm)
    ctx = ConvertContext(values=_constant_values(ep), kernels=kernels)
    try:
        return from_exported_program(ep, custom_convert_map=convert_map(ctx), keep_params_as_input=False)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 — re-raised with the op and the layer when one is named
        op = _op_in_message(str(e), ep)
        if op is None:
            raise
        node, name = op
        raise ExportError(f"cannot export {_layer(node, gm)}: op {name} is not supported by TVM's Relax "
                          f"torch importer ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e


def _symbolic_dims(ep, inputs: tuple) -> tuple:
    """Dynamic shapes that mark only the dims ``ep`` kept symbolic. With ``Dim.AUTO`` on every dim, a
    dim torch specialised (a hidden size of 32) is still a SymInt whose expression is the number, and
    TVM's importer makes it a symbolic var *named* ``32``: a broadcast with a literal 32 then loses its
    shape (``nn.TransformerDecoderLayer`` failed to build with symbolic shapes). Re-exported with those
    dims static, they are plain ints."""
    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    out = []
    for name, x in zip(ep.graph_signature.user_inputs, inputs):
        val = vals.get(name)
        if not isinstance(x, torch.Tensor) or not isinstance(val, torch.Tensor):
            out.append(None)
            continue
        out.append({i: torch.export.Dim.AUTO for i, d in enumerate(val.shape)
                    if isinstance(d, torch.SymInt) and not d.node.expr.is_number})
    return tuple(out)


# erf(x) ~= x P(x^2) / Q(x^2) on [-4, 4] (clamped: erf is +-1 in float32 beyond), |error| < 5e-7: the
# rational form of Eigen's and XLA's float erf. Only multiply-adds and one divide, so the fused loop
# vectorises on the device; TVM's own erf is a libm erff call per element.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def erf_rational(x: torch.Tensor) -> torch.Tensor:
    """``erf(x)`` as a rational polynomial in ATen multiply-adds (max |error| 4.2e-7 in float32)."""
    x = x.clamp(-4.0, 4.0)
    x2 = x * x
    p, q = x2 * _ERF_P[0] + _ERF_P[1], x2 * _ERF_Q[0] + _ERF_Q[1]
    for c in _ERF_P[2:]:
        p = x2 * p + c
    for c in _ERF_Q[2:]:
        q = x2 * q + c
    return x * p / q


def gelu(x, approximate: str = "none"):
    """``GELU(x) = x/2 (1 + erf(x/sqrt 2))`` with ``erf_rational``; the tanh form spelled out."""
    if approximate == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    return 0.5 * x * (1.0 + erf_rational(x * 0.7071067811865476))


def _decompose(ep, integer_kernels: bool = True):
    """bit_attention → ATen float ops, with its integer matmuls as ``sign_scores``/``binary_pv``
    (``integer_kernels``, lowered to call_tir) or as plain float matmuls (its reference formula)."""
    from bitfx.ops.attention import attention_reference, bit_attention_reference
    from bitfx.ops.attention_products import bit_attention_with_products

    ref = bit_attention_with_products if integer_kernels else bit_attention_reference

    def decomp(*args, **kwargs):
        with torch.no_grad():
            return ref(*args, **kwargs)

    def float_attention(q, k, v, attn_mask, scale, is_causal, dropout_p):
        # canonical float attention (layers the config keeps float); inference: no dropout
        return attention_reference(q, k, v, attn_mask, scale, is_causal, 0.0)

    def amax(x, dim=(), keepdim=False):
        # The Relax importer has no amax, and its max.dim needs topk (absent from the runtime):
        # argmax + gather instead (NaN aside, the same value).
        dims = sorted({d % x.dim() for d in ([dim] if isinstance(dim, int) else dim)} or range(x.dim()),
                      reverse=True)
        for d in dims:
            # clamped: TVM's argmax of a row of -inf leaves its initial index -1 (an out-of-bounds gather)
            i = torch.argmax(x, dim=d, keepdim=True)
            x = torch.gather(x, d, torch.where(i >= 0, i, 0))
            if not keepdim:
                x = x.squeeze(d)
        return x

    table = {torch.ops.bitfx.bit_attention.default: decomp,
             torch.ops.bitfx.attention.default: float_attention,
             torch.ops.aten.amax.default: amax,
             torch.ops.aten.gelu.default: gelu}
    if not any(n.target in table for n in ep.graph.nodes):
        return ep
    return ep.run_decompositions(table)


def _rewrite_calls(ep, target, rewrite):
    """Each call of ``target`` in ``ep``'s graph replaced by ``rewrite(graph, node)``: a new node (given
    the old node's meta unless it set its own), another existing node, ``node`` itself (edited in place),
    or None (kept as it is)."""
    g, changed = ep.graph, False
    for node in list(g.nodes):
        if node.op != "call_function" or node.target != target:
            continue
        new = rewrite(g, node)
        if new is None:
            continue
        changed = True
        if new is node:
            continue
        if not new.meta:
            new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
    if changed:
        g.eliminate_dead_code()
        ep.graph_module.recompile()
    return ep


def _drop_empty_cat_operands(ep):
    """``cat([empty_1d, x, ...], dim)`` -> ``cat([x, ...], dim)``: torch (legacy behaviour) skips 1-D
    tensors of size 0 in a cat whatever the other operands' rank; Relax's concat requires one rank.
    Hugging Face's ``DynamicCache`` starts each layer's keys and values as ``torch.tensor([])`` and
    concatenates the new keys onto it: the reason GPT-2 with its cache on did not import."""

    def rewrite(g, node):
        kept = [t for t in node.args[0] if not _is_empty_1d(t)]
        if len(kept) == len(node.args[0]) or not kept:
            return None
        if len(kept) == 1:
            return kept[0]
        node.args = (kept, *node.args[1:])
        return node

    return _rewrite_calls(ep, torch.ops.aten.cat.default, rewrite)


def _is_empty_1d(node) -> bool:
    val = getattr(node, "meta", {}).get("val") if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dim() == 1 and isinstance(val.shape[0], int) and val.shape[0] == 0


def _finite_full_fills(ep):
    """``full(shape, ±inf or nan)`` -> ``full(shape, 0) + scalar_tensor(value)``: TVM's legalization of
    ``R.full`` fails on a non-finite fill (``TypeError: argument of type 'PrimType' is not iterable``
    in ``topi.full``), e.g. ``nn.Transformer.generate_square_subsequent_mask``'s ``full((n, n), -inf)``."""
    aten = torch.ops.aten

    def rewrite(g, node):
        value, val = node.args[1], node.meta.get("val")
        if not isinstance(value, float) or (value == value and abs(value) != float("inf")) or val is None:
            return None
        with g.inserting_before(node):
            zeros = g.call_function(aten.full.default, (node.args[0], 0.0), dict(node.kwargs))
            fill = g.call_function(aten.scalar_tensor.default, (value,), {"dtype": val.dtype, "device": val.device})
            out = g.call_function(aten.add.Tensor, (zeros, fill))
        with val.fake_mode:
            zeros.meta["val"] = torch.zeros_like(val)
            fill.meta["val"] = torch.scalar_tensor(value, dtype=val.dtype, device=val.device)
        return out

    return _rewrite_calls(ep, aten.full.default, rewrite)


def _exact_symbolic_slices(ep):
    """``x[:, :s]`` of a static dim by a symbolic ``s`` -> ``index_select(x, dim, arange(s))``.

    torch has proved ``s <= size`` (e.g. BERT's ``position_ids[:, :seq_len]`` of a 512-long buffer);
    Relax infers ``min(s, size)`` for the slice, cannot prove it equal to ``s`` at the next broadcast
    (the embeddings' add) and drops the shape, and a later reshape with -1 fails: the reason real
    MiniLM exported only at the example shapes. The gather has the same values and length ``s``."""
    aten = torch.ops.aten

    def rewrite(g, node):
        x, dim, start, end, step = (*node.args, *(None, 0, None, None, 1)[len(node.args):])
        val, xval = node.meta.get("val"), getattr(x, "meta", {}).get("val")
        if (not isinstance(end, fx.Node) or start not in (0, None) or step not in (1, None)
                or val is None or xval is None or not isinstance(xval.shape[dim], int)):
            return None
        with g.inserting_before(node):
            idx = g.call_function(aten.arange.start_step, (0, end, 1), {"dtype": torch.int64, "device": xval.device})
            sel = g.call_function(aten.index_select.default, (x, dim, idx))
        with xval.fake_mode:
            idx.meta["val"] = torch.arange(0, val.shape[dim], dtype=torch.int64, device=xval.device)
        return sel

    return _rewrite_calls(ep, aten.slice.Tensor, rewrite)


def _constant_values(ep) -> dict[str, torch.Tensor]:
    """placeholder name -> tensor, for the parameters, buffers and constants of ``ep``."""
    sig, out = ep.graph_signature, {}
    for name, target in sig.inputs_to_parameters.items():
        out[name] = ep.state_dict[target]
    for name, target in sig.inputs_to_buffers.items():
        out[name] = ep.state_dict[target] if target in ep.state_dict else ep.constants[target]
    for name, target in getattr(sig, "inputs_to_lifted_tensor_constants", {}).items():
        out[name] = ep.constants[target]
    return out


def _importer_ops() -> set[str] | None:
    """The op names TVM's importer converts (``"add.Tensor"``...); None if its table is unreadable."""
    try:
        from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

        return set(ExportedProgramImporter().create_convert_map().keys())
    except Exception:  # noqa: BLE001 — the check is best effort; the import itself still runs
        return None


def _check_supported(ep, gm) -> None:
    """Name every op (and its layer) the importer has no converter for, all at once, before importing."""
    from bitfx.relax.converters import converted_ops

    known = _importer_ops()
    if known is None:
        return
    known |= {op.__name__ for op in converted_ops()}
    decomposed = ep.run_decompositions()  # what the importer sees (run_ep_decomposition=True)
    missing = [f"{_layer(node, gm)}: op {node.target} ({node.target.__name__})"
               for node in decomposed.graph.nodes
               if node.op == "call_function" and hasattr(node.target, "_schema")
               and node.target.__name__ not in known]
    if missing:
        raise ExportError(f"cannot export {len(missing)} node(s) that TVM's Relax torch importer does not "
                          f"support: {'; '.join(missing)}. Replace them in the model, or keep those layers "
                          "out of the exported module")


def _op_in_message(msg: str, ep):
    for node in ep.graph.nodes:
        if node.op == "call_function" and hasattr(node.target, "__name__") and node.target.__name__ in msg:
            return node, str(node.target)
    return None


def _layer(node, gm) -> str:
    """'layer fc1 (torch.nn.Linear)' from the node's nn_module_stack, or from the same-named gm node."""
    from bitfx.passes.context import module_of, module_type_of

    path, kind = module_of(node), module_type_of(node)
    if not path and isinstance(gm, fx.GraphModule):
        for n in gm.graph.nodes:
            if n.name == node.name:
                path, kind = module_of(n), module_type_of(n)
                break
    if not path:
        stack = node.meta.get("stack_trace") or ""
        return f"node {node.name} (no module path recorded{'; ' + stack.strip().splitlines()[-1] if stack else ''})"
    return f"layer {path!r} ({kind}), node {node.name}"


def fused(mod):
    """``mod`` with its float Relax ops legalized and fused into TIR loops (``FuseOps`` + ``FuseTIR``).

    ``relax.build``'s default pipeline legalizes but does not fuse: without this, every elementwise
    op (each multiply-add of ``gelu``'s polynomial, each residual add) is a loop of its own over memory.
    The bitfx ``call_tir`` kernels stay as they are (opaque to the fusion).
    """
    import tvm
    from tvm import relax

    from tvm.s_tir import dlight

    seq = tvm.transform.Sequential([relax.transform.LegalizeOps({"relax.nn.softmax": _softmax_fast_exp}),
                                    relax.transform.AnnotateTIROpPattern(),
                                    relax.transform.FoldConstant(), relax.transform.FuseOps(),
                                    relax.transform.FuseTIR()])
    mod = seq(mod)
    with tvm.target.Target("llvm"):  # the rule below is target independent
        return dlight.ApplyDefaultSchedule(_InlineElementwise())(mod)


def softmax_fast_exp(x, axis: int = -1):
    """``softmax(x) = e / sum(e)``, ``e = exp(x - max x)`` with ``topi.fast_exp`` (a polynomial times 2^n,
    relative error ~1e-7, vectorises) instead of a libm ``expf`` call per element. ``x``: a ``te.Tensor``."""
    from tvm import topi

    axis = axis % len(x.shape)
    e = topi.fast_exp(topi.subtract(x, topi.max(x, axis=axis, keepdims=True)))
    return topi.divide(e, topi.sum(e, axis=axis, keepdims=True))


def _softmax_fast_exp(bb, call):
    return bb.call_te(softmax_fast_exp, call.args[0], int(call.attrs.axis), primfunc_name_hint="softmax")


def _inline_rule_base():
    from tvm.s_tir import dlight

    return dlight.ScheduleRule


class _InlineElementwise(_inline_rule_base()):
    """A fused function of elementwise blocks becomes one loop: every block inlined into its consumer.

    (``FuseTIR`` puts the blocks in one function, each still a loop over memory with its own buffer.)
    Functions with a reduction (softmax, LayerNorm) and the bitfx kernels (no blocks) are left alone.
    """

    def apply(self, func, target, tunable):
        from tvm import s_tir
        from tvm.s_tir import dlight

        if not isinstance(func, tvm_prim_func_type()):
            return None
        sch = s_tir.Schedule(func)
        try:
            blocks = dlight.normalize_prim_func(sch)
        except Exception:  # noqa: BLE001 — not a block-structured function
            return None
        if not blocks or len(blocks) < 2 or not all(b.is_injective() for b in blocks):
            return None
        count = len(blocks)
        if len(dlight.try_inline(sch, blocks)) == count:  # try_inline pops what it inlined
            return None
        return sch


def tvm_prim_func_type():
    from tvm import tirx

    return tirx.PrimFunc
