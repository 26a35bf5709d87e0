"""Errors sdrt raises for what a caller passed in."""

from __future__ import annotations


class InputError(ValueError):
    """An argument or input file the caller can fix: the message names the input, what was wrong
    with it and what is accepted."""
