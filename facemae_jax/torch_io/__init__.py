"""PyTorch checkpoints in and out, without torch.

The official MAE-DFER / SVFAP weights are ``torch.save`` files, and people who fine-tune with the JAX port
want to hand their weights back to the PyTorch code. Installing torch only to move arrays across is heavy
and, for ``.pth`` files, unsafe: ``torch.load(weights_only=False)`` — the only way torch reads the official
checkpoints, because they pickle an ``argparse.Namespace`` — runs whatever the pickle asks for. This package
reads and writes the files directly:

* ``.pth`` (zip container, torch >= 1.6): ``<archive>/data.pkl`` is a pickle whose tensors are persistent
  ids pointing at raw little-endian storages ``<archive>/data/<key>``. The pickle is read by an
  :class:`pickle.Unpickler` whose ``find_class`` hands out only harmless stand-ins from an allow-list, so
  a hostile file cannot execute code; it can only fail with a :class:`CheckpointFormatError`.
* legacy ``.pth`` (``torch.save(..., _use_new_zipfile_serialization=False)``, torch < 1.6): a stream of
  pickles followed by the storages, read with the same unpickler.
* ``.npz`` (torch names as keys, optionally prefixed ``param/`` as in the golden files) and
  ``.safetensors``: the exchange formats of CHECKPOINTS.md §1.

Tensor values are returned bit for bit as stored: the caller casts. bfloat16 tensors come back as
``ml_dtypes.bfloat16`` arrays (same bits, no silent widening; ``.astype(np.float32)`` is exact).

The ``.pth`` writer produces what ``torch.save`` produces for a dict of tensors — pickle protocol 2, the
same globals, storages stored uncompressed and 64-byte aligned, the ``byteorder`` / ``version`` /
``.format_version`` / ``.storage_alignment`` / ``.data/serialization_id`` records — so that
``torch.load(path, weights_only=True)`` accepts it and can memory-map it. The output is deterministic:
the same arrays give the same bytes.

This module is the front door: :func:`load_state_dict` recognises the format from the content and
:func:`save_state_dict` from the extension, and each hands over to one module per format —
:mod:`~facemae_jax.torch_io.torch_pickle_reader` (restricted unpickler; zip and legacy containers),
:mod:`~facemae_jax.torch_io.torch_pickle_writer` (``.pth``), :mod:`~facemae_jax.torch_io.npz_format`,
:mod:`~facemae_jax.torch_io.safetensors_format`; :mod:`~facemae_jax.torch_io.common` holds the error type, the
dtype tables and the byte decoding they share.
"""

from __future__ import annotations

import contextlib
import os
import sys
import zipfile
import zlib
from collections.abc import Mapping
from typing import BinaryIO, Iterator

import numpy as np

from facemae_jax.torch_io.common import TORCH_NAME_FOR_DTYPE, CheckpointFormatError
from facemae_jax.torch_io.npz_format import load_npz, save_npz
from facemae_jax.torch_io.safetensors_format import load_safetensors, save_safetensors
from facemae_jax.torch_io.torch_pickle_reader import (
    is_legacy_torch,
    is_torch_pickle_name,
    load_torch_legacy,
    load_torch_zip,
)
from facemae_jax.torch_io.torch_pickle_writer import save_pth

__all__ = ["CheckpointFormatError", "load_state_dict", "save_state_dict"]

_ZIP_MAGIC = b"PK\x03\x04"


