"""GGUF files: read (v2, v3) and write (v3) on top of the Rust reader and writer.

    import ferroquant.gguf as fg
    with fg.open("model.gguf") as f:
        f.metadata["general.architecture"]        # Python values; numeric arrays as numpy arrays
        t = f.tensors["blk.0.attn_q.weight"]
        t.shape, t.qtype, t.data                  # numpy order, qtype name, zero-copy uint8 view
        w = t.dequantize()                        # float32 numpy array of t.shape

    with fg.GGUFWriter("out.gguf", "llama") as w:   # streaming: infos first, then tensor by tensor
        w.add_uint32("llama.context_length", 4096)
        w.add_tensor_info("tok_embd.weight", (32000, 4096), "q8_0")
        w.write_tensor_data(fq.quantize(emb, "q8_0"))
    fg.write_gguf("out.gguf", metadata, {"name": array_or_qtensor, ...})

Names follow gguf-py (`GGUFWriter.add_*`, `add_tensor_info`, `write_tensor_data`, value type names
as in `GGUFValueType`). Files are untrusted: a malformed file raises `ferroquant.FormatError`
naming the field and byte offset. Writes are atomic (temporary file, fsync, rename).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from . import _native
from .qtypes import qtype_info
from .tensor import QTensor, QuantizeError
from .tensor import dequantize as _dequantize

FormatError = _native.FormatError

# GGUF metadata value types (gguf-py's GGUFValueType, lower-cased names).
VALUE_TYPES: dict[str, int] = {
    "uint8": 0, "int8": 1, "uint16": 2, "int16": 3, "uint32": 4, "int32": 5, "float32": 6,
    "bool": 7, "string": 8, "array": 9, "uint64": 10, "int64": 11, "float64": 12,
}  # fmt: skip
_ARRAY = VALUE_TYPES["array"]
_STRING = VALUE_TYPES["string"]
_BOOL = VALUE_TYPES["bool"]
_NUMPY_OF_VALUE_TYPE: dict[int, Any] = {
    0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
    6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64,
}  # fmt: skip
_VALUE_TYPE_OF_NUMPY = {np.dtype(v): k for k, v in _NUMPY_OF_VALUE_TYPE.items()}

# ggml tensor types: id -> (name, block size, type size), and name -> id.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    i: (name, bs, ts) for i, name, bs, ts in _native.ggml_types()
}
_GGML_ID = {name: i for i, (name, _, _) in GGML_TYPES.items()}
_NUMPY_GGML = {
    "float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64",
    "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64",
}  # fmt: skip
_GGML_NUMPY = {v: k for k, v in _NUMPY_GGML.items()}

DEFAULT_ALIGNMENT = 32


def _value_type_id(t: Any) -> int:
    """A value type given as gguf-py's GGUFValueType, an int, or a name ("uint32")."""
    if isinstance(t, str):
        try:
            return VALUE_TYPES[t.lower()]
        except KeyError:
            known = " ".join(VALUE_TYPES)
            raise ValueError(f"unknown GGUF value type {t!r}; known: {known}") from None
    t = int(t)
    if not 0 <= t <= 12:
        raise ValueError(f"unknown GGUF value type {t}")
    return t


def _parse_type_hint(hint: Any) -> tuple[int, int | None]:
    """(type, array element type) from "uint32", "array[string]", a GGUFValueType or an int."""
    if isinstance(hint, str) and hint.lower().startswith("array[") and hint.endswith("]"):
        return _ARRAY, _value_type_id(hint[6:-1])
    if isinstance(hint, tuple):
        return _value_type_id(hint[0]), None if hint[1] is None else _value_type_id(hint[1])
    return _value_type_id(hint), None


def ggml_type_id(t: Any) -> int:
    """A ggml tensor type given as an id, gguf-py's GGMLQuantizationType or a name ("q4_0")."""
    if isinstance(t, str):
        try:
            return _GGML_ID[t.lower()]
        except KeyError:
            known = " ".join(_GGML_ID)
            raise ValueError(f"unknown ggml tensor type {t!r}; known: {known}") from None
    t = int(t)
    if t not in GGML_TYPES:
        raise ValueError(f"unknown ggml tensor type id {t}")
    return t


