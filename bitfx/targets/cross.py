"""Device targets: the TVM target, the cross compiler that links it, and the checks on the result.

    from bitfx.targets import cross
    exe = cross.build_relax(mod, "linux-arm64")             # tvm.relax.build for the device
    cross.export_library(exe, "model.so", "linux-arm64")    # linked by aarch64-linux-gnu-g++

Targets (``list_targets()``):

- ``host``: this machine, LLVM tuned for the detected CPU (``mcpu``), the system C++ compiler.
- ``linux-arm64``: AArch64 Linux with glibc (Raspberry Pi 4/5, Jetson, Graviton), NEON;
  Debian package ``g++-aarch64-linux-gnu``.
- ``android-arm64``: Android API 24+ on any ARMv8-A phone (NEON only: Cortex-A53 class). With an NDK
  (``TVM_NDK_CC`` or ``ANDROID_NDK_HOME``) its clang links; without one, Debian's ``clang`` + ``lld``
  link the TVM objects against generated stubs of ``libc.so``/``libm.so``/``libdl.so`` and the TVM
  runtime (only the symbols the objects use, checked against bionic's export list), which records
  the same ``DT_NEEDED`` entries as an NDK link. Either way ``check_android_library`` runs on the result.
- ``android-armv7``: 32-bit ARMv7-A Android with NEON (stretch goal: see ``check_android_library``).
- ``linux-arm64-dotprod``, ``android-arm64-dotprod``: the same with ARMv8.2-A ``dotprod`` (``udot``/``sdot``),
  for cores that have it (Cortex-A55/A75 and later); asked for by name only, never by default.

Every link is followed by a check of the ELF it produced; every failure says what to install.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bitfx.targets import _bionic, _elf

ANDROID_API = 24
ANDROID_PAGE = 16384  # Android 15+ devices may use 16 KB pages; LOAD segments must allow it


class ToolchainNotFoundError(RuntimeError):
    """The compiler a target needs is not installed; the message says which package provides it."""


class AndroidLibraryError(RuntimeError):
    """A library built for Android would not load there; the message lists every reason."""


@dataclass(frozen=True)
class DeviceTarget:
    """One device kind bitfx can compile for.

    Attributes:
        name: registry key, e.g. ``"linux-arm64"``.
        triple: the LLVM target triple of the generated code.
        target: the TVM target as a dict (``tvm_target`` turns it into ``tvm.target.Target``).
        compiler: how the target's library is linked (see ``fcompile``).
        machine: the ELF ``e_machine`` expected in its libraries.
        kernels: the kernel set its bitfx ops run (``bitfx.targets.registry``); ops the set does
            not implement fall back to the reference compute.
    """

    name: str
    triple: str
    target: dict[str, Any] = field(compare=False)
    compiler: str
    machine: int
    description: str = ""
    kernels: str = "reference"

    @property
    def tvm_target(self):
        import tvm

        return tvm.target.Target(dict(self.target))

    @property
    def is_android(self) -> bool:
        return "android" in self.triple

    def fcompile(self) -> Callable | None:
        """The ``fcompile`` for ``export_library``; raises ToolchainNotFoundError if it is absent."""
        return _LINKERS[self.compiler](self)

    def export_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``Executable.export_library`` / ``Module.export_library``."""
        return {"fcompile": self.fcompile()}


_TARGETS: dict[str, DeviceTarget] = {}


def register_target(target: DeviceTarget) -> DeviceTarget:
    if target.name in _TARGETS:
        raise ValueError(f"device target {target.name!r} is already registered; pick another name")
    _TARGETS[target.name] = target
    return target


def list_targets() -> list[str]:
    return sorted(_TARGETS)


def get_target(name: str | DeviceTarget) -> DeviceTarget:
    """The registered DeviceTarget called ``name``; ValueError listing the known names if none."""
    if isinstance(name, DeviceTarget):
        return name
    try:
        return _TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown device target {name!r}; known targets: "
                         f"{', '.join(list_targets())}") from None


def build_relax(mod, target: str | DeviceTarget, **kwargs):
    """``tvm.relax.build(mod, target=...)`` for a device target; returns a ``tvm.runtime.Executable``."""
    from tvm import relax

    return relax.build(mod, target=get_target(target).tvm_target, **kwargs)


def export_library(exe, path: str | Path, target: str | DeviceTarget) -> Path:
    """Link ``exe`` (a built Relax Executable or TIR module) into one shared library at ``path``.

    Android libraries are checked with ``check_android_library`` after the link.
    """
    target = get_target(target)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    exe.export_library(str(path), **target.export_kwargs())
    if target.is_android:
        check_android_library(path, target)
    return path


