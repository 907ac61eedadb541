"""The torch-free checkpoint reader: released files, crafted archives, refusal of code, errors."""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from conftest import require_asset
from converse_jax.weights import CheckpointFormatError, UnsafeCheckpointError, load_torch_state_dict
from converse_jax.weights.reader import load_safetensors

RELEASED = ("converse_dncnn.pth", "converse_srresnet.pth", "conversenet.pth",
            "converse_usrnet.pth")
# Parameter counts of the released checkpoints (docs/architectures.md).
RELEASED_PARAMS = {"converse_dncnn.pth": 796_353, "converse_srresnet.pth": 699_072,
                   "conversenet.pth": 243_267, "converse_usrnet.pth": 307_987}


# ---------------------------------------------------------------------------------------------
# A minimal writer of PyTorch's zip format, opcode by opcode (no torch needed).
# ---------------------------------------------------------------------------------------------
_STORAGE_NAMES = {np.dtype(np.float64): "DoubleStorage", np.dtype(np.float32): "FloatStorage",
                  np.dtype(np.float16): "HalfStorage", np.dtype(ml_dtypes.bfloat16):
                  "BFloat16Storage", np.dtype(np.int64): "LongStorage",
                  np.dtype(np.int32): "IntStorage", np.dtype(np.uint8): "ByteStorage",
                  np.dtype(np.bool_): "BoolStorage"}


def _value(v) -> bytes:
    """Opcodes that push a plain value (str, int, tuple of ints, bool, None); no memo."""
    p = pickle.Pickler(buf := io.BytesIO(), protocol=2)
    p.fast = True
    p.dump(v)
    return buf.getvalue()[2:-1]  # drop PROTO and STOP


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


_EMPTY_ORDERED_DICT = _global("collections", "OrderedDict") + b")R"


class TensorRef:
    """A tensor in a crafted checkpoint: a view (offset, size, stride) of a named storage."""

    def __init__(self, storage: str, offset: int, size: tuple, stride: tuple,
                 parameter: bool = False) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
        self.parameter = parameter


def _tensor_ops(t: TensorRef, storages: dict) -> bytes:
    arr = storages[t.storage]
    pid = (b"(" + _value("storage") + _global("torch", _STORAGE_NAMES[arr.dtype])
           + _value(t.storage) + _value("cpu") + _value(int(arr.size)) + b"tQ")
    ops = (_global("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + _value(t.offset)
           + _value(tuple(t.size)) + _value(tuple(t.stride)) + b"\x89" + _EMPTY_ORDERED_DICT
           + b"tR")
    if t.parameter:
        ops = (_global("torch._utils", "_rebuild_parameter") + b"(" + ops + b"\x88"
               + _EMPTY_ORDERED_DICT + b"tR")
    return ops


def _obj_ops(obj, storages: dict) -> bytes:
    if isinstance(obj, TensorRef):
        return _tensor_ops(obj, storages)
    if isinstance(obj, dict):
        out = _EMPTY_ORDERED_DICT + b"("
        for k, v in obj.items():
            out += _value(k) + _obj_ops(v, storages)
        return out + b"u"
    return _value(obj)


def write_torch_zip(path: Path, obj, storages: dict, *, byteorder: str = "little",
                    pickle_bytes: bytes | None = None) -> Path:
    """Write ``obj`` (nested dicts of TensorRef and plain values) the way torch.save lays it out."""
    data = pickle_bytes
    if data is None:
        data = b"\x80\x02" + _obj_ops(obj, storages) + b"."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", data)
        zf.writestr("archive/byteorder", byteorder)
        for key, arr in storages.items():
            a = np.ascontiguousarray(arr)
            if byteorder == "big":
                unit = a.dtype.itemsize
                a = a.view(f"<u{unit}").byteswap() if unit > 1 else a
            zf.writestr(f"archive/data/{key}", a.tobytes())
        zf.writestr("archive/version", "3\n")
    return path


def simple_state(path: Path, arrays: dict[str, np.ndarray], wrap: str | None = None, **kw) -> Path:
    storages = {str(i): np.ascontiguousarray(a).reshape(-1) for i, a in enumerate(arrays.values())}
    refs = {}
    for i, (k, a) in enumerate(arrays.items()):
        strides = tuple(s // a.itemsize for s in np.ascontiguousarray(a).strides)
        refs[k] = TensorRef(str(i), 0, a.shape, strides)
    obj = {wrap: refs, "epoch": 7} if wrap else refs
    return write_torch_zip(path, obj, storages, **kw)


# ---------------------------------------------------------------------------------------------
# Released checkpoints
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RELEASED)
def test_released_checkpoints_read(name):
    sd = load_torch_state_dict(require_asset("weights", name))
    assert sum(v.size for v in sd.values()) == RELEASED_PARAMS[name]
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in sd.values())
    assert all(np.isfinite(v).all() for v in sd.values())


