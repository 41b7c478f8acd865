"""A storage emulator as a process on 127.0.0.1 (SeaweedFS here; fake-gcs-server and Azurite in
``integration_tests``): :class:`EmulatorProcess` starts it in its own process group, waits until it
answers, starts it again on new ports when it exits while starting, and always SIGKILLs that group
on exit. :func:`run_by_hand` is the ``python <server>.py WORKDIR`` entry of each emulator module.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable


class _EarlyExit(RuntimeError):
    """The emulator exited while starting (most often: a port was taken between picking and binding)."""


class EmulatorProcess:
    """An emulator process, as a context manager. A subclass says how to find and launch it and
    when it is ready:

    - :meth:`_prepare` (once per :meth:`start`): find the binary, raise ``FileNotFoundError`` if absent;
    - :meth:`_launch` (per attempt): pick ports, set the addresses, :meth:`_popen` the command;
    - :meth:`_readiness`: a probe that returns True once the emulator answers, and the errors
      that mean "not yet".

    ``_program`` names the binary and ``_title`` the service in errors; :meth:`_address` is where
    clients reach it (printed when ready, named when it is not)."""

    _program = "emulator"
    _title = "emulator"
    _probe_interval = 0.1

    def __init__(self, workdir: str | os.PathLike, log_name: str, *, ready_timeout: float):
        self.workdir = Path(workdir)
        self.ready_timeout = ready_timeout
        self.log_path = self.workdir / log_name
        self._proc: subprocess.Popen | None = None
        self._log = None

    # -- what a subclass says ----------------------------------------------------------------
    def _prepare(self) -> None:
        raise NotImplementedError

    def _launch(self, attempt: int) -> None:
        raise NotImplementedError

    def _readiness(self) -> tuple[Callable[[], bool], tuple[type[BaseException], ...]]:
        raise NotImplementedError

    def _address(self) -> str:
        raise NotImplementedError

    def _exit_note(self) -> str:
        """Said after "exited with status N while starting"."""
        return ""

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, *, tries: int = 3):
        """Start and wait until it answers; an early exit (a port taken meanwhile) gets new ports."""
        self._prepare()
        for attempt in range(1, tries + 1):
            try:
                self._launch(attempt)
                self._wait_ready()
                return self
            except _EarlyExit:
                self.kill()
                if attempt == tries:
                    raise
            except BaseException:
                self.kill()
                raise
        return self

    def _popen(self, args: list[str], *, env: dict[str, str] | None = None) -> None:
        self._log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      cwd=self.workdir, env=env, start_new_session=True)

    def _wait_ready(self) -> None:
        ready, not_yet = self._readiness()
        deadline = time.monotonic() + self.ready_timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise _EarlyExit(f"{self._program} exited with status {self._proc.returncode} while starting"
                                 f"{self._exit_note()}; log tail:\n{self.log_tail()}")
            try:
                if ready():
                    return
            except not_yet as exc:
                last = exc
            time.sleep(self._probe_interval)
        raise TimeoutError(f"{self._title} at {self._address()} not ready after {self.ready_timeout:.0f} s "
                           f"(last error: {last}); log tail:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the whole process group."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        if self._log is not None:
            self._log.close()
            self._log = None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()

    def env(self) -> dict[str, str]:
        """Environment for a client process."""
        raise NotImplementedError

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def run_by_hand(server: EmulatorProcess, title: str, *, quote: str = "") -> None:
    """Start ``server``, print where it listens and the variables to export (their values between
    ``quote``), and keep it until SIGINT, SIGTERM or SIGHUP."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    # a background job may start with SIGINT ignored: stop on SIGINT, SIGTERM or SIGHUP alike
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    with server:
        print(f"{title} ready at {server._address()}; log: {server.log_path}", flush=True)
        for key, value in server.env().items():
            print(f"export {key}={quote}{value}{quote}")
        print("Ctrl-C (or SIGTERM) stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                signal.pause()
