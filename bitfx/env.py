"""bitfx's environment switches, read one way everywhere."""
from __future__ import annotations

import os

#: The spellings that turn a ``BITFX_*`` switch off.
OFF = ("0", "off", "false", "no")


def switched_off(name: str) -> bool:
    """Whether the switch ``name`` (e.g. ``BITFX_POOL``) is set to one of ``OFF`` (any case, spaces ignored)."""
    return os.environ.get(name, "").strip().lower() in OFF
