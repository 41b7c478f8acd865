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

#: safetensors' own limit on the JSON header (``MAX_HEADER_SIZE`` in its tensor.rs)
MAX_HEADER_BYTES = 100_000_000

# safetensors dtype -> (bits per value, torch attribute, values per torch element). Probed lazily
# because float8 (torch 2.1), unsigned 16/32/64 (torch 2.3), float8_e8m0fnu and
# float4_e2m1fn_x2 (torch 2.8) depend on the torch version. F4 is stored by torch as
# float4_e2m1fn_x2, two values per byte along the last axis, so its torch shape halves the last
# dimension of the header's (logical) shape. F6 has no torch dtype: such files validate, as in
# safetensors, but cannot be loaded into torch (safetensors.torch refuses them too).
_DTYPES: dict[str, tuple[int, str | None, int]] = {
    "F64": (64, "float64", 1),
    "F32": (32, "float32", 1),
    "F16": (16, "float16", 1),
    "BF16": (16, "bfloat16", 1),
    "I64": (64, "int64", 1),
    "I32": (32, "int32", 1),
    "I16": (16, "int16", 1),
    "I8": (8, "int8", 1),
    "U64": (64, "uint64", 1),
    "U32": (32, "uint32", 1),
    "U16": (16, "uint16", 1),
    "U8": (8, "uint8", 1),
    "BOOL": (8, "bool", 1),
    "F8_E4M3": (8, "float8_e4m3fn", 1),
    "F8_E4M3FNUZ": (8, "float8_e4m3fnuz", 1),
    "F8_E5M2": (8, "float8_e5m2", 1),
    "F8_E5M2FNUZ": (8, "float8_e5m2fnuz", 1),
    "F8_E8M0": (8, "float8_e8m0fnu", 1),
    "F4": (4, "float4_e2m1fn_x2", 2),
    "F6_E2M3": (6, None, 1),
    "F6_E3M2": (6, None, 1),
    "C64": (64, "complex64", 1),
}


def dtype_itemsize(dtype: str) -> int:
    """Bytes per torch element (1 for F4: torch holds two F4 values per element)."""
    bits, attr, per_element = _DTYPES[dtype]
    if attr is None:
        raise HeaderError(f"dtype {dtype!r} has no torch dtype; it cannot be loaded into torch")
    return bits * per_element // 8


def torch_dtype(dtype: str):
    """The torch dtype for a safetensors dtype string (raises HeaderError if torch lacks it)."""
    import torch

    entry = _DTYPES.get(dtype)
    found = getattr(torch, entry[1], None) if entry and entry[1] else None
    if found is None:
        raise HeaderError(
            f"dtype {dtype!r} is not supported by torch {torch.__version__}; "
            f"supported: {', '.join(supported_dtypes())}"
        )
    return found


def supported_dtypes() -> list[str]:
    import torch

    return [name for name, (_, attr, _) in _DTYPES.items() if attr and getattr(torch, attr, None) is not None]


def safetensors_dtype(torch_dt) -> str:
    """The safetensors dtype string for a torch dtype."""
    name = str(torch_dt).replace("torch.", "")
    for key, (_, attr, _) in _DTYPES.items():
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
    header_shape: tuple[int, ...] | None = None
    """The shape as the header records it, where it differs from the torch shape (F4)."""

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
            f"{file}: header length {n} bytes exceeds limit of {max_header_bytes} bytes "
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


def _loads(text: str, where: str) -> dict:
    """The header's JSON object; a key repeated in any object of it is an error.

    Parsed without a Python hook first (91,000 entries in a DeepSeek-size checkpoint): the
    objects then hold one pair per ``:`` in the text unless a key was repeated (a repeat
    leaves fewer pairs) or a string holds a colon; only then is it parsed again, pair by pair,
    to find the repeat."""
    try:
        raw = json.loads(text)
        if isinstance(raw, dict):
            pairs = len(raw) + sum(len(v) for v in raw.values() if isinstance(v, dict))
            if pairs == text.count(":"):
                return raw
        raw = json.loads(text, object_pairs_hook=_reject_duplicates)
    except HeaderError as exc:
        raise HeaderError(f"{where}: {exc}; the file is corrupt") from None
    except (ValueError, RecursionError) as exc:
        raise HeaderError(f"{where} is not valid JSON ({exc}); the file is corrupt or truncated") from exc
    if not isinstance(raw, dict):
        raise HeaderError(f"{where} must be a JSON object, got {type(raw).__name__}")
    return raw


