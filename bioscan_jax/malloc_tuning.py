"""glibc malloc settings for the main job and the CLI, so that XLA:CPU's per-step temporaries
reuse the heap instead of fresh mappings.

XLA:CPU allocates each execution's temporaries (378 MB for the tiny BarcodeBERT pretraining step
at batch 64) with ``malloc`` from its worker threads. glibc serves a request that large from a
thread's own arena with a new ``mmap`` and returns it with ``munmap`` on free (in a non-main
arena whatever ``M_MMAP_THRESHOLD``/``M_MMAP_MAX`` say), so every step faults its temporaries
in again, page by page: 28 M minor page faults and a quarter of the main job's CPU time in the
kernel. With one arena, no mmapped chunks and no trimming, freed temporaries stay in the heap and
the next step reuses them (docs/performance.md, "Kernel time"). The cost is a higher peak RSS
(the heap keeps what it has held).

:func:`configure` applies the settings with ``mallopt`` (the process's own glibc, at run time:
no re-exec), before the JAX backend starts its threads. It leaves malloc alone when the user
chose an allocator or tuned glibc (``LD_PRELOAD``, ``MALLOC_CONF``, ``GLIBC_TUNABLES``,
``MALLOC_*_``), when ``BIOSCAN_JAX_MALLOC=0``, or off glibc; it returns one line saying what it did.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)
ENV = "BIOSCAN_JAX_MALLOC"
#: mallopt parameters (glibc's malloc.h): name -> (code, value).
SETTINGS: dict[str, tuple[int, int]] = {
    "M_ARENA_MAX": (-8, 1),  # every thread allocates from the main (brk) arena
    "M_MMAP_MAX": (-4, 0),  # no mmapped chunks: large blocks come from the heap too
    "M_TRIM_THRESHOLD": (-1, 2**31 - 1),  # never give the heap's top back to the kernel
}
#: Variables by which a user picks or tunes the allocator: any of them set, nothing is changed.
USER_VARIABLES = ("LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_",
                  "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def configure(environ: Mapping[str, str] = os.environ, libc: Any = None) -> str:
    """Applies :data:`SETTINGS` unless the user chose otherwise; logs and returns what it did."""
    line = _configure(environ, libc)
    logger.info("%s", line)
    return line


def _configure(environ: Mapping[str, str], libc: Any) -> str:
    if environ.get(ENV, "1").strip().lower() in ("0", "off", "false", "no"):
        return f"malloc: left as it is ({ENV}={environ[ENV]})"
    chosen = [name for name in USER_VARIABLES if environ.get(name)]
    if chosen:
        return f"malloc: left as it is ({', '.join(chosen)} set by the user)"
    if libc is None:
        if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
            return "malloc: left as it is (not glibc)"
        libc = ctypes.CDLL("libc.so.6")
    done = []
    for name, (code, value) in SETTINGS.items():
        if libc.mallopt(code, value) != 1:
            return f"malloc: mallopt({name}, {value}) refused; settings so far: {done or 'none'}"
        done.append(f"{name}={value}")
    return (f"malloc: glibc mallopt {' '.join(done)} (XLA's per-step temporaries reuse the heap; "
            f"{ENV}=0 leaves malloc as it is; docs/performance.md)")
