"""``engines.json``: where the live engines of a router or an agent are, so that one restarted on
the same log directory finds them again. Written whole and atomically (a new file renamed over the
old one), readable by its owner only (mode 0600): a local engine's record holds its secret."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

#: the records' file in a router's or an agent's log directory
FILE_NAME = "engines.json"


class EngineRecords:
    """The records in ``path``: a list of JSON objects, one per live engine."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> list[dict[str, Any]]:
        """The records written last (none when the file is missing or not ours)."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        engines = data.get("engines") if isinstance(data, dict) else None
        return [r for r in engines if isinstance(r, dict)] if isinstance(engines, list) else []

    def save(self, records: Iterable[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)           # a leftover temporary file keeps its mode through O_CREAT
        with os.fdopen(fd, "w") as out:
            json.dump({"engines": list(records)}, out, indent=1)
        os.replace(tmp, self.path)
