"""The home's MQTT protocol, in one place (docs/API.md is the table): the strict JSON codec of
control messages (``codec.py``), every message (``messages.py``, ``runs.py``, ``weights.py``,
``hermes.py``), the topics they travel on (``topics.py``), their signatures (``signing.py``)
and the client programs use to talk to a home (``client.py``). Activations travel as tensor
envelopes (``transport/wire.py``)."""
