"""bitfx.export: binarized models as arm64 libraries (Relax + call_tir kernels), run under qemu."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bitfx
from bitfx.export import ExportError, export, to_relax, verify
from models import CASES
from targets.target_tools import needs_clang, needs_gnu, needs_qemu

ROOT = Path(__file__).resolve().parents[1]

needs_cli = pytest.mark.skipif(importlib.util.find_spec("bitfx.cli") is None,
                               reason="the bitfx command (bitfx/cli.py) is not in this checkout")


@pytest.fixture(scope="module")
def arm64_runtime():
    from bitfx.targets import emulate

    try:
        return emulate.fetch_arm64_runtime()
    except (RuntimeError, FileNotFoundError) as err:
        pytest.skip(f"aarch64 TVM runtime unavailable (offline?): {err}")


def _binarized(name: str, batch: int = 2, seq: int = 8):
    case = CASES[name]
    inputs = case.inputs(batch, seq)
    return case, bitfx.binarize(case.model(), inputs), inputs


@needs_gnu
@needs_qemu
@pytest.mark.parametrize("name", ["mlp", "encoder_layer", "bert"])
def test_linux_arm64_matches_host_model(name, tmp_path, arm64_runtime):
    case, gm, inputs = _binarized(name)
    path = export(gm, inputs, "linux-arm64", tmp_path / f"{name}.so", bundle=False)
    dynamic = to_relax.last_dynamic
    with torch.no_grad():
        expected = gm(*inputs)
    diff = verify(path, inputs, expected, "linux-arm64")
    assert diff <= 1e-4 * max(1.0, float(expected.abs().max()))
    if dynamic:  # one library serves another batch and sequence length
        other = case.inputs(3, 5)
        with torch.no_grad():
            assert verify(path, other, gm(*other), "linux-arm64") <= 1e-4 * max(1.0, float(gm(*other).abs().max()))
    print(f"{name}: max |device - host| = {diff:.3g}, symbolic shapes: {dynamic}")


def test_bit_linear_lowers_to_call_tir_of_the_kernels():
    _, gm, inputs = _binarized("mlp")
    text = to_relax(gm, inputs).script()
    assert text.count("bitfx_gemm_xnor") >= 3 and "bitfx_pack_sign" in text
    assert to_relax.last_dynamic is True


def test_bit_attention_integer_pieces_lower_to_call_tir():
    _, gm, inputs = _binarized("bert")
    text = to_relax(gm, inputs).script()
    assert "bitfx_sign_scores" in text and "bitfx_binary_pv" in text  # popcount kernels
    assert "R.nn.softmax" in text  # the float parts stay Relax ops


@needs_gnu
@needs_qemu
def test_export_binarizes_a_float_model_verifies_and_bundles(tmp_path, arm64_runtime):
    case = CASES["mlp"]
    path = export(case.model(), case.inputs(2, 4), "linux-arm64", tmp_path / "mlp.so", verify=True)
    assert path.is_file() and (tmp_path / "manifest.json").is_file() and (tmp_path / "loader.cc").is_file()


@needs_clang
def test_android_arm64_library(tmp_path):
    from bitfx.targets import _elf, cross

    _, gm, inputs = _binarized("mlp")
    path = export(gm, inputs, "android-arm64", tmp_path / "mlp.so", bundle=False)
    info = cross.check_android_library(path, "android-arm64")  # raises, listing every problem
    assert info.machine == _elf.EM_AARCH64 and "libc.so" in info.needed


@needs_clang
@needs_qemu
def test_android_arm64_library_runs_like_the_host_model(tmp_path):
    _, gm, inputs = _binarized("mlp")
    path = export(gm, inputs, "android-arm64", tmp_path / "mlp.so", bundle=False)
    with torch.no_grad():
        expected = gm(*inputs)
    assert verify(path, inputs, expected, "android-arm64") <= 1e-4 * max(1.0, float(expected.abs().max()))


@needs_gnu
@needs_qemu
@pytest.mark.parametrize("config", ["bitnet158", "bivit", "bibert"])
def test_presets_on_bert(config, tmp_path, arm64_runtime):
    # bitnet158: ternary weights, absmax 8-bit activations, float attention; bivit: amax in the
    # probability binarizer; bibert: boolean attention probabilities.
    case = CASES["bert"]
    inputs = case.inputs(2, 8)
    gm = bitfx.binarize(case.model(), inputs, config)
    path = export(gm, inputs, "linux-arm64", tmp_path / "bert.so", bundle=False)
    with torch.no_grad():
        expected = gm(*inputs)
    assert verify(path, inputs, expected, "linux-arm64") <= 1e-4 * max(1.0, float(expected.abs().max()))


def test_unknown_target_lists_known_targets(tmp_path):
    with pytest.raises(ValueError, match="known targets: .*linux-arm64"):
        export(torch.nn.Linear(4, 4), (torch.randn(2, 4),), "risc-v-toaster", tmp_path / "x.so")


class _Odd(torch.nn.Module):
    def forward(self, x):
        return torch.cummax(x, -1).values


class _WithOddOp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.odd = torch.nn.Linear(16, 16), _Odd()

    def forward(self, x):
        return self.odd(self.fc(x))


def test_unsupported_op_names_op_and_layer(tmp_path):
    inputs = (torch.randn(2, 4, 16),)
    gm = bitfx.binarize(_WithOddOp().eval(), inputs)
    with pytest.raises(ExportError, match=r"layer 'odd'.*cummax"):
        to_relax(gm, inputs)


FACTORY = '''
import torch

class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

def make():
    torch.manual_seed(0)
    return MLP().eval(), (torch.randn(2, 3, 16),)
'''


@needs_cli
@needs_gnu
@needs_qemu
def test_cli_export_verify(tmp_path, arm64_runtime):
    factory = tmp_path / "tiny.py"
    factory.write_text(FACTORY)
    out = tmp_path / "out" / "tiny.so"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "bitfx", "export", f"{factory}:make", "--target", "linux-arm64",
                           "-o", str(out), "--config", "bipft", "--verify"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.is_file() and "verified" in proc.stdout


@needs_cli
def test_cli_export_unknown_target_fails_cleanly(tmp_path):
    factory = tmp_path / "tiny.py"
    factory.write_text(FACTORY)
    from bitfx.cli import export_main

    assert export_main([f"{factory}:make", "--target", "nope", "-o", str(tmp_path / "x.so")]) == 1
