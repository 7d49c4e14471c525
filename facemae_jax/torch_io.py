"""PyTorch checkpoints in and out, without torch.

The official MAE-DFER / SVFAP weights are ``torch.save`` files, and people who fine-tune with the JAX port
want to hand their weights back to the PyTorch code. Installing torch only to move arrays across is heavy
and, for ``.pth`` files, unsafe: ``torch.load(weights_only=False)`` — the only way torch reads the official
checkpoints, because they pickle an ``argparse.Namespace`` — runs whatever the pickle asks for. This module
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
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import pickle
import struct
import sys
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any, BinaryIO, Iterator, Protocol

import ml_dtypes
import numpy as np

__all__ = ["CheckpointFormatError", "load_state_dict", "save_state_dict"]


class CheckpointFormatError(ValueError):
    """A file is not a checkpoint, is damaged, or asks for something unsafe; the message names file and entry."""


class _BadPickleContent(Exception):
    """Raised by the unpickling stand-ins, which do not know the file; :func:`_unpickle` adds it."""


# ----------------------------------------------------------------------------------------------------------
# dtype tables (torch name <-> numpy dtype)
# ----------------------------------------------------------------------------------------------------------

# Legacy typed storage classes: the pickle names one per tensor ('torch', 'FloatStorage'); CUDA checkpoints
# written by torch 1.x name 'torch.cuda.FloatStorage' instead. numel counts elements of that dtype.
_STORAGE_CLASS_DTYPES: dict[str, np.dtype] = {
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
_TORCH_DTYPES: dict[str, np.dtype] = {
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

_STORAGE_CLASS_FOR_DTYPE = {dtype: name for name, dtype in _STORAGE_CLASS_DTYPES.items()}
_TORCH_NAME_FOR_DTYPE = {dtype: name for name, dtype in _TORCH_DTYPES.items()}


def _dtype_label(dtype: np.dtype) -> str:
    return "bfloat16" if dtype == np.dtype(ml_dtypes.bfloat16) else dtype.name


# ----------------------------------------------------------------------------------------------------------
# What the restricted unpickler builds instead of torch objects
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _StorageClass:
    """Stand-in for ``torch.FloatStorage`` & co: only its element dtype matters."""

    name: str
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _StorageRef:
    """A storage named by a persistent id; its bytes are read only when a tensor on it is materialised.

    ``numel`` counts elements of ``dtype``. Legacy files may hand out a view of a root storage: then
    ``view_offset`` / ``numel`` select elements of the root, whose full size is ``root_numel``.
    """

    key: str
    dtype: np.dtype
    root_numel: int
    view_offset: int = 0
    view_numel: int | None = None

    @property
    def numel(self) -> int:
        return self.root_numel if self.view_numel is None else self.view_numel


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    """A tensor as ``_rebuild_tensor_v2`` describes it: a strided window (in elements) onto a storage."""

    storage: _StorageRef
    offset: int
    size: tuple
    stride: tuple
    dtype: np.dtype  # differs from storage.dtype only for _rebuild_tensor_v3 over an UntypedStorage

    @property
    def nbytes(self) -> int:
        return math.prod(self.size) * self.dtype.itemsize


def _tensor_ref(function: str, storage: Any, offset: Any, size: Any, stride: Any, dtype: np.dtype) -> _TensorRef:
    """Check the geometry a rebuild function received, so later code can trust it."""
    if not isinstance(storage, _StorageRef):
        raise _BadPickleContent(f"{function} got a {type(storage).__name__} instead of a storage")
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or not all(map(_is_count, size + stride)) or not _is_count(offset):
        raise _BadPickleContent(f"{function} got malformed geometry (storage '{storage.key}', offset {offset!r}, "
                                f"size {size!r}, stride {stride!r})")
    return _TensorRef(storage, offset, size, stride, dtype)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """Stand-in for ``torch._utils._rebuild_tensor_v2``; gradient flags and hooks are irrelevant here."""
    return _tensor_ref("_rebuild_tensor_v2", storage, storage_offset, size, stride,
                       getattr(storage, "dtype", None))


def _rebuild_tensor(storage, storage_offset, size, stride):
    """Stand-in for ``torch._utils._rebuild_tensor`` (written by torch < 1.0, still found in old files)."""
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
    """Stand-in for ``torch._utils._rebuild_tensor_v3``, used for dtypes without a typed storage class.

    uint16, uint32, float8 and the like are stored as an ``UntypedStorage`` of bytes plus an explicit dtype;
    the storage offset counts dtype elements, so the bytes are reinterpreted as that dtype first.
    """
    if not isinstance(dtype, _TorchDtype):
        raise _BadPickleContent(f"_rebuild_tensor_v3 got {dtype!r} instead of a torch dtype")
    if isinstance(storage, _StorageRef) and storage.dtype.itemsize != 1 and storage.dtype != dtype.dtype:
        raise _BadPickleContent(f"_rebuild_tensor_v3 over a {_dtype_label(storage.dtype)} storage asks for "
                                f"dtype {dtype.name}")
    return _tensor_ref("_rebuild_tensor_v3", storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    """Stand-in for ``torch._utils._rebuild_parameter[_with_state]``: a Parameter is just its tensor here."""
    return data


@dataclasses.dataclass(frozen=True)
class _TorchDtype:
    """Stand-in for a ``torch.<dtype>`` global; shown to the caller as the string ``'torch.<name>'``."""

    name: str
    dtype: np.dtype


def _torch_device(*args) -> str:
    """Stand-in for ``torch.device``: ('cuda', 0) -> 'cuda:0'."""
    return ":".join(str(a) for a in args)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode``, which protocol-2 pickles use to carry ``bytes``."""
    if encoding not in ("latin1", "latin-1"):
        raise _BadPickleContent(f"_codecs.encode with encoding {encoding!r} (only latin1 carries bytes)")
    return text.encode("latin1")


