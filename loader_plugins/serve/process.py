"""Processes on this node: a free port, the loopback test, a process found again by pid, and the
one way this package stops a process group (engines, and the routers and agents tests start)."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

#: where engines listen: their node's loopback, never another address (see :mod:`.guard`)
LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 (and IPv4 loopback mapped into IPv6) and ``localhost``."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def cmdline(pid: int) -> list[str]:
    """A process's command line, as words (empty when it cannot be read)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


class PidHandle:
    """A handle on a process another router or agent started (found again after a restart): the
    subset of :class:`subprocess.Popen` the engines and :func:`stop_process_group` use, by pid."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                self.returncode = -1
            except PermissionError:
                pass
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.1)
        return self.returncode


def stop_process_group(proc: subprocess.Popen | PidHandle, grace: float = 60.0) -> None:
    """SIGTERM a process started with ``start_new_session=True`` and its group; SIGKILL after
    ``grace`` seconds. A process that already exited is left as it is. Blocks: from a coroutine,
    run it in a thread."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
