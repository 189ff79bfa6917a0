"""The C++ kernel ops (``bitfx/ops/native.cpp``): bit for bit the Python path, exact integers against an
independent NumPy formulation, a plan cache that follows in-place updates, and the Python path when the
C++ kernels are off or cannot be built."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import bitfx  # noqa: F401
from bitfx.ops import kernel_ops, native

OP = torch.ops.bitfx_kernels.bit_linear.default
SCORES = torch.ops.bitfx_kernels.sign_scores.default
PV = torch.ops.bitfx_kernels.binary_pv.default
REFERENCE = torch.ops.bitfx.bit_linear.default

pytestmark = pytest.mark.skipif(native._compiler() is None, reason="no C++ compiler (c++, g++, clang++)")

MODES = [(w, a, bits) for w in ("sign_channel", "sign_tensor", "ternary")
         for a, bits in (("sign", 1), ("absmax", 2), ("absmax", 4), ("absmax", 8))]


@pytest.fixture(scope="module", autouse=True)
def loaded():
    assert native.load(), native.status()  # (waits for the build on a cold cache)
    assert native.status() == "loaded"


def _np_sign(u):
    return np.where(u < 0, -1, 1).astype(np.int64)


def _np_weight_codes(w, mode):
    if mode == "sign_channel":
        return _np_sign(w - w.mean(axis=1, keepdims=True))
    if mode == "sign_tensor":
        return _np_sign(w - w.mean())
    gamma = np.float32(max(np.abs(w).mean(), 1e-5))
    return np.clip(np.rint(w / gamma), -1, 1).astype(np.int64)


def _np_act(x, mode, bits, move):
    """(integer codes, per-row scale as float32) of the activations, written from the method definitions."""
    if mode == "sign":
        u = x if move is None else x + move
        return _np_sign(u), None
    qp = 2 ** (bits - 1) - 1
    inv = (np.float32(qp) / np.maximum(np.abs(x).max(-1), np.float32(1e-5))).astype(np.float32)
    return np.clip(np.rint(x * inv[:, None]), -qp - 1, qp).astype(np.int64), (np.float32(1) / inv).astype(np.float32)


def _args(x, w, b, mode, move=None, alpha=None, ws=None, **kw):
    wm, am, bits = mode
    return (x, w, b, ws, move, alpha, wm, am, bits, kw.pop("cache", True), *kw.pop("view", ()))


@pytest.mark.parametrize("mode", MODES, ids=["-".join(map(str, m)) for m in MODES])
def test_cpp_equals_python_path_and_integers_are_exact(mode):
    wm, am, bits = mode
    g = torch.Generator().manual_seed(MODES.index(mode))
    K, N = 130, 72  # K: two words and a 2-bit tail
    x = torch.randn(2, 3, K, generator=g)
    w = torch.nn.Parameter(torch.randn(N, K, generator=g))
    b = torch.randn(N, generator=g)
    move = torch.randn(K, generator=g) * 0.1 if am == "sign" else None
    with torch.no_grad():
        # the float result: the C++ kernel and the Python path run the same kernels on the same inputs
        y = OP(*_args(x, w, b, mode, move))
        assert torch.equal(y, kernel_ops.bit_linear(*_args(x, w, b, mode, move)))
        ref = REFERENCE(x, w, b, None, move, None, wm, am, bits)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())
        # the integers: unit column scales (and α = 1 for sign) leave acc * row_scale, acc exact
        ones = torch.ones(N)
        alpha = torch.ones(1) if am == "sign" else None
        y_int = OP(*_args(x, w, None, mode, move, alpha=alpha, ws=ones)).reshape(-1, N).numpy()
        assert torch.equal(torch.from_numpy(y_int), kernel_ops.bit_linear(
            *_args(x, w, None, mode, move, alpha=alpha, ws=ones)).reshape(-1, N))
    codes, row = _np_act(x.reshape(-1, K).numpy(), am, bits, None if move is None else move.numpy())
    acc = codes @ _np_weight_codes(w.detach().numpy(), wm).T
    got = y_int if row is None else np.rint(y_int / row[:, None])
    np.testing.assert_array_equal(got.astype(np.int64), acc)


def test_cpp_handles_half_noncontiguous_and_empty_inputs():
    mode = ("sign_tensor", "sign", 1)
    w = torch.nn.Parameter(torch.randn(40, 64))
    with torch.no_grad():
        for x in (torch.randn(7, 2, 64).transpose(0, 1), torch.randn(3, 64).bfloat16(), torch.randn(3, 64).half(),
                  torch.randn(0, 64)):
            y = OP(*_args(x, w, None, mode))
            assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], 40)
            assert torch.equal(y, kernel_ops.bit_linear(*_args(x, w, None, mode)))


@pytest.mark.parametrize("D,Lq,Lk", [(40, 5, 9), (64, 1, 17), (130, 8, 8)])
def test_attention_products_equal_python_path_and_integers(D, Lq, Lk):
    g = torch.Generator().manual_seed(D + Lq)
    q, k = torch.randn(2, 3, Lq, D, generator=g), torch.randn(2, 3, Lk, D, generator=g)
    s = SCORES(q, k)
    assert s.dtype == torch.int32 and torch.equal(s, kernel_ops.sign_scores(q, k))
    expect = np.einsum("bhid,bhjd->bhij", _np_sign(q.numpy()), _np_sign(k.numpy()))
    np.testing.assert_array_equal(s.numpy(), expect)
    assert torch.equal(SCORES(q.half(), k.transpose(-1, -2).contiguous().transpose(-1, -2)), s)
    v = torch.randn(2, 3, Lk, D, generator=g)
    p = torch.rand(2, 3, Lq, Lk, generator=g) > 0.5
    expect = np.einsum("bhij,bhjd->bhid", p.numpy().astype(np.int64), _np_sign(v.numpy()))
    for pp in (p, p.to(torch.uint8), p.float(), p.half()):
        o = PV(pp, v)
        assert torch.equal(o, kernel_ops.binary_pv(pp, v))
        np.testing.assert_array_equal(o.numpy(), expect)


def test_plan_cache_follows_in_place_updates_and_views():
    mode = ("sign_channel", "sign", 1)
    torch.manual_seed(3)
    w = torch.nn.Parameter(torch.randn(48, 96))
    b = torch.nn.Parameter(torch.randn(48))
    x = torch.randn(4, 96)

    def fresh():  # the Python path on new tensors: nothing cached can answer
        return kernel_ops.bit_linear(*_args(x, w.detach().clone(), b.detach().clone(), mode, cache=False))

    with torch.no_grad():
        first = OP(*_args(x, w, b, mode))
        misses = native.plan_misses()
        assert torch.equal(OP(*_args(x, w, b, mode)), first) and native.plan_misses() == misses  # a hit
        w.mul_(-1.5)  # in place: the packed weight must be rebuilt
        after = OP(*_args(x, w, b, mode))
        assert native.plan_misses() == misses + 1
        assert not torch.equal(after, first) and torch.equal(after, fresh())
        b.add_(1.0)  # a vector's update is seen too
        assert torch.equal(OP(*_args(x, w, b, mode)), fresh()) and native.plan_misses() == misses + 2
        # the transposed view of a [K, N] parameter (GPT-2's Conv1D): keyed by the parameter and the view
        wt = torch.nn.Parameter(torch.randn(96, 48))
        view = ([48, 96], [1, 48], 0)
        y = OP(*_args(x, wt, None, mode, view=view))
        assert torch.equal(y, kernel_ops.bit_linear(*_args(x, wt, None, mode, view=view)))
        # (a contiguous copy: the scale mean|w| is summed in another order, so to float rounding)
        torch.testing.assert_close(y, OP(*_args(x, wt.t().contiguous(), None, mode, cache=False)))
        wt.mul_(-1)
        assert torch.equal(OP(*_args(x, wt, None, mode, view=view)), -y)  # sign_channel: codes flip, scales stay
        # a weight the graph computes (cache=False) is packed per call and never cached
        held = native.plans_held()
        assert torch.equal(OP(*_args(x, w * 2, b, mode, cache=False)),
                           kernel_ops.bit_linear(*_args(x, w * 2, b, mode, cache=False)))
        assert native.plans_held() == held
        # a dead parameter's plan is dropped at the next miss
        del wt
        OP(*_args(x, torch.nn.Parameter(torch.randn(48, 96)), None, mode))
        assert native.plans_held() <= held


def test_bad_inputs_raise_clear_errors():
    w = torch.nn.Parameter(torch.randn(8, 32))
    mode = ("sign_tensor", "sign", 1)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16; got torch.int64"):
        OP(*_args(torch.ones(2, 32, dtype=torch.long), w, None, mode))
    with pytest.raises(ValueError, match="x has 31 features in its last dim; the kernel expects K=32"):
        OP(*_args(torch.randn(2, 31), w, None, mode))
    with pytest.raises(ValueError, match=r"sign_scores needs q \[..., Lq, D\] and k \[..., Lk, D\]; got \(2, 4, 8\)"):
        SCORES(torch.randn(2, 4, 8), torch.randn(2, 4, 9))
    with pytest.raises(ValueError, match="binary_pv needs p"):
        PV(torch.ones(2, 4, 5), torch.randn(2, 6, 8))


_SCRIPT = r"""
import json, sys, warnings, torch
warnings.simplefilter("always")
import bitfx
from bitfx.ops import native
torch.manual_seed(0)
layer = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 64)).eval()
x = torch.randn(2, 5, 64)
w = torch.nn.Parameter(torch.randn(48, 64))
q, k = torch.randn(2, 3, 6, 64), torch.randn(2, 3, 7, 64)
with torch.no_grad():
    out = {"linear": torch.ops.bitfx_kernels.bit_linear(x, w, None, None, None, None, "ternary", "absmax", 4, True),
           "scores": torch.ops.bitfx_kernels.sign_scores(q, k)}
    if sys.argv[2] == "compile":
        out["compiled"] = torch.compile(layer, backend="bitfx")(x)
