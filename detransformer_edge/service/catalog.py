"""What the home serves: named models, each for one task, with the code that loads it.

Tasks: ``intent`` (the voice assistant's intent and slot model, an encoder), ``embed``
(sentence embeddings, an encoder) and ``generate`` (text generation, a decoder). Every device
knows the catalog; which *weights* of each model it keeps is decided by the leader's placement.
A request may name a model; otherwise the first model of its task serves it.

``tiny_catalog`` serves small random models with a byte tokenizer, so cluster tests run without
pretrained files (STYLE: a fake engine for cluster tests); ``shape_catalog`` serves random
models of real shapes for latency benchmarks.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from detransformer_edge.errors import ConfigError
from detransformer_edge.model.tokenizer import ByteTokenizer
from detransformer_edge.planner.variants import Quality
from detransformer_edge.weights.quant import check_scheme

log = logging.getLogger(__name__)

Task = Literal["intent", "embed", "generate"]
TASKS: tuple[Task, ...] = ("intent", "embed", "generate")


@dataclass
class LoadedServedModel:
    """A full model in memory on one device, with what turns text into ids and back."""

    model: Any  # Encoder | Decoder
    tokenizer: Any  # detransformer_edge.model.tokenizer.TextTokenizer (or the byte tokenizer)
    intent_head: Any = None  # task "intent": turns hidden states into intents and slots
    chat_template: Any = None  # task "generate": instruct prompt formatting


@dataclass
class ServedModel:
    task: Task
    config_factory: Callable[[], Any]  # the model config, without loading weights
    loader: Callable[[], LoadedServedModel]
    max_tokens: int = 512
    description: str = ""
    # reads only the named tensors (our state-dict names) from this device's files, so a device
    # materialises just its placement (service/weights.py); None: only the full loader exists
    tensors: Callable[[Collection[str]], dict[str, Any]] | None = None
    # the tokenizer / intent head / chat template without the model's weights (model left on
    # ``meta``): what a leader needs to prepare requests and finish results; None: ``loader``
    tools_loader: Callable[[], LoadedServedModel] | None = None
    # whether this device has the model's files (random models always do): a device that has
    # them all is preferred as leader, since it never has to stream weights from another
    installed: Callable[[], bool] = lambda: True
    # weight format devices run this model in unless their profile says otherwise (weights/quant)
    quant: str = "float32"
    # the model family it belongs to (the standard model and its decoupled variants share one);
    # None: a family of its own. The runtime planner chooses among a family's placed variants.
    family: str | None = None
    # a decoupled variant's validated quality (conversion's quality.json); None: not measured
    quality: Quality | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; known: {', '.join(TASKS)}")
        check_scheme(self.quant, f"the catalog's quant for a {self.task} model")

    def config(self) -> Any:
        return self.config_factory()


@dataclass
class Catalog:
    models: Mapping[str, ServedModel]
    # False for random-weight catalogs: their decoupled variants have no quality to validate, and
    # the planner may use them all (they measure latency only)
    quality_required: bool = True
    _cache: dict[str, LoadedServedModel] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("the catalog serves no model")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.models)

    def get(self, name: str) -> ServedModel:
        try:
            return self.models[name]
        except KeyError:
            raise ConfigError(f"unknown model {name!r}; this home serves: {', '.join(self.names)}") from None

    def default_for(self, task: str) -> str:
        for name, served in self.models.items():
            if served.task == task:
                return name
        raise ConfigError(f"this home serves no model for {task!r} (serves: {', '.join(self.names)})")

    def resolve(self, task: str, name: str | None) -> str:
        """The model a request of ``task`` asked for (checked), or the task's default."""
        if name is None:
            return self.default_for(task)
        if self.get(name).task != task:
            raise ConfigError(f"model {name!r} serves {self.get(name).task!r}, not {task!r}")
        return name

    def family_of(self, name: str) -> str:
        return self.get(name).family or name

    def variants(self, name: str) -> tuple[str, ...]:
        """Every model of ``name``'s family (``name`` included), in catalog order."""
        family = self.family_of(name)
        return tuple(n for n in self.models if self.family_of(n) == family)

    def load(self, name: str) -> LoadedServedModel:
        """Load once per process (thread-safe: agents load in worker threads)."""
        with self._lock:
            loaded = self._cache.get(name)
            if loaded is None:
                loaded = self._cache[name] = self.get(name).loader()
                loaded.model.eval()
            return loaded

    def tools(self, name: str) -> LoadedServedModel:
        """Tokenizer, intent head and chat template of ``name``, without loading its weights
        where the model can (``ServedModel.tools_loader``); the full model otherwise."""
        served = self.get(name)
        if served.tools_loader is None:
            return self.load(name)
        with self._lock:
            key = f"tools:{name}"
            tools = self._cache.get(key) or self._cache.get(name)
            if tools is None:
                tools = self._cache[key] = served.tools_loader()
            return tools

    def installed_locally(self) -> bool:
        """Whether this device holds the files of every model it serves."""
        return all(served.installed() for served in self.models.values())

    def subset(self, names: Sequence[str]) -> Catalog:
        return Catalog({n: self.get(n) for n in names}, self.quality_required)


