"""``python -m bioscan_jax`` is the ``bioscan-jax`` command (:mod:`bioscan_jax.cli`)."""

import sys

from bioscan_jax.cli import main

sys.exit(main())
