"""Run a peer's suite twice (the real peer, then ours) and decide which of its tests count.

A test counts when it passes against the real peer *and* reaches the routed API there (the
routing shim records that), and no entry of the suite's exclusion list names it. Each run is a
pytest subprocess whose JUnit XML gives the outcome per node id.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .peers import REPO

log = logging.getLogger(__name__)

RUN_TIMEOUT_S = 300
DIST_RANKS = 2


@dataclass(frozen=True)
class Outcome:
    status: str        # "passed", "failed" (failure or error) or "skipped"
    message: str = ""  # the first line of the failure message, or the skip reason


@dataclass
class Run:
    """One pytest run: outcome per node id and the node ids that reached the routed API."""

    outcomes: dict[str, Outcome]
    reached: set[str]
    target: str        # what the shim routed to, e.g. "loader_plugins.streamer.load_file"
    problem: str = ""  # why a process wrote no results (a crash, a hang): the outcomes are then missing


def _first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def _failure_message(element: ET.Element) -> str:
    message = _first_line(element.get("message"))
    if message in ("", "collection failure"):
        # a module that failed to import gets a placeholder; the exception is the last "E   " line
        raised = [line[1:].strip() for line in (element.text or "").splitlines() if line.startswith("E ")]
        message = raised[-1] if raised else message
    return message


def parse_junit(path: Path) -> dict[str, Outcome]:
    """Outcome per node id; a module that failed to import is reported as ``<module> (collection)``."""
    outcomes: dict[str, Outcome] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        properties = {p.get("name"): p.get("value") for p in case.iter("property")}
        nodeid = properties.get("nodeid") or f"{case.get('name')} (collection)"
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        skipped = case.find("skipped")
        if failure is not None:
            outcome = Outcome("failed", _failure_message(failure))
        elif skipped is not None:
            outcome = Outcome("skipped", _first_line(skipped.get("message")))
        else:
            outcome = Outcome("passed")
        # a test that failed in its call and errored in teardown appears twice: keep the failure
        if outcomes.get(nodeid, Outcome("passed")).status != "failed":
            outcomes[nodeid] = outcome
    return outcomes


def _env(suite: str, route: str, reached: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    # The working tree's loader_plugins and the conformance package (the routing shim), whatever is installed.
    paths = [str(REPO), str(REPO / "integration_tests"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["CONFORMANCE_SUITE"] = suite
    env["CONFORMANCE_ROUTE"] = route
    if reached is not None:
        env["CONFORMANCE_REACHED"] = str(reached)
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str], results: list[Path]) -> str:
    """Run one job that should write ``results``; return "" or why it did not, with its output's tail."""
    log.info("Running %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        return f"did not finish in {RUN_TIMEOUT_S} s; output tail:\n{_tail(e.stdout, e.stderr)}"
    log.debug("exit %d; output tail:\n%s", proc.returncode, _tail(proc.stdout, proc.stderr))
    missing = [path.name for path in results if not path.exists()]
    # exit codes 0 (all passed) and 1 (some failed) are results; anything else means the session broke
    if proc.returncode not in (0, 1) or missing:
        return (f"exited with {proc.returncode}, missing {missing or 'nothing'}; output tail:\n"
                f"{_tail(proc.stdout, proc.stderr)}")
    return ""


def _tail(*outputs, lines: int = 30) -> str:
    text = "\n".join(o.decode() if isinstance(o, bytes) else (o or "") for o in outputs)
    return "\n".join(text.splitlines()[-lines:])


def _read_reached(path: Path) -> tuple[set[str], str]:
    data = json.loads(path.read_text())
    return set(data["reached"]), data["target"]


def run_pytest(suite: str, route: str, suite_dir: Path, selection: list[str], out_dir: Path) -> Run:
    """Run ``selection`` (paths or node ids, relative to ``suite_dir``) in one pytest process."""
    if not selection:   # pytest would run everything under its rootdir
        return Run({}, set(), "", "no test selected")
    out_dir.mkdir(parents=True, exist_ok=True)
    xml, reached = out_dir / f"{route}.xml", out_dir / f"{route}.reached.json"
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "conformance.routing_shim", "-q",
           "--continue-on-collection-errors", f"--rootdir={suite_dir}", f"--junitxml={xml}", *selection]
    problem = _run(cmd, suite_dir, _env(suite, route, reached), [xml, reached])
    if problem:
        return Run({}, set(), "", problem)
    return Run(parse_junit(xml), *_read_reached(reached))


