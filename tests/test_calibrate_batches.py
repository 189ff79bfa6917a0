"""bitfx.calibrate over many batches: running statistics, not the first batch only.

The model is two binarized linears, so every statistic can be recomputed here independently:
after N batches, α of each layer is the mean of the N per-batch values 2·mean|x + move|, where
the second layer's input at batch b comes from the first layer with its running α after b batches.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bitfx


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = MLP().eval()
    g = torch.Generator().manual_seed(1)
    # batches of clearly different scale: the first batch's statistic is far from the mean
    batches = [(torch.randn(8, 16, generator=g) * (b + 1),) for b in range(3)]
    qat = bitfx.binarize(model, batches[0], "bipft")
    return model, qat, batches


def stat(x, move):
    return 2.0 * (x + move).abs().mean()


def test_binarize_uses_the_first_batch(setup):
    model, qat, batches = setup
    x0 = batches[0][0]
    assert torch.allclose(qat.bitfx_alpha__fc1.detach(), stat(x0, qat.bitfx_move__fc1.detach()).reshape(1),
                          rtol=1e-6)


def test_alpha_is_the_mean_over_all_batches(setup):
    model, qat, batches = setup
    first_batch_alpha1 = qat.bitfx_alpha__fc1.detach().clone()
    bitfx.calibrate(qat, batches, progress=True)
    move1, move2 = qat.bitfx_move__fc1.detach(), qat.bitfx_move__fc2.detach()
    stats1 = torch.stack([stat(x, move1) for (x,) in batches])
    alpha1 = qat.bitfx_alpha__fc1.detach().reshape(())
    assert torch.allclose(alpha1, stats1.mean(), rtol=1e-6)
    # the way it should differ from first-batch calibration: by the spread of the batches
    assert not torch.allclose(alpha1, first_batch_alpha1.reshape(()), rtol=0.1)
    assert float(first_batch_alpha1) == pytest.approx(float(stats1[0]), rel=1e-6)

    # second layer: its input at batch b is computed with fc1's running α after b + 1 batches
    w1, b1 = model.fc1.weight.detach(), model.fc1.bias.detach()
    stats2 = []
    for b, (x,) in enumerate(batches):
        running = stats1[: b + 1].mean()
        s1 = w1.abs().mean()
        h = F.gelu(F.linear(running * torch.where(x + move1 < 0, -1.0, 1.0),
                            s1 * torch.where(w1 - w1.mean() < 0, -1.0, 1.0), b1))
        stats2.append(stat(h, move2))
    assert torch.allclose(qat.bitfx_alpha__fc2.detach().reshape(()), torch.stack(stats2).mean(), rtol=1e-5)


def test_keyword_and_tensor_batches(setup):
    model, qat, batches = setup
    bitfx.calibrate(qat, [x for (x,) in batches])           # single tensors
    a = qat.bitfx_alpha__fc1.detach().clone()
    bitfx.calibrate(qat, [{"x": x} for (x,) in batches])   # keyword inputs
    assert torch.equal(a, qat.bitfx_alpha__fc1.detach())
    with pytest.raises(ValueError, match="batches is empty"):
        bitfx.calibrate(qat, [])
