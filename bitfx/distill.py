"""``bitfx.distill``: train a binarized student against its float teacher (knowledge distillation).

A binarized model without training loses its function; BiBERT, BiT and BiPFT recover it by
distillation from the full-precision model. The loss is a weighted sum of three terms, each a mean
over every element (so a data-parallel run over shards equals one process over the global batch)::

    L = w_out · L_out(student outputs, teacher outputs)          # logits or last hidden state
      + w_hid · mean_b MSE(h_b^S, h_b^T)                         # each block's output (BiT, TinyBERT)
      + w_att · mean_a MSE(A_a^S, A_a^T)                         # each attention's scores or probs

* ``L_out``: ``"mse"``; ``"kl"`` = ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` over the last dim (logits);
  ``"cosine"`` = ``mean(1 − cos(s, t))`` over the last dim (embeddings).
* blocks: module paths of the graph (``node.meta["nn_module_stack"]``); by default the shallowest
  paths ending in a list index (``layer.0``, ``encoder.layer.3``, ``blocks.1``); a block's hidden
  state is the last floating-point value computed inside it.
* attention: the attention nodes (``bitfx.bit_attention`` in the student, the canonical
  ``bitfx.attention`` in the teacher, traced through the same canonicalization) matched by module
  path and order. ``"scores"`` compares the scaled, masked scores ``S`` (BiT/BinaryBERT; positions a
  mask removes are left out); ``"probs"`` the teacher's softmax with the student's binarized
  probabilities (their straight-through values); ``"dmd"`` is BiBERT's direction-matching
  distillation: ``MSE(norm(X Xᵀ))`` for X in q, k, v (rows L2-normalised; the student's binarized).

The student's values are straight-through (the gradients of ``bit_linear`` / ``bit_attention``).
Under ``torch.distributed`` (initialised, world size > 1) the student is wrapped in
``DistributedDataParallel`` (or sharded with FSDP2's ``fully_shard``: ``parallel="fsdp"``); each
process passes its own shard of the data.

Example: ``examples/distill_minilm.py``, ``examples/digits.py``.
"""
from __future__ import annotations

import fnmatch
import itertools
import math
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree

from bitfx.calibrate import flat_inputs
from bitfx.ops import ATTENTION, BIT_ATTENTION, BIT_LINEAR
from bitfx.ops import attention as A
from bitfx.ops import quantizers as q
from bitfx.ops.linear import bit_linear_surrogate

OUTPUT_LOSSES = ("mse", "kl", "cosine")
ATTENTION_LOSSES = ("scores", "probs", "dmd")
PARALLEL = ("ddp", "fsdp")
WEIGHT_KEYS = ("output", "hidden", "attention")
DEFAULT_WEIGHTS = {"output": 1.0, "hidden": 1.0, "attention": 1.0}
#: training runs each op's straight-through surrogate directly: the op's forward value (to float
#: rounding) and exactly the gradient its autograd formula gives, without the custom-op dispatch
SURROGATES = {BIT_LINEAR: bit_linear_surrogate, BIT_ATTENTION: A.bit_attention_surrogate}
#: an additive mask at or below this value removes a position from the attention loss
MASKED = -1e3


