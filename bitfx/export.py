"""``bitfx.export``: a binarized model as one shared library for a device (DESIGN §1, stage 4).

    path = bitfx.export(model, (x,), target="linux-arm64", path="model.so", verify=True)

The pipeline: ``bitfx.binarize`` (unless given an already binarized GraphModule) → ``torch.export`` →
``tvm.relax.frontend.torch.from_exported_program`` with converters for the bitfx ops →
``relax.build`` for the target → ``export_library`` with the target's cross linker (→ a deploy bundle).

How the bitfx ops lower:

- ``bit_linear`` becomes ``call_tir`` of the TIR kernels of ``bitfx/codegen/compute.py``: the weight is
  binarized (or ternarized) and packed ahead, in NumPy, into the K-major ``[KW, N]`` uint64 layout
  and embedded as a Relax constant (the export freezes weights); the activation is sign-packed
  (``pack_rows``, with ``move`` and the per-token mean |x| scale) or absmax-quantized into bit planes
  (``absmax_planes``), then one popcount ``gemm`` with the fused float epilogue
  ``(acc * row_scale) * col_scale + bias``. The token count M stays symbolic.
- ``bit_attention`` is decomposed before the import into its reference formula with its two integer
  matmuls kept as ops of their own: ``sign(q)·sign(k)ᵀ`` (``sign_scores``: ``pack_rows`` + batched xnor
  ``gemm``) and ``P_b·sign(v)`` (``binary_pv``: ``pack_rows(nonzero)`` + ``pack_cols`` + batched
  and-``gemm``) become ``call_tir`` of the kernels; everything else of it (the α scales, BiPFT
  estimators, scale, masks, softmax, the probability binarizer, the value scale) runs as **float
  Relax ops** on the device.

Shapes: batch and sequence dims stay symbolic where the importer keeps them (``to_relax(dynamic=True)``);
if the symbolic import fails the library is built for the example shapes (a warning says so).
The bit_linear kernels themselves take any M.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx as fx

log = logging.getLogger(__name__)

__all__ = ["export", "verify", "to_relax", "ExportError", "cli_main"]

WORD = 64


class ExportError(RuntimeError):
    """The model cannot be exported for a device; the message names the op and the layer."""


# ------------------------------------------------------------------------------------ public API
def export(model_or_binarized_gm: torch.nn.Module, example_inputs: Sequence[Any],
           target: str = "linux-arm64", path: str | Path = "model.so", config=None, *,
           verify: bool = False, bundle: bool = True) -> Path:
    """Binarize ``model`` (unless it already is), compile it for ``target`` and write ``path``.

    Args:
        model_or_binarized_gm: a float ``nn.Module`` (binarized here with ``config``) or the output
            of ``bitfx.binarize``.
        example_inputs: one batch of inputs; the library is built for their shapes.
        target: a device target of ``bitfx.targets.cross`` (``linux-arm64``, ``android-arm64``, ...).
        path: the shared library to write.
        verify: run the library under qemu (aarch64 targets) and compare with the host model.
        bundle: also write the deploy bundle (loader, README, manifest) next to ``path``.

    Returns:
        The library path.

    Raises:
        ValueError: unknown target (listing the known ones).
        ExportError: an op the Relax importer cannot take, naming the op and its layer.
        AssertionError: with ``verify``, when the device output differs (max difference given).
    """
    from bitfx.targets import cross

    dt = cross.get_target(target)  # raises on an unknown target, before any work
    inputs = _as_tuple(example_inputs)
    gm = _binarized(model_or_binarized_gm, inputs, config)
    mod = to_relax(gm, inputs)
    try:
        exe = cross.build_relax(mod, dt)
    except Exception as e:  # noqa: BLE001 — a symbolic-shape build failure is retried static
        if not to_relax.last_dynamic:
            raise
        log.warning("bitfx.export: building with symbolic shapes failed (%s: %s); building at the example shapes",
                    type(e).__name__, (str(e).strip().splitlines() or [""])[-1][:200])
        exe = cross.build_relax(to_relax(gm, inputs, dynamic=False), dt)
    path = cross.export_library(exe, path, dt)
    if bundle:
        from bitfx.deploy import write_bundle

        write_bundle(path, dt.name if hasattr(dt, "name") else target)
    if verify:
        with torch.no_grad():
            expected = gm(*inputs)
        globals()["verify"](path, inputs, expected, target)
    return path


def verify(path: str | Path, example_inputs: Sequence[Any], expected, target: str = "linux-arm64",
           *, rtol: float = 1e-4, atol: float = 1e-4) -> float:
    """Run ``path`` under qemu on ``example_inputs`` and compare with ``expected`` (tensor(s)).

    The tolerance is scaled by the largest |expected|. Returns the max absolute difference;
    raises AssertionError naming it when the outputs differ.
    """
    from bitfx.targets import emulate

    inputs = [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
              for t in _as_tuple(example_inputs)]
    outs = emulate.run_emulated(path, inputs, target)
    exp = [e.detach().float().cpu().numpy() for e in _flatten(expected)]
    if len(outs) != len(exp):
        raise AssertionError(f"{Path(path).name}: {len(outs)} outputs on the device, {len(exp)} expected")
    worst = 0.0
    for i, (o, e) in enumerate(zip(outs, exp)):
        if o.shape != e.shape:
            raise AssertionError(f"output {i}: shape {o.shape} on the device, {e.shape} expected")
        diff = float(np.max(np.abs(o.astype(np.float64) - e))) if e.size else 0.0
        scale = max(1.0, float(np.max(np.abs(e))) if e.size else 1.0)
        worst = max(worst, diff)
        if not diff <= atol * scale + rtol * scale:
            raise AssertionError(f"output {i} of {Path(path).name} on {target} differs from the host model: "
                                 f"max |difference| = {diff:.3g} (tolerance {atol * scale + rtol * scale:.3g})")
    return worst


def to_relax(gm: torch.nn.Module, example_inputs: Sequence[Any], *, dynamic: bool = True):
    """The binarized GraphModule as a Relax IRModule (see the module docstring for the lowering).

    With ``dynamic`` the export keeps the batch and sequence dims symbolic where the model allows
    (``torch.export.Dim.AUTO``); if that import fails (some graphs lose static shape information in
    the importer, e.g. ``nn.TransformerEncoderLayer``), it falls back to the example shapes and
    logs a warning (``export`` also falls back when the symbolic module fails to build).
    ``to_relax.last_dynamic`` says which one the last call produced.
    """
    inputs = _as_tuple(example_inputs)
    if dynamic:
        from bitfx.api import _auto_dynamic_shapes

        try:
            mod = _import(gm, inputs, _auto_dynamic_shapes(inputs))
            to_relax.last_dynamic = True
            return mod
        except ExportError:
            raise
        except Exception as e:  # noqa: BLE001 — retried with static shapes below
            log.warning("bitfx.export: symbolic shapes failed (%s: %s); exporting at the example shapes",
                        type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
    mod = _import(gm, inputs, None)
    to_relax.last_dynamic = False
    return mod


to_relax.last_dynamic = None


def _import(gm, inputs: tuple, dynamic_shapes):
    from tvm.relax.frontend.torch import from_exported_program

    ep = torch.export.export(gm, inputs, dynamic_shapes=dynamic_shapes)
    ep = _decompose_attention(ep)
    values = _constant_values(ep)
    convert = {"bit_linear.default": lambda node, importer: _convert_bit_linear(node, importer, values),
               "sign_scores.default": _convert_sign_scores, "binary_pv.default": _convert_binary_pv}
    _check_supported(ep, gm)
    try:
        return from_exported_program(ep, custom_convert_map=convert, keep_params_as_input=False)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 — re-raised with the op and the layer when one is named
        op = _op_in_message(str(e), ep)
        if op is None:
            raise
        node, name = op
        raise ExportError(f"cannot export {_layer(node, gm)}: op {name} is not supported by TVM's Relax "
                          f"torch importer ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e


# ------------------------------------------------------------------------------------ the pipeline
def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _flatten(x) -> list:
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _flatten(v)]
    return [x]


def _has_bitfx(gm) -> bool:
    return isinstance(gm, fx.GraphModule) and any(
        n.op == "call_function" and str(n.target).startswith("bitfx.") for n in gm.graph.nodes)


def _binarized(model, inputs, config):
    if _has_bitfx(model):
        return model
    import bitfx

    return bitfx.binarize(model.eval() if hasattr(model, "eval") else model, inputs, config)


# Two integer pieces of bit_attention as ops of their own, so that the rest of the op decomposes into
# ATen (float Relax ops) while these become call_tir of the popcount kernels. Both return the exact
# integers as float32 (what the reference's float matmul of ±1/{0,1} codes gives).
@torch.library.custom_op("bitfx_export::sign_scores", mutates_args=())
def sign_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``S[..., i, j] = sum_d sign(q[..., i, d]) * sign(k[..., j, d])`` (float32)."""
    from bitfx.ops.quantizers import sign

    return sign(q.float()) @ sign(k.float()).transpose(-2, -1)


