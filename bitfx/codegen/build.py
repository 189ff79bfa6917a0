"""Compile bitfx kernels, once per machine: an in-process memo in front of a disk cache shared by processes.

    fn = kernel("gemm", mode="xnor", K=768, N=3072)      # a tvm_ffi.Function; call it with torch tensors

Cache directory: `$BITFX_CACHE_DIR`, else `$XDG_CACHE_HOME/bitfx`, else `~/.cache/bitfx`. An entry is
`<key>.json` (a manifest naming the library, its size and sha256) beside a content-addressed
`<key>-<sha>.so`. The key hashes the op, its parameters, the kernel set that implements it (a name in
`bitfx.targets.registry`: "host" tiled loop nests, the "reference" `te.compute`, ...), the target string,
the schedule version, a hash of the generator's source file (so an edited generator is never served a
stale kernel) and the TVM version.

Writes are atomic (temporary file + `os.replace`), so processes compiling the same kernel at once each
publish a complete library and the last manifest wins. A manifest that does not parse, or a library whose
size or sha256 differs from its manifest, or that fails to load, is rebuilt and replaced, never used.
`STATS` counts what happened ("compiled", "loaded", "rebuilt", "prefetched") for tests and logs.

`prefetch([(op, params), ...])` starts kernels compiling (or loading) in background threads: TVM's compiler and
LLVM release the GIL, so on a cold cache the kernels a model will call build beside each other and beside the
rest of its compile (the lowering asks for them as soon as it knows their shapes); `kernel()` then waits for a
kernel that is still under way instead of building it again.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import hashlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import tvm

log = logging.getLogger(__name__)

STATS: collections.Counter = collections.Counter()
CACHE_FORMAT = 1
_MEMO: dict = {}
_LOADED: list[str] = []  # the kernel libraries this process loaded (bitfx.ops.native repoints their pool)
_PENDING: dict = {}  # memo key -> Future of a prefetched kernel
PREFETCH_THREADS = 4  # at most this many kernel builds at once (`prefetch`)
_POOL: list = []  # the prefetch thread pool, made on first use


def cache_dir() -> Path:
    """Where compiled kernels live (created on first write)."""
    if os.environ.get("BITFX_CACHE_DIR"):
        return Path(os.environ["BITFX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bitfx"


def kernel(op: str, *, impl: str = "host", target: tvm.target.Target | None = None, **params):
    """The compiled `main` of kernel `op` as kernel set `impl` implements it (`bitfx.targets.registry`).

    Memoised per process (cheap tuple key: this is on the dispatch path), then looked up on disk.
    """
    memo_key = (op, impl, None if target is None else str(target), tuple(sorted(params.items())))
    fn = _MEMO.get(memo_key)
    if fn is None:
        pending = _PENDING.pop(memo_key, None)
        if pending is not None:
            try:
                fn = pending.result()
            except Exception:  # noqa: BLE001 - built again below, where its error is raised to the caller
                fn = None
        fn = _MEMO[memo_key] = fn if fn is not None else _load_or_build(op, impl, target, params)
    return fn


def prefetch(specs, impl: str = "host") -> int:
    """Start compiling (or loading) the kernels ``[(op, params), ...]`` of kernel set ``impl`` in background
    threads, one per CPU up to ``PREFETCH_THREADS`` (an LLVM build holds a few hundred MB); returns how many
    were started (the others are memoised or under way already, or have a parameter that is no value yet: a
    size dynamo made symbolic, which the first call builds). A process that exits meanwhile waits for them (and
    the next one finds them in the cache)."""
    started = 0
    for op, params in specs:
        memo_key = (op, impl, None, tuple(sorted(params.items())))
        try:
            if memo_key in _MEMO or memo_key in _PENDING:
                continue
        except TypeError:  # unhashable: a SymInt
            continue
        if not _POOL:
            _POOL.append(concurrent.futures.ThreadPoolExecutor(max_workers=min(PREFETCH_THREADS, os.cpu_count() or 1),
                                                               thread_name_prefix="bitfx-kernel-build"))
        _PENDING[memo_key] = _POOL[0].submit(_load_or_build, op, impl, None, dict(params))
        STATS["prefetched"] += 1
        started += 1
    return started


def loaded_libraries() -> list[str]:
    """Paths of the kernel libraries this process has loaded, in load order."""
    return list(_LOADED)


def _generator(op: str, impl: str):
    from bitfx.targets import registry

    return registry.implementation(impl, op)


def _target(target, impl: str = "reference"):
    """The target to compile for: given, else this CPU (``host`` kernels: its tuned ``mcpu`` target)."""
    if target is not None:
        return target
    if impl == "host":
        from bitfx.targets.host import host_target

        return host_target()
    from bitfx.targets.cross import get_target

    return get_target("host").tvm_target


@functools.cache
def _source_digest(op: str, impl: str) -> str:
    """Hash of the generator's source file: an edited generator never meets its old kernels."""
    from bitfx.targets import registry

    return hashlib.sha256(Path(registry.source_file(_generator(op, impl))).read_bytes()).hexdigest()[:16]