# --- toolchains -----------------------------------------------------------------------------------

def _which(tool: str, target: DeviceTarget, provider: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise ToolchainNotFoundError(
            f"target {target.name!r} needs {tool!r}, which is not on PATH; {provider}")
    return found


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}\n"
                           f"command: {' '.join(cmd)}")


def _with_meta(fn: Callable, triple: str) -> Callable:
    fn.output_format = "so"
    fn.get_target_triple = lambda: triple
    return fn


def _host_linker(target: DeviceTarget) -> None:
    return None  # TVM's default: the system C++ compiler


def _gnu_linker(target: DeviceTarget) -> Callable:
    cxx = os.environ.get("BITFX_AARCH64_CXX") or _which(
        "aarch64-linux-gnu-g++", target,
        "install the Debian package g++-aarch64-linux-gnu, or set BITFX_AARCH64_CXX to a compiler")
    from tvm.support import cc

    def fcompile(output, objects, options=None):
        cc.create_shared(output, objects, options=list(options or []), cc=cxx)

    return _with_meta(fcompile, target.triple)


def _ndk_compiler(target: DeviceTarget) -> str | None:
    """The NDK clang for ``target``, from TVM_NDK_CC or ANDROID_NDK_HOME; None when neither is set."""
    if os.environ.get("TVM_NDK_CC"):
        return os.environ["TVM_NDK_CC"]
    ndk = os.environ.get("ANDROID_NDK_HOME")
    if not ndk:
        return None
    host = f"{platform.system().lower()}-x86_64"
    cc = Path(ndk) / "toolchains/llvm/prebuilt" / host / "bin" / f"{target.triple}{ANDROID_API}-clang"
    if not cc.exists():
        raise ToolchainNotFoundError(f"ANDROID_NDK_HOME={ndk} has no {cc.name} under "
                                     f"{cc.parent}; is it an NDK r21+ install?")
    return str(cc)


def _android_linker(target: DeviceTarget) -> Callable:
    ndk_cc = _ndk_compiler(target)
    if ndk_cc is None:
        clang = _which("clang", target, "install the Debian packages clang and lld, or set "
                       "ANDROID_NDK_HOME (or TVM_NDK_CC) to use an Android NDK")
        _which("ld.lld", target, "install the Debian package lld")
        base = [clang, f"--target={target.triple}{ANDROID_API}", "-fuse-ld=lld"]
    else:
        base = [ndk_cc]

    def fcompile(output, objects, options=None):
        objects = [objects] if isinstance(objects, str) else list(objects)
        sources = [o for o in objects if not o.endswith((".o", ".obj"))]
        if sources and ndk_cc is None:
            raise ToolchainNotFoundError(
                f"linking {sources} for {target.name} compiles C/C++ source, which needs the "
                "bionic headers of an Android NDK: set ANDROID_NDK_HOME")
        with tempfile.TemporaryDirectory(prefix="bitfx-android-") as tmp:
            extra, stubs = _write_stubs(base, objects, Path(tmp), target, bionic=ndk_cc is None)
            flags = ["-shared", "-fPIC", f"-Wl,-soname,{Path(output).name}",
                     f"-Wl,-z,max-page-size={ANDROID_PAGE}", "-Wl,--hash-style=both", f"-L{tmp}"]
            flags += ["-nostdlib"] if ndk_cc is None else []
            flags += [f"-l{lib[3:-3]}" for lib in stubs] + list(options or [])
            if os.environ.get("TVM_NDK_CC"):
                from tvm.support import ndk  # TVM's own NDK driver; it reads TVM_NDK_CC

                ndk.create_shared(output, objects + extra, options=flags + ["-lm"])
            else:
                _run(base + ["-o", output] + objects + extra + flags + ([] if ndk_cc is None else
                     ["-lm"]), f"linking {Path(output).name} for {target.name}")

    return _with_meta(fcompile, target.triple)


# ARM EHABI unwind tables name a personality routine even for C functions; the NDK links it
# from libunwind. TVM kernels never let a C++ exception through, so without an NDK a local trap
# (hidden, weak) stands in for it: reaching it means an exception crossed a kernel frame.
_ARM_EHABI_PERSONALITY = ("__aeabi_unwind_cpp_pr0", "__aeabi_unwind_cpp_pr1", "__aeabi_unwind_cpp_pr2")


