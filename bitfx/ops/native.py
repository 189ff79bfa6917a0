"""The C++ CPU kernels of the ``bitfx_kernels`` ops (``native.cpp``): kernel calls without Python.

    from bitfx.ops import native
    native.load()          # True: bit_linear (and its pair), fused_attention, sign_scores, binary_pv run in C++
    native.status()        # "loaded", "disabled (BITFX_NATIVE=0)", or why it could not be built

``native.cpp`` is built once per machine (one ``c++ -O2`` call, ~7 s of CPU; the library is kept in the
bitfx cache directory, keyed by the source, the compiler, the flags and the torch / tvm_ffi versions).
Lowering a graph to the kernel ops calls ``start()``: an already built library is loaded at once, else
the build runs in a background thread while the model compiles, and the first kernel-op call after it
finished loads it (calls before that run the Python path). ``load()`` waits for it. The library's
``TORCH_LIBRARY_IMPL`` registers CPU kernels, which take precedence over the Python implementations
(registered for CompositeExplicitAutograd in ``kernel_ops``); from then on a call is the dispatcher, a C++
plan lookup, one ``at::empty`` (the output) and two TVM-FFI calls with ``DLTensor`` pointers.

If there is no C++ compiler, the build or the load fails, or ``BITFX_NATIVE=0`` is set, the ops stay on
the Python path, which computes the same results (one warning names the reason; none for BITFX_NATIVE=0).
``$CXX`` picks the compiler (default: c++, g++, clang++, the first found).

**One thread pool.** Loading the library also moves the parallel loops of the TVM kernels onto torch's
OpenMP pool (``native.cpp``, "one thread pool"): TVM-FFI fills each kernel library's
``__TVMBackendParallelLaunch`` / ``__TVMBackendParallelBarrier`` pointers from a registry where the last
registration wins, and the library registers its own launch (``GOMP_parallel`` over torch's thread count)
there, then rewrites the pointers of the kernel libraries loaded before it (``build.loaded_libraries()``).
Kernels and inductor's float glue then share one set of workers: no TVM pool that sleeps between calls
(``TVM_THREAD_POOL_SPIN_COUNT=0``) or spins against OpenMP's. ``BITFX_POOL=0`` keeps TVM's own pool;
``pool_status()`` says which one runs. Results are the same either way (each output is computed by one
task, whatever the split). An op with less work than ``BITFX_POOL_MIN_WORK`` bit-MACs (default
``DEFAULT_POOL_MIN_WORK``; ``set_pool_min_work``) runs its kernels' loops on the calling thread alone: handing a
few microseconds of work to another thread costs more than it saves (M = 1 decode, attention at one query).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

from bitfx.env import switched_off

log = logging.getLogger(__name__)

__all__ = ["start", "poll", "load", "status", "plan_misses", "plans_held", "attention_calls", "library_path",
           "pool_status",
           "pool_launches", "pool_min_work", "set_pool_min_work", "DEFAULT_POOL_MIN_WORK", "SOURCE"]

SOURCE = Path(__file__).with_name("native.cpp")
FLAGS = ("-O2", "-std=c++20", "-fPIC", "-shared")
#: bit-MACs below which an op's kernels do not hand work to other threads (see the module docstring)
DEFAULT_POOL_MIN_WORK = 1 << 21

_lock = threading.RLock()
#: status: None (not started), "building", "built", "loaded", "disabled (...)" or "unavailable: <why>"
_state: dict = {"status": None, "lib": None, "path": None, "thread": None, "error": None, "pool": None}


def _compiler() -> str | None:
    """$CXX (None if it names no executable), else the first of c++, g++, clang++ found, else None."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    return next((p for p in map(shutil.which, ("c++", "g++", "clang++")) if p), None)


def _command(compiler: str, out: Path) -> list[str]:
    from torch.utils import cpp_extension
    from tvm_ffi import libinfo

    torch_lib = Path(torch.__file__).parent / "lib"
    ffi_lib = Path(libinfo.find_libtvm_ffi()).parent
    includes = [f"-I{p}" for p in (*cpp_extension.include_paths(), libinfo.find_include_path(),
                                   libinfo.find_dlpack_include_path())]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    return [compiler, *FLAGS, abi, *includes, str(SOURCE), f"-L{torch_lib}", "-lc10", "-ltorch_cpu",
            f"-L{ffi_lib}", "-ltvm_ffi", f"-Wl,-rpath,{torch_lib}", f"-Wl,-rpath,{ffi_lib}", "-o", str(out)]


def library_path(compiler: str | None = None) -> Path:
    """Where the built library lives: the bitfx cache directory, keyed by everything the build depends on."""
    import tvm_ffi

    from bitfx.codegen.build import cache_dir

    compiler = compiler or _compiler() or "c++"
    desc = "\n".join([SOURCE.read_text(), " ".join(_command(compiler, Path("out"))), torch.__version__,
                      tvm_ffi.__version__, sys.platform])
    return cache_dir() / f"native-ops-{hashlib.sha256(desc.encode()).hexdigest()[:16]}.so"


