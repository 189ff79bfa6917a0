"""Near-ties in verify: a device that rounds an activation at its threshold the other way is told from a
wrong one (``bitfx.ops.quantizers.Decisions``, ``bitfx.deploy.verify.explain_ties``).

The "devices" here are the host model with one parameter moved by float32 rounding (a near-tie decided the
other way, as an ARM LayerNorm does) or with a real error; ``verify_library``'s qemu run is replaced by
running them, so no toolchain is needed. The real case, all-MiniLM-L6-v2 under qemu, is in
``test_entry_points.py`` (slow).
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

import bitfx
from bitfx.deploy import verify as V
from bitfx.inputs import flat_module
from bitfx.ops import BIT_LINEAR
from bitfx.ops import quantizers as Q
from regional_tools import hf_bert


def _bit_linear(x, w, move, alpha):
    return torch.ops.bitfx.bit_linear(x, w, None, None, move, alpha, "sign_tensor", "sign", 1)


def test_a_decision_near_its_threshold_is_recorded_and_flipped_where_asked():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 64, generator=gen), torch.randn(16, 64, generator=gen)
    move, alpha = torch.zeros(64), torch.tensor(0.7)
    x[1, 5] = 1e-7 * float(x[1].abs().mean())  # within float rounding of sign's threshold
    y = _bit_linear(x, w, move, alpha)

    with Q.recording(Q.Decisions(near=1e-4)) as seen:
        assert torch.equal(_bit_linear(x, w, move, alpha), y)  # recording changes nothing
    assert Q._RECORDER is None
    first = sorted(seen.found)[0]
    assert (first.site, first.element, first.kind) == (0, (1, 5), "sign")
    assert first.margin == pytest.approx(float(x[1, 5] / x[1].abs().mean()), rel=1e-5)

    with Q.recording(Q.Decisions(near=1e-4, flips=[first.key])):
        flipped = _bit_linear(x, w, move, alpha)
    # Independently: x[1, 5]'s code goes from +1 to -1, so row 1 moves by α·s_w·(-2)·sign(w[:, 5] - mean w).
    w_codes = torch.where(w - w.mean() < 0, -1.0, 1.0)
    expected = y.clone()
    expected[1] += 0.7 * w.abs().mean() * -2.0 * w_codes[:, 5]
    torch.testing.assert_close(flipped, expected, rtol=0, atol=1e-5)
    assert torch.equal(flipped[[0, 2]], y[[0, 2]])


def test_a_lone_exact_zero_is_a_near_tie_a_run_of_them_and_weights_are_not():
    """Zeros in a run are structural, decided alike everywhere (a head whose probabilities all binarized to
    0 outputs a block of them); a lone one is rounding's (a GELU that underflows to -0.0 on the host and not
    on the device). Weight codes come from the host: never a decision."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 32, generator=gen), torch.randn(8, 32, generator=gen)
    x[0, :8] = 0.0
    x[1, 20] = -0.0
    w[0, 0] = w.mean() + 1e-9
    with Q.recording(Q.Decisions(near=1e-4)) as seen:
        _bit_linear(x, w, torch.zeros(32), torch.tensor(1.0))
    assert seen.sites == 1
    zeros = sorted(d.element for d in seen.found if d.margin == 0)
    assert zeros == [(1, 20)]
    assert all(d.element[0] != 0 or d.element[1] >= 8 for d in seen.found)


def _near_ties():
    """(kind, binarize: () -> codes, the element placed at its threshold, its code there, the other code), each
    input built by hand a relative 1e-6 or so past the threshold."""
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(2, 16, generator=gen) + 0.2
    x[1, 3] = 0.35 * (1 + 2e-6)  # u / α = 0.5 + 1e-6 with α = 0.7: code 1
    s = torch.randn(2, 16, generator=gen)
    s[0, 4] = 1e-7 * float(s[0].abs().mean())  # S > 0: code 1
    p = torch.rand(2, 16, generator=gen) * 0.3
    p[0, 0] = 0.4  # the row's max: BiViT's threshold 0.25 · 0.4 = 0.1
    p[0, 7] = 0.1 * (1 + 1e-6)  # code 1
    e = torch.rand(2, 16, generator=gen) * 0.05
    e[1, 9] = 0.1 * (1 + 2e-6)  # P / α_P = 0.5 + 2e-6 with α_P = 0.2: code 1
    a = torch.rand(2, 16, generator=gen) * 0.5
    a[0, 0] = 1.0  # γ = 1: t = 127 x
    a[0, 5] = (10.5 + 1e-5) / 127  # t just above 10.5: code 11
    return [
        ("unsigned", lambda: Q.act_unsigned(x, None, torch.tensor(0.7))[0], (1, 3), 1.0, 0.0),
        ("bool", lambda: Q.prob_bool(s)[0], (0, 4), 1.0, 0.0),
        ("bivit", lambda: Q.prob_bivit(p, 0.25)[0], (0, 7), 1.0, 0.0),
        ("elastic", lambda: Q.prob_elastic(e, torch.tensor(0.2))[0], (1, 9), 1.0, 0.0),
        ("absmax", lambda: Q.act_absmax(a, 8)[0], (0, 5), 11.0, 10.0),
    ]


