"""Models that carry their own binarizer: straight-through fake-quant linears become ``bit_linear``.

Before (BitNet ``BitLinear``, as its author writes it; BiT/BiPFT and BitNet b1.58 alike)::

    xq = x + (q_a(x) - x).detach()        # add(x, detach(sub(q_a(x), x)))
    wq = W + (q_w(W) - W).detach()
    y  = linear(xq, wq, b)

After::

    y = bit_linear(x, W, b, None, move, α, weight_mode, act_mode, act_bits)

``q_a`` and ``q_w`` are recognised by what they compute, not by how they are spelled: the subgraph
from ``x`` (``W``) to ``q_a(x)`` (``q_w(W)``) is evaluated, ``q_w`` on the parameter itself and
``q_a`` on a fixed probe of the input's shape, and compared with each method bitfx implements:

* weights: ``sign_tensor`` (``sign(W - mean W)·mean|W|``, BitNet W1 / BiT BWN), ``sign_channel``
  (per output row), ``ternary`` (``clamp(round(W/γ), -1, 1)·γ``, ``γ = mean|W|``, BitNet b1.58);
* activations: ``absmax`` with 2..8 bits per token (BitNet), ``sign`` with the per-token
  ``mean|x|`` (XNOR-Net) or with the model's own scalar ``α`` and per-channel ``move`` parameters
  (BiT/BiPFT elastic: ``α·sign(x + move)``; ``move`` may be added before the STE or inside ``q_a``),
  ``unsigned`` with the model's ``α`` (and ``move``): BiT's ``α·clip(round((x + move)/α), 0, 1)``
  for the non-negative inputs after a ReLU.

A layer is rewritten only when both quantizers agree with a method (to float rounding, on at least
99.9% of the elements: ``torch.sign(0) = 0`` where bitfx's sign(0) = +1), so the ``bit_linear``
gives the model's own fake-quant output and runs on the binary kernels. The model's parameters
(``α``, ``move``) are used as they are (``bitfx.calibrate`` leaves them alone); the gradients are
bitfx's straight-through estimators (identity for weights and absmax activations, as the model's
own; clipped identity ``1[|u| <= α]`` for sign activations, where the ``detach`` form has none).

When a model carries its own binarizer, its other layers keep the author's choice (float; e.g. the
output head) unless ``config.own_binarizer == "extend"``; ``"ignore"`` turns this pass off.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from bitfx.ops import BIT_LINEAR, methods
from bitfx.passes.binarize_linear import weight_source
from bitfx.passes.context import PassContext, Rewrite, Skip, fake_value, module_of
from bitfx.passes.graph import call, erase_unused, getattr_path

aten = torch.ops.aten
PASS = "recognize_fake_quant"
DETACH = {aten.detach.default, aten.alias.default}

#: Meta key set on a recognised ``bit_linear``: the method, e.g. "absmax8/sign_tensor".
OWN = "bitfx_own_quantizer"
#: Meta key set on a fake-quant linear this pass refused (and reported).
REFUSED = "bitfx_fake_quant_refused"


@dataclass
class _STE:
    base: fx.Node          # x
    quantized: fx.Node     # q(x)
    nodes: list[fx.Node]   # add, detach, sub


class _NotAFunction(Exception):
    """The quantizer subgraph reads something other than its input, parameters and constants."""


def recognize_fake_quant(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    if ctx.config.own_binarizer == "ignore":
        return gm
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != aten.linear.default:
            continue
        act, wgt = _ste(node.args[0]), _ste(node.args[1])
        if act is None and wgt is None:
            continue
        try:
            found = _recognise(gm, node, act, wgt, ctx)
        except _NotAFunction as e:
            found = f"the quantizer subgraph is not a function of its input and parameters ({e})"
        if isinstance(found, str):
            node.meta[REFUSED] = True
            ctx.report.skips.append(Skip(PASS, "linear", module_of(node), "unrecognised", found, [node.name]))
            continue
        _rewrite(gm, node, act, wgt, found, ctx)
    return gm


# -- matching -----------------------------------------------------------------------------------
def _ste(node: Any) -> _STE | None:
    """``add(x, detach(sub(q, x)))`` (either operand order of the add) -> its parts."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target == aten.add.Tensor):
        return None
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2:
        return None
    for base, det in (node.args, node.args[::-1]):
        if not (isinstance(det, fx.Node) and det.target in DETACH):
            continue
        sub = det.args[0]
        if (isinstance(sub, fx.Node) and sub.target == aten.sub.Tensor and sub.args[1] is base
                and sub.kwargs.get("alpha", 1) == 1 and isinstance(sub.args[0], fx.Node)):
            return _STE(base, sub.args[0], [node, det, sub])
    return None


