"""benchmarks/arm_profile.py: its TCG plugin counts dynamic instructions exactly; names map to kernels."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from target_tools import needs_gnu, needs_qemu

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("arm_profile", ROOT / "benchmarks" / "arm_profile.py")
arm_profile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(arm_profile)


def _header() -> Path | None:
    """qemu-plugin.h where arm_profile looks, without downloading (the benchmark fetches it)."""
    from bitfx.targets import emulate

    candidates = [os.environ.get("BITFX_QEMU_PLUGIN_H"), "/usr/include/qemu", "/usr/include",
                  *(str(d) for d in (emulate.cache_dir() / "qemu-plugin").glob("qemu-*"))]
    for d in filter(None, candidates):
        d = Path(d)
        d = d.parent if d.name == "qemu-plugin.h" else d
        if (d / "qemu-plugin.h").is_file():
            return d
    return None


needs_header = pytest.mark.skipif(_header() is None, reason="qemu-plugin.h not found (run "
                                  "benchmarks/arm_profile.py once: it extracts it from Debian's qemu "
                                  "source package), or set BITFX_QEMU_PLUGIN_H")

# mov; then 1000 x (subs; b.ne); then the exit syscall: 1 + 2000 + 2 = 2003 instructions.
_LOOP = """.text
.globl _start
_start:
    mov x0, #1000
loop:
    subs x0, x0, #1
    b.ne loop
    mov x8, #93
    svc #0
"""


@needs_gnu
@needs_qemu
@needs_header
def test_plugin_counts_every_executed_instruction(tmp_path):
    from bitfx.targets import emulate

    plugin = arm_profile.build_plugin(_header(), tmp_path)
    (tmp_path / "loop.s").write_text(_LOOP)
    subprocess.run(["aarch64-linux-gnu-gcc", "-nostdlib", "-static", str(tmp_path / "loop.s"), "-o",
                    str(tmp_path / "loop")], check=True)
    out = tmp_path / "blocks.txt"
    subprocess.run(emulate.qemu_command("linux-arm64", "cortex-a53") +
                   ["-plugin", f"{plugin},out={out}", str(tmp_path / "loop")], check=True)
    blocks = [tuple(int(v, 16 if i == 0 else 10) for i, v in enumerate(ln.split()))
              for ln in out.read_text().splitlines()]
    assert sum(n * execs for _, n, execs in blocks) == 2003
    # The loop body is one block (subs; b.ne) entered 999 times after the first pass.
    assert max(execs for _, _, execs in blocks) == 999


def test_kernel_names_and_categories():
    k = arm_profile.kernel_name
    assert k("__tvm_ffi_reshape12") == "reshape" and k("layer_norm3_compute_") == "layer_norm"
    assert k("bitfx_gemm_xnor_sign1_k768_n3072_bias_compute_") == "bitfx_gemm_xnor_sign1_k768_n3072_bias"
    cat = arm_profile.category
    assert cat("/x/model.so", "bitfx_gemm_xnor_sign1_k768_n768_bias", "model.so") == "binary GEMM"
    assert cat("/lib/libm.so.6", "erff", "model.so") == "GELU"
    assert cat("/lib/libm.so.6", "expf", "model.so") == arm_profile.LIBM
    assert cat("/x/libtvm_runtime.so", "TVMBackendParallelLaunch", "model.so") == arm_profile.RUNTIME
    assert cat("/x/model.so", "bitfx_pack_sign_sign1_k768_n768", "model.so") == "packing / absmax planes"
    assert cat("/x/model.so", "softmax", "model.so") == "softmax"
    assert cat("/x/model.so", "add", "model.so") == "other float ops"


@pytest.mark.skipif(shutil.which("llvm-mca") is None, reason="llvm-mca missing (Debian llvm)")
def test_mca_reads_a_self_loop():
    asm = ["L:", "\tsubs x0, x0, #1", "\tadd x1, x1, x2", "\tb.ne L"]
    cycles = arm_profile.mca_cycles("llvm-mca", asm, "cortex-a55")
    assert cycles is not None and 1.0 <= cycles <= 4.0  # 3 instructions, dual issue on an A55