def distill(student: fx.GraphModule, teacher: torch.nn.Module, batches: Iterable[Any], *, steps: int,
            lr: float = 1e-3, weights: dict[str, float] | None = None, output_loss: str = "mse",
            attention: str = "scores", blocks: Sequence[str] | None = None, temperature: float = 1.0,
            schedule: str = "cosine", weight_decay: float = 0.0, progress: bool = True,
            log_every: int = 10, parallel: str = "ddp") -> fx.GraphModule:
    """Train ``student`` (from :func:`bitfx.binarize`) to reproduce ``teacher`` on ``batches``.

    Args:
        student: a binarized GraphModule; its parameters are updated in place (AdamW).
        teacher: the float model the student was binarized from (or any model ``torch.export``
            captures with the same module paths, e.g. a W1A8 student for BiT's multi-step distillation).
            It is read, never trained (its forward runs under ``no_grad``, captured in eval mode;
            its modes are restored); ``binarize`` gave the student its own parameters.
        batches: batches as given to the model (input tuples, tensors, or mappings of keyword
            inputs); a list is cycled, an iterator is read until ``steps`` or its end.
        steps: optimiser steps (one per batch).
        lr: peak learning rate; ``schedule="cosine"`` decays it to 0, ``"constant"`` keeps it.
        weights: ``{"output": w_out, "hidden": w_hid, "attention": w_att}`` (missing keys: 1.0;
            0 turns a term off).
        output_loss: ``"mse"``, ``"kl"`` (logits, with ``temperature``) or ``"cosine"``.
        attention: ``"scores"``, ``"probs"`` or ``"dmd"`` (see the module docstring).
        blocks: fnmatch patterns of module paths whose outputs are matched (default: see above).
        progress: show a progress bar (rich) with the losses (rank 0 only under DDP).
        parallel: under ``torch.distributed`` (world size > 1): ``"ddp"`` wraps the student in
            ``DistributedDataParallel``; ``"fsdp"`` shards it with FSDP2's ``fully_shard`` (parameters,
            gradients and optimiser state sharded; the scalar α/β parameters, which ``fully_shard``
            refuses, stay replicated with their gradients averaged by an all-reduce). Either way every
            process ends with the same full trained parameters in ``student``.

    Returns:
        ``student``, trained; ``student.bitfx_distill_log`` holds ``{"step", "loss", "output",
        "hidden", "attention", "lr"}`` every ``log_every`` steps and at the last step.

    Raises:
        ValueError: an unknown loss name or weight key, ``steps < 1``, no batches, or a block
            pattern that matches no module path of the student.

    Example: ``examples/distill_minilm.py``.
    """
    w = _check(weights, output_loss, attention, steps, schedule)
    if parallel not in PARALLEL:
        raise ValueError(f"distill: parallel={parallel!r} (accepted: {', '.join(map(repr, PARALLEL))})")
    it = iter(itertools.cycle(batches) if isinstance(batches, (list, tuple)) else batches)
    first = next(it, None)
    if first is None:
        raise ValueError("distill: batches is empty (accepted: an iterable of example-input tuples)")
    pairs = Pairing(student, _teacher_graph(teacher, first), blocks)
    s_net, t_net = pairs.student_module(attention), pairs.teacher_module(attention)
    net, params, sync_grads, finish = _parallel(s_net, student, first, parallel)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda i: 0.5 * (1 + math.cos(math.pi * i / steps))) if schedule == "cosine" else (lambda i: 1.0))
    log: list[dict[str, float]] = []
    bar = _Progress(steps, enabled=progress and _rank() == 0)
    with bar:
        for step, batch in zip(range(steps), itertools.chain([first], it)):
            leaves = flat_inputs(student, batch)
            with torch.no_grad():
                t_out = t_net(*leaves)
            s_out = net(*leaves)
            terms = pairs.losses(s_out, t_out, output_loss, attention, temperature)
            loss = sum(w[k] * v for k, v in terms.items() if w[k])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sync_grads()
            opt.step()
            sched.step()
            row = {"step": step, "loss": loss.item(), **{k: v.item() for k, v in terms.items()},
                   "lr": opt.param_groups[0]["lr"]}
            if step % log_every == 0 or step == steps - 1:
                log.append(row)
            bar.update(row)
    finish()
    student.bitfx_distill_log = log
    student.bitfx_distill_world = _world()
    return student


