"""Read PyTorch checkpoints and safetensors files into NumPy arrays, without PyTorch.

PyTorch's zip format (``torch.save`` since 1.6) is a zip archive holding ``<name>/data.pkl``
(a pickle describing the object tree), ``<name>/byteorder`` and one raw file per tensor storage
under ``<name>/data/``. A pickle can name any importable callable, so it is never handed to
:mod:`pickle` here: :func:`_SafeUnpickler` interprets the opcode stream itself (parsed by
:func:`pickletools.genops`) and resolves ``GLOBAL`` references against a fixed table of
stand-ins (tensor-rebuild functions, storage types, dtypes, ``OrderedDict`` and plain
containers). Any other global is refused when it is *named*, before anything could call it,
and nothing from the file is ever imported or executed.
"""

from __future__ import annotations

import collections
import json
import os
import pickletools
import struct
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from converse_jax.weights.errors import CheckpointFormatError, UnsafeCheckpointError

PathLike = str | os.PathLike

__all__ = [
    "load_torch_state_dict",
    "load_safetensors",
    "WRAPPER_KEYS",
]

# Keys under which training scripts commonly nest the state dict, tried in this order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "params", "params_ema", "model", "net",
                "network", "generator")

# The legacy (pre-1.6) format starts with a protocol-2 pickle of this magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_ZIP_MAGIC = b"PK\x03\x04"
# A tensor with more elements than its storage (stride 0) is materialised only up to this size.
_MAX_EXPANSION_BYTES = 1 << 28
_RESAVE_HINT = ("re-save it with torch>=1.6: torch.save(torch.load(old, weights_only=True), new) "
                "(the default zip format), or export it to .safetensors")

_NP_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint64": np.dtype(np.uint64),
    "uint32": np.dtype(np.uint32),
    "uint16": np.dtype(np.uint16),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
}
# torch.<alias> names of the same dtypes (torch.float == torch.float32 and so on).
_DTYPE_ALIASES = {"double": "float64", "float": "float32", "half": "float16", "long": "int64",
                  "int": "int32", "short": "int16", "cfloat": "complex64",
                  "cdouble": "complex128"}
# Legacy typed storage classes (torch.FloatStorage, ...) -> element dtype.
_STORAGE_TYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
}


# --------------------------------------------------------------------------------------------
# Stand-ins for the few globals a state-dict pickle may name.
# --------------------------------------------------------------------------------------------
class _StorageType:
    """Stand-in for ``torch.FloatStorage`` and friends: only carries the element dtype."""

    def __init__(self, name: str, dtype: np.dtype) -> None:
        self.name = name
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _TorchDType:
    """Stand-in for a ``torch.<dtype>`` object (an argument of ``_rebuild_tensor_v3``)."""

    def __init__(self, name: str, dtype: np.dtype) -> None:
        self.name = name
        self.dtype = dtype


class _TensorClass:
    """Stand-in for ``torch.Tensor`` / ``torch.nn.Parameter`` (an argument of
    ``_rebuild_from_type_v2``); it cannot be called."""

    def __init__(self, name: str) -> None:
        self.name = name


class _Storage:
    """Raw bytes of one storage record plus the dtype it was saved with."""

    def __init__(self, raw: np.ndarray, dtype: np.dtype, key: str) -> None:
        self.raw = raw  # uint8, little-endian after loading
        self.dtype = dtype
        self.key = key


class _SafeCallable:
    """A callable the unpickler's REDUCE may invoke: one of our own functions, never the file's."""

    def __init__(self, name: str, fn: Callable[..., Any]) -> None:
        self.name = name
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


