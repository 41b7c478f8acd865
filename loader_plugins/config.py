"""One typed configuration object for every entry point (library, CLI, vLLM, TGI).

Environment variables are never read here: adapters and the CLI translate their own inputs
into a :class:`StreamerConfig` and pass it explicitly.
"""

from __future__ import annotations

import dataclasses
import os
from types import MappingProxyType
from typing import Any, Mapping

from .errors import ConfigError

_MiB = 1 << 20
_GiB = 1 << 30


def _default_concurrency(remote: bool = False) -> int:
    # Reads are I/O bound and release the GIL: a few threads per core keep a local NVMe or a
    # network link busy. A GET spends more of its time waiting on round trips, so remote loads
    # get at least 16 (docs/measurements.md, "Concurrency").
    local = max(8, min(32, 4 * (os.cpu_count() or 2)))
    return max(16, local) if remote else local


@dataclasses.dataclass(frozen=True)
class StreamerConfig:
    """How the streamer reads.

    Every field can be given to :func:`loader_plugins.load_file`, the CLI
    (``--concurrency 8``), vLLM's ``--model-loader-extra-config`` and TGI's environment.
    """

    concurrency: int | None = None
    """Worker threads reading in parallel (per process). ``None`` (the default) chooses per load:
    4 per core, 8 to 32, for local files; at least 16 when any object comes from object storage
    (S3, GCS, Azure)."""

    chunk_bytes: int = 16 * _MiB
    """Largest single read from a local file. Tensors larger than this are split across workers."""

    memory_limit: int = 2 * _GiB
    """Upper bound on bytes the reader holds that the caller does not own yet: tensors it
    allocated and has not handed out, plus staging buffers. A single tensor larger than the
    limit is still loaded, alone."""

    direct_io: str = "auto"
    """``"auto"``: serve what is in the page cache with buffered reads and read the rest with
    O_DIRECT; ``"on"``: always O_DIRECT; ``"off"``: always buffered reads."""

    page_cache: str = "auto"
    """What a load leaves in the page cache when it read local files past it (O_DIRECT):
    ``"keep"``: once the load is done, the files are read back into the page cache in the
    background (kernel readahead), so the next start on this machine (a restart, a second
    replica or engine) reads at memory speed; ``"bypass"``: nothing, the page cache keeps what
    it had (for checkpoints far larger than the machine's memory); ``"auto"``: keep when the
    bytes missing from the cache are at most half of the memory available once the load is
    done (``MemAvailable``), else bypass. The load itself is not slowed: its reads stay
    O_DIRECT (``direct_io``), the refill starts after its last byte; it reads the disk a second
    time and takes page-cache memory the kernel gives back under pressure.
    docs/measurements.md, "Page cache after a load"."""

    alignment: int = 4096
    """Buffer and offset alignment for O_DIRECT reads."""

    gather_min_row_bytes: int = 4096
    """A tensor-parallel shard along a later dim (a row-parallel weight's columns) is read row
    by row from a local file, only its own bytes, when the tensor's rows are at least this long;
    shorter rows are read whole and cut (a pread per row costs about as much as copying 10 KiB
    from the page cache). 0: always row by row."""

    max_header_bytes: int = 100_000_000
    """Largest safetensors JSON header accepted (the format's own limit is 100 MB)."""

    hugepages: str = "off"
    """Transparent huge pages for tensors of 4 MiB or more that the reader allocates (each in
    its own 2 MiB-aligned mapping, ``MADV_HUGEPAGE``): ``"off"`` (the default), ``"on"``, or
    ``"auto"``: on a load that allocates at least 256 MiB, each tensor gets the page size that
    has faulted in more cheaply so far in the load (both are measured first; see
    ``PageSizeChooser``). Off is the default: it was the faster of the two in every fresh
    process measured (a server's start), and ``auto`` was below it everywhere; in repeated
    loads within one process ``on`` has measured both faster and several times slower
    (docs/measurements.md, "Page sizes"). ``on`` may pay where fresh huge pages fault in fast
    (bare metal: measure with ``model-streamer bench --hugepages on``). ``true``/``false`` mean
    ``"on"``/``"off"``. Never for pinned tensors or caller-owned memory."""

    pin_memory: str = "auto"
    """Allocate output tensors in page-locked memory: ``"auto"`` (when CUDA is available),
    ``"on"``, ``"off"``."""

    pinned_ring: str = "keep"
    """The CUDA sink's ring of page-locked host buffers (at most a quarter of ``memory_limit``):
    ``"keep"``: after a load it stays allocated for the next load in this process (one ring per
    device; pinning costs more than copying a small checkpoint through it, and engines reload
    and restore in the same process); ``"free"``: released after every load."""

    progress: str = "auto"
    """Progress bar on stderr: ``"auto"`` (only when stderr is a TTY), ``"on"``, ``"off"``."""

    # --- object storage: S3 and S3-compatible endpoints (s3://bucket/key) ---
    s3_endpoint_url: str | None = None
    """Endpoint of an S3-compatible server; defaults to boto3's resolution (AWS_ENDPOINT_URL...)."""

    s3_region: str | None = None
    """Region; defaults to boto3's resolution."""

    s3_addressing_style: str = "auto"
    """``"auto"``, ``"path"`` or ``"virtual"``."""

    s3_profile: str | None = None
    """Named profile from the shared AWS config files."""

    s3_access_key_id: str | None = dataclasses.field(default=None, repr=False)
    """Explicit credentials (Run:ai's ``S3Credentials``); by default boto3's chain finds them.
    Never logged: ``repr`` and ``to_dict(redact=True)`` leave them out."""

    s3_secret_access_key: str | None = dataclasses.field(default=None, repr=False)
    s3_session_token: str | None = dataclasses.field(default=None, repr=False)

    # --- Google Cloud Storage (gs://bucket/object) ---
    gcs_endpoint_url: str | None = None
    """Endpoint of the GCS JSON API: an emulator (fake-gcs-server), a private or sovereign
    endpoint; defaults to google-cloud-storage's resolution (``STORAGE_EMULATOR_HOST``, else
    https://storage.googleapis.com)."""

    gcs_credentials_file: str | None = None
    """A service-account or authorized-user JSON key file; by default the Application Default
    Credentials chain finds them (``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's ADC file, the
    metadata server on GCE, GKE and Cloud Run). Its contents never reach a log."""

    gcs_anonymous: bool = False
    """Send GCS requests unauthenticated (public buckets, an emulator named by
    ``gcs_endpoint_url``); with ``STORAGE_EMULATOR_HOST`` set, google-cloud-storage already is."""

    # --- Azure Blob Storage (az://container/blob, https://ACCOUNT.blob.core.windows.net/...) ---
    azure_account_url: str | None = None
    """Blob endpoint of the storage account that ``az://`` URIs name containers of:
    ``https://ACCOUNT.blob.core.windows.net``, a sovereign cloud's or a private endpoint, or an
    emulator (``http://127.0.0.1:10000/devstoreaccount1``); an https:// blob URL of this account
    is read through it too. Default: the connection string's BlobEndpoint, else
    ``https://{azure_account_name}.blob.core.windows.net``."""

    azure_account_name: str | None = None
    """Storage account for ``az://`` URIs when no account URL or connection string names one;
    default ``AZURE_STORAGE_ACCOUNT_NAME``."""

    azure_connection_string: str | None = dataclasses.field(default=None, repr=False)
    """Explicit Azure credentials, at most one of the three (a connection string, the account's
    key, a SAS token); by default the chain finds them: ``AZURE_STORAGE_CONNECTION_STRING``, then
    ``AZURE_STORAGE_SAS_TOKEN`` or ``AZURE_STORAGE_ACCOUNT_KEY`` with the account name, then
    azure-identity's ``DefaultAzureCredential`` (environment, workload or managed identity,
    Azure CLI). Never logged: ``repr`` and ``to_dict(redact=True)`` leave them out."""

    azure_account_key: str | None = dataclasses.field(default=None, repr=False)
    azure_sas_token: str | None = dataclasses.field(default=None, repr=False)

    s3_range_bytes: int = 32 * _MiB
    """Largest ranged GET (S3, GCS and Azure alike). Tensors larger than this are split across
    workers; every GET costs a round trip and client CPU, so ranges are larger than local reads
    (``chunk_bytes``)."""

    request_timeout: float = 60.0
    """Seconds one request (connect or read) may stall before it is retried."""

    max_retries: int = 8
    """Attempts per range after the first, with exponential backoff and jitter."""

    deadline: float | None = None
    """Seconds the whole load may take before it fails; ``None`` for no limit."""

    sections: tuple = dataclasses.field(default=(), repr=False)
    """Plug-in sections, ``((name, section), ...)``: options that belong to a package outside the
    core (the checkpoint cache: ``cache_dir``...). Their keys are given flat like every other key
    (``from_dict({"cache_dir": ...})``) and read back with :meth:`section`; see
    :func:`register_config_section`."""

    @classmethod
    def allowed_keys(cls) -> list[str]:
        """Every key ``from_dict`` accepts: the core's fields, then each registered section's."""
        return [f.name for f in config_fields()]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None, *, where: str = "config") -> "StreamerConfig":
        """Build a config from a mapping, rejecting unknown keys and invalid values."""
        values = dict(values or {})
        allowed = cls.allowed_keys()
        unknown = sorted(k for k in values if k not in allowed)
        if unknown:
            raise ConfigError(
                f"unknown {where} key(s) {', '.join(map(repr, unknown))}; "
                f"allowed keys are: {', '.join(allowed)}"
            )
        core, per_section = _split_by_section(values)
        sections = tuple((name, _build_section(name, per_section[name], where)) for name in sorted(per_section))
        return cls(**_coerce_all(core, where), sections=sections)

    def replace(self, **changes: Any) -> "StreamerConfig":
        return self.from_dict({**self.to_dict(), **changes})

    def section(self, name: str) -> Any:
        """The section ``name`` (a registered plug-in's options): the one this config was given,
        else that section's defaults."""
        for have, value in self.sections:
            if have == name:
                return value
        try:
            return _SECTIONS[name]()
        except KeyError:
            raise ConfigError(f"no config section {name!r} is registered; registered: "
                              f"{', '.join(sorted(_SECTIONS)) or 'none'}") from None

    def to_dict(self, *, redact: bool = False) -> dict[str, Any]:
        """Every key, flat (sections' keys beside the core's, defaults included); ``redact``
        replaces set credentials with ``"***"`` (for reports)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sections"}
        for name in sorted(_SECTIONS):
            out.update(dataclasses.asdict(self.section(name)))
        if redact:
            for key in _SECRET_FIELDS:
                if out[key] is not None:
                    out[key] = "***"
        return out

    def workers(self, remote: bool = False) -> int:
        """Reader threads for a load; ``remote``: it reads from object storage (see ``concurrency``)."""
        return self.concurrency if self.concurrency is not None else _default_concurrency(remote)

    def read_bytes(self, remote: bool = False) -> int:
        """Largest single read: ``s3_range_bytes`` for objects in object storage, ``chunk_bytes`` otherwise."""
        return self.s3_range_bytes if remote else self.chunk_bytes

    def __post_init__(self) -> None:
        if isinstance(self.hugepages, (bool, str)):   # True -> "on" for StreamerConfig(hugepages=True)
            object.__setattr__(self, "hugepages", _HUGEPAGE_WORDS.get(str(self.hugepages).strip().lower(),
                                                                      self.hugepages))
        _validate(self)


_CHOICES = {
    "direct_io": ("auto", "on", "off"),
    "hugepages": ("auto", "on", "off"),
    "page_cache": ("auto", "keep", "bypass"),
    "pin_memory": ("auto", "on", "off"),
    "progress": ("auto", "on", "off"),
    "pinned_ring": ("keep", "free"),
    "s3_addressing_style": ("auto", "path", "virtual"),
}
_HUGEPAGE_WORDS = {"auto": "auto", "on": "on", "true": "on", "1": "on", "yes": "on",
                   "off": "off", "false": "off", "0": "off", "no": "off"}
_SECRET_FIELDS = ("s3_access_key_id", "s3_secret_access_key", "s3_session_token", "azure_connection_string",
                  "azure_account_key", "azure_sas_token")
#: optional text keys: "none", "null" or "" (a CLI flag, an environment variable) mean None
_OPTIONAL_TEXT_FIELDS = ("gcs_endpoint_url", "gcs_credentials_file", "azure_account_url", "azure_account_name",
                         "azure_connection_string", "azure_account_key", "azure_sas_token")
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False,
               "off": False}
_SIZE_FIELDS = ("chunk_bytes", "memory_limit", "alignment", "max_header_bytes", "s3_range_bytes",
                "gather_min_row_bytes")


# --- plug-in sections ------------------------------------------------------------------------
# A package outside the core (the checkpoint cache) owns its options: a frozen dataclass whose
# fields carry doc strings like StreamerConfig's, with optional ``SIZE_FIELDS`` (parsed like
# "16MiB") and ``validate()`` (raises ConfigError). Registered once by name; its keys are then
# accepted flat everywhere StreamerConfig keys are (library, CLI flags, vLLM's extra config, TGI's
# environment) and read back with ``config.section(name)``.

_SECTIONS: dict[str, type] = {}


def register_config_section(name: str, cls: type, *, replace: bool = False) -> None:
    """Register ``cls`` (a frozen dataclass) as the config section ``name``. Registering the same
    class again is a no-op; another class under a taken name, or a key another part already owns,
    raises :class:`ConfigError` (``replace=True`` swaps the class for that name)."""
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise ConfigError(f"config section {name!r}: {cls!r} is not a dataclass")
    have = _SECTIONS.get(name)
    if have is cls:
        return
    if have is not None and not replace:
        raise ConfigError(f"config section {name!r} is already registered by {have.__module__}.{have.__qualname__}; "
                          f"pass replace=True to replace it with {cls.__module__}.{cls.__qualname__}")
    owners = {f.name: "StreamerConfig" for f in dataclasses.fields(StreamerConfig)}
    for other, other_cls in _SECTIONS.items():
        if other != name:
            owners.update({f.name: f"section {other!r}" for f in dataclasses.fields(other_cls)})
    taken = sorted(f.name for f in dataclasses.fields(cls) if f.name in owners)
    if taken:
        raise ConfigError(f"config section {name!r}: key(s) {', '.join(taken)} already belong to "
                          f"{', '.join(sorted({owners[k] for k in taken}))}")
    _SECTIONS[name] = cls


def config_sections() -> Mapping[str, type]:
    """The registered sections, read-only (name -> dataclass)."""
    return MappingProxyType(_SECTIONS)


def config_fields() -> list[dataclasses.Field]:
    """Every option as a dataclass field: the core's (not ``sections`` itself), then each
    registered section's, by section name."""
    fields = [f for f in dataclasses.fields(StreamerConfig) if f.name != "sections"]
    for name in sorted(_SECTIONS):
        fields.extend(dataclasses.fields(_SECTIONS[name]))
    return fields


