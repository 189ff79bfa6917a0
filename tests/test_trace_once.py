"""``bitfx.trace_once``: dynamo traces a repeated block once; the compiled model is the unmarked one's, bit for bit."""
import pytest
import torch
from hf_zoo import bert, gpt2

import bitfx
from bitfx import backend, blocks
from bitfx.models import bert_encoder


@pytest.fixture(autouse=True)
def unmarked():
    yield
    blocks.unmark()
    torch._dynamo.reset()


def test_repeated_blocks_are_the_user_classes_a_list_repeats():
    model, _, _ = bert(layers=2)
    assert blocks.repeated_blocks(model) == [type(model.encoder.layer[0])]
    encoder, _ = bert_encoder(layers=3)
    assert blocks.repeated_blocks(encoder) == [type(encoder.layer[0])]
    # torch's own classes are left out (marking nn.TransformerEncoderLayer would mark it everywhere)
    stock = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(32, 4, 64), 2, enable_nested_tensor=False)
    assert blocks.repeated_blocks(stock) == []
    assert blocks.repeated_blocks(torch.nn.Linear(4, 4)) == []


def test_marked_model_is_traced_once_and_compiles_to_the_same_results(monkeypatch):
    model, args, kwargs = bert(layers=3)
    layer_cls = type(model.encoder.layer[0])
    with torch.no_grad():
        plain = torch.compile(model, backend="bitfx")(*args, **kwargs).last_hidden_state
    plain_modules = sorted(r.module for r in backend.REPORTS[-1].rewrites)
    torch._dynamo.reset()
    hop, seen = torch.ops.higher_order.invoke_subgraph, []
    real = backend.bitfx_backend

    def spy(gm, *a, **k):  # (the backend inlines the calls in place: read them first)
        seen.append([str(n.args[1]) for n in gm.graph.nodes if n.target is hop])
        return real(gm, *a, **k)

    monkeypatch.setattr(backend, "bitfx_backend", spy)
    assert bitfx.trace_once(model) is model and layer_cls in blocks.MARKED
    with torch.no_grad():
        marked = torch.compile(model, backend=backend.bitfx_backend)(*args, **kwargs).last_hidden_state
    # dynamo's graph: the layer traced once, as one subgraph, called three times
    (calls,) = seen
    assert len(calls) == 3 and len(set(calls)) == 1
    # bitfx inlined them: every linear of every layer binarized, and the outputs those of the unmarked model
    report = backend.REPORTS[-1]
    assert sum(r.kind == "linear" for r in report.rewrites) == 6 * 3
    # each under its own block's module names (the inlined nodes' module stacks moved to their call's block)
    assert sorted(r.module for r in report.rewrites) == plain_modules
    assert {r.module.split(".")[2] for r in report.rewrites} == {"0", "1", "2"}
    assert torch.equal(marked, plain)


def test_a_marked_decoder_with_its_cache_compiles_to_the_same_results():
    """GPT-2 with HF's default use_cache=True: each block updates the KV cache it is handed."""
    model, args, kwargs = gpt2()
    rewrites = []
    with torch.no_grad():
        plain = torch.compile(model, backend="bitfx")(*args, **kwargs)
        rewrites.append(sorted((r.kind, r.module) for r in backend.REPORTS[-1].rewrites))
        torch._dynamo.reset()
        bitfx.trace_once(model)
        assert list(blocks.MARKED) == [type(model.transformer.h[0])]
        marked = torch.compile(model, backend="bitfx")(*args, **kwargs)
        rewrites.append(sorted((r.kind, r.module) for r in backend.REPORTS[-1].rewrites))
    # six binary linears per block (c_attn split in q, k, v; c_proj, c_fc, mlp.c_proj), as hf_zoo counts them
    assert backend.REPORTS[-1].count("linear", "bit_linear") == 6 * len(model.transformer.h)
    assert rewrites[0] == rewrites[1]
    assert torch.equal(marked.logits, plain.logits)
    cached = [[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)] for out in (marked, plain)]
    assert len(cached[0]) == len(cached[1]) == 2 * len(model.transformer.h)  # (a key and a value per block)
    assert all(torch.equal(a, b) for a, b in zip(*cached))


def test_binarize_of_a_marked_model_equals_the_unmarked_one():
    model, args, kwargs = bert(layers=2)
    plain = bitfx.binarize(model, kwargs)
    bitfx.trace_once(model)
    marked = bitfx.binarize(model, kwargs)
    hop = torch.ops.higher_order.invoke_subgraph
    assert not any(n.target is hop for n in marked.graph.nodes)
    assert len(marked.bitfx_report.rewrites) == len(plain.bitfx_report.rewrites) > 0
    with torch.no_grad():
        assert torch.equal(marked(**kwargs).last_hidden_state, plain(**kwargs).last_hidden_state)


def test_unmark_restores_the_forward_and_bad_input_is_named():
    model, _, kwargs = bert(layers=2)
    layer_cls = type(model.encoder.layer[0])
    before = layer_cls.__dict__.get("forward")
    with torch.no_grad():
        eager = model(**kwargs).last_hidden_state
        bitfx.trace_once(model)
        assert layer_cls.forward is not before
        assert torch.equal(model(**kwargs).last_hidden_state, eager)  # eager: the forward runs unchanged
    blocks.unmark()
    assert layer_cls.__dict__.get("forward") is before and not blocks.MARKED
    with pytest.raises(TypeError, match="nn.Module; got str"):
        bitfx.trace_once("bert")
    with pytest.raises(TypeError, match="nn.Module classes; got 3"):
        bitfx.trace_once(model, classes=[3])
