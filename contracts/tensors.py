"""Packed little-endian tensor codec for everything that crosses a process boundary.

Ids travel as int32, log-probs as float16 or float32, always little-endian and row-major, as raw
bytes inside protobuf ``bytes`` fields or Redis stream values (never JSON lists). The shape travels
next to the bytes (in a sibling field), so decoding checks the byte length against it.

    >>> from contracts.tensors import encode, decode
    >>> decode(encode(np.arange(3), "int32"), "int32", (3,), field="ids")
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

DType = Literal["int32", "float16", "float32"]

_WIRE: dict[str, np.dtype[np.generic]] = {
    "int32": np.dtype("<i4"),
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
}
# float16 holds magnitudes up to 65504; larger finite values would silently become inf.
_F16_MAX = float(np.finfo(np.float16).max)


class TensorDecodeError(ValueError):
    """Bytes that do not hold the declared tensor; ``field`` names where they came from."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


def itemsize(dtype: DType) -> int:
    """Bytes per element of ``dtype`` on the wire."""
    return _WIRE[dtype].itemsize


def encode(array: npt.ArrayLike, dtype: DType) -> bytes:
    """Pack ``array`` row-major as little-endian ``dtype``.

    int32 refuses values outside the int32 range instead of wrapping them; float16 clips finite
    values to ±65504 (log-probs below -65504 mean a probability of 0 either way).
    """
    arr = np.asarray(array)
    wire = _WIRE[dtype]
    if dtype == "int32":
        if arr.size and arr.dtype.kind not in "iub":
            raise TypeError(f"int32 encoding needs integer input, got {arr.dtype}")
        if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
            raise OverflowError("value outside the int32 range")
    elif dtype == "float16":
        arr = np.clip(arr.astype(np.float32, copy=False), -_F16_MAX, _F16_MAX)
    return np.ascontiguousarray(arr, dtype=wire).tobytes()


def decode(data: bytes, dtype: DType, shape: tuple[int, ...], field: str) -> npt.NDArray[np.generic]:
    """Unpack ``data`` into a native-endian array of ``shape``; wrong byte lengths name ``field``."""
    wire = _WIRE[dtype]
    if any(d < 0 for d in shape):
        raise TensorDecodeError(field, f"negative dimension in shape {shape}")
    expected = int(np.prod(shape, dtype=np.int64)) * wire.itemsize
    if len(data) != expected:
        raise TensorDecodeError(
            field, f"{len(data)} bytes do not hold {dtype} of shape {shape} ({expected} bytes expected)"
        )
    native = wire.newbyteorder("=")
    return np.frombuffer(data, dtype=wire).astype(native, copy=True).reshape(shape)


def decode_vector(data: bytes, dtype: DType, field: str) -> npt.NDArray[np.generic]:
    """Unpack a 1-D array whose length follows from the byte count; a ragged byte count names ``field``."""
    size = _WIRE[dtype].itemsize
    if len(data) % size:
        raise TensorDecodeError(field, f"{len(data)} bytes is not a multiple of {size} ({dtype})")
    return decode(data, dtype, (len(data) // size,), field)
