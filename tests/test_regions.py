"""The backend's own regional compilation (`bitfx.regions`): ``torch.compile(model, backend="bitfx")`` splits
dynamo's graph at the repeated blocks and compiles each distinct partition once. The expected outputs are
those of the same model compiled as one graph (``regions=False``), each layer calibrated on what it receives."""
import pytest
import torch
from lowering import executed, lowered  # noqa: F401 - lowered is a fixture
from regional_tools import calibrations  # noqa: F401 - a fixture
from regional_tools import hf_bert as _hf_bert

from bitfx import backend, regions
from bitfx.ops import BIT_ATTENTION, BIT_LINEAR

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def empty_compile_cache(monkeypatch, tmp_path):
    """Nothing calibrated earlier is read from disk: every calibration counted runs."""
    monkeypatch.setenv("BITFX_COMPILE_CACHE_DIR", str(tmp_path))


def _compile(model, ids, **options):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="bitfx", options={"kernels": "reference", **options})
    with torch.no_grad():
        return compiled, compiled(ids).last_hidden_state


@pytest.mark.parametrize("preset", ["bivit", "bipft"])
def test_one_graph_serves_every_layer_and_equals_the_whole_graph(preset, calibrations, lowered):
    """bipft: its estimators are fitted in the calibration, and the layers after one are calibrated on what
    that layer computes with its fitted estimators (before, on products from the estimators' zero start:
    the layers calibrated one by one differed from the whole graph by 0.54 on the zoo's ViT)."""
    model, ids = _hf_bert()
    _, whole = _compile(model, ids, config=preset, regions=False)
    assert [g.bitfx_instances for g in lowered] == [1]
    del lowered[:]
    calibrations.clear()

    backend.REPORTS.clear()  # (it keeps the newest 64: a difference of lengths could not see a new one)
    compiled, split = _compile(model, ids, config=preset)
    assert len(backend.REPORTS) == 1  # one report for the model
    # one graph for the three layers (compiled first: the most repeated), the embeddings, the pooler
    assert [g.bitfx_instances for g in lowered] == [3, 1, 1]
    assert executed(lowered, BIT_LINEAR) == 18 and executed(lowered, BIT_ATTENTION) == 3
    assert len(calibrations) == 3  # each layer calibrated once, at its first call
    assert (split - whole).abs().max() <= 1e-5 * whole.abs().max()
    with torch.no_grad():
        assert torch.equal(compiled(ids).last_hidden_state, split)
    assert len(calibrations) == 3


def test_bipft_layers_are_calibrated_on_what_the_layer_before_computes(calibrations):
    """BiPFT's estimators are fitted in the calibration. The layers after one must be calibrated on what it
    computes with its fitted estimators; they were calibrated on products of the estimators' zero start, so
    the whole graph (one calibration pass) and the split (each layer at its first call) differed by 0.54 on
    the test zoo's ViT (in a random-init HF BERT the elastic binarizer zeroes P and hides it)."""
    from models import CASES

    case = CASES["vit"]
    model, x = case.model(), case.inputs()
    outs = []
    for options in ({"regions": False}, {}):
        torch._dynamo.reset()
        with torch.no_grad():
            outs.append(torch.compile(model, backend="bitfx",
                                      options={"config": "bipft", "kernels": "reference", **options})(*x))
    whole, split = outs
    assert len(calibrations) == 1 + 2
    assert (split - whole).abs().max() <= 1e-5 * whole.abs().max()


def test_the_report_names_every_layers_modules(calibrations):
    model, ids = _hf_bert()
    _compile(model, ids, config="bivit")
    report = backend.REPORTS[-1]
    modules = [r.module for r in report.binary_ops]
    assert len(modules) == 21 and len(set(modules)) == 21  # 6 linears and an attention per layer, each its own
    for i in range(3):
        assert f"encoder.layer.{i}.attention.self.query" in modules
    assert [s.module for s in report.skips] == ["pooler.dense"]  # the default keep pattern


def test_new_shapes_compile_again_and_reuse_each_layers_values(calibrations, lowered):
    """A second sequence length: dynamo compiles again with a symbolic length; the split holds (one graph for
    the layers, its sizes symbolic), and every layer keeps the values of its first calibration."""
    model, ids = _hf_bert()
    longer = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(2))
    expected = {}
    for x in (ids, longer):
        torch._dynamo.reset()
        with torch.no_grad():  # one compile per shape, each calibrated on its own batch: the first batch's values
            expected[x.shape[1]] = _compile(model, ids, config="bivit", regions=False)[0](x).last_hidden_state
    del lowered[:]
    calibrations.clear()

    compiled, first = _compile(model, ids, config="bivit")
    with torch.no_grad():
        second = compiled(longer).last_hidden_state
    assert len(calibrations) == 3
    assert [g.bitfx_instances for g in lowered] == [3, 1, 1, 3, 1, 1]
    symbolic = [any(isinstance(d, torch.SymInt) for n in g.graph.nodes if n.op == "placeholder"
                    for d in getattr(n.meta.get("val"), "shape", ())) for g in lowered]
    assert symbolic == [False] * 3 + [True] * 3
    for got, want in ((first, expected[24]), (second, expected[40])):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_a_keep_pattern_on_one_layer_gives_it_a_graph_of_its_own(calibrations, lowered):
    model, ids = _hf_bert()
    config = {"preset": "bivit", "keep": ("*pooler*", "encoder.layer.1.*")}
    _, whole = _compile(model, ids, config=config, regions=False)
    del lowered[:]
    _, split = _compile(model, ids, config=config)
    assert sorted(g.bitfx_instances for g in lowered) == [1, 1, 1, 2]  # layers 0 and 2 share one
    assert executed(lowered, BIT_LINEAR) == 12
    assert (split - whole).abs().max() <= 1e-5 * whole.abs().max()


