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


def test_training_through_the_compiled_kernels_gives_the_reference_ste_gradients(caplog):
    """Forward on TVM kernels with inductor-compiled glue, backward by the ops' straight-through
    formulas: the weights' gradients equal those of the same model on the reference ops."""
    import copy

    case = CASES["bert"]
    model, x = case.model(), case.inputs(2, 8)
    twin = copy.deepcopy(model)
    grads = []
    caplog.set_level("WARNING")
    for m, kernels in ((model, "tvm"), (twin, "reference")):
        out = _compiled(m, kernels=kernels)(*x)
        out.float().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    fast, ref = grads
    assert "could not compile the float parts" not in caplog.text
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
def _lowered_counts(monkeypatch):
    """Spy on the backend's glue compile: per lowered forward, (bit_linear kernels with a fused GELU,
    GELUs left to inductor)."""
    from bitfx import backend

    seen, real = [], backend.compile_glue

    def spy(lowered, inputs):
        calls = [n for n in lowered.graph.nodes if n.op == "call_function"]
        seen.append((sum(n.target is kernel_ops.BIT_LINEAR_KERNEL and n.kwargs.get("activation") == "gelu"
                         for n in calls),
                     sum(n.target is torch.ops.aten.gelu.default for n in calls)))
        return real(lowered, inputs)

    monkeypatch.setattr(backend, "compile_glue", spy)
    return seen


@pytest.mark.parametrize("config", ["bipft", "bitnet"])
def test_hf_bert_glue_fusions(config, monkeypatch, caplog):
    """A random-init HF BERT, compiled:
    - each layer's intermediate projection takes its GELU into the GEMM (one per layer, none left to
      inductor); the epilogue's erf is a rational minimax approximation (|error| < 4.2e-7);
    - (bipft) the estimators, each head's q/k/v times a [D, 2r] weight, reach inductor as reductions, not as
      extern BLAS calls with N = 2 (50-160 µs each at MiniLM's batch): no ``aten.mm`` with N <= 4 is left
      in the graph inductor compiles;
    and the output equals the reference's."""
    from torch._inductor import compile_fx
    from transformers import BertConfig, BertModel

    from bitfx import backend

    monkeypatch.setenv("BITFX_AOT_CACHE", "0")  # the lowering must run here, not be loaded from disk
    graphs, real = [], compile_fx.compile_fx_inner

    def spy(gm, inputs, **kw):
        graphs.append(gm)
        return real(gm, inputs, **kw)

    monkeypatch.setattr(compile_fx, "compile_fx_inner", spy)
    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, vocab_size=300)).eval()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    seen = _lowered_counts(monkeypatch)
    with torch.no_grad():
        ref = _compiled(model, config=config, kernels="reference")(input_ids=ids).last_hidden_state
        out = _compiled(model, config=config)(input_ids=ids).last_hidden_state
    assert "could not compile the float parts" not in caplog.text
    assert seen == [(2, 0)]
    assert len(graphs) == 1
    mms = [n for n in graphs[0].graph.nodes if n.target is torch.ops.aten.mm.default]
    assert all(n.args[1].meta["val"].shape[1] > backend.SKINNY_N for n in mms)
    if config == "bipft":
        sums = [n for n in graphs[0].graph.nodes if n.target is torch.ops.aten.sum.dim_IntList]
        assert len(sums) >= 2 * 3  # per layer: the q, k and v estimators
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
    assert seen == [(1, 2), (0, 3)]
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
