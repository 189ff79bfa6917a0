"""Device bundles: an exported model with the TVM runtime, a C++ loader and a README for the device."""

from bitfx.deploy.bundle import render_readme, write_bundle

__all__ = ["render_readme", "write_bundle"]
