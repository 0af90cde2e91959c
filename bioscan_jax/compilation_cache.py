"""JAX's persistent compilation cache for ``run.py`` and the CLI: a second run (or a later stage
with the same shapes) loads its compiled XLA programs from disk instead of compiling them again.

The directory is, in order: the user's own ``JAX_COMPILATION_CACHE_DIR`` (JAX reads it itself;
left alone), ``BIOSCAN_JAX_COMPILATION_CACHE`` (a path, or ``0``/``off`` to disable), else
``$XDG_CACHE_HOME/bioscan_jax/xla`` (``~/.cache/bioscan_jax/xla``). JAX keys each entry on the
program, the compile options, the XLA flags and the backend, so a cached program is the one the
compiler would produce; programs that compile in under ``MIN_COMPILE_SECONDS`` are not stored.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

logger = logging.getLogger(__name__)

ENV = "BIOSCAN_JAX_COMPILATION_CACHE"
#: JAX's own variable: when set, its value is used and this module changes nothing.
JAX_ENV = "JAX_COMPILATION_CACHE_DIR"
#: Shorter compiles are not worth a disk entry (JAX's default threshold is 1 s).
MIN_COMPILE_SECONDS = 0.5
_OFF = ("0", "off", "false", "no", "none")


def cache_dir(environ: Mapping[str, str] = os.environ) -> str | None:
    """The directory this module would use, or ``None`` (disabled, or left to ``JAX_ENV``)."""
    if environ.get(JAX_ENV):
        return None
    value = environ.get(ENV, "").strip()
    if value.lower() in _OFF:
        return None
    if value:
        return os.path.expanduser(value)
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "bioscan_jax", "xla")


def enable(environ: Mapping[str, str] = os.environ) -> str | None:
    """Turns the cache on (before the first compile); returns the directory, or ``None``."""
    path = cache_dir(environ)
    if path is None:
        if environ.get(JAX_ENV):
            logger.info("compilation cache: %s=%s (set by the user)", JAX_ENV, environ[JAX_ENV])
        else:
            logger.info("compilation cache off (%s=%s)", ENV, environ.get(ENV))
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # a read-only home must not stop a run: it only compiles again
        logger.warning("compilation cache off: cannot create %s (%s)", path, e)
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    logger.info("compilation cache: %s (%s=0 to turn it off)", path, ENV)
    return path
