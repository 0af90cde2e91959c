"""tfds.testing.DatasetBuilderTestCase for bioscan5m on dummy_data/ (needs TensorFlow)."""

import pytest

pytest.importorskip("tensorflow", reason="DatasetBuilderTestCase needs TensorFlow (the `tf` extra)")
pytest.importorskip("dill", reason="tfds.testing needs dill")

import tensorflow_datasets as tfds  # noqa: E402

from bioscan_jax.data import schema  # noqa: E402
from tfds_builder.bioscan5m import bioscan5m_dataset_builder  # noqa: E402

pytestmark = pytest.mark.tf


class Bioscan5mTest(tfds.testing.DatasetBuilderTestCase):
    """Builds configs from dummy_data/ (the official layout) and reads them with as_dataset."""

    DATASET_CLASS = bioscan5m_dataset_builder.Builder
    # One image package and the DNA-only config: the other packages run the same code
    # (tests/test_tfds_builder.py builds all of them, and the synthetic configs, without TF).
    BUILDER_CONFIG_NAMES_TO_TEST = [schema.DEFAULT_IMAGE_PACKAGE, "dna"]
    SPLITS = {split: 2 for split in schema.SPLITS}

    def _make_builder(self, config=None):
        # dummy_data's CSV is named like the official one but is not it: skip the md5 check.
        return self.dataset_class(data_dir=self.tmp_dir, config=config, version=self.VERSION, verify_md5=False)


if __name__ == "__main__":
    tfds.testing.test_main()
