"""What the regional tests share: a small random-init HF BERT and a count of the calibrations run."""
import pytest
import torch

from bitfx import backend


def hf_bert(layers: int = 3):
    """A random-init HF BERT (hidden 64, 4 heads, FFN 128) and a batch of token ids."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=300)
    model = transformers.BertModel(cfg).eval()
    return model, torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def calibrations(monkeypatch):
    """Counts the calibrations run (those read back from a cache are not)."""
    calls = []
    real = backend.calibrate
    monkeypatch.setattr(backend, "calibrate", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    torch._dynamo.reset()
    yield calls
    torch._dynamo.reset()
