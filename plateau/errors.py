"""The user-facing error type: the CLI prints its message on one line and exits non-zero, with no traceback."""

from __future__ import annotations

__all__ = ["PlateauError"]


class PlateauError(ValueError):
    """A mistake in what the user gave (a file, an option, a node): the message names it and says what is valid."""
