"""What the home serves: one model per role, with the code that loads it on a device.

Roles: ``intent`` (the voice assistant's intent and slot model, an encoder), ``embed``
(sentence embeddings, an encoder) and ``generate`` (text generation, a decoder). Every device
knows the catalog; which *weights* it keeps is decided by the leader's placement.

``tiny_catalog`` serves small random models with a character tokenizer, so cluster tests and
the quick demo run without pretrained files (STYLE: a fake engine for cluster tests).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from detransformer_edge.errors import ConfigError

Role = Literal["intent", "embed", "generate"]
ROLES: tuple[Role, ...] = ("intent", "embed", "generate")


@dataclass
class LoadedServedModel:
    """A full model in memory on one device, with what turns text into ids and back."""

    model: Any  # Encoder | Decoder
    tokenizer: Any  # detransformer_edge.model.tokenizer.TextTokenizer (or the tiny one)
    intent_head: Any = None  # role "intent": turns hidden states into intents and slots
    chat_template: Any = None  # role "generate": instruct prompt formatting


@dataclass
class ServedModel:
    role: Role
    name: str  # shown to users: preset name or path
    config_factory: Callable[[], Any]  # the model config, without loading weights
    loader: Callable[[], LoadedServedModel]
    max_tokens: int = 512

    def config(self) -> Any:
        return self.config_factory()


@dataclass
class Catalog:
    models: Mapping[str, ServedModel]
    _cache: dict[str, LoadedServedModel] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        unknown = set(self.models) - set(ROLES)
        if unknown:
            raise ConfigError(f"unknown model roles {sorted(unknown)}; known: {', '.join(ROLES)}")

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(r for r in ROLES if r in self.models)

    def get(self, role: str) -> ServedModel:
        try:
            return self.models[role]
        except KeyError:
            raise ConfigError(f"this home serves no {role!r} model (serves: {', '.join(self.roles)})") from None

    def load(self, role: str) -> LoadedServedModel:
        """Load once per process (thread-safe: the agent loads in a worker thread)."""
        with self._lock:
            loaded = self._cache.get(role)
            if loaded is None:
                loaded = self._cache[role] = self.get(role).loader()
                loaded.model.eval()
            return loaded

    def is_loaded(self, role: str) -> bool:
        return role in self._cache


# --- the pretrained catalog ----------------------------------------------------------------------


def default_catalog(roles: Sequence[str] = ROLES) -> Catalog:
    from detransformer_edge.model.config import get_config

    def embed_loader() -> LoadedServedModel:
        from detransformer_edge.model.loaders import load_model

        m = load_model("minilm-l6")
        return LoadedServedModel(m.model, m.tokenizer)

    def generate_loader() -> LoadedServedModel:
        from detransformer_edge.model.loaders import load_model

        m = load_model("smollm2-135m")
        return LoadedServedModel(m.model, m.tokenizer, chat_template=m.chat_template)

    def intent_loader() -> LoadedServedModel:
        from detransformer_edge.service.intents import load_intent_model

        return load_intent_model()

    def intent_config() -> Any:
        from detransformer_edge.service.intents import intent_model_config

        return intent_model_config()

    table = {
        "intent": ServedModel("intent", "intent (decoupled MiniLM)", intent_config, intent_loader, 128),
        "embed": ServedModel("embed", "minilm-l6", lambda: get_config("minilm-l6"), embed_loader, 512),
        "generate": ServedModel("generate", "smollm2-135m", lambda: get_config("smollm2-135m"), generate_loader, 2048),
    }
    return Catalog({r: table[r] for r in roles})


# --- the tiny catalog (tests, quick demo) --------------------------------------------------------


class CharTokenizer:
    """Bytes as tokens (ids 3..258), 1 = BOS/CLS, 2 = EOS/SEP, 0 = pad. Enough for tests."""

    bos_id, eos_id, pad_id = 1, 2, 0

    def __init__(self, vocab_size: int) -> None:
        self.vocab = vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [3 + (b % (self.vocab - 3)) for b in text.encode("utf-8")]
        return [self.bos_id, *ids, self.eos_id] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out = bytes((i - 3) % 256 for i in ids if i >= 3)
        return out.decode("utf-8", errors="replace")


def tiny_catalog(seed: int = 0) -> Catalog:
    """Small random models of every role, the same on every device for a given seed."""
    import torch

    from detransformer_edge.model.config import get_config
    from detransformer_edge.model.decoder import Decoder
    from detransformer_edge.model.encoder import Encoder

    def build(cls: type, cfg: Any) -> Any:
        # A private generator: agents load in worker threads, and torch's global RNG is shared.
        g = torch.Generator().manual_seed(seed)
        model = cls(cfg).eval()
        with torch.no_grad():
            for _, p in sorted(model.named_parameters()):
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        return model

    def intent() -> LoadedServedModel:
        from detransformer_edge.service.intents import TinyIntentHead

        cfg = get_config("tiny-encoder", nd=4, nb=2)
        return LoadedServedModel(build(Encoder, cfg), CharTokenizer(cfg.vocab_size), TinyIntentHead(cfg.d_model, seed))

    return Catalog({
        "intent": ServedModel("intent", "tiny-encoder nd4 nb2", lambda: get_config("tiny-encoder", nd=4, nb=2), intent, 120),
        "embed": ServedModel("embed", "tiny-encoder", lambda: get_config("tiny-encoder"),
                             lambda: LoadedServedModel(build(Encoder, get_config("tiny-encoder")), CharTokenizer(1000)), 120),
        "generate": ServedModel("generate", "tiny-decoder", lambda: get_config("tiny-decoder"),
                                lambda: LoadedServedModel(build(Decoder, get_config("tiny-decoder")), CharTokenizer(512)), 200),
    })
