"""The deterministic part of the lock rule: text tests that decide whether an utterance may be a
lock or unlock request at all, whatever the model's confidence (docs/ACCURACY.md)."""

from __future__ import annotations

import re

# Words that name a door or a lock. A lock intent without one of them is not recognised.
DOOR_OR_LOCK_WORDS: frozenset[str] = frozenset({
    "door", "doors", "lock", "locks", "deadbolt", "deadbolts", "doorlock", "doorlocks",
})
_WORD = re.compile(r"[a-z]+")


# First words of a question rather than a command ("can"/"could"/"would"/"will" start polite
# commands, so they are not here).
QUESTION_WORDS: frozenset[str] = frozenset({
    "is", "are", "was", "were", "did", "does", "has", "who", "whom", "whose", "when", "why", "how", "what",
    "which", "where", "isn't", "aren't", "didn't", "hasn't",
})
_LEAD_IN = frozenset({"hey", "okay", "ok", "um", "so", "right", "and", "but", "well", "oh", "there"})


def names_door_or_lock(text: str) -> bool:
    """True when ``text`` has a word naming a door or a lock ("front door", "the lock", "lock up";
    "unlock" alone is a verb, not a name: "unlock the car" is False)."""
    return any(w in DOOR_OR_LOCK_WORDS for w in _WORD.findall(text.lower()))


def is_question(text: str) -> bool:
    """True when ``text`` starts (after "hey", "okay", ...) with a question word: "is the back door
    locked", "who unlocked the front door"."""
    words = re.findall(r"[a-z']+", text.lower())
    while words and words[0] in _LEAD_IN:
        words = words[1:]
    return bool(words) and words[0] in QUESTION_WORDS


# An unlock request says how: an un- verb, "let ... in", or a releasing verb with a lock noun
# ("open the lock", "release the deadbolt", "take the lock off"). Every UnlockDoor template has
# one (dataset._check_vocabulary); "open the garage door" (a cover) and "the front door needs to
# be locked" have none.
_UNLOCK_VERB = re.compile(r"\bun(?:lock|bolt|latch)\w*|\blet (?:me|us|them|him|her|\w+) in\b")
_RELEASE_VERB = re.compile(r"\b(?:open|release|disengage|undo|deactivate|off)\b")
_LOCK_NOUN = re.compile(r"\b(?:lock|locks|deadbolt|deadbolts|doorlock|doorlocks)\b")


def asks_to_unlock(text: str) -> bool:
    """True when ``text`` has an unlocking word: "unlock", "unbolt", "let me in", or "open",
    "release", "disengage", "undo", "deactivate", "off" together with "lock"/"deadbolt"."""
    t = text.lower()
    return bool(_UNLOCK_VERB.search(t) or (_RELEASE_VERB.search(t) and _LOCK_NOUN.search(t)))


def says_unlock_verb(text: str) -> bool:
    """True when ``text`` has an un- verb ("unlock", "unbolt", "unlatch") or "let ... in": words
    that never ask for a lock to close."""
    return bool(_UNLOCK_VERB.search(text.lower()))


def lock_allowed(text: str, intent: str = "LockDoor") -> bool:
    """The deterministic part of the lock rule: a door or lock is named, it is not a question,
    for UnlockDoor an unlocking word is said, and LockDoor is never the answer to an utterance
    with an un- verb ("unbolt the side door" is not a lock request, whatever the model says; it is
    rejected, never turned into an unlock)."""
    if not names_door_or_lock(text) or is_question(text):
        return False
    if intent == "UnlockDoor":
        return asks_to_unlock(text)
    return not says_unlock_verb(text)
