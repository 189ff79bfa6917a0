"""``bitfx.export``: a binarized model as one shared library for a device (DESIGN §1, stage 4).

    path = bitfx.export(model, (x,), target="linux-arm64", path="model.so", verify=True)

The pipeline: ``bitfx.binarize`` (unless given an already binarized GraphModule) → ``to_relax``
(``torch.export`` → ``tvm.relax.frontend.torch.from_exported_program`` with the converters of
``bitfx/relax/converters.py``, which lower the bitfx ops to ``call_tir`` of the kernels the target's
kernel set implements: ``bitfx.targets.registry``) → ``relax.build`` for the target →
``export_library`` with the target's cross linker (→ a deploy bundle). The float parts of
``bit_attention`` (α scales, estimators, masks, softmax, the probability binarizer) run as float
Relax ops on the device; its two integer products and every ``bit_linear`` run the popcount kernels.

Shapes: batch and sequence dims stay symbolic where the importer keeps them (``to_relax(dynamic=True)``);
if the symbolic import or build fails it is retried with only the batch symbolic (a model whose token grid is
fixed: its image size is), then at the example shapes (a warning says each step).
The bit_linear kernels themselves take any M. The command line is ``bitfx export`` (``bitfx/cli.py``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from bitfx.deploy.verify import VerifyError
from bitfx.relax.importer import SHAPE_MODES, ExportError, fused, next_shape_mode, to_relax

log = logging.getLogger(__name__)

__all__ = ["export", "verify", "to_relax", "ExportError", "VerifyError"]


# ------------------------------------------------------------------------------------ public API
def export(model_or_binarized_gm: torch.nn.Module, example_inputs: Sequence[Any],
           target: str = "linux-arm64", path: str | Path = "model.so", config=None, *,
           verify: bool = False, bundle: bool = True, example_kwargs: Mapping[str, Any] | None = None) -> Path:
    """Binarize ``model`` (unless it already is), compile it for ``target`` and write ``path``.

    Args:
        model_or_binarized_gm: a float ``nn.Module`` (binarized here with ``config``) or the output
            of ``bitfx.binarize``.
        example_inputs: one batch as the model takes it (a tuple of positional inputs, one tensor, or
            a mapping of keyword inputs); the library is built for their shapes and takes their flat
            leaves (``torch.utils._pytree`` order: positional inputs, then keywords) as its inputs.
        target: a device target of ``bitfx.targets.cross`` (``linux-arm64``, ``android-arm64``, ...).
        path: the shared library to write.
        verify: run the library under qemu (aarch64 targets) on ARMv8.0 and v8.2 CPU models, on
            the example and two random inputs, and compare every output with the host model.
        bundle: also write the deploy bundle (loader, README, manifest) next to ``path``.
        example_kwargs: keyword inputs, alone or with positional ``example_inputs``.

    Returns:
        The library path.

    Raises:
        ValueError: unknown target (listing the known ones).
        ExportError: an op the Relax importer cannot take, naming the op and its layer.
        VerifyError: with ``verify`` (an AssertionError), when an output differs on an emulated CPU
            or the library dies there (``verify``).
    """
    from bitfx.targets import cross

    dt = cross.get_target(target)  # raises on an unknown target, before any work
    from bitfx.inputs import example_call, flat_module

    gm = _binarized(model_or_binarized_gm, example_inputs, config, example_kwargs)
    call = example_call(gm, example_inputs, example_kwargs)  # the graph's inputs, as flat leaves
    flat = _unsigned_as_sign(_fold_parameter_expressions(flat_module(gm)))
    structured, (inputs, gm) = gm, (call.flat, flat)  # structured: output names for verify
    mod = to_relax(gm, inputs, target=dt)
    while True:
        try:
            exe = _build(mod, dt)
            break
        except Exception as e:  # noqa: BLE001 — a symbolic-shape build failure is retried with fewer symbols
            mode = to_relax.last_dynamic
            if mode is False:
                raise
            log.warning("bitfx.export: building with %s failed (%s: %s); building with %s", SHAPE_MODES[mode],
                        type(e).__name__, (str(e).strip().splitlines() or [""])[-1][:200],
                        SHAPE_MODES[next_shape_mode(mode)])
            mod = to_relax(gm, inputs, dynamic=next_shape_mode(mode), target=dt)
    path = cross.export_library(exe, path, dt)
    if bundle:
        from bitfx.deploy import write_bundle

        write_bundle(path, dt.name if hasattr(dt, "name") else target, inputs=inputs)
    if verify:
        from bitfx.deploy.verify import output_names

        globals()["verify"](path, inputs, target=dt, model=gm, output_names=output_names(structured))
    return path


def _build(mod, dt):
    """Build with the float ops fused; if TVM cannot lower the fused form for this target (seen on
    32-bit android-armv7: an IntImm of float32 in the fused loops), build the unfused module."""
    from bitfx.targets import cross

    try:
        return cross.build_relax(fused(mod), dt)
    except Exception as e:  # noqa: BLE001 — the unfused module is the same computation
        log.warning("bitfx.export: the fused float ops do not build for %s (%s: %s); building them unfused",
                    dt.name, type(e).__name__, (str(e).strip().splitlines() or [""])[-1][:200])
        return cross.build_relax(mod, dt)


def verify(path: str | Path, example_inputs: Sequence[Any], expected=None, target: str = "linux-arm64",
           *, model=None, variants: int = 2, cpus: Sequence[str] | None = None, rtol: float = 1e-4,
           atol: float = 1e-4, output_names: Sequence[str] | None = None, ties: bool = True) -> float:
    """Run ``path`` under qemu and compare every output with the host (``bitfx/deploy/verify.py``).

    With ``model`` (the host model, called on the library's flat inputs): on ``example_inputs`` and
    ``variants`` seeded random inputs of the same shapes and dtypes; with only ``expected`` (the
    host outputs on ``example_inputs``): on those inputs. Each set runs on qemu's ``cortex-a53``
    (ARMv8.0-A) and ``cortex-a76`` (ARMv8.2-A), or on the core a target that asks for extensions
    needs (``bitfx.deploy.verify.cpus_for``). Tolerance: ``(atol + rtol) * max(1, max |host|)``.

    With ``model`` and ``ties``, a mismatch that a few near-tie decisions explain passes with a warning
    naming them: an activation within float rounding of its binarizer's threshold that the device took the
    other way (``bitfx.deploy.verify.explain_ties``). ``bitfx.export(..., verify=True)`` passes its model.

    Returns:
        The largest absolute difference (from the host with the near-ties flipped, where they explained one).

    Raises:
        VerifyError: an ``AssertionError`` naming the output, the input set, the CPU and the
            difference; or saying that the library died with SIGILL and which instructions
            (``udot``...) the CPU lacks.
    """
    from bitfx.deploy.verify import verify_library

    return verify_library(path, model, _as_tuple(example_inputs), target, expected=expected,
                          variants=variants if model is not None else 0, cpus=cpus, rtol=rtol,
                          atol=atol, output_names=output_names, ties=ties)


# ------------------------------------------------------------------------------------ the pipeline
def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _has_bitfx(gm) -> bool:
    return isinstance(gm, fx.GraphModule) and any(
        n.op == "call_function" and str(n.target).startswith("bitfx.") for n in gm.graph.nodes)


def _fold_parameter_expressions(gm: fx.GraphModule) -> fx.GraphModule:
    """Arguments of ``bit_linear`` computed from parameters alone (GPT-2's ``Conv1D`` weight ``t(P)``,
    the ``w_q`` / ``w_kv`` slices of ``nn.MultiheadAttention``'s packed ``in_proj_weight`` in cross
    attention) evaluated once into constants of ``gm``: the export freezes weights."""
    from bitfx.ops import BIT_LINEAR
    from bitfx.passes.graph import getattr_path

    memo: dict[fx.Node, Any] = {}

    def value(n):
        if not isinstance(n, fx.Node):
            return n
        if n not in memo:
            memo[n] = _NOT_CONSTANT
            if n.op == "get_attr":
                memo[n] = getattr_path(gm, n.target)
            elif n.op == "call_function" and n.target is not BIT_LINEAR:
                args, kwargs = fx.node.map_arg((n.args, n.kwargs), value)
                if not any(a is _NOT_CONSTANT for a in pytree.tree_leaves((args, kwargs))):
                    memo[n] = n.target(*args, **kwargs)
        return memo[n]

    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is BIT_LINEAR]:
        for arg in [a for a in node.args[1:6] if isinstance(a, fx.Node) and a.op != "get_attr"]:
            with torch.no_grad():
                v = value(arg)
            if isinstance(v, torch.Tensor):
                name = f"bitfx_folded_{arg.name}"
                gm.register_buffer(name, v.detach().clone())
                with gm.graph.inserting_before(node):
                    node.replace_input_with(arg, gm.graph.get_attr(name))
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


_NOT_CONSTANT = object()  # a value that depends on the graph's inputs


def _unsigned_as_sign(gm: fx.GraphModule) -> fx.GraphModule:
    """``bit_linear`` with BiT's unsigned {0, α} activations, rewritten for the device kernels as a sign
    ``bit_linear`` (the converters lower sign and absmax activations) with the same integer sums.

    With ``u = x + move``, ``h = α/2``, the code ``a = 1[u > h]`` and ``s = 2a - 1 = -sign(h - u)``
    (sign(0) = +1: u = h gives a = 0)::

        α·Σ_k a_k·w_k = h·Σ_k s_k·w_k + h·Σ_k w_k = (-h)·Σ_k sign(-u_k + h)·w_k + h·rowsum(w)

    so ``y = bit_linear(-u, W, b + h·col·rowsum(w_codes), ws, move=[h]*K, alpha=-h, ..., "sign", 1)``:
    the same codes exactly (``-u + h >= 0`` iff ``u <= h`` for floats), the epilogue within float rounding.
    """
    from bitfx.ops import BIT_LINEAR
    from bitfx.ops.linear import quantize_weight
    from bitfx.ops.quantizers import EPS
    from bitfx.passes.graph import getattr_path

    aten = torch.ops.aten
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is BIT_LINEAR]:
        x, w, b, ws, move, alpha, weight_mode, act_mode, _ = node.args
        if act_mode != "unsigned":
            continue
        value = {a: getattr_path(gm, a.target).detach().float() for a in (w, b, ws, move, alpha)
                 if isinstance(a, fx.Node) and a.op == "get_attr"}
        if any(isinstance(a, fx.Node) and a not in value for a in (w, b, ws, move, alpha)) or alpha is None:
            raise ExportError(f"bit_linear {node.name} (unsigned activations): its weight, bias, scales, "
                              "move and alpha must be parameters for the device export")
        with torch.no_grad():
            codes, col, _ = quantize_weight(value[w], value.get(ws), weight_mode)
            h = value[alpha].reshape(()).clamp(min=EPS) * 0.5
            bias = h * col.reshape(-1) * codes.sum(1)
            bias = bias + value[b] if b is not None else bias
        k = codes.shape[1]
        names = []
        for what, t in (("bias", bias), ("move", h.expand(k)), ("alpha", -h.reshape(1))):
            names.append(f"bitfx_unsigned_{what}_{node.name}")
            gm.register_buffer(names[-1], t.contiguous().clone())
        with gm.graph.inserting_before(node):
            u = gm.graph.call_function(aten.add.Tensor, (x, move)) if move is not None else x
            neg = gm.graph.call_function(aten.neg.default, (u,))
            b2, mv2, al2 = (gm.graph.get_attr(n) for n in names)
            new = gm.graph.call_function(BIT_LINEAR, (neg, w, b2, ws, mv2, al2, weight_mode, "sign", 1))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _binarized(model, inputs, config, example_kwargs=None):
    if _has_bitfx(model):
        return model
    import bitfx

    return bitfx.binarize(model.eval() if hasattr(model, "eval") else model, inputs, config,
                          example_kwargs=example_kwargs)
