"""The binarization policy: which layers become binary, and with which method.

A :class:`BinarizeConfig` is a small validated dataclass. Build one from a preset named after the
method it reproduces, and override fields as needed::

    cfg = BinarizeConfig.preset("bipft", keep=("*classifier*",))

Presets (the paper's defaults):

=============  ===========================  =====================  ===================  ==========
preset         weights                      activations            attention probs      estimators
=============  ===========================  =====================  ===================  ==========
``bipft``      sign, per-tensor (BWN)       sign, learnable α+move BiT elastic {0, α_P} rank-1
``bit``        sign, per-tensor (BWN)       sign, learnable α+move BiT elastic {0, α_P} none
                                            ({0, α} after ReLU)
``bibert``     sign, per-channel            sign, per-token        BiBERT bool 1[S>0]   none
``bivit``      sign, per-channel learnable  sign, learnable α      BiViT β·rowmax       none
``bitnet``     sign, per-tensor (W1)        8-bit absmax per token attention stays fp   none
``bitnet158``  ternary {-1,0,1} (b1.58)     8-bit absmax per token attention stays fp   none
=============  ===========================  =====================  ===================  ==========
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field

from bitfx.ops import methods

#: The registered methods (bitfx.ops.methods): a new method registered there is accepted here.
WEIGHT_MODES = tuple(methods.WEIGHT)
ACT_MODES = tuple(methods.ACT)
ACT_SCALES = ("token", "learnable")
PROB_MODES = tuple(methods.PROB)
KERNELS = ("tvm", "reference")
GLUES = ("inductor", "eager")
OWN_BINARIZER = ("only", "extend", "ignore")

#: Module-name patterns kept in full precision by default: embeddings and classifier heads,
#: as in BiT, BiBERT, BiViT and BiPFT (matched with fnmatch against the qualified module name).
DEFAULT_KEEP = (
    "*embed*",
    "*classifier*",
    "*lm_head*",
    "*pooler*",
    "head",
    "*.head",
    "heads.*",
    "*cls*",
)


@dataclass
class BinarizeConfig:
    """Which linears and attentions become binary, and how.

    Args:
        method: name of the method this config follows (informational, set by presets).
        weight: ``"sign_channel"`` (s = row mean |W|, BiBERT/BiViT), ``"sign_tensor"`` (one
            s = mean |W| and a global mean, BiT/BiPFT "bwn", BitNet), or ``"ternary"`` (BitNet b1.58).
        learnable_weight_scale: make the per-channel s a parameter (BiViT).
        act: ``"sign"`` (1-bit, BiT elastic / XNOR-Net) or ``"absmax"`` (k-bit per token, BitNet).
        act_bits: bits of ``"absmax"`` activations (2..8); must be 1 for ``"sign"``.
        act_scale: ``"token"`` (α = mean |x| per token, not trained) or ``"learnable"``
            (one α per layer, initialised to 2·mean|x| on the first batch, BiT).
        act_move: add a learnable per-input-channel offset ``move`` before sign (BiT elastic).
        act_nonneg: the activation method of a linear whose input is provably non-negative (a ReLU,
            softmax or sigmoid output): ``"unsigned"`` (BiT's {0, α}: ``α·clip(round(u/α), 0, 1)``,
            learnable α; needs ``act_scale="learnable"``), or None (use ``act`` for every linear).
        attention: binarize attention (Q·Kᵀ and P·V); linears are governed separately.
        linear: binarize linears.
        prob: probability binarizer: ``"bivit"`` (1[P >= β·rowmax P]), ``"elastic"``
            (α_P·clamp(round(P/α_P), 0, 1)), ``"bool"`` (1[S + mask > 0], no softmax).
        prob_beta: BiViT's β (0 < β <= 1).
        estimators: add BiPFT's low-rank residual estimators to binarized attention.
        estimator_rank: rank r of each estimator (the paper uses 1).
        keep: fnmatch patterns of qualified module names that stay full precision.
        keep_first / keep_last: keep the first / last matched linear in full precision.
        min_features: linears with ``in_features * out_features`` below this stay full precision.
        kernels: ``"tvm"`` (generated kernels) or ``"reference"`` (the PyTorch definitions).
        own_binarizer: for a model that carries its own fake-quant binarizer (BitNet ``BitLinear``,
            BiT ``QuantizeLinear``): ``"only"`` (its fake-quant linears become ``bit_linear``
            with its own numbers; its other layers stay as written, e.g. a float output head),
            ``"extend"`` (the same, and the rest is binarized by this config's policy), or
            ``"ignore"`` (not recognised: the fake-quant layers run as the model wrote them).
    """

    method: str = "custom"
    weight: str = "sign_tensor"
    learnable_weight_scale: bool = False
    act: str = "sign"
    act_bits: int = 1
    act_scale: str = "learnable"
    act_move: bool = True
    act_nonneg: str | None = None
    attention: bool = True
    linear: bool = True
    prob: str = "elastic"
    prob_beta: float = 0.25
    estimators: bool = True
    estimator_rank: int = 1
    keep: tuple[str, ...] = DEFAULT_KEEP
    keep_first: bool = False
    keep_last: bool = False
    min_features: int = 0
    kernels: str = "tvm"
    own_binarizer: str = "only"

    def __post_init__(self) -> None:
        self.keep = tuple(self.keep)
        problems = []

        def one_of(name: str, accepted: tuple) -> None:
            value = getattr(self, name)
            if value not in accepted:
                problems.append(f"{name}={value!r} (accepted: {', '.join(map(repr, accepted))})")

        one_of("weight", tuple(methods.WEIGHT))  # the registries as they are now (methods.register)
        one_of("act", tuple(methods.ACT))
        one_of("act_scale", ACT_SCALES)
        one_of("prob", tuple(methods.PROB))
        one_of("kernels", KERNELS)
        one_of("own_binarizer", OWN_BINARIZER)
        if self.act in methods.ACT:
            lo, hi = methods.act_method(self.act).bits
            if not (isinstance(self.act_bits, int) and lo <= self.act_bits <= hi):
                accepted = f"{lo}" if lo == hi else f"integers {lo}..{hi}"
                problems.append(f"act_bits={self.act_bits!r} (act={self.act!r} accepts {accepted})")
        if self.act_nonneg is not None:
            if self.act_nonneg not in methods.ACT:
                problems.append(f"act_nonneg={self.act_nonneg!r} (accepted: None, "
                                f"{', '.join(map(repr, methods.ACT))})")
            elif methods.act_method(self.act_nonneg).needs_alpha and self.act_scale != "learnable":
                problems.append(f"act_nonneg={self.act_nonneg!r} needs act_scale='learnable' (its codes are "
                                f"thresholded at a learnable α), got act_scale={self.act_scale!r}")
        if not (0.0 < float(self.prob_beta) <= 1.0):
            problems.append(f"prob_beta={self.prob_beta!r} (accepted: 0 < beta <= 1)")
        if not (isinstance(self.estimator_rank, int) and self.estimator_rank >= 1):
            problems.append(f"estimator_rank={self.estimator_rank!r} (accepted: integers >= 1)")
        if not (isinstance(self.min_features, int) and self.min_features >= 0):
            problems.append(f"min_features={self.min_features!r} (accepted: integers >= 0)")
        if not all(isinstance(p, str) for p in self.keep):
            problems.append(f"keep={self.keep!r} (accepted: a sequence of fnmatch patterns)")
        if problems:
            raise ValueError("invalid BinarizeConfig: " + "; ".join(problems))

    # -- presets -----------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "BinarizeConfig":
        """The config of a published method, with ``overrides`` applied (validated)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r} (accepted: {', '.join(map(repr, PRESETS))})")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown BinarizeConfig fields {unknown} (accepted: {sorted(fields)})")
        return cls(**{**PRESETS[name], "method": name, **overrides})

    @classmethod
    def coerce(cls, config: "BinarizeConfig | str | dict | None") -> "BinarizeConfig":
        """Accept a config, a preset name, a dict of fields (with optional ``"preset"``), or None."""
        if config is None:
            return cls.preset("bipft")
        if isinstance(config, BinarizeConfig):
            return config
        if isinstance(config, str):
            return cls.preset(config)
        if isinstance(config, dict):
            config = dict(config)
            return cls.preset(config.pop("preset", "bipft"), **config)
        raise TypeError(
            f"config must be a BinarizeConfig, a preset name or a dict, got {type(config).__name__}"
        )

    def keeps(self, module_name: str) -> str | None:
        """The keep pattern that matches ``module_name``, or None."""
        for pattern in self.keep:
            if fnmatch.fnmatchcase(module_name, pattern):
                return pattern
        return None

    def replace(self, **changes) -> "BinarizeConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, dict] = {
    "bipft": dict(weight="sign_tensor", act="sign", act_bits=1, act_scale="learnable",
                  act_move=True, prob="elastic", estimators=True),
    "bit": dict(weight="sign_tensor", act="sign", act_bits=1, act_scale="learnable",
                act_move=True, act_nonneg="unsigned", prob="elastic", estimators=False),
    "bibert": dict(weight="sign_channel", act="sign", act_bits=1, act_scale="token",
                   act_move=False, prob="bool", estimators=False),
    "bivit": dict(weight="sign_channel", learnable_weight_scale=True, act="sign", act_bits=1,
                  act_scale="learnable", act_move=False, prob="bivit", estimators=False),
    "bitnet": dict(weight="sign_tensor", act="absmax", act_bits=8, act_scale="token",
                   act_move=False, attention=False, estimators=False),
    "bitnet158": dict(weight="ternary", act="absmax", act_bits=8, act_scale="token",
                      act_move=False, attention=False, estimators=False),
}


