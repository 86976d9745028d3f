"""Answers in the voice path: a question the intent model rejects as out of its domain ("who wrote
the odyssey") is answered by the home's language model, in one short sentence fit to be spoken.

The generation is bounded three ways (``AnswerConfig``): it ends at its first full sentence, at
``max_tokens`` and after ``timeout_s``; what was said by then is the answer. ``spoken`` turns the
model's text into something a speech synthesiser reads well: no markdown, no lists, whole
sentences only (a sentence cut by a bound is dropped unless it is the only one, which then ends
with an ellipsis).
"""

from __future__ import annotations

import re

from detransformer_edge.nlu.locks import DOOR_OR_LOCK_WORDS, is_question
from detransformer_edge.nlu.templates import ROOMS

# the chat template's system prompt: a voice assistant's register, short; it cannot act
SYSTEM_PROMPT = ("You are the voice assistant of a home. Answer the question in one short sentence of plain "
                 "spoken English, without lists or formatting. You cannot control devices.")

# requests for information that do not start with a question word
_ASKING = re.compile(r"^\W*(?:(?:hey|okay|ok|so|well)\W+)*(?:tell me|explain|describe|define|do you know|"
                     r"can you tell me|could you tell me|i wonder|i want to know)\b", re.IGNORECASE)


# Things of the home whose state only the home knows: a question about them ("is the oven on", "is
# the back door locked") is never the language model's to answer, it would guess.
HOME_WORDS: frozenset[str] = DOOR_OR_LOCK_WORDS | frozenset({
    "locked", "unlocked", "gate", "gates", "window", "windows", "blind", "blinds", "curtain", "curtains",
    "shutter", "shutters", "light", "lights", "lamp", "lamps", "bulb", "bulbs", "switch", "plug", "socket",
    "heating", "heater", "thermostat", "boiler", "radiator", "aircon", "conditioner", "fan", "oven", "stove",
    "hob", "dishwasher", "washer", "dryer", "fridge", "freezer", "vacuum", "hoover", "robot", "alarm",
    "camera", "cameras", "sensor", "sensors", "doorbell", "tv", "television", "speaker", "speakers", "kettle",
    "sprinkler", "sprinklers", "timer", "timers", "music", "volume", "house", "home", "temperature",
})
# ... nor about here and now, which a language model can only guess: the weather, the time, the news
LIVE_WORDS: frozenset[str] = frozenset({
    "weather", "rain", "raining", "rainy", "snow", "snowing", "sunny", "forecast", "wind", "windy", "umbrella",
    "outside", "time", "clock", "date", "today", "tonight", "tomorrow", "yesterday", "now", "currently",
    "latest", "news", "score", "traffic", "open", "closed",
})
_ROOM_WORDS = frozenset(w for room in ROOMS for w in room.split() if len(w) > 3)
_WORDS = re.compile(r"[a-z]+")


def asks_a_question(text: str) -> bool:
    """Is ``text`` a question for the language model? It must be a question (or a request to be
    told something), not a command: a command the home cannot carry out ("vacuum the stairs")
    must never get a reply that sounds as if it had been done. And it must not be about the home
    itself (``HOME_WORDS``, a room: only the home knows whether the back door is locked) or about
    here and now (``LIVE_WORDS``: the model would guess the weather or the time)."""
    words = set(_WORDS.findall(text.lower()))
    if words & (HOME_WORDS | LIVE_WORDS | _ROOM_WORDS):
        return False
    return is_question(text) or text.rstrip().endswith("?") or bool(_ASKING.search(text))

MIN_SENTENCE_WORDS = 3  # "Yes." alone is not an answer worth stopping at
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "vs", "etc", "e.g", "i.e", "jr", "sr", "no", "approx"})
_SENTENCE_END = re.compile(r"[.!?](?=[\"')\]]*(\s|$))")
_MARKDOWN = re.compile(r"(^\s*[-*+]\s+|^\s*\d+[.)]\s+|^#+\s*|[*`#]+|(?<!\w)_+|_+(?!\w))", re.MULTILINE)


def _ends(text: str) -> list[int]:
    """Positions just after each sentence end in ``text`` (a full stop after a known abbreviation
    or a single letter, or between digits as in 3.5, is not one)."""
    out = []
    for m in _SENTENCE_END.finditer(text):
        i = m.start()
        if text[i] == ".":
            word = re.search(r"([\w.]+)$", text[:i])
            w = word.group(1).lower() if word else ""
            if w in _ABBREVIATIONS or (len(w) == 1 and w.isalpha()):
                continue
            if i + 1 < len(text) and text[i + 1].isdigit():
                continue
        out.append(m.end())
    return out


def as_written(question: str) -> str:
    """A transcript as the model reads it best: speech-to-text gives "who wrote the odyssey"; a
    small model answers "Who wrote the odyssey?" far better (capital, question mark)."""
    q = re.sub(r"\s+", " ", question).strip()
    if not q:
        return q
    q = q[0].upper() + q[1:]
    if q[-1] not in ".?!":
        q += "?" if is_question(q) or not _ASKING.search(q) else "."
    return q


def has_full_sentence(text: str) -> bool:
    """Does ``text`` (an answer so far) hold a finished sentence of a few words? The generation
    stops there: a spoken answer is one sentence."""
    ends = _ends(text)
    return bool(ends) and len(text[:ends[0]].split()) >= MIN_SENTENCE_WORDS


def spoken(text: str) -> str:
    """The model's answer as one or more whole sentences to speak (empty when it said nothing)."""
    flat = _MARKDOWN.sub("", text)
    flat = re.sub(r"\s+", " ", flat).strip()
    if not flat:
        return ""
    ends = _ends(flat)
    if ends:  # whole sentences only: a last one cut by a bound is not said
        return flat[:ends[-1]].strip()
    return flat.rstrip(",;:- ") + "…"  # cut by a bound with no sentence end: say it trails off
