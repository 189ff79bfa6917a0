"""``bitfx.binarize`` gives the student its own parameters: training it leaves the float model as it was.

``torch.export``'s ``ep.module()`` reuses the model's tensors; ``binarize`` copies each shared storage
once (``bitfx.api.own_tensors``), so weights tied in the model stay tied in the student.
"""
import copy

import pytest
import torch
import torch.nn as nn

import bitfx
from bitfx.models import tiny_bert


def storages(module):
    return {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}


def test_training_the_student_leaves_the_float_model_unchanged():
    torch.manual_seed(0)
    model, example = tiny_bert(layers=1, seq=8)
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        float_out = model(*example)
    # the student binarized from a private copy of the model (what users had to do before)
    reference = bitfx.binarize(copy.deepcopy(model), example, "bipft")

    student = bitfx.binarize(model, example, "bipft")
    assert not storages(student) & storages(model)  # no tensor shared with the float model
    with torch.no_grad():
        step0 = student(*example)
        assert torch.equal(step0, reference(*example))  # the copy changes nothing at step 0

    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    loss = (student(*example) - float_out).pow(2).mean()
    loss.backward()
    opt.step()

    with torch.no_grad():
        assert not torch.equal(student(*example), step0)  # the student trained
        assert torch.equal(model(*example), float_out)  # the float model's output is identical
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.body = nn.Linear(32, 32)
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.embed.weight  # tied, as GPT-2's lm_head and wte
        self.register_buffer("shift", torch.linspace(-1, 1, 32))

    def forward(self, ids):
        return self.head(torch.relu(self.body(self.embed(ids) + self.shift)))


def test_tied_weights_stay_tied_and_are_copied_once():
    torch.manual_seed(0)
    model = TiedLM().eval()
    ids = torch.randint(0, 50, (2, 6))
    student = bitfx.binarize(model, (ids,), "bitnet")
    params = dict(student.named_parameters(remove_duplicate=False))
    tied = [p for n, p in params.items() if n.endswith("embed.weight") or n.endswith("head.weight")]
    assert len(tied) == 2 and tied[0] is tied[1]  # one tensor under both names
    assert tied[0] is not model.embed.weight and torch.equal(tied[0], model.embed.weight)
    assert not storages(student) & storages(model)
    buffers = [b for n, b in student.named_buffers() if n.endswith("shift")]
    assert len(buffers) == 1 and torch.equal(buffers[0], model.shift)
    with torch.no_grad():
        tied[0].add_(1.0)
    assert torch.equal(model.head.weight, model.embed.weight)
    assert not torch.equal(model.embed.weight, tied[0])  # the update did not reach the model


def test_torch_compile_still_reads_the_live_model():
    """The ``torch.compile`` path is untouched: the compiled module runs on the model's own parameters."""
    torch.manual_seed(0)
    model, example = tiny_bert(layers=1, seq=8)
    model.eval()
    torch._dynamo.reset()
    fast = torch.compile(model, backend="bitfx", options={"kernels": "reference"})
    with torch.no_grad():
        before = fast(*example)
        model.layer[0].output.weight.mul_(-1.0)  # an in-place update of a binarized weight
        after = fast(*example)
    assert not torch.equal(before, after)