# Compile to a temporary name, then rename into place (atomic: processes building at once each publish a
# complete library). The shell does the rename, so a process that exits mid-build (a short script; the build
# thread is a daemon) still publishes the library for the next one; the compiler's messages go to a file.
_PUBLISH = ('tmp=$1; out=$2; log=$3; shift 3; "$@" -o "$tmp" 2> "$log" && mv -f "$tmp" "$out" && rm -f "$log"; '
            'rc=$?; rm -f "$tmp"; exit $rc')


def _build(compiler: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for stale in out.parent.glob(".native-ops-*"):  # left by a build that was killed
        with contextlib.suppress(OSError):
            if now - stale.stat().st_mtime > 3600:
                stale.unlink()
    fd, tmp = tempfile.mkstemp(prefix=".native-ops-", suffix=".so", dir=out.parent)
    os.close(fd)
    log_path = tmp[:-3] + ".log"
    cmd = _command(compiler, Path(tmp))[:-2]  # (without its "-o tmp": the shell adds it)
    try:
        # at the lowest priority: on a cold cache it runs beside the model's compile, on idle cycles
        proc = subprocess.run(["sh", "-c", _PUBLISH, "sh", tmp, str(out), log_path, *cmd],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              preexec_fn=(lambda: os.nice(19)) if hasattr(os, "nice") else None)
        if proc.returncode:
            message = Path(log_path).read_text(errors="replace").strip()[-2000:] if os.path.exists(log_path) else ""
            raise RuntimeError(f"{compiler} could not build {SOURCE.name} (exit {proc.returncode}):\n{message}")
    finally:
        for path in (tmp, log_path):
            with contextlib.suppress(OSError):
                os.unlink(path)


def start() -> None:
    """Begin making the C++ kernels available, without waiting: loaded now if already built, else built in a
    background thread (the compile of the model goes on meanwhile; calls stay on Python until it is done).

    The backend calls this when it lowers a graph to the kernel ops; ``poll()`` (each Python-path call)
    loads the library once the build has finished.
    """
    if _state["status"] is None:
        _begin()
    poll()


def _begin() -> None:
    with _lock:
        if _state["status"] is not None:
            return
        if switched_off("BITFX_NATIVE"):
            _state["status"] = "disabled (BITFX_NATIVE=0)"
            return
        compiler = _compiler()
        if compiler is None:
            cxx = os.environ.get("CXX")
            _fail(f"$CXX={cxx!r} is not an executable" if cxx else
                  "no C++ compiler found (c++, g++ or clang++ on PATH, or $CXX); install g++")
            return
        try:
            path = library_path(compiler)
        except Exception as err:  # noqa: BLE001 - e.g. tvm_ffi without headers
            _fail(str(err))
            return
        _state["path"] = path
        if path.exists():
            _state["status"] = "built"
        else:
            log.info("bitfx: building the C++ kernel ops (%s) in the background, once per machine", path.name)
            _state["status"] = "building"
            _state["thread"] = threading.Thread(target=_build_in_background, args=(compiler, path),
                                                name="bitfx-native-build", daemon=True)
            _state["thread"].start()


def _build_in_background(compiler: str, path: Path) -> None:
    try:
        _build(compiler, path)
        _state["error"] = None
    except Exception as err:  # noqa: BLE001 - reported by poll(), in the caller's thread
        _state["error"] = err


def poll() -> bool:
    """Load the library if its build has finished (cheap otherwise); True once the C++ kernels are in use."""
    status = _state["status"]
    if status == "loaded":
        return True
    if status not in ("built", "building"):
        return False
    thread = _state.get("thread")
    if status == "building" and thread is not None and thread.is_alive():
        return False
    with _lock:
        if _state["status"] not in ("built", "building"):
            return _state["status"] == "loaded"
        err = _state.get("error")
        if err is not None:
            _fail(str(err))
            return False
        try:
            path = str(_state["path"])
            torch.ops.load_library(path)
            _state["lib"] = lib = ctypes.CDLL(path)
            _setup_ctypes(lib)
            _state["status"] = "loaded"
        except Exception as err:  # noqa: BLE001 - e.g. an ABI mismatch: the Python path
            _fail(f"could not load {path}: {err}")
            return False
        _install_pool(lib)
    return True


def load() -> bool:
    """Build (once per machine, waiting for it) and load the C++ kernels. False, and the kernel ops stay on
    their Python path, if that is not possible (``status()`` says why)."""
    start()
    thread = _state.get("thread")
    if thread is not None:
        thread.join()
    return poll()


def _fail(why: str) -> None:
    _state["status"] = f"unavailable: {why}"
    warnings.warn(f"bitfx: the C++ kernel ops are unavailable ({why}); the kernel ops run on their Python "
                  "implementation (same results, more time per call). Set BITFX_NATIVE=0 to skip the build.",
                  RuntimeWarning, stacklevel=3)


def status() -> str:
    """"loaded", "building", "built", "disabled (BITFX_NATIVE=0)", "unavailable: <why>", or "not started"."""
    return _state["status"] or "not started"


def plan_misses() -> int:
    """How many ``bit_linear`` plans the C++ kernel asked Python for (each a first call or a weight update)."""
    return int(_state["lib"].bitfx_native_plan_misses()) if _state["lib"] is not None else 0


def plans_held() -> int:
    """How many layer plans the C++ cache holds (entries of dead parameters are dropped at the next miss)."""
    return int(_state["lib"].bitfx_native_plans_held()) if _state["lib"] is not None else 0


def attention_calls() -> int:
    """How many ``fused_attention`` calls the C++ kernel ran (the rest went to its Python implementation)."""
    return int(_state["lib"].bitfx_native_attention_calls()) if _state["lib"] is not None else 0


def _setup_ctypes(lib) -> None:
    for name in ("bitfx_native_plan_misses", "bitfx_native_plans_held", "bitfx_pool_launches",
                 "bitfx_pool_team_launches", "bitfx_native_attention_calls"):
        getattr(lib, name).restype = ctypes.c_int64
    lib.bitfx_native_eps.restype = ctypes.c_double
    lib.bitfx_pool_install.restype = ctypes.c_int
    lib.bitfx_pool_min_work.restype = ctypes.c_int64
    lib.bitfx_pool_set_min_work.argtypes = [ctypes.c_int64]
    lib.bitfx_pool_patch.restype = ctypes.c_int
    lib.bitfx_pool_patch.argtypes = [ctypes.c_char_p]


def _install_pool(lib) -> None:
    """Run the TVM kernels' parallel loops on torch's OpenMP pool from now on (unless BITFX_POOL=0)."""
    if switched_off("BITFX_POOL"):
        _state["pool"] = "tvm (BITFX_POOL=0)"
        return
    from bitfx.codegen import build

    raw = os.environ.get("BITFX_POOL_MIN_WORK", "").strip()
    set_pool_min_work(int(raw) if raw.isdigit() else DEFAULT_POOL_MIN_WORK if not raw else raw)
    rc = lib.bitfx_pool_install()
    if rc != 0:
        why = {1: "no GNU OpenMP runtime (libgomp) in this process"}.get(rc, "TVM-FFI refused the context symbols")
        _state["pool"] = f"tvm ({why})"
        log.warning("bitfx: TVM kernels keep TVM's thread pool: %s", why)
        return
    # libraries loaded before now hold TVM's launch; later ones get this one when TVM-FFI loads them
    patched = sum(lib.bitfx_pool_patch(os.fsencode(path)) for path in build.loaded_libraries())
    _state["pool"] = "torch-openmp"
    log.debug("bitfx: TVM kernels run on torch's OpenMP pool (%d loaded libraries repointed)", patched)


def pool_status() -> str:
    """Which pool runs the parallel loops of the TVM kernels: "torch-openmp" (torch's OpenMP workers, once
    the library is loaded), or "tvm (<why>)": TVM's own pool (BITFX_POOL=0, the library not loaded, ...)."""
    if _state["pool"] is not None:
        return _state["pool"]
    return "tvm (the C++ library is not loaded: " + status() + ")"


def set_pool_min_work(bit_macs: int) -> None:
    """Ops (``bit_linear``, ``sign_scores``, ``binary_pv``) with fewer bit-MACs than this run their kernels'
    parallel loops on the calling thread alone; 0 hands every loop to the team. Needs the library loaded."""
    if isinstance(bit_macs, bool) or not isinstance(bit_macs, int) or bit_macs < 0:
        raise ValueError(f"pool min work {bit_macs!r} (BITFX_POOL_MIN_WORK or set_pool_min_work) is not valid; "
                         "give a whole number of bit-MACs >= 0")
    lib = _state["lib"]
    if lib is None:
        raise RuntimeError(f"the C++ kernel library is not loaded ({status()}); call bitfx.ops.native.load() first")
    lib.bitfx_pool_set_min_work(bit_macs)


def pool_min_work() -> int:
    """The threshold ``set_pool_min_work`` sets (0 when the library is not loaded)."""
    return int(_state["lib"].bitfx_pool_min_work()) if _state["lib"] is not None else 0


def pool_launches() -> tuple[int, int]:
    """(parallel kernel launches that ran on torch's pool, those of them run by a team of several threads)."""
    lib = _state["lib"]
    if lib is None:
        return (0, 0)
    return int(lib.bitfx_pool_launches()), int(lib.bitfx_pool_team_launches())
