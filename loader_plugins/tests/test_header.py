import json
import struct
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file as safetensors_load_file
from safetensors.torch import save, save_file

from loader_plugins import HeaderError, StreamerConfig, StreamerError
from loader_plugins.core.checkpoint import read_header
from loader_plugins.core.header import encode_header, header_length, parse_header

from .helpers import tensor_set, write_raw

CFG = StreamerConfig()


def parse_bytes(blob: bytes, name="mem.safetensors"):
    n = header_length(blob[:8], file=name, file_size=len(blob), max_header_bytes=CFG.max_header_bytes)
    return parse_header(blob[8:8 + n], file=name, file_size=len(blob))


def test_header_matches_safetensors_layout(tmp_path):
    tensors = tensor_set(seed=1)
    path = tmp_path / "all.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    header = read_header(path, CFG)
    assert header.metadata == {"format": "pt"}
    specs = header.by_name()
    assert sorted(specs) == sorted(tensors)
    raw = path.read_bytes()
    for name, t in tensors.items():
        spec = specs[name]
        assert spec.shape == tuple(t.shape)
        assert spec.nbytes == t.numel() * t.element_size()
        assert spec.torch_dtype() == t.dtype
        assert spec.offset + spec.nbytes <= len(raw)


def test_encode_header_roundtrip():
    blob, offsets = encode_header({"a": ("F32", (2, 3), 24), "b": ("U8", (5,), 5)}, {"k": "v"})
    assert len(blob) % 8 == 0
    data = bytes(29)
    header = parse_bytes(blob + data)
    assert header.by_name()["b"].offset == len(blob) + 24
    assert offsets == {"a": 0, "b": 24}


@pytest.mark.parametrize("header, data, message", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "past the end"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlap"),
    ({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2, "Unsupported dtype 'Q7'"),
    ({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, b"\0" * 2, "not a whole number of bytes"),
    ({"a": {"dtype": "F4", "shape": [2, 3], "data_offsets": [0, 3]}}, b"\0" * 3, "cannot be represented"),
    ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, b"\0" * 4, "does not start at the beginning"),
    ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
      "b": {"dtype": "U8", "shape": [2], "data_offsets": [3, 5]}}, b"\0" * 5, "a hole"),
    ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 5, "3 extra trailing bytes"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "Shape claims 12 bytes ([3] x F32)"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "non-negative"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "end before"),
    ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "missing data_offsets"),
    ({"a": [1, 2]}, b"", "entry must be an object"),
    ({"__metadata__": {"a": 1}}, b"", "__metadata__"),
])
def test_bad_headers_name_file_and_tensor(tmp_path, header, data, message):
    path = write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(HeaderError) as err:
        read_header(path, CFG)
    text = str(err.value)
    assert message in text
    assert str(path) in text
    assert isinstance(err.value, ValueError) and isinstance(err.value, StreamerError)
    if "a" in header and isinstance(header["a"], dict):
        assert "'a'" in text


def test_header_length_larger_than_file(tmp_path):
    path = write_raw(tmp_path / "h.safetensors", b"{}", length=1000)
    with pytest.raises(HeaderError, match="runs past the end"):
        read_header(path, CFG)


def test_header_length_over_cap(tmp_path):
    path = write_raw(tmp_path / "h.safetensors", b"{}", length=1 << 40)
    with pytest.raises(HeaderError, match="exceeds limit of 100000000"):
        read_header(path, CFG)


def test_tiny_and_empty_files(tmp_path):
    (tmp_path / "e.safetensors").write_bytes(b"")
    (tmp_path / "s.safetensors").write_bytes(b"\x02\0\0")
    for name in ("e.safetensors", "s.safetensors"):
        with pytest.raises(HeaderError, match="too small"):
            read_header(tmp_path / name, CFG)


def test_fields_safetensors_ignores_are_ignored(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}},
                     b"\0" * 4)
    assert read_header(path, CFG).by_name()["a"].shape == (1,)


def test_f4_has_the_torch_shape_and_f6_validates_but_has_no_torch_dtype(tmp_path):
    path = write_raw(tmp_path / "p.safetensors", {"f4": {"dtype": "F4", "shape": [3, 4], "data_offsets": [0, 6]},
                                                    "f6": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [6, 9]}},
                     bytes(9))
    specs = read_header(path, CFG).by_name()
    assert specs["f4"].shape == (3, 2) and specs["f4"].header_shape == (3, 4) and specs["f4"].itemsize == 1
    assert specs["f6"].nbytes == 3
    with pytest.raises(HeaderError, match="F6_E2M3"):
        specs["f6"].torch_dtype()


