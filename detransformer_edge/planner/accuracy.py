"""What each task may give up in accuracy for speed: the wire dtypes its activations may cross
the network in, as measured (docs/ACCURACY.md, "Wire precision": ``training/precision.py``).

Measured on the shipped decoupled MiniLM: with float16 or int8 (per-row scales) at every sync
point and the output, no intent or slot decision of the test utterances changed, and the
sentence-embedding cosine to float32 stayed >= 0.9999 (decoupled) and >= 0.9994 (original);
the decoupled decoders' perplexity changed by < 0.001 % (float16) and <= 0.01 % (int8). Every
dtype is allowed for these tasks; the planner picks the cheapest its links need.
"""

from __future__ import annotations

from detransformer_edge.transport.wire import WireDtype

ALLOWED_WIRE_DTYPES: dict[str, tuple[WireDtype, ...]] = {
    "intent": ("float32", "float16", "int8"),
    "embed": ("float32", "float16", "int8"),
    "generate": ("float32", "float16", "int8"),
}
