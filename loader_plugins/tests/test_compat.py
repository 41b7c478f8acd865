"""The drop-in contracts: ``load_file`` as ``safetensors.torch.load_file`` (0.8) and
``SafetensorsStreamer`` as Run:ai Model Streamer's (0.17), checked against the real peers where
they are installed. The peers' own test suites run against ours in
integration_tests/test_conformance.py."""

from __future__ import annotations

import inspect
import json
import struct

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file

import loader_plugins.errors as errors
from loader_plugins import SafetensorsStreamer, StreamerError, load_file
from loader_plugins.streamer import _credentials_options

from .helpers import assert_bit_exact, tensor_set

HAS_F4 = hasattr(torch, "float4_e2m1fn_x2")


def _raw(path, entries, data):
    body = json.dumps(entries).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


# ---- load_file ----

def test_signature_is_safetensors_plus_keyword_only_extras():
    ours = inspect.signature(load_file).parameters
    theirs = inspect.signature(st_load_file).parameters
    for name, param in theirs.items():
        assert name in ours and ours[name].kind == param.kind and ours[name].default == param.default, name
    extras = [p for n, p in ours.items() if n not in theirs]
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in extras)


@pytest.mark.parametrize("backend", ["mmap", "pread"])
def test_keys_in_file_order_and_bytes_equal_safetensors(tmp_path, backend):
    tensors = tensor_set(seed=3)
    names = list(tensors)
    order = names[1::2] + names[::2]   # not alphabetical, not the dtype grouping
    path = tmp_path / "m.safetensors"
    save_file({n: tensors[n] for n in order}, path)
    got = load_file(path, backend=backend)
    ref = st_load_file(path, backend=backend)
    assert list(got) == list(ref)
    assert_bit_exact(got, ref)


def test_invalid_backend_is_refused_as_safetensors_does(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(2)}, path)
    with pytest.raises(SafetensorError) as theirs:
        st_load_file(path, backend="nope")
    with pytest.raises(SafetensorError, match="backend 'nope' is invalid") as ours:
        load_file(path, backend="nope")
    assert isinstance(ours.value, ValueError) and "mmap" in str(theirs.value)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        st_load_file(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors") as err:
        load_file(tmp_path / "nope.safetensors")
    assert isinstance(err.value, SafetensorError) and isinstance(err.value, StreamerError)


@pytest.mark.parametrize("device", ["cpu:0", "bogus", "mps:1", -1, 1.5, "cuda:x"])
def test_invalid_devices_are_refused(tmp_path, device):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(2)}, path)
    with pytest.raises(Exception):   # safetensors: SafetensorError or TypeError, by case
        st_load_file(path, device=device)
    with pytest.raises(ValueError, match="is invalid") as err:
        load_file(path, device=device)
    assert isinstance(err.value, SafetensorError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is absent")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", 0])
def test_cuda_without_cuda_is_a_runtime_error_before_any_read(tmp_path, device):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(2)}, path)
    with pytest.raises(RuntimeError):
        st_load_file(path, device=device)
    with pytest.raises(RuntimeError, match="CUDA"):
        load_file(path, device=device)


@pytest.mark.skipif(not HAS_F4, reason="this torch has no float4_e2m1fn_x2")
def test_f4_and_e8m0_load_as_safetensors_loads_them(tmp_path):
    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (6 * 4,), dtype=torch.uint8, generator=gen)
    tensors = {"scale": raw[:6].view(torch.float8_e8m0fnu).reshape(2, 3).clone(),
               "packed": raw.view(torch.float4_e2m1fn_x2).reshape(6, 4).clone(),
               "empty": torch.empty(0, 2, dtype=torch.float4_e2m1fn_x2)}
    path = tmp_path / "fp4.safetensors"
    save_file(tensors, path)
    ref = st_load_file(path)
    got = load_file(path)
    assert list(got) == list(ref)
    for name in ref:
        assert got[name].dtype == ref[name].dtype and got[name].shape == ref[name].shape, name
        assert torch.equal(got[name].view(torch.uint8), ref[name].view(torch.uint8)), name


def test_f6_is_refused_before_any_read_as_safetensors_refuses_it(tmp_path):
    path = _raw(tmp_path / "f6.safetensors", {"w": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]}},
                bytes(3))
    with pytest.raises(SafetensorError):
        st_load_file(path)
    with pytest.raises(SafetensorError, match="F6_E2M3"):
        load_file(path)


@pytest.mark.parametrize("entries, data", [
    ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}, bytes(3)),                 # gap before the first
    ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
      "b": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]}}, bytes(6)),                 # hole
    ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, bytes(9)),                 # trailing bytes
])
def test_what_safetensors_rejects_we_reject(tmp_path, entries, data):
    path = _raw(tmp_path / "bad.safetensors", entries, data)
    with pytest.raises(SafetensorError):
        st_load_file(path)
    with pytest.raises(SafetensorError) as err:
        load_file(path)
    assert isinstance(err.value, ValueError) and str(path) in str(err.value)


def test_every_error_class_is_a_builtin_and_a_safetensor_error():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.StreamerError)]
    assert len(classes) > 8
    for cls in classes:
        assert issubclass(cls, SafetensorError), cls
        if cls is not errors.StreamerError:
            assert issubclass(cls, (ValueError, OSError, RuntimeError, ImportError)), cls


