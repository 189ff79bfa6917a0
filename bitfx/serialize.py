"""``bitfx.save`` / ``bitfx.load``: a binarized (trained) model as one file, loaded without running its code.

The file is a zip archive (stored, not compressed) of three members::

    bitfx.json      {"format": "bitfx-model", "format_version": 1, "bitfx_version", "torch_version",
                     "config": {BinarizeConfig fields}, "report": {rewrites, skips, added},
                     "sha256": {"program.json": ..., "tensors.pt": ...}}
    program.json    the graph: torch.export's JSON serialization of the ExportedProgram
                    (ops by name — aten, bitfx, operator — symbolic shapes as sympy expressions)
    tensors.pt      every parameter and buffer (weights, scales, ``move``, α, β, estimators),
                    a dict of plain tensors read with ``torch.load(weights_only=True)``

Loading never executes code from the file: no pickle beyond ``weights_only`` tensors (no fallback),
the graph is JSON whose every op name must resolve to a registered ``torch.ops`` operator of the
``aten`` / ``prims`` / ``bitfx`` namespaces, an ``operator``/``math``/``torch.sym_*`` function, and
whose shape expressions use only sympy constructors, numbers and symbol names (checked before the
deserializer — which calls ``sympy.sympify`` — sees them). A file of another format version, or
whose members do not match their SHA-256, is refused with :class:`LoadError`.

Example: ``examples/digits.py``::

    bitfx.save(student, "digits.bitfx")
    student = bitfx.load("digits.bitfx")                  # a trainable GraphModule, called like before
    fast = torch.compile(student, backend="bitfx")
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import json
import logging
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

log = logging.getLogger(__name__)

FORMAT = "bitfx-model"
#: bump when a file written by this version cannot be read by an older one (or the reverse)
FORMAT_VERSION = 1
MEMBERS = ("program.json", "tensors.pt")

#: node targets a loaded graph may call (anything else, e.g. ``torch.load``, is refused)
_TARGET = re.compile(r"^(torch\.ops\.(aten|prims|bitfx|bitfx_export)\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+"
                     r"|_operator\.[a-z_]+|math\.[a-z_]+|torch\.sym_[a-z_]+|torch\._sym_[a-z_]+)$")
#: words a shape expression may contain (sympy constructors and symbol names)
_SYMPY_WORDS = {"Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs",
                "floor", "ceiling", "FloorDiv", "CeilDiv", "ModularIndexing", "CleanDiv", "PythonMod",
                "IntTrueDiv", "FloatTrueDiv", "ToFloat", "TruncToInt", "CeilToInt", "FloorToInt",
                "RoundToInt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "integer",
                "positive", "nonnegative", "negative", "real", "finite", "True", "False", "oo", "zoo",
                "nan", "Identity", "Piecewise", "OpaqueUnaryFn_sqrt", "BooleanTrue", "BooleanFalse"}
_SYMBOL = re.compile(r"^[a-z]{1,2}\d+$")            # s0, u3, ps12, zuf0 ...
_EXPR_TOKENS = re.compile(r"'[A-Za-z0-9_]*'|[A-Za-z_][A-Za-z0-9_]*|\d+(\.\d+)?(e[-+]?\d+)?|[()=,+\-*/ ]")


class LoadError(ValueError):
    """A file that ``bitfx.load`` refuses: another format version, a damaged or tampered member."""


def save(model: fx.GraphModule, path: str | Path, example_inputs: Any = None, *,
         example_kwargs: dict | None = None) -> Path:
    """Write a binarized model (graph, parameters, config, report) to ``path``.

    Args:
        model: a GraphModule from :func:`bitfx.binarize` (trained or not) or :func:`bitfx.load`.
        path: the file to write (conventionally ``*.bitfx``).
        example_inputs / example_kwargs: one batch to re-capture the graph with; by default one is
            made from the shapes the graph recorded. Batch and sequence dims stay symbolic where
            the model allows (``torch.export.Dim.AUTO``).

    Returns:
        ``path``.

    Raises:
        TypeError: ``model`` is not a GraphModule.
    """
    if not isinstance(model, fx.GraphModule):
        raise TypeError(f"bitfx.save: model must be a torch.fx.GraphModule from bitfx.binarize, "
                        f"got {type(model).__name__}")
    from torch._export.serde.serialize import serialize

    args, kwargs = _example(model, example_inputs, example_kwargs)
    ep = _export(model, args, kwargs)
    program = serialize(ep).exported_program
    tensors = io.BytesIO()
    torch.save({"state_dict": {k: v.detach().cpu().clone() for k, v in ep.state_dict.items()},
                "constants": {k: v.detach().cpu().clone() for k, v in ep.constants.items()
                              if isinstance(v, torch.Tensor)}}, tensors)
    payload = {"program.json": program, "tensors.pt": tensors.getvalue()}
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "bitfx_version": _version(),
              "torch_version": torch.__version__,
              "parameters": {n: bool(ep.state_dict[n].requires_grad) for n in ep.graph_signature.parameters},
              "config": _config_dict(getattr(model, "bitfx_config", None)),
              "report": _report_dict(getattr(model, "bitfx_report", None)),
              "sha256": {k: hashlib.sha256(v).hexdigest() for k, v in payload.items()}}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
        z.writestr("bitfx.json", json.dumps(header, indent=1))
        for name, data in payload.items():
            z.writestr(name, data)
    tmp.replace(path)
    return path


def load(path: str | Path, device: str | torch.device | None = None) -> fx.GraphModule:
    """Read a model written by :func:`save`: a trainable GraphModule with ``bitfx_config``/``bitfx_report``.

    Args:
        path: a ``bitfx.save`` file.
        device: where to place the parameters (default: CPU).

    Raises:
        LoadError: not a bitfx file, a format version this bitfx does not read (both versions are
            named), a member whose SHA-256 differs from the header (damaged or tampered), or a graph
            that calls something other than a registered operator.
    """
    from torch._export.serde.serialize import SerializedArtifact, deserialize

    header, payload = _read(Path(path))
    _check_program(payload["program.json"], path)
    try:
        tensors = torch.load(io.BytesIO(payload["tensors.pt"]), weights_only=True, map_location=device or "cpu")
    except Exception as e:  # noqa: BLE001 — anything but plain tensors is refused
        raise LoadError(f"{path}: tensors.pt holds something other than plain tensors ({e})") from e
    if not isinstance(tensors, dict) or set(tensors) != {"state_dict", "constants"}:
        raise LoadError(f"{path}: tensors.pt is not a bitfx tensor table")
    state = {k: torch.nn.Parameter(v, requires_grad=header["parameters"][k]) if k in header.get("parameters", {})
             else v for k, v in tensors["state_dict"].items()}
    artifact = SerializedArtifact(payload["program.json"], state, tensors["constants"], b"")
    try:
        ep = deserialize(artifact)
    except Exception as e:  # noqa: BLE001
        raise LoadError(f"{path}: the graph does not deserialize with torch {torch.__version__} "
                        f"(written with torch {header.get('torch_version')}): {type(e).__name__}: {e}") from e
    gm = ep.module()
    gm.bitfx_config = _config_from(header.get("config"))
    gm.bitfx_report = _report_from(header.get("report"))
    gm.bitfx_file = {k: header[k] for k in ("bitfx_version", "torch_version", "format_version")}
    return gm


# ------------------------------------------------------------------------------------ save helpers
def _version() -> str:
    import bitfx

    return bitfx.__version__


def _example(model: fx.GraphModule, example_inputs, example_kwargs) -> tuple[tuple, dict]:
    call = getattr(model, "bitfx_call", None)
    if example_inputs is None and not example_kwargs:
        leaves = [_from_meta(n) for n in model.graph.nodes if n.op == "placeholder"]
        if call is not None and hasattr(call, "unflatten"):
            args, kwargs = call.unflatten(leaves)
            return tuple(args), {k: v for k, v in kwargs.items() if k not in getattr(call, "constants", {})}
        return tuple(leaves), {}
    if isinstance(example_inputs, dict):
        return (), {**example_inputs, **(example_kwargs or {})}
    args = example_inputs if isinstance(example_inputs, (tuple, list)) else (
        () if example_inputs is None else (example_inputs,))
    return tuple(args), dict(example_kwargs or {})


def _from_meta(node: fx.Node):
    """A tensor of the node's recorded dtype and (hinted) shape: ones for integers, normal otherwise."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise ValueError(f"bitfx.save: input {node.name!r} has no recorded tensor shape; "
                         f"pass example_inputs= (one batch)")
    from torch.fx.experimental.symbolic_shapes import optimization_hint

    shape = [optimization_hint(s, fallback=2) for s in val.shape]
    if val.dtype.is_floating_point:
        return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(val.dtype)
    return torch.ones(shape, dtype=val.dtype)