def _infer_scalar_type(v: Any) -> int:
    if isinstance(v, (bool, np.bool_)):
        return _BOOL
    if isinstance(v, np.generic):
        try:
            return _VALUE_TYPE_OF_NUMPY[v.dtype]
        except KeyError:
            raise ValueError(f"no GGUF value type for numpy {v.dtype}") from None
    if isinstance(v, (str, bytes, bytearray)):
        return _STRING
    if isinstance(v, int):  # gguf-py writes Python ints as int32; wider ones need 64 bits
        if -(2**31) <= v < 2**31:
            return VALUE_TYPES["int32"]
        return VALUE_TYPES["int64"] if -(2**63) <= v < 2**63 else VALUE_TYPES["uint64"]
    if isinstance(v, float):
        return VALUE_TYPES["float32"]
    if isinstance(v, (list, tuple, np.ndarray)):
        return _ARRAY
    raise ValueError(f"cannot store a {type(v).__name__} in GGUF metadata")


def _infer_elem_type(items: list[Any]) -> int:
    if not items:
        raise ValueError("an empty metadata array needs an explicit element type (sub_type)")
    types = {_infer_scalar_type(x) for x in items}
    if types <= {VALUE_TYPES["int32"], VALUE_TYPES["int64"], VALUE_TYPES["uint64"]}:
        return max(types, key=lambda t: (t != 5, t))  # int32 unless some value needs 64 bits
    if len(types) != 1:
        names = sorted(k for k, v in VALUE_TYPES.items() if v in types)
        raise ValueError(f"all items of a GGUF array must have one type, got {names}")
    return types.pop()


def _array_spec(val: Any, elem: int | None) -> tuple[int, Any]:
    if isinstance(val, np.ndarray):
        if val.ndim != 1:
            raise ValueError(f"metadata arrays are 1-D, got shape {val.shape}")
        if elem is None:
            elem = _infer_scalar_type(val.dtype.type(0)) if val.dtype != object else None
        if elem is not None and elem in _NUMPY_OF_VALUE_TYPE:
            return elem, np.ascontiguousarray(val, dtype=_NUMPY_OF_VALUE_TYPE[elem])
        val = val.tolist()
    elif isinstance(val, (bytes, bytearray)) and elem is None:
        return 0, np.frombuffer(bytes(val), dtype=np.uint8)
    items = list(val)
    if elem is None:
        elem = _infer_elem_type(items)
    if elem == _STRING:
        return elem, [_as_str(x) for x in items]
    if elem == _ARRAY:
        return elem, [_array_spec(x, None) for x in items]
    dtype = _NUMPY_OF_VALUE_TYPE[elem]
    arr = np.asarray(items, dtype=dtype) if items else np.zeros(0, dtype)
    if elem != _BOOL and not np.issubdtype(dtype, np.floating):
        info = np.iinfo(dtype)
        if any(not info.min <= int(x) <= info.max for x in items):
            raise ValueError(f"array values out of range for {np.dtype(dtype).name}")
    return elem, arr


def _as_str(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, (bytes, bytearray)) else str(x)


def _value_spec(val: Any, vtype: Any = None, sub_type: Any = None) -> tuple[int, Any]:
    """(type id, payload) as the native writer takes it."""
    if vtype is None:
        t, elem = _infer_scalar_type(val), None
    else:
        t, elem = _parse_type_hint(vtype)
    if sub_type is not None:
        elem = _value_type_id(sub_type)
    if t == _ARRAY:
        return t, _array_spec(val, elem)
    if t == _STRING:
        return t, _as_str(val)
    if t == _BOOL:
        return t, bool(val)
    if t in (VALUE_TYPES["float32"], VALUE_TYPES["float64"]):
        return t, float(val)
    return t, int(val)


