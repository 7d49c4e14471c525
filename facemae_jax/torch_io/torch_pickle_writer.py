"""The ``.pth`` writer: what ``torch.save`` produces for a dict of tensors, without torch.

Pickle protocol 2 written opcode by opcode (the torch globals cannot be pickled without importing torch), the same
globals, storages stored uncompressed and 64-byte aligned, the ``byteorder`` / ``version`` / ``.format_version`` /
``.storage_alignment`` / ``.data/serialization_id`` records — so that ``torch.load(path, weights_only=True)``
accepts it and can memory-map it. The output is deterministic: the same arrays give the same bytes.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import struct
import zlib
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np

from facemae_jax.torch_io.common import (
    STORAGE_CLASS_FOR_DTYPE,
    TORCH_NAME_FOR_DTYPE,
    CheckpointFormatError,
    c_contiguous,
)

# ----------------------------------------------------------------------------------------------------------
# Pickle protocol 2 by hand (the torch globals cannot be pickled without importing torch)
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
        array = c_contiguous(array)
        if array.dtype not in TORCH_NAME_FOR_DTYPE:
            raise CheckpointFormatError(f"{self._source}: {where} has dtype {array.dtype}, which torch cannot store")
        key = self._storage_keys.get(id(original))
        if key is None:
            key = str(len(self.storages))
            self.storages.append(_StorageToWrite(key, array))
            self._storage_keys[id(original)] = key
            self._keep_alive.append(original)
        storage_class = STORAGE_CLASS_FOR_DTYPE.get(array.dtype)
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
            self.global_("torch", TORCH_NAME_FOR_DTYPE[array.dtype])
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


# ----------------------------------------------------------------------------------------------------------
# Zip container laid out like torch's PyTorchStreamWriter
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


def save_pth(path: str, file: BinaryIO, state_dict: dict[str, np.ndarray], extra: dict) -> None:
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
