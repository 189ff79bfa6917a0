"""The ``bitfx`` command: ``bitfx demo | diff | export | bench``.

    bitfx diff examples/diff_bert.py:make --html diff.html --json diff.json
    bitfx diff mypkg.models:tiny_vit --config bivit

A model is named ``MODULE:FACTORY``: a dotted module name or a ``.py`` file path, and a function in
it that takes no arguments and returns ``(model, args)``, ``(model, kwargs)`` or
``(model, args, kwargs)`` (see :func:`load_example`).
``demo``, ``export`` and ``bench`` hand their arguments to ``bitfx.demo.main``,
``export_main`` (here; ``bitfx.export`` is imported when it runs) and ``bitfx.bench.main``.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

#: subcommand -> (module, function) that parses and runs it; imported on use.
DELEGATED = {
    "demo": ("bitfx.demo", "main", "compile a built-in BERT-shaped encoder and show what bitfx did"),
    "export": ("bitfx.cli", "export_main", "export a model to a shared library for a device"),
    "bench": ("bitfx.bench", "main", "benchmark bitfx kernels and models against their baselines"),
    "kernels": ("bitfx.targets.show", "main", "write the kernels bitfx generates for an op and shape on a target "
                "(CUDA source + PTX, or assembly)"),
}


class FactoryError(Exception):
    """A ``MODULE:FACTORY`` that cannot be imported, found, or called; the message says which and why."""


def _import_module(module: str):
    if module.endswith(".py") or os.sep in module or "/" in module:
        path = Path(module)
        if not path.is_file():
            raise FactoryError(f"cannot import {module}: no such file")
        name = f"_bitfx_factory_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise FactoryError(f"cannot import {module}: not a Python file")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses and pickling look their module up here
        sys.path.insert(0, str(path.resolve().parent))  # so the file can import its neighbours
        try:
            spec.loader.exec_module(mod)
        except Exception as e:
            sys.modules.pop(name, None)
            raise FactoryError(f"cannot import {module}: {type(e).__name__}: {e}") from e
        finally:
            sys.path.remove(str(path.resolve().parent))
        return mod
    try:
        return importlib.import_module(module)
    except Exception as e:
        raise FactoryError(f"cannot import module {module!r}: {type(e).__name__}: {e}") from e


def load_factory(spec: str) -> Callable[[], Any]:
    """The function named by ``MODULE:FACTORY`` (``pkg.models:make`` or ``path/to/file.py:make``).

    Raises:
        FactoryError: naming the module or function and the error, when the module cannot be
            imported or has no such callable.
    """
    module, sep, name = spec.rpartition(":")
    if not sep or not module or not name:
        raise FactoryError(f"{spec!r} is not MODULE:FACTORY (e.g. examples/diff_bert.py:make or mypkg.models:make)")
    mod = _import_module(module)
    fn = getattr(mod, name, None)
    if fn is None:
        found = sorted(k for k, v in vars(mod).items()
                       if callable(v) and not k.startswith("_") and getattr(v, "__module__", None) == mod.__name__)
        defined = ", ".join(found) or "nothing callable"
        raise FactoryError(f"module {module!r} has no factory {name!r} (defined in it: {defined})")
    if not callable(fn):
        raise FactoryError(f"{spec}: {name!r} is not callable (it is {type(fn).__name__} {fn!r})")
    return fn


def load_example(spec: str) -> tuple[Any, tuple, dict]:
    """Call the factory named by ``spec``; returns ``(model, args, kwargs)``.

    A factory returns ``(model, args)`` (a tuple of positional inputs, or one tensor),
    ``(model, kwargs)`` (a mapping of keyword inputs, e.g. a tokenizer's output) or
    ``(model, args, kwargs)``.

    Raises:
        FactoryError: the factory fails or returns something else (naming what it returned).
    """
    import torch

    from bitfx.inputs import split_inputs

    fn = load_factory(spec)
    try:
        result = fn()
    except Exception as e:
        raise FactoryError(f"factory {spec} failed: {type(e).__name__}: {e}") from e
    forms = "(model, args), (model, kwargs_dict) or (model, args, kwargs)"
    if not (isinstance(result, (tuple, list)) and len(result) in (2, 3) and isinstance(result[0], torch.nn.Module)):
        got = f"a {len(result)}-tuple" if isinstance(result, (tuple, list)) else type(result).__name__
        raise FactoryError(f"factory {spec} must return (model, example_inputs), got {got} (accepted: {forms})")
    if len(result) == 3 and not isinstance(result[2], Mapping):
        raise FactoryError(f"factory {spec} must return {forms}; its third item is a "
                           f"{type(result[2]).__name__}, not a mapping of keyword inputs")
    model = result[0]
    args, kwargs = split_inputs(result[1], result[2] if len(result) == 3 else None, model.forward)
    return model, args, kwargs


def load_model(spec: str) -> tuple[Any, Any]:
    """``(model, example_inputs)`` of the factory named by ``spec``: the positional inputs as a
    tuple, or the mapping of keyword inputs (:func:`load_example` gives both)."""
    model, args, kwargs = load_example(spec)
    if args and kwargs:
        raise FactoryError(f"factory {spec} returns positional and keyword inputs: use load_example")
    return model, (kwargs if kwargs else args)


def _config(text: str | None):
    from bitfx.config import BinarizeConfig

    if text is None:
        return None
    if text.lstrip().startswith("{"):
        return BinarizeConfig.coerce(json.loads(text))
    return BinarizeConfig.coerce(text)


def _first_lines(text: str, n: int = 12) -> str:
    lines = text.strip().splitlines()
    more = [f"... ({len(lines) - n} more lines; rerun with --traceback)"] if len(lines) > n else []
    return "\n".join(lines[:n] + more)


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    if args.traceback:
        traceback.print_exc()
    print(f"bitfx diff: {message}", file=sys.stderr)
    return code


def cmd_diff(args: argparse.Namespace) -> int:
    try:
        config = _config(args.config)
    except (ValueError, TypeError) as e:
        return _fail(args, f"invalid --config {args.config!r}: {e}", 2)
    try:
        model, inputs, kwargs = load_example(args.factory)
    except (FactoryError, ValueError, TypeError) as e:
        return _fail(args, str(e), 2)
    from rich.console import Console

    from bitfx.inspect import diff

    try:
        result = diff(model, inputs, config, example_kwargs=kwargs)
    except Exception as e:
        return _fail(args, f"could not trace {args.factory}: {type(e).__name__}: {_first_lines(str(e))}", 1)
    console = Console()
    result.print(console)
    if args.json:
        result.to_json(args.json)
        console.print(f"wrote {args.json}")
    if args.html:
        result.to_html(args.html, engine=args.layout)
        console.print(f"wrote {args.html}")
    return 0


def export_parser() -> argparse.ArgumentParser:
    """The arguments of ``bitfx export``."""
    p = argparse.ArgumentParser(prog="bitfx export", description="Binarize a model and export it as one shared "
                                "library for a device (TVM Relax, cross compiled).")
    p.add_argument("factory", metavar="MODULE:FACTORY",
                   help="module (dotted name or .py path) and a function in it returning (model, args), "
                   "(model, kwargs) or (model, args, kwargs)")
    p.add_argument("--target", default="linux-arm64", help="device target (default linux-arm64)")
    p.add_argument("-o", "--output", default="model.so", help="the library to write (default model.so)")
    p.add_argument("--config", metavar="PRESET", help="preset name or a JSON object of BinarizeConfig fields")
    p.add_argument("--verify", action="store_true", help="run the library under qemu and compare with the host")
    p.add_argument("--no-bundle", action="store_true", help="write only the library, no deploy bundle")
    return p


def export_main(argv: Sequence[str] | None = None) -> int:
    """``bitfx export MODULE:FACTORY [--target T] [-o PATH] [--config C] [--verify] [--no-bundle]``.

    Returns 0 on success, 2 for a bad factory or config, 1 when the export or its verification fails.
    """
    from bitfx.export import ExportError, export

    args = export_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
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


def _delegate(command: str, argv: Sequence[str]) -> int:
    module, func, _ = DELEGATED[command]
    try:
        # import_module, not attribute access: `bitfx.export` may also name the export function
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        print(f"bitfx {command}: not available in this build ({module}.{func}: {e})", file=sys.stderr)
        return 2
    return int(fn(list(argv)) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitfx", description="bitfx: a compiler for binary (1-bit) transformers")
    sub = parser.add_subparsers(dest="command", metavar="{demo,diff,export,bench}")
    for name, (_, _, help_text) in DELEGATED.items():
        sub.add_parser(name, help=f"{help_text} (see bitfx {name} --help)", add_help=False)
    p = sub.add_parser("diff", help="show what bitfx rewrites in a model, and the bytes and OPs it saves",
                       description="Run the bitfx pipeline on a model and show, per module, what became binary, "
                                   "what stayed float and why, and bytes and OPs (BOPs/64 + FLOPs) before and after.")
    p.add_argument("factory", metavar="MODULE:FACTORY",
                   help="module (dotted name or .py path) and a function in it returning (model, args), "
                   "(model, kwargs) or (model, args, kwargs)")
    p.add_argument("--config", metavar="PRESET", help="preset name (bipft, bit, bibert, bivit, bitnet, bitnet158) "
                   "or a JSON object of BinarizeConfig fields, e.g. '{\"preset\": \"bit\", \"keep\": [\"*head*\"]}'")
    p.add_argument("--json", metavar="PATH", help="write the diff as JSON (schema: bitfx/inspect/diff.schema.json)")
    p.add_argument("--html", metavar="PATH", help="write one self-contained HTML page with the graphs")
    p.add_argument("--layout", choices=("auto", "dot", "python"), default="auto",
                   help="graph layout for --html: Graphviz dot, the built-in one, or dot when installed (default)")
    p.add_argument("--traceback", action="store_true", help="print the full traceback of an error")
    p.set_defaults(run=cmd_diff)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        return _delegate(argv[0], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
