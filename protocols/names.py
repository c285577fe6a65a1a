"""Names that end up in DHT keys: swarm names and expert names follow one rule."""

from __future__ import annotations

import re
from typing import Final

#: a swarm's or an expert's name: 1-64 characters of a-z, 0-9, '_' and '-', starting with a letter or digit
NAME_PATTERN: Final = r"^[a-z0-9][a-z0-9_\-]{0,63}$"
NAME_RULE: Final = "1-64 characters of a-z, 0-9, '_' and '-', starting with a letter or digit"
_NAME_RE: Final = re.compile(NAME_PATTERN)
_NOT_IN_NAMES: Final = re.compile(r"[^a-z0-9_\-]+")


def is_name(value: str) -> bool:
    """Whether ``value`` is a valid swarm or expert name."""
    return _NAME_RE.fullmatch(value) is not None


def slug(text: str, fallback: str) -> str:
    """The name ``text`` becomes (lower-cased, other characters as '-', at most 64), or ``fallback``
    where nothing of it is left; e.g. ``slug("My Notes", "custom") == "my-notes"``."""
    return _NOT_IN_NAMES.sub("-", text.lower()).strip("-_")[:64] or fallback
