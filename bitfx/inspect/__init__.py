"""Graph diff: what the pass pipeline did to a model, with bytes and OPs before and after.

    d = bitfx.diff(model, example_inputs, "bipft")
    d.print(); d.to_json("diff.json"); d.to_html("diff.html")
"""
from bitfx.inspect.model import GraphDiff, Layer, diff

__all__ = ["GraphDiff", "Layer", "diff"]
