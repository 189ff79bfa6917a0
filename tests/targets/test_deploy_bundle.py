"""Device bundles: contents, manifest, README, and the bundled loader running under qemu by itself."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess

import numpy as np
import pytest

from bitfx.deploy import render_readme, write_bundle
from bitfx.targets import emulate
from target_tools import needs_clang, needs_gnu, needs_qemu


@needs_gnu
@needs_qemu
def test_linux_arm64_bundle_runs_from_its_own_directory(toy, toy_libs, arm64_runtime, tmp_path):
    _, x, expected = toy
    bundle = write_bundle(toy_libs["linux-arm64"], "linux-arm64", tmp_path / "bundle")
    names = {p.name for p in bundle.iterdir()}
    assert {"linux-arm64.so", "libtvm_runtime.so", "libtvm_ffi.so", "bitfx_loader", "loader.cc",
            "glibc_start.c", "README.md", "manifest.json"} <= names

    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["triple"] == "aarch64-linux-gnu"
    assert manifest["versions"] == emulate.runtime_versions()
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((bundle / name).read_bytes()).hexdigest() == entry["sha256"]

    # No LD_LIBRARY_PATH: the loader finds the bundled runtime through its $ORIGIN rpath.
    np.save(tmp_path / "input_0.npy", x)
    proc = subprocess.run(emulate.qemu_command(cpu="cortex-a53") + [str(bundle / "bitfx_loader"),
                          str(bundle / "linux-arm64.so"), str(tmp_path), str(tmp_path / "input_0.npy")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(tmp_path / "output_0.npy"), expected, rtol=1e-5, atol=1e-5)

    readme = (bundle / "README.md").read_text()
    # The README's command, in the directory it copies to (the board: the sysroot's glibc).
    bundle2 = write_bundle(toy_libs["linux-arm64"], "linux-arm64", tmp_path / "b2", inputs=[x])
    readme2 = (bundle2 / "README.md").read_text()
    copied = re.search(r"scp (.*) board:bitfx/", readme2).group(1).split()
    board = tmp_path / "board"
    board.mkdir()
    for name in copied:
        shutil.copy2(bundle2 / name, board / name)
    command = shlex.split(re.search(r"ssh board 'cd bitfx && (.*)'", readme2).group(1))
    proc = subprocess.run(emulate.qemu_command(cpu="cortex-a53") + command, cwd=board,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"bitfx_loader: main mean_ms=[\d.]+ min_ms=[\d.]+ repeat=50", proc.stdout)
    np.testing.assert_allclose(np.load(board / "output_0.npy"), expected, rtol=1e-5, atol=1e-5)
    assert "-L /usr/aarch64-linux-gnu ./bitfx_loader" in readme
    assert "rpc_tracker" in readme and "adb" not in readme
    # What the README says the files need is what they need (read from their ELF symbol versions).
    assert "need, at most: CXXABI_1.3.11, GCC_4.2.0, GLIBC_2.27, GLIBCXX_3.4.22 " in readme


@needs_clang
def test_android_bundle_without_runtime_points_at_the_ndk(toy_libs, tmp_path):
    # The runnable (glibc userland) bundle is tested in test_deploy_android.py.
    bundle = write_bundle(toy_libs["android-arm64"], "android-arm64", tmp_path / "bundle",
                          include_runtime=False)
    names = {p.name for p in bundle.iterdir()}
    assert "libtvm_runtime.so" not in names and "bitfx_loader" not in names
    readme = (bundle / "README.md").read_text()
    assert "**not** included" in readme and "aarch64-linux-android24-clang++" in readme
    assert "arm64-v8a" in readme and "<!--" not in readme and "{{" not in readme


@needs_clang
def test_armv7_bundle_says_what_is_missing(toy_libs, tmp_path):
    bundle = write_bundle(toy_libs["android-armv7"], "android-armv7", tmp_path / "bundle")
    assert "bitfx_loader" not in {p.name for p in bundle.iterdir()}
    assert "No runtime libraries or loader are bundled for android-armv7" in (bundle / "README.md").read_text()


def test_readme_fields_must_all_be_filled():
    with pytest.raises(KeyError, match="README template fields without a value"):
        render_readme({"model": "m.so"}, android=False)


def test_missing_model_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no exported model"):
        write_bundle(tmp_path / "absent.so", "linux-arm64")
