"""bitfx.distill: the loss terms are what they claim to be, and training lowers them."""
import copy

import pytest
import torch
import torch.nn.functional as F

import bitfx
from bitfx.distill import Pairing, _output_loss, _teacher_graph
from bitfx.models import tiny_bert


def batch(seed, n=8, seq=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 1000, (n, seq), generator=g), torch.ones(n, seq, dtype=torch.long)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    model, example = tiny_bert(layers=1, seq=8)
    return model.eval(), example


@pytest.fixture(scope="module")
def student(teacher):
    model, example = teacher
    return bitfx.binarize(model, example, "bipft")


def test_pairs_blocks_and_attention_by_module_path(teacher, student):
    model, example = teacher
    pairs = Pairing(student, _teacher_graph(model, example), None)
    assert pairs.blocks == ["layer.0"]
    assert pairs.attentions == ["layer.0.attention#0"]
    only = Pairing(student, _teacher_graph(model, example), ["layer.0.attention"])
    assert only.blocks == ["layer.0.attention"]


def test_distill_lowers_the_loss(teacher):
    model, example = teacher
    student = bitfx.binarize(model, example, "bipft")  # the student's own weights: model stays the teacher
    batches = [batch(1), batch(2)]
    ids, mask = batches[0]
    with torch.no_grad():
        before = F.mse_loss(student(ids, mask), model(ids, mask))
    steps = 30
    bitfx.distill(student, model, batches, steps=steps, lr=3e-3, progress=True, log_every=2)
    log = student.bitfx_distill_log
    # step 0's output term is the plain MSE of the two models' outputs, computed independently above
    assert log[0]["output"] == pytest.approx(float(before), rel=1e-4)
    assert log[0]["hidden"] > 0 and log[0]["attention"] > 0
    with torch.no_grad():
        after = F.mse_loss(student(ids, mask), model(ids, mask))
    assert log[-1]["step"] == steps - 1
    # the same batch (even steps) before and after: every term and the outputs move towards the teacher
    first, last = log[0], [r for r in log if r["step"] % 2 == 0][-1]
    assert last["loss"] < 0.7 * first["loss"], (first, last)
    assert last["hidden"] < first["hidden"]
    assert float(after) < 0.7 * float(before), (float(before), float(after))


def test_kl_output_loss_is_the_temperature_scaled_kl():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    expected = F.kl_div(F.log_softmax(s / 2, -1), F.softmax(t / 2, -1), reduction="batchmean") * 4
    assert float(_output_loss(s, t, "kl", 2.0)) == pytest.approx(float(expected), rel=1e-5)
    cos = (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    assert float(_output_loss(s, t, "cosine", 1.0)) == pytest.approx(float(cos), rel=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"output_loss": "l1"}, "output_loss='l1'"),
    ({"attention": "maps"}, "attention='maps'"),
    ({"weights": {"logits": 1.0}}, "unknown weights"),
    ({"steps": 0}, "steps=0"),
    ({"blocks": ["nothing.*"]}, "match no module path"),
    ({"parallel": "zero"}, "parallel='zero'"),
])
def test_bad_arguments_are_named(teacher, student, kwargs, match):
    model, example = teacher
    args = {"steps": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        bitfx.distill(student, model, [example], progress=False, **args)


def test_empty_batches(teacher, student):
    model, example = teacher
    with pytest.raises(ValueError, match="batches is empty"):
        bitfx.distill(student, model, [], steps=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_distill_on_cuda(teacher):
    model, example = teacher
    model = copy.deepcopy(model).cuda()
    cuda = tuple(t.cuda() for t in example)
    student = bitfx.binarize(model, cuda, "bipft")
    batches = [tuple(t.cuda() for t in batch(1))]
    bitfx.distill(student, model, batches, steps=10, lr=3e-3, progress=False, log_every=1)
    log = student.bitfx_distill_log
    assert all(p.device.type == "cuda" for p in student.parameters())
    assert log[-1]["loss"] < log[0]["loss"]