def _check(weights, output_loss, attention, steps, schedule) -> dict[str, float]:
    if output_loss not in OUTPUT_LOSSES:
        raise ValueError(f"distill: output_loss={output_loss!r} (accepted: {', '.join(map(repr, OUTPUT_LOSSES))})")
    if attention not in ATTENTION_LOSSES:
        raise ValueError(f"distill: attention={attention!r} (accepted: {', '.join(map(repr, ATTENTION_LOSSES))})")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"distill: schedule={schedule!r} (accepted: 'cosine', 'constant')")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"distill: steps={steps!r} (accepted: integers >= 1)")
    unknown = sorted(set(weights or {}) - set(WEIGHT_KEYS))
    if unknown:
        raise ValueError(f"distill: unknown weights {unknown} (accepted keys: {', '.join(WEIGHT_KEYS)})")
    return {**DEFAULT_WEIGHTS, **(weights or {})}


def _teacher_graph(teacher: torch.nn.Module, batch: Any) -> fx.GraphModule:
    """A frozen copy of the teacher, captured and canonicalized as the student was (same module paths,
    ``bitfx.attention``)."""
    from bitfx.api import trace
    from bitfx.passes import PIPELINE
    from bitfx.passes.canonicalize_attention import canonicalize_attention

    # the graph reads the teacher's own tensors (no copy: binarize gave the student its own); it runs
    # under no_grad, and the teacher's train/eval modes are put back after the capture in eval mode
    modes = {m: m.training for m in teacher.modules()}
    teacher.eval()
    upto = PIPELINE.index(canonicalize_attention) + 1
    try:
        if isinstance(batch, Mapping):
            gm, _ = trace(teacher, (), None, passes=PIPELINE[:upto], example_kwargs=dict(batch))
        else:
            gm, _ = trace(teacher, tuple(batch) if isinstance(batch, (tuple, list)) else (batch,), None,
                          passes=PIPELINE[:upto])
    finally:
        for m, mode in modes.items():
            m.training = mode
    return gm


