"""Shared pieces of the converters: locating source files, the split plan type, running and reporting."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
