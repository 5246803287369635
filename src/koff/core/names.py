"""Names with rules of their own: memory names (a folder name, a module key and an API model id at
once)."""

from __future__ import annotations

import re

from koff.core.errors import ConfigError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
RESERVED_NAMES = ("none", "auto")
"""Memory names with a meaning of their own: `none` is the bare backbone (CLI), `auto` asks the
server to pick a memory."""


def check_memory_name(name: str, where: str = "memory name") -> str:
    """A memory name is a folder name, a module key and an API model id: ASCII letters, digits, '_'
    and '-', starting with a letter or digit, at most 64 characters, not a reserved word."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.lower() in RESERVED_NAMES:
        raise ConfigError(f"{where}: invalid memory name {name!r}: use ASCII letters, digits, '_' or '-', "
                          f"starting with a letter or digit, at most 64 characters, and not "
                          f"{' or '.join(repr(r) for r in RESERVED_NAMES)}")
    return name
