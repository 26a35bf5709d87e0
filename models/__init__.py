"""sdrt.models."""