def _export(model, args: tuple, kwargs: dict):
    def spec(x):
        return {i: torch.export.Dim.AUTO for i in range(x.dim())} if isinstance(x, torch.Tensor) else None

    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
        dyn = {k: pytree.tree_map(spec, v) for k, v in bound.arguments.items()}
        return torch.export.export(model, args, kwargs or None, dynamic_shapes=dyn, strict=False)
    except Exception as e:  # noqa: BLE001 — retried at the example shapes
        log.warning("bitfx.save: capture with symbolic shapes failed (%s: %s); saving at the example shapes",
                    type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return torch.export.export(model, args, kwargs or None, strict=False)


def _config_dict(cfg) -> dict | None:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None


def _report_dict(report) -> dict | None:
    return dataclasses.asdict(report) if dataclasses.is_dataclass(report) else None


# ------------------------------------------------------------------------------------ load helpers
def _read(path: Path) -> tuple[dict, dict[str, bytes]]:
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            if "bitfx.json" not in names:
                raise LoadError(f"{path}: not a bitfx model file (no bitfx.json member)")
            header = json.loads(z.read("bitfx.json"))
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise LoadError(f"{path}: not a bitfx model file (format {header.get('format')!r}, "
                                f"expected {FORMAT!r})")
            version = header.get("format_version")
            if version != FORMAT_VERSION:
                raise LoadError(f"{path}: written by bitfx {header.get('bitfx_version')} in file format "
                                f"version {version!r}; this bitfx {_version()} reads format version "
                                f"{FORMAT_VERSION} only (re-save the model with a matching bitfx)")
            missing = [m for m in MEMBERS if m not in names]
            if missing:
                raise LoadError(f"{path}: members {missing} are missing")
            payload = {m: z.read(m) for m in MEMBERS}
    except (zipfile.BadZipFile, json.JSONDecodeError, OSError, zipfile.LargeZipFile) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise LoadError(f"{path}: not a readable bitfx model file ({type(e).__name__}: {e})") from e
    expected = header.get("sha256") or {}
    for name, data in payload.items():
        got = hashlib.sha256(data).hexdigest()
        if expected.get(name) != got:
            raise LoadError(f"{path}: {name} does not match its SHA-256 in bitfx.json "
                            f"(file damaged or modified after saving; expected {expected.get(name)}, got {got})")
    return header, payload


def _check_program(program: bytes, path) -> None:
    """Refuse any op name that is not a registered operator and any shape expression outside sympy."""
    try:
        tree = json.loads(program)
    except json.JSONDecodeError as e:
        raise LoadError(f"{path}: program.json is not JSON ({e})") from e
    bad: list[str] = []

    def walk(x, key=None):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, k)
        elif isinstance(x, list):
            for v in x:
                walk(v, key)
        elif isinstance(x, str):
            if key == "target" and not _TARGET.match(x):
                bad.append(f"op {x!r}")
            elif key == "expr_str" and not _is_sympy(x):
                bad.append(f"shape expression {x!r}")

    walk(tree)
    if bad:
        raise LoadError(f"{path}: the graph refers to things a bitfx model may not call: {', '.join(bad[:5])}")


def _is_sympy(expr: str) -> bool:
    pos = 0
    for m in _EXPR_TOKENS.finditer(expr):
        if m.start() != pos:
            return False
        pos = m.end()
        tok = m.group(0)
        if tok[0].isalpha() or tok[0] == "_":
            if tok not in _SYMPY_WORDS and not _SYMBOL.match(tok):
                return False
    return pos == len(expr)


def _config_from(fields: dict | None):
    from bitfx.config import BinarizeConfig

    return None if fields is None else BinarizeConfig(**fields)


def _report_from(fields: dict | None):
    from bitfx.passes.context import Added, Report, Rewrite, Skip

    if fields is None:
        return None
    return Report([Rewrite(**r) for r in fields.get("rewrites", [])], [Skip(**s) for s in fields.get("skips", [])],
                  [Added(**a) for a in fields.get("added", [])])
