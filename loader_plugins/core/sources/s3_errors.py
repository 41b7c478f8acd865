"""What an S3 failure means: another attempt (:class:`Transient`) or a final :class:`SourceError`
that names the object and what to check. Shared by :mod:`.s3`'s metadata calls and ranged GETs.

Credentials never appear in a message: the server's text is left out of refusals (some servers
echo the key id).
"""

from __future__ import annotations

import errno
import http.client
from typing import Any

from ...errors import CancelledError, SourceChangedError, SourceError, SourceNotFoundError
from .remote import Transient  # noqa: F401  (re-exported: the S3 modules import it from here)

# Error codes worth another attempt (botocore's "standard" retry mode treats these alike).
_THROTTLE_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded",
    "BandwidthLimitExceeded", "LimitExceededException", "ProvisionedThroughputExceededException",
    "PriorRequestNotComplete", "EC2ThrottledException",
})
_TRANSIENT_CODES = frozenset({"RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable"})
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
_AUTH_CODES = frozenset({
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken",
    "TokenRefreshRequired", "InvalidClientTokenId", "AuthorizationHeaderMalformed", "AllAccessDisabled",
    "AccountProblem", "403",
})
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})


def classify(exc: BaseException, uri: str, what: str, *, endpoint: str | None, profile: str | None,
             object_key: bool = False) -> "Transient | SourceError":
    """Map a boto3/botocore/socket exception to Transient (retry) or a final SourceError."""
    from botocore import exceptions as bex

    if isinstance(exc, (SourceError, CancelledError)):
        return exc  # type: ignore[return-value]
    if isinstance(exc, bex.ClientError):
        err = exc.response.get("Error", {}) or {}
        code = str(err.get("Code") or "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = str(err.get("Message") or "").strip()
        label = (f"HTTP {status}" if not code or code == str(status)
                 else f"{code} (HTTP {status})" if status else code)
        if code in ("PreconditionFailed", "412") or status == 412:
            return SourceChangedError(errno.ESTALE, f"{uri}: the object changed while it was being loaded "
                                      f"(its ETag no longer matches the one seen at open, {what}); load it "
                                      f"again once it is no longer being written")
        if code in _THROTTLE_CODES or code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS:
            return Transient(label + (f": {message}" if message else ""))
        if code in _AUTH_CODES or status == 403:
            # the server's message is left out on purpose: some servers echo the key id
            return SourceError(errno.EACCES, f"{uri}: {what} was refused with {label}; check the S3 credentials "
                               f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, the profile "
                               f"{profile or '(default)'}, or the instance role) and that they "
                               f"may read this bucket")
        if code == "NoSuchBucket":
            return SourceNotFoundError(errno.ENOENT, missing_bucket_message(uri, endpoint))
        if code in _MISSING_CODES or status == 404:
            thing = "object" if object_key else "bucket or prefix"
            return SourceNotFoundError(errno.ENOENT, f"{uri}: {what} found no such {thing} ({label}) at endpoint "
                                       f"{endpoint}; check the bucket and key")
        if code == "InvalidRange" or status == 416:
            return SourceError(errno.EIO, f"{uri}: {what} is outside the object ({label}); the object is "
                               f"shorter than expected, it may have been replaced")
        return SourceError(errno.EIO, f"{uri}: {what} failed with {label}" + (f": {message}" if message else "")
                           + f" (endpoint {endpoint})")
    if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError, bex.CredentialRetrievalError)):
        return SourceError(errno.EACCES, f"{uri}: no usable S3 credentials ({type(exc).__name__}); set "
                           f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile (s3_profile), or run "
                           f"with an instance role")
    if isinstance(exc, bex.SSLError):
        return SourceError(errno.EIO, f"{uri}: {what}: TLS error talking to {endpoint} ({exc}); check "
                           f"the endpoint URL and its certificate")
    if isinstance(exc, (bex.HTTPClientError, bex.ConnectionError, bex.IncompleteReadError)):
        return Transient(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, (OSError, http.client.HTTPException)):
        return Transient(f"{type(exc).__name__}: {exc}")
    return SourceError(errno.EIO, f"{uri}: {what} failed: {type(exc).__name__}: {exc}")


def explain_missing(client: Any, bucket: str, uri: str, error: SourceError, endpoint: str | None) -> SourceError:
    """A HEAD 404 has no body: ask whether the bucket exists to say which one is missing."""
    try:
        client.head_bucket(Bucket=bucket)
    except Exception as exc:  # noqa: BLE001
        status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        if status == 404 or code in ("404", "NoSuchBucket", "NotFound"):
            return SourceNotFoundError(errno.ENOENT, missing_bucket_message(uri, endpoint))
        return error
    return SourceNotFoundError(errno.ENOENT, f"{uri}: no such object in bucket {bucket!r} (HTTP 404) at endpoint "
                               f"{endpoint}; check the key")


def missing_bucket_message(uri: str, endpoint: str | None) -> str:
    bucket = str(uri)[5:].partition("/")[0]
    return (f"{uri}: bucket {bucket!r} does not exist (NoSuchBucket) at endpoint {endpoint}; check the "
            f"bucket name, the endpoint (s3_endpoint_url / AWS_ENDPOINT_URL) and the region")
