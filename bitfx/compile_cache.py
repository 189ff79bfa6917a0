"""Work a warm start never does twice: calibrated values and packed weights, on disk, keyed by content.

    key = content_key("calibration", tensors, extra=repr(config))
    values = load(key)                      # dict of tensors, or None (absent or damaged)
    if values is None:
        values = compute(); store(key, values)

Kernels have their own cache (`bitfx.codegen.build`); dynamo, AOTAutograd and inductor keep theirs
(inductor's FX graph cache is on by default). This one holds what bitfx computes from a model's
parameters at compile time: the first-batch calibration of added parameters (scales, `move`, α, β,
BiPFT estimators) and the binarized, packed weights of every `bit_linear`. Keys hash the bytes, dtype
and shape of every tensor the result depends on, bitfx's sources (`source_digest`) and the caller's
`extra` text, so an edited parameter, another batch, another config or an edited bitfx never meets a stale
entry. Files are written
atomically in NumPy's `.npz` format and read with `allow_pickle=False` (no code is executed); a damaged
file is ignored and rewritten. `$BITFX_COMPILE_CACHE=0` turns the cache off. `STATS` counts hits, misses and
stores for tests and logs. Directory: `$BITFX_COMPILE_CACHE_DIR`, else `compile/` under the kernel cache.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import hashlib
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

log = logging.getLogger(__name__)

STATS: collections.Counter = collections.Counter()
FORMAT = 1


def enabled() -> bool:
    return os.environ.get("BITFX_COMPILE_CACHE", "1") != "0"


def _root() -> Path:
    """`$BITFX_COMPILE_CACHE_DIR`, else `compile/` in the kernel cache directory."""
    if os.environ.get("BITFX_COMPILE_CACHE_DIR"):
        return Path(os.environ["BITFX_COMPILE_CACHE_DIR"])
    from bitfx.codegen.build import cache_dir

    return cache_dir() / "compile"


def content_key(kind: str, tensors: Iterable[torch.Tensor], extra: str = "") -> str:
    """A digest of `kind`, `extra`, bitfx's sources and every tensor's dtype, shape and bytes.

    SHA-256 (hardware-accelerated on x86 and ARMv8: ~1.8 GB/s here against BLAKE2b's 0.9) per tensor,
    the tensors spread over two threads (hashlib releases the GIL on large buffers). Inside `same_tensors`,
    a tensor hashed before is not hashed again. `STATS`: "digest" (tensors hashed), "digest_reused"."""
    tensors = [t.detach() for t in tensors]
    memo = getattr(_MEMO, "digests", None)
    known = {id(t): memo[m][1] for t in tensors if memo is not None and (m := _memo_key(t)) in memo}
    big = [t for t in tensors if id(t) not in known and t.numel() * t.element_size() >= 1 << 20]
    digests = dict(zip(map(id, big), _POOL.map(_tensor_digest, big))) if len(big) > 1 else {}
    digests.update(known)
    h = hashlib.sha256(f"{kind}|{extra}|{source_digest()}|{FORMAT}".encode())
    for t in tensors:
        h.update(f"|{t.dtype}{tuple(t.shape)}".encode())
        d = digests.get(id(t))
        if d is None:
            d = _tensor_digest(t)
        if id(t) in known:
            STATS["digest_reused"] += 1
        elif memo is not None:
            memo[_memo_key(t)] = (t, d)  # (held: its memory is not reused while the memo lives)
        h.update(d)
    return f"{kind}-{h.hexdigest()[:40]}"


_MEMO = threading.local()


def _memo_key(t: torch.Tensor) -> tuple:
    """Which bytes ``t`` views: its memory (not reused while the memo keeps ``t``) and the view. Not its
    version: the aliases a compiled graph passes to its kernels (``.data``-like) count their own, so a weight
    the calibration hashed at version 2 reaches the packing at version 0. Hence `same_tensors`' premise."""
    return (t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.storage_offset(), t.device)


@contextlib.contextmanager
def same_tensors():
    """Within this context (this thread), the bytes of a tensor are hashed once: the first call of a compiled
    partition hashes its weights for the calibration key and again, each, for its packed-weight key (a warm
    start of BERT-base: 340 MB twice). Only for a span in which nothing edits a hashed tensor in place (the
    memo keys by memory and view, not by version; see `_memo_key`); it is dropped on exit."""
    if getattr(_MEMO, "digests", None) is not None:  # (nested: the outer one holds)
        yield
        return
    _MEMO.digests = {}
    try:
        yield
    finally:
        _MEMO.digests = None


@functools.cache
def source_digest() -> str:
    """SHA-256 of every bitfx source file (Python and C++): any edit changes it, so an edited calibration
    or packing never meets an entry the old code wrote (the version number alone did not change)."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.suffix in (".py", ".cpp", ".c", ".h") and "__pycache__" not in f.parts:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:32]


def _tensor_digest(t: torch.Tensor) -> bytes:
    if not t.numel():
        return b""
    STATS["digest"] += 1
    return hashlib.sha256(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data).digest()


_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="bitfx-hash")


def load(key: str, stat: str = "") -> dict[str, torch.Tensor] | None:
    """The tensors stored under `key`, or None when absent, damaged or the cache is off.

    `stat`: a prefix for the `STATS` counters of this entry (``"simd_probe_"`` counts apart)."""
    if not enabled():
        return None
    path = _root() / f"{key}.npz"
    if not path.exists():
        STATS[stat + "miss"] += 1
        return None
    try:
        # NumPy's format, not torch.load: no code runs on load (allow_pickle=False), and torch.load
        # returns data-less meta tensors inside a compile (dynamo's fake mode is detected)
        with np.load(path, allow_pickle=False) as data:
            values = {k: torch.from_numpy(data[k].copy()) for k in data.files}
    except Exception as err:  # noqa: BLE001 - any damage means "compute again"
        log.warning("bitfx compile cache entry %s is damaged (%s); computing it again", path.name, err)
        STATS["damaged"] += 1
        return None
    STATS[stat + "hit"] += 1
    return values


def store(key: str, values: dict[str, torch.Tensor], stat: str = "") -> None:
    """Write `values` under `key` atomically; a read-only or full disk only logs (`stat`: as `load`)."""
    if not enabled():
        return
    root = _root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        arrays = {k: v.detach().cpu().contiguous().numpy() for k, v in values.items()}
        fd, tmp = tempfile.mkstemp(prefix=f".{key}-", suffix=".npz", dir=root)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, root / f"{key}.npz")
        STATS[stat + "store"] += 1
    except (OSError, TypeError, RuntimeError) as err:  # disk, or a dtype NumPy has no type for
        log.warning("bitfx could not write compile cache entry %s (%s)", key, err)
