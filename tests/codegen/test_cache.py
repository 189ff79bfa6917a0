"""Disk cache: reused by a second process; a damaged entry is rebuilt, never loaded."""

import json
import os
import subprocess
import sys
from pathlib import Path

PROBE = """
import json, torch
from bitfx.codegen import build
fn = build.kernel("gemm", mode="xnor", K=64, N=8)
out = torch.empty(1, 8, dtype=torch.int32)
fn(torch.zeros(1, 1, dtype=torch.uint64), torch.zeros(1, 8, dtype=torch.uint64), out)
print(json.dumps({"stats": dict(build.STATS), "out": out.tolist()}))
"""


def _probe(cache: Path) -> dict:
    env = {**os.environ, "BITFX_CACHE_DIR": str(cache),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_process_loads_from_cache(tmp_path):
    first = _probe(tmp_path)
    assert first["stats"] == {"compiled": 1} and first["out"] == [[64] * 8]
    second = _probe(tmp_path)
    assert second["stats"] == {"loaded": 1} and second["out"] == [[64] * 8]


def test_truncated_library_is_rebuilt(tmp_path):
    _probe(tmp_path)
    (manifest,) = tmp_path.glob("*.json")
    lib = tmp_path / json.loads(manifest.read_text())["lib"]
    lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 2])
    rebuilt = _probe(tmp_path)
    assert rebuilt["stats"] == {"rebuilt": 1, "compiled": 1} and rebuilt["out"] == [[64] * 8]
    assert _probe(tmp_path)["stats"] == {"loaded": 1}


def test_garbled_manifest_is_rebuilt(tmp_path):
    _probe(tmp_path)
    (manifest,) = tmp_path.glob("*.json")
    manifest.write_text("{not json")
    assert _probe(tmp_path)["stats"] == {"rebuilt": 1, "compiled": 1}
