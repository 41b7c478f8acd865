"""TGI_STREAMER_WEIGHTS_URI=s3://...: the hook's weight_files() lists the shards on S3 and
StreamerWeights streams them, against a real S3-compatible server (SeaweedFS on 127.0.0.1).
Every tensor and shard must equal what the same calls give on the local copy of the files."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from loader_plugins.tests.tgi_helpers import call_matrix, outcome, write_checkpoint  # noqa: E402
from loader_plugins.tgi_adapter import hook  # noqa: E402
from loader_plugins.tgi_adapter.settings import settings_from_env  # noqa: E402
from loader_plugins.tgi_adapter.tgi_source import FakeProcessGroup  # noqa: E402
from loader_plugins.tgi_adapter.weights import StandaloneStreamerWeights  # noqa: E402

pytestmark = pytest.mark.s3


def _equal(a, b, where):
    assert a[0] == b[0], f"{where}: {a!r:.200} vs {b!r:.200}"
    if a[0] == "error":
        assert a[1] == b[1], where
        return
    x, y = a[1], b[1]
    if isinstance(y, tuple):                       # _get_slice[]: (shape, tensor)
        assert x[0] == y[0], where
        x, y = x[1], y[1]
    if isinstance(y, torch.Tensor):
        assert x.dtype == y.dtype and x.shape == y.shape, where
        assert torch.equal(x.contiguous().reshape(-1).view(torch.uint8), y.contiguous().reshape(-1).view(torch.uint8)) \
            if y.numel() else True, where
    else:
        assert x == y, where


def test_streamer_weights_from_s3_match_local(s3_server, s3_bucket, s3_env, tmp_path, monkeypatch):
    files, tensors = write_checkpoint(tmp_path / "ckpt")
    client = s3_server.client()
    for f in files:
        client.upload_file(f, s3_bucket, f"models/tiny/{os.path.basename(f)}")
    env = {"TGI_STREAMER_WEIGHTS_URI": f"s3://{s3_bucket}/models/tiny/",
           "TGI_STREAMER_S3_ENDPOINT_URL": s3_server.endpoint_url,
           "TGI_STREAMER_S3_ADDRESSING_STYLE": "path", "TGI_STREAMER_CONCURRENCY": "4"}
    settings = settings_from_env(env)
    uris = hook.list_weight_files(settings.weights_uri, settings.config)
    assert [u.rsplit("/", 1)[-1] for u in uris] == [os.path.basename(f) for f in files]
    assert all(u.startswith(f"s3://{s3_bucket}/models/tiny/") for u in uris)

    pg = FakeProcessGroup(1, 2)
    remote = StandaloneStreamerWeights(uris, "cpu", torch.float16, pg, None, settings=settings)
    local = StandaloneStreamerWeights(files, "cpu", torch.float16, pg, None, settings=settings_from_env({}))
    try:
        assert {k: v.rsplit("/", 1)[-1] for k, v in remote.routing.items()} == \
               {k: os.path.basename(v) for k, v in local.routing.items()}
        for name, tensor in sorted(tensors.items()):
            for _ in range(2):      # the second round re-reads each tensor from S3
                for method, args, kwargs in call_matrix(name, tuple(tensor.shape)):
                    _equal(outcome(remote, method, args, kwargs), outcome(local, method, args, kwargs),
                           f"{method}{args}{kwargs}")
        remote.wait_streamed()
        assert remote.stream_stats["bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
    finally:
        remote.close()
        local.close()
