"""``bitfx bench``: run the benchmark scripts of a source checkout (they print ratios vs baselines)."""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

SCRIPTS = {"linear": "bench_linear.py", "encoder": "bench_encoder.py", "minilm": "bench_minilm.py"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bitfx bench", description=__doc__)
    p.add_argument("which", choices=sorted(SCRIPTS), help="linear: bit_linear kernels; encoder: layer, compile time, bytes; "
                   "minilm: HF all-MiniLM-L6-v2 end to end")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the script (see its --help)")
    args = p.parse_args(argv)
    script = Path(__file__).resolve().parent.parent / "benchmarks" / SCRIPTS[args.which]
    if not script.is_file():
        print(f"bitfx bench: {script} not found; benchmarks ship with the source checkout "
              "(git clone, then `pip install -e .`)", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0
