"""boto3 clients for :mod:`.s3`: one per process and S3 settings, shared across loads.

Creating a client is mostly parsing botocore's service models (docs/measurements.md): the parsed
data is shared by every client, credentials, profiles and regions stay per session. botocore's
own retries are off (:mod:`.s3` retries, resuming from the last byte received). boto3 is imported
when the first client is made, never at module import.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import TYPE_CHECKING, Any

from ...errors import SourceError

if TYPE_CHECKING:
    from ...config import StreamerConfig

INSTALL_HINT = "install loader-plugins[s3] (boto3) to read s3:// URIs"

# Parsed service models and endpoint rules, shared by every client this process creates.
# Parsing them is most of what creating a client costs (docs/measurements.md); they are static data files, keyed by the
# search path (AWS_DATA_PATH). Credentials, profiles and regions stay per session.
_LOADERS: dict[Any, Any] = {}
_LOADERS_LOCK = threading.Lock()


def _botocore_session(config: "StreamerConfig"):
    """A fresh botocore session (credentials resolved afresh) with the shared data loader."""
    import botocore.loaders
    import botocore.session

    session = botocore.session.Session(profile=config.s3_profile)
    if config.s3_region:
        session.set_config_variable("region", config.s3_region)
    if config.s3_access_key_id or config.s3_secret_access_key:
        session.set_credentials(config.s3_access_key_id, config.s3_secret_access_key, config.s3_session_token)
    data_path = session.get_config_variable("data_path")  # reads the profile: may raise ProfileNotFound
    with _LOADERS_LOCK:
        loader = _LOADERS.get(data_path)
        if loader is None:
            loader = _LOADERS[data_path] = botocore.loaders.create_loader(data_path)
    session.register_component("data_loader", loader)
    return session


_CLIENTS: dict[tuple, Any] = {}
_CLIENTS_LOCK = threading.Lock()
#: environment variables that change which endpoint, region or credentials a new client gets
_CLIENT_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
               "AWS_DEFAULT_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
               "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CA_BUNDLE",
               "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
               "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_DATA_PATH")


def shared_client(config: "StreamerConfig"):
    """One boto3 client per process, S3 settings and AWS environment, reused across loads.

    A client costs ~50-100 ms of CPU to create and its connections are worth keeping (no new
    TCP handshakes on the next load). Clients are thread-safe. The key holds a digest of the
    explicit credentials and the AWS_* variables, never their values, so a changed key, secret,
    profile or endpoint gets a new client; the pid keeps a forked child off its parent's connections."""
    import hashlib

    explicit = (config.s3_access_key_id, config.s3_secret_access_key, config.s3_session_token)
    env = hashlib.sha256("\0".join([*(f"{k}={os.environ.get(k, '')}" for k in _CLIENT_ENV),
                                     *(v or "" for v in explicit)]).encode()).hexdigest()
    key = (os.getpid(), env, config.s3_endpoint_url, config.s3_region, config.s3_addressing_style,
           config.s3_profile, config.request_timeout, config.concurrency)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
    if client is None:
        client = _make_client(config)
        with _CLIENTS_LOCK:
            client = _CLIENTS.setdefault(key, client)
    return client


def _make_client(config: "StreamerConfig"):
    try:
        import boto3  # noqa: F401 - the [s3] extra; botocore comes with it
        from botocore import exceptions as bex
        from botocore.config import Config
    except ImportError as exc:
        raise SourceError(errno.ENOPKG if hasattr(errno, "ENOPKG") else errno.ENOENT,
                          f"cannot read s3:// URIs ({exc}); {INSTALL_HINT}") from exc
    try:
        session = _botocore_session(config)
    except bex.ProfileNotFound as exc:
        raise SourceError(errno.EINVAL, f"S3 profile {config.s3_profile!r} is not in the shared AWS config "
                          f"files; check s3_profile or AWS_CONFIG_FILE") from exc
    options: dict[str, Any] = {
        "max_pool_connections": config.workers(remote=True) + 4,  # workers + header/metadata requests
        "connect_timeout": config.request_timeout,
        "read_timeout": config.request_timeout,
        # Retries happen in this module, resuming from the last byte received; botocore's
        # would restart the whole range and hide the attempts from the reader's deadline.
        "retries": {"total_max_attempts": 1, "mode": "standard"},
        "tcp_keepalive": True,
        # Ranged GETs carry no full-object checksum; don't ask for one (botocore 1.36+).
        "response_checksum_validation": "when_required",
        "request_checksum_calculation": "when_required",
    }
    if config.s3_addressing_style != "auto":
        options["s3"] = {"addressing_style": config.s3_addressing_style}
    try:
        client_config = Config(**options)
    except TypeError:  # botocore < 1.36 lacks the checksum options
        options.pop("response_checksum_validation")
        options.pop("request_checksum_calculation")
        client_config = Config(**options)
    try:
        return session.create_client("s3", endpoint_url=config.s3_endpoint_url, config=client_config)
    except bex.ProfileNotFound as exc:
        raise SourceError(errno.EINVAL, f"S3 profile {config.s3_profile!r} is not in the shared AWS config "
                          f"files; check s3_profile or AWS_CONFIG_FILE") from exc
    except ValueError as exc:  # e.g. an invalid endpoint URL
        raise SourceError(errno.EINVAL, f"cannot create an S3 client: {exc}; check s3_endpoint_url") from exc