def _write_stubs(base: list[str], objects: list[str], tmp: Path, target: DeviceTarget,
                 bionic: bool) -> tuple[list[str], list[str]]:
    """Stub shared libraries in ``tmp`` defining exactly the symbols the objects import.

    Linking against them makes lld record ``DT_NEEDED`` on the real library (libtvm_ffi.so,
    libtvm_runtime.so; without an NDK also bionic's libc.so, libm.so, libdl.so) with no NDK
    sysroot, so the Android linker finds the symbols even when an app dlopens the model
    RTLD_LOCAL. Symbols nobody provides are reported all at once.

    Returns:
        (extra objects to link, stub library file names to link against).
    """
    wanted: dict[str, str] = {}
    for obj in objects:
        if obj.endswith((".o", ".obj")):
            wanted.update(_elf.read_elf(obj).undefined)
    providers = dict(_bionic.BY_LIBRARY) if bionic else {}
    groups: dict[str, list[str]] = {lib: [] for lib in [*providers, *_bionic.TVM_LIBRARIES]}
    unknown, compat = [], []
    for name, bind in sorted(wanted.items()):
        tvm_lib = next((lib for lib, prefixes in _bionic.TVM_LIBRARIES.items()
                        if name.startswith(prefixes)), None)
        libc_lib = next((lib for lib, names in providers.items() if name in names), None)
        if bionic and target.machine == _elf.EM_ARM and name in _ARM_EHABI_PERSONALITY:
            compat.append(name)
        elif tvm_lib or libc_lib:
            groups[tvm_lib or libc_lib].append(name)
        elif bionic and bind != "WEAK":
            unknown.append(name)  # with an NDK, its libc/libm resolve the rest or lld says why
    if unknown:
        raise AndroidLibraryError(
            f"the {target.name} objects import {unknown}, which are not in bitfx's list of bionic "
            f"libc/libm/libdl exports (API {ANDROID_API}) nor TVM runtime symbols. Compiler "
            "runtime helpers (e.g. __aeabi_*, __emutls_*) need an NDK: set ANDROID_NDK_HOME. If "
            "bionic does export them, add them to bitfx/targets/_bionic.py.")
    extra = []
    if compat:
        extra.append(str(tmp / "arm_ehabi_compat.o"))
        asm = tmp / "arm_ehabi_compat.s"
        asm.write_text(".syntax unified\n.arm\n.text\n" + "".join(
            f".weak {n}\n.hidden {n}\n.type {n},%function\n{n}:\n" for n in compat) + "udf #0\n")
        _run(base + ["-c", "-o", extra[-1], str(asm)], "assembling the EHABI personality stub")
    stubs = [lib for lib, names in groups.items() if names or lib in providers]
    for lib in stubs:
        asm = tmp / f"{lib}.s"
        asm.write_text("".join(f".globl {n}\n.type {n},%function\n{n}:\n" for n in groups[lib]))
        _run(base + ["-shared", "-nostdlib", f"-Wl,-soname,{lib}", "-o", str(tmp / lib), str(asm)],
             f"building the stub {lib}")
    return extra, stubs


_LINKERS = {"host": _host_linker, "gnu": _gnu_linker, "android": _android_linker}


# --- checks ---------------------------------------------------------------------------------------

def check_android_library(path: str | Path, target: str | DeviceTarget = "android-arm64",
                          *, api: int = ANDROID_API) -> _elf.ElfInfo:
    """Check that ``path`` is a shared library Android's linker would load; return its ELF facts.

    Checks: the ELF class and machine of ``target``; a shared object; a ``DT_SONAME``; no text
    relocations (refused since API 23); LOAD segments aligned for 16 KB pages; no TLS segment
    (bionic before API 29 needs 64-byte TLS alignment that LLVM does not give by default);
    ``DT_NEEDED`` only bionic or TVM runtime libraries (never glibc's ``libc.so.6``); and every
    undefined symbol exported by bionic's libc/libm/libdl (``_bionic``) or the TVM runtime.
    Raises AndroidLibraryError listing every problem found.
    """
    target = get_target(target)
    info = _elf.read_elf(path)
    problems = []
    want_bits = 64 if target.machine == _elf.EM_AARCH64 else 32
    if info.machine != target.machine or info.bits != want_bits:
        problems.append(f"it is {info.bits}-bit {info.machine_name}, expected {want_bits}-bit "
                        f"{_elf.MACHINE_NAMES[target.machine]}")
    if info.type != _elf.ET_DYN:
        problems.append(f"it is an ELF {info.type_name}, not a shared object")
    if not info.soname:
        problems.append("it has no DT_SONAME")
    if info.textrel:
        problems.append("it has text relocations (rebuild the objects with -fPIC)")
    if any(a < ANDROID_PAGE for a in info.load_aligns):
        problems.append(f"LOAD segments aligned to {min(info.load_aligns)} bytes, below the 16 KB "
                        f"pages of Android 15+ devices (link with -Wl,-z,max-page-size={ANDROID_PAGE})")
    if info.has_tls and api < 29:
        problems.append("it has a TLS segment, which bionic before API 29 cannot align")
    allowed_needed = set(_bionic.BY_LIBRARY) | {"liblog.so", "libc++_shared.so", "libtvm_ffi.so",
                                                "libtvm_runtime.so"}
    if bad := [n for n in info.needed if n not in allowed_needed]:
        problems.append(f"DT_NEEDED {bad} are not Android system or TVM runtime libraries")
    bionic = _bionic.LIBC | _bionic.LIBM | _bionic.LIBDL
    missing = sorted(n for n, bind in info.undefined.items() if bind != "WEAK"
                     and n not in bionic and not n.startswith(_bionic.TVM_PREFIXES))
    if missing:
        problems.append(f"undefined symbols that neither bionic nor the TVM runtime provide: {missing}")
    if problems:
        raise AndroidLibraryError(f"{path} will not load on Android ({target.name}):\n- "
                                  + "\n- ".join(problems))
    return info


