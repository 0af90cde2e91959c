"""The ``bioscan5m`` TFDS builder; importing this package registers it with TFDS."""

from tfds_builder.bioscan5m.bioscan5m_dataset_builder import BUILDER_CONFIGS
from tfds_builder.bioscan5m.bioscan5m_dataset_builder import Bioscan5mConfig
from tfds_builder.bioscan5m.bioscan5m_dataset_builder import Builder
from tfds_builder.bioscan5m.bioscan5m_dataset_builder import features_dict
from tfds_builder.bioscan5m.bioscan5m_dataset_builder import synthetic_config
from tfds_builder.bioscan5m.records import BadRecordError

__all__ = ["BUILDER_CONFIGS", "BadRecordError", "Bioscan5mConfig", "Builder", "features_dict", "synthetic_config"]
