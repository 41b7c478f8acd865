"""``model-streamer bench gs://bucket/prefix`` (or ``az://container/prefix``, an Azure blob URL):
this project, the store's official client and Run:ai Model Streamer, in one run.

Every method loads the whole checkpoint from the same endpoint into CPU memory and touches every
page of the result; each cell is the median of ``--repeat`` runs, the methods taking turns
(:func:`.s3.time_rounds`, as the S3 bench). Methods (``KIND`` is ``gcs`` or ``azure``):

* ``streamer``: ``load_file`` into fresh tensors; ``streamer-into``: into caller-allocated,
  touched tensors (the engine case);
* ``KIND-client-16t`` / ``KIND-client-into-16t``: the official client's plain ranged downloads
  of 16 MiB from 16 threads (google-cloud-storage ``Blob.download_as_bytes(start, end)``;
  azure-storage-blob ``download_blob(offset, length).readinto``), copied into fresh buffers or
  into buffers allocated and touched once (its connection pool as large as its threads);
* ``runai-KIND-c4/c16``: Run:ai Model Streamer's backend (``runai-model-streamer-gcs`` /
  ``-azure``) at those concurrencies (16 is its default). Its GCS backend reaches an emulator
  (``CLOUD_STORAGE_EMULATOR_ENDPOINT``, anonymous); its Azure backend (0.17) always builds
  ``https://{account}.{suffix}``, so it cannot reach Azurite's ``http://127.0.0.1:P/account``
  (the row says so).

Endpoint and credentials: the same keys and variables as a load (``--gcs-endpoint-url``,
``--gcs-anonymous``, ``STORAGE_EMULATOR_HOST``; ``--azure-connection-string``,
``AZURE_STORAGE_CONNECTION_STRING``...). The server's own caches are left as they are.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

from ..config import StreamerConfig
from . import peers
from .runner import Method, _Into, format_table, prepare_methods, select_methods
from .s3 import time_rounds

RANGE_BYTES = 16 << 20      # the plain client's ranged downloads
THREADS = 16
RUNAI_CONCURRENCY = (4, 16)
RUNAI_DEFAULT = 16
_COLUMN = "remote"


def _kind(uri: str) -> str:
    from ..core.sources.base import scheme_of

    return {"gs": "gcs", "az": "azure", "https": "azure"}[scheme_of(uri)]


def gcs_endpoint(config: StreamerConfig) -> str:
    return (config.gcs_endpoint_url or os.environ.get("STORAGE_EMULATOR_HOST") or
            "https://storage.googleapis.com").rstrip("/")


def _fresh_or_reused(sizes: Sequence[int], reuse: list | None):
    import torch

    return reuse if reuse is not None else [torch.empty(n, dtype=torch.uint8) for n in sizes]


class PlainClient:
    """Whole objects by the official client's ranged downloads from a pool of threads."""

    def __init__(self, kind: str, uris: Sequence[str], sizes: Sequence[int], config: StreamerConfig,
                 threads: int = THREADS):
        self.kind, self.uris, self.sizes, self.config, self.threads = kind, list(uris), list(sizes), config, threads
        self._objects: list | None = None
        self.buffers: list | None = None

    def prepare(self) -> None:
        """The client and its object handles, made once (untimed)."""
        if self._objects is None:
            self._objects = self._gcs_blobs() if self.kind == "gcs" else self._azure_blobs()

    def prepare_into(self) -> None:
        self.prepare()
        if self.buffers is None:
            self.buffers = _fresh_or_reused(self.sizes, None)
            for b in self.buffers:
                b.fill_(1)

    def _gcs_blobs(self) -> list:
        import requests.adapters
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        from ..core.sources.gcs import parse_gs_uri

        cfg = self.config
        creds = AnonymousCredentials() if cfg.gcs_anonymous else None
        options = {"api_endpoint": cfg.gcs_endpoint_url} if cfg.gcs_endpoint_url else None
        client = storage.Client(project=None, credentials=creds, client_options=options)
        for prefix in ("http://", "https://"):   # the default pool (10) would make threads wait
            client._http.mount(prefix, requests.adapters.HTTPAdapter(pool_maxsize=self.threads + 4))
        return [client.bucket(b).blob(n) for b, n in map(parse_gs_uri, self.uris)]

    def _azure_blobs(self) -> list:
        import requests
        import requests.adapters
        from azure.core.pipeline.transport import RequestsTransport
        from azure.storage.blob import BlobServiceClient

        from ..core.sources.azure import parse_azure_uri
        from ..core.sources.azure_client import _identity

        blobs = []
        services: dict[str, Any] = {}
        for uri in self.uris:
            account, container, name = parse_azure_uri(uri, self.config)
            if account.url not in services:
                session = requests.Session()   # the default pool (10) would make threads wait
                for prefix in ("http://", "https://"):
                    session.mount(prefix, requests.adapters.HTTPAdapter(pool_maxsize=self.threads + 4))
                services[account.url] = BlobServiceClient(account.url, credential=account.credential or _identity(),
                                                          transport=RequestsTransport(session=session))
            blobs.append(services[account.url].get_blob_client(container, name))
        return blobs

    def run(self, into: bool) -> int:
        self.prepare()
        buffers = _fresh_or_reused(self.sizes, self.buffers if into else None)
        views = [memoryview(b.numpy()) for b in buffers]
        jobs = [(i, off, min(RANGE_BYTES, size - off))
                for i, size in enumerate(self.sizes) for off in range(0, size, RANGE_BYTES)]
        get = self._gcs_get if self.kind == "gcs" else self._azure_get
        with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="plain-client") as pool:
            futures = [pool.submit(get, i, off, n, views[i]) for i, off, n in jobs]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for f in pending:
                f.cancel()
            for f in done:
                f.result()
        return peers.touch_all(buffers)

    def _gcs_get(self, i: int, offset: int, length: int, view: memoryview) -> None:
        data = self._objects[i].download_as_bytes(start=offset, end=offset + length - 1, raw_download=True,
                                                  checksum=None)
        view[offset:offset + length] = data

    def _azure_get(self, i: int, offset: int, length: int, view: memoryview) -> None:
        self._objects[i].download_blob(offset=offset, length=length, max_concurrency=1).readinto(
            _ViewWriter(view[offset:offset + length]))


