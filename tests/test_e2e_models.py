"""The whole pipeline on the model zoo (tests/models.py): binarize, torch.compile, dynamic shapes, QAT."""
import pytest
import torch
import torch.nn as nn

import bitfx
import bitfx.backend
from bitfx.api import trace
from bitfx.ops import ATTENTION, BIT_ATTENTION, BIT_LINEAR
from bitfx.passes.canonicalize_attention import canonicalize_attention
from bitfx.passes.canonicalize_linear import canonicalize_linear
from bitfx.passes.eliminate_dead_code import eliminate_dead_code
from lowering import count, executed, lowered  # noqa: F401 - lowered is a fixture
from models import CASES

REFERENCE = {"config": "bipft", "kernels": "reference"}
CANONICALIZE = [eliminate_dead_code, canonicalize_linear, canonicalize_attention]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", list(CASES))
def test_canonicalize_keeps_the_numbers(name):
    case = CASES[name]
    model = case.model()
    gm, ctx = trace(model, case.inputs(), passes=CANONICALIZE)
    assert count(gm, ATTENTION) == case.attentions
    assert ctx.report.count("attention", "attention") == case.attentions
    assert not [s for s in ctx.report.skips if s.kind == "attention"], ctx.report.summary()
    other = case.inputs(3, 5 if case.seq_dynamic else 8, seed=2)  # the traced graph is shape-generic
    with torch.no_grad():
        for x in (case.inputs(), other):
            torch.testing.assert_close(gm(*x), model(*x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_binarize_and_compile_agree(name, lowered):
    case = CASES[name]
    model, x = case.model(), case.inputs()
    gm = bitfx.binarize(model, x)
    report = gm.bitfx_report
    assert report.count("linear", "bit_linear") == case.linears, report.summary()
    assert report.count("attention", "bit_attention") == case.attentions, report.summary()
    assert report.count("attention", "attention") == case.attentions, report.summary()
    assert count(gm, BIT_LINEAR) == case.linears and count(gm, BIT_ATTENTION) == case.attentions

    compiled = torch.compile(model, backend="bitfx", options=REFERENCE)
    with torch.no_grad():  # also covers nn.TransformerEncoderLayer's fused no_grad fast path
        y_float, y_bin, y_compiled = model(*x), gm(*x), compiled(*x)
    torch.testing.assert_close(y_compiled, y_bin, rtol=1e-4, atol=1e-4)
    assert (y_bin - y_float).abs().max() > 1e-2, "binarized output equals the float one"
    assert executed(lowered, BIT_LINEAR) == case.linears
    assert executed(lowered, BIT_ATTENTION) == case.attentions
    compiled_report = bitfx.backend.REPORTS[-1]  # every layer's rewrites, also where one graph serves all
    assert compiled_report.count("linear", "bit_linear") == case.linears, compiled_report.summary()


@pytest.mark.parametrize("name", list(CASES))
def test_no_graph_breaks(name):
    case = CASES[name]
    explanation = torch._dynamo.explain(case.model())(*case.inputs())
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("name", ["bert", "decoder", "mha", "encoder_layer"])
def test_compile_canonicalizes_without_changing_numbers(name, lowered):
    """Under dynamo, with binarization off, attentions become bitfx.attention and nothing else changes."""
    case = CASES[name]
    model, x = case.model(), case.inputs()
    options = {"config": {"linear": False, "attention": False}, "kernels": "reference"}
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="bitfx", options=options)(*x), model(*x),
                                   rtol=1e-5, atol=1e-5)
    assert executed(lowered, ATTENTION) == case.attentions


@pytest.mark.parametrize("name", ["bert", "decoder", "encoder_layer", "vit"])
def test_dynamic_shapes_compile_at_most_twice(name):
    case = CASES[name]
    model = case.model()
    gm = bitfx.binarize(model, case.inputs())
    compiles = []

    def backend(graph, example_inputs):
        compiles.append(graph)
        return bitfx.backend.bitfx_backend(graph, example_inputs, options=REFERENCE)

    compiled = torch.compile(model, backend=backend)
    shapes = [(3, 6), (4, 11), (5, 5), (2, 13)]  # not 1: dynamo specializes sizes 0 and 1
    batches = [case.inputs()] + [case.inputs(b, s if case.seq_dynamic else 8, seed=b * 100 + s) for b, s in shapes]
    with torch.no_grad():
        for x in batches:
            # both calibrate on the first batch; a recompile reuses those values
            torch.testing.assert_close(compiled(*x), gm(*x), rtol=1e-4, atol=1e-4)
    assert 1 <= len(compiles) <= 2


def test_compiling_a_binarized_module_lowers_it_as_it_is(lowered):
    case = CASES["bert"]
    x = case.inputs()
    gm = bitfx.binarize(case.model(), x)
    compiled = torch.compile(gm, backend="bitfx", options=REFERENCE)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*x), gm(*x), rtol=1e-5, atol=1e-5)
    assert executed(lowered, BIT_LINEAR) == count(gm, BIT_LINEAR) == case.linears
    assert executed(lowered, BIT_ATTENTION) == count(gm, BIT_ATTENTION) == case.attentions


def test_a_bare_linear_is_binarized():
    torch.manual_seed(0)
    model, x = nn.Linear(32, 16), torch.randn(4, 32)
    gm = bitfx.binarize(model, (x,))
    assert gm.bitfx_report.count("linear", "bit_linear") == 1 and count(gm, BIT_LINEAR) == 1
    with torch.no_grad():
        y = torch.compile(model, backend="bitfx", options=REFERENCE)(x)
        torch.testing.assert_close(y, gm(x), rtol=1e-4, atol=1e-4)
        assert (y - model(x)).abs().max() > 1e-2


def test_fused_encoder_layer_op_decomposes_under_dynamo(lowered):
    """Dynamo records aten._transformer_encoder_layer_fwd for the no_grad fast path; capture
    decomposes it, so its four linears and its attention are binarized."""
    case = CASES["encoder_layer"]
    with torch.no_grad():
        torch.compile(case.model(), backend="bitfx", options=REFERENCE)(*case.inputs())
    assert executed(lowered, torch.ops.aten._transformer_encoder_layer_fwd.default) == 0
    assert executed(lowered, BIT_LINEAR) == case.linears and executed(lowered, BIT_ATTENTION) == case.attentions


@pytest.mark.parametrize("name", ["mlp", "decoder"])
def test_qat_loss_decreases(name):
    """A binarized model trains: straight-through gradients reach the weights and scales."""
    case = CASES[name]
    torch.manual_seed(0)
    teacher = case.model(seed=1)
    x = case.inputs(8, 8, seed=3)
    with torch.no_grad():
        target = teacher(*x)
        if name == "decoder":
            target = target.argmax(-1)  # next-token labels from a fixed random teacher
    student = bitfx.binarize(case.model(seed=0), x)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    loss_fn = nn.MSELoss() if name == "mlp" else nn.CrossEntropyLoss()

    def loss():
        y = student(*x)
        return loss_fn(y.flatten(0, -2), target.flatten(0, -2) if name == "mlp" else target.flatten())

    losses = []
    for _ in range(30):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
        losses.append(value.item())
    with torch.no_grad():
        final = loss().item()
    assert final < 0.6 * losses[0], losses