def _split_by_section(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    owner = {f.name: name for name, cls in _SECTIONS.items() for f in dataclasses.fields(cls)}
    core: dict[str, Any] = {}
    per_section: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        if key in owner:
            per_section.setdefault(owner[key], {})[key] = value
        else:
            core[key] = value
    return core, per_section


def _build_section(name: str, values: dict[str, Any], where: str) -> Any:
    cls = _SECTIONS[name]
    sizes = getattr(cls, "SIZE_FIELDS", ())
    coerced: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, str) and value.strip().lower() in ("none", "null", ""):
            value = None
        if key in sizes and value is not None:
            try:
                value = parse_size(value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{where} key {key!r}: {exc}") from exc
        coerced[key] = value
    section = cls(**coerced)
    validate = getattr(section, "validate", None)
    if validate is not None:
        validate()
    return section


def field_docs() -> dict[str, str]:
    """Each :class:`StreamerConfig` field's doc string (the string literal under it in this
    file), for ``--help`` and docs; a field documented together with the one before it shares
    that one's text."""
    global _FIELD_DOCS
    if _FIELD_DOCS is None:
        _FIELD_DOCS = _class_field_docs(StreamerConfig)
    out = dict(_FIELD_DOCS)
    for cls in _SECTIONS.values():
        out.update(_class_field_docs(cls))
    return out


_FIELD_DOCS: dict[str, str] | None = None


def _class_field_docs(cls: type) -> dict[str, str]:
    """The string literal under each annotated field of ``cls``'s source."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    body = next(n for n in ast.parse(inspect.getsource(cls)).body if isinstance(n, ast.ClassDef)).body
    last = ""
    for node, following in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(getattr(following, "value", None), ast.Constant) \
                    and isinstance(following.value.value, str):
                last = inspect.cleandoc(following.value.value)
            docs[node.target.id] = last
    return docs


def parse_size(value: Any) -> int:
    """``"16MiB"``, ``"1.5GB"``, ``"4096"`` or an int -> bytes."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    text = str(value).strip().replace("_", "")
    units = {
        "": 1, "b": 1,
        "k": 1000, "kb": 1000, "kib": 1 << 10,
        "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
        "g": 1000**3, "gb": 1000**3, "gib": 1 << 30,
        "t": 1000**4, "tb": 1000**4, "tib": 1 << 40,
    }
    number = text.rstrip("kKmMgGtTiIbB ")
    unit = text[len(number):].strip().lower()
    if unit not in units or not number:
        raise ValueError(f"cannot parse size {value!r}; use e.g. 4096, 16MiB, 1.5GB")
    return int(float(number) * units[unit])


def _coerce_all(values: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        try:
            if key in _SIZE_FIELDS:
                value = parse_size(value)
            elif key == "concurrency" and (value is None or str(value).strip().lower() in ("auto", "none", "")):
                value = None
            elif key in ("concurrency", "max_retries"):
                if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                    value = int(value.strip())
                if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
                    raise ValueError(f"expected an integer, got {value!r}")
                value = int(value)
            elif key in _OPTIONAL_TEXT_FIELDS:
                if isinstance(value, str) and value.strip().lower() in ("none", "null", ""):
                    value = None
            elif key == "gcs_anonymous":
                if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
                    value = _BOOL_WORDS[value.strip().lower()]
                if not isinstance(value, bool):
                    raise ValueError(f"expected true or false, got {value!r}")
            elif key in ("request_timeout", "deadline"):
                value = None if value is None else float(value)
            elif key == "hugepages":   # the words themselves are mapped in __post_init__
                if str(value).strip().lower() not in _HUGEPAGE_WORDS:
                    raise ValueError(f"expected auto, on or off, got {value!r}")
            elif key in _CHOICES:
                if value is True:
                    value = "on"
                elif value is False:
                    value = "off"
                value = str(value).lower()
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where} key {key!r}: {exc}") from exc
        out[key] = value
    return out


def _validate(cfg: StreamerConfig) -> None:
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"config key {key!r}={getattr(cfg, key)!r}: {why}")

    if cfg.concurrency is not None and (not isinstance(cfg.concurrency, int) or isinstance(cfg.concurrency, bool)
                                        or not 1 <= cfg.concurrency <= 1024):
        raise bad("concurrency", "must be an integer from 1 to 1024, or null to choose per load")
    if not isinstance(cfg.s3_range_bytes, int) or cfg.s3_range_bytes < 64 * 1024:
        raise bad("s3_range_bytes", "must be at least 64 KiB")
    if not isinstance(cfg.chunk_bytes, int) or cfg.chunk_bytes < 4096:
        raise bad("chunk_bytes", "must be at least 4096 bytes")
    if not isinstance(cfg.gather_min_row_bytes, int) or isinstance(cfg.gather_min_row_bytes, bool) \
            or cfg.gather_min_row_bytes < 0:
        raise bad("gather_min_row_bytes", "must be a byte count of 0 or more")
    if not isinstance(cfg.memory_limit, int) or cfg.memory_limit < cfg.chunk_bytes:
        raise bad("memory_limit", f"must be at least chunk_bytes ({cfg.chunk_bytes})")
    if not isinstance(cfg.alignment, int) or cfg.alignment < 512 or cfg.alignment & (cfg.alignment - 1):
        raise bad("alignment", "must be a power of two of at least 512")
    if cfg.chunk_bytes % cfg.alignment:
        raise bad("chunk_bytes", f"must be a multiple of alignment ({cfg.alignment})")
    if not isinstance(cfg.max_header_bytes, int) or cfg.max_header_bytes < 1024:
        raise bad("max_header_bytes", "must be at least 1024")
    for key, choices in _CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise bad(key, f"must be one of {', '.join(choices)}")
    if cfg.request_timeout is None or cfg.request_timeout <= 0:
        raise bad("request_timeout", "must be a positive number of seconds")
    if cfg.deadline is not None and cfg.deadline <= 0:
        raise bad("deadline", "must be a positive number of seconds or null")
    if not isinstance(cfg.max_retries, int) or cfg.max_retries < 0:
        raise bad("max_retries", "must be a non-negative integer")
    for key in ("gcs_endpoint_url", "azure_account_url"):
        value = getattr(cfg, key)
        if value is not None and (not isinstance(value, str) or not value.lower().startswith(("http://", "https://"))
                                  or len(value.split("://", 1)[1].strip("/")) == 0):
            raise bad(key, "must be an http:// or https:// URL, or null for the default")
    if not isinstance(cfg.gcs_anonymous, bool):
        raise bad("gcs_anonymous", "must be true or false")
    if cfg.gcs_anonymous and cfg.gcs_credentials_file:
        raise bad("gcs_anonymous", "cannot be combined with gcs_credentials_file: choose one")
    given = [k for k in ("azure_connection_string", "azure_account_key", "azure_sas_token") if getattr(cfg, k)]
    if len(given) > 1:
        # the values are secrets: the message names the keys only
        raise ConfigError(f"config keys {', '.join(given)} are all set: give at most one kind of Azure credential")
    seen = set()
    for entry in cfg.sections:
        name, section = entry if isinstance(entry, tuple) and len(entry) == 2 else (None, entry)
        if name not in _SECTIONS or not isinstance(section, _SECTIONS[name]) or name in seen:
            raise ConfigError(f"config sections must be (name, section) pairs of registered sections, once each "
                              f"(registered: {', '.join(sorted(_SECTIONS)) or 'none'}); got {entry!r}")
        seen.add(name)
