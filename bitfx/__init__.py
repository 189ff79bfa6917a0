"""bitfx: a compiler for binary (1-bit) transformers.

    fast = torch.compile(model, backend="bitfx")
    qat  = bitfx.binarize(model, example_inputs, "bipft")
"""
from bitfx import ops as _ops  # noqa: F401  (registers torch.ops.bitfx.*)
from bitfx.api import binarize
from bitfx.calibrate import calibrate
from bitfx.config import BinarizeConfig
from bitfx.distill import distill
from bitfx.export import VerifyError, export
from bitfx.inputs import CaptureError
from bitfx.inspect import diff
from bitfx.serialize import LoadError, load, save

__version__ = "0.1.0"

__all__ = ["BinarizeConfig", "CaptureError", "LoadError", "binarize", "calibrate", "diff", "distill", "export",
           "load", "save", "VerifyError", "__version__"]