# ------------------------------------------------------------------------------------ matching
def module_paths(node: fx.Node) -> list[str]:
    """The module paths enclosing ``node``, outermost first (from ``nn_module_stack``)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [v[0] for v in stack.values() if isinstance(v, tuple) and v and isinstance(v[0], str)]


def _is_float_tensor(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def block_outputs(gm: fx.GraphModule, patterns: Sequence[str] | None) -> dict[str, fx.Node]:
    """Module path -> the last floating-point node computed inside that module."""
    last: dict[str, fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and _is_float_tensor(n):
            for p in module_paths(n):
                last[p] = n
    if patterns is None:
        indexed = [p for p in last if p.rsplit(".", 1)[-1].isdigit()]
        depth = min((p.count(".") for p in indexed), default=0)
        return {p: last[p] for p in indexed if p.count(".") == depth}
    return {p: n for p, n in last.items() if any(fnmatch.fnmatchcase(p, pat) for pat in patterns)}


def attention_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """``"<module path>#<i>"`` -> the i-th attention node (binary or float) inside that module."""
    found: dict[str, fx.Node] = {}
    count: dict[str, int] = defaultdict(int)
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (BIT_ATTENTION, ATTENTION):
            path = (module_paths(n) or [""])[-1]
            found[f"{path}#{count[path]}"] = n
            count[path] += 1
    return found


class Pairing:
    """The student's and the teacher's outputs, block outputs and attentions, matched by path."""

    def __init__(self, student: fx.GraphModule, teacher: fx.GraphModule, blocks: Sequence[str] | None):
        self.student, self.teacher = student, teacher
        s_blocks, t_blocks = block_outputs(student, blocks), block_outputs(teacher, blocks)
        if blocks is not None and not s_blocks:
            raise ValueError(f"distill: blocks={list(blocks)!r} match no module path of the student "
                             f"(paths: {sorted({p for n in student.graph.nodes for p in module_paths(n)})[:20]})")
        self.blocks = [p for p in s_blocks if p in t_blocks
                       and s_blocks[p].meta["val"].shape == t_blocks[p].meta["val"].shape]
        self.s_blocks, self.t_blocks = s_blocks, t_blocks
        s_att, t_att = attention_nodes(student), attention_nodes(teacher)
        self.attentions = [k for k in s_att if k in t_att]
        self.s_att, self.t_att = s_att, t_att

    def student_module(self, attention: str) -> fx.GraphModule:
        return _tapped(self.student, [self.s_blocks[p] for p in self.blocks],
                       [self.s_att[k] for k in self.attentions], attention, student=True)

    def teacher_module(self, attention: str) -> fx.GraphModule:
        return _tapped(self.teacher, [self.t_blocks[p] for p in self.blocks],
                       [self.t_att[k] for k in self.attentions], attention, student=False)

    def losses(self, s_out, t_out, output_loss: str, attention: str, temperature: float) -> dict:
        (s_y, s_h, s_a), (t_y, t_h, t_a) = s_out, t_out
        pairs = [(a, b) for a, b in zip(s_y, t_y) if isinstance(a, torch.Tensor) and a.is_floating_point()]
        zero = pairs[0][0].new_zeros(()) if pairs else torch.zeros(())
        out = sum((_output_loss(a, b, output_loss, temperature) for a, b in pairs), zero) / max(1, len(pairs))
        hid = sum((F.mse_loss(a.float(), b.float()) for a, b in zip(s_h, t_h)), zero) / max(1, len(s_h))
        att = sum((_attention_loss(a, b, attention) for a, b in zip(s_a, t_a)), zero) / max(1, len(s_a))
        return {"output": out, "hidden": hid, "attention": att}


def _output_loss(s: torch.Tensor, t: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    s, t = s.float(), t.float()
    if kind == "mse":
        return F.mse_loss(s, t)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    tt = temperature
    logp_s, p_t = F.log_softmax(s / tt, dim=-1), F.softmax(t / tt, dim=-1)
    kl = (p_t * (torch.log(p_t.clamp(min=1e-12)) - logp_s)).sum(-1)
    return kl.mean() * tt * tt


def _attention_loss(s, t, kind: str) -> torch.Tensor:
    if kind == "dmd":
        return sum(F.mse_loss(a, b) for a, b in zip(s, t)) / len(s)
    (s_val, keep), (t_val, _) = s, t
    diff = torch.where(keep, s_val.float() - t_val.float(), torch.zeros((), device=s_val.device))
    return diff.pow(2).mean()


# ------------------------------------------------------------------------------------ tapped graphs
def _tapped(gm: fx.GraphModule, hidden: list[fx.Node], attentions: list[fx.Node], attention: str,
            student: bool) -> fx.GraphModule:
    """A GraphModule sharing ``gm``'s parameters whose output is
    ``(flat outputs, [block outputs], [attention views])``; inputs are the flat input leaves."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    outputs = list(out) if isinstance(out, (tuple, list)) else [out]
    view = _attention_view(attention)
    atts = [graph.call_function(view, (n.target, tuple(env[a] if isinstance(a, fx.Node) else a
                                                          for a in n.args)))
            for n in attentions]
    graph.output((outputs, [env[n] for n in hidden], atts))
    if student:
        for n in graph.nodes:
            if n.op == "call_function" and n.target in SURROGATES:
                n.target = SURROGATES[n.target]
    return fx.GraphModule(gm, graph)


def _attention_view(kind: str):
    return {"scores": attention_scores, "probs": attention_probs, "dmd": attention_directions}[kind]


def _scores(target, args) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled masked scores with the student's straight-through values, mask of kept positions)."""
    if target == BIT_ATTENTION:
        qt, k, v, mask, aq, ak = args[:6]
        eq, ek, scale, causal = args[8], args[9], args[11], args[12]
        _, _, qv = q.act_sign(qt.float(), None, aq)
        _, _, kv = q.act_sign(k.float(), None, ak)
        s = qv @ kv.transpose(-2, -1)
        res = A._score_residual(eq, ek)
        if res is not None:
            s = s + res
    else:
        qt, k, v, mask, scale, causal = args[:6]
        s = qt.float() @ k.float().transpose(-2, -1)
    s = s * A._default_scale(qt, scale)
    keep = A.apply_mask(torch.zeros_like(s), mask, causal) > MASKED
    return torch.where(keep, s, torch.zeros((), device=s.device)), keep