def test_released_key_layouts():
    dn = load_torch_state_dict(require_asset("weights", "converse_dncnn.pth"))
    assert dn["m_head.0.weight"].shape == (64, 1, 1, 1)
    assert dn["m_body.0.conv1.0.weight"].shape == (64,)
    assert dn["m_body.0.conv1.3.weight"].shape == (1, 128, 7, 7)
    assert dn["m_body.0.conv1.3.bias"].shape == (1, 128, 1, 1)
    us = load_torch_state_dict(require_asset("weights", "converse_usrnet.pth"))
    assert us["d.alpha"].shape == (1, 64, 1, 1)
    assert us["kernelnet.fc1.weight"].shape == (64, 49)
    assert us["convs.0.weight"].shape == (64, 16, 1, 1)
    # Converse2D kernels are initialised as a softmax and stay non-trivial after training
    assert not np.allclose(dn["m_body.0.conv1.3.weight"], 0)


def test_matches_torch_load_bit_for_bit(tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed: bit-for-bit check skipped")
    for name in RELEASED:
        path = require_asset("weights", name)
        ours = load_torch_state_dict(path)
        ref = torch.load(path, map_location="cpu", weights_only=True)
        assert list(ours) == list(ref)
        for k, v in ref.items():
            r = v.numpy()
            assert ours[k].dtype == r.dtype and ours[k].shape == r.shape, k
            assert ours[k].tobytes() == r.tobytes(), k
    # tensors torch lays out in less trivial ways: views sharing a storage, transposes,
    # parameters, bfloat16, ints, bools, and a wrapped state dict
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    crafted = {
        "view": base[1:, 2:5],
        "transposed": base.t(),
        "param": torch.nn.Parameter(torch.randn(3, 2, 1, 1)),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "half": torch.randn(2, 3).half(),
        "long": torch.arange(-3, 4),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    f = tmp_path / "crafted.pth"
    torch.save({"state_dict": crafted, "step": 3}, f)
    ours = load_torch_state_dict(f)
    ref = torch.load(f, weights_only=True)["state_dict"]
    for k, v in ref.items():
        r = v.detach().contiguous()
        r = r.view(torch.int16).numpy() if r.dtype == torch.bfloat16 else r.numpy()
        o = ours[k].view(np.int16) if ours[k].dtype == ml_dtypes.bfloat16 else ours[k]
        assert o.shape == r.shape and o.dtype == r.dtype and o.tobytes() == r.tobytes(), k
    f2 = tmp_path / "model.safetensors"
    st = pytest.importorskip("safetensors.torch")
    st.save_file({k: v.detach().contiguous() for k, v in crafted.items() if v.numel()}, f2)
    ours = load_torch_state_dict(f2)
    for k, v in ref.items():
        if v.numel():
            r = v.detach().contiguous()
            r = r.view(torch.int16).numpy() if r.dtype == torch.bfloat16 else r.numpy()
            o = ours[k].view(np.int16) if ours[k].dtype == ml_dtypes.bfloat16 else ours[k]
            assert o.tobytes() == r.tobytes() and o.shape == r.shape, k


# ---------------------------------------------------------------------------------------------
# Crafted archives
# ---------------------------------------------------------------------------------------------
def test_dtypes_and_strided_views(tmp_path):
    rng = np.random.default_rng(0)
    storage = rng.standard_normal(30).astype(np.float32)
    storages = {"s": storage,
                "b": rng.standard_normal(4).astype(ml_dtypes.bfloat16),
                "i": np.arange(-2, 3, dtype=np.int64),
                "m": np.array([True, False]),
                "d": np.linspace(0, 1, 6)}
    obj = {
        "flat": TensorRef("s", 0, (30,), (1,)),
        "matrix": TensorRef("s", 0, (5, 6), (6, 1)),
        "transposed": TensorRef("s", 0, (6, 5), (1, 6)),
        "offset": TensorRef("s", 7, (2, 3), (6, 2), parameter=True),
        "bf16": TensorRef("b", 0, (2, 2), (2, 1)),
        "ints": TensorRef("i", 1, (3,), (1,)),
        "mask": TensorRef("m", 0, (2,), (1,)),
        "double": TensorRef("d", 0, (1, 6, 1, 1), (6, 1, 1, 1)),
        "scalar": TensorRef("s", 4, (), ()),
        "empty": TensorRef("s", 0, (0, 4), (4, 1)),
    }
    sd = load_torch_state_dict(write_torch_zip(tmp_path / "x.pth", obj, storages))
    assert list(sd) == list(obj)
    m = storage.reshape(5, 6)
    np.testing.assert_array_equal(sd["flat"], storage)
    np.testing.assert_array_equal(sd["matrix"], m)
    np.testing.assert_array_equal(sd["transposed"], m.T)
    np.testing.assert_array_equal(sd["offset"], storage[7:].__getitem__(
        np.array([[0, 2, 4], [6, 8, 10]])))
    assert sd["bf16"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(sd["bf16"], storages["b"].reshape(2, 2))
    np.testing.assert_array_equal(sd["ints"], [-1, 0, 1])
    np.testing.assert_array_equal(sd["mask"], [True, False])
    assert sd["double"].dtype == np.float64 and sd["double"].shape == (1, 6, 1, 1)
    assert sd["scalar"].shape == () and sd["scalar"] == storage[4]
    assert sd["empty"].shape == (0, 4)
    assert sd["transposed"].flags.c_contiguous and sd["transposed"].flags.writeable


def test_big_endian_archive(tmp_path):
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
              "n": np.arange(3, dtype=np.int64) - 1,
              "h": np.array([1.5, -2.25], np.float16)}
    sd = load_torch_state_dict(simple_state(tmp_path / "be.pth", arrays, byteorder="big"))
    for k, v in arrays.items():
        np.testing.assert_array_equal(sd[k], v)


@pytest.mark.parametrize("wrap", ["state_dict", "params", "params_ema", "model"])
def test_wrapped_state_dicts(tmp_path, wrap):
    arrays = {"a.weight": np.ones((2, 3), np.float32), "a.bias": np.zeros(2, np.float32)}
    sd = load_torch_state_dict(simple_state(tmp_path / "w.pth", arrays, wrap=wrap))
    assert list(sd) == list(arrays)


def test_explicit_key_and_module_prefix(tmp_path):
    arrays = {"module.a.weight": np.ones(3, np.float32), "module.b": np.zeros(1, np.float32)}
    path = simple_state(tmp_path / "w.pth", arrays, wrap="ema_weights")
    with pytest.raises(CheckpointFormatError, match="ema_weights"):  # lists top-level keys
        load_torch_state_dict(path)
    sd = load_torch_state_dict(path, key="ema_weights")
    assert list(sd) == ["a.weight", "b"]
    with pytest.raises(CheckpointFormatError, match="no entry 'nope'"):
        load_torch_state_dict(path, key="nope")


def test_storage_size_mismatch_is_corruption(tmp_path):
    storages = {"0": np.ones(4, np.float32)}
    path = write_torch_zip(tmp_path / "c.pth", {"w": TensorRef("0", 0, (4,), (1,))}, storages)
    # rewrite the storage with fewer bytes than the pickle declares
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members["archive/data/0"] = members["archive/data/0"][:8]
    with zipfile.ZipFile(path, "w") as zf:
        for n, b in members.items():
            zf.writestr(n, b)
    with pytest.raises(CheckpointFormatError, match="corrupt"):
        load_torch_state_dict(path)
    # a stride-0 view that would materialise terabytes from four floats
    bomb = write_torch_zip(tmp_path / "b.pth", {"w": TensorRef("0", 0, (10**12,), (0,))},
                           storages)
    with pytest.raises(CheckpointFormatError, match="refusing"):
        load_torch_state_dict(bomb)
    # a view reaching past the end of its storage
    bad = write_torch_zip(tmp_path / "v.pth", {"w": TensorRef("0", 2, (4,), (1,))}, storages)
    with pytest.raises(CheckpointFormatError, match="corrupt"):
        load_torch_state_dict(bad)


# ---------------------------------------------------------------------------------------------
# Refusing code
# ---------------------------------------------------------------------------------------------
class _Exploit:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        import os
        return (os.system, (self.cmd,))


def test_pickle_that_runs_a_command_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"w": _Exploit(f"touch {marker}")}, protocol=2)
    path = write_torch_zip(tmp_path / "evil.pth", None, {}, pickle_bytes=payload)
    with pytest.raises(UnsafeCheckpointError, match=r"'(os|posix|nt)\.system'") as info:
        load_torch_state_dict(path)
    assert info.value.global_name.endswith(".system")
    assert not marker.exists()
    # the same payload as a bare pickle file, and with protocol 4's STACK_GLOBAL
    bare = tmp_path / "evil.pkl"
    bare.write_bytes(payload)
    with pytest.raises(CheckpointFormatError):
        load_torch_state_dict(bare)
    p4 = write_torch_zip(tmp_path / "evil4.pth", None, {},
                         pickle_bytes=pickle.dumps(_Exploit(f"touch {marker}"), protocol=4))
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_torch_state_dict(p4)
    assert not marker.exists()