def _as_shape(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise CheckpointFormatError(f"tensor {what} must be a tuple of non-negative ints, got "
                                    f"{value!r}")
    return tuple(int(v) for v in value)


def _view_storage(storage: Any, dtype: np.dtype, offset: Any, size: Any, stride: Any) -> np.ndarray:
    if not isinstance(storage, _Storage):
        raise CheckpointFormatError(f"tensor storage must come from the archive, got "
                                    f"{type(storage).__name__}")
    if not isinstance(offset, int) or offset < 0:
        raise CheckpointFormatError(f"bad storage offset {offset!r}")
    shape = _as_shape(size, "size")
    strides = _as_shape(stride, "stride")
    if len(shape) != len(strides):
        raise CheckpointFormatError(f"tensor size {shape} and stride {strides} differ in length")
    if storage.raw.size % dtype.itemsize:
        raise CheckpointFormatError(f"storage {storage.key}: {storage.raw.size} bytes is not a "
                                    f"whole number of {dtype} elements")
    flat = storage.raw.view(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return np.zeros(shape, dtype)
    last = offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=False))
    if last >= flat.size:
        raise CheckpointFormatError(
            f"storage {storage.key} holds {flat.size} elements but a tensor of size {shape}, "
            f"stride {strides}, offset {offset} reads up to element {last}: the file is corrupt")
    if count > flat.size and count * dtype.itemsize > _MAX_EXPANSION_BYTES:
        raise CheckpointFormatError(
            f"tensor of size {shape} would expand storage {storage.key} ({flat.size} elements) "
            f"to {count * dtype.itemsize} bytes through repeated strides: refusing")
    base = flat[offset:]
    view = np.lib.stride_tricks.as_strided(
        base, shape=shape, strides=tuple(s * dtype.itemsize for s in strides), writeable=False)
    return np.array(view, dtype=dtype, order="C", copy=True)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> np.ndarray:
    dtype = storage.dtype if isinstance(storage, _Storage) else None
    return _view_storage(storage, dtype, offset, size, stride)


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any,
                       requires_grad: Any = False, backward_hooks: Any = None,
                       metadata: Any = None) -> np.ndarray:
    return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, dtype: Any, metadata: Any = None) -> np.ndarray:
    if not isinstance(dtype, _TorchDType):
        raise CheckpointFormatError(f"_rebuild_tensor_v3 needs a torch dtype, got {dtype!r}")
    return _view_storage(storage, dtype.dtype, offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None,
                       state: Any = None) -> np.ndarray:
    if not isinstance(data, np.ndarray):
        raise CheckpointFormatError(f"parameter data must be a tensor, got {type(data).__name__}")
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any = None) -> np.ndarray:
    if not isinstance(func, _SafeCallable) or not isinstance(new_type, _TensorClass):
        raise CheckpointFormatError("_rebuild_from_type_v2 called with something other than a "
                                    "tensor-rebuild function and torch.Tensor/Parameter")
    if not isinstance(args, tuple):
        raise CheckpointFormatError("_rebuild_from_type_v2 arguments must be a tuple")
    return func(*args)


def _ordered_dict(*args: Any) -> collections.OrderedDict:
    if len(args) > 1:
        raise CheckpointFormatError("OrderedDict takes at most one argument")
    return collections.OrderedDict(*args)


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # Protocol 2 pickles a ``bytes`` object as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointFormatError("_codecs.encode is only accepted as the latin1 bytes idiom")
    return text.encode("latin1")


def _build_globals() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {}
    rebuilders: dict[str, Callable[..., Any]] = {
        "_rebuild_tensor": _rebuild_tensor,
        "_rebuild_tensor_v2": _rebuild_tensor_v2,
        "_rebuild_tensor_v3": _rebuild_tensor_v3,
        "_rebuild_parameter": _rebuild_parameter,
        "_rebuild_parameter_with_state": _rebuild_parameter,
    }
    for name, fn in rebuilders.items():
        table[("torch._utils", name)] = _SafeCallable(name, fn)
    table[("torch._tensor", "_rebuild_from_type_v2")] = _SafeCallable(
        "_rebuild_from_type_v2", _rebuild_from_type_v2)
    for module in ("torch", "torch.cuda"):
        for name, dt in _STORAGE_TYPES.items():
            table[(module, name)] = _StorageType(name, _NP_DTYPES[dt])
    table[("torch.storage", "UntypedStorage")] = _StorageType("UntypedStorage", _NP_DTYPES["uint8"])
    for name, dt in list(_NP_DTYPES.items()) + [(a, _NP_DTYPES[t]) for a, t in
                                                 _DTYPE_ALIASES.items()]:
        table[("torch", name)] = _TorchDType(name, np.dtype(dt))
    for module, name in (("torch", "Tensor"), ("torch._tensor", "Tensor"),
                         ("torch.nn.parameter", "Parameter"), ("torch.nn", "Parameter")):
        table[(module, name)] = _TensorClass(name)
    table[("torch", "Size")] = _SafeCallable("Size", lambda *a: tuple(*a))
    table[("collections", "OrderedDict")] = _SafeCallable("OrderedDict", _ordered_dict)
    for module in ("builtins", "__builtin__"):
        table[(module, "set")] = _SafeCallable("set", lambda *a: set(*a))
        table[(module, "frozenset")] = _SafeCallable("frozenset", lambda *a: frozenset(*a))
    table[("_codecs", "encode")] = _SafeCallable("encode", _codecs_encode)
    return table