class GGUFTensor:
    """One tensor of an open GGUF file. `data` is a read-only uint8 view of the mapped bytes."""

    __slots__ = ("name", "shape", "qtype", "ggml_type", "n_elements", "nbytes", "data_offset",
                 "_file", "_index")  # fmt: skip

    def __init__(self, file: GGUFFile, index: int, row: tuple) -> None:
        name, dims, type_id, type_name, offset, nbytes, n_elements = row
        self.name: str = name
        self.shape: tuple[int, ...] = tuple(int(d) for d in reversed(dims))
        self.qtype: str = type_name
        self.ggml_type: int = int(type_id)
        self.n_elements: int = int(n_elements)
        self.nbytes: int = int(nbytes)
        self.data_offset: int = int(offset)
        self._file = file
        self._index = index

    @property
    def data(self) -> np.ndarray:
        """The raw bytes (rows of blocks, as ggml stores them), viewing the file without a copy."""
        return self._file._handle().tensor_data(self._index)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.n_elements if self.n_elements else 0.0

    def numpy(self) -> np.ndarray:
        """The values of an unquantized tensor (f32, f16, bf16, f64, i8..i64) as a typed view."""
        dtype_name = _GGML_NUMPY.get(self.qtype)
        if dtype_name is None:
            raise QuantizeError(f"{self.name}: {self.qtype} is quantized; use .dequantize()")
        if dtype_name == "bfloat16":
            import ml_dtypes

            dtype = np.dtype(ml_dtypes.bfloat16)
        else:
            dtype = np.dtype(dtype_name).newbyteorder("<")
        return self.data.view(dtype).reshape(self.shape)

    def to_qtensor(self) -> QTensor:
        """A QTensor whose data is the mapped bytes (no copy)."""
        try:
            info = qtype_info(self.qtype)
        except QuantizeError:
            raise QuantizeError(
                f"{self.name}: ggml type {self.qtype} ({self.ggml_type}) is not one of "
                "ferroquant's qtypes"
            ) from None
        shape = self.shape if self.shape else (1,)
        return QTensor(qtype=info.name, shape=shape, data=self.data, block_size=info.block_size)

    def dequantize(self, dtype: Any = "float32") -> np.ndarray:
        return _dequantize(self.to_qtensor(), dtype).reshape(self.shape)

    def __repr__(self) -> str:
        return (
            f"GGUFTensor({self.name!r}, shape={self.shape}, qtype={self.qtype!r}, "
            f"nbytes={self.nbytes})"
        )


class GGUFFile:
    """An open GGUF file: `metadata` (key -> Python value), `metadata_types` (key -> gguf-py
    value type name, "array[...]" for arrays), `tensors` (name -> GGUFTensor, file order)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._native: Any = _native.GgufFile(self.path)
        n = self._native
        self.version: int = n.version
        self.alignment: int = n.alignment
        self.data_offset: int = n.data_offset
        self.file_size: int = n.file_size
        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, str] = {}
        self.metadata_offsets: dict[str, int] = {}
        for key, type_name, value, offset in n.metadata():
            self.metadata[key] = value
            self.metadata_types[key] = type_name
            self.metadata_offsets[key] = offset
        self.tensors: dict[str, GGUFTensor] = {
            row[0]: GGUFTensor(self, i, row) for i, row in enumerate(n.tensors())
        }

    def _handle(self) -> Any:
        if self._native is None:
            raise ValueError(f"{self.path}: the GGUF file is closed")
        return self._native

    @property
    def closed(self) -> bool:
        return self._native is None

    def close(self) -> None:
        """Drop this object's hold on the map; data views already handed out stay valid."""
        self._native = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"GGUFFile({self.path!r}, version={self.version}, {len(self.metadata)} keys, "
            f"{len(self.tensors)} tensors)"
        )


def open(path: str | os.PathLike[str]) -> GGUFFile:
    """Open a GGUF file (memory-mapped); use as a context manager."""
    return GGUFFile(path)


