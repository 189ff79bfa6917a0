"""Binarizers: the forward formula of each, its straight-through gradient, and its paper.

Every quantizer returns ``(codes, scale, value)``: integer ``codes`` (as float tensors holding
exact small integers — what the kernels compute with), the float ``scale`` that multiplies them,
and ``value`` = the differentiable quantized tensor whose *forward value* equals
``codes * scale`` and whose *gradient* is the straight-through estimator documented below.
Kernels implement ``codes``/``scale``; training differentiates ``value``.

``sign(u) = +1 if u >= 0 else -1``: sign(0) = +1, and NaN binarizes as +1 (``not (u < 0)``).

Every decision an activation binarizer takes at run time goes through ``_decided``: nothing happens there
unless a ``Decisions`` recorder is active (``recording``), which notes each input within float rounding of its
threshold and can take chosen ones the other way. ``bitfx.deploy.verify`` uses it to tell a device that
rounded a near-tie otherwise from a device that computes something else. Weight codes are not decisions
in that sense: a device gets them from the host.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

EPS = 1e-5


def sign(u: Tensor) -> Tensor:
    """±1 with sign(0) = +1 and sign(NaN) = +1, in ``u``'s dtype.

    ``1 - 2·[u < 0]`` in place on the comparison's own tensor: half the time of ``torch.where(u < 0, -1, 1)``
    with its scalar operands (a BERT-base 3072 × 768 weight: 2.7 against 5.7 ms; compiling BERT-base
    quantizes 144 of them)."""
    return (u < 0).to(u.dtype).mul_(-2).add_(1)


# -- decisions near their thresholds ----------------------------------------------------------
@dataclass(frozen=True, order=True)
class Decision:
    """One binarizer decision within ``Decisions.near`` of its threshold.

    ``margin``: the input's signed distance from the threshold, relative to its scale (``u / mean|u|`` of the
    row for a sign; ``(P - β·rowmax) / (β·rowmax)`` for BiViT; ``(P/α - 1/2) / (1/2)`` elastic...), so
    ``|margin|`` is comparable with float32's relative rounding. ``site``: the how-manieth decision tensor of
    the run; ``index``: the element's flat index in it (``element``: the same in its ``shape``); ``label``:
    where it was taken (the recorder's ``label`` at the time: an FX node and its module, when the host model
    runs under an interpreter).
    """

    distance: float
    site: int
    index: int
    margin: float = field(compare=False)
    kind: str = field(compare=False)
    shape: tuple = field(compare=False, default=())
    label: str | None = field(compare=False, default=None)

    @property
    def key(self) -> tuple[int, int]:
        return self.site, self.index

    @property
    def element(self) -> tuple[int, ...]:
        out = []
        rest = self.index
        for size in reversed(self.shape):
            rest, i = divmod(rest, size)
            out.append(i)
        return tuple(reversed(out))


class Decisions:
    """Records the decisions within ``near`` of their thresholds, and takes the ones in ``flips`` the other way.

        with recording(Decisions(near=1e-4)) as d:
            model(*inputs)
        sorted(d.found)   # [Decision, ...], closest first

    Sites are counted in the order the run takes them, so the same model on inputs of the same shapes
    numbers them the same way, and a flip found in one run can be replayed in the next.
    """

    def __init__(self, near: float = 1e-4, flips=()):
        self.near = float(near)
        self.flips: dict[int, list[int]] = {}
        for site, index in flips:
            self.flips.setdefault(site, []).append(index)
        self.found: list[Decision] = []
        self.sites = 0
        self.label: str | None = None

    def decide(self, codes: Tensor, margin: Tensor, flip: Callable[[Tensor, Tensor], Tensor], kind: str) -> Tensor:
        site, self.sites = self.sites, self.sites + 1
        m = margin.detach().float()
        close = m.abs() <= self.near  # NaN is never close
        # An input exactly at its threshold counts only alone in its row. Exact zeros in a run are structural,
        # the same on every device (a head whose probabilities all binarized to 0 outputs a block of zeros); a
        # lone one is rounding's (a GELU that underflows to -0.0 on the host is -6.6e-7 on an ARM build).
        zero = m == 0
        if zero.dim() and zero.any():
            padded = torch.nn.functional.pad(zero.to(torch.int8), (1, 1)).bool()
            close &= ~zero | ~(padded[..., :-2] | padded[..., 2:])
        m = m.reshape(-1)
        close = close.reshape(-1).nonzero().reshape(-1)
        shape = tuple(codes.shape)
        self.found += [Decision(abs(float(m[i])), site, i, float(m[i]), kind, shape, self.label) for i in close.tolist()]
        if site not in self.flips:
            return codes
        index = torch.tensor(self.flips[site], dtype=torch.long)
        out = codes.detach().clone().reshape(-1)
        out[index] = flip(out[index].reshape(-1), m[index].to(out.dtype))
        return out.reshape(codes.shape)


_RECORDER: Decisions | None = None


@contextlib.contextmanager
def recording(decisions: Decisions):
    """Route every activation decision of the ops run inside through ``decisions`` (one thread at a time)."""
    global _RECORDER
    previous, _RECORDER = _RECORDER, decisions
    try:
        yield decisions
    finally:
        _RECORDER = previous


def _decided(codes: Tensor, margin: Callable[[], Tensor], flip, kind: str) -> Tensor:
    """``codes`` as decided; under ``recording``, noted and possibly flipped (``margin()`` is only computed
    then). ``flip(codes, margin)`` gives the codes on the other side of the threshold."""
    recorder = _RECORDER
    return codes if recorder is None else recorder.decide(codes, margin(), flip, kind)


def _row_relative(u: Tensor) -> Tensor:
    """``u / mean|u|`` per row (a row of exact zeros gives NaN: never close)."""
    return u / u.abs().mean(dim=-1, keepdim=True)


def _negate(codes: Tensor, _margin: Tensor) -> Tensor:
    return -codes


def _toggle(codes: Tensor, _margin: Tensor) -> Tensor:
    return 1.0 - codes


def act_sign_codes(u: Tensor) -> Tensor:
    """``sign(u)`` of an activation (not a weight): a decision per element (``_decided``)."""
    return _decided(sign(u), lambda: _row_relative(u.float()), _negate, "sign")


def _ste(value: Tensor, surrogate: Tensor) -> Tensor:
    """Forward ``value``, backward the gradient of ``surrogate``."""
    return surrogate + (value - surrogate).detach()


def _weight_value(w: Tensor, scale: Tensor, codes: Tensor) -> Tensor:
    """``scale ⊙ codes`` with the identity straight-through gradient to ``w`` (and ``scale``'s own).

    Without autograd (calibration, the reference ops under ``no_grad``) the identity term ``w - w.detach()``
    is all zeros: skipped, it saves two passes and two weight-sized allocations per call (a BERT-base weight:
    ~20 of ~50 ms here; calibrating 12 layers runs 72 of them). The value is the same."""
    if torch.is_grad_enabled() and (w.requires_grad or scale.requires_grad):
        return (w - w.detach()) + scale * codes
    return scale * codes


# -- weights --------------------------------------------------------------------------------
def weight_sign_channel(w: Tensor, scale: Tensor | None = None):
    """1-bit weights, per output channel (BiBERT, BinaryViT; BiViT with a learnable ``scale``).

    Forward: ``Qw = s ⊙ sign(W - mean_row(W))`` with ``s[n] = mean_k |W[n, k]|`` (or the
    learnable ``scale``). Backward (STE): ``∂Qw/∂W = 1`` (identity), ``∂Qw/∂s = sign(W - mean)``.
    """
    codes = sign(w - w.mean(dim=1, keepdim=True)).detach()
    s = w.abs().mean(dim=1).detach() if scale is None else scale.reshape(-1)
    return codes, s, _weight_value(w, s[:, None], codes)


def weight_sign_tensor(w: Tensor, scale: Tensor | None = None):
    """1-bit weights, one scale per tensor (BiT/BiPFT "BWN" quantizer; BitNet's W1).

    Forward: ``Qw = s · sign(W - mean(W))`` with ``s = mean |W|`` over the whole tensor.
    Backward (STE): identity to ``W``; ``∂Qw/∂s = sign(W - mean)`` if ``scale`` is learnable.
    """
    codes = sign(w - w.mean()).detach()
    s = w.abs().mean().reshape(1).detach() if scale is None else scale.reshape(-1)
    return codes, s, _weight_value(w, s.reshape(-1, 1), codes)


def weight_ternary(w: Tensor, scale: Tensor | None = None):
    """Ternary weights {-1, 0, +1}, BitNet b1.58 (arXiv 2402.17764).

    Forward: ``γ = max(mean |W|, 1e-5)``, ``Qw = γ · clamp(round(W / γ), -1, 1)``.
    Backward (STE): identity to ``W``.
    """
    gamma = w.abs().mean().clamp(min=EPS).reshape(1).detach() if scale is None else scale.reshape(-1)
    codes = torch.clamp(torch.round(w / gamma.detach()), -1, 1).detach()
    return codes, gamma, _weight_value(w, gamma.reshape(-1, 1), codes)


WEIGHT_QUANTIZERS = {
    "sign_channel": weight_sign_channel,
    "sign_tensor": weight_sign_tensor,
    "ternary": weight_ternary,
}


# -- activations ----------------------------------------------------------------------------
def act_sign(x: Tensor, move: Tensor | None = None, alpha: Tensor | None = None):
    """1-bit activations: BiT elastic binarization (arXiv 2205.13016), XNOR-Net scale if untrained.

    Forward: ``u = x + move``; ``Qa = α · sign(u)`` with a learnable per-tensor ``α``, or, when
    ``alpha`` is None, ``α = mean_k |u|`` per token (XNOR-Net, not trained).
    Backward (STE), learnable α (BiT): ``∂Qa/∂u = 1[|u| <= α]``,
    ``∂Qa/∂α = sign(u) - (u/α)·1[|u| <= α]``; per-token α: ``∂Qa/∂u = α·1[|u| <= 1]``.
    ``∂Qa/∂move = ∂Qa/∂u``. For α below ``EPS`` the divisor is ``EPS``:
    ``∂Qa/∂u = (α/EPS)·1[|u| <= EPS]``, ``∂Qa/∂α = sign(u)``; a zero α gives finite gradients.
    """
    u = x if move is None else x + move
    codes = act_sign_codes(u).detach()
    if alpha is None:
        scale = u.abs().mean(dim=-1).detach()
        clipped = u.clamp(-1.0, 1.0)
        value = scale[..., None] * _ste(codes, clipped)
    else:
        scale = alpha.reshape(())
        # (the divisor floored at EPS: an input that is all zeros calibrates α = 0 — elastic attention
        # probabilities that all round to 0 give one — and u / 0 made every gradient upstream NaN; the forward
        # value, α·sign(u), and every gradient at α >= EPS are unchanged)
        clipped = torch.clamp(u / scale.clamp(min=EPS), -1.0, 1.0)
        value = scale * _ste(codes, clipped)
    return codes, scale, value


def act_unsigned(x: Tensor, move: Tensor | None = None, alpha: Tensor | None = None):
    """1-bit unsigned activations {0, α}: BiT elastic binarization of non-negative inputs (arXiv 2205.13016,
    Eq. 4-5), for a linear whose input follows a ReLU (or a softmax).

    Forward: ``u = x + move``; ``Qa = α · clip(round(u / α), 0, 1)`` with a learnable per-tensor
    ``α`` (clamped to >= 1e-5, as BiT's code does), i.e. code 1 iff ``u / α > 0.5`` (round half to
    even); NaN gives code 0. Backward (STE, the paper's Eq. 5): ``∂Qa/∂u = 1[0 <= u/α <= 1]``;
    ``∂Qa/∂α = round(u/α) - u/α`` for ``0 <= u/α <= 1``, ``1`` above, ``0`` below (LSQ's gradient
    scale is left to the optimizer). ``∂Qa/∂move = ∂Qa/∂u``.
    """
    if alpha is None:
        raise ValueError("act_mode 'unsigned' needs a learnable α (act_scale='learnable'): its codes are "
                         "{0, 1} at the threshold α/2")
    u = x if move is None else x + move
    scale = alpha.reshape(()).clamp(min=EPS)
    ratio = u / scale
    codes = torch.clamp(torch.round(ratio.detach()), 0, 1).nan_to_num(0.0)
    codes = _decided(codes, lambda: 2.0 * ratio.detach() - 1.0, _toggle, "unsigned")
    value = scale * _ste(codes, torch.clamp(ratio, 0.0, 1.0))
    return codes, scale, value


def act_absmax(x: Tensor, bits: int = 8):
    """k-bit activations, absmax per token (BitNet, arXiv 2310.11453; 8 bits by default).

    Forward: ``Qp = 2^(k-1) - 1``, ``γ = max(max_k |x|, 1e-5)``, ``inv = Qp / γ``,
    ``codes = clamp(round(x · inv), -Qp - 1, Qp)`` (round half to even), ``Qa = codes · (1 / inv)``.
    Backward (STE): identity.
    """
    qp = float(2 ** (bits - 1) - 1)
    gamma = x.detach().abs().amax(dim=-1).clamp(min=EPS)
    inv = qp / gamma
    t = x.detach() * inv[..., None]
    codes = torch.clamp(torch.round(t), -qp - 1, qp)
    # the margin: from the nearest half-integer, relative to |t| (float32 rounds t relative to its size)
    codes = _decided(codes, lambda: (t - torch.floor(t) - 0.5) / t.abs().clamp(min=1.0),
                     lambda c, m: torch.clamp(c - torch.sign(m), -qp - 1, qp), "absmax")
    scale = 1.0 / inv
    value = _ste(codes * scale[..., None], x)
    return codes, scale, value


# -- attention probabilities ------------------------------------------------------------------
def prob_bivit(p: Tensor, beta: Tensor | float = 0.25):
    """BiViT softmax-aware binarization (arXiv 2211.07091 §3.2).

    Forward: ``P_b = 1[P >= β · rowmax(P)]``. Backward: ``P_b.detach() - P.detach() + P``
    (straight through, into the softmax).
    """
    if isinstance(beta, Tensor):
        beta = beta.reshape(())
    rowmax = p.detach().amax(dim=-1, keepdim=True)
    threshold = beta * rowmax
    codes = (p.detach() >= threshold).to(p.dtype)
    codes = _decided(codes, lambda: (p.detach() - threshold) / threshold.clamp(min=torch.finfo(torch.float32).tiny),
                     _toggle, "bivit")
    return codes, None, _ste(codes, p)


def prob_elastic(p: Tensor, alpha: Tensor | None = None):
    """BiT / BiPFT elastic probabilities {0, α_P} (arXiv 2205.13016).

    Forward: ``P_b = α_P · clamp(round(P / α_P), 0, 1)``; ``α_P`` learnable (init ``4·mean(P)``),
    or ``4·mean(P)`` of the batch when ``alpha`` is None. Backward (STE, as LSQ):
    ``∂P_b/∂P = 1[0 <= P/α_P <= 1]``, ``∂P_b/∂α_P = round(P/α_P) - P/α_P`` inside, 1 above.
    """
    if alpha is None:
        alpha = 4.0 * p.detach().mean()
    alpha = alpha.reshape(()).clamp(min=EPS) if isinstance(alpha, Tensor) else alpha
    ratio = p / alpha
    codes = torch.clamp(torch.round(ratio.detach()), 0, 1)
    codes = _decided(codes, lambda: 2.0 * ratio.detach() - 1.0, _toggle, "elastic")
    value = alpha * _ste(codes, torch.clamp(ratio, 0.0, 1.0))
    return codes, alpha, value


def prob_bool(s: Tensor):
    """BiBERT Bi-Attention (arXiv 2203.06390): ``P_b = 1[S > 0]`` on the masked scores, no softmax.

    Backward (STE): ``∂P_b/∂S = 1[|S| <= 1]`` (clipped identity).
    """
    codes = (s.detach() > 0).to(s.dtype)
    codes = _decided(codes, lambda: _row_relative(s.detach().float()), _toggle, "bool")
    return codes, None, _ste(codes, torch.clamp(s, -1.0, 1.0))
