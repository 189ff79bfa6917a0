"""``bitfx.trace_once``: dynamo traces a model's repeated block once, not once per block.

    model = bitfx.trace_once(model)                    # e.g. a BertModel: BertLayer marked
    fast = torch.compile(model, backend="bitfx")

Before ``torch.compile`` sees a model, its graph does not exist yet: dynamo builds it by running the model's
Python, every layer of it. For a 12-layer BERT that trace is ~2 s here, the larger part of a warm start (the
partitions load from the caches in ~0.6 s). ``torch.compiler.nested_compile_region`` on a block's ``forward``
makes dynamo trace the block once and call its graph (``invoke_subgraph``) for every block. bitfx's backend
inlines those calls (`bitfx.passes.capture.inline_regions`), so the passes, `bitfx.regions` and the compiled model
are those of the unmarked model: the same results, bit for bit (tested).

The mark is on the block's *class* (that is what the region is keyed by), so every instance of it, in any
model, is marked; calling a marked module without ``torch.compile`` runs its ``forward`` unchanged. Classes from
``torch`` itself (``nn.Linear``, ``nn.TransformerEncoderLayer``) are marked only when passed in ``classes``.
"""
from __future__ import annotations

import collections
from typing import Iterable

import torch

#: The classes marked, each with its forward before the mark.
MARKED: dict[type, object] = {}


def repeated_blocks(model: torch.nn.Module) -> list[type]:
    """The classes of ``model``'s repeated blocks: those of which a ``ModuleList`` or ``Sequential`` holds two or
    more, outermost first, ``torch``'s own classes left out."""
    counts: collections.Counter = collections.Counter()
    for module in model.modules():
        if isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)):
            counts.update(type(child) for child in module.children())
    return [cls for cls, n in counts.items() if n >= 2 and not cls.__module__.startswith("torch.")]


def trace_once(model: torch.nn.Module, classes: Iterable[type] | None = None) -> torch.nn.Module:
    """Mark the ``forward`` of ``model``'s repeated blocks (or of ``classes``) as a
    ``torch.compiler.nested_compile_region``; returns ``model`` itself.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or an entry of ``classes`` is not an ``nn.Module`` class.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"trace_once takes an nn.Module; got {type(model).__name__}")
    chosen = repeated_blocks(model) if classes is None else list(classes)
    for cls in chosen:
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            raise TypeError(f"trace_once marks nn.Module classes; got {cls!r}")
        if cls in MARKED:
            continue
        MARKED[cls] = cls.__dict__.get("forward")
        cls.forward = torch.compiler.nested_compile_region(cls.forward)
    return model


def unmark(classes: Iterable[type] | None = None) -> None:
    """Undo `trace_once` for ``classes`` (default: every class it marked)."""
    for cls in list(MARKED if classes is None else classes):
        if cls not in MARKED:
            continue
        own = MARKED.pop(cls)
        if own is None:  # the forward was inherited: drop the marked one, the base class's shows again
            del cls.forward
        else:
            cls.forward = own
