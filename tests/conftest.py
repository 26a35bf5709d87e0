"""Shared pytest fixtures for sdrt."""
