"""The Linux bundle runs on the glibc its README promises: symbol versions of the loader and runtime."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from bitfx.deploy import symbol_versions
from bitfx.targets import emulate
from target_tools import needs_gnu

needs_objdump = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-objdump") is None,
                                   reason="aarch64-linux-gnu-objdump missing (Debian binutils-aarch64-linux-gnu)")


def _objdump_versions(path) -> set[str]:
    """The versions ``objdump -T`` prints for undefined symbols: an independent reading of the ELF."""
    out = subprocess.run(["aarch64-linux-gnu-objdump", "-T", str(path)], capture_output=True,
                         text=True, check=True).stdout
    return {m.group(1) for line in out.splitlines() if "*UND*" in line
            for m in [re.search(r"\((\w+_[\d.]+)\)", line)] if m}


@pytest.fixture(scope="module")
def loader(arm64_runtime):
    return emulate.build_loader("linux-arm64")


@needs_gnu
@needs_objdump
def test_loader_needs_nothing_newer_than_the_promised_systems(loader):
    assert symbol_versions.too_new(loader) == []
    found = {v for vs in symbol_versions.needed(loader).values() for v in vs}
    assert found == _objdump_versions(loader)
    assert "GLIBC_2.17" in found and "GLIBC_2.34" not in found
    assert max(symbol_versions.parse(v)[1] for v in found if v.startswith("GLIBCXX")) <= (3, 4, 25)


@needs_objdump
def test_runtime_libraries_fit_the_promise(arm64_runtime):
    # The wheels are manylinux_2_28; what the README states is what they really need.
    libs = [arm64_runtime / lib for lib in emulate.RUNTIME_LIBS]
    for lib in libs:
        assert symbol_versions.too_new(lib) == [], lib
        assert {v for vs in symbol_versions.needed(lib).values() for v in vs} == _objdump_versions(lib)
    assert symbol_versions.newest(libs) == {"CXXABI": "CXXABI_1.3.11", "GCC": "GCC_4.2.0",
                                            "GLIBC": "GLIBC_2.27", "GLIBCXX": "GLIBCXX_3.4.22"}


@needs_gnu
def test_a_plainly_linked_program_is_caught(tmp_path):
    # g++ 12's Scrt1.o binds __libc_start_main@GLIBC_2.34 (what the loader avoids): the check must see it.
    src = tmp_path / "hello.c"
    src.write_text("#include <stdio.h>\nint main(void) { puts(\"hi\"); return 0; }\n")
    subprocess.run(["aarch64-linux-gnu-gcc", str(src), "-o", str(tmp_path / "hello")], check=True)
    assert symbol_versions.too_new(tmp_path / "hello") == ["libc.so.6: GLIBC_2.34"]
    assert symbol_versions.too_new(tmp_path / "hello", {"GLIBC": (2, 34)}) == []


def test_version_names_parse():
    assert symbol_versions.parse("GLIBCXX_3.4.26") == ("GLIBCXX", (3, 4, 26))
    assert symbol_versions.parse("GLIBC_PRIVATE") is None
