"""JAX's persistent compilation cache for ``run.py`` and the CLI: a second run (or a later stage
with the same shapes) loads its compiled XLA programs from disk instead of compiling them again.

The directory is, in order: the user's own ``JAX_COMPILATION_CACHE_DIR`` (JAX reads it itself;
left alone), ``BIOSCAN_JAX_COMPILATION_CACHE`` (a path, or ``0``/``off`` to disable), else
``$XDG_CACHE_HOME/bioscan_jax/xla`` (``~/.cache/bioscan_jax/xla``); in the last two, one subfolder
per host CPU (:func:`host_tag`). JAX keys each entry on the program, the compile options, the XLA
flags and the backend; XLA:CPU code is also compiled for the host's instruction set, so a home
directory shared by machines with different CPUs keeps their programs apart. Programs that
compile in under ``MIN_COMPILE_SECONDS`` are not stored (a ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``
of the user's wins).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from collections.abc import Mapping

logger = logging.getLogger(__name__)

ENV = "BIOSCAN_JAX_COMPILATION_CACHE"
#: JAX's own variable: when set, its value is used and this module changes nothing.
JAX_ENV = "JAX_COMPILATION_CACHE_DIR"
#: Shorter compiles are not worth a disk entry (JAX's default threshold is 1 s).
MIN_COMPILE_SECONDS = 0.5
MIN_COMPILE_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
_OFF = ("0", "off", "false", "no", "none")


def host_tag(cpuinfo: str = "/proc/cpuinfo") -> str:
    """A short name for this host's CPU: its architecture, model name and ISA flags, hashed."""
    from bioscan_jax import xla_cpu

    model = xla_cpu.cpu_model(cpuinfo) or ""
    flags = " ".join(sorted(xla_cpu.cpu_features(cpuinfo) or ()))
    digest = hashlib.sha256(f"{platform.machine()}|{model}|{flags}".encode()).hexdigest()[:12]
    return f"{platform.machine() or 'cpu'}-{digest}"


def cache_dir(environ: Mapping[str, str] = os.environ, tag: str | None = None) -> str | None:
    """The directory this module would use, or ``None`` (disabled, or left to ``JAX_ENV``);
    ``tag`` (default :func:`host_tag`) names the per-CPU subfolder."""
    if environ.get(JAX_ENV):
        return None
    value = environ.get(ENV, "").strip()
    if value.lower() in _OFF:
        return None
    if value:
        base = os.path.expanduser(value)
    else:
        home = environ.get("HOME") or os.path.expanduser("~")
        base = os.path.join(environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache"), "bioscan_jax", "xla")
    return os.path.join(base, host_tag() if tag is None else tag)


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
    if not environ.get(MIN_COMPILE_ENV):
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    logger.info("compilation cache: %s (%s=0 to turn it off)", path, ENV)
    return path
