"""sdrt.runtime."""
