"""Tests for facemae_jax.torch_io: PyTorch checkpoints read and written without torch.

Two blobs below were made by real torch 2.13 (CPU) in a throwaway venv; the code that made them is quoted
beside each, so they can be regenerated. Everything else is built by hand or from the golden files.
"""

from __future__ import annotations

import base64
import collections
import pathlib
import pickletools
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from facemae_jax import torch_io
from facemae_jax.torch_io import CheckpointFormatError, load_state_dict, save_state_dict

GOLDEN_PTH = "mae_dfer_finetune_tiny_seed0.pth"
GOLDEN_NPZ = "mae_dfer_finetune_tiny_seed0.npz"


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, shape and bytes (so -0.0 vs 0.0 or NaN payloads would count as different)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ---------------------------------------------------------------------------------------------------------
# The golden checkpoint
# ---------------------------------------------------------------------------------------------------------


def test_golden_pth_tensors_match_npz_bit_for_bit(golden_dir):
    state_dict, _ = load_state_dict(str(golden_dir / GOLDEN_PTH))
    with np.load(golden_dir / GOLDEN_NPZ) as npz:
        expected = {k[len("param/"):]: npz[k].astype(np.float32) for k in npz.files if k.startswith("param/")}
    assert len(state_dict) == len(expected) == 103
    assert list(state_dict) == list(expected)  # same order as model.state_dict()
    for name, array in state_dict.items():
        assert _bits_equal(array, expected[name]), name
        assert array.flags.c_contiguous and array.flags.writeable


def test_golden_pth_info(golden_dir):
    _, info = load_state_dict(str(golden_dir / GOLDEN_PTH))
    assert set(info) == {"optimizer", "epoch", "scaler", "args"}
    assert info["epoch"] == 9 and type(info["epoch"]) is int
    args = info["args"]
    assert isinstance(args, dict)
    assert args["lg_region_size"] == [2, 5, 10] and args["opt"] == "adamw" and args["model_ema"] is False
    assert info["scaler"] == {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                              "growth_interval": 2000, "_growth_tracker": 1}
    optimizer = info["optimizer"]
    assert len(optimizer["param_groups"]) == 10
    assert optimizer["param_groups"][-1]["params"] == [102]
    assert optimizer["param_groups"][0]["betas"] == (0.9, 0.999)
    # state for parameters 1, 2, 3, 102: step (0-d) + exp_avg + exp_avg_sq each, float32
    assert optimizer["state_summary"]["parameters_with_state"] == 4
    assert optimizer["state_summary"]["tensors"] == 12


def test_golden_npz_strips_param_prefix_and_reads_meta(golden_dir):
    state_dict, info = load_state_dict(str(golden_dir / GOLDEN_NPZ))
    assert len(state_dict) == 103 and "output" not in state_dict and "meta" not in state_dict
    assert all(a.dtype == np.float16 for a in state_dict.values())  # stored dtype kept; the caller casts
    assert info["kind"] == "golden" and info["format_version"] == 2


# ---------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------


def _mixed_state_dict() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((5, 7)).astype(np.float32)
    return {
        "blocks.0.attn.qkv.weight": rng.standard_normal((6, 4)).astype(np.float32),
        "half": rng.standard_normal((2, 3)).astype(np.float16),
        "double": rng.standard_normal(3),
        "index": np.array([[-3, 2 ** 40], [0, 7]], dtype=np.int64),
        "int32": np.arange(-2, 2, dtype=np.int32),
        "bytes": np.arange(5, dtype=np.uint8),
        "uint16": np.array([1, 65535], dtype=np.uint16),  # torch stores it via _rebuild_tensor_v3
        "mask": np.array([True, False, True]),
        "transposed": base.T,  # non-contiguous
        "strided": base[1:5:2, ::3],  # non-contiguous with offset
        "scalar": np.array(2.5, dtype=np.float32),  # 0-d
        "int_scalar": np.array(-7, dtype=np.int64),
        "empty": np.zeros((3, 0), dtype=np.float32),
        "conv": rng.standard_normal((4, 3, 2, 2, 2)).astype(np.float32),
    }


