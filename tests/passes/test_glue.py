"""glue="inductor": the float parts compiled around opaque kernel ops give the reference's numbers,
and the kernel ops' packed weights follow parameters, slices and in-place updates."""
import pytest
import torch

import bitfx  # noqa: F401
from bitfx.config import CompileOptions
from bitfx.ops import kernel_ops
from models import CASES


def _compiled(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="bitfx", options=options)


@pytest.mark.parametrize("name,config", [("bert", "bipft"), ("decoder", "bivit"), ("vit", "bibert")])
def test_inductor_glue_equals_eager_glue_and_reference(name, config, caplog):
    case = CASES[name]
    model, x = case.model(), case.inputs(2, 8)
    with torch.no_grad():
        ref = _compiled(model, config=config, kernels="reference")(*x)
        eager = _compiled(model, config=config, glue="eager")(*x)
        fused = _compiled(model, config=config, glue="inductor")(*x)
    assert "could not compile the float parts" not in caplog.text  # inductor did compile them
    tol = dict(rtol=1e-4, atol=1e-4 * max(1.0, ref.abs().max().item()))
    torch.testing.assert_close(fused, ref, **tol)
    torch.testing.assert_close(fused, eager, **tol)


def test_glue_option_is_validated():
    with pytest.raises(ValueError, match="glue='tvm'.*accepted: 'inductor', 'eager'"):
        CompileOptions.from_dict({"glue": "tvm"})


def _plan(w, cache=True):
    return kernel_ops.linear_plan(w, None, None, None, None, "sign_tensor", "sign", 1, cache)


def test_plans_are_kept_per_parameter_view_and_version():
    p = torch.nn.Parameter(torch.randn(48, 16))
    q, k = p[:16], p[16:32]          # MHA's in_proj split: new view objects on every call
    assert _plan(p[:16]) is _plan(q)
    assert _plan(q) is not _plan(k)
    before = _plan(q)
    with torch.no_grad():
        p.mul_(-1)                    # bumps the version every view shares
    assert _plan(p[:16]) is not before
    assert _plan(q, cache=False) is not _plan(q, cache=False)


def test_kernel_op_matches_bit_linear_reference():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 5, 70, generator=g), torch.randn(24, 70, generator=g), torch.randn(24, generator=g)
    move = torch.randn(70, generator=g) * 0.1
    args = (x, w, b, None, move, None, "sign_tensor", "sign", 1)
    ref = torch.ops.bitfx.bit_linear(*args)
    torch.testing.assert_close(kernel_ops.BIT_LINEAR_KERNEL(*args, True), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernels", ["reference", "tvm"])
def test_half_model_with_bipft_estimators(kernels):
    """A .half() model: the estimators follow the activations' dtype; the result tracks float32."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 8, 64)
    with torch.no_grad():
        ref32 = _compiled(layer, kernels="reference")(x)
        out = _compiled(layer.half(), kernels=kernels)(x.half())
    assert out.dtype == torch.float16
    assert (out.float() - ref32).abs().max() <= 2e-2 * ref32.abs().max()


def test_training_through_the_compiled_kernels_gives_the_reference_ste_gradients(caplog, monkeypatch):
    """Forward on TVM kernels with inductor-compiled glue, backward by the ops' straight-through
    formulas: the weights' gradients equal those of the same model on the reference ops. Nothing the
    backward needs is fused away: the GELU's input and output are saved, so neither the GELU nor the next
    linear's packing moves into a GEMM."""
    import copy

    case = CASES["bert"]
    model, x = case.model(), case.inputs(2, 8)
    twin = copy.deepcopy(model)
    grads = []
    caplog.set_level("WARNING")
    seen = _lowered_counts(monkeypatch)
    for m, kernels in ((model, "tvm"), (twin, "reference")):
        out = _compiled(m, kernels=kernels)(*x)
        out.float().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    fast, ref = grads
    assert "could not compile the float parts" not in caplog.text
    assert list(seen.values()) == [(0, 2, 0)]  # the training forward: both GELUs left to inductor, no packed codes
    assert set(fast) == set(ref) and len(ref) > 10
    for name in ref:
        scale = max(1e-6, ref[name].abs().max().item())
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-3, atol=1e-3 * scale, msg=name)


