"""A warm start in a second process reuses the calibration and the packed weights from disk (counted,
never timed); a changed parameter misses; damaged entries are recomputed."""
import json
import os
import platform
import subprocess
import sys

import pytest
import torch
from processes import json_runs

from bitfx import compile_cache

SCRIPT = r"""
import json, torch, bitfx
import bitfx.backend
from bitfx import compile_cache
calls = []
calibrate = bitfx.backend.calibrate
bitfx.backend.calibrate = lambda *a, **k: (calls.append(1), calibrate(*a, **k))[1]
torch.manual_seed(0)
layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
if {scale}:
    with torch.no_grad():
        layer.linear1.weight.mul_(2.0)
x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    y = torch.compile(layer, backend="bitfx")(x)
print(json.dumps({{"stats": dict(compile_cache.STATS), "calibrations": len(calls), "y": y.sum().item()}}))
"""


def _run(tmp_path, scale=False):
    env = {**os.environ, "BITFX_COMPILE_CACHE_DIR": str(tmp_path)}  # kernels and inductor: their usual caches
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(scale=scale)], env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_warm_start_skips_calibration_and_packing(tmp_path):
    cold = _run(tmp_path)
    warm = _run(tmp_path)
    # cold: 6 linears packed (in_proj split into q, k, v; out_proj, linear1, linear2) + 1 calibration
    # computed and stored; warm: all read back, none computed
    assert cold["calibrations"] == 1 and cold["stats"].get("store") == 7 and "hit" not in cold["stats"]
    assert warm["calibrations"] == 0 and warm["stats"].get("hit") == 7 and "store" not in warm["stats"]
    assert warm["y"] == cold["y"]
    changed = _run(tmp_path, scale=True)  # one weight edited: its packing and the calibration miss
    assert changed["calibrations"] == 1 and changed["stats"].get("hit") == 5
    assert changed["stats"].get("store") == 2


def test_content_key_follows_bytes_dtype_and_shape():
    a = torch.arange(6.0)
    k = compile_cache.content_key("t", [a])
    assert k == compile_cache.content_key("t", [a.clone()])
    assert k != compile_cache.content_key("t", [a.reshape(2, 3)])
    assert k != compile_cache.content_key("t", [a.double()])
    b = a.clone()
    b[3] += 1e-6
    assert k != compile_cache.content_key("t", [b])
    assert k != compile_cache.content_key("t", [a], extra="bivit")


def test_content_key_follows_bitfx_sources(monkeypatch, tmp_path):
    """An edited bitfx (a calibration fixed, a packing changed) never reads what the old code stored: the
    sources' digest is in every key (the version number, there before, does not change with an edit)."""
    a = torch.arange(6.0)
    k = compile_cache.content_key("t", [a])
    assert compile_cache.source_digest() == compile_cache.source_digest() and len(compile_cache.source_digest()) == 32
    monkeypatch.setattr(compile_cache, "source_digest", lambda: "0" * 32)
    assert compile_cache.content_key("t", [a]) != k
    # and the digest itself reads every source file: one more byte in a copy of the tree changes it
    import shutil
    from pathlib import Path

    import bitfx

    tree = tmp_path / "bitfx"
    shutil.copytree(Path(bitfx.__file__).parent, tree, ignore=shutil.ignore_patterns("__pycache__"))
    copy = tree / "compile_cache.py"

    def digest():
        import importlib.util

        spec = importlib.util.spec_from_file_location("bitfx_copy_cache", copy)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.source_digest()

    before = digest()
    (tree / "calibrate.py").write_text((tree / "calibrate.py").read_text() + "\n# edited\n")
    assert digest() != before


