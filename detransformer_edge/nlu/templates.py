"""Phrasings of smart-home commands and of out-of-domain utterances.

A template is text with ``{slot}`` placeholders. Templates, not examples, are split between
train / validation / test (``dataset.py``), so test phrasings are never seen in training.
"""

from __future__ import annotations

TEMPLATES: dict[str, tuple[str, ...]] = {
    "TurnOnLight": (
        "turn on the {room} lights", "turn on the lights in the {room}", "switch on the {room} light",
        "lights on in the {room}", "can you turn the {room} lights on", "please switch the light on in the {room}",
        "turn the lights on", "light up the {room}", "i need some light in the {room}", "{room} lights on",
        "could you put the lights on in the {room} please", "switch the {room} lamp on", "turn on the light",
        "it's too dark in the {room}", "put on the {room} light", "lights on please",
    ),
    "TurnOffLight": (
        "turn off the {room} lights", "turn off the lights in the {room}", "switch off the {room} light",
        "lights off in the {room}", "can you turn the {room} lights off", "please switch the light off in the {room}",
        "turn the lights off", "kill the lights in the {room}", "{room} lights off", "shut off the {room} lamp",
        "could you put the lights out in the {room} please", "switch the {room} lamp off", "turn off the light",
        "no more light in the {room}", "darken the {room}", "lights off please",
    ),
    "SetBrightness": (
        "set the {room} lights to {level}", "dim the {room} lights to {level}", "brightness {level} in the {room}",
        "set brightness to {level}", "make the {room} light {level}", "change the {room} brightness to {level}",
        "put the lights at {level} in the {room}", "i want the {room} lights at {level}",
        "set the light level in the {room} to {level}", "adjust the {room} lamp to {level}",
        "dim the lights to {level}", "can you set the {room} lights to {level} brightness",
        "brighten the {room} to {level}", "lights to {level}", "turn the {room} lights down to {level}",
    ),
    "SetTemperature": (
        "set the {room} temperature to {level}", "set the thermostat to {level}", "heat the {room} to {level}",
        "make it {level} in the {room}", "change the temperature to {level}", "i want it {level} in the {room}",
        "set the heating in the {room} to {level}", "warm up the {room} to {level}",
        "can you set the {room} thermostat to {level}", "cool the {room} down to {level}",
        "put the heat at {level}", "turn the temperature up to {level} in the {room}",
        "adjust the {room} heating to {level}", "thermostat {level}", "please set the {room} to {level}",
    ),
    "GetTemperature": (
        "what's the temperature in the {room}", "how warm is it in the {room}", "how cold is the {room}",
        "what is the temperature", "tell me the {room} temperature", "is it warm in the {room}",
        "how hot is it in the {room}", "what temperature is the {room} at", "current temperature in the {room}",
        "how many degrees is it in the {room}", "check the temperature in the {room}", "what's it at inside",
        "what is the thermostat reading", "is the {room} cold",
    ),
    "SetTimer": (
        "set a timer for {duration}", "start a {duration} timer", "timer for {duration}",
        "remind me in {duration}", "count down {duration}", "set the timer to {duration}",
        "can you set a timer for {duration}", "wake me in {duration}", "i need a timer for {duration}",
        "put a timer on for {duration}", "start counting down from {duration}", "alert me in {duration}",
        "please time {duration}", "{duration} timer please", "let me know when {duration} have passed",
    ),
    "CancelTimer": (
        "cancel the timer", "stop the timer", "cancel my timer", "delete the timer", "turn off the timer",
        "never mind the timer", "remove the timer", "abort the countdown", "kill the timer",
        "i don't need the timer anymore", "cancel the countdown", "stop counting down", "clear the timer",
    ),
    "GetTime": (
        "what time is it", "what's the time", "tell me the time", "do you know what time it is",
        "what time is it now", "current time please", "have you got the time", "time please",
        "can you tell me the time", "what's the time right now", "what is the current time", "how late is it",
        "give me the time",
    ),
    "GetWeather": (
        "what's the weather like", "what is the weather today", "will it rain today", "how's the weather",
        "weather forecast please", "is it going to be sunny", "what's the forecast", "do i need an umbrella",
        "tell me the weather", "is it going to snow tomorrow", "what's the weather outside",
        "how is the weather looking this afternoon", "will it be windy today", "weather please",
    ),
    "PlayMusic": (
        "play some music", "play music in the {room}", "put on some music", "start the music",
        "play some music in the {room}", "i want to listen to music", "music please", "can you play something",
        "play a song in the {room}", "turn on the music in the {room}", "resume the music",
        "play my playlist", "start playing music in the {room}", "put some tunes on",
    ),
    "StopMusic": (
        "stop the music", "stop the music in the {room}", "pause the music", "turn off the music",
        "music off", "stop playing", "silence the music in the {room}", "pause playback",
        "turn the music off in the {room}", "enough music", "quit playing music", "stop the song",
        "kill the music in the {room}",
    ),
    "SetVolume": (
        "set the volume to {level}", "volume {level}", "turn the volume to {level}",
        "set the {room} volume to {level}", "change the volume to {level} in the {room}",
        "make it louder to {level}", "turn it down to {level}", "put the volume at {level}",
        "can you set the sound to {level}", "adjust the volume in the {room} to {level}",
        "lower the volume to {level}", "raise the volume to {level}", "volume to {level} please",
        "set the speaker in the {room} to {level}",
    ),
    "LockDoor": (
        "lock the {room} door", "lock the door", "lock up the {room}", "please lock the {room} door",
        "make sure the {room} door is locked", "secure the {room} door", "lock all the doors",
        "can you lock the {room}", "is the {room} door locked? lock it", "bolt the {room} door",
        "lock the {room} entrance", "lock up", "engage the {room} lock",
    ),
    "UnlockDoor": (
        "unlock the {room} door", "unlock the door", "open the {room} lock", "please unlock the {room} door",
        "let me in the {room} door", "unbolt the {room} door", "unlock all the doors",
        "can you unlock the {room}", "release the {room} lock", "unlock the {room} entrance",
        "disengage the {room} lock", "open the lock", "unlock the {room}",
    ),
    "AddToShoppingList": (
        "add {item} to the shopping list", "put {item} on my shopping list", "add {item} to my list",
        "we need {item}", "remember to buy {item}", "i need to buy {item}", "shopping list add {item}",
        "can you add {item} to the shopping list", "put {item} on the list", "we're out of {item}",
        "add {item} please", "note down {item} for shopping", "don't let me forget to buy {item}",
        "put {item} on the grocery list",
    ),
}