# --- the pretrained catalog ----------------------------------------------------------------------


def default_catalog() -> Catalog:
    from detransformer_edge.model.config import get_config

    def embed_loader() -> LoadedServedModel:
        from detransformer_edge.weights.loaders import load_model

        m = load_model("minilm-l6")
        return LoadedServedModel(m.model, m.tokenizer)

    def generate_loader() -> LoadedServedModel:
        from detransformer_edge.weights.loaders import load_model

        m = load_model("smollm2-135m")
        return LoadedServedModel(m.model, m.tokenizer, chat_template=m.chat_template)

    def intent_loader() -> LoadedServedModel:
        from detransformer_edge.nlu.parser import IntentParser
        from detransformer_edge.service.intents import ParserHead

        parser = IntentParser.load_default()
        return LoadedServedModel(parser.encoder, parser.tokenizer, ParserHead(parser))

    def embed_tools() -> LoadedServedModel:
        import json

        from detransformer_edge.model.tokenizer import TextTokenizer
        from detransformer_edge.weights.sources import weights_path

        cfg = get_config("minilm-l6")
        model_dir = weights_path("minilm-l6").parent
        # the same limit as loaders._load_minilm: sentence-transformers' max_seq_length
        st_config = model_dir / "sentence_bert_config.json"
        max_seq = json.loads(st_config.read_text()).get("max_seq_length") if st_config.is_file() else None
        tok = TextTokenizer.from_file(model_dir / "tokenizer.json",
                                      max_length=min(max_seq or cfg.max_position, cfg.max_position), truncate=True)
        return LoadedServedModel(None, tok)

    def generate_tools() -> LoadedServedModel:
        from gguf import GGUFReader

        from detransformer_edge.model.chat import ChatTemplate
        from detransformer_edge.model.tokenizer import TextTokenizer
        from detransformer_edge.weights.llama import read_gguf_metadata
        from detransformer_edge.weights.sources import weights_path

        metadata = read_gguf_metadata(GGUFReader(str(weights_path("smollm2-135m"))))  # mapped, not dequantised
        return LoadedServedModel(None, TextTokenizer.from_gguf_metadata(metadata),
                                 chat_template=ChatTemplate.from_metadata(metadata))

    def intent_tools() -> LoadedServedModel:
        from detransformer_edge.nlu.parser import IntentParser
        from detransformer_edge.service.intents import ParserHead

        parser = IntentParser.load(default_weights_dir(), encoder=False)
        return LoadedServedModel(parser.encoder, parser.tokenizer, ParserHead(parser))

    def intent_config() -> Any:
        from detransformer_edge.service.intents import intent_model_config

        return intent_model_config()

    def lazy_source(name: str) -> Callable[[Collection[str]], dict[str, Any]]:
        """The model's LocalWeightSource, opened on first use (ModelNotInstalledError if absent)."""
        opened: list[Any] = []

        def read(names: Collection[str]) -> dict[str, Any]:
            from detransformer_edge.service import weights

            if not opened:
                opened.append({"minilm-l6": weights.minilm_source, "smollm2-135m": weights.smollm2_source,
                               "intent": weights.intent_source}[name]())
            return opened[0](names)

        return read

    from detransformer_edge.nlu.parser import default_weights_dir

    def installed(name: str) -> Callable[[], bool]:
        def check() -> bool:
            from detransformer_edge.errors import ModelNotInstalledError
            from detransformer_edge.weights.sources import weights_path

            try:
                return weights_path(name).is_file()
            except ModelNotInstalledError:
                return False

        return check

    converted: dict[str, ServedModel] = {}
    for name, (dirname, description) in CONVERTED.items():
        model_dir = converted_dir(dirname)
        if (model_dir / "model.safetensors").is_file():
            converted[name] = _converted_entry(model_dir, description, embed_tools, generate_tools)

    models: dict[str, ServedModel] = {}
    if (default_weights_dir() / "model.safetensors").exists():
        models["intent"] = ServedModel("intent", intent_config, intent_loader, 128, "decoupled MiniLM, intent + slot heads",
                                       lazy_source("intent"), intent_tools)
    else:
        log.warning("no trained intent model in %s: voice queries are not served; run `detransformer-edge train-intent`",
                    default_weights_dir())
    return Catalog({
        **models,
        "minilm-l6": ServedModel("embed", lambda: get_config("minilm-l6"), embed_loader, 512, "all-MiniLM-L6-v2",
                                 lazy_source("minilm-l6"), embed_tools, installed("minilm-l6"), family="minilm-l6"),
        # int8: about twice float32's decode speed at +0.2 % held-out perplexity (docs/MODELS.md). The
        # int4 codes are the GGUF's own, but on x86 they run on bfloat16 activations, and the demo's
        # first question then starts with another token (a near tie at the first position): int4
        # is for devices whose profile asks for it (memory), not the default
        "smollm2-135m": ServedModel("generate", lambda: get_config("smollm2-135m"), generate_loader, 2048,
                                    "SmolLM2-135M-Instruct", lazy_source("smollm2-135m"), generate_tools,
                                    installed("smollm2-135m"), quant="int8", family="smollm2-135m"),
        **converted,
    })


