"""openpi's msgpack-numpy wire encoding, decoded defensively: every array is checked before use."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

from pi0.errors import BadRequest


class BadMessage(BadRequest):
    """A request that cannot be decoded; the message says what was wrong."""


def _encode(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in ("V", "O", "c"):
        raise TypeError(f"cannot send arrays of dtype {obj.dtype}")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot encode {type(obj).__name__}")


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_encode)


def _dtype(d: Any) -> np.dtype:
    try:
        dtype = np.dtype(d.decode() if isinstance(d, bytes) else d)
    except (TypeError, ValueError) as e:
        raise BadMessage(f"unknown array dtype {d!r}") from e
    if dtype.kind in ("V", "O", "c") or dtype.hasobject:
        raise BadMessage(f"arrays of dtype {dtype} (object, void or complex) are refused")
    return dtype


def _decode(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        dtype = _dtype(obj.get(b"dtype"))
        shape = obj.get(b"shape")
        data = obj.get(b"data")
        if not isinstance(shape, (list, tuple)) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise BadMessage(f"array shape must be a list of non-negative ints, got {shape!r}")
        if not isinstance(data, bytes):
            raise BadMessage(f"array data must be bytes, got {type(data).__name__}")
        expected = math.prod(shape) * dtype.itemsize
        if len(data) != expected:
            raise BadMessage(f"array of shape {list(shape)} and dtype {dtype} needs {expected} bytes, got {len(data)}")
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
    if b"__npgeneric__" in obj:
        dtype = _dtype(obj.get(b"dtype"))
        try:
            return dtype.type(obj.get(b"data"))
        except (TypeError, ValueError, OverflowError) as e:
            raise BadMessage(f"bad numpy scalar of dtype {dtype}: {e}") from e
    return obj


def unpackb(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, object_hook=_decode, strict_map_key=False)
    except BadMessage:
        raise
    except Exception as e:  # noqa: BLE001 - msgpack raises many types for malformed input
        raise BadMessage(f"malformed msgpack ({type(e).__name__}: {e})") from e
