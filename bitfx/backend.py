"""The ``torch.compile`` backend: ``torch.compile(model, backend="bitfx", options={...})``.

Registered through the ``torch_dynamo_backends`` entry point, so no ``import bitfx`` is needed.
Options: ``config`` (a BinarizeConfig, preset name or dict), ``kernels`` (``"tvm"`` or
``"reference"``), ``glue`` (``"inductor"``, default: the float parts around the kernels are
compiled by inductor; ``"eager"``: they run as PyTorch ops) and ``regions`` (True, default: each
repeated block of the graph is compiled once, `bitfx.regions`; False: the graph is compiled as one).

Flow: the dynamo graph is re-traced to pre-dispatch ATen (``capture_dynamo``), the pipeline
rewrites it (a graph that already holds bitfx ops, e.g. from ``bitfx.binarize``, is lowered as
it is), scales are initialised on the first batch, and AOTAutograd produces the forward (and,
when training, backward) graphs; the forward is lowered to kernels. Parameters added by the
passes are inputs of the compiled graph, calibrated once per module that calls it (each layer of a
regionally compiled model: `_AddedValues`) and reused when dynamo recompiles for new shapes.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import threading
import warnings
import weakref
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils.weak import WeakIdKeyDictionary

from bitfx import compile_cache, regions
from bitfx.calibrate import calibrate
from bitfx.config import CompileOptions
from bitfx.env import switched_off
from bitfx.passes import LOWERING, PIPELINE, PassContext, run_passes
from bitfx.passes.capture import _has_bitfx_ops, capture_dynamo, inline_regions

log = logging.getLogger(__name__)

# nn.MultiheadAttention warns (warnings.warn) when a float attn_mask meets a bool key_padding_mask,
# nn.Transformer's usual pair; dynamo broke the graph there and the whole model ran float. Dynamo
# issues a reorderable call after the graph instead: the warning is still given, the graph is whole.
torch._dynamo.config.reorderable_logging_functions.add(warnings.warn)

#: Reports of the most recent compilations (newest last), for tools such as ``bitfx demo``.
REPORTS: list = []

#: Calibrated values of added parameters, per module called (keyed by its first parameter, with the identities
#: of all its parameters), so that a recompilation (new shapes) reuses the values of the first compile instead
#: of refitting (`_AddedValues`). (Keyed by identity: a WeakKeyDictionary compares tensor keys with ``==``.)
_CALIBRATED: "WeakIdKeyDictionary[torch.Tensor, tuple[tuple[int, ...], dict[str, torch.Tensor]]]" = (
    WeakIdKeyDictionary())


def bitfx_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None, **_: Any):
    opts = CompileOptions.from_dict(options)
    if opts.config.kernels == "tvm" and opts.glue == "inductor":
        _probe_simd_early()  # (child processes, beside the capture and the passes below)
    gm = inline_regions(gm)  # (blocks marked by bitfx.trace_once: traced once by dynamo, called per use)
    if opts.regions:
        try:
            split = regions.compile_regions(gm, example_inputs, opts.config,
                                            lambda part, inputs, uses: _compile(part, inputs, opts, uses))
        except regions.Declined as why:
            log.info("bitfx: the graph is compiled whole (%s)", why)
        except Exception as err:  # noqa: BLE001 - the one graph still compiles: nothing is lost but time
            log.warning("bitfx: compiling by region failed (%s: %s); the graph is compiled whole",
                        type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
        else:
            _reported(split.bitfx_report)
            return split
    compiled, ctx = _compile(gm, example_inputs, opts)
    _reported(ctx.report)
    return compiled


def _reported(report) -> None:
    REPORTS.append(report)
    del REPORTS[:-64]


def _compile(gm: fx.GraphModule, example_inputs: list[Any], opts: CompileOptions, instances: int = 1):
    """One graph through the passes, AOTAutograd and the lowering -> (compiled function, PassContext).

    ``example_inputs`` are dynamo's (real tensors), or for a partition of a split graph
    (`bitfx.regions`) its real parameters and inputs and fakes for the activations between
    partitions: then the added values are calibrated at the first call (`_AddedValues`)."""
    traced, weights = capture_dynamo(gm, example_inputs)
    ctx = PassContext(opts.config, weights, example_inputs=tuple(example_inputs), instances=instances)
    binding = None
    if not _has_bitfx_ops(traced):
        before = {name for name, _ in traced.named_parameters()}
        traced = run_passes(traced, ctx, PIPELINE)
        binding = _AddedValues(traced, before, example_inputs, opts.config)
    log.info("bitfx: %d rewrites, %d left in float", len(ctx.report.rewrites), len(ctx.report.skips))
    traced.bitfx_report = ctx.report

    ctx.glue = opts.glue if opts.config.kernels == "tvm" else "eager"

    def fw_compiler(fw: fx.GraphModule, inputs):
        lowered = run_passes(fw, ctx, LOWERING)
        lowered.meta["bitfx_instances"] = ctx.instances
        if ctx.glue == "inductor":
            return compile_glue(lowered, inputs)
        return make_boxed_func(lowered)

    def bw_compiler(bw: fx.GraphModule, inputs):
        # the backward holds the straight-through formulas (ATen ops), no kernels: it runs as it is
        return make_boxed_func(bw)

    # (dynamo may abort this attempt, e.g. TensorifyScalarRestartAnalysis, and call again)
    # (a cache hit loads inductor's kernels, which asks the SIMD probes too: remembered here as in a compile)
    probes = _simd_probes_remembered() if ctx.glue == "inductor" else contextlib.nullcontext()
    module, inputs = traced, list(example_inputs)
    if binding is not None and binding.per_weights:
        module, inputs = binding.module, inputs + binding.example_values(inputs)
    with _aot_autograd_cache(ctx, opts) as wrap, probes:
        compiled = aot_module_simplified(module, inputs, fw_compiler=wrap(fw_compiler),
                                         bw_compiler=bw_compiler)
    if binding is not None and binding.per_weights:
        compiled = binding.bind(compiled)
    return compiled, ctx


@contextlib.contextmanager
def _aot_autograd_cache(ctx: PassContext, opts: CompileOptions):
    """Let AOTAutograd's on-disk cache hold the whole compiled forward of an inference graph.

    With a forward compiler that returns inductor's ``OutputCode`` (what ``compile_glue`` returns),
    AOTAutograd keys the binarized graph (the rewritten dynamo graph: its code, the metadata of its
    inputs, grad mode, the torch and inductor configs) and, on a hit in a later process, loads the
    compiled forward from inductor's FX-graph cache: its own trace, bitfx's lowering, the decomposition
    re-trace and inductor's compile are all skipped. bitfx's part is stamped into that key by a no-op
    inductor custom pass whose ``uuid`` is the digest of bitfx's sources and the compile options, so an
    edited bitfx or other options never meet an old entry. Parameter *values* are not part of the
    compiled code: weights and calibrated scales are inputs, packed per content at the first call.
    Only inference graphs are stored (the backward compiler returns no ``OutputCode``); eager glue,
    reference kernels or ``BITFX_AOT_CACHE=0`` keep the uncached path.
    """
    from bitfx.ops import native

    if ctx.glue == "inductor":  # a cache hit skips the lowering, which starts the C++ kernel calls
        native.start()
    off = switched_off("BITFX_AOT_CACHE")
    if off or ctx.glue != "inductor" or not compile_cache.enabled():
        yield lambda fn: fn
        return
    from torch._functorch._aot_autograd.schemas import SerializableAOTDispatchCompiler
    from torch._inductor import config as inductor_config
    from torch._inductor.output_code import OutputCode

    # bitfx's switches (BITFX_FUSED_ATTENTION=0 lowers attention to the two-kernel path, ...) are part of the
    # key: every BITFX_* variable, so a switch added later cannot replay a graph lowered the other way
    switches = sorted((k, v) for k, v in os.environ.items() if k.startswith("BITFX_"))
    stamp = _BitfxStamp(f"{compile_cache.source_digest()}|{opts!r}|{switches!r}")
    with inductor_config.patch(post_grad_custom_post_pass=stamp):
        yield lambda fn: SerializableAOTDispatchCompiler(OutputCode, fn)


class _BitfxStamp(CustomGraphPass):
    """A no-op post-grad pass: its ``uuid`` puts bitfx's version and options into inductor's cache keys."""

    def __init__(self, uuid: str) -> None:
        self._uuid = uuid

    def __call__(self, graph) -> None:
        return None

    def uuid(self) -> str:
        return self._uuid


def compile_glue(lowered: fx.GraphModule, inputs) -> Any:
    """Inductor compiles the float parts of a lowered forward graph; the kernel ops stay extern calls.

    The graph is re-traced to the ATen subset inductor lowers (its decomposition table), so the
    Python-level attention formula becomes ATen ops around ``bitfx_kernels::sign_scores`` /
    ``binary_pv``; softmax, masks, scales and the probability binarizer fuse into C++ loops.
    """
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    from torch._inductor import config as inductor_config

    try:
        graph = make_fx(_skinny_mm_as_reductions(_views_as_reshapes(lowered)),
                        decomposition_table=select_decomp_table())(*inputs)
        # size_asserts off: no per-call size/stride check of every input and extern-kernel output (~45 per
        # BERT layer call: 0.161 -> 0.138 ms at seq 1); the kernel ops return fresh contiguous tensors, as
        # their fake functions say
        with _simd_probes_remembered(), inductor_config.patch(size_asserts=False):
            return compile_fx_inner(graph, inputs)
    except Exception as err:  # noqa: BLE001 - the kernels still run; only the glue stays eager
        log.warning("bitfx: inductor could not compile the float parts (%s: %s); they run as PyTorch ops",
                    type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
        return make_boxed_func(lowered)


def _views_as_reshapes(gm: fx.GraphModule) -> fx.GraphModule:
    """``aten.view`` nodes of the (functional) forward graph become ``aten.reshape``.

    The re-trace gives some ops the strides of inductor's decompositions, not the ones AOTAutograd saw: a
    ``cat`` of HF ``DynamicCache``'s empty placeholder and a transposed key keeps the key's strides there,
    and the ``view`` after it failed ("Cannot view a tensor with shape ... and strides ..."), leaving GPT-2's,
    T5's and BART's float parts eager. ``reshape`` is a view wherever ``view`` was valid and copies
    otherwise; the graph is functional (no op writes through a view), so the values are the same."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default
    gm.recompile()
    return gm


