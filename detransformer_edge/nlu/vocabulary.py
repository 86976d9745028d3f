"""The voice assistant's vocabulary: the intents the model recognises, their slots, value types.

One definition for the model (``nlu/``), the Hermes protocol (``protocol/hermes.py``) and
the service (``service/intents.py``), so they cannot disagree. This module imports nothing from
the rest of the package.

Intents (all slots optional: "turn on the light" has no room):

==================  =====================  =================================================
intent              slots                  meaning
==================  =====================  =================================================
TurnOnLight         room                   lights on (in a room)
TurnOffLight        room                   lights off (in a room)
SetBrightness       room, level            light brightness, level in percent
SetTemperature      room, level            thermostat set point, level in degrees
GetTemperature      room                   current temperature (of a room)
SetTimer            duration               start a countdown
CancelTimer         (none)                 stop a countdown
GetTime             (none)                 the current time of day
GetWeather          (none)                 weather or forecast
PlayMusic           room, media            start or resume music, optionally what to play
StopMusic           room                   stop or pause music
SetVolume           room, level            speaker volume, level in percent
LockDoor            room                   lock a door; ``room`` names the door ("front")
UnlockDoor          room                   unlock a door; ``room`` names the door ("front")
AddToShoppingList   item                   put something on the shopping list
==================  =====================  =================================================

Slot values (``nlu/values.py`` normalises the heard text into them):

* ``room`` -- text, kind ``Custom``: the room or, for the door intents, the door as named
  ("living room", "front", "garage").
* ``level`` -- a number, kind ``Percentage`` when a percent word or sign was heard, else
  ``Number``: 40, 24.5 ("twenty four point five"), 50 ("half").
* ``duration`` -- total seconds as a number, kind ``Duration``: "2 hours and 30 minutes" -> 9000,
  "half a minute" -> 30. One slot per spoken duration, however many units it has.
* ``item`` -- text, kind ``Custom``: whole words, without a leading "some"/"a"/"the"/"more"
  ("peanut butter", "avocados", "kitchen roll").
* ``media`` -- text, kind ``Custom``: what to play as heard, an artist, genre, album or playlist
  ("jazz", "the beatles", "my workout playlist").

A recognised result carries only the slots its intent takes (``INTENT_SLOTS``): the decoder
drops any other the tagger proposed. ``LockDoor`` and ``UnlockDoor`` (``LOCK_INTENTS``) are
recognised only under a stricter threshold and when the utterance names a door or a lock
(``nlu/decision.py``).
"""

from __future__ import annotations

from collections.abc import Mapping

# slot kinds as Hermes spells them in `value.kind`
KIND_CUSTOM = "Custom"
KIND_NUMBER = "Number"
KIND_PERCENTAGE = "Percentage"
KIND_DURATION = "Duration"  # our value: total seconds (a number)

INTENTS: tuple[str, ...] = (
    "TurnOnLight",
    "TurnOffLight",
    "SetBrightness",
    "SetTemperature",
    "GetTemperature",
    "SetTimer",
    "CancelTimer",
    "GetTime",
    "GetWeather",
    "PlayMusic",
    "StopMusic",
    "SetVolume",
    "LockDoor",
    "UnlockDoor",
    "AddToShoppingList",
)

# slot name -> the value kinds it may carry
SLOTS: Mapping[str, tuple[str, ...]] = {
    "room": (KIND_CUSTOM,),  # "kitchen", "living room"; also names a door for Lock/UnlockDoor
    "level": (KIND_NUMBER, KIND_PERCENTAGE),  # brightness/volume percent, temperature degrees
    "duration": (KIND_DURATION,),
    "item": (KIND_CUSTOM,),  # shopping list item
    "media": (KIND_CUSTOM,),  # what PlayMusic should play: artist, genre, album, playlist
}

# intent -> slots it may carry (all optional: "turn on the light" has no room)
INTENT_SLOTS: Mapping[str, tuple[str, ...]] = {
    "TurnOnLight": ("room",),
    "TurnOffLight": ("room",),
    "SetBrightness": ("room", "level"),
    "SetTemperature": ("room", "level"),
    "GetTemperature": ("room",),
    "SetTimer": ("duration",),
    "CancelTimer": (),
    "GetTime": (),
    "GetWeather": (),
    "PlayMusic": ("room", "media"),
    "StopMusic": ("room",),
    "SetVolume": ("room", "level"),
    "LockDoor": ("room",),
    "UnlockDoor": ("room",),
    "AddToShoppingList": ("item",),
}

# Intents that act on a door lock: a stricter threshold, and the utterance must name a door or lock.
LOCK_INTENTS: tuple[str, ...] = ("LockDoor", "UnlockDoor")