# Distilled decoupled models served when `detransformer-edge convert` has written them:
# catalog name -> (folder under converted_dir(), description). Commands in docs/ACCURACY.md. Each
# joins its teacher's family; the planner uses it within the task's quality budget, read from the
# quality.json conversion writes beside the weights (quality_of).
CONVERTED: dict[str, tuple[str, str]] = {
    "minilm-bp2": ("minilm-l6-nd4-nb2-slice", "all-MiniLM-L6-v2 distilled to sliced sub-blocks, N_d=4 N_b=2"),
    "smollm2-bp": ("smollm2-135m-nd2-nb5", "SmolLM2-135M-Instruct distilled to N_d=2 N_b=5 (full-width heads)"),
}
TEACHER_FAMILY = {"minilm-l6": "minilm-l6", "smollm2-135m": "smollm2-135m"}  # conversion source -> family


def quality_of(model_dir: Any) -> Quality | None:
    """The validated quality conversion wrote (``quality.json``): a decoder's held-out perplexity
    ratio to the teacher, an encoder's embedding cosine; None if absent or unfinished."""
    import json
    from pathlib import Path

    path = Path(model_dir) / "quality.json"
    try:
        q = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(q, dict):
        return None
    if "ppl_ratio" in q or ("ppl_after" in q and "ppl_teacher" in q):
        ratio = q.get("ppl_ratio") or q["ppl_after"] / q["ppl_teacher"]
        return Quality("ppl_ratio", float(ratio), str(path))
    if "cosine_after" in q:
        return Quality("cosine", float(q["cosine_after"]), str(path))
    return None


