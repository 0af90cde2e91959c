"""Feature names of the ``bioscan5m`` TFDS dataset, derived from the schema (their one home:
the builder and the pipelines both import them from here).

This module is light (no TFDS, no TensorFlow): the pipelines import it to know
the record layout. Every name is derived from :mod:`bioscan_jax.data.schema`:

* each metadata column becomes one feature, named like the column with ``-``
  replaced by ``_`` (TFDS feature names cannot contain ``-``): ``coord-lat`` ->
  ``coord_lat``;
* each label column (:data:`schema.LABEL_COLUMNS`: the ranks and ``dna_bin``) is
  stored twice: ``<column>`` holds the integer index into the label names (built
  over the whole CSV, ``-1`` = missing) and ``<column>_name`` the string;
* image configs add ``image`` (the JPEG bytes, never re-encoded).

Missing values: text ``''``, integers ``-1``, floats ``NaN``.
"""

from __future__ import annotations

from bioscan_jax.data import schema

IMAGE = "image"
NAME_SUFFIX = "_name"
MISSING_INDEX = schema.MISSING_INDEX


def feature_name(column: str) -> str:
    """The TFDS feature holding a metadata column (``coord-lat`` -> ``coord_lat``)."""
    return column.replace("-", "_")


def name_feature(label_column: str) -> str:
    """The text feature holding the string label of a label column (``species_name``)."""
    return f"{label_column}{NAME_SUFFIX}"


#: Integer label indices (int32, -1 = missing), one per label column.
INDEX_FEATURES: tuple[str, ...] = tuple(feature_name(c) for c in schema.LABEL_COLUMNS)
#: The string labels that go with them.
LABEL_NAME_FEATURES: tuple[str, ...] = tuple(name_feature(c) for c in schema.LABEL_COLUMNS)
#: Text features: string columns that are not labels, then the label names.
TEXT_FEATURES: tuple[str, ...] = (
    tuple(
        feature_name(c)
        for c, dtype in schema.COLUMN_DTYPES.items()
        if dtype == "string" and c not in schema.LABEL_COLUMNS
    )
    + LABEL_NAME_FEATURES
)
#: float32 features (NaN = missing).
FLOAT_FEATURES: tuple[str, ...] = tuple(
    feature_name(c) for c, dtype in schema.COLUMN_DTYPES.items() if dtype.startswith("float")
)
#: uint8 features.
UINT8_FEATURES: tuple[str, ...] = tuple(
    feature_name(c) for c, dtype in schema.COLUMN_DTYPES.items() if dtype == "uint8"
)
#: int64 features for nullable integer columns (-1 = missing).
INT64_FEATURES: tuple[str, ...] = tuple(
    feature_name(c) for c, dtype in schema.COLUMN_DTYPES.items() if dtype == "Int64"
)
#: Derived at build time over the whole metadata (not a CSV column): 1 for the first row of its
#: barcode after ``rstrip('N')`` (:func:`bioscan_jax.data.schema.first_of_barcode`), the rows
#: BarcodeBERT's evaluation data keeps; uint8.
FIRST_OF_BARCODE = schema.FIRST_OF_BARCODE
DERIVED_FEATURES: tuple[str, ...] = (FIRST_OF_BARCODE,)
#: Every non-image feature.
METADATA_FEATURES: tuple[str, ...] = (
    TEXT_FEATURES + INDEX_FEATURES + FLOAT_FEATURES + UINT8_FEATURES + INT64_FEATURES + DERIVED_FEATURES
)
#: Feature name -> metadata column it comes from (label indices and names both map to the label column).
COLUMN_OF: dict[str, str] = {
    **{feature_name(c): c for c in schema.COLUMNS},
    **{name_feature(c): c for c in schema.LABEL_COLUMNS},
}

_covered = {COLUMN_OF[f] for f in METADATA_FEATURES if f not in DERIVED_FEATURES}
assert _covered == set(schema.COLUMNS), sorted(set(schema.COLUMNS) - _covered)
del _covered
