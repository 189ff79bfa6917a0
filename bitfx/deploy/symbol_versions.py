"""Which glibc / libstdc++ a Linux arm64 binary needs, from its ELF symbol versions.

A binary linked on a new system records, per library, the versions of the symbols it binds
(``.gnu.version_r``, what ``objdump -T`` prints as ``(GLIBC_2.34)``). The dynamic linker refuses to
start it where the system library lacks one of them. The Linux bundle promises the oldest systems
below; ``too_new`` lists what a file needs beyond them:

    >>> too_new("bitfx_loader")            # [] when it runs on Ubuntu 18.04 / Debian 10
    >>> too_new("hello")                   # a plain g++ 12 program: ['libc.so.6: GLIBC_2.34']
"""

from __future__ import annotations

import re
from pathlib import Path

from bitfx.targets import _elf

# Ubuntu 18.04: glibc 2.27, libstdc++ of GCC 8 (GLIBCXX_3.4.25, CXXABI_1.3.11), libgcc_s GCC_7.0.0;
# Debian 10: glibc 2.28, the same GCC 8 libraries. The bundle README promises both.
OLDEST_LINUX = {"GLIBC": (2, 27), "GLIBCXX": (3, 4, 25), "CXXABI": (1, 3, 11), "GCC": (7, 0, 0)}
OLDEST_LINUX_NAME = "Ubuntu 18.04 / Debian 10 (glibc 2.27, libstdc++ of GCC 8)"
_VERSION = re.compile(r"^([A-Z]+)_(\d+(?:\.\d+)*)$")


def parse(version: str) -> tuple[str, tuple[int, ...]] | None:
    """``"GLIBC_2.34"`` -> ``("GLIBC", (2, 34))``; None for names without a number (``GLIBC_PRIVATE``)."""
    m = _VERSION.match(version)
    return (m.group(1), tuple(int(x) for x in m.group(2).split("."))) if m else None


def needed(path: str | Path) -> dict[str, set[str]]:
    """The symbol versions ``path`` needs, by library: ``{"libc.so.6": {"GLIBC_2.17"}, ...}``."""
    return _elf.read_elf(path).version_needs


def newest(paths) -> dict[str, str]:
    """The newest version of each family (GLIBC, GLIBCXX, ...) that any of ``paths`` needs."""
    best: dict[str, tuple[int, ...]] = {}
    for path in paths:
        for versions in needed(path).values():
            for v in versions:
                if (p := parse(v)) and p[1] > best.get(p[0], ()):
                    best[p[0]] = p[1]
    return {family: f"{family}_{'.'.join(map(str, v))}" for family, v in sorted(best.items())}


def too_new(path: str | Path, oldest: dict[str, tuple[int, ...]] = OLDEST_LINUX) -> list[str]:
    """``"library: VERSION"`` for every needed version newer than ``oldest`` has (sorted).

    ``GLIBC_PRIVATE`` (only the dynamic linker and libc use it among themselves) is reported too:
    a binary that needs it runs only with the exact glibc it was linked against.
    """
    out = []
    for lib, versions in needed(path).items():
        for v in versions:
            p = parse(v)
            if p is None or (p[0] in oldest and p[1] > oldest[p[0]]):
                out.append(f"{lib}: {v}")
    return sorted(out)
