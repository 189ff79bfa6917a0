"""bitfx: a compiler for binary (1-bit) transformers.

    fast = torch.compile(model, backend="bitfx")
    qat  = bitfx.binarize(model, example_inputs, "bipft")
"""
from bitfx import ops as _ops  # noqa: F401  (registers torch.ops.bitfx.*)
from bitfx.api import binarize
from bitfx.calibrate import calibrate
from bitfx.config import BinarizeConfig
from bitfx.export import export
from bitfx.inputs import CaptureError
from bitfx.inspect import diff

__version__ = "0.1.0"

__all__ = ["BinarizeConfig", "CaptureError", "binarize", "calibrate", "diff", "export", "__version__"]