# ---- SafetensorsStreamer ----

def test_streamer_signature_is_runai_plus_keyword_only_extras():
    runai = pytest.importorskip("runai_model_streamer")
    for method in ("stream_file", "stream_files"):
        ours = inspect.signature(getattr(SafetensorsStreamer, method)).parameters
        theirs = inspect.signature(getattr(runai.SafetensorsStreamer, method)).parameters
        assert list(theirs) == list(ours)[:len(theirs)], method
        for name, param in theirs.items():
            assert ours[name].kind == param.kind and ours[name].default == param.default, (method, name)
        assert all(p.kind == p.KEYWORD_ONLY for n, p in ours.items() if n not in theirs)


def test_positional_call_with_tensor_names(tmp_path):
    tensors = {"A": torch.arange(4.0), "B": torch.ones(3, dtype=torch.int8), "C": torch.zeros(2, 2)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    with SafetensorsStreamer() as streamer:
        streamer.stream_file(str(path), None, "cpu", False, ["C", "A"])
        got = dict(streamer.get_tensors())
    assert_bit_exact(got, {"A": tensors["A"], "C": tensors["C"]})


def test_header_errors_surface_at_stream_file(tmp_path):
    path = _raw(tmp_path / "bad.safetensors", {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, bytes(2))
    with SafetensorsStreamer() as streamer:
        with pytest.raises(ValueError, match="truncated"):
            streamer.stream_file(str(path))


def test_duplicate_names_across_files_follow_runai(tmp_path):
    first, second = tmp_path / "1.safetensors", tmp_path / "2.safetensors"
    save_file({"A": torch.full((3,), 1.0), "X": torch.ones(1)}, first)
    save_file({"A": torch.full((3,), 2.0), "Y": torch.ones(1)}, second)
    with SafetensorsStreamer() as streamer:   # no filter: each copy is yielded
        streamer.stream_files([str(first), str(second)])
        got = sorted((name, tensor[0].item()) for name, tensor in streamer.get_tensors())
    assert got == [("A", 1.0), ("A", 2.0), ("X", 1.0), ("Y", 1.0)]
    with SafetensorsStreamer() as streamer:   # asking for a repeated name is ambiguous
        with pytest.raises(ValueError, match="more than one file.*'A'"):
            streamer.stream_files([str(first), str(second)], tensor_names={"A"})
        streamer.stream_files([str(first), str(second)], tensor_names={"X", "Y"})   # unique names are fine
        assert sorted(name for name, _ in streamer.get_tensors()) == ["X", "Y"]


def test_s3_credentials_map_to_config_fields():
    class Credentials:   # the attributes of runai_model_streamer's S3Credentials
        access_key_id, secret_access_key, session_token = "key", "secret", None
        region_name, endpoint = "us-east-1", "http://127.0.0.1:9000"

    options = _credentials_options(Credentials())
    assert options == {"s3_access_key_id": "key", "s3_secret_access_key": "secret", "s3_region": "us-east-1",
                       "s3_endpoint_url": "http://127.0.0.1:9000"}
    with SafetensorsStreamer(**options) as streamer:
        assert "secret" not in repr(streamer.config)
        assert streamer.config.to_dict(redact=True)["s3_secret_access_key"] == "***"


def test_owned_false_still_gives_owned_tensors(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({f"w{i}": torch.full((256,), float(i)) for i in range(8)}, path)
    with SafetensorsStreamer(memory_limit=4096, chunk_bytes=4096) as streamer:
        streamer.stream_file(str(path), owned=False)
        kept = dict(streamer.get_tensors())
    for i in range(8):
        assert torch.equal(kept[f"w{i}"], torch.full((256,), float(i)))


def test_destinations_are_checked_at_stream_file_and_filled_per_file(tmp_path):
    first, second = tmp_path / "1.safetensors", tmp_path / "2.safetensors"
    save_file({"A": torch.full((3,), 1.0), "X": torch.arange(4.0)}, first)
    save_file({"A": torch.full((3,), 2.0), "Y": torch.arange(2, dtype=torch.int8)}, second)
    with SafetensorsStreamer() as streamer:
        with pytest.raises(ValueError, match="not in the checkpoint.*'nope'"):
            streamer.stream_files([str(first), str(second)], destinations={"nope": torch.empty(1)})
        x, y = torch.empty(4), torch.empty(2, dtype=torch.int8)
        streamer.stream_files([str(first), str(second)], destinations={"X": x, "Y": y})
        got = [(name, tensor) for name, tensor in streamer.get_tensors()]
    assert sorted(name for name, _ in got) == ["A", "A", "X", "Y"]
    assert torch.equal(x, torch.arange(4.0)) and torch.equal(y, torch.arange(2, dtype=torch.int8))
    assert next(t for n, t in got if n == "X").data_ptr() == x.data_ptr()


def test_stopping_early_releases_every_queued_file(tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.safetensors")
        save_file({f"t{i}": torch.full((8,), float(i))}, paths[-1])
    with SafetensorsStreamer() as streamer:
        streamer.stream_file(str(paths[0]))
        streamer.stream_files([str(paths[1]), str(paths[2])])
        stream = streamer.get_tensors()
        assert next(stream)[0] == "t0"
        stream.close()
        assert streamer._pending == [] and streamer._sources == {}