class _Different(torch.nn.Module):
    """Blocks in a ModuleList that are not the same code (other shapes)."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)])

    def forward(self, x):
        for block in self.blocks:
            x = torch.nn.functional.gelu(block(x))
        return x


class _Shared(torch.nn.Module):
    """One block called at two sites (ALBERT-style sharing, with other layers between the calls)."""

    def __init__(self):
        super().__init__()
        self.shared = torch.nn.ModuleList([torch.nn.Linear(32, 32)])
        self.norms = torch.nn.ModuleList([torch.nn.LayerNorm(32), torch.nn.LayerNorm(32)])

    def forward(self, x):
        for norm in self.norms:
            x = norm(torch.nn.functional.gelu(self.shared[0](x)))
        return x


@pytest.mark.parametrize("case,reason", [("keep_first", "keep_first / keep_last choose among the whole graph's linears"),
                                         ("no_repeats", "no partition repeats"),
                                         ("shared", "a block's parameters serve several call sites"), ("off", "")])
def test_graphs_that_are_not_split(case, reason, calibrations, lowered, caplog):
    caplog.set_level("INFO", logger="bitfx.backend")
    if case in ("no_repeats", "shared"):
        torch.manual_seed(0)
        model = (_Different if case == "no_repeats" else _Shared)().eval()
        with torch.no_grad():
            torch.compile(model, backend="bitfx", options={"kernels": "reference"})(torch.randn(4, 32))
    else:
        model, ids = _hf_bert()
        options = {"config": {"preset": "bivit", "keep_first": True}} if case == "keep_first" else {"regions": False}
        _compile(model, ids, **options)
    assert [g.bitfx_instances for g in lowered] == [1]
    logged = [r.getMessage() for r in caplog.records if "compiled whole" in r.getMessage()]
    assert logged == ([f"bitfx: the graph is compiled whole ({reason})"] if reason else [])


def test_training_through_the_split_gives_the_whole_graphs_gradients(calibrations):
    model, ids = _hf_bert(layers=2)
    model.train()
    for layer in model.modules():  # no dropout: the two runs see the same graph
        if isinstance(layer, torch.nn.Dropout):
            layer.p = 0.0
    grads = []
    for options in ({"regions": False}, {}):
        torch._dynamo.reset()
        model.zero_grad()
        out = torch.compile(model, backend="bitfx", options={"kernels": "reference", **options})(ids)
        out.last_hidden_state.pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    whole, split = grads
    # the pooler's output is not in the loss: eager gives its parameters no gradient, as the split does, where
    # the one graph's backward gave zeros
    assert set(split) <= set(whole) and len(split) > 20
    assert all(not whole[n].any() for n in set(whole) - set(split)) and set(whole) - set(split) == {
        "pooler.dense.weight", "pooler.dense.bias"}
    whole = {n: whole[n] for n in split}
    for name in whole:
        scale = max(1e-6, whole[name].abs().max().item())
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-4 * scale, msg=name)


def test_tvm_kernels_with_inductor_glue_equal_the_reference(calibrations):
    model, ids = _hf_bert()
    _, expected = _compile(model, ids, config="bipft", regions=False)
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend="bitfx", options={"config": "bipft"})(ids).last_hidden_state
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_partitions_follow_the_outermost_item_of_a_container():
    class Node:
        def __init__(self, stack):
            self.meta = {"nn_module_stack": {str(i): (p, object) for i, p in enumerate(stack)}}

    assert regions.block_of(Node(["L['self'].encoder", "L['self'].encoder.layer[3]",
                                  "L['self'].encoder.layer[3].attention"])) == "encoder.layer.3"
    assert regions.block_of(Node(["L['self'].h[0]", "L['self'].h[0].mlp.layers[1]"])) == "h.0"
    assert regions.block_of(Node(["L['self'].embeddings"])) is None
    assert regions.block_of(Node([])) is None


def test_regions_option_is_validated():
    from bitfx.config import CompileOptions

    with pytest.raises(ValueError, match="regions='yes'.*accepted: True, False"):
        CompileOptions.from_dict({"regions": "yes"})


def test_a_failure_in_the_split_compiles_the_one_graph(calibrations, lowered, caplog, monkeypatch):
    """Whatever goes wrong in the split (here: a signature that raises), the compile falls back to one graph,
    with a warning that names the cause, and the output is the one graph's."""
    model, ids = _hf_bert()
    _, whole = _compile(model, ids, config="bivit", regions=False)
    del lowered[:]

    def broken(*_):
        raise RuntimeError("signature broke")

    monkeypatch.setattr(regions, "signature", broken)
    _, got = _compile(model, ids, config="bivit")
    assert "compiling by region failed (RuntimeError: signature broke); the graph is compiled whole" in caplog.text
    assert [g.bitfx_instances for g in lowered] == [1]
    assert torch.equal(got, whole)
