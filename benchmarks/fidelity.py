"""Fidelity figures (FIDELITY.md): how close bitfx's binary models and binarizers get to float.

    python benchmarks/fidelity.py table1            # (a) BiViT Table 1 on real MiniLM attention
    python benchmarks/fidelity.py bipft             # (b) BiPFT QKᵀ residual, ranks 1, 2, 4
    python benchmarks/fidelity.py digits [--quick]  # (c) ViT on sklearn digits, every preset, distilled
    python benchmarks/fidelity.py minilm --preset bitnet [--quick]   # (d) distilled binary MiniLM

(a) and (b) read all-MiniLM-L6-v2's real q, k and attention probabilities on real held-out
sentences (the float model's own: the binarized attention is probed, the float attention is what
runs on). Each prints a Markdown table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.fx as fx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import bitfx  # noqa: E402
from bitfx.calibrate import bivit_beta, flat_inputs  # noqa: E402
from bitfx.ops import BIT_ATTENTION  # noqa: E402
from bitfx.ops import attention as A  # noqa: E402
from bitfx.ops import quantizers as q  # noqa: E402


class Probe(fx.Interpreter):
    """Runs a binarized graph with float attention, handing each bit_attention's inputs to ``fn``."""

    def __init__(self, gm, fn):
        super().__init__(gm)
        self.fn, self.layer = fn, 0

    def run_node(self, n):
        if n.op == "call_function" and n.target == BIT_ATTENTION:
            args, _ = self.fetch_args_kwargs_from_env(n)
            self.fn(self.layer, args)
            self.layer += 1
            qt, k, v, mask = args[:4]
            return A.attention_reference(qt, k, v, mask, args[11], args[12], 0.0).to(qt.dtype)
        return super().run_node(n)


def probe(gm, batches, fn):
    with torch.no_grad():
        for b in batches:
            Probe(gm, fn).run(*flat_inputs(gm, b))


def _minilm_data(n_train=4, n_held=4, size=16, max_len=64, concat=1):
    from distill_minilm import batches, load_minilm, sentences

    tokenizer, teacher = load_minilm()
    train, held = sentences()
    if concat > 1:  # longer inputs: `concat` consecutive sentences per input
        train, held = ([" ".join(t[i:i + concat]) for i in range(0, len(t) - concat + 1, concat)]
                       for t in (train, held))
        max_len = 64 * concat
    return teacher, batches(tokenizer, train[: n_train * size], size, max_len), \
        batches(tokenizer, held[: n_held * size], size, max_len)


def _float_probs(args):
    qt, k, _, mask = args[:4]
    s = A.apply_mask((qt.float() @ k.float().transpose(-2, -1)) * A._default_scale(qt, args[11]), mask, args[12])
    return s, torch.softmax(s, dim=-1)