def load_state_dict(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """Read a checkpoint: ``(state_dict, info)``.

    The format is recognised from the content, not the extension: a torch zip (``.pth``), the legacy torch
    format, ``.npz`` or ``.safetensors``. ``state_dict`` maps PyTorch names to C-contiguous numpy arrays in
    the stored dtype (bfloat16 as ``ml_dtypes.bfloat16``). ``info`` holds the rest: for ``.pth`` the other
    top-level entries as plain Python (``epoch``, ``args`` as a dict, ``scaler``; ``optimizer`` summarised
    as its ``param_groups`` plus a ``state_summary`` count); for ``.npz`` / ``.safetensors`` the metadata
    written by :func:`save_state_dict` (the golden files' ``meta`` JSON).

    Raises :class:`CheckpointFormatError` (a ``ValueError``) naming the file and the entry at fault.
    """
    path = os.fspath(path)
    try:
        file = open(path, "rb")
    except OSError as exc:
        raise CheckpointFormatError(f"{path}: cannot open ({exc.strerror})") from exc
    with file:
        head = file.read(16)
        if head.startswith(_ZIP_MAGIC) or head.startswith(b"PK\x05\x06"):
            return _load_zip_container(path, file)
        if head.startswith(b"\x80") and is_legacy_torch(file):
            return load_torch_legacy(path, file)
        if len(head) >= 9 and head[8:9] == b"{":
            file.seek(0)
            return load_safetensors(path, file.read())
    raise CheckpointFormatError(f"{path}: not a checkpoint (neither a torch.save file, an .npz nor a .safetensors)")


def _load_zip_container(path: str, file: BinaryIO) -> tuple[dict[str, np.ndarray], dict]:
    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointFormatError(f"{path}: damaged or truncated zip container ({exc})") from exc
    with archive:
        names = archive.namelist()
        try:
            if any(is_torch_pickle_name(n) for n in names):
                return load_torch_zip(path, archive)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:  # damaged records
            raise CheckpointFormatError(f"{path}: damaged zip record ({exc})") from exc
        if names and all(n.endswith(".npy") for n in names):
            return load_npz(path)
    raise CheckpointFormatError(f"{path}: zip file with neither '<archive>/data.pkl' (torch) nor .npy members (npz)")


@contextlib.contextmanager
def _atomic_target(path: str) -> Iterator[str]:
    """Write beside the target and rename at the end, so a crash never leaves half a checkpoint at ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_SAVE_FORMATS = (".pth", ".pt", ".npz", ".safetensors")


def save_state_dict(path: str, state_dict: dict[str, np.ndarray], extra: dict | None = None) -> None:
    """Write ``state_dict`` (PyTorch names -> arrays) as ``.pth``/``.pt``, ``.npz`` or ``.safetensors``.

    ``.pth`` is ``{'model': OrderedDict(state_dict), **extra}`` in torch's zip format, loadable by
    ``torch.load(path, weights_only=True)``; ``extra`` may hold None, bool, int, float, str, lists, tuples,
    dicts and numpy arrays (stored as tensors). For ``.npz`` and ``.safetensors`` ``extra`` must be
    JSON-serialisable and comes back from :func:`load_state_dict` as ``info`` (tuples as lists). Arrays may
    be non-contiguous or jax arrays; they are written C-contiguous in their own dtype (``.npz``: bfloat16 as
    float32). Arrays that are the same object share one storage in ``.pth``, as tied torch parameters do.
    """
    path = os.fspath(path)
    extension = os.path.splitext(path)[1].lower()
    if extension not in _SAVE_FORMATS:
        raise CheckpointFormatError(f"{path}: unknown checkpoint extension {extension!r}; use one of {_SAVE_FORMATS}")
    if not isinstance(state_dict, Mapping):
        raise CheckpointFormatError(f"{path}: state_dict is a {type(state_dict).__name__}, not a mapping")
    if sys.byteorder != "little":
        raise CheckpointFormatError(f"{path}: writing checkpoints needs a little-endian host")
    extra = dict(extra or {})
    arrays: dict[str, np.ndarray] = {}
    for name, value in state_dict.items():
        if not isinstance(name, str):
            raise CheckpointFormatError(f"{path}: state_dict key {name!r} is not a str")
        array = value if isinstance(value, np.ndarray) else np.asarray(value)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("="))
        if array.dtype not in TORCH_NAME_FOR_DTYPE:
            raise CheckpointFormatError(f"{path}: tensor '{name}' has dtype {array.dtype}, which is not a "
                                        f"tensor dtype (supported: {sorted(TORCH_NAME_FOR_DTYPE.values())})")
        arrays[name] = array
    if extension in (".pth", ".pt"):
        bad = [k for k in extra if not isinstance(k, str) or k == "model"]
        if bad:
            raise CheckpointFormatError(f"{path}: extra keys must be str other than 'model'; got {bad!r}")
    with _atomic_target(path) as tmp:
        if extension == ".safetensors":
            save_safetensors(tmp, arrays, extra, path)
            return
        with open(tmp, "wb") as file:
            if extension == ".npz":
                save_npz(file, arrays, extra, path)
            else:
                save_pth(path, file, arrays, extra)
