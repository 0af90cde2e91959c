"""The XLA:CPU options bioscan-jax applies by default, chosen by measurement.

``python run.py`` and the ``bioscan-jax`` CLI call :func:`apply_defaults` before JAX starts its
backend. It sets ``XLA_FLAGS`` only when the user has not set it (an empty ``XLA_FLAGS=`` counts as
set: that is the way to run with XLA's own defaults) and only on CPUs where the option won in the
paired benchmark (docs/performance.md, ``benchmarks/xla_cpu_flags_sweep.py``):

* **x86 without AVX-512** (AVX2 only): ``--xla_cpu_experimental_ynn_fusion_type=`` turns off
  jaxlib 0.10's default YNNPACK dot fusions. Measured on a 2-core AMD EPYC (AVX2): our BarcodeBERT
  step went from 1.29/1.04 to 1.02/0.91 s (tiny, batch 64) and from 11.4/11.1 to 10.4/10.8 s
  (``4_4_4``, batch 32), against an unchanged torch step in the same runs. YNNPACK is faster on
  large square matmuls there (2048²: 150 vs 80–127 GFLOP/s) but slower on the model's batched
  attention dots and skinny projections.
* AVX-512 and AMX machines: nothing. The sweep on an AVX-512 EPYC found no option that wins, and
  the YNNPACK setting was not measured there.

No option here changes what is computed, only which kernels compute it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, MutableMapping

logger = logging.getLogger(__name__)

#: jaxlib's YNNPACK fusions (dots, and the reductions/elementwise ops around them) off.
YNN_FUSIONS_OFF = "--xla_cpu_experimental_ynn_fusion_type="


def _cpuinfo_value(path: str, keys: tuple[str, ...]) -> str | None:
    """The value of the first ``key: value`` line of ``path`` (Linux ``/proc/cpuinfo``) whose key
    is one of ``keys``, or None."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() in keys:
                    return value.strip()
    except OSError:
        return None
    return None


def cpu_features(path: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The ISA flags of the first CPU in ``path`` (x86 ``flags``, Arm ``Features``), or None where
    they cannot be read."""
    value = _cpuinfo_value(path, ("flags", "Features"))
    return None if value is None else frozenset(value.split())


def cpu_model(path: str = "/proc/cpuinfo") -> str | None:
    """The first CPU's ``model name`` in ``path``, or None."""
    return _cpuinfo_value(path, ("model name",)) or None


def default_flags(features: Iterable[str] | None) -> list[str]:
    """The ``XLA_FLAGS`` entries that won on a CPU with these ISA ``features`` (empty: none, or
    features unknown)."""
    if features is None:
        return []
    features = set(features)
    if "avx2" in features and "avx512f" not in features:
        return [YNN_FUSIONS_OFF]
    return []


def apply_defaults(environ: MutableMapping[str, str] = os.environ, features: Iterable[str] | None = None) -> str | None:
    """Sets ``environ['XLA_FLAGS']`` to :func:`default_flags` of this CPU unless the user set it;
    returns what it set (None: nothing). Call before the first JAX computation in the process:
    XLA reads the variable once, when the backend starts."""
    if "XLA_FLAGS" in environ:
        logger.info("XLA_FLAGS is set by the user (%r): no bioscan-jax XLA:CPU defaults", environ["XLA_FLAGS"])
        return None
    flags = default_flags(cpu_features() if features is None else features)
    if not flags:
        return None
    environ["XLA_FLAGS"] = " ".join(flags)
    logger.info("XLA:CPU defaults for this CPU (docs/performance.md): XLA_FLAGS=%s "
                "(set XLA_FLAGS yourself, even empty, to override)", environ["XLA_FLAGS"])
    return environ["XLA_FLAGS"]
