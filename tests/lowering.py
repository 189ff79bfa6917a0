"""The forward graphs the bitfx backend lowers, and the ops one model call runs through them.

With repeated blocks compiled once (`bitfx.regions`), a lowered graph may serve several partitions of the
model (a layer's graph serves every layer): `executed` counts each graph's ops once per partition it serves,
what the whole graph would have held."""
import pytest

import bitfx.backend


def count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


@pytest.fixture
def lowered(monkeypatch):
    """The forward graphs the bitfx backend lowers, recorded as they enter LOWERING."""
    graphs = []

    def record(gm, ctx):
        gm.bitfx_instances = ctx.instances
        graphs.append(gm)
        return gm

    monkeypatch.setattr(bitfx.backend, "LOWERING", [record, *bitfx.backend.LOWERING])
    return graphs


def executed(graphs, target) -> int:
    """How many ``target`` ops one call runs through ``graphs`` (each graph's count times its partitions)."""
    return sum(count(g, target) * g.bitfx_instances for g in graphs)
