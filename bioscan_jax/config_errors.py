"""One line for a bad ``--config`` / ``--config.x=y`` flag, instead of chained tracebacks.

``ml_collections.config_flags`` reports an unknown field as a KeyError/AttributeError whose text
embeds the traceback of the config file's loader; :func:`one_line` keeps the cause ("unknown
config field 'finetune_splt'; did you mean 'finetune_split'?"). Used by ``run.py`` and the
planner (``python -m bioscan_jax.plan``), which parse the same flags.
"""

from __future__ import annotations

import re


def one_line(error: Exception) -> str:
    """The cause of a flag-parsing error, in one line."""
    text = str(error).replace("\\n", " ").replace("\n", " ").strip()
    if text[:1] in "'\"":  # a repr-quoted KeyError / AttributeError message
        text = text.strip("'\" ")
    hint = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    inner = re.findall(r"\b\w*Error: (.+?)(?=\s+File \"|$)", text)  # the last error of an embedded traceback
    if hint:
        return f"unknown config field {hint.group(2)!r}; did you mean {hint.group(1)!r}?"
    if isinstance(error, (KeyError, AttributeError)) and " " not in text:
        return f"unknown config field {text!r}"
    if inner:
        return inner[-1].strip()
    return text.splitlines()[0] if text else type(error).__name__
