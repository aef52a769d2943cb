"""Shared pieces of the converters: locating source files, the split plan type, running and reporting."""

from __future__ import annotations

import codecs
import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..writer import RecordPlan, SplitSummary, SplitWriter


@dataclass
class PreparedSplit:
    """A split ready to write: record plans plus what ``meta.json`` records about it.

    ``skipped`` lists annotation-level drops found while planning (reason -> details), reported with the
    image-level ones in the closing summary.
    """

    split: str
    plans: list[RecordPlan]
    labeled: bool
    labels: list[str] | None
    extra: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, list[str]] = field(default_factory=dict)


def check_text(value: object, field: str) -> str:
    """``value`` if it is a non-empty string that encodes as UTF-8; otherwise ValueError naming ``field``.

    JSON may hold a lone UTF-16 surrogate (``"\\ud83d"``, a truncated emoji): Python reads it into a string that
    no tokenizer accepts, so such a line is rejected here rather than failing a run later.
    """
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string, got {type(value).__name__} {value!r}"[:200])
    if not value.strip():
        raise ValueError(f"{field} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{field} is not valid Unicode: {exc.reason} {value[exc.start : exc.end]!r} at position {exc.start}"
        ) from None
    return value


#: What annotation files may be encoded in, as the errors say it.
TEXT_ENCODINGS = "UTF-8 (with or without a byte-order mark) or UTF-16 with a byte-order mark"


def sniff_encoding(path: Path) -> str:
    """The codec to read annotation file ``path`` with: ``utf-8-sig`` (UTF-8 with or without a BOM) or ``utf-16``
    (a UTF-16 BOM, either byte order). A UTF-32 BOM, or NUL bytes near the start (UTF-16/32 without a BOM), raise a
    ValueError naming the file and the encodings expected."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        raise ValueError(f"{path}: is UTF-32 (its byte-order mark says so); expected {TEXT_ENCODINGS}")
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    if b"\x00" in head:
        raise ValueError(
            f"{path}: holds NUL bytes (UTF-16 or UTF-32 without a byte-order mark?); expected {TEXT_ENCODINGS}"
        )
    return "utf-8-sig"


@contextmanager
def open_text(path: Path) -> Iterator[IO[str]]:
    """Open an annotation file for reading as text, whatever of :data:`TEXT_ENCODINGS` it is in.

    Every preparer reads its annotation files through this. The byte-order mark is dropped (a UTF-8 BOM would
    otherwise make the first JSON line unreadable), and bytes that are not valid in the file's encoding raise one
    ValueError naming the file, the offending byte and the encodings expected (not a bare ``'utf-8' codec can't
    decode byte 0xff``).
    """
    encoding = sniff_encoding(path)
    try:
        with open(path, encoding=encoding) as f:
            yield f
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start : exc.start + 4]
        name = "UTF-8" if encoding == "utf-8-sig" else "UTF-16"
        raise ValueError(
            f"{path}: is not valid {name} (bytes {bad!r}: {exc.reason}); expected {TEXT_ENCODINGS}: re-save the "
            "file in one of them"
        ) from None


def find_file(root: Path, name: str, subdirs: Iterable[str] = (".",), required: bool = True) -> Path | None:
    """``root/<subdir>/name`` for the first subdir where it exists; raise naming every place looked at."""
    tried = []
    for sub in subdirs:
        path = (root / sub / name) if sub != "." else root / name
        tried.append(str(path))
        if path.is_file():
            return path
    if required:
        raise FileNotFoundError(f"{name} not found; looked for {', '.join(tried)}")
    return None


def find_dir(root: Path, name: str, subdirs: Iterable[str] = (".",)) -> Path:
    """``root/<subdir>/name`` for the first subdir where that directory exists; raise naming the candidates."""
    tried = []
    for sub in subdirs:
        path = (root / sub / name) if sub != "." else root / name
        tried.append(str(path))
        if path.is_dir():
            return path
    raise FileNotFoundError(f"image directory {name!r} not found; looked for {', '.join(tried)}")


def first_dir(candidates: Iterable[Path], what: str) -> Path:
    tried = []
    for path in candidates:
        tried.append(str(path))
        if path.is_dir():
            return path
    raise FileNotFoundError(f"{what} not found; looked for {', '.join(tried)} (pass --images DIR)")


def index_images(folder: Path) -> dict[str, Path]:
    """Map file stem -> path for every file under ``folder`` (recursively; NLVR2 train uses subfolders)."""
    out: dict[str, Path] = {}
    for path in folder.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            out.setdefault(path.stem, path)
    return out


def shuffle_train(split: str, plans: list[RecordPlan], seed: int) -> list[RecordPlan]:
    """Training records are written in a seeded random order, so every shard mixes the whole split."""
    if split == "train":
        random.Random(seed).shuffle(plans)
    return plans


def write_split(
    prepared: PreparedSplit,
    out_root: Path,
    *,
    task: str,
    dataset: str,
    shard_size: int,
    workers: int,
    overwrite: bool,
    progress: bool,
    command: str,
) -> SplitSummary:
    writer = SplitWriter(
        out_root / prepared.split,
        task=task,
        dataset=dataset,
        split=prepared.split,
        labeled=prepared.labeled,
        labels=prepared.labels,
        shard_size=shard_size,
        overwrite=overwrite,
        created_by=command,
        extra=prepared.extra,
    )
    _, summary = writer.write(prepared.plans, workers=workers, progress=progress)
    for reason, details in prepared.skipped.items():
        summary.note_skip(reason, details[0] if details else "", n=len(details))
        summary.examples_of_skipped[reason] = details[:5]
    return summary
