"""The one progress helper: tqdm, on a terminal or in a log.

On a terminal it is tqdm's own bar on stderr. Anywhere else — ``docker compose logs``, systemd's
journal, CI — the same bar becomes a log line (logger ``detransformer_edge.progress``, WARNING,
the agent's default level) at most every ``log_every_s`` seconds and once at the end, so a device
streaming weights or loading a model for minutes shows how far it is.

    with progress("dev1 weights smollm2-135m", total=len(units), unit="shard") as bar:
        ...
        bar.update(1)
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

from tqdm import tqdm

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0  # a log line per bar at most this often (and at the end)


class _LogLines:
    """A file for tqdm that turns each refreshed bar into one log record."""

    def __init__(self, logger: logging.Logger, level: int) -> None:
        self.logger, self.level = logger, level
        self._last = ""

    def write(self, text: str) -> None:
        for part in text.replace("\r", "\n").split("\n"):
            line = part.strip()
            if line and line != self._last:
                self._last = line
                self.logger.log(self.level, "%s", line)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def progress(desc: str, total: int | float | None = None, *, unit: str = "it", initial: int = 0,
             stream: TextIO | None = None, quiet: bool = False, log_every_s: float = LOG_EVERY_S,
             level: int = logging.WARNING, **kw: Any) -> tqdm:
    """A tqdm bar: on ``stream`` (default stderr) when it is a terminal, else as log lines."""
    stream = stream if stream is not None else sys.stderr
    if bool(getattr(stream, "isatty", lambda: False)()):
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=stream, disable=quiet,
                    dynamic_ncols=True, **kw)
    kw.pop("leave", None)  # a log keeps every line: the final state is the one worth reading
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=_LogLines(log, level), disable=quiet,
                mininterval=log_every_s, maxinterval=max(log_every_s, 10.0), ncols=100, ascii=True, **kw)
