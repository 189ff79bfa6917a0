"""One thread pool or two, in one process: a BERT-base layer compiled by bitfx, its kernel libraries' parallel
launch pointer (`__TVMBackendParallelLaunch`) switched every round between torch's OpenMP pool (bitfx's
default once the C++ library loads) and TVM's own pool; inductor fp32 timed in the same rounds. Load on the
machine disturbs this comparison less than two runs one after the other.

    python benchmarks/bench_pool.py SEQ THREADS ROUNDS      # e.g. 128 2 10

Prints the median of the round medians (ms), with min and max. Every round checks the output is unchanged.
Nothing here is asserted; tests never assert on time.
"""
import ctypes, os, statistics, sys, time
import torch
import bitfx
from bitfx.models import BertConfig, Layer
from bitfx.ops import native
from bitfx.codegen import build

seq, threads, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
torch.manual_seed(0)
layer = Layer(BertConfig()).eval()
x, mask = torch.randn(1, seq, 768), torch.zeros(1, 1, 1, seq)
with torch.no_grad():
    ind = torch.compile(layer); ind(x, mask)
    torch._dynamo.reset()
    fast = torch.compile(layer, backend="bitfx"); fast(x, mask)
    assert native.load() and native.pool_status() == "torch-openmp", native.pool_status()
    fast(x, mask); fast(x, mask)
    ref = fast(x, mask)
vars_ = []
for p in build.loaded_libraries():
    lib = ctypes.CDLL(p)
    try:
        vars_.append(ctypes.c_void_p.in_dll(lib, "__TVMBackendParallelLaunch"))
    except ValueError:
        pass
ours = vars_[0].value
g = ctypes.CDLL(None)
tvms = ctypes.cast(g.TVMBackendParallelLaunch, ctypes.c_void_p).value
assert ours != tvms

def use(ptrs):
    for a in vars_:
        a.value = ptrs

def ms(fn, n):
    t = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); t.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(t)

res = {"torch pool": [], "tvm pool": [], "inductor": []}
n = 10 if seq > 1 else 100
with torch.no_grad():
    for r in range(rounds):
        order = [("torch pool", ours), ("tvm pool", tvms)][:: 1 if r % 2 else -1]
        for name, ptrs in order:
            use(ptrs); fast(x, mask)
            res[name].append(ms(lambda: fast(x, mask), n))
            assert torch.equal(fast(x, mask), ref)
        res["inductor"].append(ms(lambda: ind(x, mask), n))
    use(ours)
print(f"seq {seq}, {threads} threads, {rounds} rounds x {n} calls, load {os.getloadavg()[0]:.2f}; "
      f"{len(vars_)} kernel libraries switched; median of round medians (ms) [min, max]:")
for k, v in res.items():
    print(f"  {k:10s} {statistics.median(v):8.3f} [{min(v):.3f}, {max(v):.3f}]   vs inductor "
          f"{statistics.median(res['inductor']) / statistics.median(v):.2f}x")