def _host_target() -> dict[str, Any]:
    try:
        from tvm.target import codegen

        return {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()}
    except Exception:  # noqa: BLE001 - no LLVM in this TVM build: a generic host target
        return {"kind": "llvm"}


class _HostTarget(DeviceTarget):
    """The host's ``mcpu`` is detected when first asked for, not at import."""

    @property
    def tvm_target(self):
        import tvm

        return tvm.target.Target(_host_target())


_HOST_MACHINE = {"x86_64": _elf.EM_X86_64, "aarch64": _elf.EM_AARCH64}.get(platform.machine(), 0)
register_target(_HostTarget("host", platform.machine(), {"kind": "llvm"}, "host", _HOST_MACHINE,
                            "this machine", kernels="host"))
register_target(DeviceTarget(
    "linux-arm64", "aarch64-linux-gnu",
    {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
    "gnu", _elf.EM_AARCH64, "AArch64 Linux (glibc), NEON", kernels="arm64"))
register_target(DeviceTarget(
    "android-arm64", "aarch64-linux-android",
    # ARMv8.0-A + NEON: runs on every arm64 phone (Cortex-A53 class); dotprod only by name below.
    {"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon"]},
    "android", _elf.EM_AARCH64, "Android API 24+, ARMv8.0-A (NEON)", kernels="arm64"))
register_target(DeviceTarget(
    "linux-arm64-dotprod", "aarch64-linux-gnu",
    {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]},
    "gnu", _elf.EM_AARCH64, "AArch64 Linux (glibc), ARMv8.2-A (NEON, dotprod)", kernels="arm64-dotprod"))
register_target(DeviceTarget(
    "android-arm64-dotprod", "aarch64-linux-android",
    # dotprod: ARMv8.2-A, every arm64 phone core since Cortex-A55/A75 (SIGILL on Cortex-A53/A72).
    {"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon", "+dotprod"]},
    "android", _elf.EM_AARCH64, "Android API 24+, ARMv8.2-A (NEON, dotprod)", kernels="arm64-dotprod"))
# CUDA machines: the bitfx ops run the "cuda" kernel set (b1 tensor cores); the float ops get TVM's GPU
# default schedules (dlight). The library carries the kernels as CUDA C++ that TVM's CUDA runtime compiles on
# the device when the library is loaded (tvm_callback_cuda_compile: NVRTC, or nvcc with
# TVM_CUDA_COMPILE_MODE=nvcc): the device needs the apache-tvm package (libtvm_runtime_cuda) and a CUDA driver.
for _name, _triple, _arch, _compiler, _machine, _what in (
        ("cuda-sm80", "x86_64-pc-linux-gnu", "sm_80", "host", _elf.EM_X86_64, "x86-64 Linux + CUDA, Ampere (A100)"),
        ("cuda-sm90", "x86_64-pc-linux-gnu", "sm_90", "host", _elf.EM_X86_64, "x86-64 Linux + CUDA, Hopper (H100/H200)"),
        ("jetson-orin", "aarch64-linux-gnu", "sm_87", "gnu", _elf.EM_AARCH64, "Jetson AGX/Orin (aarch64 + CUDA, sm_87)")):
    register_target(DeviceTarget(_name, _triple, {"kind": "cuda", "arch": _arch, "host": {"kind": "llvm", "mtriple": _triple}},
                                 _compiler, _machine, _what, kernels="cuda"))
register_target(DeviceTarget(
    "android-armv7", "armv7a-linux-androideabi",
    {"kind": "llvm", "mtriple": "armv7a-linux-androideabi", "mattr": ["+neon"]},
    "android", _elf.EM_ARM, "Android API 24+, 32-bit ARMv7-A with NEON"))