@pytest.mark.parametrize("case", range(5), ids=[c[0] for c in _near_ties()])
def test_each_binarizer_records_its_near_tie_and_flips_it_to_the_other_code(case):
    kind, binarize, element, code, other = _near_ties()[case]
    plain = binarize()
    assert float(plain[element]) == code
    with Q.recording(Q.Decisions(near=1e-4)) as seen:
        assert torch.equal(binarize(), plain)
    (decision,) = [d for d in seen.found if d.element == element]
    assert decision.kind == kind and 0 < decision.distance < 1e-4
    with Q.recording(Q.Decisions(near=1e-4, flips=[decision.key])):
        flipped = binarize()
    assert float(flipped[element]) == other
    changed = (flipped != plain).nonzero().tolist()
    assert changed == [list(element)]


def _module_of(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _args_of(gm, node, inputs):
    """The arguments ``node`` is called with in a plain run of ``gm`` (not the recorder)."""
    seen = {}

    class Spy(torch.fx.Interpreter):
        def run_node(self, n):
            if n is node:
                seen["args"] = self.fetch_args_kwargs_from_env(n)[0]
            return super().run_node(n)

    with torch.no_grad():
        Spy(gm).run(*inputs)
    return seen["args"]


def _tensor(gm, name):
    return dict(gm.named_parameters(), **dict(gm.named_buffers()))[name]


@pytest.fixture(scope="module")
def bert_with_a_near_tie():
    """A binarized random-init HF BERT whose FFN input has one activation 1e-7 (relative) from zero, and a
    "device": the same model with that channel's ``move`` one float32 rounding step the other way."""
    model, ids = hf_bert(layers=2)
    gm = bitfx.binarize(model, (ids,))
    host = flat_module(gm)
    node = next(n for n in host.graph.nodes
                if n.target is BIT_LINEAR and _module_of(n) == "encoder.layer.1.intermediate.dense")
    x, move = _args_of(host, node, (ids,))[0], _tensor(host, node.args[4].target)
    b, t, j = 1, 7, 11
    u = x[b, t] + move.detach()
    scale = float(u.abs().mean())
    with torch.no_grad():
        move[j] -= float(u[j]) - 1e-7 * scale  # u[b, t, j] = +1e-7 · mean|u|: a near-tie on the host
    device = copy.deepcopy(host)
    with torch.no_grad():
        _tensor(device, node.args[4].target)[j] -= 3e-7 * scale  # one float32 rounding step or so
    return host, device, (ids,), node, (b, t, j)


def _outputs(model, inputs):
    with torch.no_grad():
        return V.flatten_outputs(model(*inputs))[1]


def test_a_device_that_rounds_a_near_tie_otherwise_is_explained_by_that_decision(bert_with_a_near_tie):
    host, device, inputs, node, element = bert_with_a_near_tie
    want, got = _outputs(host, inputs), _outputs(device, inputs)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(want, got))
    assert diff > 1e-2  # one sign moved the outputs far past verify's tolerance (2e-4 · max |host|)

    found = V.explain_ties(host, inputs, got)
    assert found.explained and len(found.flips) == 1
    flip = found.flips[0]
    assert flip.element == element and flip.kind == "sign"
    assert flip.label == f"{node.name} (encoder.layer.1.intermediate.dense)"
    assert flip.distance < 1e-6 and found.max_diff < 1e-4


def test_a_wrong_device_is_not_explained(bert_with_a_near_tie):
    host, _, inputs, _, _ = bert_with_a_near_tie
    got = _outputs(host, inputs)
    got[0] = got[0].copy()
    got[0][0, 3, :5] += 0.5  # wrong, not a rounding
    found = V.explain_ties(host, inputs, got)
    assert not found.explained and found.runs >= 1


@pytest.fixture
def fake_qemu(monkeypatch):
    """``verify_library``'s qemu run replaced by a host model standing in for the device."""
    def use(device):
        def run(path, arrays, target, cpu):
            return [a.astype(np.float32) for a in _outputs(device, tuple(torch.from_numpy(a) for a in arrays))]
        monkeypatch.setattr(V.emulate, "run_emulated", run)
    return use


def test_verify_passes_a_near_tie_with_a_warning_naming_it(bert_with_a_near_tie, fake_qemu, caplog):
    host, device, inputs, node, element = bert_with_a_near_tie
    fake_qemu(device)
    with caplog.at_level(logging.WARNING, logger="bitfx.deploy.verify"):
        worst = V.verify_library("model.so", host, inputs, "linux-arm64", cpus=("cortex-a53",))
    assert worst < 1e-4
    (record,) = [r for r in caplog.records if "near-tie" in r.getMessage()]
    message = record.getMessage()
    assert "cortex-a53, the example inputs" in message and node.name in message
    assert str(list(element)) in message

    with pytest.raises(V.VerifyError, match="pass the host model"):
        V.verify_library("model.so", None, inputs, "linux-arm64", cpus=("cortex-a53",),
                         expected=host(*inputs))
    with pytest.raises(V.VerifyError) as err:
        V.verify_library("model.so", host, inputs, "linux-arm64", cpus=("cortex-a53",), ties=False)
    assert "near-tie" not in str(err.value) and err.value.max_diff > 1e-2


def test_verify_still_fails_a_wrong_device(bert_with_a_near_tie, fake_qemu):
    host, device, inputs, _, _ = bert_with_a_near_tie
    wrong = copy.deepcopy(host)
    with torch.no_grad():
        next(p for name, p in wrong.named_parameters() if "LayerNorm" in name and name.endswith("bias"))[3] += 0.5
    fake_qemu(wrong)
    with pytest.raises(V.VerifyError, match="Not a near-tie") as err:
        V.verify_library("model.so", host, inputs, "linux-arm64", cpus=("cortex-a53",))
    assert err.value.inputs == "the example inputs" and err.value.max_diff > 0.1