_ALLOWED_GLOBALS = _build_globals()

_PUSH_ARG = frozenset({
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
    "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
})


class _SafeUnpickler:
    """A pickle interpreter for state dicts: containers, tensors and nothing else.

    It walks the opcodes of the stream (``pickletools.genops`` parses them; nothing is
    evaluated by :mod:`pickle`) and keeps its own stack and memo. Each allowed opcode has a small
    handler in :data:`_OPCODE_HANDLERS`; any other opcode is refused. ``GLOBAL`` names resolve only
    through ``_ALLOWED_GLOBALS``; ``REDUCE`` only calls those stand-ins; ``BUILD`` is only
    accepted on dicts (``OrderedDict`` attributes such as ``_metadata``, which are dropped).
    """

    def __init__(self, data: bytes, persistent_load: Callable[[Any], Any], source: str) -> None:
        self.data = data
        self.persistent_load = persistent_load
        self.source = source
        self.stack: list[Any] = []
        self.marks: list[list[Any]] = []  # the stack as it was at each open MARK
        self.memo: dict[int, Any] = {}

    def _global(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            full = f"{module}.{name}"
            raise UnsafeCheckpointError(
                f"refusing to load {self.source}: its pickle references the global '{full}', "
                f"which is not a tensor-rebuild function, storage type, OrderedDict or plain "
                f"container (nothing from the file was run); only state dicts of tensors can be "
                f"read", full) from None

    def load(self) -> Any:
        """The object the pickle describes; :class:`CheckpointFormatError` for anything else."""
        self.stack, self.marks, self.memo = [], [], {}
        try:
            for op, arg, pos in pickletools.genops(self.data):
                if op.name == "STOP":
                    return self._stop()
                handler = _OPCODE_HANDLERS.get(op.name)
                if handler is None:
                    raise CheckpointFormatError(
                        f"pickle opcode {op.name} (at byte {pos}) is not allowed in a state dict")
                handler(self, arg)
        except (CheckpointFormatError, UnsafeCheckpointError):
            raise
        except (IndexError, KeyError, TypeError, ValueError, AttributeError, EOFError,
                struct.error, UnicodeDecodeError) as exc:
            raise CheckpointFormatError(
                f"{self.source}: corrupt or truncated pickle ({type(exc).__name__}: {exc})"
            ) from None
        raise CheckpointFormatError(f"{self.source}: pickle has no STOP opcode (truncated)")

    # Stack and memo ------------------------------------------------------------------------
    def _stop(self) -> Any:
        if len(self.stack) != 1 or self.marks:
            raise CheckpointFormatError("pickle ended with a malformed stack")
        return self.stack[0]

    def _pop_mark(self) -> list[Any]:
        """The items pushed since the last MARK; the stack before it becomes current again."""
        items = self.stack
        self.stack = self.marks.pop()
        return items

    def _push_arg(self, arg: Any) -> None:
        self.stack.append(arg)

    def _mark(self, arg: Any) -> None:
        self.marks.append(self.stack)
        self.stack = []

    def _put(self, arg: Any) -> None:
        self.memo[arg] = self.stack[-1]

    def _get(self, arg: Any) -> None:
        self.stack.append(self.memo[arg])

    def _memoize(self, arg: Any) -> None:
        self.memo[len(self.memo)] = self.stack[-1]

    def _pop(self, arg: Any) -> None:
        if self.stack:
            self.stack.pop()
        else:
            self._pop_mark()

    def _pop_mark_op(self, arg: Any) -> None:
        self._pop_mark()

    def _dup(self, arg: Any) -> None:
        self.stack.append(self.stack[-1])

    def _proto(self, arg: Any) -> None:
        if arg > 5:
            raise CheckpointFormatError(f"unsupported pickle protocol {arg}")

    def _frame(self, arg: Any) -> None:
        pass

    # Containers ----------------------------------------------------------------------------
    def _tuple(self, arg: Any) -> None:
        items = self._pop_mark()
        self.stack.append(tuple(items))

    def _list(self, arg: Any) -> None:
        items = self._pop_mark()
        self.stack.append(items)

    def _dict(self, arg: Any) -> None:
        items = self._pop_mark()
        self.stack.append(dict(zip(items[::2], items[1::2], strict=False)))

    def _frozenset(self, arg: Any) -> None:
        items = self._pop_mark()
        self.stack.append(frozenset(items))

    def _append(self, arg: Any) -> None:
        value = self.stack.pop()
        self._expect(self.stack[-1], list, "APPEND").append(value)

    def _appends(self, arg: Any) -> None:
        items = self._pop_mark()
        self._expect(self.stack[-1], list, "APPENDS").extend(items)

    def _setitem(self, arg: Any) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._expect(self.stack[-1], dict, "SETITEM")[key] = value

    def _setitems(self, arg: Any) -> None:
        items = self._pop_mark()
        target = self._expect(self.stack[-1], dict, "SETITEMS")
        if len(items) % 2:
            raise CheckpointFormatError("SETITEMS with an odd number of items")
        for k, v in zip(items[::2], items[1::2], strict=True):
            target[k] = v

    def _additems(self, arg: Any) -> None:
        items = self._pop_mark()
        self._expect(self.stack[-1], set, "ADDITEMS").update(items)

    # Globals, calls and storages -------------------------------------------------------------
    def _global_op(self, arg: Any) -> None:
        module, _, attr = arg.partition(" ")
        self.stack.append(self._global(module, attr))

    def _stack_global(self, arg: Any) -> None:
        attr = self.stack.pop()
        module = self.stack.pop()
        if not isinstance(module, str) or not isinstance(attr, str):
            raise CheckpointFormatError("STACK_GLOBAL needs two strings")
        self.stack.append(self._global(module, attr))

    def _reduce(self, arg: Any) -> None:  # REDUCE and NEWOBJ: callable, then its argument tuple
        args = self.stack.pop()
        func = self.stack.pop()
        self.stack.append(self._call(func, args))

    def _build(self, arg: Any) -> None:
        # Attributes of an OrderedDict (torch's _metadata): neither needed nor applied.
        self.stack.pop()
        self._expect(self.stack[-1], dict, "BUILD")

    def _binpersid(self, arg: Any) -> None:
        self.stack.append(self.persistent_load(self.stack.pop()))

    def _persid(self, arg: Any) -> None:
        self.stack.append(self.persistent_load(arg))

    @staticmethod
    def _expect(obj: Any, kind: type, op: str) -> Any:
        if not isinstance(obj, kind):
            raise CheckpointFormatError(f"pickle opcode {op} applied to a {type(obj).__name__}")
        return obj

    @staticmethod
    def _call(func: Any, args: Any) -> Any:
        if not isinstance(func, _SafeCallable):
            raise CheckpointFormatError(
                f"pickle tries to call {getattr(func, 'name', type(func).__name__)}, which is not "
                f"a tensor-rebuild function or container")
        if not isinstance(args, tuple):
            raise CheckpointFormatError("pickle call arguments are not a tuple")
        return func(*args)


_Handler = Callable[[_SafeUnpickler, Any], None]


def _push_new(factory: Callable[[], Any]) -> _Handler:
    """A handler that pushes a fresh ``factory()`` (constants and empty containers)."""
    def handler(machine: _SafeUnpickler, arg: Any) -> None:
        machine.stack.append(factory())
    return handler


def _tuple_of(n: int) -> _Handler:
    """The handler of TUPLE1/2/3: the top ``n`` items become one tuple."""
    def handler(machine: _SafeUnpickler, arg: Any) -> None:
        items = tuple(machine.stack[-n:])
        if len(items) != n:
            raise IndexError("stack underflow")
        del machine.stack[-n:]
        machine.stack.append(items)
    return handler


# The opcodes a state dict needs, each with its handler; every other opcode is refused.
_U = _SafeUnpickler
_OPCODE_HANDLERS: dict[str, _Handler] = {
    **dict.fromkeys(_PUSH_ARG, _U._push_arg),
    "BINPUT": _U._put, "LONG_BINPUT": _U._put, "PUT": _U._put,
    "BINGET": _U._get, "LONG_BINGET": _U._get, "GET": _U._get,
    "MEMOIZE": _U._memoize, "MARK": _U._mark, "PROTO": _U._proto, "FRAME": _U._frame,
    "POP": _U._pop, "POP_MARK": _U._pop_mark_op, "DUP": _U._dup,
    "NONE": _push_new(lambda: None), "NEWTRUE": _push_new(lambda: True),
    "NEWFALSE": _push_new(lambda: False),
    "EMPTY_DICT": _push_new(dict), "EMPTY_LIST": _push_new(list), "EMPTY_TUPLE": _push_new(tuple),
    "EMPTY_SET": _push_new(set),
    "BYTEARRAY8": lambda machine, arg: machine.stack.append(bytearray(arg)),
    "TUPLE": _U._tuple, "TUPLE1": _tuple_of(1), "TUPLE2": _tuple_of(2), "TUPLE3": _tuple_of(3),
    "LIST": _U._list, "DICT": _U._dict, "FROZENSET": _U._frozenset,
    "APPEND": _U._append, "APPENDS": _U._appends, "SETITEM": _U._setitem,
    "SETITEMS": _U._setitems, "ADDITEMS": _U._additems,
    "GLOBAL": _U._global_op, "STACK_GLOBAL": _U._stack_global,
    "REDUCE": _U._reduce, "NEWOBJ": _U._reduce, "BUILD": _U._build,
    "BINPERSID": _U._binpersid, "PERSID": _U._persid,
}
del _U


# --------------------------------------------------------------------------------------------
# Zip archive
# --------------------------------------------------------------------------------------------
def _read_member(zf: zipfile.ZipFile, name: str, source: str) -> bytes:
    try:
        return zf.read(name)
    except KeyError:
        raise CheckpointFormatError(f"{source}: archive member {name} is missing (the file is "
                                    f"incomplete or corrupt)") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise CheckpointFormatError(f"{source}: archive member {name} is corrupt or truncated "
                                    f"({exc})") from None


def _load_torch_zip(path: Path) -> Any:
    source = path.name
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise CheckpointFormatError(f"{source}: truncated or corrupt zip archive ({exc}); "
                                    f"download or copy the file again") from None
    with zf:
        pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pickles:
            if "data.pkl" in zf.namelist():
                pickles = ["data.pkl"]
            else:
                raise CheckpointFormatError(f"{source}: zip archive without <name>/data.pkl: not a "
                                            f"PyTorch checkpoint")
        if len(pickles) > 1:
            raise CheckpointFormatError(f"{source}: several data.pkl records ({pickles}): not a "
                                        f"single PyTorch checkpoint")
        prefix = pickles[0][: -len("data.pkl")]
        names = set(zf.namelist())
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = _read_member(zf, prefix + "byteorder", source).decode("ascii",
                                                                             "replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointFormatError(f"{source}: unknown byteorder {byteorder!r}")
        storages: dict[str, _Storage] = {}

        def persistent_load(pid: Any) -> _Storage:
            if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                    or not isinstance(pid[1], _StorageType)):
                raise CheckpointFormatError(f"{source}: unsupported persistent id {pid!r}")
            _, stype, key, _location, numel = pid
            key = str(key)
            if key in storages:
                return storages[key]
            if "/" in key or key in ("", ".", ".."):
                raise CheckpointFormatError(f"{source}: bad storage key {key!r}")
            raw = _read_member(zf, f"{prefix}data/{key}", source)
            if isinstance(numel, int) and len(raw) != numel * stype.dtype.itemsize:
                raise CheckpointFormatError(
                    f"{source}: storage {key} has {len(raw)} bytes, expected "
                    f"{numel} x {stype.dtype.itemsize}: the file is corrupt")
            arr = np.frombuffer(raw, dtype=np.uint8).copy()
            if byteorder == "big":
                arr = _swap_bytes(arr, stype.dtype)
            storages[key] = _Storage(arr, stype.dtype, key)
            return storages[key]

        data = _read_member(zf, pickles[0], source)
        return _SafeUnpickler(data, persistent_load, source).load()


def _swap_bytes(raw: np.ndarray, dtype: np.dtype) -> np.ndarray:
    unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
    if unit <= 1:
        return raw
    return raw.view(f"<u{unit}").byteswap().view(np.uint8)


# --------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
    "U8": "uint8", "BOOL": "bool", "C64": "complex64",
}


