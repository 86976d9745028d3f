"""The seam between the agent and its plug-ins (``integrations/``: Rhasspy Hermes, Home Assistant
discovery and Wyoming, the dashboard).

The service never imports a plug-in: the command that starts an agent builds the plug-ins the
agent's config asks for (``integrations.plugins_for``) and hands them to ``HomeAgent``, which
starts them once its own session, cluster shell and model host are up, and stops them first.
A plug-in sees the agent through ``Home``: the device's MQTT session (subscribe, publish, a
callback after every reconnect), who leads, and the home's answers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from detransformer_edge.cluster.agent import ClusterAgent
    from detransformer_edge.cluster.config import AgentConfig
    from detransformer_edge.service.intents import IntentResult
    from detransformer_edge.transport.session import MqttSession


class Home(Protocol):
    """What an agent offers its plug-ins."""

    id: str
    config: AgentConfig
    cluster: ClusterAgent  # topics, profile, is_leader / holds_lease, membership, lease
    session: MqttSession  # subscribe(filter, handler), publish(...), on_connect(callback)

    def spawn(self, coro: Awaitable[Any], name: str) -> Any: ...

    def snapshot(self) -> dict[str, Any]: ...

    def add_listener(self, listener: Callable[[str, dict[str, Any]], None]) -> None: ...

    async def recognize(self, text: str, client_id: str | None = None,
                        allowed: frozenset[str] | None = None) -> IntentResult:
        """The intent of ``text``; ``allowed``: only these intents may be recognised (masked before
        the decision). Forwarded to the leader when this device does not lead."""
        ...

    def answer_failed(self, client_id: str, error: str) -> None:
        """A front-end could not deliver the answer to ``client_id``'s request: the request log
        shows that request as failed."""
        ...

    async def generate(self, prompt: str, max_new_tokens: int = 32,
                       on_text: Callable[[str], Awaitable[None]] | None = None) -> str: ...

    async def answer(self, question: str, client_id: str | None = None) -> str:
        """A short spoken answer from the home's language model (``answer_questions``): one
        sentence within the configured bounds; empty when the model said nothing. Forwarded to the
        leader when this device does not lead; ServiceError when the home cannot answer."""
        ...


class Plugin(Protocol):
    name: str

    async def start(self, home: Home) -> None: ...

    async def stop(self) -> None: ...
