"""The one way library code reads a config: ``ml_collections.ConfigDict`` sections (or plain
mappings, e.g. in tests), with a default for a missing field.

Configs are code (``configs/*.py``); the library reads the few fields it needs with
:func:`get` and turns a section into plain data with :func:`to_dict` (for hashing, JSON and
``**overrides``). This module imports nothing of the package: every layer may use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def get(section: Mapping[str, Any] | None, name: str, default: Any = None) -> Any:
    """``section[name]``, or ``default`` when the section or the field is missing, or the field
    is ``None`` (a config's way of saying "not set")."""
    if section is None:
        return default
    if not hasattr(section, "get"):
        raise TypeError(f"config sections are ConfigDicts or mappings, not {type(section).__name__} "
                        f"(reading {name!r})")
    value = section.get(name, default)
    return default if value is None else value


def to_dict(section: Any) -> Any:
    """A ConfigDict (or a mapping of them) as plain dicts; anything else as it is; ``None`` as
    ``{}`` where a section is expected to be a mapping of overrides."""
    if hasattr(section, "to_dict"):
        return section.to_dict()
    if isinstance(section, Mapping):
        return {k: to_dict(v) for k, v in section.items()}
    return section


def overrides(section: Mapping[str, Any] | None) -> dict[str, Any]:
    """A model section's ``overrides`` (field -> value) as a plain dict (``{}`` if unset)."""
    return dict(to_dict(get(section, "overrides", {})))


def name_list(value: Any) -> tuple[str, ...]:
    """A config field that lists names, as a comma-separated string (``"train,key_unseen"``, the
    form ``--config.x=...`` gives) or a sequence, as a tuple without blanks."""
    items = value.split(",") if isinstance(value, str) else (value or ())
    return tuple(s.strip() for s in items if str(s).strip())