def test_duplicate_json_keys_rejected(tmp_path):
    body = (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
            b'"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}')
    path = write_raw(tmp_path / "d.safetensors", body, b"\0\0")
    with pytest.raises(HeaderError, match="duplicate key 'a'"):
        read_header(path, CFG)


@pytest.mark.parametrize("body", [b"[1,2]", b"not json", b"\xff\xfe{}", b'{"a": 1', b"  "])
def test_not_a_json_object(tmp_path, body):
    path = write_raw(tmp_path / "j.safetensors", body)
    with pytest.raises(HeaderError):
        read_header(path, CFG)


# ---- fuzzing: any byte string either parses to a consistent header or raises HeaderError ----

def _valid_blob() -> bytes:
    return save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16),
                 "s": torch.tensor(1, dtype=torch.int8)}, metadata={"m": "x"})


def _ours_loads(blob: bytes) -> bool:
    """Whether our parser accepts the file and torch can hold every tensor."""
    try:
        header = parse_bytes(blob)
        for spec in header.tensors:
            spec.torch_dtype()
    except HeaderError:
        return False
    _check_consistent(header, len(blob))
    return True


def _theirs_loads(blob: bytes) -> bool:
    """Whether ``safetensors.torch.load_file`` loads the file (``load`` of bytes differs for F4)."""
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(blob)
        f.flush()
        try:
            safetensors_load_file(f.name)
        except Exception:   # noqa: BLE001 - any refusal of safetensors counts as a refusal
            return False
    return True


def _has_duplicate_keys(blob: bytes) -> bool:
    """Duplicate JSON keys: safetensors keeps the last silently, we refuse (the one known difference)."""
    try:
        n = struct.unpack("<Q", blob[:8])[0]
        json.loads(blob[8:8 + n].decode(), object_pairs_hook=_no_duplicates)
    except _Duplicate:
        return True
    except Exception:   # noqa: BLE001 - not JSON at all: no duplicate keys to speak of
        return False
    return False


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise _Duplicate
    return dict(pairs)


def _agree_with_safetensors(blob: bytes) -> None:
    if _has_duplicate_keys(blob):
        assert not _ours_loads(blob)
        return
    assert _ours_loads(blob) == _theirs_loads(blob), blob


def _check_consistent(header, size):
    end = 0
    for spec in header.tensors:
        assert header.data_offset <= spec.offset and spec.end <= size
        if spec.nbytes:
            assert spec.offset >= end
            end = spec.end
        assert spec.numel * spec.itemsize == spec.nbytes


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(blob):
    _agree_with_safetensors(blob)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_valid_header(data):
    blob = bytearray(_valid_blob())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    blob = bytes(blob[:cut]) if data.draw(st.booleans()) else bytes(blob)
    _agree_with_safetensors(blob)


_ENTRY = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "BF16", "U8", "I64", "BOOL", "F8_E4M3", "F4", "F6_E3M2", "XX"]),
    "shape": st.lists(st.integers(-1, 5), max_size=3),
    "data_offsets": st.lists(st.integers(-1, 64), min_size=0, max_size=3),
})


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.text(max_size=4), _ENTRY, max_size=4), st.integers(0, 64))
def test_fuzz_structured_headers(entries, data_len):
    body = json.dumps(entries).encode()
    blob = struct.pack("<Q", len(body)) + body + b"\0" * data_len
    _agree_with_safetensors(blob)


_BITS = {"F32": 32, "BF16": 16, "U8": 8, "I64": 64, "BOOL": 8, "F8_E4M3": 8, "F4": 4, "F6_E3M2": 6}


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_fuzz_tiled_layouts_near_valid(data):
    """Files that are valid or one small change away from it (a shifted offset, a hole, trailing
    bytes, an odd F4 axis): we accept exactly what safetensors.torch accepts."""
    count = data.draw(st.integers(0, 4))
    entries, pos = {}, 0
    for i in range(count):
        dtype = data.draw(st.sampled_from(sorted(_BITS)))
        shape = data.draw(st.lists(st.integers(0, 4), max_size=3))
        nbits = _BITS[dtype]
        for d in shape:
            nbits *= d
        nbytes = -(-nbits // 8)
        entries[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    if entries and data.draw(st.booleans()):
        victim = entries[data.draw(st.sampled_from(sorted(entries)))]
        which = data.draw(st.integers(0, 1))
        victim["data_offsets"][which] = max(0, victim["data_offsets"][which] + data.draw(st.integers(-2, 2)))
    names = data.draw(st.permutations(sorted(entries)))
    body = json.dumps({n: entries[n] for n in names}).encode()
    trailing = data.draw(st.sampled_from([0, 0, 0, 1, 3]))
    blob = struct.pack("<Q", len(body)) + body + b"\x07" * (pos + trailing)
    _agree_with_safetensors(blob)
