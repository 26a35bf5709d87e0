"""sdrt.export."""
