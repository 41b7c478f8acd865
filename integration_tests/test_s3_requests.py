"""S3 requests per load, counted at the server's door (a proxy in front of SeaweedFS).

A checkpoint of N shards with ``model.safetensors.index.json`` costs one LIST of its directory,
one GET of the index, and per shard one HEAD (its size and ETag, pinned for the load) and one
read of its header; then the data's ranged GETs. Opened once (``open_checkpoint(...,
keep_open=True)``), a checkpoint streams with no metadata request at all. TGI's
``StreamerWeights`` opens its files once.
"""

from __future__ import annotations

import collections
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from loader_plugins import SafetensorsStreamer, StreamerConfig, load_file  # noqa: E402
from loader_plugins.core.checkpoint import open_checkpoint  # noqa: E402
from loader_plugins.tests.tgi_helpers import write_checkpoint  # noqa: E402
from loader_plugins.tgi_adapter.settings import settings_from_env  # noqa: E402
from loader_plugins.tgi_adapter.tgi_source import FakeProcessGroup  # noqa: E402
from loader_plugins.tgi_adapter.weights import StandaloneStreamerWeights  # noqa: E402

pytestmark = pytest.mark.s3


def _metadata(kinds: collections.Counter) -> dict[str, int]:
    """Everything but the data's ranged GETs (reads from byte 0 are headers here: each shard's
    first tensor starts after its header, and no data read starts at 0)."""
    return {k: v for k, v in sorted(kinds.items()) if k != "GET range"}


@pytest.fixture
def checkpoint(s3_server, s3_bucket, tmp_path):
    from safetensors import safe_open

    files, tensors = write_checkpoint(tmp_path / "ckpt")
    weight_map = {}
    for f in files:
        with safe_open(f, "pt") as handle:
            weight_map.update({name: f.rsplit("/", 1)[-1] for name in handle.keys()})
    index = tmp_path / "ckpt" / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    client = s3_server.client()
    for f in [*files, str(index)]:
        client.upload_file(f, s3_bucket, f"m/{f.rsplit('/', 1)[-1]}")
    return f"s3://{s3_bucket}/m/", files, tensors


def _config(proxy) -> StreamerConfig:
    return StreamerConfig(s3_endpoint_url=proxy.endpoint_url, s3_addressing_style="path", s3_region="us-east-1",
                          concurrency=4)


def test_one_list_one_index_get_and_one_head_and_header_read_per_shard(checkpoint, fault_proxy, s3_env):
    uri, files, tensors = checkpoint
    shards = len(files)
    config = _config(fault_proxy)
    expected = {"LIST": 1, "GET": 1, "HEAD": shards, "GET range=0-": shards}

    start = len(fault_proxy.log)
    loaded = load_file(uri, config=config)
    assert _metadata(fault_proxy.kinds(start)) == expected
    assert sorted(loaded) == sorted(tensors)

    start = len(fault_proxy.log)
    with SafetensorsStreamer(config) as streamer:
        streamer.stream_files(uri)
        streamed = dict(streamer.get_tensors())
    assert _metadata(fault_proxy.kinds(start)) == expected
    assert all(torch.equal(streamed[n], loaded[n]) for n in loaded)


def test_a_checkpoint_opened_once_streams_without_metadata_requests(checkpoint, fault_proxy, s3_env):
    uri, files, tensors = checkpoint
    config = _config(fault_proxy)
    start = len(fault_proxy.log)
    with open_checkpoint(uri, config, keep_open=True) as opened:
        assert opened.is_open and len(opened.files) == len(files)
        after_open = fault_proxy.kinds(start)
        start = len(fault_proxy.log)
        first = load_file(opened, config=config)
        with SafetensorsStreamer(config) as streamer:            # the same checkpoint, streamed again
            streamer.stream_file(opened)
            second = dict(streamer.get_tensors())
        streams = fault_proxy.kinds(start)
    assert _metadata(after_open) == {"LIST": 1, "GET": 1, "HEAD": len(files), "GET range=0-": len(files)}
    assert set(streams) == {"GET range"} and streams["GET range"] >= 2 * len(files)
    assert sorted(first) == sorted(tensors) and all(torch.equal(first[n], second[n]) for n in first)
    for name, tensor in tensors.items():
        assert torch.equal(first[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def test_tgi_opens_each_file_once(checkpoint, fault_proxy, s3_env):
    uri, files, tensors = checkpoint
    settings = settings_from_env({"TGI_STREAMER_S3_ENDPOINT_URL": fault_proxy.endpoint_url,
                                  "TGI_STREAMER_S3_ADDRESSING_STYLE": "path", "TGI_STREAMER_CONCURRENCY": "4"})
    uris = [f"{uri}{f.rsplit('/', 1)[-1]}" for f in files]
    start = len(fault_proxy.log)
    weights = StandaloneStreamerWeights(uris, "cpu", torch.float16, FakeProcessGroup(0, 1), None, settings=settings)
    try:
        weights.wait_streamed()
        kinds = fault_proxy.kinds(start)
    finally:
        weights.close()
    assert _metadata(kinds) == {"HEAD": len(files), "GET range=0-": len(files)}
    assert weights.stream_stats["bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