@pytest.mark.parametrize("extension", [".pth", ".npz", ".safetensors"])
def test_round_trip_keeps_dtype_shape_and_bits(tmp_path, extension):
    state_dict = _mixed_state_dict()
    extra = {"epoch": 3, "lr": 1.5e-4, "name": "fold-1 ünïcode", "best": None, "sizes": [2, 5, 10]}
    path = tmp_path / f"checkpoint{extension}"
    save_state_dict(str(path), state_dict, extra)
    loaded, info = load_state_dict(str(path))
    if extension == ".safetensors":
        assert set(loaded) == set(state_dict)  # the format sorts its entries
    else:
        assert list(loaded) == list(state_dict)
    for name, original in state_dict.items():
        assert _bits_equal(loaded[name], np.array(original, order="C")), name
        assert loaded[name].flags.c_contiguous and loaded[name].flags.writeable, name
    assert info == extra


@pytest.mark.parametrize("extension", [".pth", ".npz", ".safetensors"])
def test_round_trip_without_extra(tmp_path, extension):
    path = tmp_path / f"weights{extension}"
    save_state_dict(str(path), {"w": np.ones((2, 2), np.float32)})
    loaded, info = load_state_dict(str(path))
    assert list(loaded) == ["w"] and info == {}
    if extension == ".npz":  # plain torch names, as an exporter would write them
        with np.load(path) as npz:
            assert npz.files == ["w"]


def test_npz_tensor_named_meta_is_not_mistaken_for_metadata(tmp_path):
    save_state_dict(str(tmp_path / "m.npz"), {"meta": np.arange(3, dtype=np.float32)})
    loaded, info = load_state_dict(str(tmp_path / "m.npz"))
    assert loaded["meta"].tolist() == [0.0, 1.0, 2.0] and info == {}


