"""google-cloud-storage clients for :mod:`.gcs`: one per process and GCS settings, shared across loads.

Credentials come from the library's own chain (google-auth's Application Default Credentials:
``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's ADC file, the metadata server; anonymous when
``STORAGE_EMULATOR_HOST`` is set), from ``gcs_credentials_file``, or none (``gcs_anonymous``).
The client's ``requests`` session (google-auth's ``AuthorizedSession``: it adds and refreshes
the access token) gets a connection pool as large as the reader's concurrency and no retries
of its own: :mod:`.remote` retries, resuming from the last byte received. The ranged GETs of
:mod:`.gcs` go through the same session, so they carry the same credentials.
google-cloud-storage is imported when the first client is made, never at module import.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from typing import TYPE_CHECKING, Any

from ...errors import SourceError

if TYPE_CHECKING:
    from ...config import StreamerConfig

INSTALL_HINT = "install loader-plugins[gcs] (google-cloud-storage) to read gs:// URIs"
DEFAULT_ENDPOINT = "https://storage.googleapis.com"

#: environment variables that change which endpoint or credentials a new client gets
_CLIENT_ENV = ("GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST", "API_ENDPOINT_OVERRIDE",
               "GOOGLE_CLOUD_PROJECT", "GOOGLE_API_USE_CLIENT_CERTIFICATE", "CLOUDSDK_CONFIG",
               "GCE_METADATA_HOST", "GCE_METADATA_IP", "NO_GCE_CHECK", "GOOGLE_CLOUD_UNIVERSE_DOMAIN")

_CLIENTS: dict[tuple, Any] = {}
_CLIENTS_LOCK = threading.Lock()


def shared_client(config: "StreamerConfig", uri: str = "gs://"):
    """One google-cloud-storage client per process, GCS settings and environment, reused across
    loads (its connections stay open for the next load; the pid keeps a forked child off its
    parent's). The key holds a digest of the variables, never their values."""
    env = hashlib.sha256("\0".join(f"{k}={os.environ.get(k, '')}" for k in _CLIENT_ENV).encode()).hexdigest()
    key = (os.getpid(), env, config.gcs_endpoint_url, config.gcs_credentials_file, config.gcs_anonymous,
           config.workers(remote=True))
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
    if client is None:
        client = _make_client(config, uri)
        with _CLIENTS_LOCK:
            client = _CLIENTS.setdefault(key, client)
    return client


def _from_key_file(path: str, scopes: list[str], uri: str):
    """Credentials from a service-account or authorized-user key file, loaded by its type's own
    loader (google-auth's generic loader accepts any configuration, unvalidated)."""
    import json

    from google.auth import exceptions as auth_exc
    from google.oauth2 import credentials as user_credentials
    from google.oauth2 import service_account

    try:
        with open(path, encoding="utf-8") as f:
            kind = json.load(f).get("type")
        if kind == "service_account":
            return service_account.Credentials.from_service_account_file(path, scopes=scopes)
        if kind == "authorized_user":
            return user_credentials.Credentials.from_authorized_user_file(path, scopes=scopes)
        why = (f"its type is {kind!r}; gcs_credentials_file takes service_account and authorized_user keys "
               f"(others, such as external_account, through GOOGLE_APPLICATION_CREDENTIALS)")
    except (OSError, ValueError, AttributeError, KeyError, auth_exc.GoogleAuthError) as exc:
        # the reason names the problem (missing file, missing field), never the key itself
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    raise SourceError(errno.EACCES, f"{uri}: cannot use the GCS credentials file {path!r} (gcs_credentials_file): "
                      f"{why}")


def endpoint_of(client: Any) -> str:
    """The JSON API's base URL the client talks to (emulator, override or Google's)."""
    # google-cloud-storage keeps it on its connection (API_BASE_URL, set from client_options,
    # STORAGE_EMULATOR_HOST or the universe domain); the download URLs start with it
    return str(getattr(getattr(client, "_connection", None), "API_BASE_URL", None) or DEFAULT_ENDPOINT).rstrip("/")


def session_of(client: Any):
    """The client's authorized ``requests`` session (google-cloud-storage's own ``_http``)."""
    return client._http


def _make_client(config: "StreamerConfig", uri: str):
    try:
        import requests.adapters
        from google.auth import exceptions as auth_exc
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage
    except ImportError as exc:
        raise SourceError(errno.ENOPKG if hasattr(errno, "ENOPKG") else errno.ENOENT,
                          f"cannot read gs:// URIs ({exc}); {INSTALL_HINT}") from exc
    from .gcs_errors import classify

    credentials = None
    try:
        if config.gcs_anonymous:
            credentials = AnonymousCredentials()
        elif config.gcs_credentials_file:
            credentials = _from_key_file(config.gcs_credentials_file, list(storage.Client.SCOPE), uri)
        options = {"api_endpoint": config.gcs_endpoint_url.rstrip("/")} if config.gcs_endpoint_url else None
        # project=None: reading needs none, and inferring one may ask the metadata server
        client = storage.Client(project=None, credentials=credentials, client_options=options)
    except auth_exc.DefaultCredentialsError as exc:
        raise classify(exc, uri, "creating a GCS client", endpoint=config.gcs_endpoint_url) from exc
    except ValueError as exc:   # e.g. an endpoint google-cloud-storage cannot use
        raise SourceError(errno.EINVAL, f"cannot create a GCS client: {exc}; check gcs_endpoint_url") from exc
    session = session_of(client)
    pool = config.workers(remote=True) + 4     # workers + header/metadata requests
    for prefix in ("https://", "http://"):
        # max_retries=0: retries happen in .remote, resuming from the last byte received
        session.mount(prefix, requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=pool, max_retries=0))
    return client
