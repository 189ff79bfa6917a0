"""The ``bitfx`` torch.library ops: reference (the definition), fake, and straight-through autograd.

Importing this package registers ``torch.ops.bitfx.bit_linear``, ``torch.ops.bitfx.bit_attention``
and the canonical float ``torch.ops.bitfx.attention``.
"""
from bitfx.ops import attention as _attention  # noqa: F401  (registers the ops)
from bitfx.ops import linear as _linear  # noqa: F401
from bitfx.ops.quantizers import sign

BIT_LINEAR = __import__("torch").ops.bitfx.bit_linear.default
BIT_ATTENTION = __import__("torch").ops.bitfx.bit_attention.default
ATTENTION = __import__("torch").ops.bitfx.attention.default

__all__ = ["BIT_LINEAR", "BIT_ATTENTION", "ATTENTION", "sign"]
