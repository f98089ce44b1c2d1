"""What callers of the model need without importing it (msgspec costs seconds at boot)."""

from __future__ import annotations


class InvalidSettings(ValueError):
    """A settings tree the model rejects; `path` is the dotted key of the bad value."""

    def __init__(self, detail: str, path: str) -> None:
        super().__init__(f"{path}: {detail}" if path else detail)
        self.detail = detail
        self.path = path