def _rows(mask_ids: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Query rows of real tokens: [B, 1, L, 1] broadcast over heads and keys."""
    return mask_ids[:, None, :, None].bool().expand(p.shape[0], p.shape[1], p.shape[2], 1)


# ------------------------------------------------------------------------------------ (a) Table 1
def table1(args) -> dict:
    teacher, train_b, held_b = _minilm_data(concat=args.concat, size=16 // args.concat)
    cfg = bitfx.BinarizeConfig.preset("bivit", linear=False)
    gm = bitfx.binarize(teacher, train_b[0], cfg)
    betas: dict[int, list] = {}
    probe(gm, train_b, lambda i, a: betas.setdefault(i, []).append(float(bivit_beta(_float_probs(a)[1]))))
    fitted = {i: sum(v) / len(v) for i, v in betas.items()}
    alphas: dict[int, list] = {}
    probe(gm, train_b, lambda i, a: alphas.setdefault(i, []).append(float(4 * _float_probs(a)[1].mean())))
    alpha = {i: sum(v) / len(v) for i, v in alphas.items()}

    methods = ("bibert_bool", "bivit_0.25", "bivit_fitted", "bivit_row_cd", "bit_elastic")
    err = {(m, s): [0.0, 0.0] for m in methods for s in (False, True)}
    ones = {m: [0.0, 0.0] for m in methods}
    current = {}

    def measure(i, a):
        s, p = _float_probs(a)
        keep = _rows(current["mask"], p).float()
        rowmax = p.amax(-1, keepdim=True)
        codes = {
            "bibert_bool": q.prob_bool(s)[0],
            "bivit_0.25": (p >= 0.25 * rowmax).float(),
            "bivit_fitted": (p >= fitted[i] * rowmax).float(),
            "bivit_row_cd": _row_cd(p),
            "bit_elastic": q.prob_elastic(p, torch.tensor(alpha[i]))[0],
        }
        for m, b in codes.items():
            base = alpha[i] if m == "bit_elastic" else 1.0
            opt = (p * b).sum(-1, keepdim=True) / (b * b).sum(-1, keepdim=True).clamp(min=1)
            for scaled, scale in ((False, base), (True, opt)):
                err[(m, scaled)][0] += float(((p - scale * b) ** 2 * keep).sum())
                err[(m, scaled)][1] += float((p ** 2 * keep).sum())
            ones[m][0] += float((b * keep).sum())
            ones[m][1] += float(keep.sum())

    for b in held_b:
        current["mask"] = b[1]
        probe(gm, [b], measure)
    rows = {m: {"error": err[(m, False)][0] / err[(m, False)][1],
                "error_scaled": err[(m, True)][0] / err[(m, True)][1],
                "ones_per_row": ones[m][0] / ones[m][1]} for m in methods}
    print("| binarizer | relative error ‖P − P̂‖²/‖P‖² | with optimal per-row scale | ones per row |")
    print("|---|---|---|---|")
    for m, r in rows.items():
        print(f"| {m} | {r['error']:.4g} | {r['error_scaled']:.4g} | {r['ones_per_row']:.1f} |")
    out = {"figure": "table1", "concat": args.concat,
           "mean_tokens": float(sum(b[1].sum() for b in held_b) / sum(b[1].shape[0] for b in held_b)),
           "fitted_beta": fitted, "elastic_alpha": alpha, "rows": rows,
           "held_out_sentences": sum(b[0].shape[0] for b in held_b)}
    print(json.dumps(out))
    return out


def _row_cd(p: torch.Tensor, iters: int = 10) -> torch.Tensor:
    """BiViT's per-row coordinate descent: v = (a·b)/(b·b), T = v/2, b = 1[a >= T]."""
    b = (p >= 0.25 * p.amax(-1, keepdim=True)).float()
    for _ in range(iters):
        v = (p * b).sum(-1, keepdim=True) / b.sum(-1, keepdim=True).clamp(min=1)
        b = (p >= v / 2).float()
    return b


# ------------------------------------------------------------------------------------ (b) BiPFT
def bipft_residual(args) -> dict:
    teacher, train_b, held_b = _minilm_data()
    rows = {}
    for rank in (1, 2, 4):
        gm = bitfx.binarize(teacher, train_b[0], bitfx.BinarizeConfig.preset("bipft", linear=False,
                                                                              estimator_rank=rank))
        bitfx.calibrate(gm, train_b, estimator_steps=args.estimator_steps)
        acc = {"none": [0.0, 0.0], "estimators": [0.0, 0.0]}
        current = {}

        def measure(i, a):
            qt, k = a[0].float(), a[1].float()
            exact = qt @ k.transpose(-2, -1)
            _, _, qb = q.act_sign(qt, None, a[4])
            _, _, kb = q.act_sign(k, None, a[5])
            binary = qb @ kb.transpose(-2, -1)
            est = A._score_residual(a[8], a[9])
            keep = (current["mask"][:, None, :, None] * current["mask"][:, None, None, :]).float()
            for name, approx in (("none", binary), ("estimators", binary + est)):
                acc[name][0] += float(((exact - approx) ** 2 * keep).sum())
                acc[name][1] += float((exact ** 2 * keep).sum())

        for b in held_b:
            current["mask"] = b[1]
            probe(gm, [b], measure)
        rows[rank] = {k: v[0] / v[1] for k, v in acc.items()}
    print("| rank | ‖QKᵀ − α²·sign(Q)sign(K)ᵀ‖²/‖QKᵀ‖² (no estimator) | with least-squares estimators |")
    print("|---|---|---|")
    for r, v in rows.items():
        print(f"| {r} | {v['none']:.4f} | {v['estimators']:.4f} |")
    out = {"figure": "bipft_residual", "rows": rows, "estimator_steps": args.estimator_steps}
    print(json.dumps(out))
    return out


# ------------------------------------------------------------------------------------ (c), (d)
def digits(args) -> dict:
    import digits as d

    out = d.run(quick=args.quick, presets=args.presets, steps=args.steps, lr=args.lr, cache=args.teacher)
    print(json.dumps({"figure": "digits", **out}))
    return out


def minilm(args) -> dict:
    from distill_minilm import run

    steps, batch, max_len, held = (100, 16, 40, 256) if args.quick else (args.steps, 32, 64, 512)
    out = run(args.preset, steps, batch, max_len, args.lr, held, calib=4, save=None)
    print(json.dumps({"figure": "minilm", **out}))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="bitfx fidelity figures")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared machine)")
    sub = ap.add_subparsers(dest="figure", required=True)
    t = sub.add_parser("table1")
    t.add_argument("--concat", type=int, default=1, help="sentences joined per input (longer sequences)")
    b = sub.add_parser("bipft")
    b.add_argument("--estimator-steps", type=int, default=200)
    c = sub.add_parser("digits")
    c.add_argument("--quick", action="store_true")
    c.add_argument("--presets", nargs="*", default=None)
    c.add_argument("--steps", type=int, default=None)
    c.add_argument("--lr", type=float, default=None, help="peak lr (default: examples/digits.py's per preset)")
    c.add_argument("--teacher", default=None, help="cache of the float ViT (state dict, read or written)")
    m = sub.add_parser("minilm")
    m.add_argument("--preset", default="bitnet")
    m.add_argument("--quick", action="store_true")
    m.add_argument("--steps", type=int, default=2000)
    m.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    {"table1": table1, "bipft": bipft_residual, "digits": digits, "minilm": minilm}[args.figure](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
