"""Kernels per target (DESIGN §3): one registry, kernel set → op → implementation.

A *kernel set* is the code one kind of machine runs: ``"reference"`` (the plain ``te.compute`` of
``bitfx/codegen/compute.py``, the definition and the fallback of every set), ``"host"`` (this CPU's tiled
loop nests, ``bitfx/targets/host.py``), ``"arm64"`` (NEON, ``bitfx/targets/arm.py``), ``"cuda"``, ...
The torch-process lowering (``bitfx.codegen.build.kernel``) and the device export (the Relax converters'
``call_tir``) both ask this registry, so the code that runs on a device is the code tested and benchmarked
for it. A target brings its kernels by registering them in its own file::

    from bitfx.targets.registry import register_kernel

    @register_kernel("arm64", "gemm")
    def gemm(*, mode, K, N, planes=1, signed=True, batched=False, epilogue="int", bias=False,
             parallel=True) -> tirx.PrimFunc: ...

Every implementation of an op takes the keyword parameters of its compute in ``bitfx/codegen/compute.py``
and returns a ``tirx.PrimFunc`` with the same buffers in the same order (so one ``call_tir`` or one torch
call serves any set). A set that lacks an op falls back to the reference compute of that op.
"""
from __future__ import annotations

import importlib
import inspect
import logging
from typing import Callable

log = logging.getLogger(__name__)

__all__ = ["KERNEL_OPS", "register_kernel", "implementation", "kernel_sets", "implemented_ops",
           "UnknownKernelSetError"]

# The kernel ops every set may implement (the names of the generators in bitfx/codegen/compute.py).
KERNEL_OPS = ("pack_rows", "pack_cols", "absmax_planes", "gemm")
# Fused kernels a set may add beyond these; they have no reference compute, so a set without one keeps
# the unfused ops (e.g. "fused_attention": the host's one-call ``bit_attention``, bitfx/targets/host_attention.py).
FUSED_OPS = ("fused_attention",)

# Where each built-in set registers its kernels (its modules, e.g. the host's fused kernels kept out of its
# main file); imported on first use (keeps `import bitfx` cheap).
_MODULES: dict[str, tuple[str, ...]] = {
    "reference": ("bitfx.codegen.compute",),
    "host": ("bitfx.targets.host", "bitfx.targets.host_attention"),
    "arm64": ("bitfx.targets.arm",),
    "arm64-dotprod": ("bitfx.targets.arm",),
    "cuda": ("bitfx.targets.cuda",),
}
_REGISTRY: dict[str, dict[str, Callable]] = {}


class UnknownKernelSetError(ValueError):
    """A kernel set that no module registers; the message lists the known ones."""


def register_kernel(kernel_set: str, op: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` implements kernel ``op`` for ``kernel_set``. Duplicates are refused."""
    if op not in KERNEL_OPS + FUSED_OPS:
        raise ValueError(f"unknown kernel op {op!r}; expected one of {list(KERNEL_OPS + FUSED_OPS)}")

    def deco(fn: Callable) -> Callable:
        ops = _REGISTRY.setdefault(kernel_set, {})
        if op in ops and ops[op] is not fn:
            old = ops[op]
            raise ValueError(
                f"kernel {op!r} of set {kernel_set!r} is already registered by "
                f"{old.__module__}.{old.__qualname__}; register {fn.__module__}.{fn.__qualname__} "
                "under another set name, or remove the first registration")
        ops[op] = fn
        return fn

    return deco


def _load(kernel_set: str) -> dict[str, Callable]:
    if kernel_set in _MODULES:
        # every module of the set, also when one of them was imported directly (it registered only its own)
        for module in _MODULES[kernel_set]:
            importlib.import_module(module)
        _REGISTRY.setdefault(kernel_set, {})  # a built-in set with nothing of its own yet
    if kernel_set not in _REGISTRY:
        raise UnknownKernelSetError(f"unknown kernel set {kernel_set!r}; expected one of {kernel_sets()}")
    return _REGISTRY[kernel_set]


def implementation(kernel_set: str, op: str) -> Callable:
    """The generator of ``op`` for ``kernel_set``, or the reference compute when the set has none."""
    ops = _load(kernel_set)
    fn = ops.get(op)
    if fn is None:
        if op in FUSED_OPS:
            raise ValueError(f"kernel set {kernel_set!r} has no fused kernel {op!r}; use the unfused ops")
        if op not in KERNEL_OPS:
            raise ValueError(f"unknown kernel op {op!r}; expected one of {list(KERNEL_OPS)}")
        log.debug("kernel set %r has no %r; using the reference compute", kernel_set, op)
        fn = _load("reference")[op]
    return fn


def implemented_ops(kernel_set: str) -> list[str]:
    """The ops ``kernel_set`` implements itself (the others fall back to the reference compute)."""
    return sorted(_load(kernel_set))


def kernel_sets() -> list[str]:
    """Every known kernel set: the built-in ones and any registered since."""
    return sorted(set(_MODULES) | set(_REGISTRY))


def source_file(fn: Callable) -> str:
    """The file that defines ``fn``; its content is part of every kernel-cache key."""
    return inspect.getsourcefile(fn) or ""