@dataclass
class _Found:
    weight: fx.Node
    weight_mode: str
    act_mode: str
    act_bits: int
    x: fx.Node
    move: fx.Node | None
    alpha: fx.Node | None
    cones: list[fx.Node]  # the quantizer subgraphs, erased with the linear

    @property
    def method(self) -> str:
        act = f"{self.act_mode}{self.act_bits}" + ("_alpha" if self.alpha is not None else "") + (
            "_move" if self.move is not None else "")
        return f"{act}/{self.weight_mode}"


def _recognise(gm, node, act: _STE | None, wgt: _STE | None, ctx: PassContext) -> _Found | str:
    if wgt is None:
        return "fake-quant activations with a float weight (no binary kernel for float weights)"
    if act is None:
        return "fake-quant weights with float activations (no binary kernel for float activations)"
    if weight_source(wgt.base, ctx) is None:
        return "the fake-quant weight is not a parameter"
    w = _value(gm, wgt.base, ctx)
    q_w, _, w_cone = _function(gm, wgt.base, wgt.quantized, ctx)
    with torch.no_grad():
        model_w = q_w(w)
    weight_mode = next((mode for mode, ref in WEIGHT_METHODS.items() if _agree(model_w, ref(w.float()))), None)
    if weight_mode is None:
        return (f"weight quantizer matches none of {', '.join(WEIGHT_METHODS)} "
                f"(values {_few(model_w)})")
    q_a, leaves, a_cone = _function(gm, act.base, act.quantized, ctx)
    probe = _probe(act.base)
    with torch.no_grad():
        model_a = q_a(probe)
    for act_mode, bits, move, alpha, ref in _act_candidates(gm, act, leaves, ctx):
        with torch.no_grad():
            if _agree(model_a, ref(probe)):
                x, move = _outer_move(act.base, move, ctx)
                return _Found(wgt.base, weight_mode, act_mode, bits, x, move, alpha, w_cone + a_cone)
    return (f"activation quantizer matches none of {', '.join(methods.ACT)} (any accepted bits, the "
            f"model's α and move) (values {_few(model_a)})")


#: bitfx's weight methods (the registry), as the dequantized weight each one computes.
WEIGHT_METHODS = {name: m.dequantized for name, m in methods.WEIGHT.items()}


def _act_candidates(gm, act: _STE, leaves: list[fx.Node], ctx: PassContext):
    """(act_mode, bits, move node, alpha node, reference fn of the probe) for every registered
    activation method, every bit width it accepts, and the model's scalar (α) / [K] (move) parameters."""
    k = _probe(act.base).shape[-1]
    scalars = [n for n in leaves if _value(gm, n, ctx).numel() == 1]
    vectors = [n for n in leaves if tuple(_value(gm, n, ctx).shape) == (k,)]
    for name, method in methods.ACT.items():
        lo, hi = method.bits
        for bits in range(hi, lo - 1, -1):
            alphas = [*([] if method.needs_alpha else [None]), *scalars] if method.takes_alpha else [None]
            for alpha in alphas:
                for move in [None, *vectors] if method.takes_move else [None]:
                    a = None if alpha is None else _value(gm, alpha, ctx).detach().float()
                    mv = None if move is None else _value(gm, move, ctx).detach().float()
                    yield name, bits, move, alpha, (
                        lambda x, f=method.dequantized, a=a, mv=mv, b=bits: f(x.float(), mv, a, b))