def test_same_tensors_hashes_each_tensor_once_within_it():
    w, x = torch.randn(300, 1000), torch.randn(8, 1000)  # (w: 1.2 MB, hashed in the pool; x inline)
    before = compile_cache.STATS.copy()
    k_w, k_wx = compile_cache.content_key("a", [w]), compile_cache.content_key("b", [w, x])

    def hashed(since):
        return (compile_cache.STATS["digest"] - since["digest"], compile_cache.STATS["digest_reused"]
                - since["digest_reused"])

    assert hashed(before) == (3, 0)  # outside: every tensor of every key
    with compile_cache.same_tensors():
        inside = compile_cache.STATS.copy()
        assert compile_cache.content_key("b", [w, x]) == k_wx and hashed(inside) == (2, 0)
        # the same bytes again, as the same tensor, a detached alias and an alias with its own version
        alias = w.detach()
        alias.data = w.data
        for t in (w, w.detach(), alias):
            assert compile_cache.content_key("a", [t]) == k_w
        assert hashed(inside) == (2, 3)
        assert compile_cache.content_key("a", [w[:100]]) != k_w and hashed(inside) == (3, 3)  # another view
    after = compile_cache.STATS.copy()
    assert compile_cache.content_key("a", [w]) == k_w and hashed(after) == (1, 0)  # dropped on exit


def test_first_call_of_a_partition_hashes_each_weight_once(tmp_path, monkeypatch):
    """A split model's partition calibrates at its first call and then packs its weights there: the packing
    keys reuse the calibration key's digests (cold and warm alike), one per binarized linear."""
    import hf_zoo

    import bitfx  # noqa: F401

    monkeypatch.setenv("BITFX_COMPILE_CACHE_DIR", str(tmp_path))
    model, args, kwargs = hf_zoo.bert()
    layers = len(model.encoder.layer)
    before = compile_cache.STATS.copy()
    with torch.no_grad():
        torch.compile(model, backend="bitfx")(*args, **kwargs)
    stats = {k: compile_cache.STATS[k] - before[k] for k in ("digest_reused", "store")}
    # six binarized linears per BERT layer (q, k, v, o, intermediate, output): each packing's digest reused;
    # stored: those packings and one calibration per layer
    assert stats == {"digest_reused": 6 * layers, "store": 7 * layers}


def test_damaged_entry_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("BITFX_COMPILE_CACHE_DIR", str(tmp_path))
    compile_cache.store("x-1", {"v": torch.ones(3)})
    assert torch.equal(compile_cache.load("x-1")["v"], torch.ones(3))
    (tmp_path / "x-1.npz").write_bytes(b"garbage")
    assert compile_cache.load("x-1") is None
    monkeypatch.setenv("BITFX_COMPILE_CACHE", "0")
    compile_cache.store("x-2", {"v": torch.ones(3)})
    assert not (tmp_path / "x-2.npz").exists()


PROBE_SCRIPT = r"""
import json, subprocess, torch, bitfx
probes = []
run = subprocess.run
def spy(cmd, *a, **k):
    if isinstance(cmd, list) and any("cdll.LoadLibrary" in str(c) for c in cmd):  # inductor's SIMD probe
        probes.append(1)
    return run(cmd, *a, **k)
subprocess.run = spy
torch.manual_seed(0)
# float glue for inductor to write between the kernels (a GELU here would go into the GEMM's epilogue)
model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 32)).eval()
with torch.no_grad():
    y = torch.compile(model, backend="bitfx")(torch.randn(4, 32))
print(json.dumps({"probes": len(probes), "y": y.sum().item()}))
"""


@pytest.mark.parametrize("aot_cache", ["0", "1"])
def test_warm_start_skips_inductors_simd_probes(tmp_path, aot_cache):
    """inductor loads a test library per SIMD ISA in a child Python in every process; bitfx keeps the
    passed probes, so a second process starts none (counted: the child commands). Both when inductor
    compiles the glue again (AOTAutograd's cache off) and when that cache loads the compiled forward
    (its loading asks the probes too)."""
    pytest.importorskip("torch._inductor.cpu_vec_isa")
    env = {**os.environ, "BITFX_COMPILE_CACHE_DIR": str(tmp_path), "BITFX_AOT_CACHE": aot_cache}
    cold, warm = json_runs(PROBE_SCRIPT, env)
    assert cold["probes"] >= 1  # the first process probes (the test is not vacuous)
    assert warm["probes"] == 0
    assert warm["y"] == cold["y"]