#: ``mm(a [M, K], b [K, N])`` with N at most this (and K at most SKINNY_K) becomes a reduction inductor writes.
SKINNY_N, SKINNY_K = 4, 256


def _skinny_mm_as_reductions(gm: fx.GraphModule) -> fx.GraphModule:
    """``aten.mm`` with at most ``SKINNY_N`` output columns becomes ``sum(a[:, :, None] * b[None], 1)``.

    BiPFT's estimators are such products (each head's q/k/v, ``[B·H·L, D]``, times a ``[D, 2r]`` or
    ``[D, 1]`` weight). As extern MKL calls they took 50-160 µs each at MiniLM's batch 8 x 128 (12,288
    rows; ~2 ms of a 47 ms forward): a BLAS GEMM with N = 2 is a poor fit. As a reduction, inductor writes
    one vectorised loop over the rows, with the producer or consumer fused where it can. The sum over K
    runs in another order than BLAS's, so the values can differ in the last bits, as BLAS's own do between
    CPUs."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.mm.default:
            continue
        a, b = node.args
        va, vb = a.meta.get("val"), b.meta.get("val")
        if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.dtype == vb.dtype
                and va.dtype in (torch.float32, torch.float64) and va.device.type == "cpu"
                and isinstance(vb.shape[1], int) and vb.shape[1] <= SKINNY_N
                and isinstance(vb.shape[0], int) and vb.shape[0] <= SKINNY_K):
            continue
        aten = torch.ops.aten
        with gm.graph.inserting_before(node):
            prod = gm.graph.call_function(aten.mul.Tensor, (gm.graph.call_function(aten.unsqueeze.default, (a, 2)),
                                                            gm.graph.call_function(aten.unsqueeze.default, (b, 0))))
            red = gm.graph.call_function(aten.sum.dim_IntList, (prod, [1]))
        red.meta = dict(node.meta)
        node.replace_all_uses_with(red)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm


class _VecIsaPatch:
    """``VecISA.<name>`` replaced by ``make(inductor's own)`` while at least one user, in any thread, is inside
    ``installed()`` (the early SIMD threads and the compile open them side by side): a count under a lock, so the
    last one out, not the first, puts inductor's back."""

    def __init__(self, name: str, make: Callable) -> None:
        self.name, self.make = name, make
        self._lock, self._users, self._real = threading.Lock(), 0, None

    @contextlib.contextmanager
    def installed(self):
        from torch._inductor import cpu_vec_isa

        with self._lock:
            if self._users == 0:
                self._real = getattr(cpu_vec_isa.VecISA, self.name)
                setattr(cpu_vec_isa.VecISA, self.name, self.make(self._real))
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    setattr(cpu_vec_isa.VecISA, self.name, self._real)


@contextlib.contextmanager
def _simd_probes_remembered():
    """Inductor checks each SIMD ISA the CPU reports by loading a compiled test kernel in a child Python,
    in every process (six children here, ~0.5 s each, even when its FX graph cache hits, and when
    AOTAutograd's cache loads a compiled forward: 1.4 s of a 6-7 s warm start). The answer
    depends only on the test library, this CPU, torch and the C++ compiler: bitfx keeps each passed
    probe in its compile cache and answers it from there in later processes. A failed probe is not
    kept (it is asked again), so a transient failure never disables an ISA.

    The memo is installed while at least one such context is open, in any thread (`_VecIsaPatch`)."""
    from torch._inductor import cpu_vec_isa

    if getattr(cpu_vec_isa.VecISA, "_probe_load", None) is None or not compile_cache.enabled():
        yield
        return
    with _REMEMBERED_PROBES.installed():
        yield


def _remembered_probe(self, real, output_path: str) -> bool:
    try:
        stamp = os.stat(output_path)
        key = compile_cache.content_key(
            "simd_probe", [], extra=f"{_isa_fingerprint()}|{output_path}|{stamp.st_size}|{stamp.st_mtime_ns}")
    except OSError:
        return real(self, output_path)
    with torch._subclasses.fake_tensor.unset_fake_temporarily():  # real tensors inside the compile
        if compile_cache.load(key, stat="simd_probe_") is not None:
            return True
        ok = real(self, output_path)
        if ok:
            compile_cache.store(key, {"ok": torch.tensor(True)}, stat="simd_probe_")
    return ok


_REMEMBERED_PROBES = _VecIsaPatch("_probe_load", lambda real: functools.partialmethod(_remembered_probe, real))


#: The early SIMD checks under way (`_probe_simd_early`), one thread per ISA; joined by `_simd_checked`.
_EARLY_PROBES: list[threading.Thread] = []


def _probe_simd_early() -> None:
    """Start inductor's SIMD ISA checks now, in background threads, one per ISA this CPU reports.

    Inductor asks them one after another when it first generates C++ (`valid_vec_isa_list`), inside
    the compile of the glue: on a machine where its cache is empty each compiles a test library with the
    C++ compiler and loads it in a child Python (seven builds and six loads, ~8 s of a 12-layer BERT's
    cold compile here). Started at the backend's entry they run in child processes beside bitfx's
    capture, passes, calibration and AOTAutograd's trace. Each ISA's answer is inductor's own (its
    ``bool(isa)``, memoised per ISA), so the compile later reads it; the one shortcut is
    `_NestedIsaBuilds`: the ATen test library is built once, for the widest ISA."""
    from torch._inductor import cpu_vec_isa

    if _EARLY_PROBES or platform.machine() not in ("x86_64", "AMD64"):
        return
    try:
        # what a probe imports, imported here first: setuptools (through torch.utils.cpp_extension) patches the
        # import machinery as it loads, and imported in the probe threads it broke an import of the compile's
        # own ("No module named 'torch._inductor.fx_passes.dedupe_symint_uses'")
        import torch.utils._filelock  # noqa: F401
        import torch.utils.cpp_extension  # noqa: F401
        from torch._inductor import codecache, cpp_builder  # noqa: F401

        flags = cpu_vec_isa.x86_isa_checker()
        isas = [isa for isa in cpu_vec_isa.supported_vec_isa_list if all(f in flags for f in str(isa).split())]
    except Exception:  # noqa: BLE001 - inductor asks them itself, as it always did
        return
    nested = _NestedIsaBuilds(isas)

    def check(isa) -> None:
        try:
            with _simd_probes_remembered(), nested.patch.installed(), contextlib.suppress(Exception):
                bool(isa)
        finally:
            if isa is nested.widest:  # (also when its answer was memoised before: then the others build their own)
                nested.done.set()

    # a thread per ISA (three here): one thread for all of them left most of the wait in the compile
    for isa in isas:
        t = threading.Thread(target=check, args=(isa,), name=f"bitfx-simd-{isa}", daemon=True)
        t.start()
        _EARLY_PROBES.append(t)
    # inductor waits for them where it first needs the answer (its codegen), not before it starts: its
    # AOTAutograd trace, lowering and scheduling run beside the checks
    real = cpu_vec_isa.valid_vec_isa_list

    @functools.wraps(real)
    def valid_vec_isa_list():
        if threading.current_thread() not in _EARLY_PROBES:
            _simd_checked()
            cpu_vec_isa.valid_vec_isa_list = real  # joined: inductor's own from now on
        return real()

    cpu_vec_isa.valid_vec_isa_list = valid_vec_isa_list


class _NestedIsaBuilds:
    """Inductor's check of an x86 ISA builds its ATen test library (`VecISA._avx_code`: the vectorised headers,
    ~2 s of g++ each here) with that ISA's flags and loads it, for every ISA the CPU reports, widest first
    (AMX, AVX-512 VNNI, AVX-512, AVX2). Their flags are nested: each is a subset of the one before, for the
    compiler and for the CPU. So while the early checks run, the widest ISA builds and loads the library
    first, and when it passes the narrower ones take its answer for that library instead of building it
    again; each still runs its own small intrinsic checks (bf16, VNNI). If the widest one fails, each
    builds its own, as inductor does. Two long builds less: ~5 s of CPU out of a 2-core cold start."""

    def __init__(self, isas):
        self.widest = isas[0] if isas else None
        self.passed: bool | None = None
        self.done = threading.Event()
        self.patch = _VecIsaPatch("check_build", lambda real: lambda isa, code: self.check_build(real, isa, code))

    def check_build(self, real, isa, code: str) -> bool:
        from torch._inductor import cpu_vec_isa

        if code != cpu_vec_isa.VecISA._avx_code or self.widest is None:
            return real(isa, code)
        if isa is self.widest:
            try:
                self.passed = real(isa, code)
            finally:
                self.done.set()
            return self.passed
        self.done.wait()
        return True if self.passed else real(isa, code)


def _simd_checked() -> None:
    """Wait for the early SIMD checks, so that inductor does not start the same ones again (called where
    inductor first asks for its ISA list)."""
    for t in _EARLY_PROBES:
        t.join()


def _isa_fingerprint() -> str:
    """The CPU's flags, the torch version and the C++ compiler (path and modification time)."""
    import shutil

    from torch._inductor import cpu_vec_isa
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        flags = sorted(cpu_vec_isa.x86_isa_checker()) if platform.machine() in ("x86_64", "AMD64") else []
        cxx = shutil.which(get_cpp_compiler()) or get_cpp_compiler()
        stamp = os.stat(cxx).st_mtime_ns if os.path.exists(cxx) else 0
    except Exception:  # noqa: BLE001 - an unknown setup never matches a stored outcome
        return f"unknown-{os.getpid()}"
    return f"{platform.machine()}|{flags}|{torch.__version__}|{cxx}|{stamp}"


class _AddedValues:
    """The values of the parameters the passes added (scales, thresholds, estimators), per module called.

    Dynamo passes a module's parameters to the compiled graph as inputs, so one graph serves every module
    whose ``forward`` it traced: ``layer.compile(backend="bitfx")`` for each of a BERT's 12 layers
    ("regional compilation", PyTorch's recipe for compile time) calls the backend once, for layer 0, and
    runs that graph for all 12. The added values belong to the module, not to the graph: calibrated on
    layer 0 and shared, BiViT's thresholds were wrong in the other layers (max error 0.47 on a 3-layer
    BERT). So where the graph has parameter inputs, the added values are inputs too (``module``, with
    placeholders for them) and `bind` wraps the compiled function: each call looks its values up by the
    parameters it was given, and the first call with a module's parameters calibrates that module (from
    the added values' initial state, on that call's inputs, through the disk cache as at compile time).
    Without parameter inputs (a GraphModule's own attributes) the values stay constants of the graph.

    Keyed by the first parameter input (``_CALIBRATED``, by identity, weakly) with the identities of all
    of them checked, so a dynamo recompilation (new shapes) reuses the values of the first compile."""

    def __init__(self, traced: fx.GraphModule, before: set[str], example_inputs, config) -> None:
        added = {n: p for n, p in traced.named_parameters() if n not in before}
        added.update({n: b for n, b in traced.named_buffers() if n.startswith("bitfx_")})
        self.traced, self.config, self.names = traced, config, sorted(added)
        self.initial = {n: added[n].detach().clone() for n in self.names}
        self.like = {n: added[n] for n in self.names}
        self._bound: dict[tuple[int, int], tuple] = {}  # (first, last) parameter's id -> (weakref, values)
        self.params = [i for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)]
        self.per_weights = bool(self.names) and bool(self.params)
        self._lock = threading.Lock()
        self.deferred = any(isinstance(x, FakeTensor) for x in example_inputs)
        if self.deferred and self.names and not self.params:
            raise regions.Declined("added values without parameter inputs to key them by")
        if not self.deferred:  # a partition of a split graph (fake activations) calibrates at its first call
            values = self.values(example_inputs)
            with torch.no_grad():  # the graph's own attributes hold the first module's values too
                for name, value in zip(self.names, values):
                    added[name].copy_(value)
        self.module = self._as_inputs(traced) if self.per_weights else traced

    def values(self, inputs) -> tuple[torch.Tensor, ...]:
        """The added values for the module whose parameters are among ``inputs``; calibrated on a miss.

        (Per call: the identities of the first and the last parameter and one dict lookup, under a µs, also
        for a whole model's hundreds of parameters; a miss compares all of them.)"""
        hit = self._hit(inputs)
        return hit if hit is not None else self._look_up(inputs)

    def _hit(self, inputs) -> tuple[torch.Tensor, ...] | None:
        """The values bound to ``inputs``' module, or None (a miss: ``_look_up``)."""
        if not self.names:
            return ()
        if not self.params:  # (values as constants of the graph: asked once, at compile time)
            return None
        first, last = inputs[self.params[0]], inputs[self.params[-1]]
        hit = self._bound.get((id(first), id(last)))
        return hit[1] if hit is not None and hit[0]() is first else None

    def _look_up(self, inputs) -> tuple[torch.Tensor, ...]:
        ids = tuple(id(inputs[i]) for i in self.params)
        key = inputs[self.params[0]] if self.params else None
        like = self.like
        cached = _CALIBRATED.get(key) if key is not None else None
        if (cached is not None and cached[0] == ids
                and all(n in cached[1] and cached[1][n].shape == like[n].shape for n in self.names)):
            # (another compile of the same module: new shapes, or the module since cast with .half())
            values = {n: cached[1][n].to(like[n].device, like[n].dtype) for n in self.names}
        else:
            with self._lock:  # calibration runs on the one traced module
                values = self._calibrate(inputs)
            if key is not None:
                _CALIBRATED[key] = (ids, values)
        out = self._leaves(values)
        if key is not None:
            bound, short = self._bound, (ids[0], ids[-1])
            bound[short] = (weakref.ref(key, lambda _, short=short: bound.pop(short, None)), out)
        return out

    def _leaves(self, values: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """``values`` in ``names`` order as leaves that require grad as the parameters the passes added do: the
        decompositions see the same graph (a 4-D x times a 2-D weight that requires grad folds into one mm:
        BiPFT's estimators)."""
        return tuple(values[n].detach().requires_grad_(self.like[n].requires_grad) for n in self.names)

    def example_values(self, inputs) -> list:
        """The added values of ``inputs``' module as AOTAutograd's example inputs: fake, static-shaped.

        (A real tensor would be fakified there with a dynamic size per dimension, symbols dynamo has no
        source for: the first guard on one, e.g. the lowering reading a scale's length, broke the compile.)"""
        from torch._guards import detect_fake_mode

        # (a partition's activations are fakes: its values come at the first call, with the initial ones' shapes)
        values = self._leaves(self.initial) if self.deferred else self.values(inputs)
        fake_mode = detect_fake_mode(inputs)
        return list(values) if fake_mode is None else [fake_mode.from_tensor(v, static_shapes=True) for v in values]

    def bind(self, compiled):
        hit, look_up = self._hit, self._look_up

        def run(*args):
            values = hit(args)
            if values is not None:
                return compiled(*args, *values)
            # a module's first call: its calibration key and then its kernels' packed-weight keys hash the same
            # weights; each is hashed once (nothing edits them in between)
            with compile_cache.same_tensors():
                return compiled(*args, *look_up(args))

        run.zero_grad, run.named_parameters = compiled.zero_grad, compiled.named_parameters
        run.named_buffers = compiled.named_buffers
        return run

    def _calibrate(self, inputs) -> dict[str, torch.Tensor]:
        added = dict(self.traced.named_parameters()) | dict(self.traced.named_buffers())
        with torch.no_grad():
            for name in self.names:  # every module starts from what the passes set
                added[name].copy_(self.initial[name])
        # dynamo passes SymInts for dynamic sizes: calibrate on their concrete values (hints)
        concrete = tuple(x.node.hint if isinstance(x, torch.SymInt) else x for x in inputs)
        # the same module, batch and config in an earlier process: its calibration from disk
        disk_key = compile_cache.content_key(
            "calibration", [x for x in concrete if isinstance(x, torch.Tensor)],
            extra=repr([x for x in concrete if not isinstance(x, torch.Tensor)]) + repr(self.config)
            + repr([(n, tuple(added[n].shape)) for n in sorted(self.names)]))
        stored = compile_cache.load(disk_key)
        if stored is not None and set(stored) == set(self.names):
            return {n: stored[n].to(added[n].device, added[n].dtype) for n in self.names}
        calibrate(self.traced, [concrete])
        values = {n: added[n].detach().clone() for n in self.names}
        compile_cache.store(disk_key, values)
        return values

    def _as_inputs(self, traced: fx.GraphModule) -> fx.GraphModule:
        """A copy of ``traced`` in which each added value is a placeholder after the graph's own inputs."""
        graph = fx.Graph()
        out = graph.graph_copy(traced.graph, {})
        graph.output(out)
        last = [n for n in graph.nodes if n.op == "placeholder"][-1]
        placeholders = {}
        for name in reversed(self.names):  # each inserted right after the last input: reversed keeps the order
            with graph.inserting_after(last):
                placeholders[name] = graph.placeholder(name)
        for node in list(graph.nodes):
            if node.op == "get_attr" and node.target in placeholders:
                node.replace_all_uses_with(placeholders[node.target])
                graph.erase_node(node)
        module = fx.GraphModule(traced, graph)
        module.meta = getattr(traced, "meta", {})
        return module
