"""TFDS dataset builders shipped with bioscan-jax (``bioscan5m``).

Importing ``tfds_builder.bioscan5m`` registers the builder with TFDS, so that
``tfds.builder('bioscan5m')`` works from any directory.
"""
