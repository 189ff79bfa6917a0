"""The device export's front half: a binarized GraphModule as a Relax IRModule.

- ``importer.py``: ``torch.export`` → decompositions → TVM's ``from_exported_program`` with the bitfx
  converters; every op the importer cannot take is reported at once (``ExportError``).
- ``converters.py``: one converter per bitfx op, registered with ``@converter(op)`` keyed by the op
  object; each lowers its op to ``call_tir`` of the kernels its target's kernel set implements
  (``bitfx.targets.registry.implementation(kernels, op)``).
"""
from bitfx.relax.importer import ExportError, to_relax

__all__ = ["ExportError", "to_relax"]
