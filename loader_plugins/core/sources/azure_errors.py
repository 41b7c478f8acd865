"""What an Azure Blob failure means: another attempt (:class:`~.remote.Transient`) or a final
:class:`SourceError` naming the blob, the request and what to check. Shared by :mod:`.azure`'s
metadata calls (azure-storage-blob raises ``azure.core`` exceptions) and its own ranged GETs
(an HTTP status and the ``x-ms-error-code`` header, which Azure sends even on HEAD).

Credentials never appear in a message: a refusal's server text is left out (it may quote the
string that was signed), and URLs in messages carry no query (no SAS).
"""

from __future__ import annotations

import errno
import http.client
import re

from ...errors import CancelledError, SourceChangedError, SourceError, SourceNotFoundError
from .remote import Transient

#: statuses and error codes worth another attempt (Azure Storage's retry guidance)
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset({"ServerBusy", "OperationTimedOut", "InternalError", "TooManyRequests"})

CREDENTIALS_HINT = ("check the Azure credentials (azure_connection_string / AZURE_STORAGE_CONNECTION_STRING, the "
                    "account key, the SAS token and its permissions and expiry, or the identity "
                    "DefaultAzureCredential found) and that they may read this container")


def classify_status(status: int, code: str | None, uri: str, what: str, *, endpoint: str | None,
                    object_key: bool = False) -> "Transient | SourceError":
    """An HTTP error answer (``status``, its ``x-ms-error-code``) as Transient or SourceError."""
    code = str(code or "")
    label = f"{code} (HTTP {status})" if code else f"HTTP {status}"
    if status == 412 or code == "ConditionNotMet":
        return SourceChangedError(errno.ESTALE, f"{uri}: the object changed while it was being loaded (its ETag "
                                  f"no longer matches the one seen at open, {what}); load it again once it is no "
                                  f"longer being written")
    if status in _TRANSIENT_STATUS or code in _TRANSIENT_CODES:
        return Transient(label)
    if status in (401, 403):
        # the server's message is left out on purpose: it may quote the string that was signed
        return SourceError(errno.EACCES, f"{uri}: {what} was refused with {label}; {CREDENTIALS_HINT}")
    if status == 404:
        if code == "ContainerNotFound":
            return SourceNotFoundError(errno.ENOENT, f"{uri}: the container does not exist (ContainerNotFound) at "
                                       f"{endpoint}; check the container name and the account (azure_account_url, "
                                       f"azure_account_name or the connection string)")
        thing = "blob" if object_key else "container or prefix"
        return SourceNotFoundError(errno.ENOENT, f"{uri}: {what} found no such {thing} ({code or 'HTTP 404'}) at "
                                   f"{endpoint}; check the container and blob name")
    if status == 416 or code == "InvalidRange":
        return SourceError(errno.EIO, f"{uri}: {what} is outside the blob ({label}); the blob is shorter than "
                           f"expected, it may have been replaced")
    return SourceError(errno.EIO, f"{uri}: {what} failed with {label} (endpoint {endpoint})")


def classify(exc: BaseException, uri: str, what: str, *, endpoint: str | None,
             object_key: bool = False) -> "Transient | SourceError":
    """Map an azure-core / azure-identity / requests exception to Transient or SourceError."""
    import requests
    from azure.core import exceptions as aexc

    if isinstance(exc, (SourceError, CancelledError, Transient)):
        return exc  # type: ignore[return-value]
    if isinstance(exc, aexc.ClientAuthenticationError) and getattr(exc, "status_code", None) is None:
        # raised by a credential (DefaultAzureCredential and its chain), not by the service
        return SourceError(errno.EACCES, f"{uri}: no usable Azure credentials ({type(exc).__name__}: "
                           f"{_first_line(exc)}); set azure_connection_string or AZURE_STORAGE_CONNECTION_STRING, "
                           f"an account key or SAS token (azure_account_key, azure_sas_token, "
                           f"AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_TOKEN), or an identity "
                           f"DefaultAzureCredential can use (AZURE_CLIENT_ID..., a managed identity, `az login`)")
    if isinstance(exc, aexc.IncompleteReadError):
        return Transient(f"{type(exc).__name__}: {_first_line(exc)}")
    if isinstance(exc, aexc.HttpResponseError) and getattr(exc, "status_code", None) is not None:
        code = getattr(exc, "error_code", None)
        code = getattr(code, "value", code)     # a StorageErrorCode enum, or the header's text
        return classify_status(int(exc.status_code), code, uri, what, endpoint=endpoint, object_key=object_key)
    if isinstance(exc, (aexc.ServiceRequestError, aexc.ServiceResponseError)):
        return Transient(f"{type(exc).__name__}: {_first_line(exc)}")
    if isinstance(exc, requests.exceptions.SSLError):
        return SourceError(errno.EIO, f"{uri}: {what}: TLS error talking to {endpoint} ({_first_line(exc)}); check "
                           f"the account URL (azure_account_url) and its certificate")
    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                        requests.exceptions.ChunkedEncodingError)):
        return Transient(f"{type(exc).__name__}: {_first_line(exc)}")
    if isinstance(exc, (OSError, http.client.HTTPException)):
        return Transient(f"{type(exc).__name__}: {_first_line(exc)}")
    return SourceError(errno.EIO, f"{uri}: {what} failed: {type(exc).__name__}: {_first_line(exc)}")


_QUERY = re.compile(r"\?[^\s'\")]*")


def scrub(text: str) -> str:
    """``text`` with every URL query removed (a SAS token travels in the query: ``sig=...``)."""
    return _QUERY.sub("?<query left out>", text)


def _first_line(exc: BaseException) -> str:
    # a connection error's text quotes the URL it was sending, SAS included
    text = scrub(str(exc).strip())
    return text.splitlines()[0][:300] if text else type(exc).__name__
