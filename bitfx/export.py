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
if the symbolic import fails the library is built for the example shapes (a warning says so).
The bit_linear kernels themselves take any M. The command line is ``bitfx export`` (``bitfx/cli.py``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx

from bitfx.relax.importer import ExportError, fused, to_relax

log = logging.getLogger(__name__)

__all__ = ["export", "verify", "to_relax", "ExportError"]


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
        verify: run the library under qemu (aarch64 targets) and compare with the host model.
        bundle: also write the deploy bundle (loader, README, manifest) next to ``path``.
        example_kwargs: keyword inputs, alone or with positional ``example_inputs``.

    Returns:
        The library path.

    Raises:
        ValueError: unknown target (listing the known ones).
        ExportError: an op the Relax importer cannot take, naming the op and its layer.
        AssertionError: with ``verify``, when the device output differs (max difference given).
    """
    from bitfx.targets import cross

    dt = cross.get_target(target)  # raises on an unknown target, before any work
    from bitfx.inputs import example_call, flat_module

    gm = _binarized(model_or_binarized_gm, example_inputs, config, example_kwargs)
    call = example_call(gm, example_inputs, example_kwargs)  # the graph's inputs, as flat leaves
    inputs, gm = call.flat, flat_module(gm)
    mod = to_relax(gm, inputs, target=dt)
    try:
        exe = cross.build_relax(fused(mod), dt)
    except Exception as e:  # noqa: BLE001 — a symbolic-shape build failure is retried static
        if not to_relax.last_dynamic:
            raise
        log.warning("bitfx.export: building with symbolic shapes failed (%s: %s); building at the example shapes",
                    type(e).__name__, (str(e).strip().splitlines() or [""])[-1][:200])
        exe = cross.build_relax(fused(to_relax(gm, inputs, dynamic=False, target=dt)), dt)
    path = cross.export_library(exe, path, dt)
    if bundle:
        from bitfx.deploy import write_bundle

        write_bundle(path, dt.name if hasattr(dt, "name") else target)
    if verify:
        with torch.no_grad():
            expected = gm(*inputs)  # the flat leaves of the model's output
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


def _binarized(model, inputs, config, example_kwargs=None):
    if _has_bitfx(model):
        return model
    import bitfx

    return bitfx.binarize(model.eval() if hasattr(model, "eval") else model, inputs, config,
                          example_kwargs=example_kwargs)