torch.save(out, sys.argv[1])
print(json.dumps({"status": native.status(), "misses": native.plan_misses()}))
"""


def _run(tmp_path, name, env, compile_=False):
    path = tmp_path / f"{name}.pt"
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(path), "compile" if compile_ else "direct"],
                          env={**os.environ, **env}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), torch.load(path), proc.stderr


def test_python_path_serves_when_native_is_off_or_cannot_be_built(tmp_path):
    on, on_out, _ = _run(tmp_path, "on", {}, compile_=True)
    # the first op call (the direct linear) runs Python while it loads the library; the compiled graph's two
    # linears then go through the C++ kernel: one plan each
    assert on["status"] == "loaded" and on["misses"] == 2
    off, off_out, _ = _run(tmp_path, "off", {"BITFX_NATIVE": "0"}, compile_=True)
    assert off == {"status": "disabled (BITFX_NATIVE=0)", "misses": 0}
    for name in ("linear", "scores", "compiled"):
        assert torch.equal(on_out[name], off_out[name]), name
    broken, broken_out, err = _run(tmp_path, "broken", {"CXX": "/nonexistent/c++"})
    assert broken["status"] == "unavailable: $CXX='/nonexistent/c++' is not an executable"
    assert "the C++ kernel ops are unavailable" in err and "run on their Python implementation" in err
    for name in ("linear", "scores"):
        assert torch.equal(broken_out[name], on_out[name]), name


def test_a_plan_the_cpp_kernel_does_not_know_runs_on_the_python_path(monkeypatch):
    """A quantizer native.cpp has no branch for (a method added later) is run by Python, per call."""
    real, calls = kernel_ops.linear_plan, []

    def linear_plan(*args, **kwargs):
        plan = real(*args, **kwargs)
        plan.pack = "a-newer-method"  # (this parameter's own plan: nothing else shares it)
        calls.append(1)
        return plan

    monkeypatch.setattr(kernel_ops, "linear_plan", linear_plan)
    mode = ("sign_tensor", "sign", 1)
    w = torch.nn.Parameter(torch.randn(24, 64))
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = [OP(*_args(x, w, None, mode)) for _ in range(3)]
    assert len(calls) == 4  # one plan for the C++ cache, then the Python implementation on each of 3 calls
    monkeypatch.setattr(kernel_ops, "linear_plan", real)
    assert all(torch.equal(t, kernel_ops.bit_linear(*_args(x, w, None, mode))) for t in y)


@pytest.mark.parametrize("wm", ["sign_tensor", "ternary"])
def test_unsigned_activations_run_in_cpp_and_are_exact(wm, monkeypatch):
    """act "unsigned" ({0, α}, codes (x + move) > α/2): the C++ kernel, no Python per call."""
    real, calls = kernel_ops.linear_plan, []
    monkeypatch.setattr(kernel_ops, "linear_plan", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    g = torch.Generator().manual_seed(7)
    K, N = 100, 40
    x = torch.randn(2, 5, K, generator=g).abs()
    w = torch.nn.Parameter(torch.randn(N, K, generator=g))
    b, move = torch.randn(N, generator=g), torch.randn(K, generator=g) * 0.1
    mode, alpha = (wm, "unsigned", 1), torch.tensor([0.8])
    with torch.no_grad():
        ys = [OP(*_args(x, w, b, mode, move, alpha=alpha)) for _ in range(3)]
        assert len(calls) == 1  # one plan, then C++ only
        monkeypatch.setattr(kernel_ops, "linear_plan", real)
        assert all(torch.equal(y, kernel_ops.bit_linear(*_args(x, w, b, mode, move, alpha=alpha))) for y in ys)
        ref = REFERENCE(x, w, b, None, move, alpha, wm, "unsigned", 1)
        torch.testing.assert_close(ys[0], ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())
        y_int = OP(*_args(x, w, None, mode, move, alpha=torch.ones(1), ws=torch.ones(N))).reshape(-1, N).numpy()
    codes = ((x.reshape(-1, K) + move).numpy() > 0.5).astype(np.int64)
    np.testing.assert_array_equal(y_int.astype(np.int64), codes @ _np_weight_codes(w.detach().numpy(), wm).T)


TO_BITS = torch.ops.bitfx_kernels.bit_linear_to_bits.default
SPLIT_CASES = {  # name: (mode, with move, with alpha, output)
    "sign-mean": (("sign_channel", "sign", 1), True, False, "float"),
    "sign-alpha": (("sign_tensor", "sign", 1), True, True, "float"),
    "absmax4": (("ternary", "absmax", 4), False, False, "float"),
    "unsigned": (("sign_tensor", "unsigned", 1), True, True, "float"),
    "to-bits": (("sign_channel", "sign", 1), True, True, "sign_bits"),
}


@pytest.fixture
def two_thread_team():
    """Two torch threads, every op on the team (no work threshold); restored after."""
    if native.pool_status() != "torch-openmp":
        pytest.skip(f"the C++ kernels run on TVM's pool here ({native.pool_status()}): no row split")
    threads, min_work = torch.get_num_threads(), native.pool_min_work()
    torch.set_num_threads(2)
    native.set_pool_min_work(0)
    yield
    torch.set_num_threads(threads)
    native.set_pool_min_work(min_work)


@pytest.mark.parametrize("case", list(SPLIT_CASES))
@pytest.mark.parametrize("M", [32, 33, 67, 150])
def test_rows_split_over_the_team_in_one_launch_equal_one_thread(case, M, two_thread_team):
    """With the team and >= 16 rows per thread, a bit_linear call is one launch: each thread quantizes and
    multiplies its own rows (slices of a multiple of 16 rows; the last one ragged). Bit for bit the one-thread
    call, for every quantizer kind and both outputs."""
    mode, with_move, with_alpha, output = SPLIT_CASES[case]
    g = torch.Generator().manual_seed(M)
    K, N = 200, 128  # K: four words and a tail; N: two words of output codes
    x = torch.randn(M, K, generator=g)
    w = torch.nn.Parameter(torch.randn(N, K, generator=g))
    b = torch.randn(N, generator=g)
    move = torch.randn(K, generator=g) * 0.1 if with_move else None
    alpha = torch.tensor([0.7]) if with_alpha else None
    op = TO_BITS if output == "sign_bits" else OP
    with torch.no_grad():
        op(*_args(x, w, b, mode, move, alpha=alpha))  # (the plan)
        n0, t0 = native.pool_launches()
        y = op(*_args(x, w, b, mode, move, alpha=alpha))
        n1, t1 = native.pool_launches()
        assert t1 - t0 == 1  # one team: the quantizer's and the GEMM's loops ran inline in it
        assert n1 - n0 >= 1 + 2 * 2
        torch.set_num_threads(1)
        assert torch.equal(y, op(*_args(x, w, b, mode, move, alpha=alpha)))
        assert native.pool_launches()[1] == t1  # (one thread: no team)


def test_rows_split_integers_are_exact(two_thread_team):
    """The split's integers against the independent NumPy formulation (unit scales, α = 1: y = codes · wᵀ)."""
    mode = ("sign_channel", "sign", 1)
    g = torch.Generator().manual_seed(3)
    K, N, M = 200, 96, 67
    x, move = torch.randn(M, K, generator=g), torch.randn(K, generator=g) * 0.1
    w = torch.nn.Parameter(torch.randn(N, K, generator=g))
    args = _args(x, w, None, mode, move, alpha=torch.ones(1), ws=torch.ones(N))
    with torch.no_grad():
        OP(*args)  # (the plan, through Python)
        t0 = native.pool_launches()[1]
        y = OP(*args).numpy()
        assert native.pool_launches()[1] - t0 == 1
    codes, _ = _np_act(x.numpy(), "sign", 1, move.numpy())
    np.testing.assert_array_equal(y.astype(np.int64), codes @ _np_weight_codes(w.detach().numpy(), "sign_channel").T)