class _Conv1D(torch.nn.Module):
    """GPT-2's Conv1D: the weight is stored [in, out] and used as x @ W + b (a transposed linear)."""

    def __init__(self, k, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(k, n))
        self.bias = torch.nn.Parameter(torch.randn(n))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


def test_transposed_weight_is_packed_once_and_follows_updates(monkeypatch):
    torch.manual_seed(0)
    # one layer: a chain would let a last-bit difference flip a near-zero sign in the next layer
    model = torch.nn.Sequential(_Conv1D(64, 96)).eval()
    x = torch.randn(2, 5, 64)
    built = []
    new_plan = kernel_ops._new_plan
    monkeypatch.setattr(kernel_ops, "_new_plan", lambda *a, **k: (built.append(1), new_plan(*a, **k))[1])
    with torch.no_grad():
        fast = _compiled(model)
        first = fast(x)
        for _ in range(3):
            fast(x)
        assert len(built) == 1  # one plan for the layer, not one per call
        model[0].weight.mul_(-1)  # in place: the packed copy must be rebuilt
        after = fast(x)
        assert len(built) == 2
        ref = _compiled(model, kernels="reference")(x)
    assert not torch.allclose(first, after)
    torch.testing.assert_close(after, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("name", ["gpt2", pytest.param("t5", marks=pytest.mark.slow),
                                  pytest.param("bart", marks=pytest.mark.slow)])
def test_inductor_compiles_the_float_parts_of_hf_decoders(name, caplog, monkeypatch):
    """HF decoders with a DynamicCache: the re-trace for inductor gave ``cat`` (the cache's empty placeholder
    and a transposed key) other strides than AOTAutograd saw, the ``view`` after it failed, and the float parts
    ran eager ("could not compile the float parts"). They compile now, with the reference's numbers."""
    import hf_zoo
    from test_attention_zoo import first_tensor

    monkeypatch.setenv("BITFX_AOT_CACHE", "0")  # the glue compile itself is under test, not a cached one
    model, args, kwargs = hf_zoo.ZOO[name].make()
    caplog.set_level("WARNING")
    with torch.no_grad():
        ref = first_tensor(hf_zoo.call(_compiled(model, kernels="reference"), args, kwargs))
        out = first_tensor(hf_zoo.call(_compiled(model), args, kwargs))
    assert "could not compile the float parts" not in caplog.text
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * max(1.0, ref.abs().max().item()))


