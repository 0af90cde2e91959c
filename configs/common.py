"""Helpers shared by the experiment configs (big_vision style variant parsing)."""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, *, variants: tuple[str, ...], **defaults) -> ml_collections.ConfigDict:
    """Parses a config argument such as ``"paper"`` or ``"variant=paper,steps=10"``.

    The first bare word (or ``variant=``) picks the variant, which must be one of ``variants``
    (the first is the default); ``key=value`` pairs override ``defaults`` with their type.
    """
    out = dict(defaults, variant=variants[0])
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            key, value = "variant", item
        if key not in out:
            raise ValueError(f"Unknown config argument {key!r}; valid: {', '.join(sorted(out))}")
        default = out[key]
        if isinstance(default, bool):
            value = value.lower() in ("1", "true", "yes")
        elif default is not None:
            value = type(default)(value)
        out[key] = value
    if out["variant"] not in variants:
        raise ValueError(f"Unknown variant {out['variant']!r}; valid variants: {', '.join(variants)}")
    return ml_collections.ConfigDict(out)
