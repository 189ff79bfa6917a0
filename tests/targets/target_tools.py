"""Skip marks for the cross-compile tests: each names the Debian package that provides the tool."""

import shutil

import pytest

needs_gnu = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                               reason="aarch64-linux-gnu-g++ missing (Debian g++-aarch64-linux-gnu)")
needs_qemu = pytest.mark.skipif(shutil.which("qemu-aarch64") is None,
                                reason="qemu-aarch64 missing (Debian qemu-user)")
needs_clang = pytest.mark.skipif(shutil.which("clang") is None or shutil.which("ld.lld") is None,
                                 reason="clang/ld.lld missing (Debian clang, lld)")
needs_llvm_tools = pytest.mark.skipif(shutil.which("llvm-nm") is None or
                                      shutil.which("llvm-readelf") is None,
                                      reason="llvm-nm/llvm-readelf missing (Debian llvm)")
