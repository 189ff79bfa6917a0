"""Example inputs as users hold them, bound to one call of the model's ``forward``.

Every entry point that captures with ``torch.export`` (``binarize``, ``diff``, ``export``) accepts

* positional inputs: a tuple (or list) of them, or one tensor: ``(input_ids, mask)``, ``x``;
* keyword inputs: a mapping such as a tokenizer's output (``{"input_ids": ..., "attention_mask":
  ...}``), and/or ``example_kwargs=`` (as ``torch.export`` takes ``kwargs``);
* models whose ``forward`` takes ``*args`` / ``**kwargs``.

A mapping is keyword inputs when one of its keys names a parameter of ``forward`` (or ``forward``
takes ``**kwargs``); otherwise it is the single positional input (``forward(self, batch)``). The inputs are bound to the
signature (a mismatch raises ``TypeError`` naming both) and flattened with ``torch.utils._pytree``
(nested tuples, dicts, Hugging Face caches). Keyword inputs that hold no tensor (``use_cache=False``)
are constants of the capture: the captured graph is specialised on them.

Example::

    call = example_call(model, tokenizer("hi", return_tensors="pt"), {"use_cache": False})
    call.names      # ['input_ids', 'attention_mask']: the captured graph's arguments
    call.flat       # (input_ids, attention_mask): the leaves torch.export sees
"""
from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree


class CaptureError(RuntimeError):
    """``torch.export`` could not capture the model; the message names the cause and the way out."""


@dataclass
class ExampleCall:
    """One call of ``model.forward``: ``model(*args, **kwargs, **constants)``."""

    args: tuple
    kwargs: dict                      # keyword inputs holding tensors (inputs of the graph)
    constants: dict                   # keyword inputs holding no tensor (fixed at capture)
    names: list[str]                  # the graph's arguments: one per positional input, then keywords
    spec: pytree.TreeSpec             # of (args, kwargs)
    flat: tuple                       # the leaves of (args, kwargs), in the graph's placeholder order
    caches: list[str] = field(default_factory=list)  # cache types carried through (e.g. DynamicCache)

    def unflatten(self, leaves) -> tuple[tuple, dict]:
        """Leaves -> (args, kwargs) of a ``forward`` call, constants included."""
        args, kwargs = pytree.tree_unflatten(list(leaves), self.spec)
        return tuple(args), {**kwargs, **self.constants}

    def flatten(self, *args: Any, **kwargs: Any) -> tuple:
        """The leaves of a call made the way the captured graph is called (positional or by name).

        Raises:
            TypeError: an input is missing, unexpected, or differs in structure from the capture.
        """
        n_args = self.spec.child(0).num_children
        given = dict(zip(self.names, args))
        if len(args) > len(self.names):
            raise TypeError(f"{len(args)} positional inputs given, the capture takes {len(self.names)} "
                            f"({', '.join(self.names)})")
        for k, v in kwargs.items():
            if k in given:
                raise TypeError(f"input {k!r} given twice (positionally and by name)")
            if k in self.constants:
                continue  # a constant of the capture, passed again
            given[k] = v
        missing = [n for n in self.names if n not in given]
        unexpected = [n for n in given if n not in self.names]
        if missing or unexpected:
            raise TypeError(f"the captured graph takes {', '.join(self.names)}; "
                            f"missing: {missing or 'none'}, unexpected: {unexpected or 'none'}")
        tree = (tuple(given[n] for n in self.names[:n_args]), {n: given[n] for n in self.names[n_args:]})
        leaves, spec = pytree.tree_flatten(tree)
        if spec != self.spec:
            raise TypeError(f"the inputs differ in structure from the capture:\n  got      {spec}\n  captured {self.spec}")
        return tuple(leaves)


def split_inputs(example_inputs: Any, example_kwargs: Any = None, forward=None) -> tuple[tuple, dict]:
    """(args, kwargs) from inputs as users hold them (see the module docstring)."""
    if example_kwargs is not None and not isinstance(example_kwargs, Mapping):
        raise TypeError(f"example_kwargs must be a mapping of keyword inputs, got {type(example_kwargs).__name__}")
    if example_inputs is None:
        args, kwargs = (), {}
    elif isinstance(example_inputs, Mapping) and _are_keywords(example_inputs, forward):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        args, kwargs = (example_inputs,), {}
    for k, v in dict(example_kwargs or {}).items():
        if k in kwargs:
            raise ValueError(f"keyword input {k!r} is given both in the example inputs and in example_kwargs")
        kwargs[k] = v
    return args, kwargs


def _are_keywords(mapping: Mapping, forward) -> bool:
    if not all(isinstance(k, str) for k in mapping):
        return False
    if forward is None:
        return True
    params = inspect.signature(forward).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return True
    return any(k in params for k in mapping)


def example_call(model: torch.nn.Module, example_inputs: Any = (), example_kwargs: Any = None) -> ExampleCall:
    """Bind the example inputs to ``model.forward`` (see the module docstring).

    Raises:
        TypeError: the inputs do not fit the signature (the message shows it and what was given).
        ValueError: a keyword input given twice.
    """
    register_cache_pytrees()
    forward = model.forward
    args, kwargs = split_inputs(example_inputs, example_kwargs, forward)
    sig = inspect.signature(forward)
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        given = [_describe(a) for a in args] + [f"{k}={_describe(v)}" for k, v in kwargs.items()]
        raise TypeError(f"the example inputs do not fit {type(model).__name__}.forward{sig}: {e} "
                        f"(given: {', '.join(given) or 'nothing'})") from None
    constants = {k: v for k, v in kwargs.items() if not _holds_tensor(v)}
    kwargs = {k: v for k, v in kwargs.items() if k not in constants}
    names = _positional_names(sig, len(args)) + list(kwargs)
    bad = [k for k in kwargs if not k.isidentifier() or k in names[:len(args)]]
    if bad:
        raise ValueError(f"keyword inputs {bad} cannot be argument names of the captured graph")
    leaves, spec = pytree.tree_flatten((args, kwargs))
    caches = sorted({type(v).__name__ for v in pytree.tree_flatten((args, kwargs),
                                                                   is_leaf=_is_cache)[0] if _is_cache(v)})
    return ExampleCall(args, kwargs, constants, names, spec, tuple(leaves), caches)


