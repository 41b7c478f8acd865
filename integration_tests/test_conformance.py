"""Conformance: the peers' own published test suites, run against our drop-in APIs.

* safetensors 0.8.0's tests, with ``safetensors.torch.load_file`` routed to ``loader_plugins.load_file``;
* Run:ai Model Streamer 0.17.1's ``safetensors_streamer`` tests (and its 2-rank gloo test), with
  ``SafetensorsStreamer`` routed to ``loader_plugins.SafetensorsStreamer``.

Each suite is fetched from the package registry (cached in ``.cache/conformance/``), run against the
real peer, then with the API routed to ours by ``conformance/routing_shim.py``. A test counts when it
passes against the peer and reaches the routed API there. The verdict is printed, and appended as
markdown to the file named by ``$CONFORMANCE_REPORT`` when that is set::

    .venv/bin/python -m pytest -q -s integration_tests/test_conformance.py

Without network and with nothing cached the tests skip, or fail when ``CI=true``.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path

import pytest

if str(Path(__file__).parent) not in sys.path:  # --import-mode=importlib adds nothing to sys.path
    sys.path.insert(0, str(Path(__file__).parent))
from conformance import peers, suites

pytestmark = pytest.mark.slow

# Tests that reach the API but check a mechanism of the peer's own that we do not replicate. Not a
# place for tests ours fails: those are the findings. Keys are node ids, classes or modules.
SAFETENSORS_EXCLUDED: dict[str, str] = {}

RUNAI_EXCLUDED = {
    "tests/test_safetensors_streamer.py::TestSafetensorsStreamer::test_the_ring_is_reported_once_per_load_with_the_rank":
        "asserts the INFO line Run:ai logs about its C++ CPU ring ('Rank 0: CPU ring N x ...'); we have no ring",
    "tests/test_alignment.py::TestSessionCountsAlignmentCopies":
        "stubs the peer's file_streamer.get_chunks and reads its unaligned_copies counter",
    "tests/test_mock.py":
        "tests Run:ai's S3/GCS mock patcher (streamer_mock.StreamerPatcher), not the streamer",
}

# Counted tests ours fails on purpose: they stay in the pass rate; the report shows the reason.
RUNAI_KNOWN_DIFFERENCES = {
    "tests/test_safetensors_streamer.py::TestOwnedTensorsEndToEnd::test_without_owning_the_same_memory_serves_several_tensors":
        "asserts that owned=False tensors share Run:ai's recycled ring memory (RUNAI_STREAMER_RING_BUFFERS=2). "
        "owned=False allows reuse but does not require it; ours hands out owned tensors always, so a kept "
        "tensor is never overwritten",
}

RUNAI_DIST_TESTS = "tests/dist_test_safetensors_streamer.py"

SAFETENSORS_MIN_COUNTED = 15
RUNAI_MIN_COUNTED = 20
RUNAI_MIN_PASS_RATE = 0.95


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _require_installed(distribution: str, version: str) -> None:
    """The peer runs as installed, so it must be the version whose tests we run."""
    try:
        installed = metadata.version(distribution)
    except metadata.PackageNotFoundError:
        _unavailable(f"{distribution} is not installed (pip install -e '.[dev,bench]')")
    if installed != version:
        _unavailable(f"{distribution} {installed} is installed but the suite is {version}'s "
                     f"(pip install {distribution}=={version})")


def _fetch(get):
    try:
        return get()
    except peers.PeerUnavailable as e:
        _unavailable(f"cannot fetch the peer's tests and none are cached: {e}")


def _check_routing(peer: suites.Run, ours: suites.Run, peer_package: str) -> None:
    if peer.problem:
        pytest.fail(f"the run against the real peer broke:\n{peer.problem}")
    assert peer.target.startswith(peer_package + "."), f"the peer run was routed to {peer.target}"
    assert ours.problem or ours.target.startswith("loader_plugins."), f"our run was routed to {ours.target}"


def _report(verdict: suites.Verdict) -> str:
    text = suites.render(verdict)
    print("\n" + text)
    report = os.environ.get("CONFORMANCE_REPORT")
    if report:
        with open(report, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    return text


def _assert_exclusions_current(verdict: suites.Verdict) -> None:
    assert not verdict.unused_exclusions, f"exclusions that name no test of the suite: {verdict.unused_exclusions}"
    uncounted = sorted(set(verdict.known) - set(verdict.counted))
    assert not uncounted, f"known differences that name no counted test: {uncounted}"


def test_safetensors_suite_against_load_file(tmp_path: Path) -> None:
    _require_installed("safetensors", peers.SAFETENSORS_VERSION)
    sdist = _fetch(peers.safetensors_sdist)

    peer_dir = peers.extract_safetensors_suite(sdist, tmp_path / "peer")
    peer = suites.run_pytest("safetensors", "peer", peer_dir, ["tests"], tmp_path / "results")
    verdict = suites.classify(f"safetensors {peers.SAFETENSORS_VERSION} tests -> loader_plugins.load_file",
                              "safetensors.torch.load_file", peer, SAFETENSORS_EXCLUDED)
    # A fresh copy: the tests write next to themselves. Whole files, so a test keeps the neighbours
    # it may rely on; only counted tests are judged.
    ours_dir = peers.extract_safetensors_suite(sdist, tmp_path / "ours")
    ours = suites.run_pytest("safetensors", "ours", ours_dir, verdict.counted_files(), tmp_path / "results")
    suites.judge(verdict, ours)
    table = _report(verdict)

    _check_routing(peer, ours, "safetensors")
    _assert_exclusions_current(verdict)
    assert len(verdict.counted) >= SAFETENSORS_MIN_COUNTED, f"too few tests counted to mean anything\n{table}"
    assert not verdict.failed, f"{len(verdict.failed)} of safetensors' tests fail against ours\n{table}"


def test_runai_suite_against_safetensors_streamer(tmp_path: Path) -> None:
    _require_installed("runai-model-streamer", peers.RUNAI_VERSION)
    wheel = _fetch(peers.runai_wheel)

    peer_dir = peers.extract_runai_suite(wheel, tmp_path / "peer")
    peer = suites.merge(
        suites.run_pytest("runai", "peer", peer_dir, ["tests"], tmp_path / "results"),
        suites.run_distributed("runai", "peer", peer_dir, [RUNAI_DIST_TESTS], tmp_path / "results" / "peer-dist"))
    verdict = suites.classify(f"Run:ai Model Streamer {peers.RUNAI_VERSION} safetensors_streamer tests (local and "
                              "2-rank gloo) -> loader_plugins.SafetensorsStreamer", "SafetensorsStreamer", peer,
                              RUNAI_EXCLUDED)
    files = verdict.counted_files()
    local_files = [f for f in files if f != RUNAI_DIST_TESTS]
    ours_dir = peers.extract_runai_suite(wheel, tmp_path / "ours")
    ours = suites.merge(
        suites.run_pytest("runai", "ours", ours_dir, local_files, tmp_path / "results"),
        suites.run_distributed("runai", "ours", ours_dir, [RUNAI_DIST_TESTS], tmp_path / "results" / "ours-dist"))
    suites.judge(verdict, ours, RUNAI_KNOWN_DIFFERENCES)
    table = _report(verdict)

    _check_routing(peer, ours, "runai_model_streamer")
    _assert_exclusions_current(verdict)
    assert len(verdict.counted) >= RUNAI_MIN_COUNTED, f"too few tests counted to mean anything\n{table}"
    assert RUNAI_DIST_TESTS in files, f"no 2-rank test counted: the distributed run did not work\n{table}"
    assert verdict.pass_rate >= RUNAI_MIN_PASS_RATE, \
        f"{verdict.pass_rate:.1%} of Run:ai's tests pass against ours (at least {RUNAI_MIN_PASS_RATE:.0%} wanted)\n{table}"
