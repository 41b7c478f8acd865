"""The peers' published test suites: fetched from the package registry, cached, laid out per run.

None of the peers' code is committed. The archives are cached under ``<repo>/.cache/conformance/``
(gitignored), so a rerun needs no network; each run extracts a fresh copy, because the peers'
tests write files next to themselves.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "conformance"

SAFETENSORS_VERSION = "0.8.0"
# `pip download` of this sdist builds its metadata first, which needs Rust; so the file comes from
# the address PyPI lists for it, pinned by its hash.
SAFETENSORS_SDIST_URL = (
    "https://files.pythonhosted.org/packages/45/06/f955dbbb1859e3bd23c8ac6141af5106e7ad5fedec4a3a6e3d60f94b7001/"
    "safetensors-0.8.0.tar.gz"
)
SAFETENSORS_SDIST_SHA256 = "fabaf3e0f18a6618d9b36560682562157f77c2b71fcffc7b432be2baed9d753d"
_SAFETENSORS_SUITE = f"safetensors-{SAFETENSORS_VERSION}/bindings/python/"

RUNAI_VERSION = "0.17.1"
_RUNAI_SUITE = "runai_model_streamer/safetensors_streamer/tests/"

DOWNLOAD_TIMEOUT_S = 60


class PeerUnavailable(RuntimeError):
    """The registry could not be reached and nothing is cached."""


class PeerMismatch(RuntimeError):
    """What the registry served is not the pinned file."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def safetensors_sdist(cache: Path = CACHE) -> Path:
    """The safetensors sdist, downloaded once and checked against its pinned sha256."""
    path = cache / f"safetensors-{SAFETENSORS_VERSION}.tar.gz"
    if path.exists():
        if _sha256(path) == SAFETENSORS_SDIST_SHA256:
            return path
        log.warning("Cached %s does not match its sha256; downloading it again", path)
    try:
        with urllib.request.urlopen(SAFETENSORS_SDIST_URL, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as e:
        raise PeerUnavailable(f"cannot download {SAFETENSORS_SDIST_URL}: {e}") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != SAFETENSORS_SDIST_SHA256:
        raise PeerMismatch(f"{SAFETENSORS_SDIST_URL} has sha256 {digest}, expected {SAFETENSORS_SDIST_SHA256}; "
                           "refusing to run it")
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    partial.write_bytes(data)
    os.replace(partial, path)   # a cut download never looks complete
    log.info("Downloaded %s (%d bytes) to %s", SAFETENSORS_SDIST_URL, len(data), path)
    return path


def runai_wheel(cache: Path = CACHE) -> Path:
    """The Run:ai Model Streamer wheel, from the index pip is configured with, downloaded once."""
    pattern = f"runai_model_streamer-{RUNAI_VERSION}-*.whl"
    cached = sorted(cache.glob(pattern))
    if cached:
        return cached[0]
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"runai-model-streamer=={RUNAI_VERSION}", "--no-deps",
               "--only-binary=:all:", "--timeout", str(DOWNLOAD_TIMEOUT_S), "-d", tmp]
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=5 * DOWNLOAD_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            raise PeerUnavailable(f"`{' '.join(cmd)}` did not finish in {e.timeout} s") from e
        wheels = sorted(Path(tmp).glob(pattern))
        if proc.returncode or not wheels:
            lines = (proc.stdout + proc.stderr).strip().splitlines()
            why = [line for line in lines if line.startswith("ERROR")] or lines[-3:]
            raise PeerUnavailable(f"`{' '.join(cmd)}` failed ({proc.returncode}): {' | '.join(why)}")
        path = cache / wheels[0].name
        os.replace(wheels[0], path)
    log.info("Downloaded %s", path)
    return path


def _inside(name: str) -> bool:
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


def extract_safetensors_suite(sdist: Path, dest: Path) -> Path:
    """Lay out ``bindings/python`` as the suite expects it and return that directory.

    The tests open ``./tests/data/...`` relative to the working directory, so they run from here;
    ``setup.cfg`` carries safetensors' own pytest settings.
    """
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            name = member.name.removeprefix(_SAFETENSORS_SUITE)
            wanted = name.startswith("tests/") or name == "setup.cfg"
            if member.name.startswith(_SAFETENSORS_SUITE) and wanted and _inside(name) and \
                    (member.isfile() or member.isdir()):
                member.name = name
                members.append(member)
        if not any(m.name.startswith("tests/test_") for m in members):
            raise PeerMismatch(f"{sdist} has no {_SAFETENSORS_SUITE}tests/test_*.py")
        # The "data" filter (Python >= 3.11.4, 3.10.12) also refuses links and special files.
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **extra)
    (dest / "tests" / "data").mkdir(parents=True, exist_ok=True)
    return dest


def extract_runai_suite(wheel: Path, dest: Path) -> Path:
    """Copy the wheel's ``safetensors_streamer/tests/*.py`` to ``dest/tests`` with their fixtures.

    The wheel does not ship ``tests/test_files``; :func:`write_runai_fixtures` makes equivalents.
    """
    tests = dest / "tests"
    tests.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            _, found, file_name = name.partition(_RUNAI_SUITE)
            if found and file_name.endswith(".py") and "/" not in file_name:
                (tests / file_name).write_bytes(archive.read(name))
    if not any(tests.glob("test_*.py")):
        raise PeerMismatch(f"{wheel} has no {_RUNAI_SUITE}test_*.py")
    write_runai_fixtures(tests / "test_files")
    return dest


# The names and dtypes Run:ai's tests expect in test_files/test.safetensors, every one shaped [3, 2].
RUNAI_FIXTURE_DTYPES = ("int64", "float64", "float32", "bfloat16", "int32", "float16", "int16", "int8", "uint8", "bool")


def write_runai_fixtures(directory: Path) -> None:
    """Write ``test.safetensors`` and ``test_empty.safetensors``, the two files Run:ai's tests read
    from its git repository. Made here, with safetensors' own writer: deterministic, values that
    differ per tensor, negative and fractional where the dtype allows, both truth values."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    base = torch.tensor([[1, -2], [3, -4], [5, -6]])
    tensors = {}
    for i, dtype_name in enumerate(RUNAI_FIXTURE_DTYPES):
        dtype = getattr(torch, dtype_name)
        if dtype == torch.bool:
            values = torch.tensor([[True, False], [False, True], [True, True]])
        elif dtype == torch.uint8:
            values = base.abs() + 10 * i
        elif dtype.is_floating_point:
            values = base * 1.5 + i
        else:
            values = base * (i + 1)
        tensors[f"tensor1.{dtype_name}"] = values.to(dtype)
    save_file(tensors, str(directory / "test.safetensors"), metadata={"format": "pt"})
    save_file({}, str(directory / "test_empty.safetensors"))
