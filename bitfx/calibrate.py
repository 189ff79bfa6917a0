"""``bitfx.calibrate``: data-driven initial values for the parameters the binarize passes added.

One pass over each batch, in graph order; each bitfx op's parameters are set from the inputs it
actually receives (upstream layers already calibrated), then the op runs:

* ``bit_linear``: ``α = 2·mean|x + move|`` (BiT), learnable per-channel weight scale = row mean|W|.
* ``bit_attention``: ``α_q, α_k, α_v = mean|·|``; elastic ``α_P = 4·mean(P)`` (BiT);
  BiViT ``β`` by the paper's coordinate descent on each row of P
  (``v = (a·b)/(b·b)``, ``T = v/2``, ``b = 1[a >= T]``, β = mean T/rowmax);
  BiPFT estimators by least squares on the binarization residual (a few Adam steps: the score
  residual is bilinear in the two estimator weights; the value residual is linear, solved in closed form).

Over many batches the statistics are running means (after N batches α, α_P and β equal the mean of
the N per-batch values); the value estimator solves the least squares of all rows seen so far
(its normal equations are summed over batches); the score estimators continue their fit on each
batch. ``progress=True`` shows a progress bar.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from bitfx.ops import BIT_ATTENTION, BIT_LINEAR
from bitfx.ops import attention as A
from bitfx.ops import methods
from bitfx.ops import quantizers as q
from bitfx.passes.graph import getattr_path


def calibrate(gm: fx.GraphModule, batches: Iterable[Any], *, estimator_steps: int = 30,
              progress: bool = False) -> fx.GraphModule:
    """Initialise the binarized model's scales, thresholds and estimators from ``batches``.

    Args:
        gm: a GraphModule returned by :func:`bitfx.binarize`.
        batches: an iterable of batches as given to the model: input tuples, single tensors, or
            mappings of keyword inputs. The values are running statistics over all of them
            (see the module docstring); the first batch replaces what ``binarize`` set.
        estimator_steps: optimisation steps of the BiPFT estimator least-squares fit per batch.
        progress: show a progress bar (rich).

    Returns:
        ``gm``, with its parameters updated in place.

    Example: ``examples/qat.py``.
    """
    calibrator = _Calibrator(gm, estimator_steps)
    count = 0
    with torch.no_grad(), _progress(batches, progress) as advance:
        for batch in batches:
            calibrator.count = count
            calibrator.run(*flat_inputs(gm, batch))
            count += 1
            advance()
    if count == 0:
        raise ValueError("calibrate: batches is empty (accepted: an iterable of example-input tuples)")
    return gm


def flat_inputs(gm: fx.GraphModule, batch: Any) -> tuple:
    """The flat graph inputs of one batch (a tuple, one tensor, or a mapping of keyword inputs)."""
    args, kwargs = ((), dict(batch)) if isinstance(batch, Mapping) else (
        (tuple(batch), {}) if isinstance(batch, (tuple, list)) else ((batch,), {}))
    n_inputs = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if not kwargs and len(args) == n_inputs and all(isinstance(a, torch.Tensor) for a in args):
        return args  # already the graph's flat inputs
    call = getattr(gm, "bitfx_call", None)
    if call is not None and hasattr(call, "flatten"):
        return call.flatten(*args, **kwargs)
    return tuple(pytree.tree_leaves([list(args), kwargs]))


@contextlib.contextmanager
def _progress(batches, enabled: bool):
    if not enabled:
        yield lambda: None
        return
    from rich.progress import Progress

    with Progress() as bar:
        task = bar.add_task("calibrate", total=len(batches) if hasattr(batches, "__len__") else None)
        yield lambda: bar.update(task, advance=1)


def _running(param: torch.Tensor, value: torch.Tensor, count: int) -> None:
    value = value.to(param.dtype).reshape(param.shape)
    param.copy_(value if count == 0 else (param * count + value) / (count + 1))


class _Calibrator(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, estimator_steps: int):
        super().__init__(gm)
        self.estimator_steps = estimator_steps
        self.count = 0
        self.normal: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def param(self, node: Any) -> torch.Tensor | None:
        if isinstance(node, fx.Node) and node.op == "get_attr":
            return getattr_path(self.module, node.target)
        return None

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_function" and n.target in (BIT_LINEAR, BIT_ATTENTION):
            args, _ = self.fetch_args_kwargs_from_env(n)
            if n.target == BIT_LINEAR:
                self.linear(n, args)
            else:
                self.attention(n, args)
                # the estimator products were computed (upstream nodes) from the weights before this fit: again
                # with the fitted ones, so that the op, and every layer after it, sees what inference computes
                for e in n.args[8:11]:
                    if isinstance(e, fx.Node) and e in self.env:
                        self.env[e] = self._again(e)
        return super().run_node(n)

    def _again(self, n: fx.Node) -> Any:
        """``n`` run again on its inputs' current values (a weight read again; its node's value may be freed)."""
        def value(a: fx.Node) -> Any:
            return self.env[a] if a in self.env else getattr_path(self.module, a.target)

        args, kwargs = fx.node.map_arg((n.args, n.kwargs), value)
        return getattr(self, n.op)(n.target, args, kwargs)

    def linear(self, n: fx.Node, args) -> None:
        if n.meta.get("bitfx_own_quantizer"):
            return  # the model's own binarizer (recognize_fake_quant): its α and move stand
        x, weight, _, _, move, _ = args[:6]
        ws, alpha = self.param(n.args[3]), self.param(n.args[5])
        wm, am = methods.weight_method(n.args[6]), methods.act_method(n.args[7])  # the registry's inits
        if ws is not None and wm.scale_init is not None:
            ws.copy_(wm.scale_init(weight.detach().float()))
        if alpha is not None and am.alpha_init is not None:
            u = x.float() if move is None else x.float() + move
            _running(alpha, am.alpha_init(u), self.count)

    def attention(self, n: fx.Node, args) -> None:
        qt, k, v, mask, _, _, _, _, eq, ek, ev, scale, causal, mode = args
        for t, node in ((qt, n.args[4]), (k, n.args[5]), (v, n.args[6])):
            p = self.param(node)
            if p is not None:
                _running(p, t.float().abs().mean(), self.count)
        alpha_q, alpha_k, alpha_v = (self.param(n.args[i]) for i in (4, 5, 6))
        w_eq, w_ek, w_ev = (self.param(e.args[1]) if isinstance(e, fx.Node) else None
                            for e in (n.args[8], n.args[9], n.args[10]))
        if w_eq is not None and w_ek is not None:
            self.fit_score_estimators(qt.float(), k.float(), alpha_q, alpha_k, w_eq, w_ek)
            eq, ek = qt.float() @ w_eq.t(), k.float() @ w_ek.t()
        s = A.bit_attention_scores(qt, k, alpha_q, alpha_k, eq, ek, mask, scale, causal)
        prob = self.param(n.args[7])
        init = methods.prob_method(mode).calibrate  # elastic α_P = 4·mean(P), BiViT β
        if prob is not None and init is not None:
            _running(prob, init(A.masked_softmax(s)), self.count)
        if w_ev is not None:
            p_codes, p_scale, _ = A._probs(s, prob, mode)
            pb = p_codes if p_scale is None else p_codes * p_scale
            self.fit_value_estimator(pb, v.float(), alpha_v, w_ev, n.name)

    def fit_score_estimators(self, qt, k, alpha_q, alpha_k, w_eq, w_ek) -> None:
        # the estimator weights are shared by heads and batch items: a sample of them fits as well
        qt, k = _sample(qt), _sample(k)
        _, _, qb = q.act_sign(qt, None, alpha_q)
        _, _, kb = q.act_sign(k, None, alpha_k)
        target = qt @ k.transpose(-2, -1) - qb @ kb.transpose(-2, -1)
        self._fit([w_eq, w_ek], lambda a, b: A._score_residual(qt @ a.t(), k @ b.t()), target)

    def fit_value_estimator(self, pb, v, alpha_v, w_ev, key: str) -> None:
        """Closed form: the value residual P_b·(v - α_v sign v) ≈ (P_b v) wᵀ 1ᵀ is linear in w.

        Least squares over the rows of every batch so far: the normal equations FᵀF, Fᵀt are summed.
        """
        _, _, vb = A._value_codes(v, alpha_v)
        target = (pb @ (v - vb)).mean(-1).reshape(-1, 1).double()  # rows x 1 (mean over Dv)
        features = (pb @ v).reshape(-1, v.shape[-1]).double()      # rows x Dv
        gram, rhs = features.t() @ features, features.t() @ target
        if self.count > 0 and key in self.normal:
            gram, rhs = gram + self.normal[key][0], rhs + self.normal[key][1]
        self.normal[key] = (gram, rhs)
        w = torch.linalg.lstsq(gram, rhs).solution.float().t()
        if torch.isfinite(w).all():
            w_ev.copy_(w.reshape(w_ev.shape))

    def _fit(self, weights, predict, target) -> None:
        """Least squares by Adam (plain tensor updates: no optimizer machinery inside a compile)."""
        leaves = [w.detach().clone().requires_grad_(True) for w in weights]
        if all(float(w.abs().sum()) == 0.0 for w in leaves):  # break the symmetry of a zero start
            g = torch.Generator().manual_seed(0)
            for w in leaves:
                w.data.normal_(0.0, 1e-2 / max(1, w.shape[-1]) ** 0.5, generator=g)
        m1 = [torch.zeros_like(w) for w in leaves]
        m2 = [torch.zeros_like(w) for w in leaves]
        norm = target.pow(2).mean().clamp(min=1e-12)
        lr, b1, b2 = 1e-2, 0.9, 0.999
        with torch.enable_grad():
            for step in range(1, self.estimator_steps + 1):
                loss = (predict(*leaves) - target).pow(2).mean() / norm
                grads = torch.autograd.grad(loss, leaves)
                with torch.no_grad():
                    for w, g, a, b in zip(leaves, grads, m1, m2):
                        a.mul_(b1).add_(g, alpha=1 - b1)
                        b.mul_(b2).addcmul_(g, g, value=1 - b2)
                        w -= lr * (a / (1 - b1 ** step)) / ((b / (1 - b2 ** step)).sqrt() + 1e-8)
            final = (predict(*leaves) - target).pow(2).mean() / norm
        if final < 1.0:  # only keep a fit that explains part of the residual
            for w, leaf in zip(weights, leaves):
                w.copy_(leaf.detach())


def _sample(t: torch.Tensor, slices: int = 4, rows: int = 64) -> torch.Tensor:
    """At most ``slices`` leading (batch, head) slices and ``rows`` tokens of ``t``."""
    t = t.reshape(-1, *t.shape[-2:])
    return t[:slices, :rows]


def bivit_beta(p: torch.Tensor, iters: int = 10) -> torch.Tensor:
    """BiViT's coordinate descent per row of ``p``; returns the mean threshold / rowmax (β)."""
    a = p.reshape(-1, p.shape[-1]).float()
    rowmax = a.amax(dim=-1, keepdim=True).clamp(min=1e-12)
    b = (a >= 0.25 * rowmax).float()
    for _ in range(iters):
        v = (a * b).sum(-1, keepdim=True) / b.sum(-1, keepdim=True).clamp(min=1.0)
        t = v / 2
        b = (a >= t).float()
    beta = (t / rowmax).clamp(1e-3, 1.0)
    return beta.mean()
