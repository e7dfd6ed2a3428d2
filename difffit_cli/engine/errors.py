"""The one exception type the CLI turns into a one-sentence error (no traceback unless --debug)."""

from __future__ import annotations


class DiffFitError(Exception):
    """A problem with the user's input or environment: what is wrong, and optionally what to do."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
