"""The ``bitfx`` command: ``diff`` end to end in a subprocess, the MODULE:FACTORY loader, delegation."""
import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from bitfx import cli

ROOT = Path(__file__).resolve().parents[1]

FACTORIES = textwrap.dedent("""
    import torch
    import torch.nn as nn

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)).eval(), (torch.randn(2, 8, 64),)

    def norm_only():
        return nn.Sequential(nn.LayerNorm(16), nn.ReLU()).eval(), (torch.randn(2, 16),)

    def broken():
        raise RuntimeError("no weights here")

    def not_a_pair():
        return nn.ReLU()

    class DataDependent(nn.Module):
        def forward(self, x):
            return x if x.sum().item() > 0 else -x

    def untraceable():
        return DataDependent(), (torch.randn(4),)

    LIMIT = 3
""")


@pytest.fixture
def factories(tmp_path):
    path = tmp_path / "factories.py"
    path.write_text(FACTORIES)
    return path


def bitfx_cmd(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "bitfx.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=300)


# -- bitfx diff in a subprocess ---------------------------------------------------------------
def test_diff_writes_json_and_html(factories, tmp_path):
    out_json, out_html = tmp_path / "d.json", tmp_path / "d.html"
    r = bitfx_cmd("diff", f"{factories}:mlp", "--config", "bit", "--json", out_json, "--html", out_html)
    assert r.returncode == 0, r.stderr
    assert "2 linear → bit_linear" in r.stdout
    doc = json.loads(out_json.read_text())
    assert doc["config"]["method"] == "bit" and doc["totals"]["rewritten"]["linear"] == 2
    assert out_html.read_text().count('class="graph graph-') == 2


def test_diff_nothing_to_rewrite_exits_0(factories):
    r = bitfx_cmd("diff", f"{factories}:norm_only")
    assert r.returncode == 0, r.stderr
    assert "nothing to rewrite" in r.stdout


def test_diff_bad_factory_names_module_and_error():
    r = bitfx_cmd("diff", "no_such_module_xyz.models:make")
    assert r.returncode != 0
    assert "no_such_module_xyz" in r.stderr and "ModuleNotFoundError" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_python_dash_m_bitfx_is_the_cli():
    r = subprocess.run([sys.executable, "-m", "bitfx", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and all(c in r.stdout for c in ("demo", "diff", "export", "bench"))


# -- the loader and error messages, in process ------------------------------------------------
def test_load_factory_by_path_and_by_module_name(factories, monkeypatch):
    model, inputs = cli.load_model(f"{factories}:mlp")
    assert isinstance(inputs, tuple) and inputs[0].shape == (2, 8, 64)
    monkeypatch.syspath_prepend(str(factories.parent))
    assert cli.load_factory("factories:mlp").__name__ == "mlp"


@pytest.mark.parametrize("spec, message", [
    ("factories_no_colon", "is not MODULE:FACTORY"),
    ("{dir}/missing.py:make", "no such file"),
    ("{path}:nope", "has no factory 'nope' (defined in it: DataDependent, broken, mlp, norm_only, not_a_pair, "
                    "untraceable)"),
    ("{path}:LIMIT", "'LIMIT' is not callable (it is int 3)"),
    ("{path}:broken", "RuntimeError: no weights here"),
    ("{path}:not_a_pair", "must return (model, example_inputs), got ReLU"),
])
def test_factory_errors_say_what_and_why(factories, spec, message):
    with pytest.raises(cli.FactoryError) as err:
        cli.load_model(spec.format(path=factories, dir=factories.parent))
    assert message in str(err.value)


def test_file_factory_whose_import_fails(tmp_path):
    path = tmp_path / "needs_dep.py"
    path.write_text("import not_a_real_dependency_xyz\n")
    with pytest.raises(cli.FactoryError) as err:
        cli.load_factory(f"{path}:make")
    assert str(path) in str(err.value) and "not_a_real_dependency_xyz" in str(err.value)


def test_diff_in_process_bad_config(factories, capsys):
    assert cli.main(["diff", f"{factories}:mlp", "--config", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err


def test_diff_in_process_untraceable_model(factories, capsys):
    assert cli.main(["diff", f"{factories}:untraceable"]) == 1
    err = capsys.readouterr().err
    assert f"bitfx diff: could not trace {factories}:untraceable: " in err and "Traceback" not in err


def test_example_factory_loads():
    model, inputs = cli.load_model(f"{ROOT / 'examples' / 'diff_bert.py'}:make")
    assert type(model).__name__ == "Bert" and len(model.encoder.layer) == 12 and len(inputs) == 2


# -- demo / export / bench are delegated ------------------------------------------------------
def test_subcommands_are_delegated_with_their_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("bitfx._fake_bench")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "bitfx._fake_bench", fake)
    monkeypatch.setitem(cli.DELEGATED, "bench", ("bitfx._fake_bench", "main", "bench"))
    assert cli.main(["bench", "--repeat", "3"]) == 0
    assert seen == [["--repeat", "3"]]


def test_missing_delegate_says_so(monkeypatch, capsys):
    monkeypatch.setitem(cli.DELEGATED, "export", ("bitfx._not_written_yet", "cli_main", "export"))
    assert cli.main(["export", "x"]) == 2
    assert "bitfx export: not available" in capsys.readouterr().err