def _numpy_scalar(dtype, data=None):
    """Stand-in for ``numpy.core.multiarray.scalar`` (numpy scalars in training args or metrics)."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise _BadPickleContent(f"numpy scalar of dtype {dtype!r} is not a plain number")
    if len(data) != dtype.itemsize:
        raise _BadPickleContent(f"numpy scalar of dtype {dtype} carries {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype)[0].item()


def _numpy_dtype(spec, align=False, copy=False):
    """Stand-in for ``numpy.dtype`` that refuses object dtypes (they would smuggle arbitrary objects)."""
    dtype = np.dtype(spec, align=align, copy=copy)
    if dtype.hasobject:
        raise _BadPickleContent("numpy object dtype in a checkpoint pickle is refused")
    return dtype


def _build_allowed_globals() -> dict[tuple[str, str], Any]:
    """Every global a training checkpoint may name, mapped to a harmless stand-in.

    Nothing here can run code of the file's choosing: the callables only build plain containers, numbers
    or the reference records above. ``argparse.Namespace`` is the real class (it only stores attributes).
    """
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch", "Size"): lambda dims=(): tuple(dims),
        ("torch", "device"): _torch_device,
        ("torch.storage", "UntypedStorage"): _StorageClass("UntypedStorage", np.dtype(np.uint8)),
        ("argparse", "Namespace"): argparse.Namespace,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("builtins", "bytearray"): bytearray,
        ("_codecs", "encode"): _latin1_encode,
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
        ("numpy", "dtype"): _numpy_dtype,
    }
    for name, dtype in _STORAGE_CLASS_DTYPES.items():
        allowed[("torch", name)] = _StorageClass(name, dtype)
        allowed[("torch.cuda", name)] = _StorageClass(name, dtype)
    for name, dtype in _TORCH_DTYPES.items():
        allowed[("torch", name)] = _TorchDtype(name, dtype)
    return allowed


_ALLOWED_GLOBALS = _build_allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and turns storage ids into :class:`_StorageRef`.

    ``legacy=True`` accepts the 6-field ids of the pre-zip format, whose last field may describe a view.
    """

    def __init__(self, file: BinaryIO, where: str, legacy: bool = False):
        super().__init__(file, encoding="utf-8")
        self._where = where
        self._legacy = legacy
        self.storages: dict[str, _StorageRef] = {}  # root storages seen, by key

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointFormatError(
                f"{self._where}: the pickle asks for global '{module}.{name}', which is not on the allow-list "
                "of checkpoint globals (tensors, storages, OrderedDict, argparse.Namespace, plain builtins); "
                "refusing to load it") from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        expected = 6 if self._legacy else 5
        if not (isinstance(pid, tuple) and len(pid) == expected and pid[0] in ("storage", b"storage")):
            raise CheckpointFormatError(f"{self._where}: unexpected persistent id {pid!r:.200} "
                                        f"(expected ('storage', type, key, location, numel{', view' * self._legacy}))")
        storage_class, key, _location, numel = pid[1:5]
        if not isinstance(storage_class, _StorageClass):
            raise CheckpointFormatError(f"{self._where}: persistent id names {storage_class!r} as storage type")
        key = key.decode("ascii") if isinstance(key, bytes) else key
        if not isinstance(key, str) or not _is_count(numel):
            raise CheckpointFormatError(f"{self._where}: malformed persistent id {pid!r:.200}")
        root = self.storages.setdefault(key, _StorageRef(key, storage_class.dtype, numel))
        if root.dtype != storage_class.dtype or root.root_numel != numel:
            raise CheckpointFormatError(f"{self._where}: storage '{key}' is declared twice with different "
                                        f"dtype or size ({_dtype_label(root.dtype)}[{root.root_numel}] vs "
                                        f"{_dtype_label(storage_class.dtype)}[{numel}])")
        view = pid[5] if self._legacy else None
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3 and _is_count(view[1]) and _is_count(view[2])):
            raise CheckpointFormatError(f"{self._where}: malformed storage view {view!r:.200} of storage '{key}'")
        _view_key, view_offset, view_numel = view
        if view_offset + view_numel > numel:
            raise CheckpointFormatError(f"{self._where}: view [{view_offset}, {view_offset + view_numel}) lies "
                                        f"outside storage '{key}' of {numel} elements")
        return dataclasses.replace(root, view_offset=view_offset, view_numel=view_numel)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _unpickle(file: BinaryIO, where: str, legacy: bool = False) -> tuple[Any, dict[str, _StorageRef]]:
    unpickler = _RestrictedUnpickler(file, where, legacy=legacy)
    try:
        return unpickler.load(), unpickler.storages
    except CheckpointFormatError:
        raise
    except _BadPickleContent as exc:
        raise CheckpointFormatError(f"{where}: {exc}") from None
    except Exception as exc:  # a damaged pickle can fail in many ways; all mean the same to the caller
        raise CheckpointFormatError(f"{where}: cannot unpickle ({type(exc).__name__}: {exc})") from exc