def run_distributed(suite: str, route: str, suite_dir: Path, selection: list[str], out_dir: Path) -> Run:
    """Run ``selection`` in each rank of a 2-process gloo job; a test passes only if it passes on both."""
    out_dir.mkdir(parents=True, exist_ok=True)
    runner = Path(__file__).with_name("dist_runner.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={DIST_RANKS}",
           str(runner), str(out_dir), f"--rootdir={suite_dir}", *selection]
    results = [out_dir / f"rank{rank}.{kind}" for rank in range(DIST_RANKS) for kind in ("xml", "reached.json")]
    problem = _run(cmd, suite_dir, _env(suite, route, None), results)
    if problem:
        return Run({}, set(), "", problem)
    outcomes: dict[str, Outcome] = {}
    reached: set[str] = set()
    targets = set()
    for rank in range(DIST_RANKS):
        xml, reached_file = out_dir / f"rank{rank}.xml", out_dir / f"rank{rank}.reached.json"
        rank_reached, target = _read_reached(reached_file)
        reached |= rank_reached
        targets.add(target)
        for nodeid, outcome in parse_junit(xml).items():
            if outcome.status != "passed":
                outcome = Outcome(outcome.status, f"rank {rank}: {outcome.message}")
            previous = outcomes.get(nodeid)
            if previous is None or previous.status == "passed":   # the first rank that did not pass says why
                outcomes[nodeid] = outcome
    return Run(outcomes, reached, " + ".join(sorted(targets)))


def merge(first: Run, second: Run) -> Run:
    """One run out of two over different tests (Run:ai's local tests and its 2-rank tests)."""
    return Run({**first.outcomes, **second.outcomes}, first.reached | second.reached,
               " + ".join(sorted({first.target, second.target} - {""})),
               "\n".join(p for p in (first.problem, second.problem) if p))


def _matching_exclusion(nodeid: str, excluded: dict[str, str]) -> str | None:
    """An exclusion names a test, a class or a module: ``path.py``, ``path.py::Class``, ``path.py::Class::test``."""
    for key in excluded:
        if nodeid == key or nodeid.startswith(key + "::"):
            return key
    return None


@dataclass
class Verdict:
    """What a suite's two runs say: which tests count, and how ours does on them."""

    title: str
    api: str
    counted: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)          # node id -> first line of our failure
    excluded: dict[str, str] = field(default_factory=dict)        # node id -> reason
    not_reaching: list[str] = field(default_factory=list)         # passed on the peer, never reached the API
    not_passing_on_peer: dict[str, str] = field(default_factory=dict)  # node id -> "skipped: why" / "failed: why"
    unused_exclusions: list[str] = field(default_factory=list)
    known: dict[str, str] = field(default_factory=dict)           # node id -> why ours differs, if it fails
    problem: str = ""                                             # why our run wrote no results, if it did not

    @property
    def pass_rate(self) -> float:
        return len(self.passed) / len(self.counted) if self.counted else 0.0

    def counted_files(self) -> list[str]:
        return sorted({nodeid.split("::", 1)[0] for nodeid in self.counted})


def classify(title: str, api: str, peer: Run, excluded: dict[str, str]) -> Verdict:
    """Decide from the peer's run alone which tests count; :func:`judge` then reads our run.

    Exclusions apply only to tests that would otherwise count, so one that stops reaching the API,
    or stops passing against the peer, shows up as unused instead of hiding the change."""
    verdict = Verdict(title, api)
    used = set()
    for nodeid, outcome in sorted(peer.outcomes.items()):
        key = _matching_exclusion(nodeid, excluded)
        if outcome.status != "passed":
            verdict.not_passing_on_peer[nodeid] = f"{outcome.status}: {outcome.message}"
        elif nodeid not in peer.reached:
            verdict.not_reaching.append(nodeid)
        elif key is not None:
            used.add(key)
            verdict.excluded[nodeid] = excluded[key]
        else:
            verdict.counted.append(nodeid)
    verdict.unused_exclusions = sorted(set(excluded) - used)
    return verdict


