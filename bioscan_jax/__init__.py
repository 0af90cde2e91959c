"""bioscan-jax: BIOSCAN-5M tooling and benchmarks in JAX/Flax NNX.

Importing the package makes the ``bioscan5m`` TFDS dataset known to TFDS (now if TFDS is
loaded, else when it is imported: :mod:`bioscan_jax.data.registration`), so
``tfds.load('bioscan5m')`` and ``tfds.data_source('bioscan5m')`` work after
``import bioscan_jax``; the import itself stays light (no TFDS, no JAX).
"""

from bioscan_jax.data import registration as _registration

__version__ = "0.1.0"

_registration.register_on_tfds_import()
