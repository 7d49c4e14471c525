"""``.npz`` checkpoints: torch names as keys, or the golden layout (``param/<name>`` plus a JSON ``meta`` entry, and
other arrays that are not weights)."""

from __future__ import annotations

import zipfile
import zlib
from typing import BinaryIO

import ml_dtypes
import numpy as np

from facemae_jax.torch_io.common import (
    TORCH_NAME_FOR_DTYPE,
    CheckpointFormatError,
    c_contiguous,
    decode_meta_json,
    extra_as_json,
)


def load_npz(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """Torch names as keys; golden files prefix them with 'param/' and carry a JSON 'meta' and outputs."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            prefixed = any(n.startswith("param/") for n in names)
            state_dict, info = {}, {}
            for name in names:
                if name == "meta":
                    info = decode_meta_json(npz[name], path)
                    continue
                if prefixed and not name.startswith("param/"):
                    continue  # golden outputs, activations, masks: not weights
                array = npz[name]
                _check_tensor_dtype(array, path, name)
                state_dict[name[len("param/"):] if prefixed else name] = array
    except CheckpointFormatError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error) as exc:
        raise CheckpointFormatError(f"{path}: cannot read as .npz ({type(exc).__name__}: {exc})") from exc
    return state_dict, info


def _check_tensor_dtype(array: np.ndarray, path: str, name: str) -> None:
    if array.dtype.kind not in "biufc" and array.dtype not in TORCH_NAME_FOR_DTYPE:
        raise CheckpointFormatError(f"{path}: entry '{name}' has dtype {array.dtype}, which is not a tensor dtype")


def save_npz(file: BinaryIO, state_dict: dict[str, np.ndarray], extra: dict, path: str) -> None:
    """Plain torch names; with extra, the golden layout ('param/<name>' + JSON 'meta') so nothing collides.

    numpy cannot describe bfloat16 in .npy headers, so bfloat16 is widened to float32 (exact).
    """
    golden_layout = bool(extra) or "meta" in state_dict  # a tensor named 'meta' would read back as metadata
    arrays = {}
    for name, value in state_dict.items():
        array = c_contiguous(value)
        if array.dtype == np.dtype(ml_dtypes.bfloat16):
            array = array.astype(np.float32)
        elif array.dtype.kind == "V" or array.dtype.type.__module__.startswith("ml_dtypes"):
            raise CheckpointFormatError(f"{path}: tensor '{name}' has dtype {array.dtype}, which .npz cannot hold")
        arrays[f"param/{name}" if golden_layout else name] = array
    if extra:
        arrays["meta"] = np.asarray(extra_as_json(extra, path))
    np.savez(file, **arrays)
