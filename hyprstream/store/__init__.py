"""Arrow-native storage: device data tables and model weights as layer tables.

Public surface: :class:`Store` (durable, bounded, queryable tables), :class:`Retention`,
:class:`StoreConfig`, :func:`load_key` / :func:`generate_key` (encryption at rest), and the layer
table helpers (numpy and torch views).
"""

from hyprstream.store.config import StoreConfig
from hyprstream.store.crypto import generate_key, load_key
from hyprstream.store.layer_table import LAYER_SCHEMA, from_tensors, layer_of, to_arrays, to_table, to_tensors
from hyprstream.store.retention import Retention
from hyprstream.store.store import Compaction, Store, TableInfo
from hyprstream.store.vector import Metric

__all__ = [
    "LAYER_SCHEMA",
    "Compaction",
    "Metric",
    "Retention",
    "Store",
    "StoreConfig",
    "TableInfo",
    "from_tensors",
    "generate_key",
    "layer_of",
    "load_key",
    "to_arrays",
    "to_table",
    "to_tensors",
]
