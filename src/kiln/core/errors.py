"""User-facing errors.

Every error a user can cause (bad variant, unknown package, image too big) is raised as
`KilnError` with a message naming the culprit and, where we know one, a hint. The CLI turns
it into one line on stderr and a non-zero exit; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import NoReturn


class KilnError(Exception):
    """An error the user can fix; `hint` says how when we know."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


def die(message: str, hint: str | None = None) -> NoReturn:
    """Stop with a user error (mkosi's idiom)."""
    raise KilnError(message, hint)
