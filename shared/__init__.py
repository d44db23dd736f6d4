"""Helix's shared package: configuration, the shared-memory metrics table, logging and `inspect`."""