# Requests a home assistant might hear that none of the intents serve.
OUT_OF_DOMAIN: tuple[str, ...] = (
    "tell me a joke", "who wrote {thing}", "what is the capital of {country}", "how tall is mount everest",
    "what's {a} plus {b}", "how do you spell {word}", "translate {word} into spanish", "who won the game last night",
    "what's the meaning of life", "call mom", "send a message to {name}", "book a flight to {country}",
    "order a pizza", "what's on my calendar tomorrow", "how are you today", "what's your name",
    "good morning", "thank you", "who is the president of {country}", "how far is the moon",
    "what does {word} mean", "read me the news", "how do i make pancakes", "what's the population of {country}",
    "set up a meeting with {name}", "email {name} about dinner", "how old is {name}", "do you like cats",
    "i'm bored", "what's the score of the match", "how many ounces in a cup", "recommend a good movie",
    "where is the nearest pharmacy", "find a recipe for {thing}", "navigate to the airport",
    "how do i fix a leaky faucet", "what is photosynthesis", "who painted the mona lisa",
    "is {name} coming for dinner", "tell me about {country}", "what's trending today", "open the garage app",
)

ROOMS: tuple[str, ...] = (
    "kitchen", "living room", "bedroom", "bathroom", "office", "garage", "hallway", "dining room",
    "kids room", "basement", "guest room", "study", "attic", "laundry room", "nursery", "master bedroom",
    "den", "porch", "playroom", "hall",
)
DOORS: tuple[str, ...] = ("front", "back", "garage", "side", "patio", "basement", "kitchen", "cellar")
ITEMS: tuple[str, ...] = (
    "milk", "eggs", "bread", "butter", "apples", "bananas", "coffee", "toilet paper", "olive oil",
    "chicken breasts", "orange juice", "rice", "pasta", "tomatoes", "cheese", "dish soap", "yogurt",
    "peanut butter", "paper towels", "onions", "garlic", "cereal", "dog food", "batteries", "ice cream",
    "sparkling water", "carrots", "flour", "sugar", "tea bags",
)
OOD_FILLERS: dict[str, tuple[str, ...]] = {
    "thing": ("hamlet", "the odyssey", "lasagna", "banana bread", "war and peace", "curry"),
    "country": ("france", "japan", "brazil", "kenya", "canada", "italy", "india", "norway"),
    "word": ("serendipity", "necessary", "ubiquitous", "rhythm", "hello", "library"),
    "name": ("john", "sarah", "grandma", "alex", "maria", "dad"),
    "a": ("two", "seven", "12", "40"), "b": ("three", "nine", "8", "15"),
}
