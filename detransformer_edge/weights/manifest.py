"""SHA-256 manifest of the local weight files, so a corrupted file is never loaded silently.

The first time a weight file is loaded its SHA-256 is recorded in
``<cache_dir>/manifest.json`` (``$DETRANSFORMER_EDGE_CACHE``, default ``~/.cache/detransformer-edge``),
keyed by the file's absolute path, size and modification time. Every later load hashes the file
again and compares: a file that kept its path, size and mtime but not its content (disk or SD-card
corruption, a torn copy that kept the timestamp) raises :class:`WeightIntegrityError` naming it.
A file that was legitimately replaced (new size or mtime) gets a new entry.

Weights streamed over MQTT carry their own SHA-256 per shard (``service/weight_stream.py``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from detransformer_edge.errors import DetransformerError
from detransformer_edge.weights.sources import file_sha256

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
_MAX_ENTRIES = 256  # a device holds a handful of models; drop the oldest beyond this


class WeightIntegrityError(DetransformerError):
    """A local weight file no longer matches the SHA-256 recorded when it was first loaded."""


def _key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _read(manifest: Path) -> dict[str, str]:
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable weight manifest %s: %s", manifest, exc)
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


def _write(manifest: Path, entries: dict[str, str]) -> None:
    try:
        manifest.parent.mkdir(parents=True, exist_ok=True)
        tmp = manifest.with_name(f"{manifest.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, manifest)
    except OSError as exc:  # a read-only cache only costs the check on the next load
        log.warning("could not record weight checksums in %s: %s", manifest, exc)


def verify_file(path: str | Path, cache: Path | None) -> str:
    """The file's SHA-256, checked against (or recorded in) the manifest under ``cache``.

    With ``cache`` None (``DETRANSFORMER_EDGE_CACHE=off``) there is no manifest: returns ""."""
    path = Path(path)
    if cache is None:
        return ""
    manifest = cache / MANIFEST_NAME
    entries = _read(manifest)
    key = _key(path)
    digest = file_sha256(path)
    recorded = entries.get(key)
    if recorded is not None:
        if recorded != digest:
            raise WeightIntegrityError(
                f"weight file {path} is corrupted: its SHA-256 is {digest[:16]}..., but it was "
                f"{recorded[:16]}... when first loaded (same size and modification time). "
                "Reinstall the model package (or restore the file), then start the agent again."
            )
        return digest
    prefix = f"{path.resolve()}|"
    entries = {k: v for k, v in entries.items() if not k.startswith(prefix)}  # replaced files
    entries[key] = digest
    while len(entries) > _MAX_ENTRIES:
        entries.pop(next(iter(entries)))
    _write(manifest, entries)
    return digest


__all__ = ["WeightIntegrityError", "verify_file"]
