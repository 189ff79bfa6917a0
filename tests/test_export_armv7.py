"""android-armv7 (32-bit) exports a binarized model: TVM cannot lower the fused float loops there,
so the export builds them unfused and the library passes the Android checks."""
import torch

import bitfx
from bitfx.targets import cross
from targets.target_tools import needs_clang


@needs_clang
def test_android_armv7_export_builds_and_passes_the_elf_checks(tmp_path):
    m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32)).eval()
    path = bitfx.export(m, (torch.randn(4, 64),), target="android-armv7", path=tmp_path / "m.so", bundle=False)
    info = cross.check_android_library(path, "android-armv7")
    assert info is not None and path.stat().st_size > 10_000
