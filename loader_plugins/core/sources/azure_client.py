"""azure-storage-blob clients for :mod:`.azure`: the account a URI names, its credentials, and one
``BlobServiceClient`` per process and account, shared across loads.

Credentials, the first found (the order Run:ai Model Streamer and the Azure CLI use):

1. explicit: ``azure_connection_string``, ``azure_sas_token`` or ``azure_account_key``;
2. ``AZURE_STORAGE_CONNECTION_STRING``;
3. ``AZURE_STORAGE_SAS_TOKEN``, then ``AZURE_STORAGE_ACCOUNT_KEY`` (with the account's name);
4. azure-identity's ``DefaultAzureCredential`` (``AZURE_CLIENT_ID``/``AZURE_TENANT_ID``/...,
   workload identity, managed identity, ``az login``), one per process (its token cache is kept).

azure-storage-blob itself reads none of the ``AZURE_STORAGE_*`` variables: they are read here,
when a client is made, as boto3 reads ``AWS_*``. The account's blob endpoint comes from
``azure_account_url``, else the connection string (``BlobEndpoint``, or ``AccountName`` and
``EndpointSuffix``), else ``https://{azure_account_name or AZURE_STORAGE_ACCOUNT_NAME}.blob.core.windows.net``.
The SDK's own retries are off (:mod:`.remote` retries, resuming from the last byte received);
its requests session gets a connection pool as large as the reader's concurrency. Secrets are
never logged: a client's key is a digest, and URLs in messages carry no query (SAS).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import threading
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from ...errors import SourceError

if TYPE_CHECKING:
    from ...config import StreamerConfig

INSTALL_HINT = "install loader-plugins[azure] (azure-storage-blob, azure-identity) to read az:// URIs"
DEFAULT_SUFFIX = "blob.core.windows.net"

#: environment variables of the credential chain (read when a client is made)
CONNECTION_STRING_ENV = "AZURE_STORAGE_CONNECTION_STRING"
ACCOUNT_NAME_ENV = "AZURE_STORAGE_ACCOUNT_NAME"
ACCOUNT_KEY_ENV = "AZURE_STORAGE_ACCOUNT_KEY"
SAS_TOKEN_ENV = "AZURE_STORAGE_SAS_TOKEN"
#: variables DefaultAzureCredential reads: a change gets a new credential
_IDENTITY_ENV = ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "AZURE_CLIENT_CERTIFICATE_PATH",
                 "AZURE_FEDERATED_TOKEN_FILE", "AZURE_AUTHORITY_HOST", "IDENTITY_ENDPOINT", "MSI_ENDPOINT",
                 "AZURE_USERNAME")


@dataclasses.dataclass(frozen=True)
class Account:
    """A storage account as the client sees it."""

    name: str | None
    #: the blob endpoint; may carry a SAS query: never put it in a message (``endpoint`` instead)
    url: str = dataclasses.field(repr=False)
    #: key dict, SAS text, a TokenCredential, or None (DefaultAzureCredential, made per process)
    credential: Any = dataclasses.field(repr=False, compare=False)
    #: where the credentials came from, for messages ("AZURE_STORAGE_CONNECTION_STRING")
    found_in: str = "DefaultAzureCredential"

    @property
    def endpoint(self) -> str:
        """The blob endpoint without its query: what messages name."""
        parts = urlsplit(self.url)
        return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))

    def key(self) -> str:
        """A digest of everything that makes this client: never the secrets themselves."""
        cred = self.credential
        text = repr(sorted(cred.items())) if isinstance(cred, dict) else cred if isinstance(cred, str) else "identity"
        return hashlib.sha256(f"{self.url}\0{text}\0{self.found_in}".encode()).hexdigest()


def _sas(token: str) -> str:
    return token.lstrip("?")


def _parse_connection_string(text: str, where: str) -> tuple[str, Any]:
    """(blob endpoint, credential) of a connection string, parsed by azure-storage-blob itself."""
    # the SDK's own parser (BlobServiceClient.from_connection_string uses it): BlobEndpoint,
    # AccountName/AccountKey/EndpointSuffix, SharedAccessSignature, UseDevelopmentStorage
    from azure.storage.blob._shared.base_client import parse_connection_str

    try:
        url, _secondary, credential = parse_connection_str(text, None, "blob")
    except (ValueError, KeyError) as exc:
        raise SourceError(errno.EINVAL, f"the Azure connection string in {where} is malformed ({type(exc).__name__}: "
                          f"a missing AccountName, AccountKey or BlobEndpoint?); copy it again from the portal") from None
    if isinstance(credential, str):
        if "usedevelopmentstorage=true" in text.replace(" ", "").lower():   # the emulator's well-known key
            credential = {"account_name": _account_name_of(url) or "devstoreaccount1", "account_key": credential}
        else:
            credential = _sas(credential)
    return url, credential


def _account_name_of(url: str) -> str | None:
    """``https://NAME.blob.core.windows.net`` -> NAME; ``http://127.0.0.1:10000/NAME`` (an
    emulator's path-style endpoint) -> NAME."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    labels = host.split(".")
    if len(labels) > 2 and "blob" in labels[1:]:
        return labels[0]
    first = parts.path.strip("/").split("/", 1)[0]
    return first or None


