"""Typed errors of the transport layer.

They are separate classes (not one ``TransportError`` with a code) because callers react to
them differently: a ``TransportTimeout`` may be retried or re-planned without the slow
device, a ``RequestCancelled`` must stop the request's work at once, and a ``WireError``
means a peer sent garbage (a bug or a hostile client) and must never be retried blindly.
"""

from __future__ import annotations

from detransformer_edge.errors import DetransformerError


class WireError(DetransformerError, ValueError):
    """Bytes that are not a valid tensor or control envelope, or a tensor that cannot be encoded."""


class TransportError(DetransformerError):
    """Base class of failures while moving messages between devices."""


class TransportTimeout(TransportError, TimeoutError):
    """A message did not arrive in time; ``src`` is the device it was expected from."""

    def __init__(self, message: str, src: str | None = None) -> None:
        super().__init__(message)
        self.src = src


class RequestCancelled(TransportError):
    """The request was cancelled (or finished) while a receive for it was pending."""


class TransportOverflow(TransportError):
    """A message was dropped because the receive buffer was full; waiting for it is pointless."""


class TransportClosed(TransportError):
    """The transport was used before ``start()`` or after ``close()``."""


class CollectiveError(DetransformerError, ValueError):
    """A collective was called with an inconsistent group, root, widths or tensor shapes."""
