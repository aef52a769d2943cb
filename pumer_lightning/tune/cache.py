"""``make tune``'s cache: one JSON line per measured figure, keyed by everything the figure depends on.

A key is a dict: the kind of figure (``accuracy`` or ``timing``), the schedule (`schedule_key`), the checkpoint
(path, size and modification time), a fingerprint of the configuration the model and data were built from (the
schedule left out) and of the code that runs them (`code_fingerprint`), the split and how much of it, and for
timings the device, batch size, batches and rounds.
A re-run with the same inputs finds every figure and measures nothing; a changed checkpoint or configuration
misses. Appending is the only write, so an interrupted run keeps what it measured (the last line of a key wins).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any


def fingerprint(value: Any) -> str:
    """A short hash of a JSON-able value (sorted keys; anything else as its ``str``)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


#: The packages whose code decides a figure: model, reducer, task metrics, data pipeline (and the timer).
CODE_PACKAGES = ("models", "reduce", "tasks", "data")


def code_fingerprint(root: Path | None = None) -> str:
    """A hash of the source of `CODE_PACKAGES` and ``measure.py``: an edit there (a preset's width or head
    count, a counting rule) changes what a checkpoint computes, so the figures measured before miss."""
    root = root or Path(__file__).resolve().parents[1]
    digest = hashlib.sha1()
    files = [root / "measure.py", *(p for pkg in CODE_PACKAGES for p in sorted((root / pkg).rglob("*.py")))]
    for path in files:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def checkpoint_id(path: Path) -> dict[str, Any]:
    """Path, size and modification time of a checkpoint: a rewritten file is a different checkpoint."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class TuneCache:
    """The JSON-lines cache at ``path``; ``fresh=True`` ignores what the file holds (and appends anew)."""

    def __init__(self, path: Path, fresh: bool = False) -> None:
        self.path = Path(path)
        self._entries: dict[str, dict[str, Any]] = {}
        self.hits = {"accuracy": 0, "timing": 0}
        self.misses = {"accuracy": 0, "timing": 0}
        if self.path.is_file() and not fresh:
            self._read()

    def _read(self) -> None:
        for line in self.path.read_text().splitlines():
            try:
                entry = json.loads(line)
                self._entries[entry["id"]] = entry["value"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by an interrupted write

    @staticmethod
    def entry_id(key: dict[str, Any]) -> str:
        return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """The stored value of ``key`` (counted as a hit), or None (counted as a miss)."""
        value = self._entries.get(self.entry_id(key))
        kind = key.get("kind", "accuracy")
        counter = self.hits if value is not None else self.misses
        counter[kind] = counter.get(kind, 0) + 1
        return value

    def peek(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """Like `get`, without counting."""
        return self._entries.get(self.entry_id(key))

    def put(self, key: dict[str, Any], value: dict[str, Any]) -> None:
        """Store ``value`` under ``key`` and append it to the file at once."""
        entry_id = self.entry_id(key)
        self._entries[entry_id] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"id": entry_id, "key": key, "value": value, "written": time.time()}, default=str)
        with self.path.open("a") as f:
            f.write(line + "\n")
