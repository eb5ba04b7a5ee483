"""The one error type that promcse raises for bad user input.

The CLI turns it into a one-paragraph message and exit status 2; library users can catch it.
"""

from __future__ import annotations

from pathlib import Path


class PromcseError(Exception):
    """Bad input, config or checkpoint, with the place it was found.

    Args:
        message: What is wrong, in words a user can act on.
        path: The file concerned, if any.
        line: 1-based line number in that file, if known.
        column: Column name or 1-based field number, if known.
        key: Config key or JSON key concerned, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        column: str | int | None = None,
        key: str | None = None,
    ) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        self.line = line
        self.column = column
        self.key = key
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where: list[str] = []
        if self.path is not None:
            where.append(self.path)
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.column is not None:
            where.append(f"column {self.column}")
        if self.key is not None:
            where.append(f"key '{self.key}'")
        prefix = ", ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message
