"""Wire envelope: round trips, error bounds of lossy dtypes, and a typed error for every
malformed input (the decoder faces bytes from any client on the broker)."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detransformer_edge.errors import DetransformerError
from detransformer_edge.transport.wire import (
    MAX_ELEMENTS,
    MAX_RANK,
    TensorMessage,
    WireError,
    decode_tensor,
    encode_tensor,
)

SHAPES = [(), (0,), (5,), (3, 0), (0, 7), (2, 3, 4), (1, 1, 1, 1, 1, 1, 1, 2), (4, 128)]
DTYPES = ["float32", "float16", "int8"]


def _valid(**over: object) -> bytes:
    msg: dict[str, object] = {
        "v": 1,
        "req": "r",
        "step": 3,
        "src": "dev-a",
        "dtype": "<f4",
        "shape": [2, 2],
        "data": np.arange(4, dtype="<f4").tobytes(),
    }
    for k, val in over.items():
        if val is _DROP:
            msg.pop(k)
        else:
            msg[k] = val
    return msgpack.packb(msg, use_bin_type=True)


_DROP = object()


def test_wire_error_is_a_product_error() -> None:
    assert issubclass(WireError, DetransformerError)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("wire_dtype", DTYPES)
def test_round_trip_shapes_and_dtypes(shape: tuple[int, ...], wire_dtype: str) -> None:
    rng = np.random.default_rng(0)
    x = np.asarray(rng.standard_normal(shape), dtype=np.float32)
    msg = decode_tensor(encode_tensor(x, "req-1", "L3.ag", "pi4", wire_dtype))
    assert isinstance(msg, TensorMessage)
    assert (msg.req, msg.step, msg.src) == ("req-1", "L3.ag", "pi4")
    assert msg.array.dtype == np.float32
    assert msg.array.shape == shape
    if wire_dtype == "float32":
        np.testing.assert_array_equal(msg.array, x)


def test_float32_decode_is_zero_copy_and_read_only() -> None:
    payload = encode_tensor(np.ones((3, 4), np.float32), "r", 0, "a")
    arr = decode_tensor(payload).array
    assert not arr.flags.owndata and not arr.flags.writeable  # a view of the message bytes
    with pytest.raises(ValueError):
        arr[0, 0] = 2.0


def test_int_step_survives_and_torch_input_accepted() -> None:
    torch = pytest.importorskip("torch")
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    msg = decode_tensor(encode_tensor(t, "r", 7, "a"))
    assert msg.step == 7
    np.testing.assert_array_equal(msg.array, t.numpy())
    bf = decode_tensor(encode_tensor(t.to(torch.bfloat16), "r", 7, "a", "float16")).array
    np.testing.assert_allclose(bf, t.numpy())


def test_float16_error_bound() -> None:
    x = np.random.default_rng(1).standard_normal((64, 256)).astype(np.float32) * 10
    y = decode_tensor(encode_tensor(x, "r", 0, "a", "float16")).array
    # float16 has an 11-bit significand: relative error <= 2**-11
    assert np.all(np.abs(y - x) <= np.abs(x) * 2.0**-11 + 1e-7)


def test_int8_error_bound_is_half_a_step_per_row() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, 384)).astype(np.float32)
    x[3] *= 1000.0  # rows of very different magnitude: per-row scales keep the small ones exact
    x[5] = 0.0
    y = decode_tensor(encode_tensor(x, "r", 0, "a", "int8")).array
    step = np.abs(x).max(axis=1, keepdims=True) / 127.0
    assert np.all(np.abs(y - x) <= step / 2 * (1 + 1e-5) + 1e-12)
    np.testing.assert_array_equal(y[5], 0.0)
    payload = encode_tensor(x, "r", 0, "a", "int8")
    assert len(payload) < x.nbytes / 3.5  # the point of int8: ~4x smaller than float32


def test_encode_rejects_bad_input() -> None:
    x = np.ones((2, 2), np.float32)
    with pytest.raises(WireError, match="unknown wire dtype"):
        encode_tensor(x, "r", 0, "a", "bfloat16")
    with pytest.raises(WireError, match="rank"):
        encode_tensor(np.ones((1,) * (MAX_RANK + 1), np.float32), "r", 0, "a")
    with pytest.raises(WireError, match="NaN or inf"):
        encode_tensor(np.array([1.0, np.nan], np.float32), "r", 0, "a", "int8")
    with pytest.raises(WireError, match="float16 overflow"):
        encode_tensor(np.array([1e6], np.float32), "r", 0, "a", "float16")
    with pytest.raises(WireError, match="req"):
        encode_tensor(x, "", 0, "a")
    with pytest.raises(WireError, match="step"):
        encode_tensor(x, "r", 1.5, "a")  # type: ignore[arg-type]
    with pytest.raises(WireError, match="dtype"):
        encode_tensor(np.array(["a"]), "r", 0, "a")


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "not valid msgpack"),
        (b"\xc1", "not valid msgpack"),
        (_valid() + b"\x00", "not valid msgpack"),  # trailing bytes
        (msgpack.packb([1, 2, 3]), "must be a msgpack map"),
        (msgpack.packb({1: 2}), "not valid msgpack"),  # int keys refused by strict_map_key
        (_valid(data=_DROP), "lacks key"),
        (_valid(v=_DROP), "lacks key"),
        (_valid(extra=1), "unknown key"),
        (_valid(v=2), "unsupported wire version"),
        (_valid(v="1"), "v must be an int"),
        (_valid(v=True), "v must be an int"),
        (_valid(req=5), "req must be"),
        (_valid(src=b"a"), "src must be"),
        (_valid(step=1.5), "step must be"),
        (_valid(step=None), "step must be"),
        (_valid(dtype="<f8"), "not one of"),
        (_valid(dtype="|O"), "not one of"),
        (_valid(dtype=4), "not one of"),
        (_valid(shape="2,2"), "shape must be a list"),
        (_valid(shape=[2, -2]), "non-negative"),
        (_valid(shape=[2, 2.0]), "non-negative"),
        (_valid(shape=[2, True]), "non-negative"),
        (_valid(shape=[1] * 9), "rank"),
        (_valid(shape=[1 << 20, 1 << 20]), "over the limit"),
        (_valid(shape=[2, 3]), "needs 24"),
        (_valid(data="text"), "data must be bin"),
        (_valid(scale=b"\x00" * 8), "only allowed with int8"),
        (_valid(dtype="|i1", data=b"\x01" * 4), "needs a scale"),
        (_valid(dtype="|i1", data=b"\x01" * 4, scale=b"\x00" * 4), "expected 2 float32 rows"),
        (
            _valid(dtype="|i1", data=b"\x01" * 4, scale=np.array([1, np.nan], "<f4").tobytes()),
            "NaN",
        ),
        (
            _valid(dtype="|i1", data=b"\x01" * 4, scale=np.array([1, -1], "<f4").tobytes()),
            "negative",
        ),
        (msgpack.packb({"v": 1, "req": b"\xff\xfe"}, use_bin_type=False), "not valid msgpack"),
    ],
)
def test_decode_rejects_malformed(payload: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match):
        decode_tensor(payload)


def test_decode_rejects_non_bytes_and_too_large() -> None:
    with pytest.raises(WireError, match="must be bytes"):
        decode_tensor("text")  # type: ignore[arg-type]
    with pytest.raises(WireError, match="exceeds the limit"):
        decode_tensor(_valid(), max_bytes=10)
    with pytest.raises(WireError, match="over the limit"):
        decode_tensor(_valid(), max_elements=3)


def test_oversized_shape_is_refused_before_allocating() -> None:
    # a 1e18-element claim must be refused by arithmetic, not by a MemoryError
    payload = _valid(shape=[10**6] * 3, data=b"")
    with pytest.raises(WireError, match="over the limit"):
        decode_tensor(payload)
    assert MAX_ELEMENTS < math.prod([10**6] * 3)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_random_bytes_give_wire_error_or_message(data: bytes) -> None:
    try:
        msg = decode_tensor(data)
    except WireError:
        return
    assert isinstance(msg, TensorMessage) and msg.array.dtype == np.float32


_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=16),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "v": st.sampled_from([1, 1, 2]) | _msgpack_values,
            "req": st.just("r") | _msgpack_values,
            "step": st.integers(-(2**63), 2**64 - 1) | _msgpack_values,
            "src": st.just("a") | _msgpack_values,
            "dtype": st.sampled_from(["<f4", "<f2", "|i1", "<f8"]) | _msgpack_values,
            "shape": st.lists(st.integers(-2, 5), max_size=9) | _msgpack_values,
            "data": st.binary(max_size=64) | _msgpack_values,
            "scale": st.binary(max_size=16) | _msgpack_values,
        },
    )
)
def test_fuzz_structured_maps_give_wire_error_or_message(fields: dict[str, object]) -> None:
    payload = msgpack.packb(fields, use_bin_type=True)
    try:
        msg = decode_tensor(payload)
    except WireError:
        return
    assert msg.array.dtype == np.float32
    assert msg.array.size == math.prod(msg.array.shape)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(0, 6), max_size=4).map(tuple),
    st.sampled_from(DTYPES),
    st.floats(-1e4, 1e4, width=32),
)
def test_fuzz_round_trip_keeps_shape(shape: tuple[int, ...], wire_dtype: str, fill: float) -> None:
    x = np.full(shape, fill, dtype=np.float32)
    y = decode_tensor(encode_tensor(x, "r", "s", "a", wire_dtype)).array
    assert y.shape == shape
    tol = {"float32": 0.0, "float16": abs(fill) * 2**-11, "int8": abs(fill) / 254}[wire_dtype]
    assert np.all(np.abs(y - x) <= tol + 1e-6)


def test_round_trip_is_the_wire_itself() -> None:
    from detransformer_edge.transport.wire import WIRE_ITEMSIZE, round_trip

    x = np.linspace(-3, 3, 24, dtype=np.float32).reshape(2, 12)
    assert np.array_equal(round_trip(x, "float32"), x)
    for dtype in ("float16", "int8"):
        sent = decode_tensor(encode_tensor(x, "r", 0, "a", dtype)).array
        assert np.array_equal(round_trip(x, dtype), sent)  # the same quantiser as the collectives
    assert WIRE_ITEMSIZE == {"float32": 4, "float16": 2, "int8": 1}


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(DTYPES),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(0, 64),
)
def test_fuzz_corrupted_valid_payloads(
    wire_dtype: str, flips: list[tuple[int, int]], cut: int
) -> None:
    x = np.linspace(-3, 3, 24, dtype=np.float32).reshape(2, 3, 4)
    buf = bytearray(encode_tensor(x, "req", 5, "dev", wire_dtype))
    for pos, byte in flips:
        buf[pos % len(buf)] = byte
    data = bytes(buf[: len(buf) - cut])
    try:
        msg = decode_tensor(data)
    except WireError:
        return
    assert msg.array.dtype == np.float32


def test_float16_torch_fast_path_matches_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    from detransformer_edge.transport import wire

    x = np.random.default_rng(4).standard_normal((8, 4096)).astype(np.float32) * 300
    monkeypatch.setattr(wire, "_torch", lambda: torch)
    fast = encode_tensor(x, "r", 0, "a", "float16")
    fast_back = decode_tensor(fast).array
    monkeypatch.setattr(wire, "_torch", lambda: None)
    slow = encode_tensor(x, "r", 0, "a", "float16")
    assert fast == slow
    np.testing.assert_array_equal(fast_back, decode_tensor(slow).array)
    assert fast_back.flags.writeable  # a fresh array, not a view of the message


def test_the_studies_name_the_wires_dtypes() -> None:
    from typing import get_args

    from detransformer_edge.planner.accuracy import ALLOWED_WIRE_DTYPES
    from detransformer_edge.training.precision import WIRE_DTYPES
    from detransformer_edge.transport.wire import WireDtype

    assert WIRE_DTYPES == get_args(WireDtype)  # one vocabulary
    assert all(set(v) <= set(WIRE_DTYPES) for v in ALLOWED_WIRE_DTYPES.values())
