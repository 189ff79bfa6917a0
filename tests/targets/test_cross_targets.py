"""Target registry, toolchain detection and its errors, the ELF reader, the Android library checks."""

from __future__ import annotations

import re
import subprocess

import pytest

import tvm
from bitfx.targets import cross
from bitfx.targets._elf import EM_AARCH64, EM_ARM, ET_DYN, read_elf
from target_tools import needs_clang, needs_gnu, needs_llvm_tools


def test_registry_lists_the_device_targets():
    assert {"host", "linux-arm64", "android-arm64", "android-armv7"} <= set(cross.list_targets())


def test_unknown_target_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown device target 'ios-arm64'") as err:
        cross.get_target("ios-arm64")
    for name in cross.list_targets():
        assert name in str(err.value)


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        cross.register_target(cross.get_target("linux-arm64"))


@pytest.mark.parametrize("name, triple, mattr", [
    ("linux-arm64", "aarch64-linux-gnu", ["+neon"]),
    ("android-arm64", "aarch64-linux-android", ["+neon"]),  # ARMv8.0 baseline (issue 9)
    ("linux-arm64-dotprod", "aarch64-linux-gnu", ["+neon", "+dotprod"]),
    ("android-arm64-dotprod", "aarch64-linux-android", ["+neon", "+dotprod"]),
    ("android-armv7", "armv7a-linux-androideabi", ["+neon"]),
])
def test_tvm_targets(name, triple, mattr):
    target = cross.get_target(name)
    assert target.triple == triple
    tvm_target = target.tvm_target
    assert str(tvm_target.attrs["mtriple"]) == triple
    assert list(tvm_target.attrs["mattr"]) == mattr


def test_host_target_carries_the_detected_cpu():
    assert cross.get_target("host").tvm_target.attrs["mcpu"] == \
        tvm.target.codegen.llvm_get_system_cpu()


@needs_gnu
def test_gnu_toolchain_detected():
    fcompile = cross.get_target("linux-arm64").fcompile()
    assert fcompile.get_target_triple() == "aarch64-linux-gnu"
    assert fcompile.output_format == "so"


@needs_clang
def test_android_toolchain_detected_without_ndk(monkeypatch):
    monkeypatch.delenv("ANDROID_NDK_HOME", raising=False)
    monkeypatch.delenv("TVM_NDK_CC", raising=False)
    assert cross.get_target("android-arm64").fcompile().get_target_triple() == \
        "aarch64-linux-android"


def test_missing_gnu_compiler_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("BITFX_AARCH64_CXX", raising=False)
    with pytest.raises(cross.ToolchainNotFoundError, match="g\\+\\+-aarch64-linux-gnu"):
        cross.get_target("linux-arm64").fcompile()


def test_missing_clang_names_package_and_ndk_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("ANDROID_NDK_HOME", raising=False)
    monkeypatch.delenv("TVM_NDK_CC", raising=False)
    with pytest.raises(cross.ToolchainNotFoundError, match="clang") as err:
        cross.get_target("android-arm64").fcompile()
    assert "ANDROID_NDK_HOME" in str(err.value)


def test_ndk_home_without_clang_says_what_was_expected(monkeypatch, tmp_path):
    monkeypatch.setenv("ANDROID_NDK_HOME", str(tmp_path))
    monkeypatch.delenv("TVM_NDK_CC", raising=False)
    with pytest.raises(cross.ToolchainNotFoundError, match="aarch64-linux-android24-clang"):
        cross.get_target("android-arm64").fcompile()


@needs_llvm_tools
def test_elf_reader_agrees_with_llvm_tools(toy_libs):
    if "android-arm64" not in toy_libs:
        pytest.skip("no android-arm64 library (clang missing)")
    path = toy_libs["android-arm64"]
    info = read_elf(path)
    nm = subprocess.run(["llvm-nm", "-D", "--undefined-only", str(path)], capture_output=True,
                        text=True, check=True).stdout.split()
    assert set(info.undefined) == {w for w in nm if w not in ("U", "w")}
    dyn = subprocess.run(["llvm-readelf", "-d", str(path)], capture_output=True, text=True,
                         check=True).stdout
    assert info.needed == re.findall(r"Shared library: \[(.+?)\]", dyn)
    assert info.soname == re.search(r"Library soname: \[(.+?)\]", dyn).group(1)


