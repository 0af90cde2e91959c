"""``python -m bioscan_jax.data.synthetic --out DIR [--records N] [--seed S] [--no-images]``."""

import sys

from bioscan_jax.data.synthetic.cli import main

if __name__ == "__main__":
    sys.exit(main())
