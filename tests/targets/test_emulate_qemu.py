"""The toy model (nn.Linear + a custom op via custom_convert_map) exported for arm64 and run under qemu."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

from bitfx.targets import emulate
from bitfx.targets._elf import EM_AARCH64, ET_DYN, read_elf
from target_tools import needs_clang, needs_gnu, needs_qemu


def _arm64(test):
    """Builds arm64 code and runs it: needs the cross compiler and qemu."""
    return needs_gnu(needs_qemu(test))


def test_runtime_fetch_gives_aarch64_libraries(arm64_runtime):
    for lib in emulate.RUNTIME_LIBS:
        info = read_elf(arm64_runtime / lib)
        assert (info.machine, info.type, info.soname) == (EM_AARCH64, ET_DYN, lib)


def test_runtime_dir_override_must_hold_both_libraries(monkeypatch, tmp_path):
    monkeypatch.setenv("BITFX_ARM64_RUNTIME_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="libtvm_runtime.so"):
        emulate.fetch_arm64_runtime()


@_arm64
def test_linux_arm64_toy_matches_torch(toy, toy_libs, arm64_runtime):
    _, x, expected = toy
    info = read_elf(toy_libs["linux-arm64"])
    assert (info.machine, info.type) == (EM_AARCH64, ET_DYN)
    (out,) = emulate.run_emulated(toy_libs["linux-arm64"], [x], "linux-arm64")
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@_arm64
@needs_clang
def test_android_arm64_toy_runs_under_glibc_qemu(toy, toy_libs, arm64_runtime):
    # bionic sonames (libc.so, libm.so, libdl.so) are mapped to glibc's by run_emulated.
    _, x, expected = toy
    (out,) = emulate.run_emulated(toy_libs["android-arm64"], [x], "android-arm64")
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_armv7_has_no_emulator():
    with pytest.raises(ValueError, match="aarch64"):
        emulate.qemu_command("android-armv7")


@pytest.fixture(scope="module")
def loader(arm64_runtime):
    return emulate.build_loader("linux-arm64")


def _run_loader(loader, arm64_runtime, *args):
    env = {**os.environ, "LD_LIBRARY_PATH": str(arm64_runtime)}
    return subprocess.run(emulate.qemu_command() + [str(loader), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120)


@_arm64
def test_loader_is_an_arm64_program_linked_to_the_runtime(loader):
    info = read_elf(loader)
    assert info.machine == EM_AARCH64
    assert {"libtvm_runtime.so", "libtvm_ffi.so"} <= set(info.needed)


@_arm64
def test_loader_reads_raw_inputs_and_times(toy, toy_libs, loader, arm64_runtime, tmp_path):
    _, x, expected = toy
    raw = tmp_path / "x.bin"
    raw.write_bytes(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    proc = _run_loader(loader, arm64_runtime, toy_libs["linux-arm64"], tmp_path,
                       f"{raw}:float32:{x.shape[0]}x{x.shape[1]}", "--repeat", "3")
    assert proc.returncode == 0, proc.stderr
    assert "mean_ms=" in proc.stdout
    np.testing.assert_allclose(np.load(tmp_path / "output_0.npy"), expected, rtol=1e-5, atol=1e-5)


@_arm64
def test_loader_errors_name_the_problem(toy_libs, loader, arm64_runtime, tmp_path):
    proc = _run_loader(loader, arm64_runtime, tmp_path / "missing.so", tmp_path)
    assert proc.returncode == 1 and "missing.so" in proc.stderr
    bad = tmp_path / "short.bin"
    bad.write_bytes(b"\0" * 12)
    proc = _run_loader(loader, arm64_runtime, toy_libs["linux-arm64"], tmp_path,
                       f"{bad}:float32:3x32")
    assert proc.returncode == 1 and "12 bytes of data, shape needs 384" in proc.stderr
    proc = _run_loader(loader, arm64_runtime, toy_libs["linux-arm64"], tmp_path, "--func", "nope")
    assert proc.returncode == 1 and "no function 'nope'" in proc.stderr


@needs_gnu
def test_loader_built_from_several_threads_at_once(arm64_runtime, tmp_path, monkeypatch):
    """verify runs its qemu jobs on threads; each asks for the loader. With an empty cache they all
    built it under one temporary name and all but one rename failed (FileNotFoundError, seen in CI)."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("BITFX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("BITFX_ARM64_RUNTIME_DIR", str(arm64_runtime))  # the loader is under test, not pip
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: emulate.build_loader("linux-arm64"), range(4)))
    assert len(set(paths)) == 1 and paths[0].exists()
    assert read_elf(paths[0]).machine == EM_AARCH64
    assert not [p for p in paths[0].parent.iterdir() if p.name.startswith(".")]  # no partial left behind