# ------------------------------------------------------------------------ GELU in the GEMM's epilogue
def _tiny_hf_bert():
    """A random-init HF BERT (2 layers, hidden 64, FFN 128) and a batch of token ids."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, vocab_size=300)).eval()
    return model, torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))


def _lowered_counts(monkeypatch):
    """Spy on the backend's glue compile: per compile (one backend call), (bit_linear kernels with a fused
    GELU, GELUs left to inductor, producers that write the next linear's packed codes), what one model call
    runs: summed over the lowered forwards, each counted once per partition it serves (`bitfx.regions`: one
    layer's graph serves every layer). ``list(seen.values())``, in the order of the compiles."""
    from bitfx import backend

    seen, real, reported, compiles = {}, backend.compile_glue, backend._reported, [0]

    def count_compiles(report):  # a backend call reports once, after every graph of it is lowered
        compiles[0] += 1
        return reported(report)

    def spy(lowered, inputs):
        calls = [n for n in lowered.graph.nodes if n.op == "call_function"]
        to_bits = [n for n in calls if n.target is kernel_ops.BIT_LINEAR_TO_BITS]
        # every packed-codes producer feeds exactly one GEMM on those codes
        assert all([u.target for u in n.users] == [kernel_ops.BIT_LINEAR_ON_BITS] for n in to_bits)
        assert sum(n.target is kernel_ops.BIT_LINEAR_ON_BITS for n in calls) == len(to_bits)
        uses = lowered.meta["bitfx_instances"]
        counts = (sum(n.target in (kernel_ops.BIT_LINEAR_KERNEL, kernel_ops.BIT_LINEAR_TO_BITS)
                      and n.kwargs.get("activation") == "gelu" for n in calls),
                  sum(n.target is torch.ops.aten.gelu.default for n in calls), len(to_bits))
        compile_id = compiles[0]
        seen[compile_id] = tuple(a + uses * b for a, b in zip(seen.get(compile_id, (0, 0, 0)), counts))
        return real(lowered, inputs)

    monkeypatch.setattr(backend, "compile_glue", spy)
    monkeypatch.setattr(backend, "_reported", count_compiles)
    return seen


@pytest.mark.parametrize("config", ["bipft", "bitnet"])
def test_hf_bert_glue_fusions(config, monkeypatch, caplog):
    """A random-init HF BERT, compiled:
    - each layer's intermediate projection takes its GELU into the GEMM (one per layer, none left to
      inductor); the epilogue's erf is a rational minimax approximation (|error| < 4.2e-7);
    - (bipft: sign codes with a given α) it also writes the output projection's packed sign codes, which that
      projection's GEMM takes as they are; (bitnet: 8-bit absmax codes per token) it writes floats;
    - (bipft) the estimators, each head's q/k/v times a [D, 2r] weight, reach inductor as reductions, not as
      extern BLAS calls with N = 2 (50-160 µs each at MiniLM's batch): no ``aten.mm`` with N <= 4 is left
      in the graph inductor compiles;
    and the output equals the reference's."""
    from torch._inductor import compile_fx

    from bitfx import backend

    monkeypatch.setenv("BITFX_AOT_CACHE", "0")  # the lowering must run here, not be loaded from disk
    graphs, real = [], compile_fx.compile_fx_inner

    def spy(gm, inputs, **kw):
        graphs.append(gm)
        return real(gm, inputs, **kw)

    monkeypatch.setattr(compile_fx, "compile_fx_inner", spy)
    model, ids = _tiny_hf_bert()
    seen = _lowered_counts(monkeypatch)
    with torch.no_grad():
        ref = _compiled(model, config=config, kernels="reference")(input_ids=ids).last_hidden_state
        out = _compiled(model, config=config)(input_ids=ids).last_hidden_state
    assert "could not compile the float parts" not in caplog.text
    assert list(seen.values()) == [(2, 0, 2 if config == "bipft" else 0)]
    # one graph for both layers (compiled first: the most repeated), the embeddings, the pooler (`bitfx.regions`)
    assert len(graphs) == 3
    mms = [n for g in graphs for n in g.graph.nodes if n.target is torch.ops.aten.mm.default]
    assert all(n.args[1].meta["val"].shape[1] > backend.SKINNY_N for n in mms)
    if config == "bipft":
        sums = [n for n in graphs[0].graph.nodes if n.target is torch.ops.aten.sum.dim_IntList]
        assert len(sums) >= 3  # in the layer's graph: the q, k and v estimators
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


class _TwoUses(torch.nn.Module):
    """A linear whose output is used twice (GELU and a residual), then an exact and a tanh GELU."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Linear(64, 64) for _ in range(3))

    def forward(self, x):
        y = self.a(x)
        z = torch.nn.functional.gelu(y) + y
        return torch.nn.functional.gelu(self.b(z), approximate="tanh") + torch.nn.functional.gelu(self.c(z))


def test_only_a_sole_exact_gelu_is_fused_and_the_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("BITFX_AOT_CACHE", "0")
    torch.manual_seed(0)
    model, x = _TwoUses().eval(), torch.randn(3, 64)
    seen = _lowered_counts(monkeypatch)
    with torch.no_grad():
        ref = _compiled(model, config="bitnet", kernels="reference")(x)
        out = _compiled(model, config="bitnet")(x)
        monkeypatch.setenv("BITFX_FUSE_EPILOGUE", "0")
        off = _compiled(model, config="bitnet")(x)
    # a: two uses, b: tanh GELU -> left to inductor; c: fused
    assert list(seen.values()) == [(1, 2, 0), (0, 3, 0)]
    for got in (out, off):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_kernel_op_gelu_epilogue_equals_gelu_of_the_op():
    """``bit_linear(..., activation="gelu")`` through the C++ op and the Python implementation equals
    ``F.gelu`` of the plain op; both plans of one weight are kept (no replanning when they alternate)."""
    from bitfx.ops import native

    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 9, 200, generator=g), torch.nn.Parameter(torch.randn(70, 200, generator=g)), \
        torch.randn(70, generator=g)
    args = (x, w, b, None, torch.randn(200, generator=g) * 0.1, torch.tensor(0.7), "sign_tensor", "sign", 1)
    plain = kernel_ops.BIT_LINEAR_KERNEL(*args, True)
    expected = torch.nn.functional.gelu(torch.ops.bitfx.bit_linear(*args))
    for fn in (kernel_ops.BIT_LINEAR_KERNEL, torch.ops.bitfx_kernels._bit_linear_python.default):
        got = fn(*args, True, activation="gelu")
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    misses = native.plan_misses()
    for _ in range(3):
        assert torch.equal(kernel_ops.BIT_LINEAR_KERNEL(*args, True), plain)
        kernel_ops.BIT_LINEAR_KERNEL(*args, True, activation="gelu")
    assert native.plan_misses() == misses
    with pytest.raises(ValueError, match="unknown bit_linear output activation 'relu'"):
        kernel_ops.BIT_LINEAR_KERNEL(*args, False, activation="relu")


def test_skinny_mm_rewrite_keeps_the_values_and_leaves_wide_products():
    import torch.fx as fx
    from torch.fx.experimental.proxy_tensor import make_fx

    from bitfx import backend

    def f(a, b, c):
        return torch.mm(a, b), torch.mm(a, c)

    g = torch.Generator().manual_seed(0)
    a, b, c = torch.randn(50, 32, generator=g), torch.randn(32, 2, generator=g), torch.randn(32, 8, generator=g)
    gm = backend._skinny_mm_as_reductions(make_fx(f)(a, b, c))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.aten.mm.default) == 1 and torch.ops.aten.sum.dim_IntList in targets
    got = gm(a, b, c)
    torch.testing.assert_close(got[0], a.double().mm(b.double()).float(), rtol=1e-6, atol=1e-5)
    assert torch.equal(got[1], torch.mm(a, c))
    assert isinstance(gm, fx.GraphModule)


# --------------------------------------------------------------- the next linear's sign-and-pack, fused
def _pair_args(g, activation="gelu"):
    """Two linears, 200 -> 128 -> 70: the first's output (GELU'd) is the second's input (codes sign(h + m2), α2)."""
    x = torch.randn(3, 9, 200, generator=g)
    w1, w2 = (torch.nn.Parameter(torch.randn(n, k, generator=g)) for n, k in ((128, 200), (70, 128)))
    b1, b2 = torch.randn(128, generator=g), torch.randn(70, generator=g)
    m1, m2 = torch.randn(200, generator=g) * 0.1, torch.randn(128, generator=g) * 0.3
    first = (x, w1, b1, None, m1, torch.tensor(0.7), "sign_tensor", "sign", 1)
    second = (w2, b2, None, None, torch.tensor(0.4), "sign_tensor", "sign", 1)
    return first, second, m2