ISA_SCRIPT = r"""
import json, sys, torch
from torch._inductor import cpp_builder, cpu_vec_isa
builds = []
build = cpp_builder.CppBuilder.build
cpp_builder.CppBuilder.build = lambda self: (builds.append(1), build(self))[1]
if sys.argv[1] == "bitfx":
    from bitfx import backend
    backend._probe_simd_early()
isas = cpu_vec_isa.valid_vec_isa_list()
print(json.dumps({"isas": [str(i) for i in isas], "flags": [i.build_arch_flags() for i in isas],
                  "picked": str(cpu_vec_isa.pick_vec_isa()), "builds": len(builds)}))
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 SIMD ISAs only")
def test_simd_checks_build_the_aten_test_library_once_with_inductors_answer(tmp_path):
    """Cold (inductor's cache empty), inductor builds its ATen test library once per ISA the CPU reports; with
    bitfx's early checks the widest builds it and the narrower ones, whose flags are subsets, take its answer.
    The answer is inductor's own: the same ISAs, flags (bf16, VNNI: still checked each) and pick, in fresh
    processes, each against its own empty cache."""
    runs = {}
    for who in ("inductor", "bitfx"):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / who)}
        (runs[who],) = json_runs(ISA_SCRIPT, env, times=1, args=(who,))
    alone, bitfx = runs["inductor"], runs["bitfx"]
    assert (bitfx["isas"], bitfx["flags"], bitfx["picked"]) == (alone["isas"], alone["flags"], alone["picked"])
    assert alone["isas"]  # the CPU reports at least AVX2 (else nothing is checked and the test says nothing)
    assert bitfx["builds"] == alone["builds"] - (len(alone["isas"]) - 1)


AOT_SCRIPT = r"""
import json, os, sys, torch, bitfx
import bitfx.passes
from torch._dynamo.utils import counters
lowerings = []
lower = bitfx.passes.LOWERING[0]
bitfx.passes.LOWERING[0] = lambda gm, ctx: (lowerings.append(1), lower(gm, ctx))[1]
seed, preset = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(seed)
layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    y = torch.compile(layer, backend="bitfx", options={"config": preset})(x)
    stats = dict(counters["aot_autograd"])
    torch._dynamo.reset()
    os.environ["BITFX_AOT_CACHE"] = "0"  # the same model compiled without the cache: the expected output
    ref = torch.compile(layer, backend="bitfx", options={"config": preset})(x)
print(json.dumps({"aot": stats, "lowerings": len(lowerings), "same": bool(torch.equal(y, ref)),
                  "y": y.sum().item()}))
"""


def test_warm_start_loads_the_compiled_forward(tmp_path):
    """A second process gets the whole compiled forward from AOTAutograd's cache: no AOT trace, no bitfx
    lowering, no inductor compile (counted: the cache counters and the lowering pass's calls). Weights are
    inputs of the cached code, so a model with other weights hits the same entry and still computes its own
    output; another config misses."""
    env = {**os.environ, "BITFX_COMPILE_CACHE_DIR": str(tmp_path / "bitfx"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # empty: the first process is cold

    def run(seed, preset="bipft"):
        out = subprocess.run([sys.executable, "-c", AOT_SCRIPT, str(seed), preset], env=env, capture_output=True,
                             text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    cold, warm, other_weights, other_config = run(0), run(0), run(1), run(0, "bibert")
    assert cold["aot"].get("autograd_cache_miss") == 1 and cold["aot"].get("autograd_cache_saved") == 1
    assert cold["lowerings"] == 2  # the cached compile and the uncached reference compile
    assert warm["aot"].get("autograd_cache_hit") == 1 and "autograd_cache_miss" not in warm["aot"]
    assert warm["lowerings"] == 1  # only the reference compile lowered
    assert warm["y"] == cold["y"] and cold["same"] and warm["same"]
    assert other_weights["aot"].get("autograd_cache_hit") == 1
    assert other_weights["same"] and other_weights["y"] != cold["y"]
    assert other_config["aot"].get("autograd_cache_miss") == 1
