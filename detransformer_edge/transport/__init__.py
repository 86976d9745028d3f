"""Transport layer: tensor wire envelope, the ``Transport`` seam, memory and MQTT endpoints.

``MqttTransport`` lives in :mod:`detransformer_edge.transport.mqtt` and is not imported here,
so pure code (planner, tests on the memory hub) never imports aiomqtt.
"""

from detransformer_edge.transport.base import (
    Mailbox,
    MailboxLimits,
    MessageKey,
    Transport,
    TransportStats,
)
from detransformer_edge.transport.errors import (
    CollectiveError,
    RequestCancelled,
    TransportClosed,
    TransportError,
    TransportOverflow,
    TransportTimeout,
    WireError,
)
from detransformer_edge.transport.memory import MemoryHub, MemoryTransport
from detransformer_edge.transport.wire import (
    TensorMessage,
    decode_tensor,
    encode_tensor,
)

__all__ = [
    "CollectiveError",
    "Mailbox",
    "MailboxLimits",
    "MemoryHub",
    "MemoryTransport",
    "MessageKey",
    "RequestCancelled",
    "TensorMessage",
    "Transport",
    "TransportClosed",
    "TransportError",
    "TransportOverflow",
    "TransportStats",
    "TransportTimeout",
    "WireError",
    "decode_tensor",
    "encode_tensor",
]
