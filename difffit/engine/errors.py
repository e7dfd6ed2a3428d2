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


# Sample i's generator is seeded from (seed, i) folded into 32 bits (engine/evaluation/sample.py sample_seed), so a
# larger seed would silently draw a smaller one's images: every command takes seeds in this range only.
MAX_SEED = 2**32 - 1


def require_at_most(option: str, value: int, high: int, why: str = "") -> None:
    """The one rule for bounded counts and sizes: refused above `high`, in one sentence saying why."""
    if value > high:
        raise DiffFitError(f"{option} must be {high:,} or less (got {value:,}){f'; {why}' if why else ''}.")


def require_seed(option: str, value: int) -> None:
    """A seed the generators take as it is: 0 to MAX_SEED (never wrapped into another seed)."""
    require_at_least(option, value, 0)
    require_at_most(option, value, MAX_SEED, "a larger seed would repeat a smaller one's images")