class _ViewWriter:
    """A writable stream over a memoryview (what ``readinto`` of azure-storage-blob writes to)."""

    def __init__(self, view: memoryview):
        self.view, self.pos = view, 0

    def write(self, data) -> int:
        n = len(data)
        self.view[self.pos:self.pos + n] = data
        self.pos += n
        return n

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


def _runai_env(kind: str, uris: Sequence[str], config: StreamerConfig) -> dict[str, str | None]:
    """What Run:ai's C++ backend reads to reach the same endpoint with the same credentials;
    raises RuntimeError naming why it cannot."""
    if kind == "gcs":
        endpoint = config.gcs_endpoint_url or os.environ.get("STORAGE_EMULATOR_HOST")
        env: dict[str, str | None] = {}
        if endpoint:
            env["CLOUD_STORAGE_EMULATOR_ENDPOINT"] = endpoint   # google-cloud-cpp's emulator variable
        if config.gcs_anonymous or os.environ.get("STORAGE_EMULATOR_HOST"):
            env["RUNAI_STREAMER_GCS_USE_ANONYMOUS_CREDENTIALS"] = "true"
        if config.gcs_credentials_file:
            env["RUNAI_STREAMER_GCS_CREDENTIAL_FILE"] = config.gcs_credentials_file
        return env
    from ..core.sources.azure import parse_azure_uri

    account = parse_azure_uri(uris[0], config)[0]
    parts = urlsplit(account.url)
    host_labels = (parts.hostname or "").split(".")
    if parts.scheme != "https" or len(host_labels) < 3 or host_labels[1] != "blob":
        raise RuntimeError(f"Run:ai's Azure backend (0.17) reads https://{{AZURE_STORAGE_ACCOUNT_NAME}}."
                           f"{{AZURE_STORAGE_ENDPOINT_SUFFIX}} only; it cannot reach {account.endpoint} (an http, "
                           f"path-style endpoint such as Azurite's)")
    env = {"AZURE_STORAGE_ACCOUNT_NAME": account.name, "AZURE_STORAGE_ENDPOINT_SUFFIX": ".".join(host_labels[1:])}
    cred = account.credential
    if isinstance(cred, dict):
        env["AZURE_STORAGE_ACCOUNT_KEY"] = cred.get("account_key")
    elif isinstance(cred, str):
        env["AZURE_STORAGE_SAS_TOKEN"] = cred
    return env


