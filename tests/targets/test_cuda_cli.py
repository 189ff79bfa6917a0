"""``bitfx kernels``: the CUDA source and PTX (CUDA targets) or assembly (LLVM targets) of an op at a shape."""
import shutil

import pytest

from bitfx import cli
from bitfx.targets import cuda
from bitfx.targets.show import kernel_specs, parse_shape

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed")


@needs_nvcc
def test_cuda_bit_linear_writes_source_and_ptx(tmp_path, capsys):
    assert cli.main(["kernels", "--target", "cuda-sm90", "--op", "bit_linear", "--shape", "128x768x3072",
                     "-o", str(tmp_path)]) == 0
    gemm_ptx = (tmp_path / "bit_linear_gemm.ptx").read_text()
    assert ".target sm_90" in gemm_ptx and cuda.MMA_INSTRUCTION in gemm_ptx
    assert "ptx_legacy" not in (tmp_path / "bit_linear_gemm.cu").read_text()  # lowered to inline PTX
    assert "mma.sync.aligned.m16n8k256" in (tmp_path / "bit_linear_gemm.cu").read_text()
    assert "__ballot_sync" in (tmp_path / "pack_sign.cu").read_text()
    assert "0 bytes spill stores" in (tmp_path / "bit_linear_gemm.ptxas.txt").read_text()
    assert "bit_linear_gemm  cuda      sm_90:" in capsys.readouterr().out


@needs_nvcc
def test_cuda_decode_uses_the_cuda_core_kernel(tmp_path):
    assert cli.main(["kernels", "--target", "cuda-sm90", "--op", "bit_linear", "--shape", "1x768x3072",
                     "-o", str(tmp_path)]) == 0
    ptx = (tmp_path / "bit_linear_gemm.ptx").read_text()
    assert "popc.b64" in ptx and "mma.sync" not in ptx


def test_arm64_writes_neon_assembly(tmp_path):
    assert cli.main(["kernels", "--target", "linux-arm64", "--op", "bit_linear", "--shape", "1x768x768",
                     "-o", str(tmp_path)]) == 0
    asm = (tmp_path / "bit_linear_gemm.s").read_text()
    assert "\tcnt\t" in asm and ".16b" in asm  # NEON byte popcount


def test_attention_runs_five_kernels_with_the_runtime_parameters():
    specs = kernel_specs("bit_attention", (128, 128, 64))
    assert [s.op for s in specs] == ["pack_rows", "gemm", "pack_rows", "pack_cols", "gemm"]
    assert specs[1].params == dict(mode="xnor", K=64, N=None, batched=True)
    assert specs[4].params == dict(mode="and", K=None, N=64, signed=False, batched=True)


def test_bad_arguments_are_named(tmp_path, capsys):
    with pytest.raises(ValueError, match="'12x3' is not three positive sizes"):
        parse_shape("12x3")
    assert cli.main(["kernels", "--target", "cuda-sm75", "--op", "bit_linear", "--shape", "1x64x64",
                     "-o", str(tmp_path)]) == 2
    assert "unknown target 'cuda-sm75'" in capsys.readouterr().err
    assert cli.main(["kernels", "--target", "host", "--op", "bit_linear", "--shape", "1x64x64", "--act", "absmax",
                     "--bits", "9", "-o", str(tmp_path)]) == 1
    assert "bits in 2..8; got 9" in capsys.readouterr().err


@needs_nvcc
def test_device_export_for_a_cuda_machine_builds_here(tmp_path):
    """TVM builds a CUDA device library without a driver: the kernels travel as CUDA C++ (compiled on load)."""
    import torch

    import bitfx
    from bitfx.targets import _elf, cross
    from tests.models import MLP

    torch.manual_seed(0)
    path = bitfx.export(MLP().eval(), (torch.randn(4, 16),), "cuda-sm90", tmp_path / "mlp.so", bundle=False)
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and int.from_bytes(data[18:20], "little") == _elf.EM_X86_64
    assert cuda.MMA_INSTRUCTION.encode() in data and b"__ballot_sync" in data
    assert cross.get_target("jetson-orin").kernels == "cuda"


@needs_nvcc
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None, reason="needs g++-aarch64-linux-gnu")
def test_device_export_for_jetson_links_for_aarch64(tmp_path):
    import torch

    import bitfx
    from bitfx.targets import _elf
    from tests.models import MLP

    torch.manual_seed(0)
    path = bitfx.export(MLP().eval(), (torch.randn(4, 16),), "jetson-orin", tmp_path / "mlp.so", bundle=False)
    data = path.read_bytes()
    assert int.from_bytes(data[18:20], "little") == _elf.EM_AARCH64
    assert cuda.MMA_INSTRUCTION.encode() in data
