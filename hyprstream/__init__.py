"""Hyprstream: federated edge/fog learning with Arrow-native device stores and a versioned core."""

__version__ = "0.1.0"

__all__ = ["__version__"]
