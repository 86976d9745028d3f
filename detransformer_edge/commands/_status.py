"""One-line loading status on stderr for the model commands (overwritten in place on a TTY)."""

from __future__ import annotations

import sys
from typing import TextIO


class StatusLine:
    """Callable progress sink for ``load_model(progress=...)``.

    On a terminal each message replaces the previous one on the same line; elsewhere (pipes,
    CI logs) only the first and last messages are written so logs stay short.
    """

    def __init__(self, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = ""
        self._written = 0

    def __call__(self, message: str) -> None:
        if self.quiet:
            return
        self._last = message
        if self.tty:
            self.stream.write("\r" + message + "\x1b[K")
            self.stream.flush()
        elif self._written == 0:
            self.stream.write(message + "\n")
            self._written += 1

    def done(self) -> None:
        """End the status line: keep its last message on its own line."""
        if self.quiet or not self._last:
            return
        if self.tty:
            self.stream.write("\n")
        elif self._written < 2:
            self.stream.write(self._last + "\n")
        self._written = 2
        self.stream.flush()