# One thread pool (native.cpp): the TVM kernels' parallel loops on torch's OpenMP pool, or TVM's own
# (BITFX_POOL=0). Each process calls every parallel kernel once before the library loads (the kernel
# libraries it loaded then are repointed) and again after, with 2 torch threads and with 1.
_POOL_SCRIPT = r"""
import json, sys, torch
import bitfx
from bitfx.codegen import runtime
from bitfx.ops import native
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
x = torch.randn(67, 200, generator=g)
codes = torch.where(torch.randn(96, 200, generator=g) < 0, -1, 1).to(torch.int8)
scale, bias = torch.rand(96, generator=g), torch.randn(96, generator=g)
plan = runtime.LinearPlan(runtime.pack_weight(codes, ternary=False), col_scale=scale, bias=bias)
plan4 = runtime.LinearPlan(runtime.pack_weight(codes, ternary=False), act="absmax", bits=4,
                           col_scale=torch.ones(96))
q, k = torch.randn(3, 33, 70, generator=g), torch.randn(3, 41, 70, generator=g)
p, v = (torch.rand(3, 33, 41, generator=g) < 0.3).to(torch.uint8), torch.randn(3, 41, 24, generator=g)
calls = {"linear": lambda: plan(x), "linear4": lambda: plan4(x), "scores": lambda: runtime.sign_scores(q, k),
         "pv": lambda: runtime.binary_pv(p, v)}
out = {f"{name}_before": fn() for name, fn in calls.items()}
assert native.load(), native.status()
launches = {"after_load": native.pool_launches()}
out.update({name: fn() for name, fn in calls.items()})
launches["two_threads"] = native.pool_launches()
late = runtime.LinearPlan(runtime.pack_weight(codes[:80], ternary=False), col_scale=scale[:80].clone(),
                          bias=bias[:80].clone())  # (its kernels are loaded now)
out["late"] = late(x)
launches["late"] = native.pool_launches()
# the C++ op: below the work threshold its kernels' loops stay on the calling thread; at 0, on the team
wp = torch.nn.Parameter(torch.randn(96, 200, generator=g))
small = lambda: torch.ops.bitfx_kernels.bit_linear(x[:3], wp, None, None, None, None, "sign_channel", "sign", 1, True)
small()  # (the first call packs the weight through Python)
launches["small_warm"] = native.pool_launches()
out["small"] = small()
launches["small"] = native.pool_launches()
if native.pool_status() == "torch-openmp":
    native.set_pool_min_work(0)
out["small_team"] = small()
launches["small_team"] = native.pool_launches()
# a compiled model: kernels and inductor's float glue on the same pool
torch.manual_seed(0)
layer = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 64)).eval()
with torch.no_grad():
    model = torch.compile(layer, backend="bitfx")
    xm = torch.randn(4, 33, 64, generator=g)
    model(xm)
    launches["model_warm"] = native.pool_launches()
    out["model"] = model(xm)
launches["model"] = native.pool_launches()
torch.set_num_threads(1)
out.update({f"{name}_1thread": fn() for name, fn in calls.items()})
launches["one_thread"] = native.pool_launches()
torch.save(out, sys.argv[1])
print(json.dumps({"pool": native.pool_status(), "launches": launches}))
"""


