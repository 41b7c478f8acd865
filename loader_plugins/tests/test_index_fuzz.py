"""Fuzz of the ``model.safetensors.index.json`` parser, on a real checkpoint directory.

Each example writes an index file (a valid one with bytes changed or cut, or a weight map built
from hostile shard names) into a directory holding two real shards, a file outside it and a
symlink pointing out, then expands the directory. It must raise IndexFileError (a HeaderError
and a ValueError), or return shards that exist inside the directory and a map naming every
tensor of the index exactly as written. ``INDEX_FUZZ_EXAMPLES`` raises the example count for
a long run (CI keeps the default).
"""

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loader_plugins import HeaderError, StreamerConfig
from loader_plugins.core.checkpoint import INDEX_NAME, expand
from loader_plugins.errors import IndexFileError

EXAMPLES = int(os.environ.get("INDEX_FUZZ_EXAMPLES", "300"))
SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
HOSTILE = SHARDS + ["../outside.safetensors", "/etc/passwd", "link.safetensors", "missing.safetensors",
                    "", ".", "..", "a/../" + SHARDS[0], "./" + SHARDS[0], "sub/", "x\\y", "c:x", "n\x00ul",
                    SHARDS[0] + "/", "//" + SHARDS[1]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    directory = root / "ckpt"
    directory.mkdir()
    for name in SHARDS:
        (directory / name).write_bytes(b"x")      # only their existence matters to the index parser
    (root / "outside.safetensors").write_bytes(b"x")
    os.symlink(root / "outside.safetensors", directory / "link.safetensors")
    return directory


def _valid_index() -> bytes:
    return json.dumps({"metadata": {"total_size": 2},
                       "weight_map": {"a.weight": SHARDS[0], "b.weight": SHARDS[1], "c": SHARDS[0]}}).encode()


def _expand(ckpt, raw: bytes):
    (ckpt / INDEX_NAME).write_bytes(raw)
    try:
        files, resolved = expand(str(ckpt), StreamerConfig())
    except IndexFileError as exc:
        assert isinstance(exc, HeaderError) and isinstance(exc, ValueError)
        assert INDEX_NAME in str(exc)          # the message names the file
        return None
    real_dir = os.path.realpath(ckpt)
    for f in files:
        assert os.path.exists(f)
        assert os.path.commonpath([real_dir, os.path.realpath(f)]) == real_dir
    return files, resolved


def _check_map(result, weight_map: dict) -> None:
    files, resolved = result
    assert set(resolved) == set(weight_map)
    assert set(resolved.values()) == set(files)
    for tensor, shard in weight_map.items():
        assert os.path.basename(resolved[tensor]) == os.path.basename(shard)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_valid_index(ckpt, data):
    raw = bytearray(_valid_index())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    result = _expand(ckpt, bytes(raw))
    if result is not None:
        index = json.loads(bytes(raw))
        _check_map(result, index["weight_map"])


_VALUES = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=6), st.integers(), st.none(),
                    st.lists(st.sampled_from(SHARDS), max_size=2))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.dictionaries(st.text(max_size=5), _VALUES, max_size=5),
                 st.lists(st.sampled_from(SHARDS), max_size=2), st.none(), st.text(max_size=5)),
       st.booleans())
def test_fuzz_structured_index(ckpt, weight_map, wrapped):
    index = {"weight_map": weight_map} if wrapped else weight_map
    result = _expand(ckpt, json.dumps(index).encode())
    if result is not None:
        assert wrapped and isinstance(weight_map, dict)
        assert all(v in SHARDS for v in weight_map.values()), weight_map   # only plain names of real shards
        _check_map(result, weight_map)


def test_fuzz_finds_both_outcomes(ckpt):
    """The checks above run on real successes as well as real errors."""
    assert _expand(ckpt, _valid_index()) is not None
    assert _expand(ckpt, json.dumps({"weight_map": {"a": "../outside.safetensors"}}).encode()) is None
    assert _expand(ckpt, json.dumps({"weight_map": {"a": "link.safetensors"}}).encode()) is None
    assert _expand(ckpt, b"{\"weight_map\": ") is None
