"""bitfx: a compiler for binary (1-bit) transformers.

    fast = torch.compile(model, backend="bitfx")
    qat  = bitfx.binarize(model, example_inputs, "bipft")
"""
import os as _os

# Before TVM's runtime loads: its idle pool workers sleep instead of spinning. Beside torch/inductor's
# OpenMP workers on as many cores, two spinning pools take turns (a BERT layer at 2 threads: 47 ms
# spinning, 2.7 ms without). Set it yourself to override. TVM's pool runs the kernels until the C++ library
# (bitfx.ops.native) loads; from then on torch's OpenMP pool does, unless BITFX_POOL=0.
_os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

from bitfx import ops as _ops  # noqa: F401  (registers torch.ops.bitfx.*)
from bitfx.api import binarize
from bitfx.blocks import trace_once
from bitfx.calibrate import calibrate
from bitfx.config import BinarizeConfig
from bitfx.distill import distill
from bitfx.export import VerifyError, export
from bitfx.inputs import CaptureError
from bitfx.inspect import diff
from bitfx.serialize import LoadError, load, save

__version__ = "0.1.0"

__all__ = ["BinarizeConfig", "CaptureError", "LoadError", "binarize", "calibrate", "diff", "distill", "export",
           "load", "save", "trace_once", "VerifyError", "__version__"]
