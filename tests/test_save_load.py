"""bitfx.save / bitfx.load: a trained binary model round-trips, and bad files are refused cleanly."""
import hashlib
import json
import zipfile

import pytest
import torch

import bitfx
from bitfx.models import tiny_bert
from targets.target_tools import needs_gnu, needs_qemu


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model, example = tiny_bert(layers=1, seq=8)
    qat = bitfx.binarize(model.eval(), example, "bipft")
    with torch.no_grad():  # "train": move every added parameter away from its initial value
        for name, p in qat.named_parameters():
            if name.startswith("bitfx_"):
                p.add_(0.01 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("save") / "tiny.bitfx"
    assert bitfx.save(qat, path) == path
    return qat, example, path


def other_inputs(n=3, seq=11):
    g = torch.Generator().manual_seed(5)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[0, -3:] = 0
    return torch.randint(0, 1000, (n, seq), generator=g), mask


def test_eager_outputs_and_parameters_identical(saved):
    qat, example, path = saved
    loaded = bitfx.load(path)
    params, got = dict(qat.named_parameters()), dict(loaded.named_parameters())
    assert set(params) == set(got)
    for name, p in params.items():
        assert torch.equal(p, got[name]), name
        assert got[name].requires_grad
    assert loaded.bitfx_config == qat.bitfx_config
    assert loaded.bitfx_report.summary() == qat.bitfx_report.summary()
    with torch.no_grad():
        for inputs in (example, other_inputs()):   # a new batch size and sequence length too
            assert torch.equal(loaded(*inputs), qat(*inputs))


def test_loaded_model_trains(saved):
    qat, example, path = saved
    loaded = bitfx.load(path)
    loaded(*example).pow(2).mean().backward()
    grads = [p.grad for n, p in loaded.named_parameters() if n.startswith("bitfx_alpha")]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_compiled_and_exported_outputs_identical(saved):
    qat, example, path = saved
    loaded = bitfx.load(path)
    inputs = other_inputs()
    torch._dynamo.reset()
    with torch.no_grad():
        want = torch.compile(qat, backend="bitfx")(*inputs)
        torch._dynamo.reset()
        got = torch.compile(loaded, backend="bitfx")(*inputs)
        torch._dynamo.reset()
        assert torch.equal(got, want)
        assert torch.allclose(got, qat(*inputs), atol=1e-4, rtol=1e-4)   # kernels vs reference
        ep_want = torch.export.export(qat, example, strict=False).module()
        ep_got = torch.export.export(loaded, example, strict=False).module()
        assert torch.equal(ep_got(*example), ep_want(*example))


@pytest.mark.slow
def test_relax_export_identical(saved):
    import tvm

    from bitfx.export import to_relax

    qat, example, path = saved
    tvm.ir.assert_structural_equal(to_relax(bitfx.load(path), example), to_relax(qat, example))


@pytest.mark.slow  # two arm64 builds and four qemu runs (~3 min of CPU)
@needs_gnu
@needs_qemu
def test_loaded_model_exports_verifies_and_runs_like_the_original(saved, tmp_path):
    """save -> load -> ``bitfx.export(..., "linux-arm64", verify=True)``: the loaded model's library passes
    verify (qemu against the loaded model on the host) and gives the original's library's outputs."""
    import numpy as np

    from bitfx.targets import emulate

    try:
        emulate.fetch_arm64_runtime()
    except (RuntimeError, FileNotFoundError) as err:
        pytest.skip(f"aarch64 TVM runtime unavailable (offline?): {err}")
    qat, example, path = saved
    loaded = bitfx.load(path)
    got = bitfx.export(loaded, example, "linux-arm64", tmp_path / "loaded.so", verify=True, bundle=False)
    want = bitfx.export(qat, example, "linux-arm64", tmp_path / "original.so", bundle=False)
    with torch.no_grad():
        host = qat(*example).numpy()
    arrays = [t.numpy() for t in example]
    out_loaded = emulate.run_emulated(got, arrays, "linux-arm64", cpu="cortex-a53")
    out_original = emulate.run_emulated(want, arrays, "linux-arm64", cpu="cortex-a53")
    assert len(out_loaded) == len(out_original) == 1
    assert np.array_equal(out_loaded[0], out_original[0])  # the same kernels on the same parameters
    assert np.allclose(out_loaded[0], host, atol=1e-4 * max(1.0, float(np.abs(host).max())), rtol=0)


def rewrite(path, out, member, edit, fix_hash=False):
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members[member] = edit(members[member])
    if fix_hash:
        header = json.loads(members["bitfx.json"])
        header["sha256"][member] = hashlib.sha256(members[member]).hexdigest()
        members["bitfx.json"] = json.dumps(header).encode()
    with zipfile.ZipFile(out, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    return out


def test_wrong_version_is_refused(saved, tmp_path):
    _, _, path = saved

    def newer(raw):
        header = json.loads(raw)
        header["format_version"], header["bitfx_version"] = 99, "9.0.0"
        return json.dumps(header).encode()

    bad = rewrite(path, tmp_path / "v99.bitfx", "bitfx.json", newer)
    with pytest.raises(bitfx.LoadError, match=r"bitfx 9\.0\.0 in file format version 99.*reads format version 1"):
        bitfx.load(bad)


def test_tampered_weights_are_refused(saved, tmp_path):
    _, _, path = saved
    bad = rewrite(path, tmp_path / "t.bitfx", "tensors.pt", lambda b: b[:-40] + bytes(40))
    with pytest.raises(bitfx.LoadError, match="tensors.pt does not match its SHA-256"):
        bitfx.load(bad)


def test_graph_calling_other_code_is_refused_before_deserializing(saved, tmp_path):
    _, _, path = saved
    op = rewrite(path, tmp_path / "op.bitfx", "program.json",
                 lambda b: b.replace(b'"torch.ops.aten.gelu.default"', b'"torch.load"', 1), fix_hash=True)
    with pytest.raises(bitfx.LoadError, match="may not call: op 'torch.load'"):
        bitfx.load(op)
    expr = rewrite(path, tmp_path / "expr.bitfx", "program.json",
                   lambda b: b.replace(b"\"Symbol('s", b"\"__import__('os').system('true') or Symbol('s", 1),
                   fix_hash=True)
    with pytest.raises(bitfx.LoadError, match="shape expression"):
        bitfx.load(expr)


def test_not_a_bitfx_file(tmp_path):
    junk = tmp_path / "junk.bitfx"
    junk.write_bytes(b"not a zip")
    with pytest.raises(bitfx.LoadError, match="not a readable bitfx model file"):
        bitfx.load(junk)
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("model.pkl", b"")
    with pytest.raises(bitfx.LoadError, match="no bitfx.json"):
        bitfx.load(tmp_path / "other.zip")
    with pytest.raises(TypeError, match="GraphModule"):
        bitfx.save(torch.nn.Linear(2, 2), tmp_path / "x.bitfx")
