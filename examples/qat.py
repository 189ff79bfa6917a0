"""Quantization-aware training of a binarized model (straight-through gradients).

    python examples/qat.py

Binarizes a small BERT-style encoder with the BiPFT preset, calibrates its scales and estimators
on a few batches, then fine-tunes it on a toy task (is token 1 present in the sequence?).
"""
import torch

import bitfx
from bitfx.models import tiny_bert


def batch(n=16, seq=16, vocab=1000, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    ids = torch.randint(2, vocab, (n, seq), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids[labels == 1, 5] = 1
    return ids, torch.ones(n, seq, dtype=torch.long), labels


def main(steps: int = 40) -> None:
    torch.manual_seed(0)
    model, example = tiny_bert(layers=2, seq=16)
    model.train(False)  # binary attention has no dropout; train the binarized graph instead
    qat = bitfx.binarize(model, example, "bipft")
    print(qat.bitfx_report.summary())
    bitfx.calibrate(qat, [batch(seed=i)[:2] for i in range(3)])

    opt = torch.optim.Adam(qat.parameters(), lr=2e-3)
    for step in range(steps):
        ids, mask, labels = batch()
        loss = torch.nn.functional.cross_entropy(qat(ids, mask), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
