"""Registers the ``bioscan5m`` builder with TFDS, so ``tfds.load('bioscan5m')`` and
``tfds.data_source('bioscan5m')`` work after ``import bioscan_jax``.

TFDS knows a builder once its class is defined (``tfds_builder.bioscan5m``). Importing TFDS
takes seconds, so ``import bioscan_jax`` does not: :func:`register_on_tfds_import` registers
the builder at once when TFDS is already loaded, and otherwise the moment it is imported (a
one-shot import hook that runs :func:`register` right after ``tensorflow_datasets`` has
executed).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys

TFDS_MODULE = "tensorflow_datasets"
logger = logging.getLogger(__name__)


def register() -> None:
    """Defines (and so registers) the ``bioscan5m`` builder; imports TFDS."""
    importlib.import_module("tfds_builder.bioscan5m")


class _RegisterAfterTfds(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow_datasets`` with the other finders and registers the builder once
    the module has executed; removes itself on first use."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TFDS_MODULE:
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            try:
                register()
            except Exception as e:  # pylint: disable=broad-except  # never break `import tensorflow_datasets`
                logger.warning("bioscan_jax: could not register the bioscan5m TFDS builder (%s: %s); "
                               "import tfds_builder.bioscan5m to see why", type(e).__name__, e)

        spec.loader.exec_module = exec_then_register
        return spec


def register_on_tfds_import() -> None:
    """Registers the builder now if TFDS is loaded, else when it is first imported."""
    module = sys.modules.get(TFDS_MODULE)
    if module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False):
        register()
    elif not any(isinstance(f, _RegisterAfterTfds) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTfds())
