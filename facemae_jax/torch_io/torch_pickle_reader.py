"""The restricted reader of ``torch.save`` files: the zip container (torch >= 1.6) and the legacy stream of pickles
(torch < 1.6).

``<archive>/data.pkl`` (or the legacy main pickle) is read by a :class:`pickle.Unpickler` whose ``find_class`` hands
out only harmless stand-ins from an allow-list, so a hostile file cannot execute code; it can only fail with a
:class:`~facemae_jax.torch_io.common.CheckpointFormatError`. Tensors come back as references to storages, whose bytes
are read (and checked against the declared sizes) only when the tensor is materialised.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any, BinaryIO, Iterator, Protocol

import numpy as np

from facemae_jax.torch_io.common import (
    STORAGE_CLASS_DTYPES,
    TORCH_DTYPES,
    CheckpointFormatError,
    decode_storage,
    dtype_label,
)


class _BadPickleContent(Exception):
    """Raised by the unpickling stand-ins, which do not know the file; :func:`_unpickle` adds it."""


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
        raise _BadPickleContent(f"_rebuild_tensor_v3 over a {dtype_label(storage.dtype)} storage asks for "
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
    for name, dtype in STORAGE_CLASS_DTYPES.items():
        allowed[("torch", name)] = _StorageClass(name, dtype)
        allowed[("torch.cuda", name)] = _StorageClass(name, dtype)
    for name, dtype in TORCH_DTYPES.items():
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
                                        f"dtype or size ({dtype_label(root.dtype)}[{root.root_numel}] vs "
                                        f"{dtype_label(storage_class.dtype)}[{numel}])")
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
            f"declares {storage.root_numel} {dtype_label(storage.dtype)} elements ({expected} bytes)")
    start = storage.view_offset * storage.dtype.itemsize
    window = memoryview(raw)[start:start + storage.numel * storage.dtype.itemsize]
    if len(window) % dtype.itemsize:
        raise CheckpointFormatError(f"{storages.path}: storage '{storage.key}' of {where} has {len(window)} bytes, "
                                    f"not a whole number of {dtype_label(dtype)} elements")
    flat = decode_storage(window, dtype, storages.big_endian)
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
# The two torch containers
# ----------------------------------------------------------------------------------------------------------

_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL_VERSION = 1001


def load_torch_zip(path: str, archive: zipfile.ZipFile) -> tuple[dict[str, np.ndarray], dict]:
    pickles = [n for n in archive.namelist() if is_torch_pickle_name(n)]
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


def is_torch_pickle_name(name: str) -> bool:
    """'<archive>/data.pkl' (torch names the folder after the file; old versions call it 'archive')."""
    return name == "data.pkl" or (name.endswith("/data.pkl") and name.count("/") == 1)


def is_legacy_torch(file: BinaryIO) -> bool:
    """The pre-zip format starts with the pickled magic number; any other pickle is not a checkpoint."""
    file.seek(0)
    try:
        first = _RestrictedUnpickler(file, "").load()
    except Exception:
        return False
    return first == _LEGACY_MAGIC_NUMBER


def load_torch_legacy(path: str, file: BinaryIO) -> tuple[dict[str, np.ndarray], dict]:
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