def load_safetensors(path: PathLike) -> dict[str, np.ndarray]:
    """Read a ``.safetensors`` file into ``{name: array}`` (its own parser; no code is run)."""
    path = Path(path)
    source = path.name
    blob = _read_bytes(path)
    if len(blob) < 8:
        raise CheckpointFormatError(f"{source}: too short for a safetensors file (truncated)")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > len(blob) - 8:
        raise CheckpointFormatError(f"{source}: safetensors header of {header_len} bytes does not "
                                    f"fit in the {len(blob)}-byte file (truncated or not "
                                    f"safetensors)")
    try:
        header = json.loads(blob[8:8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointFormatError(f"{source}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{source}: safetensors header is not a JSON object")
    body = memoryview(blob)[8 + header_len:]
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _NP_DTYPES[_SAFETENSORS_DTYPES[info["dtype"]]]
            shape = _as_shape(info["shape"], "shape")
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointFormatError(f"{source}: bad safetensors entry {name!r} "
                                        f"({type(exc).__name__}: {exc})") from None
        count = int(np.prod(shape, dtype=np.int64))
        if not 0 <= begin <= end <= len(body) or end - begin != count * dtype.itemsize:
            raise CheckpointFormatError(f"{source}: tensor {name!r} data [{begin}, {end}) does not "
                                        f"fit its shape {shape} or the file (truncated?)")
        out[name] = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape).copy()
    return out


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    except IsADirectoryError:
        raise CheckpointFormatError(f"{path} is a directory, not a checkpoint file") from None


def _sniff(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    except IsADirectoryError:
        raise CheckpointFormatError(f"{path} is a directory, not a checkpoint file") from None
    if not head:
        raise CheckpointFormatError(f"{path.name} is empty")
    if head.startswith(_ZIP_MAGIC) or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head.startswith(_LEGACY_MAGIC):
        return "legacy"
    if len(head) > 262 and head[257:262] == b"ustar":
        return "legacy"
    if head[:1] == b"\x80":
        return "pickle"
    if path.suffix == ".safetensors" or (len(head) > 8 and head[8:9] == b"{"):
        return "safetensors"
    return "unknown"


def load_torch_state_dict(path: PathLike, key: str | None = None) -> dict[str, np.ndarray]:
    """Read a PyTorch checkpoint's state dict as NumPy arrays, without torch and running nothing.

    Accepts PyTorch's zip format (``torch.save``, torch>=1.6) and ``.safetensors``. A state
    dict nested under one of :data:`WRAPPER_KEYS` (``{"state_dict": ...}``, ``{"params": ...}``)
    or under ``key`` is unwrapped, and a ``module.`` prefix shared by every key (DataParallel)
    is removed. Raises :class:`UnsafeCheckpointError` for a pickle naming anything besides
    tensors and plain containers, :class:`CheckpointFormatError` for other unreadable files.
    """
    path = Path(path)
    kind = _sniff(path)
    if kind == "legacy":
        raise CheckpointFormatError(f"{path.name} uses PyTorch's legacy (pre-1.6) serialization "
                                    f"format, which is not supported: {_RESAVE_HINT}")
    if kind == "pickle":
        raise CheckpointFormatError(f"{path.name} is a bare pickle, not a PyTorch zip checkpoint: "
                                    f"{_RESAVE_HINT}")
    if kind == "unknown":
        raise CheckpointFormatError(f"{path.name} is neither a PyTorch zip checkpoint (.pth saved "
                                    f"by torch>=1.6) nor a .safetensors file")
    if kind == "safetensors":
        obj: Any = load_safetensors(path)
    else:
        obj = _load_torch_zip(path)
    return _extract_state_dict(obj, key, path.name)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())


def _extract_state_dict(obj: Any, key: str | None, source: str) -> dict[str, np.ndarray]:
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{source} holds a {type(obj).__name__}, not a state dict "
                                    f"(a mapping of names to tensors)")
    if key is not None:
        if key not in obj:
            raise CheckpointFormatError(f"{source} has no entry {key!r}; its top-level keys are "
                                        f"{_key_list(obj)}")
        obj = obj[key]
        if not _is_state_dict(obj):
            raise CheckpointFormatError(f"{source}[{key!r}] is not a mapping of names to tensors")
    elif not _is_state_dict(obj):
        for candidate in WRAPPER_KEYS:
            if candidate in obj and _is_state_dict(obj[candidate]):
                obj = obj[candidate]
                break
        else:
            raise CheckpointFormatError(
                f"{source} does not hold a state dict of tensors, nor one under "
                f"{', '.join(WRAPPER_KEYS)}; its top-level keys are {_key_list(obj)}: pass key=")
    state = {str(k): v for k, v in obj.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _key_list(obj: Mapping) -> str:
    keys = [repr(k) for k in list(obj)[:12]]
    more = f" (+{len(obj) - 12} more)" if len(obj) > 12 else ""
    return "[" + ", ".join(keys) + "]" + more
