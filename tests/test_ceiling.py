"""The same-run ceiling kernel builds, checks its own results and reports a plausible rate."""

import shutil

import pytest

from bitfx.perf import ceiling

needs_cc = pytest.mark.skipif(not (shutil.which("clang") or shutil.which("cc")), reason="no C compiler")


@needs_cc
def test_ceiling_runs_and_self_checks():
    c = ceiling.measure(M=8, N=64, K=256, reps=3)
    assert (c.M, c.N, c.K) == (8, 64, 256)
    assert c.us > 0 and c.gbit_per_s == pytest.approx(8 * 64 * 256 / (c.us * 1e-6) / 1e9, rel=0.01)
    assert c.fraction(c.gbit_per_s, threads=2) == pytest.approx(0.5)


@needs_cc
def test_bad_shape_is_refused_by_name():
    with pytest.raises(ceiling.CeilingUnavailable, match="K=100"):
        ceiling.measure(M=8, N=64, K=100, reps=1)
