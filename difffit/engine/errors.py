"""The one exception type the CLI turns into a one-sentence error (no traceback unless --debug)."""

from __future__ import annotations


class DiffFitError(Exception):
    """A problem with the user's input or environment: what is wrong, and optionally what to do."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


def require_at_least(option: str, value: int, low: int) -> None:
    """The one rule for counts and seeds, so every command words it the same way."""
    if value < low:
        raise DiffFitError(f"{option} must be {low} or more (got {value}).")