def attention_scores(target, args):
    """The scaled scores S = q·kᵀ·scale (student: α_q sign(q)·(α_k sign(k))ᵀ + BiPFT residual)."""
    return _scores(target, args)


def attention_probs(target, args):
    """Teacher: softmax(S + mask); student: its binarized probabilities (straight-through values)."""
    s, keep = _scores(target, args)
    masked = s.masked_fill(~keep, float("-inf"))
    if target == BIT_ATTENTION:
        _, _, p = A._probs(masked, args[7], args[13])
    else:
        p = A.masked_softmax(masked)
    return p, keep


def attention_directions(target, args):
    """BiBERT DMD: row-normalised Gram matrices of q, k, v (the student's binarized values)."""
    qt, k, v = args[:3]
    if target == BIT_ATTENTION:
        qt, k = q.act_sign(qt.float(), None, args[4])[2], q.act_sign(k.float(), None, args[5])[2]
        v = A._value_codes(v.float(), args[6])[2]
    return [F.normalize(x.float() @ x.float().transpose(-2, -1), dim=-1) for x in (qt, k, v)]


# ------------------------------------------------------------------------------------ DDP, progress
def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _nothing() -> None:
    return None


def _parallel(net: torch.nn.Module, student: torch.nn.Module, example: Any, kind: str):
    """(module to run, parameters to optimise, gradient sync after backward, write-back at the end).

    ``net`` is the tapped student (it shares ``student``'s parameter objects). One process: as is.
    DDP: wrapped (same parameter objects). FSDP2: ``fully_shard(net)`` gives ``net`` sharded DTensor
    parameters of its own; the scalars it refuses stay plain (``ignored_params``), their gradients
    averaged here; at the end every full parameter is gathered back into ``student``'s.
    """
    mine = [p for p in student.parameters() if p.requires_grad]
    if _world() == 1:
        return net, mine, _nothing, _nothing
    dev = next((t.device for t in pytree.tree_leaves(example) if isinstance(t, torch.Tensor)), None)
    if kind == "ddp":
        ids = [dev] if dev is not None and dev.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(net, device_ids=ids), mine, _nothing, _nothing
    from torch.distributed.fsdp import fully_shard

    dist, world = torch.distributed, _world()
    with torch.no_grad():  # as DDP does: every process starts from rank 0's values
        for t in (*net.parameters(), *net.buffers()):
            dist.broadcast(t, src=0)
    scalars = [p for p in net.parameters() if p.dim() == 0]
    names = [n for n, _ in net.named_parameters()]
    fully_shard(net, ignored_params=set(scalars))
    sharded = dict(net.named_parameters())
    params = [sharded[n] for n in names if sharded[n].requires_grad]

    def sync_grads():
        for p in scalars:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(world)

    def finish():
        with torch.no_grad():
            for n in names:
                p = sharded[n]
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                target = student.get_parameter(n)
                if target is not p:
                    target.copy_(full)

    return net, params, sync_grads, finish


class _Progress:
    """A rich progress bar showing the loss terms (or nothing when disabled)."""

    def __init__(self, total: int, enabled: bool):
        self.enabled, self.total = enabled, total
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("distill"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), TextColumn("{task.fields[losses]}"))
            self.task = self.bar.add_task("distill", total=total, losses="")

    def __enter__(self):
        if self.enabled:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)

    def update(self, row: dict) -> None:
        if self.enabled:
            text = "  ".join(f"{k} {row[k]:.4g}" for k in ("loss", *WEIGHT_KEYS))
            self.bar.update(self.task, advance=1, losses=text)
