"""Rhasspy Hermes text to speech: ``hermes/tts/say``, how the home speaks its answer to a question
its intent model does not know (``answer_questions``; docs/API.md, "Answers"). The fields are
Rhasspy's (``rhasspyhermes/tts.py``, which reads every message here in the tests)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from detransformer_edge.protocol.codec import opt_str, req_str
from detransformer_edge.protocol.hermes import NluQuery, _HermesMessage, _opt_str_or_none

TOPIC_TTS_SAY = "hermes/tts/say"


@dataclass(frozen=True)
class TtsSay(_HermesMessage):
    """`hermes/tts/say`: text for the site's speech synthesiser (the home's spoken answer to a
    question its intent model does not know). ``id`` comes back in Rhasspy's `hermes/tts/sayFinished`."""

    SCHEMA: ClassVar[str] = "hermes/tts/say"
    text: str
    site_id: str = "default"
    lang: str | None = None
    id: str | None = None
    session_id: str | None = None

    topic: ClassVar[str] = TOPIC_TTS_SAY

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "siteId": self.site_id, "lang": self.lang, "id": self.id,
                "sessionId": self.session_id}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        s = cls.SCHEMA
        return cls(req_str(d, "text", s, allow_empty=True), opt_str(d, "siteId", s, "default") or "default",
                   _opt_str_or_none(d, "lang", s), _opt_str_or_none(d, "id", s), _opt_str_or_none(d, "sessionId", s))


def say(query: NluQuery, text: str, say_id: str) -> TtsSay:
    """Speak ``text`` at the query's site, in its session and language."""
    return TtsSay(text, query.site_id, query.lang or None, say_id, query.session_id or None)