def test_code_hidden_inside_a_tensor_rebuild_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    # _rebuild_from_type_v2 is allowed, but not with builtins.exec as its function
    evil = (b"\x80\x02" + _EMPTY_ORDERED_DICT + b"(" + _value("w")
            + _global("torch._tensor", "_rebuild_from_type_v2") + b"("
            + _global("builtins", "exec") + _global("torch", "Tensor")
            + _value((f"open('{marker}', 'w')",)) + b"NtR" + b"u.")
    path = write_torch_zip(tmp_path / "e.pth", None, {}, pickle_bytes=evil)
    with pytest.raises(UnsafeCheckpointError, match="'builtins.exec'"):
        load_torch_state_dict(path)
    assert not marker.exists()


def test_disallowed_opcodes_and_calls(tmp_path):
    # INST opcode (protocol 0 object creation) is refused outright
    inst = b"(ios\nsystem\nS'true'\n."
    path = write_torch_zip(tmp_path / "i.pth", None, {}, pickle_bytes=inst)
    with pytest.raises(CheckpointFormatError, match="INST"):
        load_torch_state_dict(path)
    # calling something that is not an allowed stand-in (a string) is refused
    call = b"\x80\x02" + _value("x") + _value(()) + b"R."
    path = write_torch_zip(tmp_path / "c.pth", None, {}, pickle_bytes=call)
    with pytest.raises(CheckpointFormatError, match="call"):
        load_torch_state_dict(path)


