"""bitfx ops -> calls of TVM-generated kernels (``config.kernels == "tvm"``).

Before (AOTAutograd's inference graph; parameters are inputs)::

    y = bit_linear(x, W, b, s, move, α, "sign_tensor", "sign", 1)

After::

    y = bitfx_kernel_0(x, W, b, s, move, α)     # BitLinearKernel: packs W once, calls TVM

``BitLinearKernel`` binarizes and packs its weight ahead of the first call and keeps it until the
parameter changes: the cache key is the tensor's storage pointer and its ``_version`` (bumped by
every in-place update, e.g. ``optimizer.step()``), so packed weights are never stale. A weight that
is a slice of a packed parameter (MHA's ``in_proj_weight[E:]``) is a view: its pointer is the
slice's own and its ``_version`` is the parameter's. A weight the graph *computes* (not a view or
slice of an input) is a fresh tensor each call, whose address may be reused: it is packed per call.
``bit_attention`` becomes ``tvm_bit_attention``: one call of the fused host kernel where it covers the
call (``bitfx.codegen.fused_attention.unsupported_reason``), else the two integer products (sign(q)·sign(k)ᵀ
and P_b·sign(v)) run as kernels, the float parts (scales, estimators, mask, softmax) in PyTorch.
With ``glue="inductor"`` (``PassContext.glue``) both become opaque kernel ops instead (``fused_attention``,
or ``sign_scores``/``binary_pv`` of ``bitfx.ops.kernel_ops``), and the backend compiles the float parts
around them (the score bias; the two-kernel path's softmax and binarizer) with inductor.
With ``kernels="reference"`` the graph is left as it is and the ops run their PyTorch reference.

With inductor glue, a CPU ``bit_linear`` whose only use is an exact GELU (``aten.gelu``, BERT's
intermediate projection) takes it into its GEMM's epilogue (``activation="gelu"``): the float
output is written once, already activated, instead of written, read and written again by a glue
kernel. ``BITFX_FUSE_EPILOGUE=0`` leaves the GELU to inductor.

With inductor glue, the next binary linear's sign-and-pack moves into that epilogue too, when that linear is the
only use (BERT's output projection after the intermediate GELU) and its codes are ``sign(x + move)`` with a given
α (bipft, bit, bivit; not a per-token mean|x|, which needs whole rows) and N is a multiple of 64::

    h = bit_linear(x, W1, ..., activation="gelu");  y = bit_linear(h, W2, b2, s2, m2, α2, ...)
 -> c = bit_linear_to_bits(x, W1, ..., activation="gelu", out_move=m2)   # int64 [..., N/64]: packed codes
    y = bit_linear_on_bits(c, W2, b2, s2, None, α2, ...)                 # the GEMM alone

The float h is never written nor read again (at MiniLM's 1024 x 1536: 6 MiB a layer), and the second layer's
packing pass is gone. ``BITFX_FUSE_PACK=0`` keeps the two linears apart.

The kernels each lowered call will run are known here (shapes and options from the nodes' fake values): the
pass starts them compiling in background threads (``build.prefetch``), so that on a cold cache they build
beside each other and beside inductor's compile of the glue, not one after another at the first call.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from bitfx.codegen import fused_attention
from bitfx.env import switched_off
from bitfx.ops import BIT_ATTENTION, BIT_LINEAR, kernel_ops, native
from bitfx.ops import attention as A
from bitfx.passes.context import PassContext
from bitfx.passes.graph import SLICE_OPS, VIEW_OPS, copy_meta, trace_back


class BitLinearKernel(torch.nn.Module):
    """A ``bit_linear`` call on the generated kernel, with its packed weight cached."""

    def __init__(self, weight_mode: str, act_mode: str, act_bits: int, cache: bool = True):
        super().__init__()
        self.weight_mode, self.act_mode, self.act_bits = weight_mode, act_mode, act_bits
        self.cache = cache
        self._key = None
        self._packed = None
        self._col_scale = None

    def extra_repr(self) -> str:
        return f"{self.weight_mode}, {self.act_mode}, bits={self.act_bits}"

    def packed(self, weight: torch.Tensor, weight_scale: torch.Tensor | None):
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.stride())
        if key != self._key or not self.cache:
            with torch.no_grad():  # the same binarize-and-pack as the kernel ops (and their disk cache)
                self._packed, col_scale = kernel_ops._packed_weight(weight, self.weight_mode,
                                                                    use_disk=self._key is None and self.cache)
                # one per-tensor scale is expanded to [N] here, once, not by the runtime per call
                self._col_scale = col_scale.expand(weight.shape[0]).contiguous()
            self._key = key
        col = self._col_scale if weight_scale is None else weight_scale.detach().float().reshape(-1)
        return self._packed, col

    def forward(self, x, weight, bias, weight_scale, move, alpha):
        from bitfx.codegen import runtime

        # the plan (kernels, contiguous vectors) is rebuilt only when a parameter changes
        key = tuple(None if t is None else (t.data_ptr(), t._version)
                    for t in (weight, bias, weight_scale, move, alpha))
        plan = getattr(self, "_plan", None)
        if plan is None or key != self._plan_key or not self.cache:
            packed, col = self.packed(weight, weight_scale)
            plan = self._plan = runtime.LinearPlan(
                packed, act=self.act_mode, bits=self.act_bits,
                move=None if move is None else move.detach(),
                alpha=None if alpha is None else alpha.detach(),
                col_scale=col, bias=None if bias is None else bias.detach(),
            )
            self._plan_key = key
        return plan(x)


#: Ops whose output aliases their input's storage (clone/contiguous may copy: not included).
ALIASING_OPS = (VIEW_OPS - {torch.ops.aten.clone.default, torch.ops.aten.contiguous.default}) | SLICE_OPS


def tvm_bit_attention(*args):
    """``bit_attention`` on the fused host kernel when it covers the call (``bitfx.codegen.fused_attention``:
    bivit, bool, elastic with a given α_P, CPU, same q/k/v leading dims), else with its two integer products
    on the kernels and the float parts in PyTorch (the reference's one formula)."""
    from bitfx.codegen import runtime
    from bitfx.codegen.fused_attention import bit_attention_fused

    def two_kernels(*a):
        return A.bit_attention_formula(*a, sign_scores=runtime.sign_scores, binary_pv=runtime.binary_pv)

    return bit_attention_fused(*args, fallback=two_kernels)


def _view_of(weight: fx.Node, src: fx.Node):
    """``(size, stride, storage_offset)`` of a weight that is a view of parameter ``src`` (static), or None.

    Inductor hands a view of a graph input to an extern op as a fresh strided alias that shares
    neither the parameter's identity nor its version counter; passing the parameter and the view
    lets the kernel op key its packed weight by the parameter and see every in-place update.
    """
    if weight is src:
        return None
    val = weight.meta.get("val") if isinstance(weight, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return [int(d) for d in val.shape], [int(d) for d in val.stride()], int(val.storage_offset())
    except Exception:  # noqa: BLE001 - symbolic geometry: pass the view as it is
        return None


def _epilogue_activation(node: fx.Node) -> fx.Node | None:
    """The GELU node a float32 CPU ``bit_linear`` can take into its epilogue: its only use, exact form."""
    if switched_off("BITFX_FUSE_EPILOGUE"):
        return None
    val = node.meta.get("val")
    users = list(node.users)
    if not (isinstance(val, torch.Tensor) and val.device.type == "cpu" and val.dtype == torch.float32
            and len(users) == 1):
        return None
    (user,) = users
    if user.op != "call_function" or user.target is not torch.ops.aten.gelu.default or user.args[0] is not node:
        return None
    approximate = user.kwargs.get("approximate", user.args[1] if len(user.args) > 1 else "none")
    return user if approximate == "none" else None


def _packed_consumer(node: fx.Node, out: fx.Node) -> fx.Node | None:
    """The ``bit_linear`` whose sign-and-pack a float32 CPU ``bit_linear`` (``node``; ``out``: its output, or the GELU
    fused into it) can take into its epilogue: the only use of ``out``, codes ``sign(x + move)`` with a given α."""
    if switched_off("BITFX_FUSE_PACK"):
        return None
    val = node.meta.get("val")
    users = list(out.users)
    if not (isinstance(val, torch.Tensor) and val.device.type == "cpu" and val.dtype == torch.float32
            and val.dim() >= 1 and isinstance(val.shape[-1], int) and val.shape[-1] % 64 == 0 and len(users) == 1
            and (out is node or len(node.users) == 1)):
        return None
    (user,) = users
    if not (user.op == "call_function" and user.target == BIT_LINEAR and user.args[0] is out and user.args[5] is not None
            and user.args[7] == "sign" and user.args[8] == 1):
        return None
    return user


def _to_bits_val(val: torch.Tensor):
    """The fake value of ``bit_linear_to_bits``' output: int64 ``[..., N/64]`` for a float output ``[..., N]``."""
    try:
        return val.new_empty((*val.shape[:-1], val.shape[-1] // 64), dtype=torch.int64)
    except Exception:  # noqa: BLE001 - no fake value: inductor re-traces the graph anyway
        return None


def _linear_kernels(node: fx.Node, args, activation: str, output: str, out_move: bool) -> list:
    """The host kernels a lowered CPU ``bit_linear`` (``node``, before lowering; ``args``: the lowered call's
    first nine) will call, from the fake values; [] when they are not known here (no fake value, not on the
    CPU, an unknown method)."""
    from bitfx.codegen import runtime
    from bitfx.ops import methods

    x, w = (a.meta.get("val") if isinstance(a, fx.Node) else None for a in node.args[:2])
    if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and x.device.type == "cpu" and w.dim() == 2):
        return []
    try:
        N, K = int(w.shape[0]), int(w.shape[1])
        return runtime.plan_kernels(K, N, ternary=methods.weight_method(args[6]).ternary, act=args[7], bits=args[8],
                                    move=args[4] is not None, alpha=args[5] is not None, bias=args[2] is not None,
                                    activation=activation, output=output, out_move=out_move)
    except (TypeError, ValueError):  # symbolic sizes, an unknown method: the first call builds them
        return []


def _attention_kernels(node: fx.Node) -> list:
    """The fused attention kernel a lowered ``bit_attention`` will call, from its fake values, or []."""
    vals = [a.meta.get("val") if isinstance(a, fx.Node) else a for a in node.args]
    if not all(isinstance(v, torch.Tensor) for v in vals[:3]):
        return []
    try:
        spec = fused_attention.kernel_spec(*vals)
    except (TypeError, ValueError, AttributeError):  # symbolic sizes: the first call builds it
        return []
    return [] if spec is None else [spec]  # (one with a symbolic size: `build.prefetch` leaves it to the call)


def lower_kernels(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    if ctx.config.kernels != "tvm":
        return gm
    if ctx.glue == "inductor":  # the kernel ops' C++ kernels: loaded, or built while the rest compiles
        native.start()
    from bitfx.codegen import build

    count = 0
    on_bits: set[fx.Node] = set()  # bit_linears whose input a producer's epilogue signs and packs
    kernels: list = []  # what the lowered calls will run: prefetched below
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        val = None  # the new node's fake value, when not the old one's
        if node.target == BIT_LINEAR:
            src, _ = trace_back(node.args[1], ALIASING_OPS)
            persistent = isinstance(src, fx.Node) and src.op in ("placeholder", "get_attr")
            with gm.graph.inserting_before(node):
                if ctx.glue == "inductor":  # an opaque op inductor calls as an extern kernel
                    args = list(node.args[:9])
                    view = _view_of(node.args[1], src) if persistent else None
                    if view is not None:  # the parameter itself, and the view to take of it
                        args[1] = src
                    act = _epilogue_activation(node)
                    kwargs = {"activation": "gelu"} if act is not None else {}
                    target = kernel_ops.BIT_LINEAR_KERNEL
                    consumer = _packed_consumer(node, act if act is not None else node)
                    if node in on_bits:  # its codes come packed, the move applied by the producer
                        target, args[4] = kernel_ops.BIT_LINEAR_ON_BITS, None
                    elif consumer is not None:  # the next linear's codes, packed in this epilogue
                        target, kwargs["out_move"] = kernel_ops.BIT_LINEAR_TO_BITS, consumer.args[4]
                        on_bits.add(consumer)
                        val = _to_bits_val(node.meta["val"])
                    new = gm.graph.call_function(target, (*args, persistent, *(view or ())), kwargs)
                    kernels += _linear_kernels(node, args, kwargs.get("activation", "none"),
                                               "sign_bits" if "out_move" in kwargs else "float",
                                               kwargs.get("out_move") is not None)
                    if act is not None:  # the GELU is the kernel's now: its uses take the kernel's output
                        act.replace_all_uses_with(new)
                        gm.graph.erase_node(act)
                else:
                    name = f"bitfx_kernel_{count}"
                    count += 1
                    gm.add_submodule(name, BitLinearKernel(*node.args[6:9], cache=persistent))
                    new = gm.graph.call_module(name, tuple(node.args[:6]))
                    kernels += _linear_kernels(node, node.args, "none", "float", False)
        elif node.target == BIT_ATTENTION:
            # the fused kernel op where it covers the call (decided when traced, BITFX_FUSED_ATTENTION=0
            # included), else the two kernel ops
            fn = fused_attention.bit_attention_on_fused_kernel if ctx.glue == "inductor" else tvm_bit_attention
            kernels += _attention_kernels(node)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(fn, tuple(node.args))
        else:
            continue
        copy_meta(node, new)
        if val is not None:
            new.meta["val"] = val
        elif "val" in node.meta:
            new.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    build.prefetch(kernels)
    return gm


__all__ = ["lower_kernels", "BitLinearKernel", "tvm_bit_attention"]
