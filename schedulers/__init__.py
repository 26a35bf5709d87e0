"""sdrt.schedulers."""
