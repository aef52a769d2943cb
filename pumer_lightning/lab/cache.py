"""Content-hash caches: a figure (or a trained checkpoint) is stored under a hash of everything it depends on.

* `content_hash`: the hash of a JSON-able value (sorted keys, anything else as its ``str``), the name of a cached
  file (``make study``'s checkpoints) or the id of an entry.
* `JsonLinesStore`: one JSON line per entry, ``{"id", "key", "value", "written"}``, appended as it is measured,
  so an interrupted run keeps what it measured (the last line of an id wins). ``make tune``'s cache.

Reading never loses the rest of the file to one bad line: a line cut off by an interrupted write (the file's last
line, no newline) is dropped quietly and the next entry starts on a line of its own; any other line that is not
UTF-8, not JSON, not an entry whose value is a JSON object, or whose value a subclass does not accept
(`JsonLinesStore.accepts`) is skipped and counted, with one warning naming the file and the count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def content_hash(value: Any, algorithm: str = "sha1", length: int | None = None) -> str:
    """The hex digest (its first ``length`` characters) of ``value`` as sorted-key JSON (``str`` for the rest)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.new(algorithm, text.encode()).hexdigest()[:length]


def _entry(line: bytes) -> dict[str, Any] | None:
    """One line's entry (``id`` a string, ``value`` a JSON object), or None when it is not a readable one."""
    try:
        entry = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
        return None
    return entry if isinstance(entry.get("value"), dict) else None


class JsonLinesStore:
    """The JSON-lines file at ``path``, read once (``fresh=True``: ignore what it holds, append anew).

    ``skipped`` counts the lines that could not be read (a cut-off last line not included).
    """

    def __init__(self, path: str | Path, fresh: bool = False) -> None:
        self.path = Path(path)
        self.entries: dict[str, dict[str, Any]] = {}
        self.skipped = 0
        if self.path.is_file() and not fresh:
            self._read()

    def _read(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        cut = lines.pop() if lines else b""  # after the last newline: empty, or a line cut off mid-write
        for line in lines:
            if not line.strip():
                continue
            entry = _entry(line)
            if entry is None or not self.accepts(entry.get("key"), entry["value"]):
                self.skipped += 1
            else:
                self.entries[entry["id"]] = entry["value"]
        last = _entry(cut) if cut.strip() else None
        if last is not None and self.accepts(last.get("key"), last["value"]):
            self.entries[last["id"]] = last["value"]
        if self.skipped:
            log.warning(
                "%s: skipped %d unreadable line(s) (not UTF-8, not JSON, or not an entry of the expected shape); "
                "what they held will be measured again",
                self.path,
                self.skipped,
            )

    def accepts(self, key: Any, value: dict[str, Any]) -> bool:
        """Whether an entry read from the file has the shape its users need (a subclass's rule; any object here)."""
        return True

    @staticmethod
    def entry_id(key: dict[str, Any]) -> str:
        return content_hash(key)

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """The stored value of ``key``, or None."""
        return self.entries.get(self.entry_id(key))

    def put(self, key: dict[str, Any], value: dict[str, Any]) -> None:
        """Store ``value`` under ``key`` and append it to the file at once (on a line of its own, also after a
        line cut off by an interrupted write)."""
        entry_id = self.entry_id(key)
        self.entries[entry_id] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"id": entry_id, "key": key, "value": value, "written": time.time()}, default=str)
        with self.path.open("a+b") as f:
            f.seek(0, 2)
            if f.tell():
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    line = "\n" + line
            f.write((line + "\n").encode())
