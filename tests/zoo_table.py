"""The zoo table: model x entry point x counts x agreement (issue 8's closing note).

    python3 tests/zoo_table.py [NAME ...] [--export TARGET]

For each model of tests/hf_zoo.py: the bit_linear / bit_attention counts of ``bitfx.binarize``,
``torch.compile(backend="bitfx")`` (reference kernels) and ``bitfx.diff``, the expected counts,
the relative error compile vs binarize and binarize vs float, and, with ``--export``, whether
``bitfx.export`` builds the model for TARGET (and verifies it under qemu for aarch64 targets).
Prints one Markdown table.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.utils._pytree as pytree

sys.path.insert(0, str(Path(__file__).parent))

import bitfx  # noqa: E402
import bitfx.backend  # noqa: E402
from hf_zoo import ZOO  # noqa: E402

REFERENCE = {"config": "bipft", "kernels": "reference"}


def rel_err(y, ref) -> float:
    ys = [x for x in pytree.tree_leaves(y) if isinstance(x, torch.Tensor)]
    refs = [x for x in pytree.tree_leaves(ref) if isinstance(x, torch.Tensor)]
    return max(float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)) for a, b in zip(ys, refs))


def run(model, args, kwargs):
    args, kwargs = copy.deepcopy((args, kwargs))
    with torch.no_grad():
        return model(*args, **kwargs)


def row(name: str, export_target: str | None) -> list[str]:
    torch._dynamo.reset()
    z = ZOO[name]
    model, args, kwargs = z.make()
    t = time.time()
    gm = bitfx.binarize(model, args, example_kwargs=kwargs)
    r = gm.bitfx_report
    b = (r.count("linear", "bit_linear"), r.count("attention", "bit_attention"))
    bitfx.backend.REPORTS.clear()  # (it keeps the newest 64: an offset into a full list would see none)
    compiled = torch.compile(model, backend="bitfx", options=REFERENCE)
    y_c, y_b, y_f = run(compiled, args, kwargs), run(gm, args, kwargs), run(model, args, kwargs)
    reports = list(bitfx.backend.REPORTS)
    c = (sum(x.count("linear", "bit_linear") for x in reports), sum(x.count("attention", "bit_attention") for x in reports))
    d = bitfx.diff(model, args, example_kwargs=kwargs)
    binary = [ly for ly in d.layers if ly.status == "binary"]
    dc = (sum(ly.kind == "linear" for ly in binary), sum(ly.kind == "attention" for ly in binary))
    exported = "—"
    if export_target:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                bitfx.export(gm, args, export_target, Path(tmp) / "model.so", example_kwargs=kwargs,
                             verify=export_target.endswith("arm64"), bundle=False)
            from bitfx.relax.importer import to_relax

            exported = ("verified" if export_target.endswith("arm64") else "built") + ", " + {
                True: "symbolic shapes", "batch": "symbolic batch", False: "example shapes"}[to_relax.last_dynamic]
        except Exception as e:  # noqa: BLE001 — the table reports it
            exported = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    fmt = lambda p: f"{p[0]} / {p[1]}"  # noqa: E731
    same = "yes" if b == c == dc == (z.linears, z.attentions) else "NO"
    return [name, fmt((z.linears, z.attentions)), fmt(b), fmt(c), fmt(dc), same, f"{rel_err(y_c, y_b):.1e}",
            f"{rel_err(y_b, y_f):.2f}", type(y_b).__name__, exported, f"{time.time() - t:.0f}"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", default=list(ZOO))
    p.add_argument("--export", metavar="TARGET", help="also bitfx.export each model for TARGET")
    a = p.parse_args(argv)
    head = ["model", "expected lin/att", "binarize", "torch.compile", "diff", "same counts",
            "rel err compile vs binarize", "rel err binary vs float", "output", f"export {a.export or ''}".strip(), "s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name in a.names:
        try:
            cells = row(name, a.export)
        except Exception as e:  # noqa: BLE001
            cells = [name, f"fails: {type(e).__name__}: {str(e).splitlines()[0][:100]}"] + [""] * (len(head) - 2)
        print("| " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