@pytest.mark.parametrize("activation", ["gelu", "none"])
@torch.no_grad()  # (forward ops: no autograd)
def test_kernel_op_pair_equals_the_two_linears(activation):
    """``bit_linear_on_bits(bit_linear_to_bits(x, ..., out_move=m2), ...)``, through the C++ ops and the Python
    implementations: the codes equal the sign bits of the first op's float output plus m2 (packed by NumPy),
    and the result equals the plain ops chained, ``bit_linear(bit_linear(x, ...), ..., move=m2, α2)``; both
    plans of the first weight (float and packed output) are kept when calls alternate."""
    import numpy as np

    from bitfx.ops import native

    first, second, m2 = _pair_args(torch.Generator().manual_seed(0))
    h = kernel_ops.BIT_LINEAR_KERNEL(*first, True, activation=activation)
    u = (h + m2).numpy()
    expected_bits = np.packbits(u >= 0, axis=-1, bitorder="little").view(np.int64)
    w2, b2, s2, _, a2, *modes = second
    expected = torch.ops.bitfx.bit_linear(h, w2, b2, s2, m2, a2, *modes)
    for to_bits, on_bits in ((kernel_ops.BIT_LINEAR_TO_BITS, kernel_ops.BIT_LINEAR_ON_BITS),
                             (kernel_ops.bit_linear_to_bits, kernel_ops.bit_linear_on_bits)):
        bits = to_bits(*first, True, activation=activation, out_move=m2)
        assert bits.dtype == torch.int64 and bits.shape == (3, 9, 2)
        assert np.array_equal(bits.numpy(), expected_bits)
        torch.testing.assert_close(on_bits(bits, *second, True), expected, rtol=1e-5, atol=1e-5)
    misses = native.plan_misses()
    for _ in range(3):
        assert torch.equal(kernel_ops.BIT_LINEAR_KERNEL(*first, True, activation=activation), h)
        assert np.array_equal(kernel_ops.BIT_LINEAR_TO_BITS(*first, True, activation=activation, out_move=m2).numpy(),
                              expected_bits)
    assert native.plan_misses() == misses


