"""Run an ``android-arm64`` export on a phone with no NDK: the bundle brings its own glibc userland.

Android's kernel runs any static aarch64 executable; bionic is only needed by programs linked
against it. glibc's dynamic linker ``ld-linux-aarch64.so.1`` *is* a static executable, and
started directly it loads a program and its libraries from ``--library-path`` only:

    adb shell 'cd /data/local/tmp/bitfx && ./ld-linux-aarch64.so.1 --library-path . ./bitfx_loader \\
               model.so . input_0.npy input_1.npy --repeat 50'

so the bundle carries: that linker, glibc's ``libc.so.6``/``libm.so.6``/``libdl.so.2``/
``libpthread.so.0``, ``libstdc++.so.6``/``libgcc_s.so.1`` (the Debian aarch64 cross sysroot's),
the TVM runtime from the aarch64 wheels, the glibc ``bitfx_loader``, and three *bridge* libraries
named like bionic's (``libc.so``, ``libm.so``, ``libdl.so``) whose only content is a ``DT_NEEDED`` on
glibc's: the model, linked for bionic, finds its C functions through them. Every symbol the model
imports is checked against what the bundled libraries define (``check_model_symbols``).

Why not one static executable with the model linked in (``system-lib``): the TVM runtime exists
as shared libraries only (the wheels; no static archive, no source package to build one from), and
a static glibc program cannot ``dlopen`` shared libraries reliably. Checked here under
``qemu-aarch64`` with no sysroot (``tests/targets/test_deploy_android.py``), not on a phone.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from bitfx.targets import _elf, emulate

GLIBC_FILES = ("ld-linux-aarch64.so.1", "libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0",
               "libstdc++.so.6", "libgcc_s.so.1")
BRIDGES = {"libc.so": "libc.so.6", "libm.so": "libm.so.6", "libdl.so": "libdl.so.2"}
DEVICE_DIR = "/data/local/tmp/bitfx"
LINKER = "ld-linux-aarch64.so.1"


class AndroidBundleError(RuntimeError):
    """The glibc userland cannot run this model; the message names the symbols and the way out."""


def run_command(model: str, inputs: list[str], repeat: int = 50) -> list[str]:
    """The command to run in the bundle directory on the device (the README prints it)."""
    return [f"./{LINKER}", "--library-path", ".", "./bitfx_loader", model, ".", *inputs,
            "--repeat", str(repeat)]


def add_glibc_userland(out: Path, model: Path) -> list[str]:
    """Copy the glibc userland, runtime and loader into ``out``; build the bridges; return the names."""
    runtime = emulate.fetch_arm64_runtime()
    names = []
    for name in GLIBC_FILES:
        shutil.copyfile(emulate.AARCH64_SYSROOT / "lib" / name, out / name)  # follows symlinks
        names.append(name)
    for lib in emulate.RUNTIME_LIBS:
        shutil.copyfile(runtime / lib, out / lib)
        names.append(lib)
    shutil.copyfile(emulate.build_loader("linux-arm64"), out / "bitfx_loader")
    names.append("bitfx_loader")
    for name in (LINKER, "bitfx_loader"):
        (out / name).chmod(0o755)
    for bionic, glibc in BRIDGES.items():
        _build_bridge(out / bionic, bionic, emulate.AARCH64_SYSROOT / "lib" / glibc)
        names.append(bionic)
    check_model_symbols(model, [out / n for n in names if n != "bitfx_loader"])
    return names


def check_model_symbols(model: Path, libraries: list[Path]) -> None:
    """Every non-weak symbol ``model`` imports is defined by one of ``libraries``, or raise."""
    defined: set[str] = set()
    for lib in libraries:
        defined |= _elf.read_elf(lib).defined
    info = _elf.read_elf(model)
    if missing := sorted(n for n, bind in info.undefined.items() if bind != "WEAK" and n not in defined):
        raise AndroidBundleError(
            f"{model.name} imports {missing}, which the bundled glibc userland does not define "
            "(bionic-only functions): run it with an NDK-built TVM runtime instead (README, 'With an "
            "Android NDK'), or add the functions to bitfx/targets/_bionic.py only if glibc has them")


def _build_bridge(dest: Path, soname: str, glibc_lib: Path) -> None:
    cmd = [emulate._cross_cxx(), "-shared", "-nostdlib", f"-Wl,-soname,{soname}", "-Wl,--no-as-needed",
           str(glibc_lib), "-o", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the bridge {soname} failed:\n{proc.stderr}\ncommand: {' '.join(cmd)}")
