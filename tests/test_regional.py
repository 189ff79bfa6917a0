"""Regional compilation: ``layer.compile(backend="bitfx")`` on each repeated block, PyTorch's recipe for compile
time. Dynamo compiles the block once and runs that one graph for every layer, each layer's parameters passed as
inputs; the values bitfx adds (scales, BiViT thresholds, BiPFT estimators) belong to each layer, not to the graph.
The expected outputs are those of the whole model compiled as one graph (every layer calibrated in one pass)."""
import os

import pytest
import torch
from processes import json_runs
from regional_tools import calibrations  # noqa: F401 - a fixture
from regional_tools import hf_bert as _hf_bert

from bitfx import backend

transformers = pytest.importorskip("transformers")


def _whole(model, ids, options):
    torch._dynamo.reset()
    with torch.no_grad():  # (regions=False: one graph, not the backend's own split at the layers)
        out = torch.compile(model, backend="bitfx", options={**options, "regions": False})(ids).last_hidden_state
    torch._dynamo.reset()
    return out


@pytest.mark.parametrize("preset", ["bivit", "bipft"])
def test_one_graph_serves_every_layer_with_its_own_values(preset, calibrations, tmp_path, monkeypatch):
    monkeypatch.setenv("BITFX_COMPILE_CACHE_DIR", str(tmp_path))  # nothing calibrated earlier
    model, ids = _hf_bert()
    options = {"config": preset, "kernels": "reference"}
    expected = _whole(model, ids, options)
    longer = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(2))
    expected_longer = _whole(model, longer, options)
    calibrations.clear()

    backend.REPORTS.clear()  # (it keeps the newest 64: a difference of lengths could not see a new one)
    for layer in model.encoder.layer:
        layer.compile(backend="bitfx", options=options)
    with torch.no_grad():
        got = model(ids).last_hidden_state
        assert len(backend.REPORTS) == 1  # one compiled graph for the three layers
        assert len(calibrations) == 3  # each layer calibrated once, on the activations it receives
        again = model(ids).last_hidden_state
        got_longer = model(longer).last_hidden_state  # new shapes: dynamo compiles again, values reused
    assert len(calibrations) == 3
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-5 * scale
    assert torch.equal(got, again)
    assert (got_longer - expected_longer).abs().max() <= 1e-5 * expected_longer.abs().max()


def test_each_layer_keeps_values_of_its_own(calibrations, tmp_path, monkeypatch):
    """BiViT's thresholds differ between the layers (a graph that shared layer 0's would not meet the bound
    of the test above), and a second model object with other weights gets values of its own."""
    monkeypatch.setenv("BITFX_COMPILE_CACHE_DIR", str(tmp_path))
    model, ids = _hf_bert()
    other, _ = _hf_bert()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    for m in (model, other):
        for layer in m.encoder.layer:
            layer.compile(backend="bitfx", options={"config": "bivit", "kernels": "reference"})
    with torch.no_grad():
        model(ids), other(ids)
    assert len(calibrations) == 6

    def thresholds(m):
        values = [backend._CALIBRATED[layer.attention.self.query.weight][1] for layer in m.encoder.layer]
        return [[v for n, v in layer.items() if n.startswith("bitfx_beta")] for layer in values]
    ours, theirs = thresholds(model), thresholds(other)
    assert ours[0] and len(ours[0]) == len(ours[1])
    assert not all(torch.equal(a, b) for a, b in zip(ours[0], ours[1]))
    assert not all(torch.equal(a, b) for a, b in zip(ours[0], theirs[0]))


def test_regional_tvm_kernels_equal_the_reference(calibrations, tmp_path, monkeypatch):
    """The same with TVM kernels and inductor glue, at two sequence lengths (the second compile is dynamic in
    the sequence: its kernels cannot be prefetched from symbolic sizes and build at the first call)."""
    monkeypatch.setenv("BITFX_COMPILE_CACHE_DIR", str(tmp_path))
    model, ids = _hf_bert()
    longer = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(2))
    expected = _whole(model, ids, {"config": "bipft", "kernels": "reference"})
    expected_longer = _whole(model, longer, {"config": "bipft", "kernels": "reference"})
    symbolic = []
    capture = backend.capture_dynamo

    def spy(gm, example_inputs):
        fakes = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        symbolic.append(any(isinstance(d, torch.SymInt) for f in fakes if isinstance(f, torch.Tensor)
                            for d in f.shape))
        return capture(gm, example_inputs)

    monkeypatch.setattr(backend, "capture_dynamo", spy)
    for layer in model.encoder.layer:
        layer.compile(backend="bitfx", options={"config": "bipft"})
    with torch.no_grad():
        got, got_longer = model(ids).last_hidden_state, model(longer).last_hidden_state
    assert symbolic == [False, True]
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert (got_longer - expected_longer).abs().max() <= 1e-4 * expected_longer.abs().max()


WARM_SCRIPT = r"""
import json, torch, transformers, bitfx
import bitfx.backend
calls = []
calibrate = bitfx.backend.calibrate
bitfx.backend.calibrate = lambda *a, **k: (calls.append(1), calibrate(*a, **k))[1]
torch.manual_seed(0)
cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                              vocab_size=300)
model = transformers.BertModel(cfg).eval()
ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
for layer in model.encoder.layer:
    layer.compile(backend="bitfx", options={"config": "bivit", "kernels": "reference"})
with torch.no_grad():
    y = model(ids).last_hidden_state
print(json.dumps({"calibrations": len(calls), "y": y.double().sum().item()}))
"""


def test_warm_start_reads_every_layers_values_from_disk(tmp_path):
    cold, warm = json_runs(WARM_SCRIPT, {**os.environ, "BITFX_COMPILE_CACHE_DIR": str(tmp_path)})
    assert cold["calibrations"] == 3 and warm["calibrations"] == 0
    assert warm["y"] == cold["y"]


def _repeated_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The longest ``nn.ModuleList`` of modules of one class: the model's layers."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1
             and len({type(b) for b in m}) == 1]
    return max(lists, key=len)


@pytest.mark.parametrize("name", ["bert", "roberta", "distilbert", "vit", "gpt2", "llama"])
def test_zoo_models_compiled_by_region_equal_the_whole_model(name, tmp_path, monkeypatch):
    """Real model code (the HF zoo: encoders, ViT, and decoders with their KV caches and rotary embeddings), its
    layers compiled one by one, against the whole model compiled as one graph."""
    from hf_zoo import ZOO, call

    monkeypatch.setenv("BITFX_COMPILE_CACHE_DIR", str(tmp_path))
    model, args, kwargs = ZOO[name].make()
    options = {"config": "bivit", "kernels": "reference"}

    def hidden(out):
        return out if isinstance(out, torch.Tensor) else out[0]

    torch._dynamo.reset()
    with torch.no_grad():
        expected = hidden(torch.compile(model, backend="bitfx", options={**options, "regions": False})(*args, **kwargs))
    torch._dynamo.reset()
    for block in _repeated_blocks(model):
        block.compile(backend="bitfx", options=options)
    try:
        with torch.no_grad():
            got = hidden(call(model, args, kwargs))
    finally:
        torch._dynamo.reset()
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