def converted_dir(name: str) -> Any:  # -> Path
    """Where `convert --out` puts a converted model by default (``~/.cache/detransformer_edge/converted``)."""
    from pathlib import Path

    return Path.home() / ".cache" / "detransformer_edge" / "converted" / name


def _converted_entry(model_dir: Any, description: str, embed_tools: Callable[[], LoadedServedModel],
                     generate_tools: Callable[[], LoadedServedModel]) -> ServedModel:
    """A model distilled by `convert` (model.safetensors + config.json, our names): an embedding
    encoder or a generating decoder; tokenizer (and chat template) from the teacher's package;
    its family is the teacher's, its quality what conversion measured."""
    import json

    meta = json.loads((model_dir / "config.json").read_text())
    decoder = "decoder" in meta
    tools = generate_tools if decoder else embed_tools

    def config() -> Any:
        from detransformer_edge.model.config import DecoderConfig, EncoderConfig

        return DecoderConfig(**meta["decoder"]) if decoder else EncoderConfig(**meta["encoder"])

    def load() -> LoadedServedModel:
        if decoder:
            from detransformer_edge.training.convert_decoder import load_decoder_student

            t = tools()
            return LoadedServedModel(load_decoder_student(model_dir), t.tokenizer, chat_template=t.chat_template)
        from detransformer_edge.training.convert import load_student

        return LoadedServedModel(load_student(model_dir), tools().tokenizer)

    opened: list[Any] = []

    def tensors(names: Collection[str]) -> dict[str, Any]:
        from detransformer_edge.service.weights import SafetensorsSource, _verified

        if not opened:
            opened.append(SafetensorsSource.mapped(_verified(model_dir / "model.safetensors"), lambda k: k))
        return opened[0](names)

    family = TEACHER_FAMILY.get(str(meta.get("source", "")))
    if decoder:
        return ServedModel("generate", config, load, 2048, description, tensors, tools, family=family,
                           quality=quality_of(model_dir))
    return ServedModel("embed", config, load, 512, description, tensors, tools, family=family,
                       quality=quality_of(model_dir))


# --- random catalogs (tests, benchmarks) -----------------------------------------------------------


def _random_model(cfg: Any, seed: int) -> Any:
    """A model with N(0, 0.02) weights drawn per tensor from a generator seeded by (seed, name):
    private generators (agents load in worker threads, torch's global RNG would race), and any
    subset of tensors a device loads selectively equals the same tensors of the full model."""
    from detransformer_edge.service.weights import materialise, parameter_shapes, random_tensors

    return materialise(cfg, random_tensors(cfg, seed, parameter_shapes(cfg)))


def _random_entry(task: Task, cfg_factory: Callable[[], Any], seed: int, description: str,
                  max_tokens: int, head: bool = False) -> ServedModel:
    def tools() -> LoadedServedModel:
        cfg = cfg_factory()
        intent_head = None
        if head:
            from detransformer_edge.service.intents import TinyIntentHead

            intent_head = TinyIntentHead(cfg.d_model, cfg.vocab_size, seed)
        return LoadedServedModel(None, ByteTokenizer(cfg.vocab_size), intent_head)

    def load() -> LoadedServedModel:
        t = tools()
        return LoadedServedModel(_random_model(cfg_factory(), seed), t.tokenizer, t.intent_head)

    def tensors(names: Collection[str]) -> dict[str, Any]:
        from detransformer_edge.service.weights import random_tensors

        return random_tensors(cfg_factory(), seed, names)

    # the tokenizer (and head) without the weights: a coordinator of a BERT-base or SmolLM2 shape
    # must not build the whole random model beside its shard just to tokenize (it did, and a
    # 2.5 GB device holding two SmolLM2 shapes ran out of memory before it was ready)
    return ServedModel(task, cfg_factory, load, max_tokens, description, tensors, tools)