def _outer_move(base: fx.Node, move: fx.Node | None, ctx: PassContext) -> tuple[fx.Node, fx.Node | None]:
    """``u = x + move`` written before the STE: the bit_linear takes x and folds move into its kernel."""
    if move is not None or base.target != aten.add.Tensor or len(base.args) != 2:
        return base, move
    x, p = base.args
    pv, xv = fake_value(p), fake_value(x)
    if (isinstance(p, fx.Node) and ctx.is_weight(p) and isinstance(pv, torch.Tensor) and pv.dim() == 1
            and isinstance(xv, torch.Tensor) and pv.shape[0] == xv.shape[-1] and base.kwargs.get("alpha", 1) == 1):
        return x, p
    return base, None


def _agree(model: torch.Tensor, ref: torch.Tensor) -> bool:
    if model.shape != ref.shape:
        return False
    model, ref = model.float(), ref.float()
    tol = 1e-5 * float(ref.abs().max().clamp(min=1e-12))
    close = torch.isclose(model, ref, rtol=1e-5, atol=tol)
    return bool(close.float().mean() >= 0.999)


def _few(t: torch.Tensor) -> str:
    return ", ".join(f"{v:.3g}" for v in t.flatten()[:3].tolist()) + ", ..."


# -- evaluating a quantizer subgraph --------------------------------------------------------------
def _value(gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> torch.Tensor:
    """The tensor of a parameter node (get_attr, or a dynamo placeholder given in example_inputs)."""
    if node.op == "get_attr":
        return getattr_path(gm, node.target)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if node.op == "placeholder" and ctx.example_inputs is not None and node in placeholders:
        i = placeholders.index(node)
        if i < len(ctx.example_inputs) and isinstance(ctx.example_inputs[i], torch.Tensor):
            return ctx.example_inputs[i]
    raise _NotAFunction(f"no value for {node.name}")


def _function(gm, base: fx.Node, out: fx.Node, ctx: PassContext):
    """``out`` as a function of ``base`` (parameters bound to their values); and the parameter leaves."""
    cone, leaves, stack = set(), [], [out]
    while stack:
        n = stack.pop()
        if n in cone or n is base:
            continue
        if ctx.is_weight(n):
            if n not in leaves:
                leaves.append(n)
            continue
        if n.op != "call_function":
            raise _NotAFunction(f"reads {n.name} ({n.op})")
        cone.add(n)
        stack.extend(n.all_input_nodes)
    order = [n for n in gm.graph.nodes if n in cone]
    values = {leaf: _value(gm, leaf, ctx) for leaf in leaves}

    def run(x: torch.Tensor) -> torch.Tensor:
        env = {base: x, **values}
        for n in order:
            args = fx.node.map_arg(n.args, env.__getitem__)
            kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
            env[n] = n.target(*args, **kwargs)
        return env[out]

    return run, leaves, order


def _probe(base: fx.Node) -> torch.Tensor:
    """A fixed input of ``base``'s shape (sizes from their hints): tokens of varied magnitude."""
    v = fake_value(base)
    if not isinstance(v, torch.Tensor):
        raise _NotAFunction(f"shape of {base.name} unknown")
    shape = [d if isinstance(d, int) else getattr(d.node, "hint", None) for d in v.shape]
    if any(not isinstance(d, int) for d in shape):
        raise _NotAFunction(f"shape of {base.name} has no size hint")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    x = x * (0.5 + 2 * torch.rand(*shape[:-1], 1, generator=g)) if len(shape) > 1 else x
    return x.to(v.dtype)


# -- rewriting ------------------------------------------------------------------------------------
def _rewrite(gm: fx.GraphModule, node: fx.Node, act: _STE, wgt: _STE, f: _Found, ctx: PassContext) -> None:
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    new = call(gm, BIT_LINEAR, (f.x, f.weight, bias, None, f.move, f.alpha, f.weight_mode, f.act_mode, f.act_bits),
               before=node, like=node)
    new.meta[OWN] = f.method
    node.replace_all_uses_with(new)
    names = {n.name for n in gm.graph.nodes}
    gm.graph.erase_node(node)
    erase_unused(gm, [*act.nodes, *wgt.nodes, *f.cones])  # (reverse topological order)
    gone = sorted(names - {n.name for n in gm.graph.nodes})
    ctx.own_quantizers += 1
    ctx.report.rewrites.append(Rewrite(PASS, "linear", module_of(new), gone, new.name, "bit_linear"))