def _positional_names(sig: inspect.Signature, n: int) -> list[str]:
    positional = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    varargs = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_POSITIONAL), "args")
    return [positional[i].name if i < len(positional) else f"{varargs}_{i - len(positional)}" for i in range(n)]


def _holds_tensor(value: Any) -> bool:
    return any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(value))


def _is_cache(value: Any) -> bool:
    return type(value).__name__.endswith("Cache") and type(value).__module__.startswith("transformers")


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor{list(x.shape)}"
    return type(x).__name__


def register_cache_pytrees() -> None:
    """Register Hugging Face's ``DynamicCache`` (and ``EncoderDecoderCache``, whose halves are
    DynamicCaches) as pytrees, with ``transformers``' own export support, so that models return
    and take their KV caches through ``torch.export``. Does nothing when ``transformers`` is not
    imported; registering twice is harmless."""
    if "transformers" not in sys.modules:
        return
    try:
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache
        from transformers.integrations.executorch import register_dynamic_cache_export_support
    except ImportError:  # an older or newer transformers without them: nothing to register
        return
    if DynamicCache not in pytree.SUPPORTED_NODES:
        register_dynamic_cache_export_support()
    _register_model_outputs()
    if EncoderDecoderCache not in pytree.SUPPORTED_NODES:
        pytree.register_pytree_node(
            EncoderDecoderCache,
            lambda c: ([c.self_attention_cache, c.cross_attention_cache], None),
            lambda children, _: EncoderDecoderCache(*children),
            serialized_type_name=f"{EncoderDecoderCache.__module__}.EncoderDecoderCache",
            flatten_with_keys_fn=lambda c: ([(pytree.GetAttrKey("self_attention_cache"), c.self_attention_cache),
                                             (pytree.GetAttrKey("cross_attention_cache"), c.cross_attention_cache)],
                                            None),
        )


def _register_model_outputs() -> None:
    """Every ``ModelOutput`` class as a pytree. transformers registers them when a class is defined,
    except while ``torch.compiler.is_compiling()`` (a module first imported inside a trace), so such
    classes would reach ``torch.export`` unregistered; registration is idempotent in transformers."""
    try:
        from transformers.utils.generic import ModelOutput, _register_model_output_pytree_node
    except ImportError:
        return
    todo = list(ModelOutput.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls not in pytree.SUPPORTED_NODES:
            _register_model_output_pytree_node(cls)


_UNKNOWN_TYPE = re.compile(r"Found <class '([^']+)'> in (output|input)")


def explain_capture_failure(error: Exception, model: torch.nn.Module, call: ExampleCall) -> Exception:
    """A :class:`CaptureError` naming the cause of a ``torch.export`` failure and the way out."""
    name = type(model).__name__
    text = str(error)
    first = (text.strip().splitlines() or [""])[0][:300]
    m = _UNKNOWN_TYPE.search(text)
    if m:
        cls, where = m.group(1), m.group(2)
        short = cls.rsplit(".", 1)[-1]
        way = ("turn it off at capture (e.g. example_kwargs={'use_cache': False}) or register it with "
               "torch.utils._pytree.register_pytree_node" if "Cache" in short else
               "register it with torch.utils._pytree.register_pytree_node (or return tensors, tuples or dicts)")
        what = "returned" if where == "output" else "was given"
        return CaptureError(f"the model {name} {what} a {short} ({cls}), which torch.export cannot carry "
                            f"through: {way}")
    if "GuardOnDataDependentSymNode" in type(error).__name__ or "data-dependent" in text or \
            "data dependent" in text:
        where = _user_frame(text)
        return CaptureError(f"{name} branches on the value of a tensor{where} ({first}); torch.export needs "
                            f"control flow that depends only on shapes: pass that value as a Python constant, "
                            f"or compile with torch.compile(model, backend='bitfx'), which breaks the graph there")
    return CaptureError(f"torch.export could not capture {name} with inputs ({', '.join(call.names)}): "
                        f"{type(error).__name__}: {first}")


def _user_frame(text: str) -> str:
    """`` at file:line`` of the innermost user frame torch names in an export error, if any."""
    frames = re.findall(r'File "([^"]+)", line (\d+)', text)
    frames = [f for f in frames if "/torch/" not in f[0]]
    return f" at {frames[-1][0]}:{frames[-1][1]}" if frames else ""


def pytree_codegen(call: ExampleCall, out_spec):
    """The codegen that gives a captured graph ``call``'s arguments (by position or name) and the
    model's output structure (``out_spec``)."""
    from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

    return _PyTreeCodeGen(_PyTreeInfo(list(call.names), call.spec, out_spec))


def flat_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` as a function of the flat leaves of its inputs, returning the flat leaves of its
    output (a tuple): the form a device library takes. Shares ``gm``'s parameters."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(tuple(pytree.tree_leaves(out)) if isinstance(out, (tuple, list)) else (out,))
    return torch.fx.GraphModule(gm, graph)
