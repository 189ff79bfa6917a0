"""The per-target kernel registry: lookups, fallbacks, duplicate refusal, errors that name the value."""

import pytest

from bitfx.codegen import compute
from bitfx.targets import host, registry


def test_builtin_sets_resolve_to_their_own_generators():
    assert registry.implementation("host", "gemm") is host.gemm
    assert registry.implementation("reference", "pack_rows") is compute.pack_rows


def test_a_set_without_an_op_falls_back_to_the_reference_compute():
    registry.register_kernel("test-partial", "gemm")(host.gemm)
    assert registry.implementation("test-partial", "pack_cols") is compute.pack_cols
    assert registry.implemented_ops("test-partial") == ["gemm"]


def test_duplicate_registration_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="already registered by .*host.gemm"):
        registry.register_kernel("host", "gemm")(compute.gemm)


def test_unknown_names_are_named():
    with pytest.raises(registry.UnknownKernelSetError, match="'nope'.*expected one of"):
        registry.implementation("nope", "gemm")
    with pytest.raises(ValueError, match="unknown kernel op 'conv'"):
        registry.register_kernel("host", "conv")


def test_device_targets_name_their_kernel_set():
    from bitfx.targets import cross

    assert cross.get_target("host").kernels == "host"
    assert cross.get_target("linux-arm64").kernels in registry.kernel_sets()