def judge(verdict: Verdict, ours: Run, known: dict[str, str] | None = None) -> None:
    """Fill ``passed``/``failed`` from our run: a counted test passes only if it passed *and* reached ours.
    ``known``: node id -> why ours is meant to differ; such a test still counts, and its failure row
    carries the reason (one that passes is reported as no longer needing it)."""
    verdict.problem = ours.problem
    verdict.known = dict(known or {})
    for nodeid in verdict.counted:
        outcome = ours.outcomes.get(nodeid)
        if outcome is None:
            verdict.failed[nodeid] = _first_line(ours.problem) or "did not run against ours"
        elif outcome.status == "skipped":
            verdict.failed[nodeid] = f"skipped against ours: {outcome.message}"
        elif outcome.status != "passed":
            verdict.failed[nodeid] = outcome.message
        elif nodeid not in ours.reached:
            verdict.failed[nodeid] = f"passed without reaching {ours.target}"
        else:
            verdict.passed.append(nodeid)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _group(nodeid: str) -> str:
    """The module, or the module and class, of a node id: what the not-counted tables list."""
    return nodeid.rsplit("::", 1)[0] if "::" in nodeid else nodeid


def render(verdict: Verdict) -> str:
    """The verdict as markdown: the summary table, then failures, exclusions and what did not count."""
    not_counted = len(verdict.not_reaching) + len(verdict.not_passing_on_peer)
    lines = [
        f"### {verdict.title}",
        "",
        "| counted | passed | failed | pass rate | excluded | not counted |",
        "|---|---|---|---|---|---|",
        (f"| {len(verdict.counted)} | {len(verdict.passed)} | {len(verdict.failed)} | {verdict.pass_rate:.1%} "
         f"| {len(verdict.excluded)} | {not_counted} |"),
        "",
    ]
    if verdict.problem:
        lines += ["**Our run wrote no results**", "", "```", verdict.problem, "```", ""]
    if verdict.failed:
        lines += ["**Failed against ours**", "", "| test | first line of the failure |", "|---|---|"]
        lines += [f"| `{nodeid}` | {_cell(message)}"
                  f"{'<br>**why ours differs:** ' + _cell(verdict.known[nodeid]) if nodeid in verdict.known else ''} |"
                  for nodeid, message in verdict.failed.items()]
        lines.append("")
    stale = sorted(n for n in verdict.known if n in verdict.passed or n not in verdict.counted)
    if stale:
        lines += ["**Known differences that no longer fail (or no longer count):** "
                  + ", ".join(f"`{n}`" for n in stale), ""]
    if verdict.excluded:
        lines += ["**Excluded**", "", "| test | reason |", "|---|---|"]
        lines += [f"| `{nodeid}` | {_cell(reason)} |" for nodeid, reason in verdict.excluded.items()]
        lines.append("")
    if verdict.not_passing_on_peer:
        groups = Counter((_group(nodeid), why) for nodeid, why in verdict.not_passing_on_peer.items())
        lines += [f"**Not counted: does not pass against the real peer ({len(verdict.not_passing_on_peer)})**", "",
                  "| tests | count | outcome against the peer |", "|---|---|---|"]
        lines += [f"| `{group}` | {count} | {_cell(why)} |" for (group, why), count in groups.items()]
        lines.append("")
    groups = Counter(_group(nodeid) for nodeid in verdict.not_reaching)
    lines += [f"**Not counted: does not reach {verdict.api} ({len(verdict.not_reaching)})**", "",
              "| tests | count |", "|---|---|"]
    lines += [f"| `{group}` | {count} |" for group, count in groups.items()]
    lines.append("")
    return "\n".join(lines)