def _tensor_payload(
    tensor: Any, raw_shape: Any = None, raw_dtype: Any = None
) -> tuple[tuple[int, ...], int, np.ndarray]:
    """(numpy-order shape, ggml type id, flat uint8 bytes) of a numpy array, torch tensor or
    QTensor."""
    if isinstance(tensor, QTensor):
        info = qtype_info(tensor.qtype)
        if info.ggml_id is None:
            raise ValueError(f"{info.name} has no ggml type and cannot be stored in a GGUF file")
        shape = tuple(raw_shape) if raw_shape is not None else tuple(tensor.shape)
        return shape, info.ggml_id, np.ascontiguousarray(tensor.data, np.uint8).reshape(-1)
    if type(tensor).__module__.startswith("torch"):
        import torch

        t = tensor.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            arr = t.view(torch.int16).numpy().view(np.uint16)
            if raw_dtype is None:
                raw_dtype = "bf16"
        else:
            arr = t.numpy()
        tensor = arr
    if not isinstance(tensor, np.ndarray):
        kind = type(tensor).__name__
        raise ValueError(f"expected a numpy array, torch tensor or QTensor, got {kind}")
    arr = tensor
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    arr = np.ascontiguousarray(arr)
    if raw_dtype is not None:
        type_id = ggml_type_id(raw_dtype)
        shape = tuple(raw_shape) if raw_shape is not None else tuple(arr.shape)
        if arr.dtype == np.uint8 and raw_shape is None:
            # gguf-py's quant_shape_from_byte_shape: the last axis holds bytes
            _, bs, ts = GGML_TYPES[type_id]
            if shape and shape[-1] % ts != 0:
                raise ValueError(f"last axis of {shape} bytes is not a whole number of blocks")
            shape = (*shape[:-1], shape[-1] // ts * bs) if shape else shape
    else:
        ggml_name = _NUMPY_GGML.get(str(arr.dtype))
        if ggml_name is None:
            raise ValueError(
                f"no ggml type for numpy {arr.dtype}; pass raw_dtype (e.g. 'q4_0') with uint8 data"
            )
        type_id = _GGML_ID[ggml_name]
        shape = tuple(raw_shape) if raw_shape is not None else tuple(arr.shape)
    return tuple(int(s) for s in shape), type_id, arr.reshape(-1).view(np.uint8)


def tensor_nbytes(shape: Iterable[int], ggml_type: Any) -> int:
    """Bytes of a tensor of numpy-order `shape` and the given ggml type."""
    name, bs, ts = GGML_TYPES[ggml_type_id(ggml_type)]
    shape = tuple(int(s) for s in shape)
    cols = shape[-1] if shape else 1
    if cols % bs:
        raise ValueError(f"last dimension {cols} is not a multiple of {name}'s block size {bs}")
    return int(np.prod(shape[:-1], dtype=np.int64)) * (cols // bs) * ts


_nbytes_of = tensor_nbytes


class GGUFWriter:
    """Streaming, atomic GGUF v3 writer with gguf-py's method names.

    Declare metadata (`add_*`) and tensors (`add_tensor_info`, or `add_tensor` to keep an
    in-memory tensor), then `write_header_to_file()` / `write_kv_data_to_file()` /
    `write_ti_data_to_file()` (any of them writes everything up to the data), stream tensors with
    `write_tensor_data` in declaration order (or `write_tensors_to_file` for the kept ones), and
    `close()` to fsync and rename into place. An exception inside `with` leaves no file behind.
    """

    def __init__(
        self, path: str | os.PathLike[str], arch: str | None = None, *, alignment: int | None = None
    ) -> None:
        self.path = os.fspath(path)
        self.arch = arch
        self._kv: dict[str, tuple[int, Any]] = {}
        self._tensors: list[tuple[str, tuple[int, ...], int, int]] = []
        self._pending: dict[str, np.ndarray] = {}
        self._native: Any = None
        self._closed = False
        if arch is not None:
            self.add_architecture()
        if alignment is not None:
            self.add_custom_alignment(alignment)

    # -- metadata ------------------------------------------------------------------------------
    def _check_open_for_header(self) -> None:
        if self._native is not None or self._closed:
            raise ValueError("the header is already written; add metadata and tensors before")

    def add_key_value(self, key: str, val: Any, vtype: Any, sub_type: Any = None) -> None:
        self._check_open_for_header()
        self._kv[key] = _value_spec(val, vtype, sub_type)

    def add_uint8(self, key: str, val: int) -> None:
        self.add_key_value(key, val, "uint8")

    def add_int8(self, key: str, val: int) -> None:
        self.add_key_value(key, val, "int8")

    def add_uint16(self, key: str, val: int) -> None:
        self.add_key_value(key, val, "uint16")

    def add_int16(self, key: str, val: int) -> None:
        self.add_key_value(key, val, "int16")

    def add_uint32(self, key: str, val: int) -> None:
        self.add_key_value(key, val, "uint32")

    def add_int32(self, key: str, val: int) -> None:
        self.add_key_value(key, val, "int32")

    def add_float32(self, key: str, val: float) -> None:
        self.add_key_value(key, val, "float32")

    def add_uint64(self, key: str, val: int) -> None:
        self.add_key_value(key, val, "uint64")

    def add_int64(self, key: str, val: int) -> None:
        self.add_key_value(key, val, "int64")

    def add_float64(self, key: str, val: float) -> None:
        self.add_key_value(key, val, "float64")

    def add_bool(self, key: str, val: bool) -> None:
        self.add_key_value(key, val, "bool")

    def add_string(self, key: str, val: str) -> None:
        self.add_key_value(key, val, "string")

    def add_array(self, key: str, val: Any, sub_type: Any = None) -> None:
        self.add_key_value(key, val, "array", sub_type)

    def add_architecture(self) -> None:
        if self.arch is None:
            raise ValueError("no architecture was given to GGUFWriter")
        self.add_string("general.architecture", self.arch)

    def add_name(self, name: str) -> None:
        self.add_string("general.name", name)

    def add_file_type(self, ftype: int) -> None:
        self.add_uint32("general.file_type", ftype)

    def add_quantization_version(self, quantization_version: int) -> None:
        self.add_uint32("general.quantization_version", quantization_version)

    def add_custom_alignment(self, alignment: int) -> None:
        self.add_uint32("general.alignment", alignment)

    # -- tensors -------------------------------------------------------------------------------
    def add_tensor_info(
        self,
        name: str,
        tensor_shape: Iterable[int],
        tensor_dtype: Any,
        tensor_nbytes: int | None = None,
        raw_dtype: Any = None,
    ) -> None:
        """Declare a tensor: numpy-order shape and its type (ggml type name or id, or a numpy
        dtype for unquantized data; `raw_dtype` overrides, as in gguf-py)."""
        self._check_open_for_header()
        if any(t[0] == name for t in self._tensors):
            raise ValueError(f"duplicated tensor name {name!r}")
        t = raw_dtype if raw_dtype is not None else tensor_dtype
        if not isinstance(t, (str, int)):
            dname = str(np.dtype(t))
            if dname not in _NUMPY_GGML:
                raise ValueError(f"no ggml type for numpy {dname}")
            t = _NUMPY_GGML[dname]
        type_id = ggml_type_id(t)
        shape = tuple(int(s) for s in tensor_shape)
        try:
            nbytes = _nbytes_of(shape, type_id)  # the argument shadows tensor_nbytes()
        except ValueError as e:
            raise ValueError(f"tensor {name!r}: {e}") from None
        if tensor_nbytes is not None and int(tensor_nbytes) != nbytes:
            raise ValueError(f"tensor {name!r}: {shape} is {nbytes} bytes, not {tensor_nbytes}")
        self._tensors.append((name, shape, type_id, nbytes))

    def add_tensor(
        self, name: str, tensor: Any, raw_shape: Any = None, raw_dtype: Any = None
    ) -> None:
        """Declare a tensor and keep it for `write_tensors_to_file` (numpy, torch or QTensor)."""
        shape, type_id, data = _tensor_payload(tensor, raw_shape, raw_dtype)
        self.add_tensor_info(name, shape, type_id, data.nbytes)
        self._pending[name] = data

    # -- writing -------------------------------------------------------------------------------
    def _begin(self) -> Any:
        if self._closed:
            raise ValueError("the GGUF writer is closed")
        if self._native is None:
            tensors = [(name, list(reversed(shape)), t) for name, shape, t, _ in self._tensors]
            self._native = _native.GgufWriter(self.path, list(self._kv.items()), tensors)
        return self._native

    def write_header_to_file(self, path: Any = None) -> None:
        if path is not None:
            self.path = os.fspath(path)
        self._begin()

    def write_kv_data_to_file(self) -> None:
        self._begin()

    def write_ti_data_to_file(self) -> None:
        self._begin()

    def write_tensor_data(self, tensor: Any, raw_shape: Any = None, raw_dtype: Any = None) -> None:
        """Write the next declared tensor (numpy, torch or QTensor) to the file now."""
        w = self._begin()
        nxt = w.next_tensor()
        if nxt is None:
            raise ValueError("all declared tensors are already written")
        name, nbytes = nxt
        shape, type_id, data = _tensor_payload(tensor, raw_shape, raw_dtype)
        _, want_shape, want_type, _ = next(t for t in self._tensors if t[0] == name)
        n_elem = int(np.prod(shape, dtype=np.int64))
        if type_id != want_type or n_elem != int(np.prod(want_shape, dtype=np.int64)):
            raise ValueError(
                f"tensor {name!r} was declared as {GGML_TYPES[want_type][0]} {want_shape}, got "
                f"{GGML_TYPES[type_id][0]} {shape}"
            )
        w.write_tensor(data)
        self._pending.pop(name, None)

    def write_tensors_to_file(self, *, progress: bool = False) -> None:
        """Write every tensor kept by `add_tensor`, in order."""
        w = self._begin()
        while (nxt := w.next_tensor()) is not None:
            name = nxt[0]
            if name not in self._pending:
                raise ValueError(f"tensor {name!r} was declared without data; write_tensor_data it")
            w.write_tensor(self._pending.pop(name))

    def flush(self) -> None:
        """Hand the bytes written so far to the operating system (no fsync): they survive this
        process being killed."""
        self._begin().flush()

    def close(self) -> None:
        """Finish: every declared tensor must be written. fsync, then rename into place."""
        if self._closed:
            return
        w = self._begin()
        self._closed = True
        w.finish()

    def abort(self) -> None:
        """Discard the temporary file; an existing file at `path` is left as it was."""
        if self._native is not None:
            self._native.abort()
        self._closed = True

    def __enter__(self) -> GGUFWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


def write_gguf(
    path: str | os.PathLike[str],
    metadata: Mapping[str, Any],
    tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
    *,
    types: Mapping[str, Any] | None = None,
    alignment: int | None = None,
) -> None:
    """Write a GGUF v3 file at once. Metadata value types are inferred as gguf-py does (int ->
    int32, float -> float32, numpy scalars and arrays by dtype) unless `types` names them
    (e.g. `GGUFFile.metadata_types`); tensors are numpy arrays, torch tensors or QTensors."""
    w = GGUFWriter(path, alignment=alignment)
    types = types or {}
    for key, val in metadata.items():
        w.add_key_value(key, val, types.get(key))
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    with w:
        for name, t in items:
            w.add_tensor(name, t)
        w.write_tensors_to_file()


def _fmt_value(type_name: str, v: Any) -> str:
    if type_name.startswith("array"):
        n = len(v)
        items = list(v[:4]) if not isinstance(v, np.ndarray) else v[:4].tolist()
        more = ", ..." if n > 4 else ""
        return f"[{n} items: {', '.join(repr(x) for x in items)}{more}]"
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def inspect(path: str | os.PathLike[str]) -> str:
    """A readable summary: metadata, a tensor table (name, shape, qtype, bytes) and totals."""
    with open(path) as f:
        lines = [
            f"{f.path}: GGUF v{f.version}, {len(f.metadata)} metadata keys, {len(f.tensors)} "
            f"tensors, alignment {f.alignment}, {f.file_size} bytes",
            "metadata:",
        ]
        kw = max((len(k) for k in f.metadata), default=0)
        for key, v in f.metadata.items():
            t = f.metadata_types[key]
            lines.append(f"  {key:<{kw}}  {t:<14} {_fmt_value(t, v)}")
        lines.append("tensors:")
        nw = max([4, *(len(n) for n in f.tensors)])
        lines.append(f"  {'name':<{nw}}  {'shape':<22} {'qtype':<8} {'bytes':>14}")
        n_weights = n_bytes = 0
        for t in f.tensors.values():
            shape = "x".join(str(s) for s in t.shape) or "()"
            lines.append(f"  {t.name:<{nw}}  {shape:<22} {t.qtype:<8} {t.nbytes:>14}")
            n_weights += t.n_elements
            n_bytes += t.nbytes
        bpw = 8.0 * n_bytes / n_weights if n_weights else 0.0
        lines.append(
            f"total: {n_weights} weights, {n_bytes} tensor bytes, {bpw:.3f} bits per weight"
        )
    return "\n".join(lines)


__all__ = [
    "DEFAULT_ALIGNMENT",
    "GGML_TYPES",
    "VALUE_TYPES",
    "FormatError",
    "GGUFFile",
    "GGUFTensor",
    "GGUFWriter",
    "ggml_type_id",
    "inspect",
    "open",
    "tensor_nbytes",
    "write_gguf",
]
