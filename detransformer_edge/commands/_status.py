"""One-line loading status for the model commands (``detransformer_edge.progress``: tqdm rewrites
the line in place on a terminal; elsewhere each message is a log line)."""

from __future__ import annotations

from typing import TextIO


class StatusLine:
    """Callable progress sink for ``load_model(progress=...)``: each message replaces the last."""

    def __init__(self, stream: TextIO | None = None, quiet: bool = False) -> None:
        from detransformer_edge.progress import progress

        self.bar = progress("", stream=stream, quiet=quiet, bar_format="{desc}", log_every_s=2.0)
        self._first = True

    def __call__(self, message: str) -> None:
        self.bar.set_description_str(message, refresh=self._first)  # the first at once, then
        self._first = False
        self.bar.update(0)  # as often as tqdm's interval allows; done() shows the last

    def done(self) -> None:
        """End the status line: keep its last message."""
        self.bar.refresh()
        self.bar.close()
