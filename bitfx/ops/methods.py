"""The method registry: one entry per binarization method (DESIGN §3).

Each entry holds, in one place, what every part of bitfx needs to know about a method:

* the reference formula with its straight-through gradient (``quantize``, in ``quantizers.py``),
* the kernel mode it lowers to (packing of the codes, the popcount GEMM family),
* its cost rule for ``bitfx.diff`` (bit planes, float work per element),
* its calibration init (``bitfx.calibrate``) and the parameters ``binarize`` adds for it.

``ops/``, ``config.py``, ``calibrate.py``, ``inspect/cost.py``, the runtimes and the passes look
methods up here by name; adding a method is one ``register(...)`` call::

    register(WeightMethod("sign_tensor", Q.weight_sign_tensor, planes=1, per_channel=False, ...))

Three kinds: :class:`WeightMethod` (``bit_linear``'s ``weight_mode``), :class:`ActMethod`
(``act_mode``) and :class:`ProbMethod` (``bit_attention``'s ``prob_mode``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from bitfx.ops import quantizers as Q


@dataclass(frozen=True)
class WeightMethod:
    """A weight binarizer: ``quantize(W, scale) -> (codes, scale, value)``.

    ``planes``: bit planes of the codes (1: ±1; 2: ternary {-1, 0, +1}, packed as two planes and
    counted as 2 BOPs per MAC and 2 bits per weight). ``per_channel``: one scale per output row
    (else one per tensor) — the epilogue's column scale and the bytes of derived scales.
    ``scale_init``: the value of a learnable per-row scale (BiViT) from the weight, for calibration.
    """

    name: str
    quantize: Callable
    planes: int
    per_channel: bool
    paper: str
    scale_init: Optional[Callable[[Tensor], Tensor]] = None

    @property
    def ternary(self) -> bool:
        return self.planes == 2

    def dequantized(self, w: Tensor) -> Tensor:
        """``codes · scale``: the weight the method computes (what a fake-quant model computes)."""
        codes, scale, _ = self.quantize(w)
        return codes * (scale.reshape(-1, 1) if scale.dim() else scale)


@dataclass(frozen=True)
class ActMethod:
    """An activation binarizer: ``quantize(x, move, alpha, bits) -> (codes, scale, value)``.

    ``kernel``: the GEMM family its codes feed — ``"xnor"`` (±1 × ±1: popcount of XOR) or ``"and"``
    (k two's-complement bit planes × weights, bit-serial). ``bits``: accepted (min, max).
    ``takes_move`` / ``takes_alpha``: whether ``binarize`` may add a per-channel ``move`` and a
    learnable scalar ``α``; ``needs_alpha``: the method has no per-token form (α is required).
    ``alpha_init(u)``: α's calibration value from ``u = x + move``.
    ``flops_per_input(has_move, has_alpha)``: float work per input element (cost rule).
    ``pack``: how the kernels make the codes — ``"sign"`` (sign bits, with ``move``; per-token
    ``mean|u|`` or α), ``"absmax"`` (k two's-complement planes per token) or ``"unsigned"`` (one
    {0, 1} plane, bit = ``u > α/2``, row scale α: ``pack_rows(mode="pos")`` of ``u`` with the
    threshold ``-α/2`` as its move vector); default: ``"sign"`` for ``kernel="xnor"``, else ``"absmax"``.
    """

    name: str
    quantize: Callable
    kernel: str
    bits: tuple[int, int]
    takes_move: bool
    takes_alpha: bool
    paper: str
    alpha_init: Optional[Callable[[Tensor], Tensor]] = None
    flops_per_input: Callable[[bool, bool], int] = lambda has_move, has_alpha: 0
    needs_alpha: bool = False
    pack: str = ""

    @property
    def packing(self) -> str:
        return self.pack or ("sign" if self.kernel == "xnor" else "absmax")

    def dequantized(self, x: Tensor, move=None, alpha=None, bits: int = 1) -> Tensor:
        codes, scale, _ = self.quantize(x, move, alpha, bits)
        return codes * (scale[..., None] if scale.dim() else scale)


@dataclass(frozen=True)
class ProbMethod:
    """An attention-probability binarizer: ``binarize(s, param) -> (codes, scale, value)`` of the
    masked scores ``s`` (softmax first when ``softmax``).

    ``param``: the parameter ``binarize`` adds, as ``(name, init from the config, trainable)`` or
    None; ``calibrate(p)``: its data-driven value from the softmax probabilities, or None.
    ``flops_per_score``: float work per score beyond the softmax (cost rule); ``scaled``: the codes
    {0, 1} carry a scale (α_P) that multiplies the output (one more FLOP per output).
    """

    name: str
    binarize: Callable
    softmax: bool
    flops_per_score: int
    paper: str
    scaled: bool = False
    param: Optional[tuple[str, Callable, bool]] = None
    calibrate: Optional[Callable[[Tensor], Tensor]] = None


Method = Union[WeightMethod, ActMethod, ProbMethod]
WEIGHT: dict[str, WeightMethod] = {}
ACT: dict[str, ActMethod] = {}
PROB: dict[str, ProbMethod] = {}
_TABLES = {WeightMethod: WEIGHT, ActMethod: ACT, ProbMethod: PROB}


def register(method: Method) -> Method:
    """Add ``method`` to its registry; a name already taken is refused (pick another name)."""
    table = _TABLES[type(method)]
    if method.name in table:
        raise ValueError(f"{type(method).__name__} {method.name!r} is already registered "
                         f"(registered: {sorted(table)}); register the new method under another name")
    table[method.name] = method
    return method


def _lookup(table: dict, kind: str, name: str):
    try:
        return table[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown {kind} {name!r} (accepted: {', '.join(map(repr, table))})") from None


def weight_method(name: str) -> WeightMethod:
    return _lookup(WEIGHT, "weight method", name)


def act_method(name: str) -> ActMethod:
    return _lookup(ACT, "activation method", name)


def prob_method(name: str) -> ProbMethod:
    return _lookup(PROB, "probability method", name)


def check_act_bits(name: str, bits: int) -> None:
    lo, hi = act_method(name).bits
    if not (isinstance(bits, int) and lo <= bits <= hi):
        accepted = f"{lo}" if lo == hi else f"{lo}..{hi}"
        raise ValueError(f"act_bits={bits!r} with act_mode={name!r} (accepted: {accepted})")


# -- the methods bitfx implements -----------------------------------------------------------------
register(WeightMethod("sign_channel", Q.weight_sign_channel, planes=1, per_channel=True,
                      paper="BiBERT (2203.06390), BinaryViT; BiViT (2211.07091) with a learnable scale",
                      scale_init=lambda w: w.abs().mean(dim=1)))
register(WeightMethod("sign_tensor", Q.weight_sign_tensor, planes=1, per_channel=False,
                      paper="BiT / BiPFT BWN (2205.13016, 2312.08937); BitNet W1 (2310.11453)"))
register(WeightMethod("ternary", Q.weight_ternary, planes=2, per_channel=False,
                      paper="BitNet b1.58 (2402.17764)"))

register(ActMethod("sign", lambda x, move, alpha, bits: Q.act_sign(x, move, alpha), kernel="xnor",
                   bits=(1, 1), takes_move=True, takes_alpha=True,
                   paper="BiT elastic (2205.13016); XNOR-Net per-token mean|x| when α is None",
                   alpha_init=lambda u: 2.0 * u.abs().mean(),
                   # + move; per-token mean|u| (abs, mean) when there is no α
                   flops_per_input=lambda has_move, has_alpha: int(has_move) + (0 if has_alpha else 2)))
register(ActMethod("absmax", lambda x, move, alpha, bits: Q.act_absmax(x, bits), kernel="and",
                   bits=(2, 8), takes_move=False, takes_alpha=False,
                   paper="BitNet 8-bit absmax per token (2310.11453)",
                   flops_per_input=lambda has_move, has_alpha: 3))  # |x|, max, multiply by Qp/γ

register(ActMethod("unsigned", lambda x, move, alpha, bits: Q.act_unsigned(x, move, alpha), kernel="and",
                   bits=(1, 1), takes_move=True, takes_alpha=True, needs_alpha=True, pack="unsigned",
                   paper="BiT elastic {0, α} for non-negative inputs, e.g. after ReLU (2205.13016)",
                   alpha_init=lambda u: 2.0 * u.abs().mean(),
                   flops_per_input=lambda has_move, has_alpha: int(has_move) + 1))  # + move; compare with α/2

register(ProbMethod("bivit", lambda p, beta: Q.prob_bivit(p, 0.25 if beta is None else beta), softmax=True,
                    flops_per_score=2, paper="BiViT softmax-aware (2211.07091 §3.2)",  # rowmax, compare
                    param=("beta", lambda cfg: torch.tensor(float(cfg.prob_beta)), False),
                    calibrate=lambda p: _bivit_beta(p)))
register(ProbMethod("elastic", lambda p, alpha: Q.prob_elastic(p, alpha), softmax=True,
                    flops_per_score=2, paper="BiT / BiPFT elastic (2205.13016)", scaled=True,  # divide, round
                    param=("alpha_p", lambda cfg: torch.ones(()), True),
                    calibrate=lambda p: 4.0 * p.mean()))
register(ProbMethod("bool", lambda s, _: Q.prob_bool(s), softmax=False, flops_per_score=1,
                    paper="BiBERT Bi-Attention (2203.06390)"))  # compare


def _bivit_beta(p: Tensor) -> Tensor:
    from bitfx.calibrate import bivit_beta  # the paper's coordinate descent lives with calibration

    return bivit_beta(p)