def build_methods(uris: list[str], sizes: list[int], config: StreamerConfig) -> list[Method]:
    kind = _kind(uris[0])
    into = _Into(uris, config)
    plain = PlainClient(kind, uris, sizes, config)
    client_name = "google-cloud-storage download_as_bytes" if kind == "gcs" else \
        "azure-storage-blob download_blob().readinto"
    methods = [
        Method("streamer", "ours", lambda: peers.touch_all(_load(uris, config)), note="load_file, fresh tensors"),
        Method("streamer-into", "ours-into", into.ours, prepare=into.setup_ours,
               note="into caller-allocated, touched tensors"),
        Method(f"{kind}-client-{THREADS}t", "ceiling", lambda: plain.run(False), prepare=plain.prepare,
               note=f"{client_name}, {RANGE_BYTES >> 20} MiB ranges, {THREADS} threads, fresh buffers"),
        Method(f"{kind}-client-into-{THREADS}t", "ceiling-into", lambda: plain.run(True), prepare=plain.prepare_into,
               note=f"{client_name}, {RANGE_BYTES >> 20} MiB ranges, {THREADS} threads, touched buffers"),
    ]
    plugin = f"runai-model-streamer-{kind}"
    env_box: dict[str, Any] = {}

    def runai_prepare() -> None:
        env_box["env"] = _runai_env(kind, uris, config)
        peers._require(plugin.replace("-", "_"), plugin)

    for c in RUNAI_CONCURRENCY:
        methods.append(Method(
            f"runai-{kind}-c{c}", "peer",
            lambda c=c: peers.runai_object_store(uris, c, plugin=plugin, env=env_box["env"]),
            prepare=runai_prepare, note="Run:ai default" if c == RUNAI_DEFAULT else ""))
    return methods


def _load(uris: list[str], config: StreamerConfig):
    from ..streamer import load_file

    return load_file(uris, config=config)


def run_cloud_bench(args, config: StreamerConfig) -> int:
    from ..core.checkpoint import open_checkpoint
    from .runner import quiet_loaders

    ckpt = open_checkpoint(args.path, config)
    uris, sizes = list(ckpt.files), [h.file_size for h in ckpt.headers]
    total = sum(sizes)
    kind = _kind(uris[0])
    methods = select_methods(build_methods(uris, sizes, config), args, short=None)
    if not isinstance(methods, list):
        return methods
    if kind == "gcs":
        endpoint = gcs_endpoint(config)
    else:
        from ..core.sources.azure import parse_azure_uri

        endpoint = parse_azure_uri(uris[0], config)[0].endpoint
    print(f"checkpoint: {args.path} ({len(uris)} objects, {total / 1e9:.2f} GB) at {endpoint}; "
          f"concurrency={config.workers(remote=True)} range={config.s3_range_bytes >> 20}MiB; median of {args.repeat}; "
          f"server caches as they are", file=sys.stderr)
    results: dict[str, dict[str, Any]] = {}
    with quiet_loaders(getattr(args, "verbose", False)):
        live = prepare_methods(methods, results)
        time_rounds(live, args, results, _COLUMN)
    print(format_table(results, [_COLUMN]))
    lines = summarize(results, kind)
    for line in lines:
        print(line)
    if args.json:
        payload = {"checkpoint": args.path, "files": uris, "bytes": total, "tensor_bytes": ckpt.total_bytes,
                   "endpoint": endpoint, "config": config.to_dict(redact=True), "repeat": args.repeat,
                   "results": results, "summary": lines}
        text = json.dumps(payload, indent=2, default=str)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    return 0


def summarize(results: dict, kind: str) -> list[str]:
    def gbps(name: str) -> float | None:
        cell = results.get(name, {}).get(_COLUMN)
        return cell["gbps"] if cell else None

    lines = []
    for ours, other, label in (("streamer", f"runai-{kind}-c{RUNAI_DEFAULT}", "Run:ai at its default concurrency"),
                               ("streamer", f"{kind}-client-{THREADS}t", "the official client (both into fresh "
                                                                        "buffers)"),
                               ("streamer-into", f"{kind}-client-into-{THREADS}t", "the official client (both into "
                                                                                  "touched buffers)")):
        a, b = gbps(ours), gbps(other)
        if a and b:
            lines.append(f"{ours} {a:.2f} GB/s = {a / b:.2f}x {label} ({other}, {b:.2f} GB/s)")
        else:
            why = results.get(other, {}).get("error") or results.get(ours, {}).get("error") or "not measured"
            lines.append(f"{ours} vs {label}: - ({why})")
    return lines