@dataclass
class CompileOptions:
    """Options of ``torch.compile(model, backend="bitfx", options={...})``."""

    config: BinarizeConfig = field(default_factory=lambda: BinarizeConfig.preset("bipft"))
    kernels: str | None = None
    #: who runs the float parts around the kernels: "inductor" compiles them into fused C++ loops
    #: (the kernels are extern calls in its graph); "eager" runs them as PyTorch ops.
    glue: str = "inductor"
    #: compile each repeated block (a transformer's layers) once and call it for every layer
    #: (`bitfx.regions`); False compiles dynamo's graph as one.
    regions: bool = True

    def __post_init__(self) -> None:
        self.config = BinarizeConfig.coerce(self.config)
        if not isinstance(self.regions, bool):
            raise ValueError(f"regions={self.regions!r} (accepted: True, False)")
        if self.glue not in GLUES:
            raise ValueError(f"glue={self.glue!r} (accepted: {', '.join(map(repr, GLUES))})")
        if self.kernels is not None:
            if self.kernels not in KERNELS:
                raise ValueError(
                    f"kernels={self.kernels!r} (accepted: {', '.join(map(repr, KERNELS))})"
                )
            self.config = self.config.replace(kernels=self.kernels)

    @classmethod
    def from_dict(cls, options: dict | None) -> "CompileOptions":
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown bitfx backend options {unknown} (accepted: {sorted(known)})")
        return cls(**options)