def _pool_run(tmp_path, name, env):
    path = tmp_path / f"{name}.pt"
    proc = subprocess.run([sys.executable, "-c", _POOL_SCRIPT, str(path)], env={**os.environ, **env},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), torch.load(path)


def test_kernels_on_torchs_thread_pool_give_the_same_results(tmp_path):
    on, on_out = _pool_run(tmp_path, "on", {"TVM_NUM_THREADS": "2"})
    off, off_out = _pool_run(tmp_path, "off", {"TVM_NUM_THREADS": "2", "BITFX_POOL": "0"})
    assert on["pool"] == "torch-openmp"
    assert off == {"pool": "tvm (BITFX_POOL=0)", "launches": {
        "after_load": [0, 0], "two_threads": [0, 0], "late": [0, 0], "small_warm": [0, 0], "small": [0, 0],
        "small_team": [0, 0], "model_warm": [0, 0], "model": [0, 0], "one_thread": [0, 0]}}
    (n0, t0), (n2, t2), (nl, tl), (n1, t1) = (on["launches"][k] for k in ("after_load", "two_threads", "late",
                                                                          "one_thread"))
    assert n0 == t0 == 0  # nothing ran on torch's pool before the library loaded
    # every call after it launched on torch's pool, kernels loaded before it included (repointed): at least
    # one parallel loop per call, each run by a team of 2 threads; with 1 torch thread, inline (no team)
    assert n2 >= 4 and t2 == n2
    assert nl > n2 and tl == nl  # a kernel library loaded after it gets torch's pool from TVM-FFI itself
    (nw, tw), (ns, ts), (nt, tt) = (on["launches"][k] for k in ("small_warm", "small", "small_team"))
    # 3 x 200 x 96 bit-MACs, under the default threshold: the pack and GEMM loops run inline; at 0, as a team
    assert 3 * 200 * 96 < native.DEFAULT_POOL_MIN_WORK
    assert ns - nw >= 2 and ts == tw
    assert nt - ns >= 2 and tt - ts == nt - ns
    (nmw, tmw), (nm, tm) = on["launches"]["model_warm"], on["launches"]["model"]
    # two bit_linear calls of 132 rows: each one team launch, its rows split between the threads, each thread
    # running its rows' pack and GEMM loops inline (at least two loops per thread)
    assert tm - tmw == 2 and nm - nmw >= 2 + 2 * 2 * 2
    assert n1 - nm >= 4 and t1 == tm
    assert set(on_out) == set(off_out)
    for name in on_out:  # bit for bit: the pool changes who runs a task, never what it computes
        assert torch.equal(on_out[name], off_out[name]), name
        assert torch.equal(on_out[name], on_out[name.split("_")[0]]), name
    assert torch.equal(on_out["late"], on_out["linear"][:, :80])
    # and the integer products are right, against NumPy from the definitions
    g = torch.Generator().manual_seed(0)
    torch.randn(67, 200, generator=g), torch.randn(96, 200, generator=g)
    torch.rand(96, generator=g), torch.randn(96, generator=g)
    q, k = torch.randn(3, 33, 70, generator=g).numpy(), torch.randn(3, 41, 70, generator=g).numpy()
    p = (torch.rand(3, 33, 41, generator=g) < 0.3).numpy().astype(np.int64)
    v = torch.randn(3, 41, 24, generator=g).numpy()
    np.testing.assert_array_equal(on_out["scores"].numpy(), _np_sign(q) @ _np_sign(k).transpose(0, 2, 1))
    np.testing.assert_array_equal(on_out["pv"].numpy(), p @ _np_sign(v))


def test_pool_min_work_rejects_bad_values():
    for bad in (-1, "4096", 1.5, True):
        with pytest.raises(ValueError, match=r"pool min work .* is not valid; give a whole number of bit-MACs >= 0"):
            native.set_pool_min_work(bad)
