"""The Android bundle runs with no NDK and no sysroot: glibc's static dynamic linker starts the loader."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess

import numpy as np
import pytest

from bitfx.deploy import android_glibc, write_bundle
from bitfx.targets import _elf
from target_tools import needs_clang, needs_gnu, needs_qemu


@pytest.fixture(scope="module")
def android_bundle(toy, toy_libs, arm64_runtime, tmp_path_factory):
    if "android-arm64" not in toy_libs:
        pytest.skip("no android-arm64 library (clang missing)")
    _, x, _ = toy
    return write_bundle(toy_libs["android-arm64"], "android-arm64",
                        tmp_path_factory.mktemp("android") / "bundle", inputs=[x])


def _device_command(readme: str) -> list[str]:
    """The command the README tells `adb shell` to run in the bundle directory."""
    line = next(ln for ln in readme.splitlines() if "adb shell 'cd " in ln)
    inner = shlex.split(line)[-1]  # cd DIR && chmod ... && ./ld-linux-aarch64.so.1 ...
    return shlex.split(inner.split("&&")[-1])


@needs_gnu
@needs_qemu
@needs_clang
def test_android_bundle_runs_as_its_readme_says(android_bundle, toy, tmp_path):
    _, x, expected = toy
    readme = (android_bundle / "README.md").read_text()
    cmd = _device_command(readme)
    assert cmd[0] == "./ld-linux-aarch64.so.1" and "--repeat" in cmd
    pushed = re.search(r"adb push (.*) /data/local/tmp/bitfx/", readme).group(1).split()
    device = tmp_path / "device"  # only what the README pushes, as adb would place it
    device.mkdir()
    for name in pushed:
        shutil.copy2(android_bundle / name, device / name)
    # No -L sysroot, no LD_LIBRARY_PATH: everything comes from the pushed files. cortex-a53: ARMv8.0.
    proc = subprocess.run([shutil.which("qemu-aarch64"), "-cpu", "cortex-a53", *cmd], cwd=device,
                          capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"bitfx_loader: main mean_ms=[\d.]+ min_ms=[\d.]+ repeat=50", proc.stdout)
    np.testing.assert_allclose(np.load(device / "output_0.npy"), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.load(device / "input_0.npy"), x)


@needs_gnu
@needs_clang
def test_bridges_point_bionic_names_at_glibc(android_bundle):
    for bionic, glibc in android_glibc.BRIDGES.items():
        info = _elf.read_elf(android_bundle / bionic)
        assert (info.soname, info.needed) == (bionic, [glibc])
    model = _elf.read_elf(android_bundle / "android-arm64.so")
    assert {"libc.so", "libtvm_ffi.so"} <= set(model.needed)
    assert "libc.so.6" not in model.needed  # still a bionic library: the same file an app would load


def test_a_bionic_only_import_is_refused(tmp_path):
    # __errno is bionic's; glibc has __errno_location. A model importing it cannot run on glibc.
    lib = tmp_path / "fake_glibc.so"
    model = tmp_path / "model.so"
    if shutil.which("clang") is None or shutil.which("ld.lld") is None:
        pytest.skip("clang/ld.lld missing (Debian clang, lld)")
    (tmp_path / "lib.s").write_text(".globl expf\n.type expf,%function\nexpf:\nret\n")
    (tmp_path / "model.s").write_text(".text\n.globl f\nf:\nbl expf\nbl __errno\nret\n")
    base = ["clang", "--target=aarch64-linux-gnu", "-fuse-ld=lld", "-shared", "-nostdlib"]
    subprocess.run(base + ["-o", str(lib), str(tmp_path / "lib.s")], check=True)
    subprocess.run(base + ["-o", str(model), str(tmp_path / "model.s"), str(lib),
                           "-Wl,--unresolved-symbols=ignore-all"], check=True)
    with pytest.raises(android_glibc.AndroidBundleError, match=r"\['__errno'\]"):
        android_glibc.check_model_symbols(model, [lib])
    (tmp_path / "errno.s").write_text(".globl __errno\n.type __errno,%function\n__errno:\nret\n")
    subprocess.run(base + ["-o", str(tmp_path / "errno.so"), str(tmp_path / "errno.s")], check=True)
    android_glibc.check_model_symbols(model, [lib, tmp_path / "errno.so"])  # all defined: no error