@pytest.mark.parametrize("extension", [".pth", ".safetensors"])
def test_bfloat16_round_trip_keeps_bfloat16(tmp_path, extension):
    values = np.array([0.5, -3.0, 1e-3, 65504.0], dtype=np.float32).astype(ml_dtypes.bfloat16)
    path = tmp_path / f"bf16{extension}"
    save_state_dict(str(path), {"w": values})
    loaded, _ = load_state_dict(str(path))
    assert loaded["w"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert loaded["w"].view(np.uint16).tolist() == values.view(np.uint16).tolist()


def test_bfloat16_in_npz_is_widened_exactly(tmp_path):
    values = np.array([0.5, -3.0, 1e-3], dtype=np.float32).astype(ml_dtypes.bfloat16)
    save_state_dict(str(tmp_path / "bf16.npz"), {"w": values})
    loaded, _ = load_state_dict(str(tmp_path / "bf16.npz"))
    assert _bits_equal(loaded["w"], values.astype(np.float32))


def test_pth_extra_may_hold_tensors_and_containers(tmp_path):
    extra = {"ema": collections.OrderedDict(w=np.arange(3, dtype=np.int64)), "betas": (0.9, 0.999),
             "groups": [{"params": [0, 1]}, {"params": [2]}], "big": 2 ** 70, "negative": -2 ** 35, "empty": {}}
    save_state_dict(str(tmp_path / "c.pth"), {"w": np.zeros(2, np.float32)}, extra)
    _, info = load_state_dict(str(tmp_path / "c.pth"))
    assert info["ema"]["w"].tolist() == [0, 1, 2] and info["ema"]["w"].dtype == np.int64
    assert {k: v for k, v in info.items() if k != "ema"} == {k: v for k, v in extra.items() if k != "ema"}


# ---------------------------------------------------------------------------------------------------------
# The .pth writer against torch
# ---------------------------------------------------------------------------------------------------------

# data.pkl of `torch.save(ck, "archive.pth")` with torch 2.13, where
#   sd = collections.OrderedDict()
#   sd['w'] = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) / 8
#   sd['h'] = torch.tensor([1.5, -2.0], dtype=torch.float16)
#   sd['bf'] = torch.tensor([0.5, 3.0, -1.0], dtype=torch.bfloat16)
#   sd['idx'] = torch.tensor([[1, -2], [3, 2**40]], dtype=torch.int64)
#   sd['mask'] = torch.tensor([True, False])
#   sd['u16'] = torch.tensor([1, 65535], dtype=torch.uint16)
#   sd['step'] = torch.tensor(7.0)
#   sd['none'] = torch.zeros(3, 0)
#   sd['conv'] = torch.ones(2, 1, 2, 2, 2)
#   ck = {'model': sd, **TORCH_EXTRA}
TORCH_EXTRA = {"epoch": 9, "lr": 1.25e-4, "name": "ünï", "best": None, "ema": False, "one": [3],
               "betas": (0.9, 0.999), "groups": [{"params": [0, 1], "wd": 0.05}, {"params": [2]}], "empty": {},
               "big": 2 ** 70, "neg": -3, "negbig": -2 ** 35}
TORCH_DATA_PKL = base64.b64decode(
    "gAJ9cQAoWAUAAABtb2RlbHEBY2NvbGxlY3Rpb25zCk9yZGVyZWREaWN0CnECKVJxAyhYAQAAAHdxBGN0b3JjaC5fdXRpbHMKX3Jl"
    "YnVpbGRfdGVuc29yX3YyCnEFKChYBwAAAHN0b3JhZ2VxBmN0b3JjaApGbG9hdFN0b3JhZ2UKcQdYAQAAADBxCFgDAAAAY3B1cQlL"
    "GHRxClFLAEsCSwNLBIdxC0sMSwRLAYdxDIloAilScQ10cQ5ScQ9YAQAAAGhxEGgFKChoBmN0b3JjaApIYWxmU3RvcmFnZQpxEVgB"
    "AAAAMXESaAlLAnRxE1FLAEsChXEUSwGFcRWJaAIpUnEWdHEXUnEYWAIAAABiZnEZaAUoKGgGY3RvcmNoCkJGbG9hdDE2U3RvcmFn"
    "ZQpxGlgBAAAAMnEbaAlLA3RxHFFLAEsDhXEdSwGFcR6JaAIpUnEfdHEgUnEhWAMAAABpZHhxImgFKChoBmN0b3JjaApMb25nU3Rv"
    "cmFnZQpxI1gBAAAAM3EkaAlLBHRxJVFLAEsCSwKGcSZLAksBhnEniWgCKVJxKHRxKVJxKlgEAAAAbWFza3EraAUoKGgGY3RvcmNo"
    "CkJvb2xTdG9yYWdlCnEsWAEAAAA0cS1oCUsCdHEuUUsASwKFcS9LAYVxMIloAilScTF0cTJScTNYAwAAAHUxNnE0Y3RvcmNoLl91"
    "dGlscwpfcmVidWlsZF90ZW5zb3JfdjMKcTUoKGgGY3RvcmNoLnN0b3JhZ2UKVW50eXBlZFN0b3JhZ2UKcTZYAQAAADVxN2gJSwR0"
    "cThRSwBLAoVxOUsBhXE6iWgCKVJxO2N0b3JjaAp1aW50MTYKcTx0cT1ScT5YBAAAAHN0ZXBxP2gFKChoBmgHWAEAAAA2cUBoCUsB"
    "dHFBUUsAKSmJaAIpUnFCdHFDUnFEWAQAAABub25lcUVoBSgoaAZoB1gBAAAAN3FGaAlLAHRxR1FLAEsDSwCGcUhLAUsBhnFJiWgC"
    "KVJxSnRxS1JxTFgEAAAAY29udnFNaAUoKGgGaAdYAQAAADhxTmgJSxB0cU9RSwAoSwJLAUsCSwJLAnRxUChLCEsISwRLAksBdHFR"
    "iWgCKVJxUnRxU1JxVHVYBQAAAGVwb2NocVVLCVgCAAAAbHJxVkc/IGJN0vGp/FgEAAAAbmFtZXFXWAUAAADDvG7Dr3FYWAQAAABi"
    "ZXN0cVlOWAMAAABlbWFxWolYAwAAAG9uZXFbXXFcSwNhWAUAAABiZXRhc3FdRz/szMzMzMzNRz/v987ZFocrhnFeWAYAAABncm91"
    "cHNxX11xYCh9cWEoWAYAAABwYXJhbXNxYl1xYyhLAEsBZVgCAAAAd2RxZEc/qZmZmZmZmnV9cWVoYl1xZksCYXNlWAUAAABlbXB0"
    "eXFnfXFoWAMAAABiaWdxaYoJAAAAAAAAAABAWAMAAABuZWdxakr9////WAYAAABuZWdiaWdxa4oFAAAAAPh1Lg=="
)


def _torch_reference_state_dict() -> dict[str, np.ndarray]:
    return {
        "w": np.arange(24, dtype=np.float32).reshape(2, 3, 4) / np.float32(8),
        "h": np.array([1.5, -2.0], dtype=np.float16),
        "bf": np.array([0.5, 3.0, -1.0], dtype=ml_dtypes.bfloat16),
        "idx": np.array([[1, -2], [3, 2 ** 40]], dtype=np.int64),
        "mask": np.array([True, False]),
        "u16": np.array([1, 65535], dtype=np.uint16),
        "step": np.array(7.0, dtype=np.float32),
        "none": np.zeros((3, 0), dtype=np.float32),
        "conv": np.ones((2, 1, 2, 2, 2), dtype=np.float32),
    }


def test_pth_pickle_is_byte_identical_to_torch_save(tmp_path):
    save_state_dict(str(tmp_path / "archive.pth"), _torch_reference_state_dict(), TORCH_EXTRA)
    with zipfile.ZipFile(tmp_path / "archive.pth") as archive:
        assert archive.read("archive/data.pkl") == TORCH_DATA_PKL


def test_pth_container_layout_matches_torch(tmp_path):
    path = tmp_path / "checkpoint-49.pth"
    tied = np.arange(4, dtype=np.float32)
    save_state_dict(str(path), {"a": np.ones((3, 5), np.float16), "tied.0": tied, "tied.1": tied}, {"epoch": 49})
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        assert [i.filename for i in infos] == [
            "checkpoint-49/data.pkl", "checkpoint-49/.format_version", "checkpoint-49/.storage_alignment",
            "checkpoint-49/byteorder", "checkpoint-49/data/0", "checkpoint-49/data/1", "checkpoint-49/version",
            "checkpoint-49/.data/serialization_id"]  # tied arrays share storage 1, as tied torch parameters do
        for info in infos:
            assert info.compress_type == zipfile.ZIP_STORED
            name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
        assert archive.read("checkpoint-49/byteorder") == b"little"
        assert archive.read("checkpoint-49/version") == b"3\n"
        assert archive.read("checkpoint-49/.format_version") == b"1"
        assert archive.read("checkpoint-49/.storage_alignment") == b"64"
        serialization_id = archive.read("checkpoint-49/.data/serialization_id")
        assert len(serialization_id) == 40 and serialization_id.isdigit()
        pickle_bytes = archive.read("checkpoint-49/data.pkl")
    assert pickle_bytes.startswith(b"\x80\x02")
    globals_used = {arg for op, arg, _ in pickletools.genops(pickle_bytes) if op.name == "GLOBAL"}
    assert globals_used == {"collections OrderedDict", "torch._utils _rebuild_tensor_v2", "torch HalfStorage",
                            "torch FloatStorage"}


def test_pth_output_is_deterministic(tmp_path):
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        save_state_dict(str(tmp_path / folder / "c.pth"), _mixed_state_dict(), {"epoch": 1})
    assert (tmp_path / "one" / "c.pth").read_bytes() == (tmp_path / "two" / "c.pth").read_bytes()


def test_zip64_fields_read_back(tmp_path, monkeypatch):
    """Records over 4 GiB need zip64 fields; a tiny threshold exercises that code path on small files."""
    monkeypatch.setattr(torch_io.torch_pickle_writer, "_ZIP64_LIMIT", 100)
    state_dict = {"big": np.arange(64, dtype=np.float32), "small": np.arange(3, dtype=np.int64)}
    save_state_dict(str(tmp_path / "z.pth"), state_dict, {"epoch": 2})
    with zipfile.ZipFile(tmp_path / "z.pth") as archive:
        assert archive.testzip() is None
        assert archive.getinfo("z/data/0").file_size == 256
    loaded, info = load_state_dict(str(tmp_path / "z.pth"))
    assert all(_bits_equal(loaded[k], v) for k, v in state_dict.items()) and info == {"epoch": 2}


# ---------------------------------------------------------------------------------------------------------
# Hand-written pickles: strided and offset storage views, layouts of other checkpoints
# ---------------------------------------------------------------------------------------------------------


class _HandPickle:
    """Writes protocol-2 opcodes one by one, for pickles the writer under test never produces."""

    def __init__(self):
        self.data = bytearray(b"\x80\x02")

    def op(self, raw: bytes) -> "_HandPickle":
        self.data += raw
        return self

    def global_(self, module: str, name: str) -> "_HandPickle":
        return self.op(f"c{module}\n{name}\n".encode())

    def str_(self, text: str) -> "_HandPickle":
        encoded = text.encode()
        return self.op(b"X" + struct.pack("<I", len(encoded)) + encoded)

    def int_(self, value: int) -> "_HandPickle":
        return self.op(b"J" + struct.pack("<i", value))

    def ints(self, values) -> "_HandPickle":
        self.op(b"(")
        for v in values:
            self.int_(v)
        return self.op(b"t")

    def tensor(self, storage_class: str, key: str, numel: int, offset: int, size, stride,
               module: str = "torch") -> "_HandPickle":
        self.global_("torch._utils", "_rebuild_tensor_v2").op(b"(")
        self.op(b"(").str_("storage").global_(module, storage_class).str_(key).str_("cuda:0").int_(numel)
        self.op(b"tQ").int_(offset).ints(size).ints(stride).op(b"\x89")
        return self.global_("collections", "OrderedDict").op(b")RtR")

    def state_dict(self, tensors: dict) -> "_HandPickle":
        self.global_("collections", "OrderedDict").op(b")R(")
        for name, spec in tensors.items():
            self.str_(name).tensor(*spec)
        return self.op(b"u")


def _write_torch_zip(path: pathlib.Path, data_pkl: bytes, storages: dict[str, bytes],
                     byteorder: str = "little") -> str:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", bytes(data_pkl))
        archive.writestr("archive/byteorder", byteorder)
        for key, data in storages.items():
            archive.writestr(f"archive/data/{key}", data)
    return str(path)


def test_strided_and_offset_storage_views(tmp_path):
    floats = np.arange(20, dtype=np.float32)
    halves = np.arange(6, dtype=np.float16) / 4
    tensors = {
        "window": ("FloatStorage", "0", 20, 5, (2, 3), (4, 1)),
        "transposed": ("FloatStorage", "0", 20, 0, (5, 4), (1, 5)),
        "element": ("FloatStorage", "0", 20, 19, (), ()),
        "expanded": ("FloatStorage", "0", 20, 2, (3, 2), (0, 1)),
        "cuda_half": ("HalfStorage", "1", 6, 1, (2, 2), (1, 2), "torch.cuda"),  # torch 1.x GPU checkpoints
    }
    pickle = _HandPickle().op(b"}(").str_("model").state_dict(tensors).str_("epoch").int_(4).op(b"u.")
    path = _write_torch_zip(tmp_path / "views.pth", pickle.data, {"0": floats.tobytes(), "1": halves.tobytes()})
    state_dict, info = load_state_dict(path)
    assert info == {"epoch": 4}
    assert _bits_equal(state_dict["window"], np.array([[5, 6, 7], [9, 10, 11]], dtype=np.float32))
    assert _bits_equal(state_dict["transposed"], floats.reshape(4, 5).T.copy())
    assert _bits_equal(state_dict["element"], np.array(19.0, dtype=np.float32))
    assert _bits_equal(state_dict["expanded"], np.array([[2, 3]] * 3, dtype=np.float32))
    assert _bits_equal(state_dict["cuda_half"], halves[[[1, 3], [2, 4]]])
    for array in state_dict.values():
        assert array.flags.c_contiguous and array.flags.writeable


def test_big_endian_storages_are_swapped(tmp_path):
    floats = np.array([1.5, -2.0, 3.25], dtype=">f4")
    bf16_bits = np.array([0.5, -4.0], dtype=np.float32).astype(ml_dtypes.bfloat16).view(np.uint16).astype(">u2")
    spec = {"w": ("FloatStorage", "0", 3, 0, (3,), (1,)), "b": ("BFloat16Storage", "1", 2, 0, (2,), (1,))}
    pickle = _HandPickle().state_dict(spec).op(b".")
    path = _write_torch_zip(tmp_path / "big.pth", pickle.data, {"0": floats.tobytes(), "1": bf16_bits.tobytes()},
                            byteorder="big")
    state_dict, _ = load_state_dict(path)
    assert _bits_equal(state_dict["w"], np.array([1.5, -2.0, 3.25], dtype=np.float32))
    assert state_dict["b"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert state_dict["b"].astype(np.float32).tolist() == [0.5, -4.0]


def test_state_dict_under_module_or_at_top_level(tmp_path):
    storage = {"0": np.arange(4, dtype=np.float32).tobytes()}
    spec = {"w": ("FloatStorage", "0", 4, 0, (4,), (1,))}
    module = _HandPickle().op(b"}(").str_("module").state_dict(spec).str_("epoch").int_(1).op(b"u.")
    state_dict, info = load_state_dict(_write_torch_zip(tmp_path / "module.pth", module.data, storage))
    assert list(state_dict) == ["w"] and info == {"epoch": 1}

    bare = _HandPickle().state_dict(spec).op(b".")
    state_dict, info = load_state_dict(_write_torch_zip(tmp_path / "bare.pth", bare.data, storage))
    assert state_dict["w"].tolist() == [0, 1, 2, 3] and info == {}

    no_model = _HandPickle().op(b"}(").str_("weights").state_dict(spec).str_("epoch").int_(1).op(b"u.")
    with pytest.raises(CheckpointFormatError, match=r"no_model\.pth.*entry 'weights'.*not a tensor"):
        load_state_dict(_write_torch_zip(tmp_path / "no_model.pth", no_model.data, storage))


# ---------------------------------------------------------------------------------------------------------
# The legacy (pre-zip) torch.save format
# ---------------------------------------------------------------------------------------------------------

# torch 2.13: torch.save(ck, f, _use_new_zipfile_serialization=False) with
#   t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
#   ck = {'model': {'window': t[1:, 1:3], 'transposed': t.t(),
#                   'bf': torch.tensor([0.5, -2.0], dtype=torch.bfloat16),
#                   'step': torch.tensor(4, dtype=torch.int64),
#                   'u16': torch.tensor([7, 65535], dtype=torch.uint16)},
#         'epoch': 3, 'args': argparse.Namespace(lr=0.5, sizes=[2, 5, 10], name='x')}
TORCH_LEGACY_FILE = base64.b64decode(
    "gAKKCmz8nEb5IGqoUBkugAJN6QMugAJ9cQAoWBAAAABwcm90b2NvbF92ZXJzaW9ucQFN6QNYDQAAAGxpdHRsZV9lbmRpYW5xAohY"
    "CgAAAHR5cGVfc2l6ZXNxA31xBChYBQAAAHNob3J0cQVLAlgDAAAAaW50cQZLBFgEAAAAbG9uZ3EHSwR1dS6AAn1xAChYBQAAAG1v"
    "ZGVscQF9cQIoWAYAAAB3aW5kb3dxA2N0b3JjaC5fdXRpbHMKX3JlYnVpbGRfdGVuc29yX3YyCnEEKChYBwAAAHN0b3JhZ2VxBWN0"
    "b3JjaApGbG9hdFN0b3JhZ2UKcQZYDgAAADkzOTU3NTQ2ODg5MDg4cQdYAwAAAGNwdXEISwxOdHEJUUsFSwJLAoZxCksESwGGcQuJ"
    "Y2NvbGxlY3Rpb25zCk9yZGVyZWREaWN0CnEMKVJxDXRxDlJxD1gKAAAAdHJhbnNwb3NlZHEQaAQoKGgFaAZYDgAAADkzOTU3NTQ2"
    "ODg5MDg4cRFoCEsMTnRxElFLAEsESwOGcRNLAUsEhnEUiWgMKVJxFXRxFlJxF1gCAAAAYmZxGGgEKChoBWN0b3JjaApCRmxvYXQx"
    "NlN0b3JhZ2UKcRlYDgAAADkzOTU3NDYwNjE5MzI4cRpoCEsCTnRxG1FLAEsChXEcSwGFcR2JaAwpUnEedHEfUnEgWAQAAABzdGVw"
    "cSFoBCgoaAVjdG9yY2gKTG9uZ1N0b3JhZ2UKcSJYDgAAADkzOTU3NDYwNTczNjE2cSNoCEsBTnRxJFFLACkpiWgMKVJxJXRxJlJx"
    "J1gDAAAAdTE2cShjdG9yY2guX3V0aWxzCl9yZWJ1aWxkX3RlbnNvcl92MwpxKSgoaAVjdG9yY2guc3RvcmFnZQpVbnR5cGVkU3Rv"
    "cmFnZQpxKlgOAAAAOTM5NTc0NjA1NzQyNTZxK2gISwROdHEsUUsASwKFcS1LAYVxLoloDClScS9jdG9yY2gKdWludDE2CnEwdHEx"
    "UnEydVgFAAAAZXBvY2hxM0sDWAQAAABhcmdzcTRjYXJncGFyc2UKTmFtZXNwYWNlCnE1KYFxNn1xNyhYAgAAAGxycThHP+AAAAAA"
    "AABYBQAAAHNpemVzcTldcTooSwJLBUsKZVgEAAAAbmFtZXE7WAEAAAB4cTx1YnUugAJdcQAoWA4AAAA5Mzk1NzQ2MDU3MzYxNnEB"
    "WA4AAAA5Mzk1NzQ2MDU3NDI1NnECWA4AAAA5Mzk1NzQ2MDYxOTMyOHEDWA4AAAA5Mzk1NzU0Njg4OTA4OHEEZS4BAAAAAAAAAAQA"
    "AAAAAAAABAAAAAAAAAAHAP//AgAAAAAAAAAAPwDADAAAAAAAAAAAAAAAAACAPwAAAEAAAEBAAACAQAAAoEAAAMBAAADgQAAAAEEA"
    "ABBBAAAgQQAAMEE="
)


def test_legacy_format_written_by_torch(tmp_path):
    path = tmp_path / "legacy.pth"
    path.write_bytes(TORCH_LEGACY_FILE)
    state_dict, info = load_state_dict(str(path))
    grid = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert _bits_equal(state_dict["window"], grid[1:, 1:3].copy())
    assert _bits_equal(state_dict["transposed"], grid.T.copy())
    assert state_dict["bf"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert state_dict["bf"].astype(np.float32).tolist() == [0.5, -2.0]
    assert _bits_equal(state_dict["step"], np.array(4, dtype=np.int64))
    assert _bits_equal(state_dict["u16"], np.array([7, 65535], dtype=np.uint16))  # _rebuild_tensor_v3
    assert info == {"epoch": 3, "args": {"lr": 0.5, "sizes": [2, 5, 10], "name": "x"}}


def test_truncated_legacy_file(tmp_path):
    path = tmp_path / "legacy.pth"
    path.write_bytes(TORCH_LEGACY_FILE[:-20])
    with pytest.raises(CheckpointFormatError, match=r"legacy\.pth.*storage '\d+'.*(truncated|ends early)"):
        load_state_dict(str(path))


# ---------------------------------------------------------------------------------------------------------
# Refusals and errors
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module,name", [("os", "system"), ("posix", "system"), ("builtins", "eval")])
def test_unsafe_global_is_refused_and_never_called(tmp_path, module, name):
    marker = tmp_path / "pwned"
    evil = _HandPickle().global_(module, name).op(b"(").str_(
        f"open({str(marker)!r}, 'w')" if name == "eval" else f"touch {marker}").op(b"tR.")
    path = _write_torch_zip(tmp_path / "evil.pth", evil.data, {})
    with pytest.raises(CheckpointFormatError, match=rf"evil\.pth.*data\.pkl.*global '{module}\.{name}'.*allow-list"):
        load_state_dict(path)
    assert not marker.exists()


def test_plain_pickle_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R.")
    with pytest.raises(CheckpointFormatError, match="evil.pkl.*not a checkpoint"):
        load_state_dict(str(path))


def test_missing_storage_record_names_tensor(tmp_path):
    spec = {"blocks.0.norm.weight": ("FloatStorage", "7", 4, 0, (4,), (1,))}
    pickle = _HandPickle().op(b"}(").str_("model").state_dict(spec).str_("epoch").int_(1).op(b"u.")
    path = _write_torch_zip(tmp_path / "missing.pth", pickle.data, {})
    expected = r"missing\.pth.*'archive/data/7'.*blocks\.0\.norm\.weight.*missing"
    with pytest.raises(CheckpointFormatError, match=expected):
        load_state_dict(path)


def test_storage_size_mismatch_names_tensor(tmp_path):
    spec = {"head.bias": ("FloatStorage", "0", 7, 0, (7,), (1,))}
    pickle = _HandPickle().op(b"}(").str_("model").state_dict(spec).op(b"u.")
    path = _write_torch_zip(tmp_path / "short.pth", pickle.data, {"0": np.zeros(6, np.float32).tobytes()})
    with pytest.raises(CheckpointFormatError, match=r"short\.pth.*storage '0'.*head\.bias.*24 bytes.*7 float32.*28"):
        load_state_dict(path)


def test_view_reaching_past_its_storage(tmp_path):
    spec = {"w": ("FloatStorage", "0", 6, 2, (2, 3), (3, 1))}
    pickle = _HandPickle().state_dict(spec).op(b".")
    path = _write_torch_zip(tmp_path / "oob.pth", pickle.data, {"0": np.zeros(6, np.float32).tobytes()})
    with pytest.raises(CheckpointFormatError, match=r"oob\.pth.*'w'.*reaches element 7.*only 6"):
        load_state_dict(path)


def test_truncated_pth(tmp_path, golden_dir):
    raw = (golden_dir / GOLDEN_PTH).read_bytes()
    for cut in (len(raw) // 2, len(raw) - 10, 100):
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(raw[:cut])
        with pytest.raises(CheckpointFormatError, match=rf"cut{cut}\.pth.*(truncated|damaged)"):
            load_state_dict(str(path))


@pytest.mark.parametrize("extension", [".npz", ".safetensors"])
def test_truncated_npz_and_safetensors(tmp_path, extension):
    path = tmp_path / f"full{extension}"
    save_state_dict(str(path), {"w": np.ones((64, 64), np.float32)})
    cut = tmp_path / f"cut{extension}"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointFormatError, match=rf"cut\{extension}"):
        load_state_dict(str(cut))


def test_not_a_checkpoint(tmp_path):
    for name, content in [("notes.txt", b"hello world, not weights"), ("empty.pth", b""),
                          ("other.zip", None)]:
        path = tmp_path / name
        if content is None:
            with zipfile.ZipFile(path, "w") as archive:
                archive.writestr("readme.md", "no weights here")
        else:
            path.write_bytes(content)
        with pytest.raises(CheckpointFormatError, match=name.replace(".", r"\.")):
            load_state_dict(str(path))
    with pytest.raises(CheckpointFormatError, match="cannot open"):
        load_state_dict(str(tmp_path / "absent.pth"))


def test_npz_with_non_tensor_entries_is_refused(tmp_path):
    np.savez(tmp_path / "odd.npz", w=np.ones(2), label=np.array(["a", "b"]))
    with pytest.raises(CheckpointFormatError, match=r"odd\.npz.*'label'.*not a tensor dtype"):
        load_state_dict(str(tmp_path / "odd.npz"))


@pytest.mark.parametrize("extension", [".pth", ".npz", ".safetensors"])
def test_save_refuses_bad_input_and_leaves_nothing_behind(tmp_path, extension):
    path = tmp_path / f"bad{extension}"
    with pytest.raises(CheckpointFormatError, match=r"bad.*'labels'.*dtype"):
        save_state_dict(str(path), {"w": np.ones(2, np.float32), "labels": np.array(["a", "b"])})
    with pytest.raises(CheckpointFormatError, match=r"bad.*key 3"):
        save_state_dict(str(path), {3: np.ones(2, np.float32)})
    with pytest.raises(CheckpointFormatError, match=r"bad.*'callback'"):
        save_state_dict(str(path), {"w": np.ones(2, np.float32)}, {"callback": print})
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_what_the_format_cannot_hold(tmp_path):
    with pytest.raises(CheckpointFormatError, match="'model'"):
        save_state_dict(str(tmp_path / "a.pth"), {"w": np.ones(1, np.float32)}, {"model": 1})
    with pytest.raises(CheckpointFormatError, match="unknown checkpoint extension '.h5'"):
        save_state_dict(str(tmp_path / "a.h5"), {"w": np.ones(1, np.float32)})
    with pytest.raises(CheckpointFormatError, match=r"'z'.*complex128.*safetensors"):
        save_state_dict(str(tmp_path / "a.safetensors"), {"z": np.ones(1, np.complex128)})
    with pytest.raises(CheckpointFormatError, match="JSON"):
        save_state_dict(str(tmp_path / "a.npz"), {"w": np.ones(1, np.float32)}, {"ema": np.ones(2)})
    assert list(tmp_path.iterdir()) == []


def test_save_replaces_existing_file_atomically(tmp_path):
    path = tmp_path / "c.pth"
    save_state_dict(str(path), {"w": np.ones(2, np.float32)})
    before = path.read_bytes()
    with pytest.raises(CheckpointFormatError):
        save_state_dict(str(path), {"w": np.array(["x"])})
    assert path.read_bytes() == before
    save_state_dict(str(path), {"w": np.zeros(2, np.float32)})
    assert load_state_dict(str(path))[0]["w"].tolist() == [0.0, 0.0]
