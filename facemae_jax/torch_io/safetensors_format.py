"""``.safetensors`` checkpoints through the ``safetensors`` package (imported only when this format is used);
``extra`` travels as JSON in one metadata entry."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np

from facemae_jax.torch_io.common import (
    CheckpointFormatError,
    c_contiguous,
    decode_meta_json,
    decode_storage,
    dtype_label,
    extra_as_json,
)

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
    "C64": np.complex64, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
_SAFETENSORS_WRITABLE = {np.dtype(t) for t in _SAFETENSORS_DTYPES.values()}
_SAFETENSORS_EXTRA_KEY = "facemae_jax.extra"  # metadata entry holding the JSON of save_state_dict's extra


def load_safetensors(path: str, data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    import safetensors  # noqa: PLC0415  (only needed for this format)

    try:
        entries = safetensors.deserialize(data)
        (header_len,) = struct.unpack("<Q", data[:8])
        metadata = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
    except Exception as exc:  # SafetensorError, json errors: all mean a damaged file
        raise CheckpointFormatError(f"{path}: cannot read as .safetensors ({type(exc).__name__}: {exc})") from exc
    state_dict = {}
    for name, entry in entries:
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointFormatError(f"{path}: tensor '{name}' has unsupported dtype {entry['dtype']}")
        dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
        state_dict[name] = decode_storage(entry["data"], dtype, big_endian=False).reshape(entry["shape"])
    info: dict = {k: v for k, v in metadata.items() if k != _SAFETENSORS_EXTRA_KEY}
    if _SAFETENSORS_EXTRA_KEY in metadata:
        info.update(decode_meta_json(np.asarray(metadata[_SAFETENSORS_EXTRA_KEY]), path))
    return state_dict, info


def save_safetensors(tmp_path: str, state_dict: dict[str, np.ndarray], extra: dict, path: str) -> None:
    from safetensors import TensorSpec, serialize_file  # noqa: PLC0415  (only needed for this format)

    keep_alive, specs = [], {}
    for name, value in state_dict.items():
        array = c_contiguous(value)
        if array.dtype not in _SAFETENSORS_WRITABLE:
            raise CheckpointFormatError(f"{path}: tensor '{name}' has dtype {array.dtype}, which .safetensors "
                                        "cannot hold")
        keep_alive.append(array)
        specs[name] = TensorSpec(dtype=dtype_label(array.dtype), shape=list(array.shape),
                                 data_ptr=array.ctypes.data, data_len=array.nbytes)
    metadata = {_SAFETENSORS_EXTRA_KEY: extra_as_json(extra, path)} if extra else None
    try:
        serialize_file(specs, tmp_path, metadata=metadata)
    except Exception as exc:  # unknown dtype names and the like
        raise CheckpointFormatError(f"{path}: cannot write .safetensors ({exc})") from exc
    del keep_alive
