"""Errors about bad input, in the command line's one style: `<what> (<file>): <fix>`.

`InputError` is a ValueError (callers that catch ValueError keep working); the CLI prints it as
`memagent-jax <command>: error: <what> (<file>): <fix>` and exits with status 2.
"""

from __future__ import annotations

import os


class InputError(ValueError):
    """A bad input: what is wrong, the file it is about (if any) and how to fix it."""

    def __init__(self, what: str, file: str | os.PathLike[str] | None = None,
                 fix: str | None = None) -> None:
        self.what, self.file, self.fix = what, None if file is None else os.fspath(file), fix
        super().__init__(self._text())

    def _text(self) -> str:
        text = self.what
        if self.file:
            text += f" ({self.file})"
        if self.fix:
            text += f": {self.fix}"
        return text

    def __str__(self) -> str:
        return self._text()
