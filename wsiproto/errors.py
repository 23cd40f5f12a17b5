"""The one exception type that the command line turns into a one-line message and exit code 2."""

from __future__ import annotations


class WsiprotoError(Exception):
    """A user-facing error: what went wrong, with which file, and what to do about it.

    ``str(err)`` is a single line such as
    ``slide.svs: not a readable slide (zero-byte file); re-copy the file from its source``.
    The command line prints it as is and exits with code 2; ``--debug`` adds the traceback.
    """

    def __init__(self, message: str, *, path: object | None = None, hint: str | None = None):
        self.path = None if path is None else str(path)
        self.hint = hint
        self.detail = message
        text = message if self.path is None else f"{self.path}: {message}"
        if hint:
            text = f"{text}; {hint}"
        super().__init__(" ".join(text.split()))