# The opcodes a state-dict pickle may use; anything else (INST, OBJ, EXT*, NEWOBJ_EX, buffers...)
# must be refused. A change to this list is a change to what the reader lets through.
ALLOWED_OPCODES = {
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT", "STRING",
    "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
    "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "NONE", "NEWTRUE", "NEWFALSE",
    "EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "EMPTY_SET", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "LIST", "DICT", "FROZENSET", "APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "MARK",
    "POP", "POP_MARK", "DUP", "PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET",
    "MEMOIZE", "PROTO", "FRAME", "STOP", "GLOBAL", "STACK_GLOBAL", "REDUCE", "NEWOBJ", "BUILD",
    "PERSID", "BINPERSID",
}


def test_opcode_table_is_the_allowlist():
    from converse_jax.weights.reader import _OPCODE_HANDLERS

    assert set(_OPCODE_HANDLERS) | {"STOP"} == ALLOWED_OPCODES
    assert {op.name for op in pickletools.opcodes} >= ALLOWED_OPCODES


@pytest.mark.parametrize("name", sorted({op.name for op in pickletools.opcodes} - ALLOWED_OPCODES))
def test_every_other_opcode_is_refused_by_name(tmp_path, name):
    from converse_jax.weights.reader import _SafeUnpickler

    code = next(op.code for op in pickletools.opcodes if op.name == name).encode("latin1")
    arg = {"EXT1": b"\x01", "EXT2": b"\x01\x00", "EXT4": b"\x01\x00\x00\x00",
           "INST": b"os\nsystem\n", "NEXT_BUFFER": b"", "READONLY_BUFFER": b""}.get(name, b"")
    with pytest.raises(CheckpointFormatError, match=name):
        _SafeUnpickler(b"\x80\x05(" + code + arg + b".", lambda pid: None, "t.pth").load()


