"""Straight-through autograd for the bitfx ops, shared by every op.

Each op has a *differentiable surrogate*: a plain-PyTorch function whose forward value equals the
op's reference and whose gradient is the op's straight-through estimator (see ``quantizers``).
The op's backward re-runs the surrogate under autograd and returns its vector-Jacobian product,
so the gradient formulas are written once, next to the forward formulas, and cannot drift apart.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def register_ste(op, surrogate: Callable, tensor_args: Sequence[str]) -> None:
    """Register autograd for ``op`` from ``surrogate(*args)``; ``tensor_args`` names its inputs."""
    names = list(tensor_args)

    def setup_context(ctx, inputs, output):
        ctx.inputs = inputs
        ctx.save_for_backward(*[t if isinstance(t, torch.Tensor) else None for t in inputs[: len(names)]])

    def backward(ctx, grad):
        saved = ctx.saved_tensors
        rest = ctx.inputs[len(names):]
        wants = [isinstance(t, torch.Tensor) and t.requires_grad for t in ctx.inputs[: len(names)]]
        # ctx.needs_input_grad is the authority inside a custom op's backward.
        wants = [w or bool(n) for w, n in zip(wants, ctx.needs_input_grad[: len(names)])]
        leaves = []
        with torch.enable_grad():
            args = []
            for t, want in zip(saved, wants):
                if t is None:
                    args.append(None)
                    continue
                leaf = t.detach().requires_grad_(want)
                if want:
                    leaves.append(leaf)
                args.append(leaf)
            out = surrogate(*args, *rest)
            grads = torch.autograd.grad(out, leaves, grad, allow_unused=True) if leaves else ()
        it = iter(grads)
        result = []
        for t, want in zip(saved, wants):
            g = next(it) if (t is not None and want) else None
            if g is None and t is not None and want:
                g = torch.zeros_like(t)
            result.append(g)
        return tuple(result) + (None,) * len(rest)

    op.register_autograd(backward, setup_context=setup_context)
