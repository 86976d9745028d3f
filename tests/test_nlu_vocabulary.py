"""The vocabulary lives in nlu/, and nlu/ stands alone: it never imports the service layers."""

from __future__ import annotations

import ast
from pathlib import Path

import detransformer_edge.nlu as nlu_package
from detransformer_edge.nlu import vocabulary
from detransformer_edge.protocol import hermes

FORBIDDEN = ("detransformer_edge.integrations", "detransformer_edge.service", "detransformer_edge.cluster",
             "detransformer_edge.commands")


def test_hermes_uses_the_nlu_vocabulary() -> None:
    assert hermes.INTENTS is vocabulary.INTENTS
    assert hermes.SLOTS is vocabulary.SLOTS and hermes.INTENT_SLOTS is vocabulary.INTENT_SLOTS
    assert set(vocabulary.INTENTS) == set(vocabulary.INTENT_SLOTS)
    for slots in vocabulary.INTENT_SLOTS.values():
        assert set(slots) <= set(vocabulary.SLOTS)


def test_nlu_never_imports_the_service_layers() -> None:
    root = Path(nlu_package.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.startswith(FORBIDDEN)]
    assert not offenders, offenders