@sign_scores.register_fake
def _(q, k):
    return q.new_empty((*q.shape[:-1], k.shape[-2]), dtype=torch.float32)


@torch.library.custom_op("bitfx_export::binary_pv", mutates_args=())
def binary_pv(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``O[..., i, d] = sum_j p[..., i, j] * sign(v[..., j, d])`` for p in {0, 1} (float32)."""
    from bitfx.ops.quantizers import sign

    return p.float() @ sign(v.float())


@binary_pv.register_fake
def _(p, v):
    return p.new_empty((*p.shape[:-1], v.shape[-1]), dtype=torch.float32)


def _bit_attention_decomposed(*args):
    """``bit_attention``'s formula with its two integer matmuls as ``sign_scores`` / ``binary_pv``."""
    from bitfx.ops.attention import bit_attention_formula

    return bit_attention_formula(*args, sign_scores=torch.ops.bitfx_export.sign_scores,
                                 binary_pv=torch.ops.bitfx_export.binary_pv)


def _decompose_attention(ep, integer_kernels: bool = True):
    """bit_attention → ATen float ops, with its integer matmuls as ``sign_scores``/``binary_pv``
    (``integer_kernels``, lowered to call_tir) or as plain float matmuls (its reference formula)."""
    from bitfx.ops.attention import bit_attention_reference

    from bitfx.ops.attention import attention_reference

    ref = _bit_attention_decomposed if integer_kernels else bit_attention_reference

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
            x = torch.gather(x, d, torch.argmax(x, dim=d, keepdim=True))
            if not keepdim:
                x = x.squeeze(d)
        return x

    table = {torch.ops.bitfx.bit_attention.default: decomp,
             torch.ops.bitfx.attention.default: float_attention,
             torch.ops.aten.amax.default: amax}
    if not any(n.target in table for n in ep.graph.nodes):
        return ep
    return ep.run_decompositions(table)


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


# Ops the importer takes that are not listed in its convert map by this name (none known).
def _importer_ops() -> set[str] | None:
    try:
        from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

        imp = ExportedProgramImporter()
        return set(imp.create_convert_map().keys())
    except Exception:  # noqa: BLE001 — the check is best effort; the import itself still runs
        return None


def _check_supported(ep, gm) -> None:
    """Name the first op (and its layer) the importer has no converter for, before importing."""
    known = _importer_ops()
    if known is None:
        return
    known |= {"bit_linear.default", "sign_scores.default", "binary_pv.default"}
    decomposed = ep.run_decompositions()  # what the importer sees (run_ep_decomposition=True)
    for node in decomposed.graph.nodes:
        if node.op != "call_function" or not hasattr(node.target, "_schema"):
            continue
        name = node.target.__name__
        if name not in known:
            raise ExportError(f"cannot export {_layer(node, gm)}: op {node.target} ({name}) is not supported by "
                              f"TVM's Relax torch importer")


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


# ------------------------------------------------------------------------------------ bit_linear
def _pack_k_major(bits: np.ndarray) -> np.ndarray:
    """bool [N, K] -> uint64 [ceil(K/64), N]: bit j of word w = element 64w + j; tail bits zero."""
    n, k = bits.shape
    kw = (k + WORD - 1) // WORD
    padded = np.zeros((n, kw * WORD), dtype=np.uint64)
    padded[:, :k] = bits
    words = (padded.reshape(n, kw, WORD) << np.arange(WORD, dtype=np.uint64)).sum(-1, dtype=np.uint64)
    return np.ascontiguousarray(words.T)


def _add_prim(bb, func, name: str):
    """Add a PrimFunc under ``name`` (te.create_prim_func names every function "main")."""
    return bb.add_func(func.with_attr("global_symbol", name), name)


def _with_shape(bb, x, fx_arg):
    """``x`` with a known shape: the importer loses it after some ops under symbolic dims (e.g.
    native_layer_norm), so match_cast to the fx value's shape, symbolic dims as fresh variables."""
    from tvm import relax, tirx

    if x.ty.shape is not None:
        return x
    val = fx_arg.meta.get("val") if isinstance(fx_arg, fx.Node) else None
    if val is None:
        raise ExportError(f"{getattr(fx_arg, 'name', fx_arg)}: the importer gives no shape and the graph records none")
    dims = [int(d) if isinstance(d, int) else tirx.Var(f"{fx_arg.name}_d{i}", "int64")
            for i, d in enumerate(val.shape)]
    return bb.match_cast(x, relax.TensorType(dims, x.ty.dtype))


def _tensor_arg(arg, values):
    if arg is None:
        return None
    if isinstance(arg, fx.Node) and arg.name in values:
        return values[arg.name].detach().float()
    return None


def _convert_bit_linear(node: fx.Node, importer, values: dict[str, torch.Tensor]):
    from tvm import relax

    from bitfx.codegen import compute
    from bitfx.ops import linear as L

    x_node, w_node, b_node, ws_node, mv_node, al_node, weight_mode, act_mode, act_bits = node.args
    L.check_modes(weight_mode, act_mode, act_bits)
    weight = _tensor_arg(w_node, values)
    if weight is None:
        raise ExportError(f"bit_linear {node.name}: the weight is computed in the graph, not a parameter; "
                          "the device export freezes weights and needs it constant")
    for what, n in (("bias", b_node), ("weight_scale", ws_node), ("move", mv_node), ("alpha", al_node)):
        if n is not None and _tensor_arg(n, values) is None:
            raise ExportError(f"bit_linear {node.name}: {what} is computed in the graph, not a parameter")
    bias, wscale = _tensor_arg(b_node, values), _tensor_arg(ws_node, values)
    move, alpha = _tensor_arg(mv_node, values), _tensor_arg(al_node, values)

    with torch.no_grad():
        codes, col_scale, _ = L.quantize_weight(weight, wscale, weight_mode)
    codes = codes.numpy()
    N, K = codes.shape
    ternary = weight_mode == "ternary"
    w_packed = (np.stack([_pack_k_major(codes > 0), _pack_k_major(codes < 0)]) if ternary
                else _pack_k_major(codes > 0))
    cs = np.ascontiguousarray(np.broadcast_to(col_scale.reshape(-1).numpy().astype(np.float32), (N,)))

    bb = importer.block_builder
    x = _with_shape(bb, importer.env[x_node], x_node)
    shape = list(x.ty.shape)
    lead = shape[:-1]
    M = math.prod(lead[1:], start=lead[0]) if lead else 1
    x2 = x if len(shape) == 2 else bb.emit(relax.op.reshape(x, [M, K]))
    if x.ty.dtype != "float32":
        x2 = bb.emit(relax.op.astype(x2, "float32"))
    M = x2.ty.shape[0]
    KW = (K + WORD - 1) // WORD
    tag = f"{act_mode}{act_bits}_k{K}_n{N}"

    if act_mode == "sign":
        mv = [relax.const(move.reshape(-1).expand(K).contiguous().numpy().astype(np.float32))] if move is not None else []
        mean = alpha is None
        f = compute.pack_rows(mode="sign", K=K, move=move is not None, mean=mean)
        gv = _add_prim(bb, f, f"bitfx_pack_sign_{tag}")
        packed_si = relax.TensorType([M, KW], "uint64")
        if mean:
            res = bb.emit(relax.call_tir(gv, [x2, *mv], [packed_si, relax.TensorType([M], "float32")]))
            a, row_scale = bb.emit(relax.TupleGetItem(res, 0)), bb.emit(relax.TupleGetItem(res, 1))
        else:
            a = bb.emit(relax.call_tir(gv, [x2, *mv], packed_si))
            al = relax.const(alpha.reshape(1).numpy().astype(np.float32))
            row_scale = bb.emit(relax.op.broadcast_to(al, [M]))
        mode, planes = ("xnor_ternary" if ternary else "xnor"), 1
    else:
        f = compute.absmax_planes(K=K, bits=act_bits)
        gv = _add_prim(bb, f, f"bitfx_absmax_{tag}")
        res = bb.emit(relax.call_tir(gv, [x2], [relax.TensorType([M, act_bits, KW], "uint64"),
                                                relax.TensorType([M], "float32")]))
        a, row_scale = bb.emit(relax.TupleGetItem(res, 0)), bb.emit(relax.TupleGetItem(res, 1))
        mode, planes = ("and_ternary" if ternary else "and"), act_bits

    extra = []
    if mode == "xnor_ternary":
        extra = [relax.const((codes != 0).sum(1).astype(np.int32))]
    args = [a, relax.const(w_packed), *extra, row_scale, relax.const(cs)]
    if bias is not None:
        args.append(relax.const(bias.reshape(-1).numpy().astype(np.float32)))
    g = compute.gemm(mode=mode, K=K, N=N, planes=planes, epilogue="float", bias=bias is not None)
    ggv = _add_prim(bb, g, f"bitfx_gemm_{mode}_{tag}{'_bias' if bias is not None else ''}")
    y = bb.emit(relax.call_tir(ggv, args, relax.TensorType([M, N], "float32")))
    if len(shape) != 2:
        y = bb.emit(relax.op.reshape(y, [*lead, N]))
    if x.ty.dtype != "float32":
        y = bb.emit(relax.op.astype(y, x.ty.dtype))
    return y


# ------------------------------------------------------------------------------------ attention pieces
def _batched(bb, x, rows_last: int):
    """x [..., L, C] -> ([G*L, C] var, G, L, lead dims)."""
    from tvm import relax

    shape = list(x.ty.shape)
    lead, L, C = shape[:-2], shape[-2], shape[-1]
    G = math.prod(lead[1:], start=lead[0]) if lead else 1
    x2 = bb.emit(relax.op.reshape(x, [G * L, C])) if len(shape) != 2 else x
    if x.ty.dtype != "float32":
        x2 = bb.emit(relax.op.astype(x2, "float32"))
    return x2, G, L, lead


def _convert_sign_scores(node: fx.Node, importer):
    """sign_scores(q, k) -> call_tir: pack_rows(sign) of q and k, batched xnor gemm, int32 -> float32."""
    from tvm import relax

    from bitfx.codegen import compute

    bb = importer.block_builder
    q, k = (_with_shape(bb, importer.env[a], a) for a in node.args[:2])
    D = int(q.ty.shape[-1])
    DW = (D + WORD - 1) // WORD
    q2, G, Lq, lead = _batched(bb, q, D)
    k2, _, Lk, _ = _batched(bb, k, D)
    pack = _add_prim(bb, compute.pack_rows(mode="sign", K=D), f"bitfx_pack_sign_k{D}")
    qp = bb.emit(relax.call_tir(pack, [q2], relax.TensorType([G * Lq, DW], "uint64")))
    kp = bb.emit(relax.call_tir(pack, [k2], relax.TensorType([G * Lk, DW], "uint64")))
    qp = bb.emit(relax.op.reshape(qp, [G, Lq, DW]))
    kp = bb.emit(relax.op.permute_dims(bb.emit(relax.op.reshape(kp, [G, Lk, DW])), [0, 2, 1]))
    gemm = _add_prim(bb, compute.gemm(mode="xnor", K=D, N=None, batched=True), f"bitfx_sign_scores_k{D}")
    s = bb.emit(relax.call_tir(gemm, [qp, kp], relax.TensorType([G, Lq, Lk], "int32")))
    s = bb.emit(relax.op.astype(s, "float32"))
    return bb.emit(relax.op.reshape(s, [*lead, Lq, Lk]))


def _convert_binary_pv(node: fx.Node, importer):
    """binary_pv(p, v) -> call_tir: pack_rows(nonzero) of p, pack_cols(sign) of v, batched and-gemm."""
    from tvm import relax

    from bitfx.codegen import compute

    bb = importer.block_builder
    p, v = (_with_shape(bb, importer.env[a], a) for a in node.args[:2])
    Dv = int(v.ty.shape[-1])
    p2, G, Lq, lead = _batched(bb, p, 0)
    Lk = p.ty.shape[-1]
    v2, _, _, _ = _batched(bb, v, Dv)
    KW = (Lk + WORD - 1) // WORD
    pack_p = _add_prim(bb, compute.pack_rows(mode="nonzero", K=None), "bitfx_pack_nonzero")
    pp = bb.emit(relax.call_tir(pack_p, [p2], relax.TensorType([G * Lq, KW], "uint64")))
    pp = bb.emit(relax.op.reshape(pp, [G, Lq, KW]))
    v3 = bb.emit(relax.op.reshape(v2, [G, Lk, Dv]))
    pack_v = _add_prim(bb, compute.pack_cols(K=None, N=Dv), f"bitfx_pack_cols_n{Dv}")
    vp = bb.emit(relax.call_tir(pack_v, [v3], relax.TensorType([G, KW, Dv], "uint64")))
    gemm = _add_prim(bb, compute.gemm(mode="and", K=None, N=Dv, signed=False, batched=True),
                     f"bitfx_binary_pv_n{Dv}")
    o = bb.emit(relax.call_tir(gemm, [pp, vp], relax.TensorType([G, Lq, Dv], "int32")))
    o = bb.emit(relax.op.astype(o, "float32"))
    return bb.emit(relax.op.reshape(o, [*lead, Lq, Dv]))


# ------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitfx export", description="Binarize a model and export it as one shared "
                                "library for a device (TVM Relax, cross compiled).")
    p.add_argument("factory", metavar="MODULE:FACTORY",
                   help="module (dotted name or .py path) and a function in it returning (model, example_inputs)")
    p.add_argument("--target", default="linux-arm64", help="device target (default linux-arm64)")
    p.add_argument("-o", "--output", default="model.so", help="the library to write (default model.so)")
    p.add_argument("--config", metavar="PRESET", help="preset name or a JSON object of BinarizeConfig fields")
    p.add_argument("--verify", action="store_true", help="run the library under qemu and compare with the host")
    p.add_argument("--no-bundle", action="store_true", help="write only the library, no deploy bundle")
    return p


def cli_main(argv: Sequence[str] | None = None) -> int:
    from bitfx.cli import FactoryError, _config, load_model

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        config = _config(args.config)
        model, inputs = load_model(args.factory)
    except (FactoryError, ValueError, TypeError) as e:
        print(f"bitfx export: {e}", file=sys.stderr)
        return 2
    try:
        path = export(model, inputs, args.target, args.output, config, verify=args.verify,
                      bundle=not args.no_bundle)
    except (ValueError, ExportError, AssertionError) as e:
        print(f"bitfx export: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}" + (" (verified under qemu)" if args.verify else ""))
    return 0
