"""A one-round ServerApp that drives real agents over Flower's deployment engine (test only)."""