def default_account(config: "StreamerConfig", env: dict[str, str] | None = None) -> Account | None:
    """The account ``az://container/...`` names, with its credentials; None when nothing names one."""
    env = os.environ if env is None else env
    explicit: tuple[str, Any] | None = None
    if config.azure_connection_string:
        url, cred = _parse_connection_string(config.azure_connection_string, "azure_connection_string")
        explicit = (url, cred)
        found = "azure_connection_string"
    elif config.azure_sas_token or config.azure_account_key:
        found = "azure_sas_token" if config.azure_sas_token else "azure_account_key"
    elif env.get(CONNECTION_STRING_ENV):
        url, cred = _parse_connection_string(env[CONNECTION_STRING_ENV], CONNECTION_STRING_ENV)
        explicit = (url, cred)
        found = CONNECTION_STRING_ENV
    else:
        found = SAS_TOKEN_ENV if env.get(SAS_TOKEN_ENV) else ACCOUNT_KEY_ENV if env.get(ACCOUNT_KEY_ENV) \
            else "DefaultAzureCredential"
    if explicit is not None:
        url, cred = explicit
        name = _account_name_of(url) or config.azure_account_name
        if config.azure_account_url:          # an override of the endpoint (private endpoint, proxy)
            url = config.azure_account_url
        return Account(name, url.rstrip("/"), cred, found)
    name = config.azure_account_name or (_account_name_of(config.azure_account_url) if config.azure_account_url
                                         else None) or env.get(ACCOUNT_NAME_ENV)
    if not name and not config.azure_account_url:
        return None
    url = (config.azure_account_url or f"https://{name}.{DEFAULT_SUFFIX}").rstrip("/")
    return Account(name, url, _key_or_sas(config, env, name), found)


def _key_or_sas(config: "StreamerConfig", env: dict[str, str], name: str | None) -> Any:
    if config.azure_sas_token:
        return _sas(config.azure_sas_token)
    if config.azure_account_key:
        return {"account_name": name or "", "account_key": config.azure_account_key}
    if env.get(SAS_TOKEN_ENV):
        return _sas(env[SAS_TOKEN_ENV])
    if env.get(ACCOUNT_KEY_ENV):
        return {"account_name": name or "", "account_key": env[ACCOUNT_KEY_ENV]}
    return None


def account_for_url(config: "StreamerConfig", name: str, url: str, env: dict[str, str] | None = None) -> Account:
    """The account of an ``https://NAME.blob.../`` URL: the configured account when it is the
    same one (its endpoint override and credentials apply), else that URL with keys or SAS only
    when no account is configured at all, and DefaultAzureCredential otherwise."""
    env = os.environ if env is None else env
    configured = default_account(config, env)
    if configured is not None and (configured.name == name or urlsplit(configured.url).netloc == urlsplit(url).netloc):
        return configured
    if configured is None:
        cred = _key_or_sas(config, env, name)
        found = ("azure_sas_token" if config.azure_sas_token else "azure_account_key" if config.azure_account_key
                 else SAS_TOKEN_ENV if env.get(SAS_TOKEN_ENV) else ACCOUNT_KEY_ENV if env.get(ACCOUNT_KEY_ENV)
                 else "DefaultAzureCredential")
        return Account(name, url.rstrip("/"), cred, found)
    return Account(name, url.rstrip("/"), None, "DefaultAzureCredential")


_CLIENTS: dict[tuple, Any] = {}
_IDENTITIES: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def shared_service(config: "StreamerConfig", account: Account):
    """One ``BlobServiceClient`` per process and account, reused across loads (its connections
    and, for an identity, its token cache); the pid keeps a forked child off its parent's."""
    key = (os.getpid(), account.key(), config.request_timeout, config.workers(remote=True))
    with _LOCK:
        client = _CLIENTS.get(key)
    if client is None:
        client = _make_service(config, account)
        with _LOCK:
            client = _CLIENTS.setdefault(key, client)
    return client


def _identity():
    """DefaultAzureCredential, one per process and identity environment."""
    from azure.identity import DefaultAzureCredential

    env = hashlib.sha256("\0".join(f"{k}={os.environ.get(k, '')}" for k in _IDENTITY_ENV).encode()).hexdigest()
    key = (os.getpid(), env)
    with _LOCK:
        credential = _IDENTITIES.get(key)
        if credential is None:
            credential = _IDENTITIES[key] = DefaultAzureCredential()
        return credential


def _make_service(config: "StreamerConfig", account: Account):
    try:
        import requests.adapters
        from azure.core.pipeline.transport import RequestsTransport
        from azure.storage.blob import BlobServiceClient
    except ImportError as exc:
        raise SourceError(errno.ENOPKG if hasattr(errno, "ENOPKG") else errno.ENOENT,
                          f"cannot read az:// URIs ({exc}); {INSTALL_HINT}") from exc
    credential = account.credential
    if credential is None:
        try:
            credential = _identity()
        except ImportError as exc:
            raise SourceError(errno.ENOPKG if hasattr(errno, "ENOPKG") else errno.ENOENT,
                              f"no Azure key, SAS or connection string is configured and azure-identity is not "
                              f"installed ({exc}); {INSTALL_HINT}") from exc
    session = requests.Session()
    pool = config.workers(remote=True) + 4      # workers + header/metadata requests
    for prefix in ("https://", "http://"):
        # max_retries=0: retries happen in .remote, resuming from the last byte received
        session.mount(prefix, requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=pool, max_retries=0))
    timeout = config.request_timeout
    transport = RequestsTransport(session=session, session_owner=False, connection_timeout=timeout,
                                  read_timeout=timeout)
    try:
        return BlobServiceClient(account.url, credential=credential, transport=transport, retry_total=0,
                                 connection_timeout=timeout, read_timeout=timeout)
    except ValueError as exc:   # an unusable URL or credential (the SDK's text quotes no credential)
        from .azure_errors import scrub

        raise SourceError(errno.EINVAL, f"cannot create an Azure Blob client for {account.endpoint} with "
                          f"credentials from {account.found_in}: {scrub(str(exc))[:200]}; check azure_account_url "
                          f"and the credentials") from None
