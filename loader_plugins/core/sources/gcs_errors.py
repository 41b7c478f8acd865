"""What a GCS failure means: another attempt (:class:`~.remote.Transient`) or a final
:class:`SourceError` naming the object, the request and what to check. Shared by :mod:`.gcs`'s
metadata calls (google-cloud-storage raises ``google.api_core`` exceptions) and its own ranged
GETs (an HTTP status and the JSON error body).

Credentials never appear in a message: a refusal's server text is left out, and a credentials
file is named by its path, never its contents.
"""

from __future__ import annotations

import errno
import http.client
import json

from ...errors import CancelledError, SourceChangedError, SourceError, SourceNotFoundError
from .remote import Transient

#: statuses worth another attempt (Google's retry guidance: 408, 429 and 5xx)
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})

CREDENTIALS_HINT = ("check the GCS credentials (GOOGLE_APPLICATION_CREDENTIALS or gcs_credentials_file, gcloud's "
                    "application default credentials, the service account or workload identity) and that they "
                    "may read this bucket (storage.objects.get, storage.objects.list)")


def error_reason(body: str | bytes | None) -> str:
    """``reason: message`` from a GCS JSON error body (``{"error": {"errors": [{"reason"...``),
    else the start of the text."""
    if not body:
        return ""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    try:
        err = json.loads(text).get("error", {})
        reasons = [e.get("reason") for e in err.get("errors", ()) if isinstance(e, dict) and e.get("reason")]
        message = str(err.get("message") or "").strip()
        return ": ".join(p for p in (", ".join(reasons), message) if p)
    except (ValueError, AttributeError):
        return " ".join(text.split())[:200]


def classify_status(status: int, reason: str, uri: str, what: str, *, endpoint: str | None,
                    object_key: bool = False) -> "Transient | SourceError":
    """An HTTP error answer (``status``, the error body's ``reason``) as Transient or SourceError."""
    label = f"HTTP {status}" + (f" ({reason})" if reason else "")
    if status == 412:
        return SourceChangedError(errno.ESTALE, f"{uri}: the object changed while it was being loaded (its "
                                  f"generation no longer matches the one seen at open, {what}); load it again once "
                                  f"it is no longer being written")
    if status in _TRANSIENT_STATUS:
        return Transient(label)
    if status in (401, 403):
        # the server's message is left out on purpose: it may quote the principal
        return SourceError(errno.EACCES, f"{uri}: {what} was refused with HTTP {status}; {CREDENTIALS_HINT}")
    if status == 404:
        thing = "object" if object_key else "bucket or prefix"
        return SourceNotFoundError(errno.ENOENT, f"{uri}: {what} found no such {thing} ({label}) at endpoint "
                                   f"{endpoint}; check the bucket and object name")
    if status == 416:
        return SourceError(errno.EIO, f"{uri}: {what} is outside the object ({label}); the object is shorter "
                           f"than expected, it may have been replaced")
    return SourceError(errno.EIO, f"{uri}: {what} failed with {label} (endpoint {endpoint})")


def classify(exc: BaseException, uri: str, what: str, *, endpoint: str | None,
             object_key: bool = False) -> "Transient | SourceError":
    """Map a google-cloud-storage / google-auth / requests exception to Transient or SourceError."""
    import requests
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as auth_exc

    if isinstance(exc, (SourceError, CancelledError, Transient)):
        return exc  # type: ignore[return-value]
    if isinstance(exc, gexc.GoogleAPICallError) and exc.code is not None:
        reason = ", ".join(str(e.get("reason")) for e in (exc.errors or ()) if isinstance(e, dict) and e.get("reason"))
        if int(exc.code) not in (401, 403):
            reason = ": ".join(p for p in (reason, str(exc.message or "").strip()) if p)
        return classify_status(int(exc.code), reason, uri, what, endpoint=endpoint, object_key=object_key)
    if isinstance(exc, auth_exc.DefaultCredentialsError):
        return SourceError(errno.EACCES, f"{uri}: no usable GCS credentials ({_first_line(exc)}); set "
                           f"GOOGLE_APPLICATION_CREDENTIALS or gcs_credentials_file to a key file, run "
                           f"`gcloud auth application-default login`, run where a metadata server gives "
                           f"credentials, or set gcs_anonymous for a public bucket or an emulator")
    if isinstance(exc, auth_exc.RefreshError):
        if getattr(exc, "retryable", False):
            return Transient(f"credential refresh: {type(exc).__name__}")
        # google-auth's text may quote the token endpoint's answer; name the kind only
        return SourceError(errno.EACCES, f"{uri}: {what}: the GCS credentials were refused when fetching an "
                           f"access token ({type(exc).__name__}); {CREDENTIALS_HINT}")
    if isinstance(exc, auth_exc.TransportError):
        return Transient(f"credential refresh: {type(exc).__name__}: {_first_line(exc)}")
    if isinstance(exc, requests.exceptions.SSLError):
        return SourceError(errno.EIO, f"{uri}: {what}: TLS error talking to {endpoint} ({_first_line(exc)}); check "
                           f"the endpoint URL (gcs_endpoint_url) and its certificate")
    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                        requests.exceptions.ChunkedEncodingError)):
        return Transient(f"{type(exc).__name__}: {_first_line(exc)}")
    if isinstance(exc, (OSError, http.client.HTTPException)):
        return Transient(f"{type(exc).__name__}: {exc}")
    return SourceError(errno.EIO, f"{uri}: {what} failed: {type(exc).__name__}: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