def parse_header(header_json: bytes, *, file: str, file_size: int) -> FileHeader:
    """Parse and validate the JSON part of a safetensors header, with safetensors' own rules.

    ``header_json`` is the N bytes after the length prefix; ``file_size`` is the whole file's
    size. As in safetensors (``Metadata::validate`` and ``read_metadata``), the tensors, sorted
    by ``data_offsets``, must tile the data area exactly: the first starts at 0, each starts
    where the previous ends (no overlap, no hole), and the last ends at the end of the file.
    Fields other than dtype, shape and data_offsets are ignored, as safetensors ignores them.
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
    raw = _loads(text, where)

    metadata = raw.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise HeaderError(f"{where}: __metadata__ must map strings to strings")

    plain = "true" not in text and "false" not in text    # no JSON booleans to pass for integers
    specs: list[TensorSpec] = []
    for name, entry in raw.items():
        specs.append(_parse_entry(name, entry, file=file, data_offset=data_offset, data_size=data_size, plain=plain))
    specs.sort(key=lambda s: (s.offset, s.nbytes))   # stable: equal offsets keep the header's order
    _check_tiling(specs, file, data_offset, data_size)
    return FileHeader(file=file, file_size=file_size, data_offset=data_offset, tensors=tuple(specs),
                      metadata=metadata)


def _parse_entry(name: str, entry: Any, *, file: str, data_offset: int, data_size: int,
                 plain: bool = False) -> TensorSpec:
    # The common, valid entry in a few operations (a DeepSeek-size checkpoint has ~91,000);
    # anything unusual takes the full checks below, which name what is wrong. ``plain``: the
    # JSON holds no booleans, so a number that is an int is no bool.
    if plain:
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            bits, _, per_element = _DTYPES[dtype]
            count = math.prod(shape)
        except (TypeError, KeyError, ValueError):
            per_element = 0
        if (per_element == 1 and type(count) is int and type(begin) is int and type(end) is int
                and 0 <= begin <= end <= data_size and count * bits == (end - begin) * 8
                and type(shape) is list and (not shape or min(shape) >= 0)):
            return TensorSpec(name, dtype, tuple(shape), file, data_offset + begin, end - begin)
    where = f"{file}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise HeaderError(f"{where}: entry must be an object with dtype, shape, data_offsets")
    missing = {"dtype", "shape", "data_offsets"} - set(entry)
    if missing:
        raise HeaderError(f"{where}: missing {', '.join(sorted(missing))}; the header is corrupt")
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise HeaderError(f"{where}: Unsupported dtype {dtype!r}; known dtypes: {', '.join(_DTYPES)}")
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
    bits, _, per_element = _DTYPES[dtype]
    nbits = math.prod(shape) * bits
    if nbits % 8 or nbits >= 1 << 64:
        raise HeaderError(f"{where}: shape {shape} of {bits}-bit {dtype} is {nbits} bits, not a whole number of "
                          f"bytes (or too large); the header is corrupt")
    if nbits // 8 != end - begin:
        raise HeaderError(
            f"{where}: Shape claims {nbits // 8} bytes ({shape} x {dtype}) but offsets reserve {end - begin} "
            f"(data_offsets [{begin}, {end})); the header is corrupt"
        )
    torch_shape = tuple(shape)
    if per_element > 1:   # F4: torch packs two values per element along the last axis
        if not shape or shape[-1] % per_element:
            raise HeaderError(f"{where}: {dtype} packs {per_element} values per torch element along the last axis, "
                              f"so shape {shape} cannot be represented as a torch tensor (the last dimension must "
                              f"be a multiple of {per_element})")
        torch_shape = (*shape[:-1], shape[-1] // per_element)
    return TensorSpec(name=name, dtype=dtype, shape=torch_shape, file=file, offset=data_offset + begin,
                      nbytes=end - begin, header_shape=tuple(shape) if torch_shape != tuple(shape) else None)


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_tiling(specs: Iterable[TensorSpec], file: str, data_offset: int, data_size: int) -> None:
    """safetensors' rule: sorted by offset, the tensors cover the data area exactly."""
    previous: TensorSpec | None = None
    position = data_offset
    for spec in specs:
        if spec.offset < position:
            raise HeaderError(
                f"{file}: tensor {previous.name!r} bytes [{previous.offset}, {previous.end}) overlaps with next "
                f"tensor {spec.name!r} bytes [{spec.offset}, {spec.end}); the header is corrupt"
            )
        if spec.offset > position:
            if previous is None:
                raise HeaderError(
                    f"{file}: tensor {spec.name!r} does not start at the beginning of the data area: bytes "
                    f"[{position}, {spec.offset}) before it belong to no tensor; the header is corrupt"
                )
            raise HeaderError(
                f"{file}: bytes [{position}, {spec.offset}) between tensor {previous.name!r} and tensor "
                f"{spec.name!r} belong to no tensor (a hole; safetensors forbids gaps); the header is corrupt"
            )
        position = spec.end
        previous = spec
    end = data_offset + data_size
    if position < end:
        raise HeaderError(
            f"{file}: bytes [{position}, {end}) after the last tensor"
            f"{f' ({previous.name!r})' if previous is not None else ''} belong to no tensor: {end - position} extra "
            f"trailing bytes (safetensors rejects them); the file is corrupt or was appended to"
        )


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
