"""How long dynamo's trace takes before any backend starts: the floor under a warm ``torch.compile``.

    python benchmarks/dynamo_floor.py                   # 1 and 12 layers, plain and nested_compile_region
    python benchmarks/dynamo_floor.py --precompile      # also: torch's dynamo cache on a 12-layer HF BERT

Each figure is a fresh process: dynamo's first-use imports are done on a one-line function first, then
``torch.compile(model, backend=<returns the graph as it is>)`` of the BERT-base-shaped model
(``bitfx.models.bert_encoder``) and its first call (eager, ~0.3 s at 12 layers) are timed. ``nested``: the
layer's ``forward`` marked ``torch.compiler.nested_compile_region`` (dynamo traces it once; the graph then holds
``invoke_subgraph`` calls). ``--precompile`` runs a 12-layer random-init HF ``BertModel`` twice under
``TORCH_CACHING_PRECOMPILE=1`` with inductor, saving dynamo's output in the first process, and reports whether
the second one loads it. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

_TRACE = r"""
import sys, time, torch
from bitfx.models import bert_encoder
torch.compile(lambda x: torch.relu(x) + 1, backend="eager")(torch.randn(3))  # dynamo's first-use imports
model, inputs = bert_encoder(layers=int(sys.argv[1]))
if sys.argv[2] == "nested":
    cls = type(model.layer[0])
    cls.forward = torch.compiler.nested_compile_region(cls.forward)
start = time.perf_counter()
with torch.no_grad():
    torch.compile(model, backend=lambda gm, example_inputs: gm.forward)(*inputs)
print(f"{time.perf_counter() - start:.2f}")
"""

_PRECOMPILE = r"""
import sys, time, torch, transformers
from torch._dynamo.utils import counters
torch.manual_seed(0)
cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=12, num_attention_heads=4, intermediate_size=128)
model = transformers.BertModel(cfg).eval()
x = torch.randint(0, 1000, (2, 16))
with torch.no_grad():
    torch.compile(model, backend="inductor")(x)
if sys.argv[1] == "save":
    torch.compiler.save_cache_artifacts()
    from torch._dynamo.precompile_context import PrecompileContext
    PrecompileContext.save_to_dynamo_cache()
print(dict(counters["dynamo_cache"]))
"""


def _run(code: str, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--precompile", action="store_true")
    args = p.parse_args(argv)
    for layers in (1, args.layers):
        for mode in ("plain", "nested"):
            out = _run(_TRACE, str(layers), mode)
            took = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else f"failed: {out.stderr[-300:]}"
            print(f"dynamo trace + eager first call, {layers:2d} layer(s), {mode:6s}: {took} s", flush=True)
    if args.precompile:
        with tempfile.TemporaryDirectory() as cache:
            env = {"TORCH_CACHING_PRECOMPILE": "1", "TORCHINDUCTOR_CACHE_DIR": cache}
            for step in ("save", "load"):
                out = _run(_PRECOMPILE, step, env=env)
                tail = out.stdout.strip().splitlines()[-1:] if out.returncode == 0 else \
                    [line for line in out.stderr.strip().splitlines() if "Error" in line][-1:]
                print(f"torch's dynamo cache, {step}: {'ok' if out.returncode == 0 else 'failed'} {tail}", flush=True)


if __name__ == "__main__":
    main()
