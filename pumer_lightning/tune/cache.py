"""``make tune``'s cache: one JSON line per measured figure, keyed by everything the figure depends on
(`pumer_lightning.lab.cache.JsonLinesStore`).

A key is a dict: the kind of figure (``accuracy`` or ``timing``), the schedule (`schedule_key`), the checkpoint
(path, size and modification time), a fingerprint of the configuration the model and data were built from (the
schedule left out) and of the code that runs them (`code_fingerprint`), the split and how much of it, and for
timings the device, batch size, batches and rounds.
A re-run with the same inputs finds every figure and measures nothing; a changed checkpoint or configuration
misses. Appending is the only write, so an interrupted run keeps what it measured (the last line of a key wins);
a line that cannot be read (not UTF-8, not JSON, a value of the wrong shape) is skipped and counted, with one
warning naming the file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pumer_lightning.lab.cache import JsonLinesStore, content_hash


def fingerprint(value: Any) -> str:
    """A short hash of a JSON-able value (sorted keys; anything else as its ``str``)."""
    return content_hash(value, length=16)


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


#: The numeric fields the tuner reads from a cached figure, by the key's kind.
FIELDS = {
    "accuracy": ("value", "se", "n", "drop", "drop_se"),
    "timing": ("examples_per_sec", "speedup", "spread", "gflops_per_example"),
}


class TuneCache(JsonLinesStore):
    """The JSON-lines cache at ``path`` (``fresh=True`` ignores what the file holds and appends anew), counting
    hits and misses by the key's ``kind``."""

    def __init__(self, path: Path, fresh: bool = False) -> None:
        super().__init__(path, fresh)
        self.hits = {"accuracy": 0, "timing": 0}
        self.misses = {"accuracy": 0, "timing": 0}

    def accepts(self, key: Any, value: dict[str, Any]) -> bool:
        """A figure of a known kind with every field the tuner reads, each a number."""
        fields = FIELDS.get(key.get("kind")) if isinstance(key, dict) else None
        number = (int, float)
        return fields is not None and all(
            isinstance(value.get(f), number) and not isinstance(value.get(f), bool) for f in fields
        )

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """The stored value of ``key`` (counted as a hit), or None (counted as a miss)."""
        value = super().get(key)
        kind = key.get("kind", "accuracy")
        counter = self.hits if value is not None else self.misses
        counter[kind] = counter.get(kind, 0) + 1
        return value