@needs_clang
def test_android_arm64_library_passes_the_checks(toy_libs):
    info = cross.check_android_library(toy_libs["android-arm64"], "android-arm64")
    assert (info.bits, info.machine, info.type) == (64, EM_AARCH64, ET_DYN)
    assert info.needed == ["libc.so", "libm.so", "libdl.so", "libtvm_ffi.so"]
    assert all(a >= cross.ANDROID_PAGE for a in info.load_aligns)
    assert set(info.undefined) <= {"TVMFFIErrorSetRaisedFromCStrParts"}


@needs_clang
def test_android_armv7_library_is_32_bit_arm(toy_libs):
    info = cross.check_android_library(toy_libs["android-armv7"], "android-armv7")
    assert (info.bits, info.machine) == (32, EM_ARM)


@needs_gnu
def test_glibc_library_fails_the_android_checks(toy_libs):
    with pytest.raises(cross.AndroidLibraryError, match="no DT_SONAME"):
        cross.check_android_library(toy_libs["linux-arm64"], "android-arm64")


def test_host_library_fails_the_android_checks(toy, tmp_path):
    mod, _, _ = toy
    path = cross.export_library(cross.build_relax(mod, "host"), tmp_path / "host.so", "host")
    with pytest.raises(cross.AndroidLibraryError, match="expected 64-bit AArch64"):
        cross.check_android_library(path, "android-arm64")


@needs_clang
def test_symbol_outside_bionic_is_reported_at_link(tmp_path):
    from tvm.script import tirx as T

    @T.prim_func
    def calls_unknown(x: T.Buffer((4,), "float32")):
        T.func_attr({"global_symbol": "calls_unknown", "tir.noalias": True})
        for i in range(4):
            x[i] = T.call_extern("float32", "bitfx_not_in_bionic", x[i])

    lib = tvm.compile(tvm.IRModule({"calls_unknown": calls_unknown}),
                      target=cross.get_target("android-arm64").tvm_target)
    with pytest.raises(cross.AndroidLibraryError, match="bitfx_not_in_bionic"):
        cross.export_library(lib, tmp_path / "bad.so", "android-arm64")


@needs_clang
def test_libm_call_links_against_bionic_libm(tmp_path):
    from tvm.script import tirx as T

    @T.prim_func
    def calls_libm(x: T.Buffer((4,), "float32")):
        T.func_attr({"global_symbol": "calls_libm", "tir.noalias": True})
        for i in range(4):
            x[i] = T.call_extern("float32", "erff", x[i])

    lib = tvm.compile(tvm.IRModule({"calls_libm": calls_libm}),
                      target=cross.get_target("android-arm64").tvm_target)
    path = cross.export_library(lib, tmp_path / "libm_user.so", "android-arm64")
    info = read_elf(path)
    assert "erff" in info.undefined and "libm.so" in info.needed


def _fake_ndk(root):
    """An NDK-shaped tree whose clang is Debian clang on a sysroot of empty bionic stubs."""
    sysroot = root / "sysroot"
    sysroot.mkdir(parents=True)
    for lib in ("libc.so", "libm.so", "libdl.so"):
        (sysroot / f"{lib}.s").write_text("")
        subprocess.run(["clang", "--target=aarch64-linux-android24", "-fuse-ld=lld", "-shared", "-nostdlib",
                        f"-Wl,-soname,{lib}", "-o", str(sysroot / lib), str(sysroot / f"{lib}.s")],
                       check=True)
    bindir = root / "toolchains/llvm/prebuilt/linux-x86_64/bin"
    bindir.mkdir(parents=True)
    cc = bindir / "aarch64-linux-android24-clang"
    cc.write_text("#!/bin/sh\nexec clang --target=aarch64-linux-android24 -fuse-ld=lld -nostdlib "
                  f"-L{sysroot} \"$@\"\n")
    cc.chmod(0o755)
    return cc


@needs_clang
@pytest.mark.parametrize("variable", ["ANDROID_NDK_HOME", "TVM_NDK_CC"])
def test_ndk_link_path(variable, toy, monkeypatch, tmp_path):
    cc = _fake_ndk(tmp_path / "ndk")
    monkeypatch.delenv("ANDROID_NDK_HOME", raising=False)
    monkeypatch.delenv("TVM_NDK_CC", raising=False)
    monkeypatch.setenv(variable, str(tmp_path / "ndk") if variable == "ANDROID_NDK_HOME" else str(cc))
    mod, _, _ = toy
    path = cross.export_library(cross.build_relax(mod, "android-arm64"), tmp_path / "m.so",
                                "android-arm64")
    info = read_elf(path)
    assert info.needed == ["libtvm_ffi.so", "libm.so"] and info.soname == "m.so"