def cache_key(op: str, impl: str, target, params: dict) -> str:
    # the generator module's SCHEDULE_VERSION (0 if it has none), beside its source hash
    schedule = getattr(sys.modules[_generator(op, impl).__module__], "SCHEDULE_VERSION", 0)
    desc = {
        "op": op, "impl": impl, "params": {k: repr(v) for k, v in sorted(params.items())},
        "target": str(_target(target, impl)), "schedule": schedule, "source": _source_digest(op, impl),
        "tvm": tvm.__version__, "format": CACHE_FORMAT,
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:32]


def _load_or_build(op: str, impl: str, target, params: dict):
    key = cache_key(op, impl, target, params)
    root = cache_dir()
    manifest = root / f"{key}.json"
    if manifest.exists():
        mod = _load(manifest, root)
        if mod is not None:
            STATS["loaded"] += 1
            log.debug("kernel %s %s loaded from %s", op, params, manifest)
            return mod["main"]
        STATS["rebuilt"] += 1
    return _compile_and_store(op, impl, target, params, root, key)


def _load(manifest: Path, root: Path):
    """The cached module, or None (with a warning) if the entry is damaged in any way."""
    try:
        entry = json.loads(manifest.read_text())
        lib = root / entry["lib"]
        data = lib.read_bytes()
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ValueError(f"{lib.name}: size or sha256 differs from its manifest")
        mod = tvm.runtime.load_module(str(lib))
        _LOADED.append(str(lib))
        return mod
    except Exception as err:  # noqa: BLE001 - any damage means "rebuild"
        log.warning("bitfx kernel cache entry %s is damaged (%s); rebuilding it", manifest.name, err)
        return None


def _compile_and_store(op: str, impl: str, target, params: dict, root: Path, key: str):
    func = _generator(op, impl)(**params).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target=_target(target, impl))
    STATS["compiled"] += 1
    log.debug("kernel %s %s compiled", op, params)
    try:
        path = _store(lib, root, key, op, params)
    except Exception as err:  # noqa: BLE001 - no compiler/linker or read-only disk: run uncached
        log.warning("bitfx could not cache kernel %s (%s); it will be compiled again next run", op, err)
        return lib.mod["main"]
    # the stored library, not the JIT module: the same code, but a file `bitfx.ops.native` can repoint
    # to torch's thread pool if it loads later (a JIT module keeps the pool it was linked with)
    try:
        mod = tvm.runtime.load_module(str(path))
    except Exception:  # noqa: BLE001 - e.g. the file vanished: the in-memory module computes the same
        return lib.mod["main"]
    _LOADED.append(str(path))
    return mod["main"]


def _store(lib, root: Path, key: str, op: str, params: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{key}-", suffix=".so", dir=root)
    os.close(fd)
    try:
        lib.export_library(tmp)
        data = Path(tmp).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        name = f"{key}-{sha[:16]}.so"
        os.replace(tmp, root / name)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    entry = {"lib": name, "size": len(data), "sha256": sha, "op": op,
             "params": {k: repr(v) for k, v in params.items()}}
    fd, tmp = tempfile.mkstemp(prefix=f".{key}-", suffix=".json", dir=root)
    with os.fdopen(fd, "w") as f:
        json.dump(entry, f)
    os.replace(tmp, root / f"{key}.json")
    return root / name