# ----------------------------------------------------------------------------------------------------------
# Storage bytes -> numpy
# ----------------------------------------------------------------------------------------------------------


class _StorageReader(Protocol):
    """Fetches the raw bytes of a root storage; one implementation per container format."""

    path: str
    big_endian: bool

    def read(self, key: str, where: str) -> bytes: ...


class _ZipStorageReader:
    def __init__(self, path: str, archive: zipfile.ZipFile, prefix: str, big_endian: bool):
        self.path, self._archive, self._prefix, self.big_endian = path, archive, prefix, big_endian

    def read(self, key: str, where: str) -> bytes:
        name = f"{self._prefix}data/{key}"
        try:
            return self._archive.read(name)
        except KeyError:
            raise CheckpointFormatError(f"{self.path}: storage record '{name}' of {where} is missing") from None
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
            raise CheckpointFormatError(f"{self.path}: storage record '{name}' of {where} is damaged ({exc})") from exc


class _LegacyStorageReader:
    """Storages of the pre-zip format: after the pickles, per key an int64 element count and the bytes."""

    def __init__(self, path: str, file: BinaryIO, spans: dict[str, tuple[int, int]], big_endian: bool):
        self.path, self._file, self._spans, self.big_endian = path, file, spans, big_endian

    def read(self, key: str, where: str) -> bytes:
        if key not in self._spans:
            raise CheckpointFormatError(f"{self.path}: storage '{key}' of {where} is not in the storage list")
        start, nbytes = self._spans[key]
        self._file.seek(start)
        return self._file.read(nbytes)


