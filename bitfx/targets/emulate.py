"""Run an exported arm64 model on this x86 machine, under qemu-user, with the real TVM runtime.

    outs = run_emulated("model.so", [x], "linux-arm64")     # list[np.ndarray], as the device computes

The pieces, each usable alone:

- ``fetch_arm64_runtime()`` downloads the aarch64 wheels of the installed ``apache-tvm`` and
  ``apache-tvm-ffi`` versions (``pip download --platform manylinux_2_28_aarch64``) and extracts
  ``libtvm_runtime.so`` and ``libtvm_ffi.so`` into the cache (``BITFX_CACHE_DIR``, default
  ``~/.cache/bitfx``). ``BITFX_ARM64_RUNTIME_DIR`` points at a directory that already has them.
- ``build_loader()`` cross-compiles ``bitfx/deploy/loader.cc`` (a C++ Relax VM runner) against the
  tvm-ffi headers of the installed wheel and those libraries.
- ``run_emulated()`` writes the inputs as .npy, runs the loader under
  ``qemu-aarch64 -L /usr/aarch64-linux-gnu`` and reads the outputs back.

Android libraries run here too: a library linked for bionic needs ``libc.so``/``libm.so``/
``libdl.so`` by those names, which this function maps onto glibc's (``libc.so.6``...) in a shim
directory. That works because TVM's kernels only call C-standard functions whose ABI bionic and
glibc share (``memcpy``, ``expf``...); it checks the code and the linking, not bionic itself.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from bitfx.targets.cross import ToolchainNotFoundError, get_target

RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")
AARCH64_SYSROOT = Path("/usr/aarch64-linux-gnu")
_WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_24_aarch64",
                    "manylinux_2_17_aarch64", "manylinux2014_aarch64")
_BIONIC_TO_GLIBC = {"libc.so": "libc.so.6", "libm.so": "libm.so.6", "libdl.so": "libdl.so.2"}
LOADER_SOURCE = Path(__file__).resolve().parent.parent / "deploy" / "loader.cc"
GLIBC_START_SOURCE = LOADER_SOURCE.with_name("glibc_start.c")


def cache_dir() -> Path:
    """Where bitfx keeps downloaded runtimes and built loaders: ``BITFX_CACHE_DIR`` or ~/.cache/bitfx."""
    if os.environ.get("BITFX_CACHE_DIR"):
        return Path(os.environ["BITFX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bitfx"


def runtime_versions() -> dict[str, str]:
    """The installed ``apache-tvm`` and ``apache-tvm-ffi`` versions; the device runtime must match."""
    return {pkg: importlib.metadata.version(pkg) for pkg in ("apache-tvm", "apache-tvm-ffi")}


def fetch_arm64_runtime(dest: str | Path | None = None) -> Path:
    """A directory holding the aarch64 ``libtvm_runtime.so`` and ``libtvm_ffi.so``; downloads once.

    Raises RuntimeError with pip's output if the wheels cannot be downloaded (e.g. no network):
    then put the two libraries in a directory and set ``BITFX_ARM64_RUNTIME_DIR`` to it.
    """
    if dest is None and os.environ.get("BITFX_ARM64_RUNTIME_DIR"):
        given = Path(os.environ["BITFX_ARM64_RUNTIME_DIR"])
        if missing := [lib for lib in RUNTIME_LIBS if not (given / lib).exists()]:
            raise FileNotFoundError(f"BITFX_ARM64_RUNTIME_DIR={given} lacks {missing}")
        return given
    versions = runtime_versions()
    tag = "-".join(f"{k}-{v}" for k, v in versions.items())
    out = Path(dest) if dest else cache_dir() / "arm64-runtime" / tag
    with _RUNTIME_LOCK:  # verify's qemu threads: one download per process
        if all((out / lib).exists() for lib in RUNTIME_LIBS):
            return out
        return _download_runtime(versions, out)


_RUNTIME_LOCK = threading.Lock()


def _download_runtime(versions: dict, out: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix="bitfx-wheels-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}",
               "--implementation", "cp", "-d", tmp, "--quiet"]
        cmd += [arg for plat in _WHEEL_PLATFORMS for arg in ("--platform", plat)]
        cmd += [f"{pkg}=={ver}" for pkg, ver in versions.items()]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"could not download the aarch64 TVM runtime wheels ({' '.join(cmd[4:])}):\n"
                f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}\nWithout network, extract "
                f"{RUNTIME_LIBS} from the aarch64 wheels of {versions} into a directory and set "
                "BITFX_ARM64_RUNTIME_DIR to it.")
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=_mkdir(out.parent)))
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as zf:
                for member in zf.namelist():
                    if Path(member).name in RUNTIME_LIBS and "/lib/" in member:
                        (staging / Path(member).name).write_bytes(zf.read(member))
    if missing := [lib for lib in RUNTIME_LIBS if not (staging / lib).exists()]:
        shutil.rmtree(staging)
        raise RuntimeError(f"the aarch64 wheels of {versions} did not contain {missing}")
    if all((out / lib).exists() for lib in RUNTIME_LIBS):  # another process published it meanwhile: keep
        shutil.rmtree(staging)                               # that one (it may be in use)
        return out
    if out.exists():  # an incomplete one
        shutil.rmtree(out)
    staging.rename(out)  # atomic: a half-extracted runtime is never visible
    return out


def build_loader(target: str = "linux-arm64", out: str | Path | None = None) -> Path:
    """Cross-compile ``bitfx/deploy/loader.cc`` for ``target``; cached by source and versions."""
    if get_target(target).is_android:
        raise ToolchainNotFoundError(
            f"the loader for {target} needs the NDK's C++ library and an Android build of the TVM "
            "runtime; build it on the device side as bitfx/deploy/README describes. Under "
            "emulation, Android models run with the linux-arm64 loader.")
    cxx = _cross_cxx()
    runtime = fetch_arm64_runtime()
    import tvm_ffi.libinfo

    include = tvm_ffi.libinfo.find_include_path()
    dlpack = tvm_ffi.libinfo.find_dlpack_include_path()
    key = hashlib.sha256(LOADER_SOURCE.read_bytes() + GLIBC_START_SOURCE.read_bytes() +
                         repr((cxx, runtime_versions())).encode())
    dest = Path(out) if out else cache_dir() / "loader" / key.hexdigest()[:16] / "bitfx_loader"
    with _LOADER_LOCK:  # verify runs its qemu jobs on threads: one build per process, not one per thread
        if dest.exists() and out is None:
            return dest
        return _build_loader(cxx, runtime, include, dlpack, dest)


_LOADER_LOCK = threading.Lock()


def _build_loader(cxx: str, runtime: Path, include: str, dlpack: str, dest: Path) -> Path:
    _mkdir(dest.parent)
    # unique per process and thread; os.replace publishes it whole (other processes may build it too)
    partial = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}")
    # glibc_start.c replaces Scrt1.o (see there): the loader then needs GLIBC_2.17, not 2.34.
    crt = {name: _compiler_file(cxx, name) for name in ("crti.o", "crtbeginS.o", "crtendS.o", "crtn.o")}
    cmd = [cxx, "-std=c++17", "-O2", "-fPIE", "-pie", "-nostartfiles", f"-I{include}", f"-I{dlpack}",
           crt["crti.o"], crt["crtbeginS.o"], "-x", "c", str(GLIBC_START_SOURCE), "-x", "none",
           str(LOADER_SOURCE), "-o", str(partial), f"-L{runtime}", "-Wl,--no-as-needed",
           "-ltvm_runtime", "-ltvm_ffi", "-Wl,-rpath,$ORIGIN", crt["crtendS.o"], crt["crtn.o"]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the loader failed:\n{proc.stderr}\ncommand: {' '.join(cmd)}")
    os.replace(partial, dest)
    return dest


class EmulationError(RuntimeError):
    """The device program failed under qemu; ``signal`` is set when a signal killed it (4: SIGILL)."""

    def __init__(self, message: str, returncode: int, output: str):
        super().__init__(message)
        self.returncode = returncode
        self.output = output

    @property
    def signal(self) -> int | None:
        # qemu-user re-raises the guest's fatal signal on itself: a negative return code
        return -self.returncode if self.returncode < 0 else None


def qemu_command(target: str = "linux-arm64", cpu: str | None = None) -> list[str]:
    """``qemu-aarch64 -L <sysroot> [-cpu CPU]``; ToolchainNotFoundError naming the Debian package if absent.

    ``cpu`` is a qemu CPU model: ``cortex-a53`` (ARMv8.0-A), ``cortex-a76`` (ARMv8.2-A, dotprod),
    ``max`` (qemu's default: every feature it emulates). ``qemu-aarch64 -cpu help`` lists them.
    """
    dt = get_target(target)
    if not dt.triple.startswith("aarch64"):
        raise ValueError(f"no emulator for {target!r} ({dt.triple}); emulation covers aarch64 "
                         "targets (the TVM runtime wheels exist for aarch64 only)")
    qemu = shutil.which("qemu-aarch64")
    if qemu is None:
        raise ToolchainNotFoundError("qemu-aarch64 is not on PATH; install the Debian package "
                                     "qemu-user")
    if not (AARCH64_SYSROOT / "lib" / "libc.so.6").exists():
        raise ToolchainNotFoundError(f"{AARCH64_SYSROOT} has no libc.so.6; install the Debian "
                                     "package g++-aarch64-linux-gnu (it brings libc6-arm64-cross)")
    return [qemu, "-L", str(AARCH64_SYSROOT)] + (["-cpu", cpu] if cpu else [])


def run_emulated(lib_path: str | Path, inputs: Sequence[np.ndarray], target: str = "linux-arm64",
                 *, func: str = "main", timeout: float = 300, env: dict | None = None,
                 cpu: str | None = None) -> list[np.ndarray]:
    """Run function ``func`` of the exported Relax library ``lib_path`` under qemu; return its outputs.

    Args:
        lib_path: a library from ``cross.export_library(exe, path, target)``.
        inputs: the function's arguments, in order (C-contiguous copies are written as .npy).
        target: the target the library was built for (an aarch64 one).
        env: extra environment for the device process (e.g. ``{"TVM_NUM_THREADS": "2"}``).
        cpu: the qemu CPU model to emulate (``qemu_command``); None is qemu's ``max``.

    Returns:
        The flattened outputs (a tuple result becomes several arrays).

    Raises:
        EmulationError: the program failed; its ``signal`` is 4 when the CPU lacks an instruction.
    """
    cmd = qemu_command(target, cpu) + [str(build_loader("linux-arm64"))]
    libs = [str(fetch_arm64_runtime())]
    with tempfile.TemporaryDirectory(prefix="bitfx-qemu-") as tmp:
        tmp = Path(tmp)
        if get_target(target).is_android:
            libs.append(str(_bionic_shim(tmp / "shim")))
        args = []
        for i, x in enumerate(inputs):
            np.save(tmp / f"input_{i}.npy", np.ascontiguousarray(x))
            args.append(str(tmp / f"input_{i}.npy"))
        run_env = {**os.environ, **(env or {}), "LD_LIBRARY_PATH": ":".join(libs)}
        proc = subprocess.run(cmd + [str(Path(lib_path).resolve()), str(tmp)] + args +
                              ["--func", func], capture_output=True, text=True, env=run_env,
                              timeout=timeout)
        if proc.returncode != 0:
            raise EmulationError(f"{Path(lib_path).name} failed under qemu{f' -cpu {cpu}' if cpu else ''}"
                                 f" ({proc.returncode}):\n{proc.stdout}{proc.stderr}",
                                 proc.returncode, proc.stdout + proc.stderr)
        outs = sorted(tmp.glob("output_*.npy"), key=lambda p: int(p.stem.split("_")[1]))
        return [np.load(p) for p in outs]


def _bionic_shim(shim: Path) -> Path:
    """Links named like bionic's sonames to glibc's libraries in the aarch64 sysroot."""
    _mkdir(shim)
    for bionic, glibc in _BIONIC_TO_GLIBC.items():
        (shim / bionic).symlink_to(AARCH64_SYSROOT / "lib" / glibc)
    return shim


def _cross_cxx() -> str:
    cxx = os.environ.get("BITFX_AARCH64_CXX") or shutil.which("aarch64-linux-gnu-g++")
    if cxx is None:
        raise ToolchainNotFoundError("building the arm64 loader needs aarch64-linux-gnu-g++; "
                                     "install the Debian package g++-aarch64-linux-gnu")
    return cxx


def _compiler_file(cc: str, name: str) -> str:
    """``cc -print-file-name=name``: a start file of the compiler's (sysroot) installation."""
    found = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    if not Path(found).is_file():
        raise ToolchainNotFoundError(f"{cc} has no {name} (got {found!r}); is its libc6-dev installed?")
    return found


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