@torch.no_grad()
def test_kernel_op_pair_refuses_what_it_cannot_compute():
    first, (w2, b2, s2, _, a2, *modes), m2 = _pair_args(torch.Generator().manual_seed(1))
    bits = kernel_ops.BIT_LINEAR_TO_BITS(*first, True, out_move=m2)
    for on_bits in (kernel_ops.BIT_LINEAR_ON_BITS, kernel_ops.bit_linear_on_bits):
        with pytest.raises(ValueError, match="takes codes signed with a given alpha"):
            on_bits(bits, w2, b2, s2, m2, a2, *modes, True)  # a move: the producer applies it
        with pytest.raises(ValueError, match="takes codes signed with a given alpha"):
            on_bits(bits, w2, b2, s2, None, None, *modes, True)  # per-token mean|x|: needs the floats
    with pytest.raises(ValueError, match="has 3 words in its last dim; K=128 needs 2"):
        kernel_ops.BIT_LINEAR_ON_BITS(torch.zeros(4, 3, dtype=torch.int64), w2, b2, s2, None, a2, *modes, True)
    x, w1 = first[0], torch.randn(96, 200)
    with pytest.raises(ValueError, match="N must be a multiple of 64, got N=96"):
        kernel_ops.BIT_LINEAR_TO_BITS(x, w1, *first[2:], True)


def test_pack_signs_round_trip_against_numpy():
    import numpy as np

    u = torch.randn(5, 3, 192, generator=torch.Generator().manual_seed(2))
    u[0, 0, :7] = 0.0  # sign(0) = +1
    packed = kernel_ops.pack_signs(u)
    assert np.array_equal(packed.numpy(), np.packbits(u.numpy() >= 0, axis=-1, bitorder="little").view(np.int64))
    assert torch.equal(kernel_ops.unpack_signs(packed, 192), torch.where(u < 0, -1.0, 1.0))
    assert torch.equal(kernel_ops.unpack_signs(packed, 150), torch.where(u < 0, -1.0, 1.0)[..., :150])


def test_the_pack_switch_keeps_the_two_linears_apart(monkeypatch):
    """``BITFX_FUSE_PACK=0``: the GELU stays fused, the output projection packs its own input; per-token codes
    (bibert: mean|x| of each row) are never packed by the producer. Every variant equals the reference."""
    monkeypatch.setenv("BITFX_AOT_CACHE", "0")
    model, ids = _tiny_hf_bert()
    seen = _lowered_counts(monkeypatch)
    with torch.no_grad():
        for config, switch in (("bipft", "0"), ("bibert", "1")):
            monkeypatch.setenv("BITFX_FUSE_PACK", switch)
            ref = _compiled(model, config=config, kernels="reference")(input_ids=ids).last_hidden_state
            out = _compiled(model, config=config)(input_ids=ids).last_hidden_state
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert list(seen.values()) == [(2, 0, 0), (2, 0, 0)]


