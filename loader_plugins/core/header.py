"""safetensors header parsing: bytes in, :class:`TensorSpec` out. No I/O here.

The header is untrusted input. Layout (https://github.com/huggingface/safetensors):
``u64 little-endian N`` | ``N bytes of JSON`` | data. Each JSON entry maps a tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` with offsets relative to the data area;
``__metadata__`` maps strings to strings.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from typing import Any, Iterable, Mapping

from ..errors import HeaderError

HEADER_LENGTH_BYTES = 8

# safetensors dtype -> (itemsize, torch attribute). Probed lazily because float8 (torch 2.1),
# unsigned 16/32/64 (torch 2.3) and float8_e8m0fnu (torch 2.7) depend on the torch version.
_DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U64": (8, "uint64"),
    "U32": (4, "uint32"),
    "U16": (2, "uint16"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E4M3FNUZ": (1, "float8_e4m3fnuz"),
    "F8_E5M2": (1, "float8_e5m2"),
    "F8_E5M2FNUZ": (1, "float8_e5m2fnuz"),
    "F8_E8M0": (1, "float8_e8m0fnu"),
    "C64": (8, "complex64"),
}
# Formats safetensors can describe but that torch cannot hold as one element per item.
_UNSUPPORTED = {"F4", "F6_E2M3", "F6_E3M2"}


def dtype_itemsize(dtype: str) -> int:
    return _DTYPES[dtype][0]


def torch_dtype(dtype: str):
    """The torch dtype for a safetensors dtype string (raises HeaderError if torch lacks it)."""
    import torch

    entry = _DTYPES.get(dtype)
    found = getattr(torch, entry[1], None) if entry else None
    if found is None:
        raise HeaderError(
            f"dtype {dtype!r} is not supported by torch {torch.__version__}; "
            f"supported: {', '.join(supported_dtypes())}"
        )
    return found


def supported_dtypes() -> list[str]:
    import torch

    return [name for name, (_, attr) in _DTYPES.items() if getattr(torch, attr, None) is not None]


def safetensors_dtype(torch_dt) -> str:
    """The safetensors dtype string for a torch dtype."""
    name = str(torch_dt).replace("torch.", "")
    for key, (_, attr) in _DTYPES.items():
        if attr == name:
            return key
    raise HeaderError(f"torch dtype {torch_dt} has no safetensors equivalent")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Where one tensor's bytes live. ``offset`` is absolute within ``file``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return dtype_itemsize(self.dtype)

    def torch_dtype(self):
        return torch_dtype(self.dtype)

    def describe(self) -> str:
        return f"tensor {self.name!r} bytes [{self.offset}, {self.end}) of {self.file}"


@dataclasses.dataclass(frozen=True)
class FileHeader:
    """A parsed safetensors header."""

    file: str
    file_size: int
    data_offset: int
    tensors: tuple[TensorSpec, ...]
    metadata: Mapping[str, str] | None

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def by_name(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in self.tensors}


def header_length(prefix: bytes, *, file: str, file_size: int, max_header_bytes: int) -> int:
    """Validate the 8-byte length prefix; returns N, the JSON length."""
    if file_size < HEADER_LENGTH_BYTES or len(prefix) < HEADER_LENGTH_BYTES:
        raise HeaderError(
            f"{file}: file is {file_size} bytes, too small for a safetensors header "
            f"(needs at least 8 bytes); the file is truncated or not safetensors"
        )
    (n,) = struct.unpack("<Q", prefix[:HEADER_LENGTH_BYTES])
    if n > max_header_bytes:
        raise HeaderError(
            f"{file}: header length {n} bytes exceeds the limit of {max_header_bytes} "
            f"(bytes [0, 8) of the file); the file is corrupt or not safetensors "
            f"(raise max_header_bytes only for a trusted file)"
        )
    if HEADER_LENGTH_BYTES + n > file_size:
        raise HeaderError(
            f"{file}: header length {n} bytes (bytes [0, 8)) runs past the end of the "
            f"{file_size}-byte file; the file is truncated or corrupt, re-download it"
        )
    if n < 2:
        raise HeaderError(f"{file}: header length {n} is too small for a JSON object; the file is corrupt")
    return n


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise HeaderError(f"duplicate key {key!r} in JSON")
        out[key] = value
    return out


def parse_header(header_json: bytes, *, file: str, file_size: int) -> FileHeader:
    """Parse and validate the JSON part of a safetensors header.

    ``header_json`` is the N bytes after the length prefix; ``file_size`` is the whole
    file's size, used to check that every tensor lies inside the data area.
    """
    n = len(header_json)
    data_offset = HEADER_LENGTH_BYTES + n
    data_size = file_size - data_offset
    where = f"{file}: header (bytes [8, {data_offset}))"
    try:
        text = header_json.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(f"{where} is not valid UTF-8 ({exc}); the file is corrupt or not safetensors") from exc
    if not text.lstrip().startswith("{"):
        raise HeaderError(f"{where} does not start with a JSON object; the file is corrupt or not safetensors")
    try:
        raw = json.loads(text, object_pairs_hook=_reject_duplicates)
    except HeaderError as exc:
        raise HeaderError(f"{where}: {exc}; the file is corrupt") from None
    except (ValueError, RecursionError) as exc:
        raise HeaderError(f"{where} is not valid JSON ({exc}); the file is corrupt or truncated") from exc
    if not isinstance(raw, dict):
        raise HeaderError(f"{where} must be a JSON object, got {type(raw).__name__}")

    metadata = raw.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise HeaderError(f"{where}: __metadata__ must map strings to strings")

    specs: list[TensorSpec] = []
    for name, entry in raw.items():
        specs.append(_parse_entry(name, entry, file=file, data_offset=data_offset, data_size=data_size))
    specs.sort(key=lambda s: (s.offset, s.nbytes))
    _check_overlaps(specs, file)
    return FileHeader(file=file, file_size=file_size, data_offset=data_offset, tensors=tuple(specs),
                      metadata=metadata)


def _parse_entry(name: str, entry: Any, *, file: str, data_offset: int, data_size: int) -> TensorSpec:
    where = f"{file}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise HeaderError(f"{where}: entry must be an object with dtype, shape, data_offsets")
    extra = set(entry) - {"dtype", "shape", "data_offsets"}
    missing = {"dtype", "shape", "data_offsets"} - set(entry)
    if missing:
        raise HeaderError(f"{where}: missing {', '.join(sorted(missing))}; the header is corrupt")
    if extra:
        raise HeaderError(f"{where}: unknown field(s) {', '.join(sorted(extra))}; the header is corrupt")
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        hint = "it packs several elements per byte, which this loader does not support" if dtype in _UNSUPPORTED else (
            f"known dtypes: {', '.join(_DTYPES)}")
        raise HeaderError(f"{where}: unsupported dtype {dtype!r}; {hint}")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise HeaderError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    offsets = entry["data_offsets"]
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets)):
        raise HeaderError(f"{where}: data_offsets must be [begin, end] non-negative integers, got {offsets!r}")
    begin, end = offsets
    if begin > end:
        raise HeaderError(f"{where}: data_offsets [{begin}, {end}) end before they begin; the header is corrupt")
    if end > data_size:
        raise HeaderError(
            f"{where}: bytes [{data_offset + begin}, {data_offset + end}) lie past the end of the "
            f"file ({data_offset + data_size} bytes); the file is truncated, re-download it"
        )
    itemsize = _DTYPES[dtype][0]
    numel = math.prod(shape)
    if numel * itemsize != end - begin:
        raise HeaderError(
            f"{where}: shape {shape} x {itemsize}-byte {dtype} = {numel * itemsize} bytes but "
            f"data_offsets [{begin}, {end}) hold {end - begin}; the header is corrupt"
        )
    return TensorSpec(name=name, dtype=dtype, shape=tuple(shape), file=file,
                      offset=data_offset + begin, nbytes=end - begin)


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_overlaps(specs: Iterable[TensorSpec], file: str) -> None:
    previous: TensorSpec | None = None
    for spec in specs:
        if spec.nbytes == 0:
            continue
        if previous is not None and spec.offset < previous.end:
            raise HeaderError(
                f"{file}: tensor {spec.name!r} bytes [{spec.offset}, {spec.end}) overlap tensor "
                f"{previous.name!r} bytes [{previous.offset}, {previous.end}); the header is corrupt"
            )
        previous = spec


def encode_header(tensors: Mapping[str, tuple[str, tuple[int, ...], int]],
                  metadata: Mapping[str, str] | None = None, *, align: int = 8) -> tuple[bytes, dict[str, int]]:
    """Build a safetensors header for ``name -> (dtype, shape, nbytes)`` laid out in order.

    Returns the header bytes (length prefix included) and each tensor's offset in the data area.
    Used by writers (demo checkpoints, disk tier); the JSON is padded with spaces to ``align``.
    """
    entries: dict[str, Any] = {}
    if metadata:
        entries["__metadata__"] = dict(metadata)
    offsets: dict[str, int] = {}
    pos = 0
    for name, (dtype, shape, nbytes) in tensors.items():
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets[name] = pos
        pos += nbytes
    body = json.dumps(entries, separators=(",", ":")).encode()
    body += b" " * (-(len(body) + HEADER_LENGTH_BYTES) % align)
    return struct.pack("<Q", len(body)) + body, offsets
