"""``bitfx demo``: compile a built-in BERT-base-shaped encoder and show what bitfx did and saved."""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

import bitfx
from bitfx import backend
from bitfx.config import BinarizeConfig
from bitfx.models import bert_encoder
from bitfx.perf import ceiling


def _median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bitfx demo", description=__doc__)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--config", default="bipft", help="preset name (default: bipft)")
    parser.add_argument("--kernels", default="tvm", choices=("tvm", "reference"))
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args(argv)
    console = Console()

    config = BinarizeConfig.preset(args.config)
    model, inputs = bert_encoder(layers=args.layers, batch=args.batch, seq=args.seq)
    console.print(f"[bold]bitfx demo[/]: BERT-base-shaped encoder, {args.layers} layers, "
                  f"batch {args.batch} × seq {args.seq}, preset [cyan]{args.config}[/], kernels {args.kernels}")
    torch._dynamo.reset()
    with torch.no_grad():
        y_float = model(*inputs)
        t0 = time.perf_counter()
        compiled = torch.compile(model, backend="bitfx", options={"config": config, "kernels": args.kernels})
        y = compiled(*inputs)
        compile_s = time.perf_counter() - t0
        report = backend.REPORTS[-1]
        t_float = _median_ms(lambda: model(*inputs), args.repeat)
        t_bitfx = _median_ms(lambda: compiled(*inputs), args.repeat)
        # the reference: the same passes through bitfx.binarize, ops run by their PyTorch definitions
        # (a second torch.compile of the same model would share dynamo's cache entry)
        y_ref = bitfx.binarize(model, inputs, config)(*inputs)
    # bytes as `bitfx diff` counts them: 1 bit per binary weight (2 ternary) + fp32 scales, bias, move
    d = bitfx.diff(model, inputs, config)
    totals = d.totals
    linears = [ly for ly in d.layers if ly.target == "bit_linear"]
    before, after = totals["bytes_before"], totals["bytes_after"]

    table = Table(title="what bitfx did")
    table.add_column("")
    table.add_column("value", justify="right")
    lin = report.count("linear")
    att = report.count("attention", "bit_attention")
    kept = [s for s in report.skips if s.pass_name.startswith("binarize")]
    table.add_row("linears rewritten → bit_linear", str(lin))
    table.add_row("attentions rewritten → bit_attention", str(att))
    table.add_row("left in float", ", ".join(f"{s.module or s.kind} ({s.reason})" for s in kept) or "none")
    table.add_row("parameter bytes, fp32", f"{before / 2**20:.2f} MiB")
    table.add_row("parameter bytes, bitfx", f"{after / 2**20:.2f} MiB ({before / after:.1f}× smaller)")
    table.add_row("compile time", f"{compile_s:.1f} s")
    table.add_row("float eager", f"{t_float:.2f} ms")
    table.add_row(f"bitfx ({args.kernels} kernels)", f"{t_bitfx:.2f} ms ({t_float / t_bitfx:.2f}× vs float)")
    try:  # the same-run ceiling of this CPU (DESIGN §5): what the linears could cost at best
        c = ceiling.measure(128, 768, 3072)
        macs = sum(ly.before.macs for ly in linears)
        at_ceiling = macs / (c.gbit_per_s * 1e9 * torch.get_num_threads()) * 1e3
        table.add_row("binary-GEMM ceiling (this CPU, same run)", f"{c.gbit_per_s:.0f} G bit-MACs/s per core ({c.isa})")
        table.add_row("linears at the ceiling", f"{at_ceiling:.2f} ms ({macs / 1e6:.0f} M bit-MACs; "
                      f"the rest of bitfx's {t_bitfx:.2f} ms is float parts and overhead)")
    except ceiling.CeilingUnavailable as err:
        table.add_row("binary-GEMM ceiling", f"not measured: {err}")
    table.add_row("max |compiled − reference|", f"{(y - y_ref).abs().max().item():.2e}")
    table.add_row("max |compiled − float model|", f"{(y - y_float).abs().max().item():.2e} (binarized: differs)")
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