@pytest.mark.parametrize("config", ["bipft", "bitnet"])
def test_lowering_prefetches_every_kernel_the_calls_run(config, monkeypatch):
    """The lowering knows each call's kernels from the fake values and starts them building in background
    threads: with the in-process memo emptied, every kernel a compiled HF BERT's first calls need is compiled
    or loaded by a prefetch thread, none by the calling thread; and the output equals the reference."""
    import threading

    from bitfx.codegen import build

    monkeypatch.setenv("BITFX_AOT_CACHE", "0")  # the lowering must run here, not be loaded from disk
    monkeypatch.setattr(build, "_MEMO", {})
    monkeypatch.setattr(build, "_PENDING", {})
    where, real = [], build._load_or_build

    def spy(op, impl, target, params):
        where.append((op, threading.current_thread().name.startswith("bitfx-kernel-build")))
        return real(op, impl, target, params)

    monkeypatch.setattr(build, "_load_or_build", spy)
    model, ids = _tiny_hf_bert()
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, -5:] = 0
    with torch.no_grad():
        ref = _compiled(model, config=config, kernels="reference")(input_ids=ids, attention_mask=mask)
        before = build.STATS["prefetched"]
        out = _compiled(model, config=config)(input_ids=ids, attention_mask=mask)
    ops = {op for op, _ in where}
    assert {"gemm", "pack_rows"} <= ops and (config != "bipft" or "fused_attention" in ops)
    assert build.STATS["prefetched"] - before == len(where)
    assert all(in_prefetch for _, in_prefetch in where), where
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=1e-4,
                               atol=1e-4 * ref.last_hidden_state.abs().max().item())


def test_prefetch_leaves_a_symbolic_size_to_the_call(monkeypatch):
    """A size dynamo made dynamic is no value yet: ``prefetch`` starts nothing for that spec (it used to fail on
    hashing the SymInt, which broke a dynamic compile) and still starts the others."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from bitfx.codegen import build

    monkeypatch.setattr(build, "_MEMO", {})
    monkeypatch.setattr(build, "_PENDING", {})
    started = []
    monkeypatch.setattr(build, "_load_or_build", lambda op, impl, target, params: started.append(params))
    symbolic = ShapeEnv().create_unbacked_symint()
    assert build.prefetch([("pack_rows", {"K": symbolic}), ("pack_rows", {"K": 64})]) == 1
    for future in build._PENDING.values():
        future.result()
    assert started == [{"K": 64}]


class _Chain(torch.nn.Module):
    """Three linears in a row, the middle one followed by an exact GELU: fc1 -> fc2 -> GELU -> fc3."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = torch.nn.Linear(96, 128), torch.nn.Linear(128, 192), torch.nn.Linear(192, 64)

    def forward(self, x):
        return self.fc3(torch.nn.functional.gelu(self.fc2(self.fc1(x))))


def test_a_chain_of_linears_packs_each_pair_once(monkeypatch):
    """fc1 writes fc2's packed codes; fc2 runs on them and applies its GELU in its epilogue, writing floats (a
    linear is not both a consumer and a producer of packed codes); fc3 packs its own input. Equals the reference."""
    monkeypatch.setenv("BITFX_AOT_CACHE", "0")
    torch.manual_seed(0)
    model, x = _Chain().eval(), torch.randn(2, 7, 96)
    seen = []
    from bitfx import backend

    real = backend.compile_glue

    def spy(lowered, inputs):
        seen.append([(str(n.target).split(".")[-2], n.kwargs.get("activation", "none")) for n in lowered.graph.nodes
                     if n.op == "call_function" and "bitfx_kernels" in str(n.target)])
        return real(lowered, inputs)

    monkeypatch.setattr(backend, "compile_glue", spy)
    with torch.no_grad():
        ref = _compiled(model, kernels="reference")(x)
        out = _compiled(model)(x)
    assert seen == [[("bit_linear_to_bits", "none"), ("bit_linear_on_bits", "gelu"), ("bit_linear", "none")]]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
