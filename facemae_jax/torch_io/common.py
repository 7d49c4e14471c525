"""What every checkpoint format here shares: the error type, the tensor dtypes, raw bytes -> arrays, and the JSON
that carries ``extra`` in .npz / .safetensors."""

from __future__ import annotations

import json
import sys

import ml_dtypes
import numpy as np


class CheckpointFormatError(ValueError):
    """A file is not a checkpoint, is damaged, or asks for something unsafe; the message names file and entry."""


# Legacy typed storage classes: the pickle names one per tensor ('torch', 'FloatStorage'); CUDA checkpoints
# written by torch 1.x name 'torch.cuda.FloatStorage' instead. numel counts elements of that dtype.
STORAGE_CLASS_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "DoubleStorage": np.dtype(np.float64),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}

# torch.<dtype> globals: they appear as the dtype argument of _rebuild_tensor_v3 (dtypes without a legacy
# storage class, stored in an UntypedStorage of bytes) and occasionally inside user objects.
TORCH_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float64": np.dtype(np.float64),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
}

STORAGE_CLASS_FOR_DTYPE = {dtype: name for name, dtype in STORAGE_CLASS_DTYPES.items()}
TORCH_NAME_FOR_DTYPE = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def dtype_label(dtype: np.dtype) -> str:
    return "bfloat16" if dtype == np.dtype(ml_dtypes.bfloat16) else dtype.name


def decode_storage(raw: bytes | memoryview | bytearray, dtype: np.dtype, big_endian: bool) -> np.ndarray:
    """Raw storage bytes -> 1-D native-order array of ``dtype`` (a view of ``raw`` when no swap is needed)."""
    if dtype.itemsize == 1 or big_endian == (sys.byteorder == "big"):
        return np.frombuffer(raw, dtype=dtype)
    order = ">" if big_endian else "<"
    if dtype.type.__module__.startswith("ml_dtypes"):
        # ml_dtypes types have no byte-order variants: swap through the unsigned integer of the same width.
        return np.frombuffer(raw, dtype=np.dtype(f"{order}u{dtype.itemsize}")).astype(f"=u{dtype.itemsize}").view(dtype)
    return np.frombuffer(raw, dtype=dtype.newbyteorder(order)).astype(dtype)


def c_contiguous(array: np.ndarray) -> np.ndarray:
    """C-contiguous without copying when possible; unlike np.ascontiguousarray, keeps 0-d arrays 0-d."""
    return array if array.flags.c_contiguous else np.array(array, order="C", copy=True)


def decode_meta_json(value: np.ndarray, path: str) -> dict:
    try:
        meta = json.loads(str(value))
    except json.JSONDecodeError as exc:
        raise CheckpointFormatError(f"{path}: entry 'meta' is not JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise CheckpointFormatError(f"{path}: entry 'meta' holds a JSON {type(meta).__name__}, not an object")
    return meta


def extra_as_json(extra: dict, path: str) -> str:
    """.npz and .safetensors carry extra as one JSON text; name the entry that JSON cannot hold."""
    for key, value in extra.items():
        try:
            json.dumps({key: value})
        except (TypeError, ValueError) as exc:
            raise CheckpointFormatError(f"{path}: extra[{key!r}] cannot be stored in this format, which keeps "
                                        f"extra as JSON ({exc})") from exc
    return json.dumps(extra)
