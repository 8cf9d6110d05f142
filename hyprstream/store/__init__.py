"""Arrow-native storage: device data tables and model weights as layer tables."""

from hyprstream.store.layer_table import LAYER_SCHEMA, layer_of, to_arrays, to_table

__all__ = ["LAYER_SCHEMA", "layer_of", "to_arrays", "to_table"]
