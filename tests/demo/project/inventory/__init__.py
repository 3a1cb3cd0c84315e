"""A small stock-keeping service."""
