"""Adapters for other data systems (optional extras); nothing here is imported by the CLI."""