# ---------------------------------------------------------------------------------------------
# Bad files
# ---------------------------------------------------------------------------------------------
def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("hello, these are not weights\n")
    with pytest.raises(CheckpointFormatError, match="neither a PyTorch zip checkpoint"):
        load_torch_state_dict(text)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointFormatError, match="empty"):
        load_torch_state_dict(empty)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_torch_state_dict(tmp_path / "missing.pth")
    with pytest.raises(CheckpointFormatError, match="directory"):
        load_torch_state_dict(tmp_path)
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("readme.txt", "x")
    with pytest.raises(CheckpointFormatError, match="data.pkl"):
        load_torch_state_dict(other)


def test_legacy_format_asks_to_resave(tmp_path):
    legacy = tmp_path / "old.pth"
    legacy.write_bytes(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19." + bytes(64))
    with pytest.raises(CheckpointFormatError, match=r"re-save it with torch>=1\.6"):
        load_torch_state_dict(legacy)


def test_truncated_and_corrupt_released_file(tmp_path):
    blob = require_asset("weights", "conversenet.pth").read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointFormatError, match="truncated or corrupt"):
        load_torch_state_dict(cut)
    # flip one byte inside a tensor record: the zip CRC catches it
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        info = next(i for i in zf.infolist() if "/data/" in i.filename and i.file_size > 64)
        # the local header's own name and extra-field lengths (torch pads the extra field)
        name_len, extra_len = struct.unpack("<HH", blob[info.header_offset + 26:
                                                         info.header_offset + 30])
        start = info.header_offset + 30 + name_len + extra_len
    flipped = bytearray(blob)
    flipped[start + 5] ^= 0xFF
    bad = tmp_path / "bad.pth"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointFormatError, match="corrupt"):
        load_torch_state_dict(bad)


def test_truncated_pickle(tmp_path):
    arrays = {"w": np.ones(3, np.float32)}
    good = simple_state(tmp_path / "g.pth", arrays)
    with zipfile.ZipFile(good) as zf:
        data = zf.read("archive/data.pkl")
    path = write_torch_zip(tmp_path / "t.pth", None, {"0": arrays["w"]},
                           pickle_bytes=data[: len(data) - 5])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        load_torch_state_dict(path)


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------
def test_safetensors_round_trip(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1)
    arrays = {"conv.weight": rng.standard_normal((4, 3, 1, 1)).astype(np.float32),
              "ln.weight": rng.standard_normal(4),
              "steps": np.arange(5, dtype=np.int64),
              "h": rng.standard_normal(3).astype(np.float16)}
    path = tmp_path / "m.safetensors"
    save_file(arrays, str(path), metadata={"note": "x"})
    sd = load_torch_state_dict(path)
    assert set(sd) == set(arrays)
    for k, v in arrays.items():
        assert sd[k].dtype == v.dtype
        np.testing.assert_array_equal(sd[k], v)


def _safetensors_bytes(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def test_safetensors_bfloat16_and_errors(tmp_path):
    vals = np.array([1.0, -2.5, 0.125], dtype=ml_dtypes.bfloat16)
    path = tmp_path / "b.safetensors"
    path.write_bytes(_safetensors_bytes(
        {"x": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}, vals.tobytes()))
    np.testing.assert_array_equal(load_safetensors(path)["x"], vals)
    short = tmp_path / "short.safetensors"
    short.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(CheckpointFormatError, match="does not fit"):
        load_torch_state_dict(short)
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(CheckpointFormatError, match="truncated"):
        load_torch_state_dict(garbage)