def tiny_catalog(seed: int = 0) -> Catalog:
    """Small random models for every task, the same on every device for a given seed."""
    from detransformer_edge.model.config import get_config

    bp = _random_entry("embed", lambda: get_config("tiny-encoder", nd=4, nb=2), seed, "tiny decoupled encoder (random)",
                       120)
    bp.family = "tiny-encoder"
    return Catalog({
        "intent": _random_entry("intent", lambda: get_config("tiny-encoder", nd=4, nb=2), seed,
                                "tiny decoupled encoder (random)", 120, head=True),
        "tiny-encoder": _random_entry("embed", lambda: get_config("tiny-encoder"), seed, "tiny encoder (random)", 120),
        "tiny-encoder-bp": bp,
        "tiny-decoder": _random_entry("generate", lambda: get_config("tiny-decoder"), seed, "tiny decoder (random)", 200),
    }, quality_required=False)


SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    # name -> (preset, DeTransformer knobs): the benchmark shapes, random weights. The first model
    # of each task is its default (Catalog.default_for): the decoupled ones, as before.
    "bert-base-bp": ("bert-base", {"nd": 4, "nb": 4}),  # the paper's fixed plan model (full-width heads)
    "bert-base": ("bert-base", {}),
    "bert-base-bp-slice": ("bert-base", {"nd": 4, "nb": 4, "sub_attn": "slice"}),  # its sliced twin
    "bert-base-bp2": ("bert-base", {"nd": 4, "nb": 2, "sub_attn": "slice"}),  # N_b = 2, the paper's heads, I' 4224
    "minilm-shape": ("minilm-l6", {}),
    "minilm-bp2": ("minilm-l6", {"nd": 4, "nb": 2, "sub_attn": "slice"}),
    "smollm2-bp": ("smollm2-135m", {"nd": 4, "nb": 6}),
    "smollm2-shape": ("smollm2-135m", {}),
}


def shape_config(name: str) -> Any:
    """The config of a shapes-catalog model (what ``shape_catalog().get(name).config()`` returns)."""
    from detransformer_edge.model.config import get_config

    if name not in SHAPES:
        raise ConfigError(f"unknown benchmark shape {name!r}; known: {', '.join(SHAPES)}")
    preset, knobs = SHAPES[name]
    return get_config(preset, **knobs)


def shape_catalog(seed: int = 0) -> Catalog:
    """Random models of the benchmark shapes (``SHAPES``): BERT-base, MiniLM and SmolLM2-135M,
    standard and decoupled: N_d = 4 with N_b = 4 (full-width, the paper's fixed plan model, and
    its sliced twin) or N_b = 2 (sliced) for the encoders; N_d = 4, N_b = 6 for SmolLM2's 30
    layers (full-width: sliced SmolLM2 needs N_d = 3)."""
    from detransformer_edge.model.config import get_config

    def entry(name: str) -> ServedModel:
        preset, knobs = SHAPES[name]
        cfg = get_config(preset, **knobs)
        task: Task = "generate" if cfg.family == "decoder" else "embed"
        if knobs:
            layout = f"decoupled N_d={cfg.nd} N_b={cfg.nb}, {'sliced' if cfg.sub_attn == 'slice' else 'full-width'} heads"
        else:
            layout = "standard"
        served = _random_entry(task, lambda: shape_config(name), seed, f"{preset} shape, {layout} (random)",
                               1024 if task == "generate" else 512)
        served.family = preset  # bert-base, minilm-l6, smollm2-135m: the standard shape and its variants
        return served

    return Catalog({name: entry(name) for name in SHAPES}, quality_required=False)


CATALOGS: dict[str, Callable[[], Catalog]] = {
    "pretrained": default_catalog, "tiny": tiny_catalog, "shapes": shape_catalog,
}