def _tensor_to_array(ref: _TensorRef, storages: _StorageReader, where: str) -> np.ndarray:
    """Read the storage of ``ref`` and copy its strided window out as a C-contiguous, native-order array."""
    storage, dtype = ref.storage, ref.dtype
    raw = storages.read(storage.key, where)
    expected = storage.root_numel * storage.dtype.itemsize
    if len(raw) != expected:
        raise CheckpointFormatError(
            f"{storages.path}: storage '{storage.key}' of {where} holds {len(raw)} bytes, but the pickle "
            f"declares {storage.root_numel} {_dtype_label(storage.dtype)} elements ({expected} bytes)")
    start = storage.view_offset * storage.dtype.itemsize
    window = memoryview(raw)[start:start + storage.numel * storage.dtype.itemsize]
    if len(window) % dtype.itemsize:
        raise CheckpointFormatError(f"{storages.path}: storage '{storage.key}' of {where} has {len(window)} bytes, "
                                    f"not a whole number of {_dtype_label(dtype)} elements")
    flat = _decode(window, dtype, storages.big_endian)
    if 0 in ref.size:
        return np.zeros(ref.size, dtype=dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if last >= flat.size:
        raise CheckpointFormatError(
            f"{storages.path}: {where} (offset {ref.offset}, size {ref.size}, stride {ref.stride}) reaches "
            f"element {last}, but its storage '{storage.key}' has only {flat.size} elements")
    window_view = np.lib.stride_tricks.as_strided(
        flat[ref.offset:], shape=ref.size, strides=[s * dtype.itemsize for s in ref.stride], writeable=False)
    return np.array(window_view, dtype=dtype, order="C", copy=True)


def _decode(raw: bytes | memoryview | bytearray, dtype: np.dtype, big_endian: bool) -> np.ndarray:
    """Raw storage bytes -> 1-D native-order array of ``dtype`` (a view of ``raw`` when no swap is needed)."""
    if dtype.itemsize == 1 or big_endian == (sys.byteorder == "big"):
        return np.frombuffer(raw, dtype=dtype)
    order = ">" if big_endian else "<"
    if dtype.type.__module__.startswith("ml_dtypes"):
        # ml_dtypes types have no byte-order variants: swap through the unsigned integer of the same width.
        return np.frombuffer(raw, dtype=np.dtype(f"{order}u{dtype.itemsize}")).astype(f"=u{dtype.itemsize}").view(dtype)
    return np.frombuffer(raw, dtype=dtype.newbyteorder(order)).astype(dtype)


# ----------------------------------------------------------------------------------------------------------
# Unpickled object -> plain Python
# ----------------------------------------------------------------------------------------------------------


def _to_plain(obj: Any, storages: _StorageReader, where: str) -> Any:
    """Replace tensor references by numpy arrays, Namespaces and OrderedDicts by dicts, numpy scalars by numbers."""
    if isinstance(obj, _TensorRef):
        return _tensor_to_array(obj, storages, where)
    if isinstance(obj, _StorageRef):
        return _tensor_to_array(_TensorRef(obj, 0, (obj.numel,), (1,), obj.dtype), storages, where)
    if isinstance(obj, argparse.Namespace):
        return {k: _to_plain(v, storages, f"{where}.{k}") for k, v in vars(obj).items()}
    if isinstance(obj, Mapping):
        return {k: _to_plain(v, storages, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [_to_plain(v, storages, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else type(obj)(items)
    if isinstance(obj, _TorchDtype):
        return f"torch.{obj.name}"
    if isinstance(obj, _StorageClass):
        return f"torch.{obj.name}"
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _iter_tensor_refs(obj: Any) -> Iterator[_TensorRef]:
    if isinstance(obj, _TensorRef):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _iter_tensor_refs(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _iter_tensor_refs(v)


def _summarise_optimizer(optimizer: Any, storages: _StorageReader, where: str) -> Any:
    """Optimizer state: keep the hyper-parameters, count the moment tensors instead of reading them.

    The AdamW moments are twice the model's size and the JAX side re-initialises its optimizer anyway.
    """
    if not (isinstance(optimizer, Mapping) and isinstance(optimizer.get("state"), Mapping)
            and isinstance(optimizer.get("param_groups"), list)):
        return _to_plain(optimizer, storages, where)
    refs = list(_iter_tensor_refs(optimizer["state"]))
    return {
        "param_groups": _to_plain(optimizer["param_groups"], storages, f"{where}['param_groups']"),
        "state_summary": {
            "parameters_with_state": len(optimizer["state"]),
            "tensors": len(refs),
            "nbytes": sum(ref.nbytes for ref in refs),
        },
    }


def _split_checkpoint(obj: Any, storages: _StorageReader, path: str) -> tuple[dict[str, np.ndarray], dict]:
    """CHECKPOINTS §1: the state dict is under 'model', else 'module', else the object itself."""
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{path}: the checkpoint holds a {type(obj).__name__}, not a dict")
    for key in ("model", "module"):
        if key in obj:
            state_key, raw_state = key, obj[key]
            break
    else:
        state_key, raw_state = None, obj
    where_state = f"'{state_key}'" if state_key else "the top-level dict"
    if not isinstance(raw_state, Mapping):
        raise CheckpointFormatError(f"{path}: {where_state} is a {type(raw_state).__name__}, not a state dict")
    state_dict: dict[str, np.ndarray] = {}
    for name, value in raw_state.items():
        if not isinstance(name, str) or not isinstance(value, _TensorRef):
            raise CheckpointFormatError(
                f"{path}: {where_state} is not a state dict: entry {name!r} is a {type(value).__name__}, not a "
                f"tensor (top-level keys: {sorted(map(str, obj))})")
        state_dict[name] = _tensor_to_array(value, storages, f"tensor '{name}'")
    info = {}
    if state_key is not None:
        for key, value in obj.items():
            if key == state_key:
                continue
            where = f"entry '{key}'"
            info[key] = (_summarise_optimizer(value, storages, where) if key == "optimizer"
                         else _to_plain(value, storages, where))
    return state_dict, info


# ----------------------------------------------------------------------------------------------------------
# Readers per container
# ----------------------------------------------------------------------------------------------------------

_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL_VERSION = 1001


def _load_torch_zip(path: str, archive: zipfile.ZipFile) -> tuple[dict[str, np.ndarray], dict]:
    pickles = [n for n in archive.namelist() if _is_torch_pickle_name(n)]
    if len(pickles) != 1:
        raise CheckpointFormatError(f"{path}: a torch zip checkpoint has one '<archive>/data.pkl'; "
                                    f"found {pickles or 'none'}")
    pkl_name = pickles[0]
    prefix = pkl_name[: -len("data.pkl")]
    byteorder = archive.read(f"{prefix}byteorder").strip() if f"{prefix}byteorder" in archive.namelist() \
        else b"little"  # torch < 1.11 wrote no byteorder record and only little-endian data
    if byteorder not in (b"little", b"big"):
        raise CheckpointFormatError(f"{path}: record '{prefix}byteorder' says {byteorder!r}")
    with archive.open(pkl_name) as f:
        obj, _ = _unpickle(f, f"{path}: '{pkl_name}'")
    storages = _ZipStorageReader(path, archive, prefix, big_endian=byteorder == b"big")
    return _split_checkpoint(obj, storages, path)


def _is_torch_pickle_name(name: str) -> bool:
    """'<archive>/data.pkl' (torch names the folder after the file; old versions call it 'archive')."""
    return name == "data.pkl" or (name.endswith("/data.pkl") and name.count("/") == 1)


def _is_legacy_torch(file: BinaryIO) -> bool:
    """The pre-zip format starts with the pickled magic number; any other pickle is not a checkpoint."""
    file.seek(0)
    try:
        first = _RestrictedUnpickler(file, "").load()
    except Exception:
        return False
    return first == _LEGACY_MAGIC_NUMBER


def _load_torch_legacy(path: str, file: BinaryIO) -> tuple[dict[str, np.ndarray], dict]:
    where = f"{path} (legacy torch.save format)"
    file.seek(0)
    _unpickle(file, where)  # magic number, checked by the caller
    version, _ = _unpickle(file, where)
    if version != _LEGACY_PROTOCOL_VERSION:
        raise CheckpointFormatError(f"{where}: protocol version {version!r}, expected {_LEGACY_PROTOCOL_VERSION}")
    sys_info, _ = _unpickle(file, where)
    little = sys_info.get("little_endian", True) if isinstance(sys_info, Mapping) else True
    obj, declared = _unpickle(file, f"{where}: main pickle", legacy=True)
    keys, _ = _unpickle(file, f"{where}: storage key list")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CheckpointFormatError(f"{where}: the storage key list is {type(keys).__name__}, not a list of str")

    position = file.tell()  # storages follow the key list (torch relies on this position too)
    file.seek(0, os.SEEK_END)
    end = file.tell()
    spans: dict[str, tuple[int, int]] = {}
    for key in keys:
        if key not in declared:
            raise CheckpointFormatError(f"{where}: storage '{key}' is listed but no tensor uses it")
        header = _read_exact(file, position, 8, f"{where}: size header of storage '{key}'")
        (numel,) = struct.unpack("<q" if little else ">q", header)
        if numel != declared[key].root_numel:
            raise CheckpointFormatError(f"{where}: storage '{key}' holds {numel} elements, the pickle declares "
                                        f"{declared[key].root_numel}")
        nbytes = numel * declared[key].dtype.itemsize
        if position + 8 + nbytes > end:
            raise CheckpointFormatError(f"{where}: storage '{key}' ends past the end of the file (truncated?)")
        spans[key] = (position + 8, nbytes)
        position += 8 + nbytes
    storages = _LegacyStorageReader(path, file, spans, big_endian=not little)
    return _split_checkpoint(obj, storages, path)


def _read_exact(file: BinaryIO, position: int, size: int, what: str) -> bytes:
    file.seek(position)
    data = file.read(size)
    if len(data) != size:
        raise CheckpointFormatError(f"{what}: file ends early (truncated?)")
    return data


def _load_npz(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """Torch names as keys; golden files prefix them with 'param/' and carry a JSON 'meta' and outputs."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            prefixed = any(n.startswith("param/") for n in names)
            state_dict, info = {}, {}
            for name in names:
                if name == "meta":
                    info = _decode_meta(npz[name], path)
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


def _decode_meta(value: np.ndarray, path: str) -> dict:
    try:
        meta = json.loads(str(value))
    except json.JSONDecodeError as exc:
        raise CheckpointFormatError(f"{path}: entry 'meta' is not JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise CheckpointFormatError(f"{path}: entry 'meta' holds a JSON {type(meta).__name__}, not an object")
    return meta


def _check_tensor_dtype(array: np.ndarray, path: str, name: str) -> None:
    if array.dtype.kind not in "biufc" and array.dtype not in _TORCH_NAME_FOR_DTYPE:
        raise CheckpointFormatError(f"{path}: entry '{name}' has dtype {array.dtype}, which is not a tensor dtype")


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
    "C64": np.complex64, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
_SAFETENSORS_WRITABLE = {np.dtype(t) for t in _SAFETENSORS_DTYPES.values()}
_SAFETENSORS_EXTRA_KEY = "facemae_jax.extra"  # metadata entry holding the JSON of save_state_dict's extra


def _load_safetensors(path: str, data: bytes) -> tuple[dict[str, np.ndarray], dict]:
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
        state_dict[name] = _decode(entry["data"], dtype, big_endian=False).reshape(entry["shape"])
    info: dict = {k: v for k, v in metadata.items() if k != _SAFETENSORS_EXTRA_KEY}
    if _SAFETENSORS_EXTRA_KEY in metadata:
        info.update(_decode_meta(np.asarray(metadata[_SAFETENSORS_EXTRA_KEY]), path))
    return state_dict, info


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
        if head.startswith(b"\x80") and _is_legacy_torch(file):
            return _load_torch_legacy(path, file)
        if len(head) >= 9 and head[8:9] == b"{":
            file.seek(0)
            return _load_safetensors(path, file.read())
    raise CheckpointFormatError(f"{path}: not a checkpoint (neither a torch.save file, an .npz nor a .safetensors)")


def _load_zip_container(path: str, file: BinaryIO) -> tuple[dict[str, np.ndarray], dict]:
    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointFormatError(f"{path}: damaged or truncated zip container ({exc})") from exc
    with archive:
        names = archive.namelist()
        try:
            if any(_is_torch_pickle_name(n) for n in names):
                return _load_torch_zip(path, archive)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:  # damaged records
            raise CheckpointFormatError(f"{path}: damaged zip record ({exc})") from exc
        if names and all(n.endswith(".npy") for n in names):
            return _load_npz(path)
    raise CheckpointFormatError(f"{path}: zip file with neither '<archive>/data.pkl' (torch) nor .npy members (npz)")


# ----------------------------------------------------------------------------------------------------------
# Writing: pickle protocol 2 by hand (the torch globals cannot be pickled without importing torch)
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _StorageToWrite:
    key: str
    array: np.ndarray  # C-contiguous, native (= little-endian, see save_state_dict) byte order


class _TorchPickleWriter:
    """Emits the protocol-2 opcode stream that ``torch.save`` (CPython's pickler) emits for a checkpoint dict.

    ``pickle.Pickler`` cannot write ``torch._utils._rebuild_tensor_v2`` without importing torch (it checks
    that every global resolves), so the few opcodes needed are written directly, with CPython's memo
    discipline (a BINPUT after every string, global, non-empty tuple, dict, list and REDUCE result; a BINGET
    when a global or string comes again) and batching. For dicts of tensors and plain values the result is
    byte for byte what torch writes, which the tests check against a torch-made pickle.
    """

    _BATCH = 1000  # CPython's batch size for SETITEMS / APPENDS

    def __init__(self, source: str):
        self._out = bytearray(b"\x80\x02")  # PROTO 2
        self._memo: dict[Any, int] = {}  # memo index of globals and strings, for BINGET
        self._memo_size = 0
        self._source = source
        self.storages: list[_StorageToWrite] = []
        self._storage_keys: dict[int, str] = {}  # id(array) -> key, so tied arrays share one storage
        self._keep_alive: list[Any] = []  # keeps id()s above unique while writing

    def finish(self) -> bytes:
        self._out += b"."  # STOP
        return bytes(self._out)

    # -- memo --------------------------------------------------------------------------------------------
    def _put(self, key: Any = None) -> None:
        """BINPUT the object just built; ``key`` makes it findable for a later BINGET."""
        index = self._memo_size
        self._memo_size += 1
        if key is not None:
            self._memo[key] = index
        self._out += b"q" + struct.pack("<B", index) if index < 256 else b"r" + struct.pack("<I", index)

    def _get(self, key: Any) -> bool:
        index = self._memo.get(key)
        if index is None:
            return False
        self._out += b"h" + struct.pack("<B", index) if index < 256 else b"j" + struct.pack("<I", index)
        return True

    # -- scalars -----------------------------------------------------------------------------------------
    def global_(self, module: str, name: str) -> None:
        key = ("global", module, name)
        if not self._get(key):
            self._out += b"c" + f"{module}\n{name}\n".encode("ascii")
            self._put(key)

    def str_(self, text: str, where: str) -> None:
        key = ("str", text)
        if self._get(key):
            return
        try:
            encoded = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise CheckpointFormatError(f"{self._source}: {where} is not valid unicode ({exc})") from exc
        self._out += b"X" + struct.pack("<I", len(encoded)) + encoded
        self._put(key)

    def int_(self, value: int, where: str) -> None:
        if 0 <= value < 256:
            self._out += b"K" + struct.pack("<B", value)
        elif 0 <= value < 65536:
            self._out += b"M" + struct.pack("<H", value)
        elif -(2 ** 31) <= value < 2 ** 31:
            self._out += b"J" + struct.pack("<i", value)
        else:  # LONG1: minimal two's-complement little-endian bytes, as pickle.encode_long
            encoded = value.to_bytes((value.bit_length() >> 3) + 1, "little", signed=True)
            if value < 0 and len(encoded) > 1 and encoded[-1] == 0xFF and encoded[-2] & 0x80:
                encoded = encoded[:-1]
            if len(encoded) > 255:
                raise CheckpointFormatError(f"{self._source}: {where} = {value} is too large an integer")
            self._out += b"\x8a" + struct.pack("<B", len(encoded)) + encoded

    # -- containers --------------------------------------------------------------------------------------
    def tuple_(self, items: tuple, where: str) -> None:
        if not items:
            self._out += b")"  # EMPTY_TUPLE is not memoised
            return
        if len(items) > 3:
            self._out += b"("
        for i, item in enumerate(items):
            self.value(item, f"{where}[{i}]")
        self._out += {1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(items), b"t")
        self._put()

    def _set_items(self, items: Mapping, where: str) -> None:
        pairs = list(items.items())
        for start in range(0, len(pairs), self._BATCH):
            batch = pairs[start:start + self._BATCH]
            if len(batch) > 1:
                self._out += b"("
            for key, value in batch:
                if isinstance(key, bool) or not isinstance(key, (str, int)):
                    raise CheckpointFormatError(f"{self._source}: {where} has key {key!r} of type "
                                                f"{type(key).__name__}; only str and int keys can be stored")
                self.value(key, where)
                self.value(value, f"{where}[{key!r}]")
            self._out += b"u" if len(batch) > 1 else b"s"  # SETITEMS / SETITEM

    def _append_items(self, items: list, where: str) -> None:
        for start in range(0, len(items), self._BATCH):
            batch = items[start:start + self._BATCH]
            if len(batch) > 1:
                self._out += b"("
            for i, item in enumerate(batch, start):
                self.value(item, f"{where}[{i}]")
            self._out += b"e" if len(batch) > 1 else b"a"  # APPENDS / APPEND

    def value(self, obj: Any, where: str) -> None:
        if obj is None:
            self._out += b"N"
        elif isinstance(obj, (bool, np.bool_)):
            self._out += b"\x88" if obj else b"\x89"
        elif isinstance(obj, (int, np.integer)):
            self.int_(int(obj), where)
        elif isinstance(obj, (float, np.floating)):
            self._out += b"G" + struct.pack(">d", float(obj))
        elif isinstance(obj, str):
            self.str_(obj, where)
        elif isinstance(obj, tuple):
            self.tuple_(obj, where)
        elif isinstance(obj, list):
            self._out += b"]"
            self._put()
            self._append_items(obj, where)
        elif isinstance(obj, collections.OrderedDict):
            self.ordered_dict(obj, where)
        elif isinstance(obj, dict):
            self._out += b"}"
            self._put()
            self._set_items(obj, where)
        elif isinstance(obj, np.ndarray):
            self.tensor(obj, where)
        else:
            raise CheckpointFormatError(
                f"{self._source}: {where} is a {type(obj).__name__}; a checkpoint entry may hold None, bool, "
                "int, float, str, list, tuple, dict or numpy arrays")

    def ordered_dict(self, items: collections.OrderedDict, where: str) -> None:
        """``OrderedDict()`` then its items, as a torch state_dict() pickles — without the ``_metadata``
        attribute, which only records module versions and which torch treats as optional."""
        self.global_("collections", "OrderedDict")
        self._out += b")R"  # EMPTY_TUPLE REDUCE
        self._put()
        self._set_items(items, where)

    # -- tensors -----------------------------------------------------------------------------------------
    def tensor(self, array: np.ndarray, where: str) -> None:
        """``_rebuild_tensor_v2(storage, 0, size, contiguous stride, False, OrderedDict())``.

        dtypes without a legacy typed storage (uint16/32/64) go through ``_rebuild_tensor_v3`` with an
        ``UntypedStorage`` of bytes and an explicit dtype, as torch 2 writes them.
        """
        original = array
        array = _c_contiguous(array)
        if array.dtype not in _TORCH_NAME_FOR_DTYPE:
            raise CheckpointFormatError(f"{self._source}: {where} has dtype {array.dtype}, which torch cannot store")
        key = self._storage_keys.get(id(original))
        if key is None:
            key = str(len(self.storages))
            self.storages.append(_StorageToWrite(key, array))
            self._storage_keys[id(original)] = key
            self._keep_alive.append(original)
        storage_class = _STORAGE_CLASS_FOR_DTYPE.get(array.dtype)
        self.global_("torch._utils", "_rebuild_tensor_v2" if storage_class else "_rebuild_tensor_v3")
        self._out += b"("  # MARK: arguments of the rebuild function
        self._out += b"("  # MARK: persistent id ('storage', storage type, key, location, numel)
        self.str_("storage", where)
        if storage_class:
            self.global_("torch", storage_class)
        else:
            self.global_("torch.storage", "UntypedStorage")
        self.str_(key, where)
        self.str_("cpu", where)
        self.int_(array.size if storage_class else array.nbytes, where)
        self._out += b"t"
        self._put()
        self._out += b"Q"  # BINPERSID
        self.int_(0, where)  # storage offset
        self.tuple_(tuple(array.shape), where)
        self.tuple_(_contiguous_strides(array.shape), where)
        self._out += b"\x89"  # requires_grad=False
        self.global_("collections", "OrderedDict")
        self._out += b")R"  # backward_hooks = OrderedDict()
        self._put()
        if not storage_class:
            self.global_("torch", _TORCH_NAME_FOR_DTYPE[array.dtype])
        self._out += b"t"
        self._put()
        self._out += b"R"
        self._put()


def _contiguous_strides(shape: tuple) -> tuple:
    """Element strides of a C-contiguous tensor, computed as torch does (size-0 dims count as 1)."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _c_contiguous(array: np.ndarray) -> np.ndarray:
    """C-contiguous without copying when possible; unlike np.ascontiguousarray, keeps 0-d arrays 0-d."""
    return array if array.flags.c_contiguous else np.array(array, order="C", copy=True)


# ----------------------------------------------------------------------------------------------------------
# Writing: zip container laid out like torch's PyTorchStreamWriter
# ----------------------------------------------------------------------------------------------------------

_ALIGNMENT = 64  # torch aligns every record's data so storages can be memory-mapped
_ZIP64_LIMIT = 0xFFFFFFFF  # sizes / offsets at or above this need zip64 fields (module constant for tests)
_DOS_DATE_1980_01_01 = (0 << 9) | (1 << 5) | 1


class _AlignedZipWriter:
    """Stored (uncompressed) zip records whose data start on 64-byte boundaries.

    Like torch, the padding is an extra field with id 'FB' in the local header. Sizes and CRC are known
    before each record is written, so they go straight into the local header (no data descriptors).
    """

    def __init__(self, file: BinaryIO):
        self._file = file
        self._offset = 0
        self._central: list[bytes] = []

    def write(self, name: str, data: bytes | np.ndarray) -> int:
        """Append one record; returns its CRC-32."""
        payload = data if isinstance(data, bytes) else memoryview(data).cast("B")
        size, crc = len(payload), zlib.crc32(payload)
        encoded_name = name.encode("utf-8")
        big_size, big_offset = size >= _ZIP64_LIMIT, self._offset >= _ZIP64_LIMIT
        local_zip64 = struct.pack("<HHQQ", 1, 16, size, size) if big_size else b""
        header_len = 30 + len(encoded_name) + len(local_zip64) + 4
        padding = -(self._offset + header_len) % _ALIGNMENT
        extra = local_zip64 + struct.pack("<2sH", b"FB", padding) + b"Z" * padding
        version = 45 if (big_size or big_offset) else 20
        size32 = 0xFFFFFFFF if big_size else size
        local = struct.pack("<IHHHHHIIIHH", 0x04034B50, version, 0x0800, 0, 0, _DOS_DATE_1980_01_01, crc,
                            size32, size32, len(encoded_name), len(extra))
        self._file.write(local + encoded_name + extra)
        self._file.write(payload)

        central_zip64 = (struct.pack("<QQ", size, size) if big_size else b"") + \
            (struct.pack("<Q", self._offset) if big_offset else b"")
        central_extra = struct.pack("<HH", 1, len(central_zip64)) + central_zip64 if central_zip64 else b""
        self._central.append(struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, 45, version, 0x0800, 0, 0, _DOS_DATE_1980_01_01, crc, size32,
            size32, len(encoded_name), len(central_extra), 0, 0, 0, 0,
            0xFFFFFFFF if big_offset else self._offset) + encoded_name + central_extra)
        self._offset += len(local) + len(encoded_name) + len(extra) + size
        return crc

    def close(self) -> None:
        """Central directory, then zip64 end records (torch always writes them) and the classic end record."""
        cd_offset = self._offset
        directory = b"".join(self._central)
        self._file.write(directory)
        count, cd_size = len(self._central), len(directory)
        zip64_end_offset = cd_offset + cd_size
        self._file.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, cd_size, cd_offset))
        self._file.write(struct.pack("<IIQI", 0x07064B50, 0, zip64_end_offset, 1))
        self._file.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                                     min(cd_size, 0xFFFFFFFF), min(cd_offset, 0xFFFFFFFF), 0))


def _save_pth(path: str, file: BinaryIO, state_dict: dict[str, np.ndarray], extra: dict) -> None:
    """``{'model': OrderedDict(state_dict), **extra}`` as torch's zip format: pickle first, then storages."""
    writer = _TorchPickleWriter(path)
    writer.value({"model": collections.OrderedDict(state_dict), **extra}, "checkpoint")
    data_pkl = writer.finish()

    # torch names the archive folder after the file; the records come in torch's order.
    archive = os.path.splitext(os.path.basename(path))[0] or "archive"
    zip_writer = _AlignedZipWriter(file)
    zip_writer.write(f"{archive}/data.pkl", data_pkl)
    zip_writer.write(f"{archive}/.format_version", b"1")
    zip_writer.write(f"{archive}/.storage_alignment", str(_ALIGNMENT).encode())
    zip_writer.write(f"{archive}/byteorder", b"little")
    # torch draws the serialization id at random; a content hash is just as unique and keeps files reproducible.
    digest = hashlib.sha256(data_pkl)
    for storage in writer.storages:
        crc = zip_writer.write(f"{archive}/data/{storage.key}", _bytes_view(storage.array))
        digest.update(struct.pack("<I", crc))
    zip_writer.write(f"{archive}/version", b"3\n")
    serialization_id = str(int.from_bytes(digest.digest()[:20], "little") % 10 ** 40).zfill(40)
    zip_writer.write(f"{archive}/.data/serialization_id", serialization_id.encode())
    zip_writer.close()


def _bytes_view(array: np.ndarray) -> np.ndarray:
    """The bytes of a C-contiguous array without copying (also for 0-d and ml_dtypes arrays)."""
    return array.reshape(-1).view(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# Writing: npz / safetensors and the public entry point
# ----------------------------------------------------------------------------------------------------------


def _extra_as_json(extra: dict, path: str) -> str:
    """.npz and .safetensors carry extra as one JSON text; name the entry that JSON cannot hold."""
    for key, value in extra.items():
        try:
            json.dumps({key: value})
        except (TypeError, ValueError) as exc:
            raise CheckpointFormatError(f"{path}: extra[{key!r}] cannot be stored in this format, which keeps "
                                        f"extra as JSON ({exc})") from exc
    return json.dumps(extra)


def _save_npz(file: BinaryIO, state_dict: dict[str, np.ndarray], extra: dict, path: str) -> None:
    """Plain torch names; with extra, the golden layout ('param/<name>' + JSON 'meta') so nothing collides.

    numpy cannot describe bfloat16 in .npy headers, so bfloat16 is widened to float32 (exact).
    """
    golden_layout = bool(extra) or "meta" in state_dict  # a tensor named 'meta' would read back as metadata
    arrays = {}
    for name, value in state_dict.items():
        array = _c_contiguous(value)
        if array.dtype == np.dtype(ml_dtypes.bfloat16):
            array = array.astype(np.float32)
        elif array.dtype.kind == "V" or array.dtype.type.__module__.startswith("ml_dtypes"):
            raise CheckpointFormatError(f"{path}: tensor '{name}' has dtype {array.dtype}, which .npz cannot hold")
        arrays[f"param/{name}" if golden_layout else name] = array
    if extra:
        arrays["meta"] = np.asarray(_extra_as_json(extra, path))
    np.savez(file, **arrays)


def _save_safetensors(tmp_path: str, state_dict: dict[str, np.ndarray], extra: dict, path: str) -> None:
    from safetensors import TensorSpec, serialize_file  # noqa: PLC0415  (only needed for this format)

    keep_alive, specs = [], {}
    for name, value in state_dict.items():
        array = _c_contiguous(value)
        if array.dtype not in _SAFETENSORS_WRITABLE:
            raise CheckpointFormatError(f"{path}: tensor '{name}' has dtype {array.dtype}, which .safetensors "
                                        "cannot hold")
        keep_alive.append(array)
        specs[name] = TensorSpec(dtype=_dtype_label(array.dtype), shape=list(array.shape),
                                 data_ptr=array.ctypes.data, data_len=array.nbytes)
    metadata = {_SAFETENSORS_EXTRA_KEY: _extra_as_json(extra, path)} if extra else None
    try:
        serialize_file(specs, tmp_path, metadata=metadata)
    except Exception as exc:  # unknown dtype names and the like
        raise CheckpointFormatError(f"{path}: cannot write .safetensors ({exc})") from exc
    del keep_alive


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
        if array.dtype not in _TORCH_NAME_FOR_DTYPE:
            raise CheckpointFormatError(f"{path}: tensor '{name}' has dtype {array.dtype}, which is not a "
                                        f"tensor dtype (supported: {sorted(_TORCH_NAME_FOR_DTYPE.values())})")
        arrays[name] = array
    if extension in (".pth", ".pt"):
        bad = [k for k in extra if not isinstance(k, str) or k == "model"]
        if bad:
            raise CheckpointFormatError(f"{path}: extra keys must be str other than 'model'; got {bad!r}")
    with _atomic_target(path) as tmp:
        if extension == ".safetensors":
            _save_safetensors(tmp, arrays, extra, path)
            return
        with open(tmp, "wb") as file:
            if extension == ".npz":
                _save_npz(file, arrays, extra, path)
            else:
                _save_pth(path, file, arrays, extra)
